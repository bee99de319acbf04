//! Query parameters: from the wire (GET query string or POST JSON body) to a typed [`QuerySpec`].
//!
//! Section 0 of the reference: on GET every parameter is a string that may be JSON-encoded (try
//! `JSON.parse`, else use the raw string; empty pairs ignored); on POST the body is a JSON object
//! with the same names, unknown keys ignored. Both are first gathered into a map of JSON values
//! ([`Params`]), then one parser reads that map, so the two encodings cannot drift apart.

use std::borrow::Cow;

use serde_json::{Map, Value};
use tally_core::error::ErrorCode;

use crate::timeframe::{Interval, TimeRange, Zone, resolve_timeframe};

/// A malformed query: the Keen error code and a message naming the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SpecError {
    /// `MissingRequiredProperty`, `TimeframeDefinition`, `IntervalDefinition`, `FilterDefinition`,
    /// `InvalidAnalysisType` or `InvalidParameter`.
    pub code: ErrorCode,
    /// A sentence for a person, naming the parameter and what was wrong with it.
    pub message: String,
}

/// The analysis a query runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Analysis {
    Count,
    CountUnique,
    Sum,
    Average,
    Minimum,
    Maximum,
    Median,
    /// Nearest-rank percentile, 0..=100 (the `percentile` parameter).
    Percentile(f64),
    StandardDeviation,
    SelectUnique,
    Extraction,
}

/// One filter; filters in a list are AND-ed.
#[derive(Debug, Clone)]
pub enum Filter {
    /// A comparison of one property against a value.
    Property {
        /// Dotted property path.
        property: String,
        op: FilterOp,
    },
    /// Any of the inner filters matches (`{"operator":"or","property_value":[...]}`); nests.
    Or(Vec<Filter>),
}

/// A filter operator with its (validated) operand.
#[derive(Debug, Clone)]
pub enum FilterOp {
    Eq(Value),
    Ne(Value),
    Lt(Value),
    Lte(Value),
    Gt(Value),
    Gte(Value),
    /// `exists: true|false`.
    Exists(bool),
    /// `in`: the operand list.
    In(Vec<Value>),
    Contains(String),
    NotContains(String),
    /// A compiled regular expression (Rust `regex` syntax).
    Regex(regex::Regex),
    /// Geo distance from `[lon, lat]` in miles, against `keen.location.coordinates`.
    Within {
        lon: f64,
        lat: f64,
        max_miles: f64,
    },
}

/// One `order_by` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderBy {
    /// `"result"` or one of the `group_by` properties.
    pub property: String,
    pub descending: bool,
}

/// A validated ad-hoc query (every analysis except funnel and multi_analysis).
#[derive(Debug, Clone)]
pub struct QuerySpec {
    pub analysis: Analysis,
    pub event_collection: String,
    /// Required for every analysis except count and extraction.
    pub target_property: Option<String>,
    /// Resolved `[start, end)` in UTC milliseconds.
    pub range: TimeRange,
    pub zone: Zone,
    pub interval: Option<Interval>,
    pub filters: Vec<Filter>,
    /// Dotted properties; empty when not grouped.
    pub group_by: Vec<String>,
    pub order_by: Vec<OrderBy>,
    pub limit: Option<usize>,
    pub include_metadata: bool,
    /// Extraction: the most recent N events.
    pub latest: Option<usize>,
    /// Extraction: only these properties.
    pub property_names: Option<Vec<String>>,
    /// Extraction as CSV (`content_type=text/csv`).
    pub csv: bool,
    /// Seconds a cached answer may be old (result cache; not used by execution).
    pub max_age: Option<u64>,
}

/// Query parameters gathered from either encoding, as JSON values.
pub type Params = Map<String, Value>;

/// The deepest nesting of `or` filters accepted.
pub const MAX_FILTER_DEPTH: usize = 16;

/// The most `group_by` properties accepted.
pub const MAX_GROUP_BY: usize = 10;

/// The largest compiled size of a `regex` filter, in bytes.
pub const MAX_REGEX_SIZE: usize = 1 << 20;

impl SpecError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> SpecError {
        SpecError {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> SpecError {
        SpecError::new(ErrorCode::InvalidParameter, message)
    }

    fn filter(message: impl Into<String>) -> SpecError {
        SpecError::new(ErrorCode::FilterDefinition, message)
    }
}

impl Analysis {
    /// The analysis type as it appears in URLs and saved queries (`count_unique`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Analysis::Count => "count",
            Analysis::CountUnique => "count_unique",
            Analysis::Sum => "sum",
            Analysis::Average => "average",
            Analysis::Minimum => "minimum",
            Analysis::Maximum => "maximum",
            Analysis::Median => "median",
            Analysis::Percentile(_) => "percentile",
            Analysis::StandardDeviation => "standard_deviation",
            Analysis::SelectUnique => "select_unique",
            Analysis::Extraction => "extraction",
        }
    }

    /// Whether the analysis needs `target_property` (all but count and extraction).
    pub fn needs_target_property(&self) -> bool {
        !matches!(self, Analysis::Count | Analysis::Extraction)
    }
}

/// Gathers GET query-string parameters (section 0): form-urlencoded pairs, empty pairs, empty
/// names and empty values skipped; each value is JSON if it parses as JSON, else the raw string.
/// A repeated name keeps its last value.
pub fn params_from_query_string(query: &str) -> Params {
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut params = Params::new();
    for (key, raw) in form_urlencoded::parse(query.as_bytes()) {
        if key.is_empty() || raw.is_empty() {
            continue;
        }
        let value = serde_json::from_str::<Value>(&raw).unwrap_or_else(|_| Value::String(raw.into_owned()));
        params.insert(key.into_owned(), value);
    }
    params
}

/// Gathers POST body parameters: the body must be a JSON object; an empty (or blank) body is no
/// parameters. Anything else is `InvalidParameter`.
pub fn params_from_json_body(body: &[u8]) -> Result<Params, SpecError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Params::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(SpecError::invalid(
            "The request body must be a JSON object of query parameters.",
        )),
        Err(e) => Err(SpecError::invalid(format!(
            "The request body must be a JSON object of query parameters; it is not valid JSON: {e}."
        ))),
    }
}

/// Merges query-string and body parameters; the body wins where both name a parameter.
pub fn merge(query: Params, body: Params) -> Params {
    let mut merged = query;
    merged.extend(body);
    merged
}

/// Parses an analysis name from the URL path and its parameters into a [`QuerySpec`].
///
/// `now_ms` is the current time, for relative timeframes. `funnel` and `multi_analysis` are not
/// ad-hoc single analyses and, like unknown names, are `InvalidAnalysisType`; callers dispatch
/// them before calling this. Unknown parameters are ignored.
pub fn parse_query(analysis_name: &str, params: &Params, now_ms: i64) -> Result<QuerySpec, SpecError> {
    let analysis = parse_analysis(analysis_name, params)?;
    let is_extraction = analysis == Analysis::Extraction;

    let event_collection = parse_event_collection(params)?;
    let target_property = if analysis.needs_target_property() {
        match param(params, "target_property").and_then(text) {
            Some(t) if !t.is_empty() => Some(t),
            Some(_) => {
                return Err(SpecError::invalid(
                    "The 'target_property' parameter must be a non-empty property name.",
                ));
            }
            None => {
                return Err(SpecError::new(
                    ErrorCode::MissingRequiredProperty,
                    format!(
                        "The 'target_property' parameter is required for {} queries.",
                        analysis.name()
                    ),
                ));
            }
        }
    } else {
        None
    };

    let zone = parse_timezone(param(params, "timezone"))?;
    let range = parse_timeframe(param(params, "timeframe"), zone, now_ms)?;

    let interval = match param(params, "interval") {
        None => None,
        Some(_) if is_extraction => {
            return Err(SpecError::invalid(
                "The 'interval' parameter is not allowed with extraction.",
            ));
        }
        Some(value) => Some(Interval::parse(value)?),
    };

    let filters = match param(params, "filters") {
        None => Vec::new(),
        Some(value) => parse_filters(value)?,
    };

    let group_by = match param(params, "group_by") {
        None => Vec::new(),
        Some(value) => parse_group_by(value)?,
    };
    if is_extraction && !group_by.is_empty() {
        return Err(SpecError::invalid(
            "The 'group_by' parameter is not allowed with extraction.",
        ));
    }
    let order_by = match param(params, "order_by") {
        None => Vec::new(),
        Some(value) => parse_order_by(value, &group_by)?,
    };

    let limit = match param(params, "limit") {
        None => None,
        Some(value) => Some(to_usize(parse_uint(value, "limit", 1)?)),
    };
    let include_metadata = match param(params, "include_metadata") {
        None => false,
        Some(value) => parse_bool(value, "include_metadata")?,
    };
    let latest = match param(params, "latest") {
        None => None,
        Some(value) => Some(to_usize(parse_uint(value, "latest", 1)?)),
    };
    let property_names = match param(params, "property_names") {
        None => None,
        Some(value) => Some(parse_property_names(value)?),
    };
    let csv = match param(params, "content_type") {
        None => false,
        Some(value) => match text(value).as_deref().map(str::trim) {
            Some("text/csv") => true,
            Some("application/json") => false,
            _ => {
                return Err(SpecError::invalid(format!(
                    "The 'content_type' parameter must be \"text/csv\" or \"application/json\", \
                     not '{}'.",
                    show(value)
                )));
            }
        },
    };
    let max_age = parse_max_age(params)?;

    Ok(QuerySpec {
        analysis,
        event_collection,
        target_property,
        range,
        zone,
        interval,
        filters,
        group_by,
        order_by,
        limit,
        include_metadata,
        latest: if is_extraction { latest } else { None },
        property_names: if is_extraction { property_names } else { None },
        csv,
        max_age,
    })
}

/// The analysis named in the URL path, with its `percentile` parameter when it needs one.
pub fn parse_analysis(name: &str, params: &Params) -> Result<Analysis, SpecError> {
    Ok(match name {
        "count" => Analysis::Count,
        "count_unique" => Analysis::CountUnique,
        "sum" => Analysis::Sum,
        "average" => Analysis::Average,
        "minimum" => Analysis::Minimum,
        "maximum" => Analysis::Maximum,
        "median" => Analysis::Median,
        "standard_deviation" => Analysis::StandardDeviation,
        "select_unique" => Analysis::SelectUnique,
        "extraction" => Analysis::Extraction,
        "percentile" => Analysis::Percentile(parse_percentile(param(params, "percentile"))?),
        other => {
            let shown: String = other.chars().take(100).collect();
            return Err(SpecError::new(
                ErrorCode::InvalidAnalysisType,
                format!(
                    "The analysis type '{shown}' is not supported here; use count, count_unique, \
                     sum, average, minimum, maximum, median, percentile, standard_deviation, \
                     select_unique or extraction."
                ),
            ));
        }
    })
}

/// Reads the required `event_collection` parameter.
pub fn parse_event_collection(params: &Params) -> Result<String, SpecError> {
    match param(params, "event_collection").and_then(text) {
        Some(name) if !name.is_empty() => Ok(name),
        Some(_) => Err(SpecError::invalid(
            "The 'event_collection' parameter must be a non-empty collection name.",
        )),
        None => Err(SpecError::new(
            ErrorCode::MissingRequiredProperty,
            "The 'event_collection' parameter is required.",
        )),
    }
}

/// Reads an optional `timezone` parameter (absent or null means UTC).
pub fn parse_timezone(value: Option<&Value>) -> Result<Zone, SpecError> {
    match value {
        None | Some(Value::Null) => Ok(Zone::utc()),
        Some(value) => Zone::parse(value),
    }
}

/// Reads a required `timeframe` parameter and resolves it in `zone` at `now_ms`.
pub fn parse_timeframe(value: Option<&Value>, zone: Zone, now_ms: i64) -> Result<TimeRange, SpecError> {
    match value {
        None | Some(Value::Null) => Err(SpecError::new(
            ErrorCode::MissingRequiredProperty,
            "The 'timeframe' parameter is required: a relative timeframe like \"this_7_days\" \
             or {\"start\": ISO-8601, \"end\": ISO-8601}.",
        )),
        Some(Value::String(s)) if s.trim().is_empty() => Err(SpecError::new(
            ErrorCode::MissingRequiredProperty,
            "The 'timeframe' parameter is required and must not be empty.",
        )),
        Some(value) => resolve_timeframe(value, zone, now_ms),
    }
}

fn parse_percentile(value: Option<&Value>) -> Result<f64, SpecError> {
    let Some(value) = value else {
        return Err(SpecError::new(
            ErrorCode::MissingRequiredProperty,
            "The 'percentile' parameter is required for percentile queries.",
        ));
    };
    let number = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match number {
        Some(p) if p.is_finite() && (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(SpecError::invalid(format!(
            "The 'percentile' parameter must be a number from 0 to 100, not '{}'.",
            show(value)
        ))),
    }
}

/// Reads a `filters` parameter: an array of filter objects (or a JSON string holding one).
/// Problems are `FilterDefinition`, naming the filter's position.
pub fn parse_filters(value: &Value) -> Result<Vec<Filter>, SpecError> {
    let value = decode_nested(value);
    match value.as_ref() {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_filter(item, &format!("filters[{i}]"), 0))
            .collect(),
        other => Err(SpecError::filter(format!(
            "The 'filters' parameter must be an array of filter objects, not '{}'.",
            show(other)
        ))),
    }
}

fn parse_filter(value: &Value, at: &str, depth: usize) -> Result<Filter, SpecError> {
    let Value::Object(filter) = value else {
        return Err(SpecError::filter(format!(
            "In the 'filters' parameter, {at} must be an object with property_name, operator and \
             property_value, not '{}'.",
            show(value)
        )));
    };
    let operator = match filter.get("operator") {
        Some(Value::String(op)) => op.trim().to_ascii_lowercase(),
        Some(other) => {
            return Err(SpecError::filter(format!(
                "In the 'filters' parameter, {at} has an operator that is not a string: '{}'.",
                show(other)
            )));
        }
        None => {
            return Err(SpecError::filter(format!(
                "In the 'filters' parameter, {at} has no 'operator'."
            )));
        }
    };
    let operand = filter.get("property_value");
    let need_operand = || {
        operand.ok_or_else(|| {
            SpecError::filter(format!(
                "In the 'filters' parameter, {at} has no 'property_value'."
            ))
        })
    };

    if operator == "or" {
        if depth + 1 >= MAX_FILTER_DEPTH {
            return Err(SpecError::filter(format!(
                "In the 'filters' parameter, {at} nests 'or' filters deeper than \
                 {MAX_FILTER_DEPTH} levels."
            )));
        }
        let inner = decode_nested(need_operand()?);
        return match inner.as_ref() {
            Value::Array(items) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_filter(item, &format!("{at}.property_value[{i}]"), depth + 1))
                .collect::<Result<Vec<_>, _>>()
                .map(Filter::Or),
            other => Err(SpecError::filter(format!(
                "In the 'filters' parameter, {at} uses 'or', whose property_value must be a \
                 non-empty array of filters, not '{}'.",
                show(other)
            ))),
        };
    }

    let property = match filter.get("property_name") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        Some(other) => {
            return Err(SpecError::filter(format!(
                "In the 'filters' parameter, {at} has a property_name that is not a non-empty \
                 string: '{}'.",
                show(other)
            )));
        }
        None => {
            return Err(SpecError::filter(format!(
                "In the 'filters' parameter, {at} has no 'property_name'."
            )));
        }
    };

    let wrong = |expected: &str, got: &Value| {
        SpecError::filter(format!(
            "In the 'filters' parameter, {at} uses '{operator}', whose property_value must be \
             {expected}, not '{}'.",
            show(got)
        ))
    };
    let scalar = |v: &Value| -> Result<Value, SpecError> {
        match v {
            Value::Array(_) | Value::Object(_) => Err(wrong("a string, number, boolean or null", v)),
            _ => Ok(v.clone()),
        }
    };
    let ordered = |v: &Value| -> Result<Value, SpecError> {
        match v {
            Value::Number(_) | Value::String(_) => Ok(v.clone()),
            _ => Err(wrong("a number or a string", v)),
        }
    };
    let string = |v: &Value| -> Result<String, SpecError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(wrong("a string", v)),
        }
    };

    let op = match operator.as_str() {
        "eq" => FilterOp::Eq(scalar(need_operand()?)?),
        "ne" => FilterOp::Ne(scalar(need_operand()?)?),
        "lt" => FilterOp::Lt(ordered(need_operand()?)?),
        "lte" => FilterOp::Lte(ordered(need_operand()?)?),
        "gt" => FilterOp::Gt(ordered(need_operand()?)?),
        "gte" => FilterOp::Gte(ordered(need_operand()?)?),
        "exists" => {
            let v = need_operand()?;
            match v {
                Value::Bool(b) => FilterOp::Exists(*b),
                Value::String(s) if s.trim().eq_ignore_ascii_case("true") => FilterOp::Exists(true),
                Value::String(s) if s.trim().eq_ignore_ascii_case("false") => FilterOp::Exists(false),
                _ => return Err(wrong("true or false", v)),
            }
        }
        "in" => {
            let v = need_operand()?;
            match decode_nested(v).as_ref() {
                Value::Array(items) => FilterOp::In(items.clone()),
                _ => return Err(wrong("an array of values", v)),
            }
        }
        "contains" => FilterOp::Contains(string(need_operand()?)?),
        "not_contains" => FilterOp::NotContains(string(need_operand()?)?),
        "regex" => {
            let pattern = string(need_operand()?)?;
            let regex = regex::RegexBuilder::new(&pattern)
                .size_limit(MAX_REGEX_SIZE)
                .dfa_size_limit(MAX_REGEX_SIZE)
                .build()
                .map_err(|e| {
                    SpecError::filter(format!(
                        "In the 'filters' parameter, {at} has a regex that does not compile: {e}"
                    ))
                })?;
            FilterOp::Regex(regex)
        }
        "within" => parse_within(need_operand()?, &wrong)?,
        _ => {
            let shown: String = operator.chars().take(50).collect();
            return Err(SpecError::filter(format!(
                "In the 'filters' parameter, {at} has an unknown operator '{shown}'; use eq, ne, \
                 lt, lte, gt, gte, exists, in, contains, not_contains, regex, within or or."
            )));
        }
    };
    Ok(Filter::Property { property, op })
}

fn parse_within(value: &Value, wrong: &dyn Fn(&str, &Value) -> SpecError) -> Result<FilterOp, SpecError> {
    const EXPECTED: &str =
        "an object {\"coordinates\": [longitude, latitude], \"max_distance_miles\": number}";
    let decoded = decode_nested(value);
    let Value::Object(object) = decoded.as_ref() else {
        return Err(wrong(EXPECTED, value));
    };
    let coordinates = match object.get("coordinates") {
        Some(Value::Array(pair)) if pair.len() == 2 => match (pair[0].as_f64(), pair[1].as_f64()) {
            (Some(lon), Some(lat)) => Some((lon, lat)),
            _ => None,
        },
        _ => None,
    };
    let max_miles = object.get("max_distance_miles").and_then(Value::as_f64);
    match (coordinates, max_miles) {
        (Some((lon, lat)), Some(max_miles))
            if (-180.0..=180.0).contains(&lon)
                && (-90.0..=90.0).contains(&lat)
                && max_miles.is_finite()
                && max_miles >= 0.0 =>
        {
            Ok(FilterOp::Within { lon, lat, max_miles })
        }
        _ => Err(wrong(EXPECTED, value)),
    }
}

fn parse_group_by(value: &Value) -> Result<Vec<String>, SpecError> {
    let bad = || {
        SpecError::invalid(format!(
            "The 'group_by' parameter must be a property name or an array of at most \
             {MAX_GROUP_BY} non-empty property names, not '{}'.",
            show(value)
        ))
    };
    let decoded = decode_nested(value);
    let names: Vec<String> = match decoded.as_ref() {
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        other => match text(other) {
            Some(name) if !name.is_empty() => vec![name],
            _ => return Err(bad()),
        },
    };
    if names.len() > MAX_GROUP_BY {
        return Err(bad());
    }
    Ok(names)
}

fn parse_order_by(value: &Value, group_by: &[String]) -> Result<Vec<OrderBy>, SpecError> {
    let decoded = decode_nested(value);
    let entries: Vec<&Value> = match decoded.as_ref() {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    if group_by.is_empty() {
        return Err(SpecError::invalid(
            "The 'order_by' parameter needs a 'group_by' parameter.",
        ));
    }
    entries
        .into_iter()
        .map(|entry| {
            let (property, direction) = match entry {
                Value::String(name) => (name.clone(), None),
                Value::Object(object) => {
                    let property = match object.get("property_name") {
                        Some(Value::String(name)) => name.clone(),
                        _ => {
                            return Err(SpecError::invalid(format!(
                                "The 'order_by' parameter has an entry without a string \
                                 property_name: '{}'.",
                                show(entry)
                            )));
                        }
                    };
                    (property, object.get("direction").filter(|d| !d.is_null()))
                }
                _ => {
                    return Err(SpecError::invalid(format!(
                        "The 'order_by' parameter must be an array of \
                         {{\"property_name\", \"direction\"}} objects, not '{}'.",
                        show(entry)
                    )));
                }
            };
            if property != "result" && !group_by.contains(&property) {
                return Err(SpecError::invalid(format!(
                    "The 'order_by' parameter can only order by \"result\" or a 'group_by' \
                     property, not '{}'.",
                    property.chars().take(100).collect::<String>()
                )));
            }
            let descending = match direction {
                None => false,
                Some(Value::String(d)) if d.trim().eq_ignore_ascii_case("asc") => false,
                Some(Value::String(d)) if d.trim().eq_ignore_ascii_case("desc") => true,
                Some(other) => {
                    return Err(SpecError::invalid(format!(
                        "The 'order_by' parameter's direction must be \"ASC\" or \"DESC\", not \
                         '{}'.",
                        show(other)
                    )));
                }
            };
            Ok(OrderBy { property, descending })
        })
        .collect()
}

fn parse_property_names(value: &Value) -> Result<Vec<String>, SpecError> {
    let bad = || {
        SpecError::invalid(format!(
            "The 'property_names' parameter must be a property name or an array of property \
             names, not '{}'.",
            show(value)
        ))
    };
    let decoded = decode_nested(value);
    match decoded.as_ref() {
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(bad()),
            })
            .collect(),
        other => match text(other) {
            Some(name) if !name.is_empty() => Ok(vec![name]),
            _ => Err(bad()),
        },
    }
}

/// A non-negative integer at least `min`, as a JSON number or a numeric string.
/// `max_age`: seconds a cached answer may be old.
pub(crate) fn parse_max_age(params: &Params) -> Result<Option<u64>, SpecError> {
    param(params, "max_age")
        .map(|value| parse_uint(value, "max_age", 0))
        .transpose()
}

fn parse_uint(value: &Value, name: &str, min: u64) -> Result<u64, SpecError> {
    let number = match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match number {
        Some(n) if n >= min => Ok(n),
        _ => Err(SpecError::invalid(format!(
            "The '{name}' parameter must be an integer of at least {min}, not '{}'.",
            show(value)
        ))),
    }
}

pub(crate) fn parse_bool(value: &Value, name: &str) -> Result<bool, SpecError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(SpecError::invalid(format!(
            "The '{name}' parameter must be true or false, not '{}'.",
            show(value)
        ))),
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A parameter's value; absent and `null` are the same (saved queries echo `null`s).
pub(crate) fn param<'a>(params: &'a Params, name: &str) -> Option<&'a Value> {
    params.get(name).filter(|v| !v.is_null())
}

/// A name-like value as text: strings as they are, numbers and booleans as printed (a GET value
/// `event_collection=2024` parses as the number 2024).
pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A structured value sent as a JSON string (`"[...]"` or `"{...}"`) decoded; anything else as is.
fn decode_nested(value: &Value) -> Cow<'_, Value> {
    if let Value::String(s) = value {
        let t = s.trim_start();
        if (t.starts_with('[') || t.starts_with('{'))
            && let Ok(parsed) = serde_json::from_str::<Value>(s)
        {
            return Cow::Owned(parsed);
        }
    }
    Cow::Borrowed(value)
}

/// Short text of a value for error messages.
fn show(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() > 200 {
        let cut: String = text.chars().take(200).collect();
        format!("{cut}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: &str = "2026-03-08T15:30:00Z";

    fn now() -> i64 {
        tally_core::time::parse_timestamp_ms(NOW).expect("test time")
    }

    fn ms(text: &str) -> i64 {
        tally_core::time::parse_timestamp_ms(text).expect("test timestamp")
    }

    fn params(value: Value) -> Params {
        match value {
            Value::Object(map) => map,
            _ => panic!("test params must be an object"),
        }
    }

    fn base(extra: Value) -> Params {
        let mut p = params(json!({
            "event_collection": "purchases",
            "target_property": "price",
            "timeframe": "this_7_days",
        }));
        p.extend(params(extra));
        p
    }

    fn query(analysis: &str, extra: Value) -> Result<QuerySpec, SpecError> {
        parse_query(analysis, &base(extra), now())
    }

    fn error(analysis: &str, extra: Value) -> SpecError {
        query(analysis, extra).expect_err("expected an error")
    }

    fn filters(value: Value) -> Result<Vec<Filter>, SpecError> {
        parse_filters(&value)
    }

    fn filter_error(value: Value) -> SpecError {
        let err = filters(value).expect_err("expected a filter error");
        assert_eq!(err.code, ErrorCode::FilterDefinition, "{}", err.message);
        err
    }

    fn single(value: Value) -> FilterOp {
        match filters(json!([value])).expect("valid filter").remove(0) {
            Filter::Property { op, .. } => op,
            Filter::Or(_) => panic!("expected a property filter"),
        }
    }

    // Wire encodings

    #[test]
    fn query_string_values_are_json_or_raw() {
        let p = params_from_query_string(
            "api_key=K&event_collection=purchases&timeframe=this_7_days&&timezone=%22UTC%22\
             &filters=%5B%7B%22property_name%22%3A%22price%22%2C%22operator%22%3A%22gt%22%2C\
             %22property_value%22%3A5%7D%5D&percentile=99.5&limit=5&group_by=item.name\
             &order_by=%5B%7B%22property_name%22%3A%22result%22%7D%5D&&",
        );
        assert_eq!(p["api_key"], json!("K"));
        assert_eq!(p["event_collection"], json!("purchases"));
        assert_eq!(p["timeframe"], json!("this_7_days"));
        assert_eq!(p["timezone"], json!("UTC"));
        assert_eq!(
            p["filters"],
            json!([{"property_name": "price", "operator": "gt", "property_value": 5}])
        );
        assert_eq!(p["percentile"], json!(99.5));
        assert_eq!(p["limit"], json!(5));
        assert_eq!(p["group_by"], json!("item.name"));
        assert_eq!(p["order_by"], json!([{"property_name": "result"}]));
        assert_eq!(p.len(), 9);
    }

    #[test]
    fn query_string_edge_cases() {
        let p = params_from_query_string(
            "?timezone=US/Pacific&event_collection=my+purchases&empty=&=novalue&&&x=%7Bbroken\
             &offset=-28800&timeframe=%22this_7_days%22&dup=1&dup=2",
        );
        assert_eq!(p["timezone"], json!("US/Pacific"));
        assert_eq!(p["event_collection"], json!("my purchases"));
        assert!(!p.contains_key("empty"));
        assert!(!p.contains_key(""));
        assert_eq!(p["x"], json!("{broken"));
        assert_eq!(p["offset"], json!(-28800));
        assert_eq!(p["timeframe"], json!("this_7_days"));
        assert_eq!(p["dup"], json!(2));
        assert!(params_from_query_string("").is_empty());
        assert!(params_from_query_string("&&&").is_empty());
    }

    #[test]
    fn get_encoded_query_parses_like_post() {
        let get = params_from_query_string(
            "event_collection=purchases&target_property=price&timeframe=%7B%22start%22%3A\
             %222026-03-01T00%3A00%3A00.000Z%22%2C%22end%22%3A%222026-03-02T00%3A00%3A00.000Z\
             %22%7D&timezone=-28800&interval=hourly&filters=%5B%7B%22property_name%22%3A\
             %22price%22%2C%22operator%22%3A%22gte%22%2C%22property_value%22%3A5%7D%5D\
             &group_by=%5B%22a%22%2C%22b.c%22%5D&include_metadata=true",
        );
        let post = params_from_json_body(
            br#"{"event_collection":"purchases","target_property":"price",
                 "timeframe":{"start":"2026-03-01T00:00:00.000Z","end":"2026-03-02T00:00:00.000Z"},
                 "timezone":-28800,"interval":"hourly",
                 "filters":[{"property_name":"price","operator":"gte","property_value":5}],
                 "group_by":["a","b.c"],"include_metadata":true}"#,
        )
        .unwrap();
        for p in [get, post] {
            let spec = parse_query("sum", &p, now()).unwrap();
            assert_eq!(spec.analysis, Analysis::Sum);
            assert_eq!(spec.range.start_ms, ms("2026-03-01T00:00:00Z"));
            assert_eq!(spec.range.end_ms, ms("2026-03-02T00:00:00Z"));
            assert_eq!(spec.zone.offset_secs_at(0), -28800);
            assert_eq!(spec.interval.unwrap().unit, crate::timeframe::IntervalUnit::Hour);
            assert_eq!(spec.filters.len(), 1);
            assert_eq!(spec.group_by, ["a", "b.c"]);
            assert!(spec.include_metadata);
        }
    }

    #[test]
    fn delete_style_json_quoted_strings() {
        let p = params_from_query_string("timeframe=%22this_7_days%22&timezone=%22UTC%22&&");
        let zone = parse_timezone(p.get("timezone")).unwrap();
        assert_eq!(zone, Zone::utc());
        let r = parse_timeframe(p.get("timeframe"), zone, now()).unwrap();
        assert_eq!(r.start_ms, ms("2026-03-02T00:00:00Z"));
        assert_eq!(r.end_ms, ms("2026-03-09T00:00:00Z"));
    }

    #[test]
    fn json_body_and_merge() {
        assert!(params_from_json_body(b"").unwrap().is_empty());
        assert!(params_from_json_body(b"  \n").unwrap().is_empty());
        assert!(params_from_json_body(b"{}").unwrap().is_empty());
        assert_eq!(
            params_from_json_body(br#"{"a":1}"#).unwrap(),
            params(json!({"a": 1}))
        );
        for bad in [&b"[1,2]"[..], b"\"x\"", b"{bad", b"null"] {
            let err = params_from_json_body(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidParameter);
        }
        let merged = merge(
            params(json!({"api_key": "K", "timeframe": "this_day"})),
            params(json!({"timeframe": "this_2_days", "event_collection": "c"})),
        );
        assert_eq!(
            merged,
            params(json!({"api_key": "K", "timeframe": "this_2_days", "event_collection": "c"}))
        );
    }

    // Analyses

    #[test]
    fn every_analysis_parses() {
        let cases = [
            ("count", Analysis::Count),
            ("count_unique", Analysis::CountUnique),
            ("sum", Analysis::Sum),
            ("average", Analysis::Average),
            ("minimum", Analysis::Minimum),
            ("maximum", Analysis::Maximum),
            ("median", Analysis::Median),
            ("standard_deviation", Analysis::StandardDeviation),
            ("select_unique", Analysis::SelectUnique),
            ("extraction", Analysis::Extraction),
        ];
        for (name, analysis) in cases {
            let spec = query(name, json!({})).unwrap();
            assert_eq!(spec.analysis, analysis);
            assert_eq!(spec.analysis.name(), name);
            assert_eq!(spec.event_collection, "purchases");
            assert_eq!(
                spec.target_property.as_deref(),
                if analysis.needs_target_property() {
                    Some("price")
                } else {
                    None
                }
            );
            assert_eq!(spec.range.start_ms, ms("2026-03-02T00:00:00Z"));
            assert_eq!(spec.range.end_ms, ms("2026-03-09T00:00:00Z"));
            assert_eq!(spec.zone, Zone::utc());
            assert!(spec.interval.is_none() && spec.filters.is_empty() && spec.group_by.is_empty());
            assert!(spec.order_by.is_empty() && spec.limit.is_none() && !spec.include_metadata);
            assert!(spec.latest.is_none() && spec.property_names.is_none() && !spec.csv);
            assert!(spec.max_age.is_none());
        }
        // count and extraction need no target_property.
        let p = params(json!({"event_collection": "c", "timeframe": "today"}));
        assert!(parse_query("count", &p, now()).is_ok());
        assert!(parse_query("extraction", &p, now()).is_ok());
    }

    #[test]
    fn percentile_parameter() {
        for (value, expected) in [
            (json!(99.5), 99.5),
            (json!("99.99"), 99.99),
            (json!(0), 0.0),
            (json!(100), 100.0),
        ] {
            let spec = query("percentile", json!({"percentile": value})).unwrap();
            assert_eq!(spec.analysis, Analysis::Percentile(expected));
        }
        let err = error("percentile", json!({}));
        assert_eq!(err.code, ErrorCode::MissingRequiredProperty);
        assert!(err.message.contains("'percentile'"));
        for bad in [json!(100.5), json!(-1), json!("abc"), json!(true), json!([50])] {
            let err = error("percentile", json!({"percentile": bad}));
            assert_eq!(err.code, ErrorCode::InvalidParameter, "{bad}");
            assert!(err.message.contains("'percentile'"));
        }
    }

    #[test]
    fn unknown_analysis_types() {
        for name in ["funnel", "multi_analysis", "cout", "", "COUNT"] {
            let err = error(name, json!({}));
            assert_eq!(err.code, ErrorCode::InvalidAnalysisType, "{name}");
        }
    }

    #[test]
    fn required_parameters() {
        let p = params(json!({"target_property": "price", "timeframe": "today"}));
        let err = parse_query("sum", &p, now()).unwrap_err();
        assert_eq!(err.code, ErrorCode::MissingRequiredProperty);
        assert!(err.message.contains("'event_collection'"));

        let err = error("count", json!({"event_collection": ""}));
        assert_eq!(err.code, ErrorCode::InvalidParameter);
        assert!(err.message.contains("'event_collection'"));
        let err = error("count", json!({"event_collection": {"a": 1}}));
        assert_eq!(err.code, ErrorCode::MissingRequiredProperty);

        let p = params(json!({"event_collection": "c", "timeframe": "today"}));
        let err = parse_query("sum", &p, now()).unwrap_err();
        assert_eq!(err.code, ErrorCode::MissingRequiredProperty);
        assert!(err.message.contains("'target_property'"));
        let err = error("average", json!({"target_property": null}));
        assert_eq!(err.code, ErrorCode::MissingRequiredProperty);

        let p = params(json!({"event_collection": "c"}));
        let err = parse_query("count", &p, now()).unwrap_err();
        assert_eq!(err.code, ErrorCode::MissingRequiredProperty);
        assert!(err.message.contains("'timeframe'"));
        let err = parse_query("extraction", &p, now()).unwrap_err();
        assert_eq!(err.code, ErrorCode::MissingRequiredProperty);
        let err = error("count", json!({"timeframe": ""}));
        assert_eq!(err.code, ErrorCode::MissingRequiredProperty);

        // A GET collection name made of digits parses as a number; it is still a name.
        let p = params_from_query_string("event_collection=2024&timeframe=today");
        assert_eq!(parse_query("count", &p, now()).unwrap().event_collection, "2024");
    }

    #[test]
    fn timeframe_timezone_interval() {
        let spec = query(
            "count",
            json!({"timeframe": "today", "timezone": "America/New_York"}),
        )
        .unwrap();
        assert_eq!(spec.range.start_ms, ms("2026-03-08T05:00:00Z"));
        assert_eq!(spec.range.end_ms, ms("2026-03-09T04:00:00Z"));
        let spec = query("count", json!({"timeframe": "today", "timezone": -28800})).unwrap();
        assert_eq!(spec.range.start_ms, ms("2026-03-08T08:00:00Z"));
        let spec = query("count", json!({"timezone": null, "interval": null})).unwrap();
        assert_eq!(spec.zone, Zone::utc());
        assert!(spec.interval.is_none());
        let spec = query("count", json!({"interval": "every_2_days"})).unwrap();
        assert_eq!(spec.interval.unwrap().every, 2);

        assert_eq!(
            error("count", json!({"timeframe": "this_7_fortnights"})).code,
            ErrorCode::TimeframeDefinition
        );
        assert_eq!(
            error(
                "count",
                json!({"timeframe": {"start": "2026-01-02", "end": "2026-01-01"}})
            )
            .code,
            ErrorCode::TimeframeDefinition
        );
        let err = error("count", json!({"timezone": "Nowhere/Special"}));
        assert_eq!(err.code, ErrorCode::InvalidParameter);
        assert!(err.message.contains("'timezone'"));
        let err = error("count", json!({"interval": "fortnightly"}));
        assert_eq!(err.code, ErrorCode::IntervalDefinition);
        assert!(err.message.contains("'interval'"));
        let err = error("extraction", json!({"interval": "daily"}));
        assert_eq!(err.code, ErrorCode::InvalidParameter);
        assert!(err.message.contains("'interval'"));
    }

    // Filters

    #[test]
    fn filter_operators_and_operands() {
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "eq", "property_value": null})),
            FilterOp::Eq(Value::Null)
        ));
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "ne", "property_value": "x"})),
            FilterOp::Ne(Value::String(_))
        ));
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "lt", "property_value": 5})),
            FilterOp::Lt(_)
        ));
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "lte", "property_value": "m"})),
            FilterOp::Lte(_)
        ));
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "gt", "property_value": 1.5})),
            FilterOp::Gt(_)
        ));
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "gte", "property_value": 0})),
            FilterOp::Gte(_)
        ));
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "exists", "property_value": true})),
            FilterOp::Exists(true)
        ));
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "exists", "property_value": "false"})),
            FilterOp::Exists(false)
        ));
        assert!(
            matches!(single(json!({"property_name": "a", "operator": "in", "property_value": [1, "x", null]})), FilterOp::In(v) if v.len() == 3)
        );
        assert!(
            matches!(single(json!({"property_name": "a", "operator": "contains", "property_value": "ab"})), FilterOp::Contains(s) if s == "ab")
        );
        assert!(matches!(
            single(json!({"property_name": "a", "operator": "not_contains", "property_value": "ab"})),
            FilterOp::NotContains(_)
        ));
        match single(json!({"property_name": "a", "operator": "regex", "property_value": "^a.+z$"})) {
            FilterOp::Regex(re) => assert!(re.is_match("abcz") && !re.is_match("abc")),
            other => panic!("{other:?}"),
        }
        match single(
            json!({"property_name": "keen.location.coordinates", "operator": "within",
                            "property_value": {"coordinates": [-122.4, 37.8], "max_distance_miles": 10}}),
        ) {
            FilterOp::Within { lon, lat, max_miles } => {
                assert_eq!((lon, lat, max_miles), (-122.4, 37.8, 10.0));
            }
            other => panic!("{other:?}"),
        }
        // property_type is accepted and ignored; the operator is case-insensitive.
        assert!(matches!(
            single(
                json!({"property_name": "a", "operator": "EQ", "property_value": 1, "property_type": "Number"})
            ),
            FilterOp::Eq(_)
        ));
        // Datetimes stay strings; the executor compares them.
        match filters(json!([{"property_name": "keen.timestamp", "operator": "gte",
                              "property_value": "2026-03-01T00:00:00.000Z"}]))
        .unwrap()
        .remove(0)
        {
            Filter::Property {
                property,
                op: FilterOp::Gte(Value::String(s)),
            } => {
                assert_eq!(property, "keen.timestamp");
                assert_eq!(s, "2026-03-01T00:00:00.000Z");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn filters_container_forms() {
        assert!(filters(json!([])).unwrap().is_empty());
        assert!(filters(json!(null)).unwrap().is_empty());
        let text = json!("[{\"property_name\":\"a\",\"operator\":\"eq\",\"property_value\":1}]");
        assert_eq!(filters(text).unwrap().len(), 1);
        let err = filter_error(json!({"property_name": "a", "operator": "eq", "property_value": 1}));
        assert!(err.message.contains("'filters'"));
        filter_error(json!("price > 5"));
        filter_error(json!(5));
        let err = error("count", json!({"filters": [1]}));
        assert_eq!(err.code, ErrorCode::FilterDefinition);
        assert!(err.message.contains("filters[0]"));
    }

    #[test]
    fn or_filters_nest() {
        let parsed = filters(json!([{
            "operator": "or",
            "property_value": [
                {"property_name": "a", "operator": "eq", "property_value": 1},
                {"operator": "or", "property_value": [
                    {"property_name": "b", "operator": "exists", "property_value": true},
                    {"property_name": "c", "operator": "lt", "property_value": 3}
                ]}
            ]
        }]))
        .unwrap();
        match &parsed[0] {
            Filter::Or(inner) => {
                assert_eq!(inner.len(), 2);
                assert!(matches!(&inner[1], Filter::Or(deeper) if deeper.len() == 2));
            }
            other => panic!("{other:?}"),
        }
        filter_error(json!([{"operator": "or", "property_value": []}]));
        filter_error(json!([{"operator": "or", "property_value": {"a": 1}}]));
        filter_error(json!([{"operator": "or"}]));
        let err = filter_error(json!([{"operator": "or", "property_value": [
            {"property_name": "a", "operator": "eq", "property_value": 1},
            {"property_name": "b", "operator": "starts_with", "property_value": "x"}
        ]}]));
        assert!(
            err.message.contains("filters[0].property_value[1]"),
            "{}",
            err.message
        );

        let mut deep = json!({"property_name": "a", "operator": "eq", "property_value": 1});
        for _ in 0..MAX_FILTER_DEPTH {
            deep = json!({"operator": "or", "property_value": [deep]});
        }
        let err = filter_error(json!([deep]));
        assert!(err.message.contains("deeper"));
        let mut ok = json!({"property_name": "a", "operator": "eq", "property_value": 1});
        for _ in 0..MAX_FILTER_DEPTH - 1 {
            ok = json!({"operator": "or", "property_value": [ok]});
        }
        assert!(filters(json!([ok])).is_ok());
    }

    #[test]
    fn bad_filters_name_the_problem() {
        let cases = [
            (json!({"operator": "eq", "property_value": 1}), "property_name"),
            (
                json!({"property_name": "", "operator": "eq", "property_value": 1}),
                "property_name",
            ),
            (
                json!({"property_name": 5, "operator": "eq", "property_value": 1}),
                "property_name",
            ),
            (json!({"property_name": "a", "property_value": 1}), "operator"),
            (
                json!({"property_name": "a", "operator": 3, "property_value": 1}),
                "operator",
            ),
            (
                json!({"property_name": "a", "operator": "starts_with", "property_value": "x"}),
                "starts_with",
            ),
            (json!({"property_name": "a", "operator": "eq"}), "property_value"),
            (
                json!({"property_name": "a", "operator": "eq", "property_value": [1]}),
                "eq",
            ),
            (
                json!({"property_name": "a", "operator": "ne", "property_value": {"x": 1}}),
                "ne",
            ),
            (
                json!({"property_name": "a", "operator": "lt", "property_value": null}),
                "lt",
            ),
            (
                json!({"property_name": "a", "operator": "gte", "property_value": true}),
                "gte",
            ),
            (
                json!({"property_name": "a", "operator": "exists", "property_value": "yes"}),
                "exists",
            ),
            (
                json!({"property_name": "a", "operator": "exists", "property_value": 1}),
                "exists",
            ),
            (
                json!({"property_name": "a", "operator": "in", "property_value": 1}),
                "in",
            ),
            (
                json!({"property_name": "a", "operator": "contains", "property_value": 1}),
                "contains",
            ),
            (
                json!({"property_name": "a", "operator": "not_contains", "property_value": null}),
                "not_contains",
            ),
            (
                json!({"property_name": "a", "operator": "regex", "property_value": "(unclosed"}),
                "regex",
            ),
            (
                json!({"property_name": "a", "operator": "regex", "property_value": "\\w{1000}{1000}"}),
                "regex",
            ),
            (
                json!({"property_name": "a", "operator": "regex", "property_value": 5}),
                "regex",
            ),
            (
                json!({"property_name": "a", "operator": "within", "property_value": {"coordinates": [1], "max_distance_miles": 1}}),
                "within",
            ),
            (
                json!({"property_name": "a", "operator": "within", "property_value": {"coordinates": [1, 2]}}),
                "within",
            ),
            (
                json!({"property_name": "a", "operator": "within", "property_value": {"coordinates": [200, 2], "max_distance_miles": 1}}),
                "within",
            ),
            (
                json!({"property_name": "a", "operator": "within", "property_value": [1, 2]}),
                "within",
            ),
            (json!("eq"), "object"),
        ];
        for (filter, word) in cases {
            let err = filter_error(
                json!([{"property_name": "ok", "operator": "exists", "property_value": true}, filter]),
            );
            assert!(err.message.contains("filters[1]"), "{}", err.message);
            assert!(err.message.contains(word), "{word}: {}", err.message);
        }
    }

    // Grouping, ordering and the rest

    #[test]
    fn group_by_and_order_by() {
        let spec = query("sum", json!({"group_by": "item.name"})).unwrap();
        assert_eq!(spec.group_by, ["item.name"]);
        let spec = query(
            "sum",
            json!({"group_by": ["a", "b"], "order_by": [
                {"property_name": "result", "direction": "desc"},
                {"property_name": "a"}
            ], "limit": "3"}),
        )
        .unwrap();
        assert_eq!(
            spec.order_by,
            [
                OrderBy {
                    property: "result".into(),
                    descending: true
                },
                OrderBy {
                    property: "a".into(),
                    descending: false
                }
            ]
        );
        assert_eq!(spec.limit, Some(3));
        let spec = query(
            "sum",
            json!({"group_by": "a", "order_by": {"property_name": "a", "direction": "DESC"}}),
        )
        .unwrap();
        assert_eq!(
            spec.order_by,
            [OrderBy {
                property: "a".into(),
                descending: true
            }]
        );
        let spec = query("sum", json!({"group_by": "a", "order_by": "result"})).unwrap();
        assert_eq!(
            spec.order_by,
            [OrderBy {
                property: "result".into(),
                descending: false
            }]
        );
        let spec = query("sum", json!({"group_by": [], "order_by": []})).unwrap();
        assert!(spec.group_by.is_empty() && spec.order_by.is_empty());
        let spec = query("sum", json!({"group_by": "[\"a\",\"b\"]"})).unwrap();
        assert_eq!(spec.group_by, ["a", "b"]);

        let invalid = |extra: Value, word: &str| {
            let err = error("sum", extra);
            assert_eq!(err.code, ErrorCode::InvalidParameter, "{}", err.message);
            assert!(err.message.contains(word), "{word}: {}", err.message);
        };
        invalid(json!({"group_by": ""}), "'group_by'");
        invalid(json!({"group_by": ["a", ""]}), "'group_by'");
        invalid(json!({"group_by": ["a", 1]}), "'group_by'");
        invalid(json!({"group_by": {"a": 1}}), "'group_by'");
        invalid(
            json!({"group_by": (0..11).map(|i| format!("p{i}")).collect::<Vec<_>>()}),
            "'group_by'",
        );
        invalid(json!({"order_by": "result"}), "'order_by'");
        invalid(json!({"group_by": "a", "order_by": "b"}), "'order_by'");
        invalid(
            json!({"group_by": "a", "order_by": {"direction": "ASC"}}),
            "'order_by'",
        );
        invalid(
            json!({"group_by": "a", "order_by": {"property_name": "a", "direction": "UP"}}),
            "'order_by'",
        );
        invalid(json!({"group_by": "a", "order_by": [5]}), "'order_by'");
        invalid(json!({"limit": 0}), "'limit'");
        invalid(json!({"limit": -1}), "'limit'");
        invalid(json!({"limit": 1.5}), "'limit'");
        invalid(json!({"limit": "many"}), "'limit'");
        invalid(json!({"include_metadata": "yes"}), "'include_metadata'");
        invalid(json!({"max_age": -1}), "'max_age'");
        invalid(json!({"max_age": "soon"}), "'max_age'");
        invalid(json!({"content_type": "text/html"}), "'content_type'");
        let err = error("extraction", json!({"group_by": "a"}));
        assert_eq!(err.code, ErrorCode::InvalidParameter);
    }

    #[test]
    fn extraction_parameters() {
        let spec = query(
            "extraction",
            json!({"latest": 10, "property_names": ["a", "keen.timestamp"],
                   "content_type": "text/csv", "include_metadata": "true", "max_age": 300,
                   "api_key": "ignored", "analysis_type": "extraction", "dataset_name": "x"}),
        )
        .unwrap();
        assert_eq!(spec.latest, Some(10));
        assert_eq!(
            spec.property_names,
            Some(vec!["a".to_string(), "keen.timestamp".to_string()])
        );
        assert!(spec.csv);
        assert!(spec.include_metadata);
        assert_eq!(spec.max_age, Some(300));
        assert_eq!(spec.target_property, None);

        let spec = query(
            "extraction",
            json!({"property_names": "price", "latest": "5", "content_type": "application/json"}),
        )
        .unwrap();
        assert_eq!(spec.property_names, Some(vec!["price".to_string()]));
        assert_eq!(spec.latest, Some(5));
        assert!(!spec.csv);

        let err = error("extraction", json!({"latest": 0}));
        assert_eq!(err.code, ErrorCode::InvalidParameter);
        assert!(err.message.contains("'latest'"));
        let err = error("extraction", json!({"property_names": [1]}));
        assert_eq!(err.code, ErrorCode::InvalidParameter);
        assert!(err.message.contains("'property_names'"));
        // Extraction-only parameters are not carried into other analyses.
        let spec = query("count", json!({"latest": 3, "property_names": "a"})).unwrap();
        assert!(spec.latest.is_none() && spec.property_names.is_none());
    }
}
