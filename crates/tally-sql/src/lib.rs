//! Read-only SQL over a project's collections: `POST /3.0/projects/{PID}/sql`.
//!
//! For the questions Keen's analyses cannot express. Each collection of the project is a table
//! whose columns are its dotted properties (`SELECT "user.plan", count(*) FROM pageviews GROUP BY
//! 1`). The query runs on DataFusion — this is the only crate that links it — with:
//!
//! * **one project only**: the session's sole catalog is the project's collections
//!   ([`ProjectSchema`]); no default catalog, no `information_schema`;
//! * **no writes and no files**: DDL, DML (`INSERT`, `COPY`) and statements (`SET`) are refused
//!   before planning, so `CREATE EXTERNAL TABLE` cannot reach the file system;
//! * **scoped rows**: an access key's filters apply as if they were part of every table: the
//!   caller passes a [`RowScope`] and each table holds only the rows it keeps (its columns too
//!   come only from those rows, so not even another tenant's property names show);
//! * **limits**: a memory pool of `max_memory_bytes` (DataFusion fails an operator past it) and a
//!   deadline (504), the same limits as Keen queries.
//!
//! A table is built when a query names it, from the collection's segments at that moment: one
//! Arrow batch per segment, so DataFusion scans segments in parallel. Column types follow the
//! values: strings → `Utf8`, numbers → `Float64`, booleans → `Boolean`, `keen.timestamp` and
//! `keen.created_at` → `Timestamp(ms, UTC)`; lists, empty objects, and properties holding more
//! than one JSON type → `Utf8` holding each value's JSON text (strings stay unquoted).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, StringBuilder, TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider, SchemaProvider, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use serde_json::{Map, Value};
use tally_core::ids::ProjectId;
use tally_store::events::{Cell, EventStore, Segment, Tag, cell_value};

mod json;

/// What one SQL query may use.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    /// Past this the query is stopped ([`SqlError::Timeout`]).
    pub timeout: Duration,
    /// DataFusion's memory pool for the query.
    pub max_memory_bytes: usize,
    /// The most rows an answer may have.
    pub max_rows: usize,
}

/// Why a SQL query did not answer.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The statement is not a query, does not parse, names what does not exist, or failed
    /// (including running out of its memory): a message for the client (400).
    #[error("{0}")]
    Invalid(String),
    /// The query ran past its time limit (504).
    #[error("the query did not finish within its time limit")]
    Timeout,
    /// More rows than an answer may hold (400).
    #[error("the answer has more than {0} rows; add a LIMIT or aggregate")]
    TooManyRows(usize),
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        // DataFusion's messages name the table, column or clause; they carry no internals
        // worth hiding (no paths: the session has no files).
        SqlError::Invalid(e.to_string())
    }
}

/// The rows of a segment a caller may see: given a segment, the segment of just those rows.
pub type RowScope = Arc<dyn Fn(&Segment) -> Segment + Send + Sync>;

/// Runs a read-only SQL query over `project`'s collections (only the rows `scope` keeps, when
/// given); answers `{"result": [row, ...]}`, each row an object by column name.
pub async fn run(
    store: Arc<EventStore>,
    project: ProjectId,
    scope: Option<RowScope>,
    sql: &str,
    limits: &SqlLimits,
) -> Result<Value, SqlError> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(limits.max_memory_bytes, 1.0)
        .build_arc()?;
    let config = SessionConfig::new()
        .with_create_default_catalog_and_schema(false)
        .with_information_schema(false)
        .with_default_catalog_and_schema("tally", "events");
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let catalog = MemoryCatalogProvider::new();
    catalog.register_schema(
        "events",
        Arc::new(ProjectSchema {
            store,
            project,
            scope,
        }),
    )?;
    ctx.register_catalog("tally", Arc::new(catalog));
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let work = async {
        let frame = ctx.sql_with_options(sql, options).await?;
        let batches = frame.collect().await?;
        Ok::<_, SqlError>(batches)
    };
    let batches = tokio::time::timeout(limits.timeout, work)
        .await
        .map_err(|_| SqlError::Timeout)??;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if rows > limits.max_rows {
        return Err(SqlError::TooManyRows(limits.max_rows));
    }
    let mut out = Vec::with_capacity(rows);
    for batch in &batches {
        json::append_rows(batch, &mut out);
    }
    let mut body = Map::new();
    body.insert("result".into(), Value::Array(out));
    Ok(Value::Object(body))
}

/// The project's collections as tables.
pub struct ProjectSchema {
    store: Arc<EventStore>,
    project: ProjectId,
    /// The rows the caller may see (all, when `None`).
    scope: Option<RowScope>,
}

impl std::fmt::Debug for ProjectSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectSchema")
            .field("project", &self.project)
            .field("scoped", &self.scope.is_some())
            .finish()
    }
}

#[async_trait]
impl SchemaProvider for ProjectSchema {
    fn table_names(&self) -> Vec<String> {
        self.store.collections(self.project)
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        let snapshot = self.store.snapshot(self.project, name);
        if snapshot.is_empty() {
            return Ok(None);
        }
        // Building Arrow columns is a scan of the whole collection: on the blocking pool.
        let scope = self.scope.clone();
        let (schema, partitions) = tokio::task::spawn_blocking(move || {
            let scoped: Vec<Segment> = match &scope {
                Some(scope) => snapshot.iter().map(|s| scope(&s.segment)).collect(),
                None => Vec::new(),
            };
            let segments: Vec<&Segment> = match &scope {
                Some(_) => scoped.iter().collect(),
                None => snapshot.iter().map(|s| &s.segment).collect(),
            };
            let schema = table_schema(&segments);
            let partitions = segments
                .iter()
                .filter(|s| s.rows() > 0)
                .map(|s| to_batch(s, &schema).map(|b| vec![b]))
                .collect::<Result<Vec<_>, DataFusionError>>()?;
            Ok::<_, DataFusionError>((schema, partitions))
        })
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))??;
        // A scoped caller sees no table where it sees no rows: another tenant's collections
        // are not even nameable.
        if self.scope.is_some() && partitions.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(MemTable::try_new(schema, partitions)?)))
    }

    fn table_exist(&self, name: &str) -> bool {
        !self.store.snapshot(self.project, name).is_empty()
    }
}

/// One Arrow type per property, from the tags it holds across segments.
fn table_schema(segments: &[&Segment]) -> SchemaRef {
    let fields: Vec<Field> = tally_store::events::property_tag_counts(segments.iter().copied())
        .into_iter()
        .map(|(path, c)| {
            let kinds: Vec<usize> = (2..8).filter(|&t| c[t] > 0).collect();
            let data_type = match kinds.as_slice() {
                [t] if *t == Tag::Num as usize => DataType::Float64,
                [t] if *t == Tag::Bool as usize => DataType::Boolean,
                [t] if *t == Tag::DateTime as usize => {
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
                }
                _ => DataType::Utf8,
            };
            Field::new(path, data_type, true)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

fn to_batch(seg: &Segment, schema: &SchemaRef) -> Result<RecordBatch, DataFusionError> {
    let rows = seg.rows();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|field| {
            let column = seg.column(field.name());
            let cell = |row: usize| column.and_then(|c| c.cell(row));
            let array: ArrayRef = match field.data_type() {
                DataType::Float64 => {
                    let mut b = Float64Builder::with_capacity(rows);
                    for row in 0..rows {
                        b.append_option(match cell(row) {
                            Some(Cell::Num(n)) => Some(n),
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
                DataType::Boolean => {
                    let mut b = BooleanBuilder::with_capacity(rows);
                    for row in 0..rows {
                        b.append_option(match cell(row) {
                            Some(Cell::Bool(v)) => Some(v),
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
                DataType::Timestamp(..) => {
                    let mut b = TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC");
                    for row in 0..rows {
                        b.append_option(match cell(row) {
                            Some(Cell::DateTime(ms)) => Some(ms),
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
                _ => {
                    let mut b = StringBuilder::with_capacity(rows, rows * 8);
                    for row in 0..rows {
                        match cell(row) {
                            None | Some(Cell::Null) => b.append_null(),
                            Some(Cell::Str(s)) => b.append_value(s),
                            Some(Cell::List(text)) => b.append_value(text),
                            Some(other) => b.append_value(cell_value(other).to_string()),
                        }
                    }
                    Arc::new(b.finish())
                }
            };
            array
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
