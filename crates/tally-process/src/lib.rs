//! Tally's process stage: from the event log to the store, enriching on the way.
//!
//! Ingest queues events with their `keen.addons` untouched, so acknowledging an event never waits
//! for enrichment. This crate reads the log ([`stage`]), applies the add-ons in order
//! ([`enrich`]: [`geo`], [`useragent`], [`urlparse`], [`referrer`], [`datetime`]), removes
//! `keen.addons`, and hands the events to an [`EventSink`](tally_core::event::EventSink) together
//! with the log position they reach ([`sink`] has the sinks used until the store exists).
//!
//! Every file the add-ons need is read when they are built (the GeoIP database at start-up and on
//! reload; the bundled user-agent and referrer rules on first use), never per event.

pub mod access;
pub mod datetime;
pub mod enrich;
pub mod geo;
mod jsontext;
pub mod path;
pub mod referrer;
pub mod sink;
pub mod stage;
pub mod urlparse;
pub mod useragent;

pub use enrich::Enrichers;
pub use geo::GeoIp;
pub use stage::{ProcessStage, StageConfig};
