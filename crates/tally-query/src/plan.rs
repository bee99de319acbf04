//! A query of any analysis, parsed and resolved at one moment: what it reads, the key its answer
//! is cached under, and how to run it.
//!
//! Ad-hoc queries, saved queries and their background refreshes all go through
//! [`Prepared::parse`] and [`Prepared::run`], so they cannot disagree about what a query means.

use std::sync::Arc;

use serde_json::Value;
use tally_store::events::StoredSegment;

use crate::exec::{self, Answer, ExecError, Limits};
use crate::funnel::{self, FunnelStep};
use crate::spec::{self, Params, QuerySpec, SpecError};
use crate::timeframe::TimeRange;

/// What kind of query, with its parsed form.
#[derive(Debug, Clone)]
pub enum Plan {
    /// One analysis over one collection.
    Single(Box<QuerySpec>),
    /// A funnel's steps.
    Funnel(Vec<FunnelStep>),
    /// Labelled analyses joined by group and bucket.
    Multi(Vec<(String, QuerySpec)>),
}

/// A parsed query, its relative timeframes resolved against `now_ms`.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The query.
    pub plan: Plan,
    /// `max_age` in seconds: how old a cached answer may be (none: always compute).
    pub max_age: Option<u64>,
}

impl Prepared {
    /// Parses `analysis` (the URL's last segment or a saved query's `analysis_type`) with its
    /// parameters.
    pub fn parse(analysis: &str, params: &Params, now_ms: i64) -> Result<Self, SpecError> {
        let max_age = spec::parse_max_age(params)?;
        let plan = match analysis {
            "funnel" => Plan::Funnel(funnel::parse_funnel(params, now_ms)?),
            "multi_analysis" => Plan::Multi(funnel::parse_multi_specs(params, now_ms)?),
            _ => {
                let mut single = spec::parse_query(analysis, params, now_ms)?;
                // Not part of the question: two requests differing only in max_age share a key.
                single.max_age = None;
                Plan::Single(Box::new(single))
            }
        };
        Ok(Self { plan, max_age })
    }

    /// AND-s `filters` into everything the query reads: the analysis, every funnel step, every
    /// labelled analysis. How an access key's `queries.filters` apply; call it before
    /// [`Prepared::cache_key`], so the restricted query has its own key.
    pub fn restrict(&mut self, filters: &[crate::spec::Filter]) {
        if filters.is_empty() {
            return;
        }
        match &mut self.plan {
            Plan::Single(s) => s.filters.extend(filters.iter().cloned()),
            Plan::Funnel(steps) => {
                for step in steps {
                    step.filters.extend(filters.iter().cloned());
                }
            }
            Plan::Multi(specs) => {
                for (_, spec) in specs {
                    spec.filters.extend(filters.iter().cloned());
                }
            }
        }
    }

    /// The collections and time ranges the query reads: its answer changes only if events there
    /// change.
    pub fn reads(&self) -> Vec<(String, TimeRange)> {
        match &self.plan {
            Plan::Single(s) => vec![(s.event_collection.clone(), s.range)],
            Plan::Funnel(steps) => steps
                .iter()
                .map(|s| (s.event_collection.clone(), s.range))
                .collect(),
            Plan::Multi(specs) => specs
                .iter()
                .map(|(_, s)| (s.event_collection.clone(), s.range))
                .collect(),
        }
    }

    /// The normalised query: equal for two requests that must get the same answer from the same
    /// data. It is the parsed query (defaults filled in, relative timeframes resolved to absolute
    /// ranges, filters validated) printed in full, not the request text, so parameter order,
    /// encoding (GET or POST) and spelling of equivalent values do not matter, and a relative
    /// timeframe that has moved on gives a new key.
    pub fn cache_key(&self) -> String {
        format!("{:?}", self.plan)
    }

    /// Whether the answer is CSV (not cacheable as JSON by saved queries).
    pub fn is_csv(&self) -> bool {
        matches!(&self.plan, Plan::Single(s) if s.csv)
    }

    /// Runs the query over the segments `segments_of` gives for each collection.
    pub fn run(
        &self,
        segments_of: impl Fn(&str) -> Vec<Arc<StoredSegment>>,
        limits: &Limits,
    ) -> Result<Answer, ExecError> {
        match &self.plan {
            Plan::Single(s) => exec::run(s, &segments_of(&s.event_collection), limits),
            Plan::Funnel(steps) => {
                let snapshots: Vec<_> = steps.iter().map(|s| segments_of(&s.event_collection)).collect();
                funnel::run_funnel(steps, &snapshots, limits).map(Answer::Json)
            }
            Plan::Multi(specs) => funnel::run_multi(specs, segments_of, limits).map(Answer::Json),
        }
    }

    /// The JSON answer (CSV extractions are refused by callers before running).
    pub fn run_json(
        &self,
        segments_of: impl Fn(&str) -> Vec<Arc<StoredSegment>>,
        limits: &Limits,
    ) -> Result<Value, ExecError> {
        match self.run(segments_of, limits)? {
            Answer::Json(v) => Ok(v),
            Answer::Csv(text) => Ok(Value::String(text)),
        }
    }
}
