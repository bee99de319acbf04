//! HTTP handlers, one module per area of the API.

pub mod dashboards;
pub mod datasets;
pub mod events;
pub mod keys;
pub mod live;
pub mod ops;
pub mod projects;
pub mod queries;
pub mod saved;
pub mod ui;
