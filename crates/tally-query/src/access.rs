//! Access keys' scopes (reference §6): what one key may do and see.
//!
//! The keys API accepts a definition (`name`, `permitted`, `options`); [`parse_key_request`]
//! validates it completely before the catalog stores it, so a stored definition always parses.
//! Every request made with an access key parses the stored definition into an [`AccessScope`]
//! (microseconds: a handful of filters), which the server enforces:
//!
//! * [`Permission`]s open endpoints (`writes` → recording events, `queries` → analyses and SQL,
//!   `saved_queries` / `cached_queries` → a saved query's result, `datasets` → dataset reads,
//!   `schema` → collections and properties);
//! * `writes.autofill` is deep-merged into every event written with the key, the key's values
//!   winning over the event's;
//! * `queries.filters` are AND-ed into everything the key reads: analyses, every funnel step,
//!   every labelled analysis, saved and cached query results, dataset results, schema and SQL
//!   (`saved_queries.filters` add to them for saved and cached queries);
//! * `saved_queries` / `cached_queries` `allowed` and `blocked` name lists, and `datasets`
//!   `operations`, `allowed` (with allowed `index_by` values) and `blocked`.
//!
//! Because scope filters are AND-ed as separate filters, nothing in a request can loosen them:
//! an `or` filter, a `group_by`, a `limit`, `property_names` or a funnel step on another
//! collection all run over the already-restricted events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tally_core::error::ErrorCode;
use tally_core::names::check_property_name;
use tally_store::{AccessKeyDefinition, AccessKeyInfo};

use crate::spec::{self, Filter, SpecError};

/// What an access key may be permitted to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Record events.
    Writes,
    /// Run analyses, funnels, multi-analyses, extractions and SQL.
    Queries,
    /// Read the results of saved queries that are not cached.
    SavedQueries,
    /// Read the results of cached queries.
    CachedQueries,
    /// Read datasets: definitions, lists, results (see [`DatasetOp`]).
    Datasets,
    /// Read collections and their properties.
    Schema,
}

impl Permission {
    /// Every permission with its wire name.
    pub const ALL: [(Permission, &'static str); 6] = [
        (Permission::Writes, "writes"),
        (Permission::Queries, "queries"),
        (Permission::SavedQueries, "saved_queries"),
        (Permission::CachedQueries, "cached_queries"),
        (Permission::Datasets, "datasets"),
        (Permission::Schema, "schema"),
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(p, _)| *p == self)
            .map(|(_, name)| *name)
            .expect("every permission is listed")
    }

    fn parse(name: &str) -> Option<Permission> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(p, _)| *p)
    }
}

/// The dataset operations a key's `datasets.operations` may list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DatasetOp {
    /// Get a definition.
    Read,
    /// List definitions.
    List,
    /// Get results.
    Retrieve,
}

impl DatasetOp {
    const ALL: [(DatasetOp, &'static str); 3] = [
        (DatasetOp::Read, "read"),
        (DatasetOp::List, "list"),
        (DatasetOp::Retrieve, "retrieve"),
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(o, _)| *o == self)
            .map(|(_, name)| *name)
            .expect("every operation is listed")
    }
}

/// `allowed` / `blocked` lists of names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NameRules {
    /// Only these, when given.
    pub allowed: Option<BTreeSet<String>>,
    /// Never these.
    pub blocked: BTreeSet<String>,
}

impl NameRules {
    /// Whether the rules let the key use `name`.
    pub fn permits(&self, name: &str) -> bool {
        !self.blocked.contains(name) && self.allowed.as_ref().is_none_or(|a| a.contains(name))
    }
}

/// The `datasets` option.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatasetRules {
    /// The operations allowed (all, when not given).
    pub operations: Option<BTreeSet<DatasetOp>>,
    /// Only these datasets, each with the `index_by` values the key may retrieve (property →
    /// allowed values; an empty map: any).
    pub allowed: Option<BTreeMap<String, BTreeMap<String, Vec<Value>>>>,
    /// Never these datasets.
    pub blocked: BTreeSet<String>,
}

impl DatasetRules {
    /// Whether the key may do `op` on the dataset `name`.
    pub fn permits(&self, op: DatasetOp, name: &str) -> bool {
        self.permits_op(op) && self.permits_name(name)
    }

    /// Whether the dataset `name` is allowed and not blocked.
    pub fn permits_name(&self, name: &str) -> bool {
        !self.blocked.contains(name) && self.allowed.as_ref().is_none_or(|a| a.contains_key(name))
    }

    /// Whether the key may do `op` at all.
    pub fn permits_op(&self, op: DatasetOp) -> bool {
        self.operations.as_ref().is_none_or(|ops| ops.contains(&op))
    }

    /// Of the index value candidates a results request means (see
    /// `Dataset::index_candidates`), those the key may retrieve from dataset `name`, whose
    /// index properties are `index_by`.
    pub fn allowed_candidates(
        &self,
        name: &str,
        index_by: &[String],
        candidates: Vec<Vec<Value>>,
    ) -> Vec<Vec<Value>> {
        let Some(limits) = self.allowed.as_ref().and_then(|a| a.get(name)) else {
            return candidates;
        };
        candidates
            .into_iter()
            .filter(|values| {
                limits.iter().all(|(property, allowed)| {
                    index_by
                        .iter()
                        .position(|p| p == property)
                        .is_some_and(|i| allowed.contains(&values[i]))
                })
            })
            .collect()
    }
}

/// An access key's scope, parsed from its stored definition.
#[derive(Debug, Clone, Default)]
pub struct AccessScope {
    permitted: BTreeSet<Permission>,
    /// `writes.autofill`: merged into every event written with the key.
    pub autofill: Option<Arc<Map<String, Value>>>,
    /// `queries.filters`: AND-ed into every read.
    pub query_filters: Vec<Filter>,
    /// `saved_queries.allowed` / `blocked`.
    pub saved_queries: NameRules,
    /// `saved_queries.filters`: AND-ed into saved and cached query results, with
    /// `queries.filters`.
    pub saved_query_filters: Vec<Filter>,
    /// `cached_queries.allowed` / `blocked`.
    pub cached_queries: NameRules,
    /// `datasets`.
    pub datasets: DatasetRules,
}

impl AccessScope {
    /// Parses a definition's `permitted` and `options`.
    pub fn parse(permitted: &[String], options: &Value) -> Result<AccessScope, SpecError> {
        let mut scope = AccessScope::default();
        for name in permitted {
            let permission = Permission::parse(name).ok_or_else(|| {
                invalid(format!(
                    "'{name}' is not a permission; use {}.",
                    Permission::ALL.map(|(_, n)| n).join(", ")
                ))
            })?;
            scope.permitted.insert(permission);
        }
        let options = match options {
            Value::Null => return Ok(scope),
            Value::Object(map) => map,
            _ => return Err(invalid("'options' must be an object.")),
        };
        for (name, option) in options {
            if option.is_null() {
                continue;
            }
            let fields = option
                .as_object()
                .ok_or_else(|| invalid(format!("'options.{name}' must be an object or null.")))?;
            let at = |field: &str| format!("options.{name}.{field}");
            match name.as_str() {
                "writes" => {
                    only_fields(fields, name, &["autofill"])?;
                    scope.autofill = fields
                        .get("autofill")
                        .map(|v| parse_autofill(v, &at("autofill")))
                        .transpose()?
                        .flatten()
                        .map(Arc::new);
                }
                "queries" => {
                    only_fields(fields, name, &["filters"])?;
                    scope.query_filters = filters(fields.get("filters"))?;
                }
                "saved_queries" => {
                    only_fields(fields, name, &["allowed", "blocked", "filters"])?;
                    scope.saved_queries = name_rules(fields, name)?;
                    scope.saved_query_filters = filters(fields.get("filters"))?;
                }
                "cached_queries" => {
                    only_fields(fields, name, &["allowed", "blocked"])?;
                    scope.cached_queries = name_rules(fields, name)?;
                }
                "datasets" => {
                    only_fields(fields, name, &["operations", "allowed", "blocked"])?;
                    scope.datasets = dataset_rules(fields)?;
                }
                other => {
                    return Err(invalid(format!(
                        "'options.{other}' is not an option; use writes, queries, saved_queries, cached_queries or datasets."
                    )));
                }
            }
        }
        Ok(scope)
    }

    /// Whether the key has `permission`.
    pub fn permits(&self, permission: Permission) -> bool {
        self.permitted.contains(&permission)
    }

    /// The filters AND-ed into a saved or cached query's result.
    pub fn saved_filters(&self) -> Vec<Filter> {
        self.query_filters
            .iter()
            .chain(&self.saved_query_filters)
            .cloned()
            .collect()
    }
}

/// The most bytes a key's `writes.autofill` may take as JSON.
pub const MAX_AUTOFILL_BYTES: usize = 64 * 1024;

/// The longest access key name.
pub const MAX_KEY_NAME_CHARS: usize = 256;

fn invalid(message: impl Into<String>) -> SpecError {
    SpecError::new(ErrorCode::InvalidParameter, message)
}

fn only_fields(fields: &Map<String, Value>, option: &str, known: &[&str]) -> Result<(), SpecError> {
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(invalid(format!(
            "'options.{option}.{unknown}' is not a setting; '{option}' takes {}.",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

fn parse_autofill(value: &Value, at: &str) -> Result<Option<Map<String, Value>>, SpecError> {
    match value {
        Value::Null => Ok(None),
        Value::Object(map) if map.contains_key("keen") => {
            Err(invalid(format!("'{at}' may not set properties under 'keen'.")))
        }
        Value::Object(map) if value.to_string().len() > MAX_AUTOFILL_BYTES => Err(invalid(format!(
            "'{at}' may take at most {MAX_AUTOFILL_BYTES} bytes of JSON; this one has {} properties.",
            map.len()
        ))),
        Value::Object(map) => {
            check_property_names(map, at)?;
            Ok(Some(map.clone()))
        }
        _ => Err(invalid(format!("'{at}' must be an object of properties."))),
    }
}

/// Every property name in `map`, at any depth, follows Keen's rules: an autofill that breaks
/// them would make every event written with the key fail.
fn check_property_names(map: &Map<String, Value>, at: &str) -> Result<(), SpecError> {
    for (name, value) in map {
        check_property_name(name).map_err(|why| {
            SpecError::new(
                ErrorCode::InvalidPropertyName,
                format!("'{at}' has the property '{name}': {why}"),
            )
        })?;
        if let Value::Object(inner) = value {
            check_property_names(inner, &format!("{at}.{name}"))?;
        }
    }
    Ok(())
}

/// The most filters one of a key's filter lists may hold (they are parsed on every request the
/// key makes).
pub const MAX_KEY_FILTERS: usize = 64;

fn filters(value: Option<&Value>) -> Result<Vec<Filter>, SpecError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) if list.len() > MAX_KEY_FILTERS => Err(SpecError::new(
            ErrorCode::FilterDefinition,
            format!("A key may have at most {MAX_KEY_FILTERS} filters in one list."),
        )),
        Some(v @ Value::Array(_)) => spec::parse_filters(v),
        Some(_) => Err(SpecError::new(
            ErrorCode::FilterDefinition,
            "A key's 'filters' must be a list of filters.",
        )),
    }
}

fn names(value: &Value, at: &str) -> Result<BTreeSet<String>, SpecError> {
    let wrong = || invalid(format!("'{at}' must be a list of names."));
    value
        .as_array()
        .ok_or_else(wrong)?
        .iter()
        .map(|v| v.as_str().map(str::to_owned).ok_or_else(wrong))
        .collect()
}

fn name_rules(fields: &Map<String, Value>, option: &str) -> Result<NameRules, SpecError> {
    let list = |field: &str| {
        fields
            .get(field)
            .filter(|v| !v.is_null())
            .map(|v| names(v, &format!("options.{option}.{field}")))
            .transpose()
    };
    Ok(NameRules {
        allowed: list("allowed")?,
        blocked: list("blocked")?.unwrap_or_default(),
    })
}

fn dataset_rules(fields: &Map<String, Value>) -> Result<DatasetRules, SpecError> {
    let operations = match fields.get("operations").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(
            names(v, "options.datasets.operations")?
                .iter()
                .map(|name| {
                    DatasetOp::ALL
                        .iter()
                        .find(|(_, n)| n == name)
                        .map(|(op, _)| *op)
                        .ok_or_else(|| {
                            invalid(format!(
                                "'{name}' is not a dataset operation; use read, list or retrieve."
                            ))
                        })
                })
                .collect::<Result<BTreeSet<_>, _>>()?,
        ),
    };
    let allowed = match fields.get("allowed").filter(|v| !v.is_null()) {
        None => None,
        // A plain list of names is accepted too: those datasets, any index value.
        Some(v @ Value::Array(_)) => Some(
            names(v, "options.datasets.allowed")?
                .into_iter()
                .map(|n| (n, BTreeMap::new()))
                .collect(),
        ),
        Some(Value::Object(map)) => {
            let mut allowed = BTreeMap::new();
            for (name, rule) in map {
                let at = format!("options.datasets.allowed.{name}");
                let wrong = || {
                    invalid(format!(
                        "'{at}' must be {{}} or {{\"index_by\": {{\"property\": [allowed values]}}}}."
                    ))
                };
                let mut limits = BTreeMap::new();
                match rule {
                    Value::Null => {}
                    Value::Object(rule) => {
                        only_fields(rule, &format!("datasets.allowed.{name}"), &["index_by"])?;
                        match rule.get("index_by") {
                            None | Some(Value::Null) => {}
                            Some(Value::Object(index)) => {
                                for (property, values) in index {
                                    let values = match values {
                                        Value::Array(list) => list.clone(),
                                        Value::Object(_) | Value::Null => return Err(wrong()),
                                        one => vec![one.clone()],
                                    };
                                    limits.insert(property.clone(), values);
                                }
                            }
                            Some(_) => return Err(wrong()),
                        }
                    }
                    _ => return Err(wrong()),
                }
                allowed.insert(name.clone(), limits);
            }
            Some(allowed)
        }
        Some(_) => {
            return Err(invalid(
                "'options.datasets.allowed' must map dataset names to their rules.",
            ));
        }
    };
    let blocked = fields
        .get("blocked")
        .filter(|v| !v.is_null())
        .map(|v| names(v, "options.datasets.blocked"))
        .transpose()?
        .unwrap_or_default();
    Ok(DatasetRules {
        operations,
        allowed,
        blocked,
    })
}

/// The options an access key may have, in the order they are echoed.
const OPTIONS: [&str; 5] = ["writes", "queries", "saved_queries", "cached_queries", "datasets"];

/// A validated create or update request of the keys API.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRequest {
    /// The definition to store: `options` normalised to name every option (`null` when unset).
    pub definition: AccessKeyDefinition,
    /// `is_active`, when the request sets it.
    pub is_active: Option<bool>,
}

/// Validates the body of `POST /keys` or `POST /keys/{key}`.
pub fn parse_key_request(body: &Value) -> Result<KeyRequest, SpecError> {
    let Value::Object(body) = body else {
        return Err(invalid(
            "The request body must be a JSON object describing the key.",
        ));
    };
    let name = match body.get("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
        None | Some(Value::Null) => {
            return Err(SpecError::new(
                ErrorCode::MissingRequiredProperty,
                "An access key needs a 'name'.",
            ));
        }
        Some(_) => return Err(invalid("'name' must be a non-empty string.")),
    };
    if name.chars().count() > MAX_KEY_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "'name' may have at most {MAX_KEY_NAME_CHARS} characters and no control characters."
        )));
    }
    let permitted: Vec<String> = match body.get("permitted") {
        Some(Value::Array(list)) => {
            let mut names = Vec::with_capacity(list.len());
            for v in list {
                let name = v
                    .as_str()
                    .ok_or_else(|| invalid("'permitted' must be a list of permission names."))?;
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_owned());
                }
            }
            names
        }
        None | Some(Value::Null) => {
            return Err(SpecError::new(
                ErrorCode::MissingRequiredProperty,
                "An access key needs 'permitted': a list of permissions such as [\"queries\"].",
            ));
        }
        Some(_) => return Err(invalid("'permitted' must be a list of permission names.")),
    };
    let is_active = match body.get("is_active") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(invalid("'is_active' must be true or false.")),
    };
    let given = body.get("options").cloned().unwrap_or(Value::Null);
    AccessScope::parse(&permitted, &given)?;
    let mut options = Map::new();
    for option in OPTIONS {
        options.insert(
            option.to_owned(),
            given.get(option).cloned().unwrap_or(Value::Null),
        );
    }
    Ok(KeyRequest {
        definition: AccessKeyDefinition {
            name,
            permitted,
            options: Value::Object(options),
        },
        is_active,
    })
}

/// The key object of reference §6. `key` is the key in the clear where the caller gave or was
/// just given it; a listing shows `null` there, with the key's `id` to name it by.
pub fn key_object(key: Option<&str>, info: &AccessKeyInfo) -> Value {
    json!({
        "key": key,
        "id": info.id,
        "name": info.definition.name,
        "is_active": info.active,
        "project_id": info.project.to_string(),
        "permitted": info.definition.permitted,
        "options": info.definition.options,
        "created_at": info.created_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(body: Value) -> Result<KeyRequest, SpecError> {
        parse_key_request(&body)
    }

    #[test]
    fn keens_example_key_parses_and_normalises_options() {
        let parsed = request(json!({
            "name": "Bob_Key",
            "is_active": true,
            "permitted": ["writes", "queries", "saved_queries", "cached_queries", "datasets", "schema"],
            "options": {
                "writes": {"autofill": {"customer": {"id": "93iskds39kd93id", "name": "Ada Corp."}}},
                "queries": {"filters": [{"property_name": "customer.id", "operator": "eq", "property_value": "asdf12345z"}]},
                "saved_queries": {"allowed": ["q1"], "blocked": ["q2"], "filters": []},
                "cached_queries": {"allowed": ["my_cached_query"], "blocked": ["x"]},
                "datasets": {"operations": ["read", "list", "retrieve"],
                             "allowed": {"one": {"index_by": {"customer.id": ["93iskds39kd93id"]}}, "two": {}},
                             "blocked": ["three"]}
            }
        }))
        .unwrap();
        assert_eq!(parsed.is_active, Some(true));
        let scope = AccessScope::parse(&parsed.definition.permitted, &parsed.definition.options).unwrap();
        assert!(scope.permits(Permission::Schema));
        assert_eq!(scope.query_filters.len(), 1);
        assert!(scope.saved_queries.permits("q1"));
        assert!(!scope.saved_queries.permits("q2"));
        assert!(!scope.saved_queries.permits("q3"), "not in the allowed list");
        assert!(scope.cached_queries.permits("my_cached_query"));
        assert!(scope.datasets.permits(DatasetOp::Retrieve, "one"));
        assert!(scope.datasets.permits(DatasetOp::Retrieve, "two"));
        assert!(!scope.datasets.permits(DatasetOp::Retrieve, "three"));
        let index_by = vec!["customer.id".to_string()];
        let candidates = vec![vec![json!("93iskds39kd93id")], vec![json!("other")]];
        assert_eq!(
            scope
                .datasets
                .allowed_candidates("one", &index_by, candidates.clone()),
            vec![vec![json!("93iskds39kd93id")]]
        );
        assert_eq!(
            scope
                .datasets
                .allowed_candidates("two", &index_by, candidates.clone())
                .len(),
            2
        );

        let minimal = request(json!({"name": "k", "permitted": ["queries"]})).unwrap();
        assert_eq!(
            minimal.definition.options,
            json!({"writes": null, "queries": null, "saved_queries": null, "cached_queries": null, "datasets": null})
        );
        let scope = AccessScope::parse(&minimal.definition.permitted, &minimal.definition.options).unwrap();
        assert!(scope.permits(Permission::Queries) && !scope.permits(Permission::Writes));
        assert!(scope.datasets.permits(DatasetOp::List, "anything"));
    }

    #[test]
    fn bad_definitions_are_refused_with_the_field_named() {
        let cases = [
            (json!([]), ErrorCode::InvalidParameter, "JSON object"),
            (
                json!({"permitted": []}),
                ErrorCode::MissingRequiredProperty,
                "name",
            ),
            (
                json!({"name": "k"}),
                ErrorCode::MissingRequiredProperty,
                "permitted",
            ),
            (
                json!({"name": "k", "permitted": ["reads"]}),
                ErrorCode::InvalidParameter,
                "'reads'",
            ),
            (
                json!({"name": "k", "permitted": [], "is_active": "yes"}),
                ErrorCode::InvalidParameter,
                "is_active",
            ),
            (
                json!({"name": "k", "permitted": [], "options": {"query": {}}}),
                ErrorCode::InvalidParameter,
                "options.query",
            ),
            (
                json!({"name": "k", "permitted": [], "options": {"queries": {"filter": []}}}),
                ErrorCode::InvalidParameter,
                "options.queries.filter",
            ),
            (
                json!({"name": "k", "permitted": [], "options": {"queries": {"filters": [{"property_name": "a", "operator": "nope", "property_value": 1}]}}}),
                ErrorCode::FilterDefinition,
                "nope",
            ),
            (
                json!({"name": "k", "permitted": [], "options": {"writes": {"autofill": {"keen": {"timestamp": "x"}}}}}),
                ErrorCode::InvalidParameter,
                "keen",
            ),
            (
                json!({"name": "k", "permitted": [], "options": {"writes": {"autofill": [1]}}}),
                ErrorCode::InvalidParameter,
                "autofill",
            ),
            (
                json!({"name": "k", "permitted": [], "options": {"datasets": {"operations": ["delete"]}}}),
                ErrorCode::InvalidParameter,
                "'delete'",
            ),
            (
                json!({"name": "k", "permitted": [], "options": {"datasets": {"allowed": {"d": {"index_by": 3}}}}}),
                ErrorCode::InvalidParameter,
                "datasets.allowed.d",
            ),
            (
                json!({"name": "k", "permitted": [], "options": {"saved_queries": {"allowed": "q1"}}}),
                ErrorCode::InvalidParameter,
                "saved_queries.allowed",
            ),
        ];
        for (body, code, needle) in cases {
            let e = request(body.clone()).unwrap_err();
            assert_eq!(e.code, code, "{body}: {}", e.message);
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            prop::sample::select(vec![
                "writes",
                "queries",
                "filters",
                "allowed",
                "blocked",
                "index_by",
                "operations",
                "read",
                "eq",
                "or",
                "property_name",
                "operator",
                "property_value",
                "autofill",
                "keen",
            ])
            .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "name",
                        "permitted",
                        "options",
                        "writes",
                        "queries",
                        "saved_queries",
                        "cached_queries",
                        "datasets",
                        "filters",
                        "allowed",
                        "blocked",
                        "index_by",
                        "operations",
                        "autofill",
                        "property_name",
                        "operator",
                        "property_value",
                    ])
                    .prop_map(str::to_owned),
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the body, the validator answers (no panic), and whatever it accepts is a
        /// definition that parses into a scope again — so a stored key always works.
        #[test]
        fn any_body_is_answered_and_accepted_ones_reparse(options in arb_json(), permitted in prop::collection::vec(prop::sample::select(vec!["writes", "queries", "schema", "datasets", "bogus"]), 0..4)) {
            let body = json!({"name": "k", "permitted": permitted, "options": options});
            if let Ok(parsed) = parse_key_request(&body) {
                prop_assert!(AccessScope::parse(&parsed.definition.permitted, &parsed.definition.options).is_ok());
                prop_assert!(parsed.definition.options.as_object().is_some_and(|o| o.len() == OPTIONS.len()));
            }
        }
    }
}
