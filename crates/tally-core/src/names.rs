//! Keen's naming rules for event collections and properties.
//!
//! * Collection names: 1 to 64 characters, ASCII only, no control characters, no `$`, not starting
//!   with `_`, not starting or ending with `.`. Spaces and inner dots are allowed
//!   (`"User posts.new"`).
//! * Property names: 1 to 256 characters, no `.` (dots separate levels of a property path), not
//!   starting with `$`.

/// The longest collection name Keen accepts.
pub const MAX_COLLECTION_NAME_CHARS: usize = 64;
/// The longest property name Keen accepts.
pub const MAX_PROPERTY_NAME_CHARS: usize = 256;

/// Checks a collection name; the error says what is wrong.
pub fn check_collection_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("Collection name must not be empty.".into());
    }
    if name.len() > MAX_COLLECTION_NAME_CHARS {
        return Err(format!(
            "Collection name must be at most {MAX_COLLECTION_NAME_CHARS} characters."
        ));
    }
    if !name.is_ascii() || name.chars().any(|c| c.is_ascii_control()) {
        return Err("Collection name must contain only printable ASCII characters.".into());
    }
    if name.contains('$') {
        return Err("Collection name must not contain the '$' symbol.".into());
    }
    if name.starts_with('_') {
        return Err("Collection name must not start with '_'.".into());
    }
    if name.starts_with('.') || name.ends_with('.') {
        return Err("Collection name must not start or end with '.'.".into());
    }
    Ok(())
}

/// Checks one property name (one level of a path); the error says what is wrong.
pub fn check_property_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("Property name must not be empty.".into());
    }
    // Characters never outnumber bytes: most names need no count.
    if name.len() > MAX_PROPERTY_NAME_CHARS && name.chars().count() > MAX_PROPERTY_NAME_CHARS {
        return Err(format!(
            "Property name is invalid. Must be <= {MAX_PROPERTY_NAME_CHARS} characters, cannot contain the '.' symbol anywhere."
        ));
    }
    if name.contains('.') {
        return Err(
            "Property name is invalid. Must be <= 256 characters, cannot contain the '.' symbol anywhere."
                .into(),
        );
    }
    if name.starts_with('$') {
        return Err("Property name is invalid. Must not start with the '$' symbol.".into());
    }
    Ok(())
}

/// Checks a dotted property path such as `user.id`: every level must be a valid property name.
pub fn check_property_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("Property path must not be empty.".into());
    }
    for part in path.split('.') {
        check_property_name(part).map_err(|e| format!("'{path}': {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names_follow_keens_rules() {
        for ok in [
            "purchases",
            "User posts.new",
            "infinite possibilities",
            "a",
            &"x".repeat(64),
        ] {
            assert!(check_collection_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "_private",
            ".start",
            "end.",
            "dollar$",
            "é",
            "tab\there",
            &"x".repeat(65),
        ] {
            assert!(check_collection_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn property_names_follow_keens_rules() {
        for ok in ["price", "with space", "ünïcode", &"p".repeat(256)] {
            assert!(check_property_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "an.invalid.name", "$set", &"p".repeat(257)] {
            assert!(check_property_name(bad).is_err(), "{bad}");
        }
        assert!(check_property_path("user.id").is_ok());
        assert!(check_property_path("user..id").is_err());
    }
}
