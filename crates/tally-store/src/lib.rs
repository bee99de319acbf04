//! Tally's storage.
//!
//! - [`catalog`]: projects, their keys, and the named definitions (saved queries, datasets) a
//!   project keeps;
//! - [`events`]: the columnar event store, with the change tracking caches rely on;
//! - [`results`]: cached answers on disk (cached query results, dataset buckets).
//!
//! Each has an embedded implementation (local files); the Cassandra one comes behind the same
//! shapes.

pub mod catalog;
pub mod events;
pub mod results;

pub use catalog::{
    AccessKeyDefinition, AccessKeyInfo, Catalog, CatalogError, EmbeddedCatalog, KeyGrant, KeyKind,
    NewProject, ObjectKind, ProjectInfo,
};
