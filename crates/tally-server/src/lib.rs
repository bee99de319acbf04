//! Tally's HTTP server.
//!
//! * [`answers`]: the `max_age` cache, cached queries and datasets, and their refresher;
//! * [`app`]: the shared state and the router (the whole API, testable with `oneshot`);
//! * [`routes`]: the handlers;
//! * [`auth`]: keys, projects, permissions and access-key scopes;
//! * [`limits`]: fairness between keys and projects: rate limits and per-project query slots;
//! * [`request`]: query parameters, client address, body limits;
//! * [`error`]: the single mapping from errors to HTTP status and Keen's error body;
//! * [`metrics`]: Prometheus metrics;
//! * [`server`]: start-up, serving and ordered shutdown of a [`Tally`].

pub mod answers;
pub mod app;
pub mod auth;
mod connections;
pub mod error;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod request;
pub mod routes;
pub mod server;
mod shards;

pub use server::{DataDir, StartError, Tally};
