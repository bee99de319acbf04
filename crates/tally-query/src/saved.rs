//! Saved queries (reference §4.1): the definition a `PUT` gives, validated before it is kept,
//! and the object Keen's clients expect back.
//!
//! A saved query is a named query with `refresh_rate` seconds; a nonzero rate makes it a
//! *cached query*, whose result is recomputed on that schedule and served from the cache. The
//! query itself goes through the same parser as an ad-hoc query ([`crate::plan::Prepared`]), so a
//! definition that is accepted is one that runs.

use serde_json::{Map, Value, json};
use tally_core::error::ErrorCode;

use crate::plan::Prepared;
use crate::spec::{Params, SpecError};

/// The bounds of a cached query's `refresh_rate`, in seconds (0 is always allowed: not cached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshBounds {
    /// The shortest refresh period accepted.
    pub min_secs: u64,
    /// The longest (Keen's Explorer: 48 hours).
    pub max_secs: u64,
}

/// The longest saved-query or dataset name.
pub const MAX_NAME_LEN: usize = 256;

/// Checks a saved-query or dataset name from the URL: 1–256 characters of `[A-Za-z0-9_-]` (what
/// Keen's clients clean names to).
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            ErrorCode::InvalidParameter,
            format!("The name '{name}' is not valid: use 1 to {MAX_NAME_LEN} letters, digits, '-' or '_'."),
        ))
    }
}

/// A validated saved-query definition.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedQuery {
    /// Seconds between refreshes; 0 when not cached.
    pub refresh_rate: u64,
    /// The query: `analysis_type` and its parameters, as given.
    pub query: Params,
    /// The client's `metadata` (display name, visualization, tags), kept as given.
    pub metadata: Value,
}

impl SavedQuery {
    /// The analysis (`analysis_type`).
    pub fn analysis(&self) -> &str {
        analysis_type(&self.query)
    }

    /// The catalog's form of the definition, with its creation and modification times (ms).
    pub fn to_stored(&self, created_ms: i64, modified_ms: i64) -> Value {
        json!({
            "refresh_rate": self.refresh_rate,
            "query": Value::Object(self.query.clone()),
            "metadata": self.metadata,
            "created_ms": created_ms,
            "modified_ms": modified_ms,
        })
    }

    /// Reads the catalog's form back (`None` if it is damaged).
    pub fn from_stored(stored: &Value) -> Option<SavedQuery> {
        Some(SavedQuery {
            refresh_rate: stored.get("refresh_rate")?.as_u64()?,
            query: stored.get("query")?.as_object()?.clone(),
            metadata: stored.get("metadata").cloned().unwrap_or(Value::Null),
        })
    }

    /// Parses the query as of `now_ms`.
    pub fn prepare(&self, now_ms: i64) -> Result<Prepared, SpecError> {
        Prepared::parse(self.analysis(), &self.query, now_ms)
    }

    /// The query as echoed in the saved-query object: Keen fills the optional parameters of a
    /// plain analysis with their defaults.
    pub fn echoed_query(&self) -> Value {
        let mut query = self.query.clone();
        if !matches!(self.analysis(), "funnel" | "multi_analysis") {
            for (name, default) in [
                ("filters", json!([])),
                ("interval", Value::Null),
                ("group_by", Value::Null),
                ("timezone", Value::Null),
            ] {
                query.entry(name).or_insert(default);
            }
        }
        Value::Object(query)
    }
}

/// The `analysis_type` of a definition's query ("" if it has none; definitions are validated
/// before they are kept).
pub(crate) fn analysis_type(query: &Params) -> &str {
    query
        .get("analysis_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The parts every definition body (saved query, dataset) shares: the body object, its `query`
/// object and the query's `analysis_type`.
pub(crate) fn definition_query(body: &Value) -> Result<(&Map<String, Value>, Params, String), SpecError> {
    let Some(body) = body.as_object() else {
        return Err(SpecError::new(
            ErrorCode::InvalidParameter,
            "The body must be a JSON object with a 'query'.",
        ));
    };
    let query = match body.get("query") {
        Some(Value::Object(q)) => q.clone(),
        Some(_) => {
            return Err(SpecError::new(
                ErrorCode::InvalidParameter,
                "The 'query' property must be an object.",
            ));
        }
        None => {
            return Err(SpecError::new(
                ErrorCode::MissingRequiredProperty,
                "The 'query' property is required.",
            ));
        }
    };
    let analysis = match query.get("analysis_type") {
        Some(Value::String(a)) if !a.is_empty() => a.clone(),
        Some(_) => {
            return Err(SpecError::new(
                ErrorCode::InvalidAnalysisType,
                "The query's 'analysis_type' must be a string naming an analysis.",
            ));
        }
        None => {
            return Err(SpecError::new(
                ErrorCode::MissingRequiredProperty,
                "The query's 'analysis_type' is required.",
            ));
        }
    };
    Ok((body, query, analysis))
}

/// Validates a `PUT …/queries/saved/{name}` body. The body's own `query_name`, `urls`, dates,
/// `run_information` and `result` (clients send back what they got) are ignored.
pub fn parse_saved_query(body: &Value, now_ms: i64, bounds: RefreshBounds) -> Result<SavedQuery, SpecError> {
    let (body, query, analysis) = definition_query(body)?;
    let refresh_rate = parse_refresh_rate(body.get("refresh_rate"), bounds)?;
    let saved = SavedQuery {
        refresh_rate,
        query,
        metadata: body.get("metadata").cloned().unwrap_or(Value::Null),
    };
    let prepared = Prepared::parse(&analysis, &saved.query, now_ms)?;
    if prepared.is_csv() {
        return Err(SpecError::new(
            ErrorCode::InvalidParameter,
            "A saved query cannot answer CSV; remove 'content_type'.",
        ));
    }
    Ok(saved)
}

fn parse_refresh_rate(value: Option<&Value>, bounds: RefreshBounds) -> Result<u64, SpecError> {
    let rate = match value {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(_) => None,
    };
    match rate {
        Some(0) => Ok(0),
        Some(r) if (bounds.min_secs..=bounds.max_secs).contains(&r) => Ok(r),
        _ => Err(SpecError::new(
            ErrorCode::InvalidParameter,
            format!(
                "The 'refresh_rate' must be 0 (not cached) or a whole number of seconds from {} to {}.",
                bounds.min_secs, bounds.max_secs
            ),
        )),
    }
}

/// How the last refresh of a cached query or dataset went, for `run_information`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    /// When the last refresh was attempted (ms).
    pub last_run_ms: Option<i64>,
    /// When the result now served was computed (ms).
    pub last_success_ms: Option<i64>,
    /// Why the last refresh failed, if it did (the last good result is kept).
    pub last_error: Option<String>,
    /// Refreshes that failed in a row.
    pub failures: u64,
}

impl RunInfo {
    /// Records a refresh attempted at `now_ms`: success moves the result's time on; failure keeps
    /// it and says why.
    pub fn record(&mut self, now_ms: i64, failure: Option<&str>) {
        self.last_run_ms = Some(now_ms);
        match failure {
            None => {
                self.last_success_ms = Some(now_ms);
                self.last_error = None;
                self.failures = 0;
            }
            Some(message) => {
                self.last_error = Some(message.to_owned());
                self.failures += 1;
            }
        }
    }

    /// Keen-style `run_information`, with the result's age at `now_ms`.
    pub fn to_json(&self, now_ms: i64, next_run_ms: Option<i64>) -> Value {
        let date = |ms: Option<i64>| ms.map_or(Value::Null, |ms| Value::String(format_date(ms)));
        let mut info = Map::new();
        info.insert("last_run_date".into(), date(self.last_run_ms));
        info.insert(
            "last_run_status".into(),
            json!(match (&self.last_error, self.last_run_ms) {
                (_, None) => "pending",
                (Some(_), _) => "failure",
                (None, _) => "success",
            }),
        );
        info.insert("last_run_message".into(), json!(self.last_error));
        info.insert("last_success_date".into(), date(self.last_success_ms));
        info.insert(
            "result_age_seconds".into(),
            json!(self.last_success_ms.map(|ms| (now_ms - ms).max(0) / 1000)),
        );
        info.insert("next_run_date".into(), date(next_run_ms));
        info.insert("consecutive_failures".into(), json!(self.failures));
        Value::Object(info)
    }
}

/// Keen's date format in saved-query objects: `2017-05-09T21:28:12.408000+00:00`.
pub fn format_date(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: RefreshBounds = RefreshBounds {
        min_secs: 60,
        max_secs: 172_800,
    };

    #[test]
    fn definitions_are_validated_before_they_are_kept() {
        let ok = json!({"refresh_rate": 14400, "query": {"analysis_type": "count", "event_collection": "pageviews", "timeframe": "this_14_days"}, "metadata": {"display_name": "x"}});
        let saved = parse_saved_query(&ok, 0, BOUNDS).unwrap();
        assert_eq!(saved.refresh_rate, 14400);
        assert_eq!(saved.analysis(), "count");
        assert_eq!(saved.echoed_query()["filters"], json!([]));
        let refused = |body: Value| parse_saved_query(&body, 0, BOUNDS).unwrap_err().code;
        assert_eq!(refused(json!({})), ErrorCode::MissingRequiredProperty);
        assert_eq!(
            refused(json!({"query": {"event_collection": "a"}})),
            ErrorCode::MissingRequiredProperty
        );
        assert_eq!(
            refused(
                json!({"query": {"analysis_type": "nope", "event_collection": "a", "timeframe": "this_day"}})
            ),
            ErrorCode::InvalidAnalysisType
        );
        assert_eq!(
            refused(json!({"query": {"analysis_type": "count", "event_collection": "a"}})),
            ErrorCode::MissingRequiredProperty
        );
        for rate in [
            json!(-1),
            json!(1.5),
            json!(10),
            json!(172_801),
            json!("x"),
            json!([]),
        ] {
            let body = json!({"refresh_rate": rate, "query": {"analysis_type": "count", "event_collection": "a", "timeframe": "this_day"}});
            assert_eq!(refused(body), ErrorCode::InvalidParameter, "{rate}");
        }
        assert!(check_name("ok_name-2").is_ok());
        for bad in ["", "a b", "a/b", "é", &"x".repeat(257)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(format_date(1_494_365_292_408), "2017-05-09T21:28:12.408000+00:00");
    }
}
