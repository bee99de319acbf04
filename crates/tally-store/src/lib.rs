//! Tally's storage.
//!
//! For now this is the [`catalog`]: projects and their keys. The columnar event store joins it
//! in the storage issue; both have an embedded implementation (local files) and, later, a
//! Cassandra one behind the same traits.

pub mod catalog;
pub mod events;

pub use catalog::{Catalog, CatalogError, EmbeddedCatalog, KeyGrant, KeyKind, NewProject, ProjectInfo};
