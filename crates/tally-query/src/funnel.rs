//! `funnel` and `multi_analysis` (reference §3.3 and §3.5).
//!
//! A funnel counts actors (the values of each step's `actor_property`) step by step: the first
//! step's distinct actors, then of those the ones who also match the next step (or, `inverted`,
//! who do not), and so on; an `optional` step is counted but does not narrow the steps after it.
//! Order in time is not enforced, as in Keen. Each step's actors are gathered with the same scan
//! as `count_unique` (dictionary bitmaps, values hashed once), so memory grows with distinct
//! actors (per step), not events; steps are gathered in parallel, one thread per core.
//!
//! `multi_analysis` runs each labelled analysis with the shared parameters and joins the results
//! by group and bucket.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use tally_core::error::ErrorCode;
use tally_store::events::StoredSegment;

use crate::exec::{self, Answer, ExecError, Limits};
use crate::spec::{self, Analysis, Filter, Params, QuerySpec, SpecError, param, text};
use crate::timeframe::{TimeRange, Zone};

/// The most steps a funnel may have.
pub const MAX_STEPS: usize = 50;

/// One validated funnel step.
#[derive(Debug, Clone)]
pub struct FunnelStep {
    pub event_collection: String,
    pub actor_property: String,
    pub range: TimeRange,
    pub filters: Vec<Filter>,
    pub optional: bool,
    pub inverted: bool,
    pub with_actors: bool,
    /// The step as echoed in the answer, every key present with its default.
    pub echo: Value,
}

/// Parses `steps` (with the root `timeframe` and `timezone` as defaults).
pub fn parse_funnel(params: &Params, now_ms: i64) -> Result<Vec<FunnelStep>, SpecError> {
    let steps = match param(params, "steps") {
        Some(Value::Array(steps)) => steps.clone(),
        Some(Value::String(s)) => match serde_json::from_str(s) {
            Ok(Value::Array(steps)) => steps,
            _ => {
                return Err(SpecError::invalid(
                    "The 'steps' parameter must be a list of step objects.",
                ));
            }
        },
        Some(_) => {
            return Err(SpecError::invalid(
                "The 'steps' parameter must be a list of step objects.",
            ));
        }
        None => {
            return Err(SpecError::new(
                ErrorCode::MissingRequiredProperty,
                "The 'steps' parameter is required for funnel queries.",
            ));
        }
    };
    if steps.is_empty() || steps.len() > MAX_STEPS {
        return Err(SpecError::invalid(format!(
            "The 'steps' parameter must hold 1 to {MAX_STEPS} steps."
        )));
    }
    let root_timeframe = param(params, "timeframe").cloned();
    let root_timezone = param(params, "timezone").cloned();
    let mut out = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let Value::Object(step) = step else {
            return Err(SpecError::invalid(format!("Funnel step {i} must be an object.")));
        };
        let field = |name: &str| step.get(name).filter(|v| !v.is_null());
        let required = |name: &str| {
            field(name)
                .and_then(text)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    SpecError::new(
                        ErrorCode::MissingRequiredProperty,
                        format!("Funnel step {i} needs '{name}'."),
                    )
                })
        };
        let event_collection = required("event_collection")?;
        let actor_property = required("actor_property")?;
        let timezone = field("timezone").cloned().or_else(|| root_timezone.clone());
        let zone: Zone = spec::parse_timezone(timezone.as_ref())?;
        let timeframe = field("timeframe").cloned().or_else(|| root_timeframe.clone());
        let range = spec::parse_timeframe(timeframe.as_ref(), zone, now_ms).map_err(|e| SpecError {
            message: format!("Funnel step {i}: {}", e.message),
            ..e
        })?;
        let filters = match field("filters") {
            Some(v) => spec::parse_filters(v)?,
            None => Vec::new(),
        };
        let flag = |name: &str| field(name).map_or(Ok(false), |v| spec::parse_bool(v, name));
        let (optional, inverted, with_actors) = (flag("optional")?, flag("inverted")?, flag("with_actors")?);
        if i == 0 && (inverted || optional) {
            return Err(SpecError::invalid(
                "The first funnel step cannot be 'inverted' or 'optional': it defines who is in the funnel.",
            ));
        }
        let echo = json!({
            "event_collection": event_collection,
            "actor_property": actor_property,
            "timeframe": timeframe,
            "timezone": timezone,
            "filters": field("filters").cloned().unwrap_or(json!([])),
            "optional": optional,
            "inverted": inverted,
            "with_actors": with_actors,
        });
        out.push(FunnelStep {
            event_collection,
            actor_property,
            range,
            filters,
            optional,
            inverted,
            with_actors,
            echo,
        });
    }
    Ok(out)
}

/// Runs a funnel; `snapshots[i]` holds the segments of step `i`'s collection.
pub fn run_funnel(
    steps: &[FunnelStep],
    snapshots: &[Vec<Arc<StoredSegment>>],
    limits: &Limits,
) -> Result<Value, ExecError> {
    let mut counts = Vec::with_capacity(steps.len());
    let mut actors = Vec::with_capacity(steps.len());
    // Each step's actors are independent of the others: gathered in parallel, one thread per
    // core taking every n-th step, then combined in order.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(steps.len())
        .max(1);
    let gathered: Vec<Vec<(usize, Result<exec::ActorSet, ExecError>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..steps.len())
                        .step_by(threads)
                        .map(|i| {
                            let step = &steps[i];
                            (
                                i,
                                exec::actors(
                                    &snapshots[i],
                                    &step.actor_property,
                                    step.range,
                                    &step.filters,
                                    limits,
                                ),
                            )
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("funnel step thread"))
            .collect()
    });
    let mut per_step: Vec<Option<exec::ActorSet>> = (0..steps.len()).map(|_| None).collect();
    for (i, matched) in gathered.into_iter().flatten() {
        per_step[i] = Some(matched?);
    }
    // The actors later steps are measured against.
    let mut base: Option<exec::ActorSet> = None;
    for (step, matched) in steps.iter().zip(per_step) {
        let matched = matched.expect("every step gathered");
        let current = match &base {
            None => matched,
            Some(base) if step.inverted => base.without(&matched),
            Some(base) => base.intersect(&matched),
        };
        counts.push(current.len());
        actors.push(if step.with_actors {
            current.to_json()
        } else {
            Value::Null
        });
        if !step.optional {
            base = Some(current);
        }
    }
    let mut body = Map::new();
    body.insert("result".into(), json!(counts));
    body.insert(
        "steps".into(),
        Value::Array(steps.iter().map(|s| s.echo.clone()).collect()),
    );
    if steps.iter().any(|s| s.with_actors) {
        body.insert("actors".into(), Value::Array(actors));
    }
    Ok(Value::Object(body))
}

/// One labelled analysis of a `multi_analysis`: its label and the parameters it runs with.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub label: String,
    pub analysis: String,
    pub params: Params,
}

/// Parses `analyses` (`{"label": {"analysis_type": …, "target_property": …, …}}`); each runs
/// with the shared parameters and its own on top.
pub fn parse_multi(params: &Params) -> Result<Vec<Labelled>, SpecError> {
    let analyses = match param(params, "analyses") {
        Some(Value::Object(map)) => map.clone(),
        Some(Value::String(s)) => match serde_json::from_str(s) {
            Ok(Value::Object(map)) => map,
            _ => {
                return Err(SpecError::invalid(
                    "The 'analyses' parameter must be an object of labelled analyses.",
                ));
            }
        },
        Some(_) => {
            return Err(SpecError::invalid(
                "The 'analyses' parameter must be an object of labelled analyses.",
            ));
        }
        None => {
            return Err(SpecError::new(
                ErrorCode::MissingRequiredProperty,
                "The 'analyses' parameter is required for multi_analysis queries.",
            ));
        }
    };
    if analyses.is_empty() {
        return Err(SpecError::invalid(
            "The 'analyses' parameter must name at least one analysis.",
        ));
    }
    let mut out = Vec::new();
    for (label, definition) in analyses {
        let Value::Object(own) = definition else {
            return Err(SpecError::invalid(format!(
                "Analysis '{label}' must be an object."
            )));
        };
        let Some(analysis) = own
            .get("analysis_type")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return Err(SpecError::new(
                ErrorCode::MissingRequiredProperty,
                format!("Analysis '{label}' needs an 'analysis_type'."),
            ));
        };
        if matches!(analysis.as_str(), "extraction" | "funnel" | "multi_analysis") {
            return Err(SpecError::new(
                ErrorCode::InvalidAnalysisType,
                format!("Analysis '{label}': {analysis} cannot be part of a multi_analysis."),
            ));
        }
        let mut merged = params.clone();
        merged.remove("analyses");
        merged.extend(own);
        out.push(Labelled {
            label,
            analysis,
            params: merged,
        });
    }
    Ok(out)
}

/// Joins the labelled results into Keen's multi_analysis shapes: an object of label → value;
/// grouped rows carrying each label instead of `result`; interval buckets whose `value` is one
/// of those.
pub fn join_multi(results: Vec<(String, Value)>, group_by: &[String]) -> Value {
    fn join(results: &[(String, &Value)], group_by: &[String]) -> Value {
        if group_by.is_empty() {
            let mut obj = Map::new();
            for (label, value) in results {
                obj.insert(label.clone(), (*value).clone());
            }
            return Value::Object(obj);
        }
        // Grouped: rows keyed by their group values, in the first analysis's order.
        let mut rows: Vec<(Vec<Value>, Map<String, Value>)> = Vec::new();
        for (label, value) in results {
            for row in value.as_array().into_iter().flatten() {
                let key: Vec<Value> = group_by
                    .iter()
                    .map(|g| row.get(g).cloned().unwrap_or(Value::Null))
                    .collect();
                let entry = match rows.iter().position(|(k, _)| *k == key) {
                    Some(i) => &mut rows[i].1,
                    None => {
                        let mut obj = Map::new();
                        for (g, v) in group_by.iter().zip(&key) {
                            obj.insert(g.clone(), v.clone());
                        }
                        rows.push((key, obj));
                        &mut rows.last_mut().expect("pushed").1
                    }
                };
                entry.insert(label.clone(), row.get("result").cloned().unwrap_or(Value::Null));
            }
        }
        Value::Array(rows.into_iter().map(|(_, obj)| Value::Object(obj)).collect())
    }
    let interval = results.first().is_some_and(|(_, v)| {
        v.as_array()
            .and_then(|a| a.first())
            .is_some_and(|b| b.get("timeframe").is_some())
    });
    if !interval {
        let borrowed: Vec<(String, &Value)> = results.iter().map(|(l, v)| (l.clone(), v)).collect();
        return join(&borrowed, group_by);
    }
    let buckets = results[0].1.as_array().map_or(0, Vec::len);
    Value::Array(
        (0..buckets)
            .map(|b| {
                let per_label: Vec<(String, &Value)> = results
                    .iter()
                    .map(|(l, v)| {
                        (
                            l.clone(),
                            v.get(b)
                                .and_then(|bucket| bucket.get("value"))
                                .unwrap_or(&Value::Null),
                        )
                    })
                    .collect();
                json!({
                    "timeframe": results[0].1[b]["timeframe"].clone(),
                    "value": join(&per_label, group_by),
                })
            })
            .collect(),
    )
}

/// Parses a `multi_analysis` into one validated spec per label (extraction is refused).
pub fn parse_multi_specs(params: &Params, now_ms: i64) -> Result<Vec<(String, QuerySpec)>, SpecError> {
    parse_multi(params)?
        .into_iter()
        .map(|l| {
            let spec = spec::parse_query(&l.analysis, &l.params, now_ms)?;
            if spec.analysis == Analysis::Extraction {
                return Err(SpecError::new(
                    ErrorCode::InvalidAnalysisType,
                    "extraction cannot be part of a multi_analysis.",
                ));
            }
            Ok((l.label, spec))
        })
        .collect()
}

/// Runs every labelled analysis over `segments_of(collection)` and joins the results.
pub fn run_multi(
    specs: &[(String, QuerySpec)],
    segments_of: impl Fn(&str) -> Vec<Arc<StoredSegment>>,
    limits: &Limits,
) -> Result<Value, ExecError> {
    let mut results = Vec::with_capacity(specs.len());
    let mut group_by: &[String] = &[];
    for (label, spec) in specs {
        group_by = &spec.group_by;
        let segments = segments_of(&spec.event_collection);
        let Answer::Json(body) = exec::run(spec, &segments, limits)? else {
            unreachable!("only extraction answers CSV");
        };
        results.push((label.clone(), body["result"].clone()));
    }
    Ok(json!({ "result": join_multi(results, group_by) }))
}
