//! HTTP handlers, one module per area of the API.

pub mod events;
pub mod ops;
pub mod projects;
pub mod queries;
