//! Who is calling, and what they may do.
//!
//! Keen clients put the key raw in the `Authorization` header or in the `api_key` query
//! parameter; the header wins. A project that does not exist is a 404 whatever the key; an
//! unknown or revoked key, or a key of another project, is `InvalidApiKeyError`; a key without the
//! needed permission is `InsufficientPermissionsError` (all 401).

use axum::http::{HeaderMap, header};
use tally_core::error::ErrorCode;
use tally_core::ids::{KeyHash, ProjectId};
use tally_store::{Catalog, KeyGrant, KeyKind};

use crate::error::ApiError;

/// What an endpoint needs from the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Recording events.
    Writes,
    /// Running queries (read or master key).
    Queries,
    /// Reading collections and properties (read or master key).
    Schema,
    /// Project administration and deletes (master key only).
    Master,
}

impl Access {
    fn allows(self, kind: KeyKind) -> bool {
        match self {
            Access::Writes => matches!(kind, KeyKind::Master | KeyKind::Write),
            Access::Queries | Access::Schema => matches!(kind, KeyKind::Master | KeyKind::Read),
            Access::Master => kind == KeyKind::Master,
        }
    }
}

/// The key presented with a request: the `Authorization` header, else `api_key`.
pub fn presented_key(headers: &HeaderMap, api_key_param: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    from_header
        .or(api_key_param.map(str::trim).filter(|v| !v.is_empty()))
        .map(str::to_string)
}

/// Resolves the project in the path and checks the key against it.
pub fn authorize(
    catalog: &dyn Catalog,
    project: &str,
    key: Option<&str>,
    access: Access,
) -> Result<KeyGrant, ApiError> {
    let project: ProjectId = project.parse().map_err(|_| ApiError::not_found())?;
    if !catalog.has_project(&project) {
        return Err(ApiError::not_found());
    }
    let Some(key) = key else {
        return Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            "An API key is required: send it in the Authorization header or the api_key parameter.",
        ));
    };
    let grant = catalog
        .authenticate(key)
        .filter(|grant| grant.project == project)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidApiKey,
                "The API key is invalid for this project, or has been revoked.",
            )
        })?;
    if access == Access::Master && grant.kind != KeyKind::Master {
        return Err(ApiError::new(
            ErrorCode::AdminOnlyEndpoint,
            "This endpoint needs the project's master key.",
        ));
    }
    if !access.allows(grant.kind) {
        return Err(ApiError::new(
            ErrorCode::InsufficientPermissions,
            format!("This key may not be used for {access:?}."),
        ));
    }
    Ok(grant)
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
