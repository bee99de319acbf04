//! Keen's query language over Tally's event store.
//!
//! A query arrives as HTTP parameters (GET query string or POST JSON body, section 0 of the
//! reference). [`spec`] turns them into a typed [`QuerySpec`], refusing anything malformed with
//! Keen's error codes; [`timeframe`] resolves time frames, time zones and interval buckets;
//! [`exec`] runs a spec over the store's segments and shapes the result as Keen does;
//! [`funnel`] adds funnels and multi_analysis on top of it. [`plan`] is the one entry point for
//! a query of any analysis; [`cache`] keeps answers for `max_age`; [`saved`] and [`dataset`] are
//! the definitions and incremental computation behind saved queries and cached datasets.

pub mod access;
pub mod cache;
pub mod dashboard;
pub mod dataset;
pub mod exec;
pub mod funnel;
pub mod plan;
pub mod saved;
pub mod spec;
pub mod timeframe;

pub use spec::{Analysis, Filter, FilterOp, OrderBy, QuerySpec, SpecError};
pub use timeframe::{Interval, IntervalUnit, TimeRange, Zone};
