//! Cached datasets (reference §4.2): one interval query kept per `index_by` value and per
//! interval bucket, so that "this customer's daily numbers for the last 30 days" is a lookup.
//!
//! A dataset's query is an ordinary interval query (optionally grouped). Computing it means
//! running that query *grouped by the `index_by` properties too* and splitting each bucket's rows
//! by index value: one scan serves every index value. The result is a map per bucket from index
//! value to that bucket's value ([`DatasetState`]).
//!
//! **Incremental refresh.** The state remembers the store's [`DataVersion`] it is current with.
//! A refresh asks the store what changed since ([`EventStore::changes_since`]) and recomputes
//! only the buckets those changes fall in, plus buckets the moving window newly covers; buckets
//! the window left are dropped. New events usually land in the newest bucket, so a refresh after
//! 1% new events reads about the newest bucket, not the whole window. When the store cannot say
//! what changed (a restart, a long gap), everything is recomputed.
//!
//! **Results** ([`DatasetState::results`]) for an index value and a timeframe inside the
//! dataset's are assembled from the buckets the timeframe covers; the answer has exactly the
//! shape and values of the equivalent ad-hoc query (the dataset's query with an `eq` filter on
//! each `index_by` property and that timeframe), which the tests check.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tally_core::error::ErrorCode;
use tally_core::ids::ProjectId;
use tally_store::events::{Changes, DataVersion, EventStore, number_value};

use crate::exec::{self, Answer, ExecError, Limits};
use crate::saved::{analysis_type, definition_query};
use crate::spec::{self, Filter, FilterOp, Params, QuerySpec, SpecError};
use crate::timeframe::{TimeRange, buckets};

/// A validated dataset definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// A name for people.
    pub display_name: String,
    /// The interval query: `analysis_type` and its parameters, as given.
    pub query: Params,
    /// The properties results are looked up by.
    pub index_by: Vec<String>,
}

/// The analyses a dataset can keep.
const ANALYSES: &[&str] = &[
    "count",
    "count_unique",
    "sum",
    "average",
    "minimum",
    "maximum",
    "median",
    "percentile",
    "standard_deviation",
    "select_unique",
];

impl Dataset {
    /// The analysis.
    pub fn analysis(&self) -> &str {
        analysis_type(&self.query)
    }

    /// The dataset's query as of `now_ms` (its window, zone and interval).
    pub fn spec(&self, now_ms: i64) -> Result<QuerySpec, SpecError> {
        spec::parse_query(self.analysis(), &self.query, now_ms)
    }

    /// The definition as stored and echoed.
    pub fn to_json(&self) -> Value {
        json!({
            "display_name": self.display_name,
            "query": Value::Object(self.query.clone()),
            "index_by": self.index_by,
        })
    }

    /// Reads the stored form ([`Dataset::to_json`]) back (`None` if it is damaged).
    pub fn from_stored(stored: &Value) -> Option<Dataset> {
        Some(Dataset {
            display_name: stored.get("display_name")?.as_str()?.to_owned(),
            query: stored.get("query")?.as_object()?.clone(),
            index_by: stored
                .get("index_by")?
                .as_array()?
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()?,
        })
    }
}

/// Validates a `PUT /datasets/{name}` body.
pub fn parse_dataset(body: &Value, now_ms: i64) -> Result<Dataset, SpecError> {
    let (body, query, analysis) = definition_query(body)?;
    if !ANALYSES.contains(&analysis.as_str()) {
        return Err(SpecError::new(
            ErrorCode::InvalidAnalysisType,
            format!(
                "A dataset cannot keep '{analysis}' queries; it supports {}.",
                ANALYSES.join(", ")
            ),
        ));
    }
    let index_by = match body.get("index_by") {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(SpecError::new(
                    ErrorCode::InvalidParameter,
                    "Each 'index_by' entry must be a property name.",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(SpecError::new(
                ErrorCode::InvalidParameter,
                "The 'index_by' property must be a property name or a non-empty list of them.",
            ));
        }
        None => {
            return Err(SpecError::new(
                ErrorCode::MissingRequiredProperty,
                "The 'index_by' property is required: the properties results are looked up by.",
            ));
        }
    };
    for p in &index_by {
        tally_core::names::check_property_path(p)
            .map_err(|e| SpecError::new(ErrorCode::InvalidParameter, format!("'index_by' {p:?}: {e}")))?;
    }
    if query.get("interval").is_none_or(Value::is_null) {
        return Err(SpecError::new(
            ErrorCode::IntervalDefinition,
            "A dataset's query needs an 'interval': results are kept per interval bucket.",
        ));
    }
    if query.get("timeframe").is_none_or(Value::is_null) {
        return Err(SpecError::new(
            ErrorCode::TimeframeDefinition,
            "A dataset's query needs a 'timeframe'.",
        ));
    }
    for refused in ["order_by", "limit"] {
        if query.get(refused).is_some_and(|v| !v.is_null()) {
            return Err(SpecError::new(
                ErrorCode::InvalidParameter,
                format!("A dataset's query cannot use '{refused}'."),
            ));
        }
    }
    let dataset = Dataset {
        display_name: body
            .get("display_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        query,
        index_by,
    };
    let spec = dataset.spec(now_ms)?;
    let overlap = spec.group_by.iter().find(|g| dataset.index_by.contains(g));
    if let Some(g) = overlap {
        return Err(SpecError::new(
            ErrorCode::InvalidParameter,
            format!("'{g}' cannot be both in 'index_by' and in the query's 'group_by'."),
        ));
    }
    if spec.group_by.len() + dataset.index_by.len() > spec::MAX_GROUP_BY {
        return Err(SpecError::new(
            ErrorCode::InvalidParameter,
            format!(
                "'index_by' and 'group_by' together may name at most {} properties.",
                spec::MAX_GROUP_BY
            ),
        ));
    }
    buckets(spec.range, spec.interval.expect("checked above"), spec.zone)?;
    Ok(dataset)
}

/// One bucket's values: index value (the JSON text of the list of index property values) →
/// the bucket's value for it. Shared, so a refresh swaps buckets without copying the others.
pub type Bucket = Arc<HashMap<String, Value>>;

/// A dataset's computed buckets. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct DatasetState {
    /// The store's version of the collection the buckets are current with; `None` until the
    /// first refresh of this process (results loaded from disk are served, but not trusted as
    /// current).
    pub version: Option<DataVersion>,
    /// `(start, end)` → values.
    pub buckets: BTreeMap<(i64, i64), Bucket>,
}

/// What a refresh computed, to apply to the state.
#[derive(Debug, Clone)]
pub struct Update {
    /// The version the recomputed buckets reflect.
    pub version: DataVersion,
    /// Recomputed buckets.
    pub set: Vec<((i64, i64), Bucket)>,
    /// Buckets the window has left.
    pub removed: Vec<(i64, i64)>,
    /// Events scanned (for the refresh-cost benchmark).
    pub events_scanned: u64,
}

/// The canonical text of a list of index values: numbers as the store prints them, so that
/// `5`, `5.0` and a stored 5 agree.
fn index_key(values: &[Value]) -> String {
    let canonical: Vec<Value> = values
        .iter()
        .map(|v| match v {
            Value::Number(n) => n.as_f64().map_or(v.clone(), number_value),
            other => other.clone(),
        })
        .collect();
    Value::Array(canonical).to_string()
}

impl DatasetState {
    /// Computes what a refresh at `now_ms` changes (without holding the state: results keep
    /// being served from it meanwhile).
    pub fn plan_refresh(
        &self,
        dataset: &Dataset,
        store: &EventStore,
        project: ProjectId,
        now_ms: i64,
        limits: &Limits,
    ) -> Result<Update, ExecError> {
        let spec = dataset.spec(now_ms)?;
        let interval = spec.interval.expect("validated at PUT");
        let window = buckets(spec.range, interval, spec.zone)?;
        let version = store.data_version(project, &spec.event_collection);
        let changes = match self.version {
            Some(v) => store.changes_since(project, &spec.event_collection, v),
            None => Changes::Unknown,
        };
        let dirty: Vec<bool> = window
            .iter()
            .map(|b| {
                !self.buckets.contains_key(&(b.start_ms, b.end_ms)) || changes.touches(b.start_ms, b.end_ms)
            })
            .collect();
        let in_window: std::collections::HashSet<(i64, i64)> =
            window.iter().map(|b| (b.start_ms, b.end_ms)).collect();
        let removed = self
            .buckets
            .keys()
            .filter(|k| !in_window.contains(k))
            .copied()
            .collect();
        let segments = store.snapshot(project, &spec.event_collection);
        let mut set = Vec::new();
        let mut events_scanned = 0;
        // Contiguous runs of dirty buckets, each computed by one grouped interval query.
        let mut i = 0;
        while i < window.len() {
            if !dirty[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j + 1 < window.len() && dirty[j + 1] {
                j += 1;
            }
            let run = &window[i..=j];
            let computed = compute_run(dataset, &spec, run, &segments, limits)?;
            let computed = match computed {
                Some(c) => c,
                // The run's own bucket grid differs from the window's (an `every_N` grid that
                // does not line up): compute bucket by bucket instead.
                None => {
                    let mut each = (Vec::new(), 0);
                    for b in run {
                        let (one, scanned) =
                            compute_run(dataset, &spec, std::slice::from_ref(b), &segments, limits)?
                                .expect("a one-bucket run lines up");
                        each.0.extend(one);
                        each.1 += scanned;
                    }
                    each
                }
            };
            events_scanned += computed.1;
            set.extend(computed.0);
            i = j + 1;
        }
        Ok(Update {
            version,
            set,
            removed,
            events_scanned,
        })
    }

    /// Applies a refresh.
    pub fn apply(&mut self, update: Update) {
        for key in &update.removed {
            self.buckets.remove(key);
        }
        for (key, bucket) in update.set {
            self.buckets.insert(key, bucket);
        }
        self.version = Some(update.version);
    }

    /// The interval result for one index value (given as [`Dataset::index_candidates`]) over
    /// `timeframe` (default: the dataset's),
    /// `Ok(None)` when a bucket the timeframe needs is inside the dataset's window but not
    /// computed yet (refresh, then ask again).
    pub fn results(
        &self,
        dataset: &Dataset,
        candidates: &[Vec<Value>],
        timeframe: Option<&Value>,
        now_ms: i64,
    ) -> Result<Option<Value>, SpecError> {
        let spec = dataset.spec(now_ms)?;
        let (_, wanted) = window_buckets(&spec, timeframe, now_ms)?;
        let mut picked = Vec::with_capacity(wanted.len());
        for b in &wanted {
            match self.buckets.get(&(b.start_ms, b.end_ms)) {
                Some(bucket) => picked.push((b, bucket)),
                None => return Ok(None),
            }
        }
        if candidates.is_empty() {
            return Err(no_index_value());
        }
        let keys: Vec<String> = candidates.iter().map(|values| index_key(values)).collect();
        let key = keys
            .iter()
            .find(|k| picked.iter().any(|(_, bucket)| bucket.contains_key(*k)))
            .unwrap_or(&keys[0]);
        let empty = if spec.group_by.is_empty() {
            exec::empty_result(spec.analysis)
        } else {
            Value::Array(Vec::new())
        };
        let result: Vec<Value> = picked
            .into_iter()
            .map(|(b, bucket)| {
                json!({
                    "timeframe": {
                        "start": spec.zone.format_ms(b.start_ms),
                        "end": spec.zone.format_ms(b.end_ms),
                    },
                    "value": bucket.get(key).cloned().unwrap_or_else(|| empty.clone()),
                })
            })
            .collect();
        Ok(Some(json!({ "result": result })))
    }
}

impl Dataset {
    /// The index values an `index_by` parameter may mean, most likely first: each candidate
    /// holds one value per `index_by` property. Accepted: an object `{"prop": value, …}` naming
    /// every index property, that object JSON-encoded in a string, or (one index property) the
    /// bare value; a bare non-string also stands for its text (`index_by=123` in a query string
    /// arrives as a number, the stored value may be the string "123").
    pub fn index_candidates(&self, index: &Value) -> Result<Vec<Vec<Value>>, SpecError> {
        let from_object = |map: &Map<String, Value>| -> Result<Vec<Vec<Value>>, SpecError> {
            let values = self
                .index_by
                .iter()
                .map(|p| {
                    map.get(p).cloned().ok_or_else(|| {
                        SpecError::new(
                            ErrorCode::InvalidParameter,
                            format!("The 'index_by' parameter must give a value for '{p}'."),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(vec![values])
        };
        let single = |v: &Value| -> Result<Vec<Vec<Value>>, SpecError> {
            if self.index_by.len() != 1 {
                return Err(SpecError::new(
                    ErrorCode::InvalidParameter,
                    format!(
                        "This dataset is indexed by {:?}: give 'index_by' as an object with a value for each.",
                        self.index_by
                    ),
                ));
            }
            let mut candidates = vec![vec![v.clone()]];
            if !v.is_string() {
                candidates.push(vec![Value::String(match v {
                    Value::Number(n) => n.to_string(),
                    other => other.to_string(),
                })]);
            }
            Ok(candidates)
        };
        match index {
            Value::Object(map) => from_object(map),
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(map)) => from_object(&map),
                _ => single(index),
            },
            Value::Null | Value::Array(_) => Err(SpecError::new(
                ErrorCode::InvalidParameter,
                "The 'index_by' parameter must be a value or an object of index property values.",
            )),
            other => single(other),
        }
    }

    /// The ad-hoc query whose answer [`DatasetState::results`] gives for the index value
    /// `candidates` over `timeframe`, with `extra` filters AND-ed in: the dataset's query
    /// restricted to the index value and the timeframe. Used when results must honour filters
    /// the buckets were not computed with (an access key's).
    pub fn results_query(
        &self,
        candidates: &[Vec<Value>],
        timeframe: Option<&Value>,
        extra: &[Filter],
        now_ms: i64,
    ) -> Result<QuerySpec, SpecError> {
        let mut spec = self.spec(now_ms)?;
        let (range, _) = window_buckets(&spec, timeframe, now_ms)?;
        if candidates.is_empty() {
            return Err(no_index_value());
        }
        for (i, property) in self.index_by.iter().enumerate() {
            let mut values: Vec<Value> = candidates.iter().map(|c| c[i].clone()).collect();
            values.dedup();
            let op = if values.len() == 1 {
                FilterOp::Eq(values.remove(0))
            } else {
                FilterOp::In(values)
            };
            spec.filters.push(Filter::Property {
                property: property.clone(),
                op,
            });
        }
        spec.filters.extend(extra.iter().cloned());
        spec.range = range;
        Ok(spec)
    }
}

fn no_index_value() -> SpecError {
    SpecError::new(
        ErrorCode::InvalidParameter,
        "The 'index_by' value given is not one this key may retrieve.",
    )
}

/// The range `timeframe` (default: the dataset's window) names and its buckets, refused unless
/// it lies inside the window and on its bucket boundaries.
fn window_buckets(
    spec: &QuerySpec,
    timeframe: Option<&Value>,
    now_ms: i64,
) -> Result<(TimeRange, Vec<TimeRange>), SpecError> {
    let interval = spec.interval.expect("validated at PUT");
    let range = match timeframe {
        Some(t) => spec::parse_timeframe(Some(t), spec.zone, now_ms)?,
        None => spec.range,
    };
    if range.start_ms < spec.range.start_ms || range.end_ms > spec.range.end_ms {
        return Err(SpecError::new(
            ErrorCode::TimeframeDefinition,
            format!(
                "The 'timeframe' must lie inside the dataset's timeframe ({} to {}).",
                spec.zone.format_ms(spec.range.start_ms),
                spec.zone.format_ms(spec.range.end_ms)
            ),
        ));
    }
    let wanted = buckets(range, interval, spec.zone)?;
    let window: std::collections::HashSet<(i64, i64)> = buckets(spec.range, interval, spec.zone)?
        .iter()
        .map(|b| (b.start_ms, b.end_ms))
        .collect();
    if wanted.iter().any(|b| !window.contains(&(b.start_ms, b.end_ms))) {
        return Err(SpecError::new(
            ErrorCode::TimeframeDefinition,
            "The 'timeframe' must start and end on the dataset's interval boundaries.",
        ));
    }
    Ok((range, wanted))
}

type Computed = (Vec<((i64, i64), Bucket)>, u64);

/// Computes the buckets of `run` (contiguous window buckets); `None` if the query over the run
/// does not produce the same buckets.
fn compute_run(
    dataset: &Dataset,
    spec: &QuerySpec,
    run: &[TimeRange],
    segments: &[Arc<tally_store::events::StoredSegment>],
    limits: &Limits,
) -> Result<Option<Computed>, ExecError> {
    let mut grouped = spec.clone();
    grouped.range = TimeRange {
        start_ms: run[0].start_ms,
        end_ms: run[run.len() - 1].end_ms,
    };
    grouped.group_by = dataset.index_by.iter().chain(&spec.group_by).cloned().collect();
    grouped.order_by.clear();
    grouped.limit = None;
    grouped.include_metadata = true;
    let run_buckets = buckets(grouped.range, spec.interval.expect("interval"), spec.zone)?;
    if run_buckets != run {
        return Ok(None);
    }
    let Answer::Json(body) = exec::run(&grouped, segments, limits)? else {
        unreachable!("an interval query answers JSON");
    };
    let scanned = body["execution_metadata"]["events_scanned"].as_u64().unwrap_or(0);
    let Some(Value::Array(per_bucket)) = body.get("result") else {
        unreachable!("an interval query answers a list");
    };
    let ungrouped = spec.group_by.is_empty();
    let mut out = Vec::with_capacity(run.len());
    for (b, entry) in run.iter().zip(per_bucket) {
        let mut values: HashMap<String, Value> = HashMap::new();
        if let Some(Value::Array(rows)) = entry.get("value") {
            for row in rows {
                let Value::Object(row) = row else { continue };
                let mut row = row.clone();
                let index: Vec<Value> = dataset
                    .index_by
                    .iter()
                    .map(|p| row.remove(p).unwrap_or(Value::Null))
                    .collect();
                let key = index_key(&index);
                if ungrouped {
                    values.insert(key, row.remove("result").unwrap_or(Value::Null));
                } else {
                    // Rows come sorted by (index values, group values): each index value's rows
                    // stay in the order the ad-hoc query would give them.
                    let slot = values.entry(key).or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(list) = slot {
                        list.push(Value::Object(row));
                    }
                }
            }
        }
        out.push(((b.start_ms, b.end_ms), Arc::new(values)));
    }
    Ok(Some((out, scanned)))
}
