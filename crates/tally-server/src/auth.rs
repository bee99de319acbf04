//! Who is calling, and what they may do.
//!
//! Keen clients put the key raw in the `Authorization` header or in the `api_key` query
//! parameter; the header wins. [`authorize`] resolves the project in the path and the key into a
//! [`Caller`], or refuses:
//!
//! * a project that does not exist is a 404 whatever the key;
//! * no key, an unknown or revoked key, or a key of another project: `InvalidApiKeyError`;
//! * a master-only endpoint with any other key: `AdminOnlyEndpointError`;
//! * a key without the needed permission: `InsufficientPermissionsError` (all 401).
//!
//! The project's write key may record events; its read key may run queries and read results,
//! datasets and schema; an access key may do what its `permitted` list says, within its scope
//! ([`tally_query::access`]), which the [`Caller`] carries to the handler: the filters it ANDs
//! into every read, the saved queries and datasets it may see, the properties it fills in.
//! Every successful authorization also takes a token from the key's rate-limit bucket for the
//! endpoint's class ([`crate::limits`]).

use axum::http::{HeaderMap, header};
use tally_core::error::ErrorCode;
use tally_core::ids::{KeyHash, ProjectId};
use tally_query::Filter;
use tally_query::access::{AccessScope, DatasetOp, Permission};
use tally_store::KeyKind;

use crate::app::AppState;
use crate::error::ApiError;
use crate::limits::RateClass;

/// What an endpoint needs from the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Recording events.
    Writes,
    /// Running queries and SQL.
    Queries,
    /// Reading collections and properties.
    Schema,
    /// Reading a saved or cached query's result; which of the two is checked once the query is
    /// looked up ([`Caller::check_saved`]).
    SavedResults,
    /// Reading datasets.
    Datasets(DatasetOp),
    /// Project administration, deletes, definitions (master key only).
    Master,
}

impl Access {
    /// The rate-limit bucket a request for this access draws from (`None`: not limited here;
    /// saved and dataset results count as queries only when they are computed on request).
    fn rate_class(self) -> Option<RateClass> {
        match self {
            Access::Writes => Some(RateClass::Writes),
            Access::Queries | Access::Schema => Some(RateClass::Queries),
            Access::Master => Some(RateClass::Admin),
            Access::SavedResults | Access::Datasets(_) => None,
        }
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The project the key belongs to (and the path names).
    pub project: ProjectId,
    /// The kind of key.
    pub kind: KeyKind,
    /// The key's hash: its identity for rate limits.
    pub key: KeyHash,
    /// An access key's scope.
    pub scope: Option<AccessScope>,
}

impl Caller {
    fn permits(&self, access: Access) -> bool {
        match (self.kind, &self.scope) {
            (KeyKind::Master, _) => true,
            (KeyKind::Write, _) => access == Access::Writes,
            (KeyKind::Read, _) => !matches!(access, Access::Writes | Access::Master),
            (KeyKind::Access, None) => false,
            (KeyKind::Access, Some(scope)) => match access {
                Access::Writes => scope.permits(Permission::Writes),
                Access::Queries => scope.permits(Permission::Queries),
                Access::Schema => scope.permits(Permission::Schema),
                Access::SavedResults => {
                    scope.permits(Permission::SavedQueries) || scope.permits(Permission::CachedQueries)
                }
                Access::Datasets(op) => scope.permits(Permission::Datasets) && scope.datasets.permits_op(op),
                Access::Master => false,
            },
        }
    }

    /// The filters AND-ed into everything this caller reads (empty: no restriction).
    pub fn query_filters(&self) -> &[Filter] {
        self.scope.as_ref().map_or(&[], |s| &s.query_filters)
    }

    /// Whether the caller reads through row filters (answers computed for other callers, such as
    /// cached results, cannot be handed to it).
    pub fn is_filtered(&self) -> bool {
        !self.query_filters().is_empty()
    }

    /// The filters AND-ed into a saved or cached query's result for this caller.
    pub fn saved_filters(&self) -> Vec<Filter> {
        self.scope
            .as_ref()
            .map(AccessScope::saved_filters)
            .unwrap_or_default()
    }

    /// Whether the caller may read the result of the saved query `name` (`cached`: a cached
    /// query).
    pub fn check_saved(&self, name: &str, cached: bool) -> Result<(), ApiError> {
        let Some(scope) = &self.scope else {
            return Ok(());
        };
        let (permission, rules, what) = if cached {
            (Permission::CachedQueries, &scope.cached_queries, "cached query")
        } else {
            (Permission::SavedQueries, &scope.saved_queries, "saved query")
        };
        if !scope.permits(permission) {
            return Err(insufficient(format!(
                "This key may not read {what} results (it lacks the '{}' permission).",
                permission.as_str()
            )));
        }
        if !rules.permits(name) {
            return Err(insufficient(format!(
                "This key may not read the {what} '{name}'."
            )));
        }
        Ok(())
    }

    /// Whether the caller may do `op` on the dataset `name`.
    pub fn check_dataset(&self, op: DatasetOp, name: &str) -> Result<(), ApiError> {
        match &self.scope {
            Some(scope) if !scope.datasets.permits(op, name) => Err(insufficient(format!(
                "This key may not {} the dataset '{name}'.",
                op.as_str()
            ))),
            _ => Ok(()),
        }
    }

    /// Whether the caller may see the dataset `name` in a listing (the `list` operation itself
    /// was checked by [`authorize`]; here only the names the key is allowed and not blocked).
    pub fn sees_dataset(&self, name: &str) -> bool {
        self.scope.as_ref().is_none_or(|s| s.datasets.permits_name(name))
    }

    /// Refuses, before anything is looked up, a saved-query name the caller may read neither as
    /// a saved nor as a cached query, so that blocked names cannot be told from missing ones.
    pub fn check_saved_name(&self, name: &str) -> Result<(), ApiError> {
        let Some(scope) = &self.scope else {
            return Ok(());
        };
        let as_saved = scope.permits(Permission::SavedQueries) && scope.saved_queries.permits(name);
        let as_cached = scope.permits(Permission::CachedQueries) && scope.cached_queries.permits(name);
        if as_saved || as_cached {
            Ok(())
        } else {
            Err(insufficient(format!(
                "This key may not read the saved query '{name}'."
            )))
        }
    }
}

fn insufficient(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InsufficientPermissions, message)
}

/// The key presented with a request: the `Authorization` header, else `api_key`.
pub fn presented_key<'a>(headers: &'a HeaderMap, api_key_param: Option<&'a str>) -> Option<&'a str> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    from_header.or(api_key_param.map(str::trim).filter(|v| !v.is_empty()))
}

/// Resolves the project in the path and checks the key against it and `access`, then takes a
/// token from the key's rate-limit bucket.
pub fn authorize(
    state: &AppState,
    project: &str,
    key: Option<&str>,
    access: Access,
) -> Result<Caller, ApiError> {
    let project: ProjectId = project.parse().map_err(|_| ApiError::not_found())?;
    if !state.catalog.has_project(&project) {
        return Err(ApiError::not_found());
    }
    let Some(key) = key else {
        return Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            "An API key is required: send it in the Authorization header or the api_key parameter.",
        ));
    };
    let grant = state
        .catalog
        .authenticate(key)
        .filter(|grant| grant.project == project)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidApiKey,
                "The API key is invalid for this project, or has been revoked.",
            )
        })?;
    let scope = match &grant.access {
        // Validated when stored; a definition that no longer parses opens nothing.
        Some(definition) => Some(
            AccessScope::parse(&definition.permitted, &definition.options)
                .map_err(|e| ApiError::internal(format!("stored access key does not parse: {e}")))?,
        ),
        None => None,
    };
    let caller = Caller {
        project,
        kind: grant.kind,
        key: grant.hash,
        scope,
    };
    if access == Access::Master && caller.kind != KeyKind::Master {
        return Err(ApiError::new(
            ErrorCode::AdminOnlyEndpoint,
            "This endpoint needs the project's master key.",
        ));
    }
    if !caller.permits(access) {
        return Err(insufficient(match access {
            Access::Datasets(op) => format!("This key may not {} datasets.", op.as_str()),
            other => format!("This key may not be used for {other:?}."),
        }));
    }
    if let Some(class) = access.rate_class() {
        state.rate_limiter.take(&caller.key, class)?;
    }
    Ok(caller)
}

/// Checks the server-wide admin key (for creating projects).
pub fn authorize_admin(admin_key: Option<&KeyHash>, key: Option<&str>) -> Result<(), ApiError> {
    let Some(admin_key) = admin_key else {
        return Err(ApiError::new(
            ErrorCode::AdminOnlyEndpoint,
            "Creating projects over HTTP needs an admin key; start Tally with --admin-key or TALLY_ADMIN_KEY.",
        ));
    };
    match key {
        Some(key) if KeyHash::of(key).ct_eq(admin_key) => Ok(()),
        Some(_) => Err(ApiError::new(
            ErrorCode::AdminOnlyEndpoint,
            "This endpoint needs the admin key.",
        )),
        None => Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            "An admin key is required.",
        )),
    }
}
