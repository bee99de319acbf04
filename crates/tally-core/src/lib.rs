//! The vocabulary every other Tally crate speaks.
//!
//! `tally-core` has no I/O and few dependencies so that editing it is cheap and everything can
//! depend on it. It holds:
//!
//! * [`ids`]: project ids, event ids (time-ordered, 24 hex digits) and random API keys;
//! * [`clock`]: the injected [`Clock`](clock::Clock), so tests control time instead of sleeping;
//! * [`error`]: Keen's error codes, which the ingest and query paths produce and the server maps
//!   onto HTTP in one place;
//! * [`names`]: Keen's naming rules for collections and properties;
//! * [`time`]: parsing and printing Keen timestamps;
//! * [`addons`]: the closed set of enrichment add-ons and the validation of their specs;
//! * [`event`]: an accepted event and its binary log record, shared by every event log;
//! * [`log`]: the `EventLog` boundary between ingest and the process stage;
//! * [`config`]: the typed configuration, parsed once at start-up and passed down;
//! * [`worker`]: the stoppable background thread the stages and Kafka inbound run on.

pub mod addons;
pub mod clock;
pub mod config;
pub mod error;
pub mod event;
pub mod fsutil;
pub mod ids;
pub mod log;
pub mod names;
pub mod senders;
pub mod time;
pub mod worker;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::ErrorCode;
pub use ids::{EventIdGenerator, ProjectId};
