//! Dotted property paths (`user.address.city`) into and out of JSON objects, as add-on inputs and
//! outputs name them.

use serde_json::{Map, Value};

/// The value at `path`, if every level exists.
pub fn get<'a>(object: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut value = object.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// Writes `value` at `path`, creating objects along the way. Fails (returning the value) if a
/// level on the way exists and is not an object: the event's own data is never overwritten to
/// make room.
pub fn set(object: &mut Map<String, Value>, path: &str, value: Value) -> Result<(), Value> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else {
        return Err(value);
    };
    let mut current = object;
    for part in parts {
        let next = current
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        match next {
            Value::Object(map) => current = map,
            _ => return Err(value),
        }
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// Removes and returns the value at `path`.
pub fn remove(object: &mut Map<String, Value>, path: &str) -> Option<Value> {
    match path.rsplit_once('.') {
        None => object.remove(path),
        Some((parent, last)) => {
            let mut current = object;
            for part in parent.split('.') {
                current = current.get_mut(part)?.as_object_mut()?;
            }
            current.remove(last)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_get_set_and_remove() {
        let mut event = json!({"a": {"b": 1}, "s": "x"}).as_object().unwrap().clone();
        assert_eq!(get(&event, "a.b"), Some(&json!(1)));
        assert_eq!(get(&event, "a.c"), None);
        assert_eq!(get(&event, "s.x"), None);
        set(&mut event, "out.geo.city", json!("Paris")).unwrap();
        assert_eq!(get(&event, "out.geo.city"), Some(&json!("Paris")));
        assert!(
            set(&mut event, "s.inner", json!(1)).is_err(),
            "never overwrites data"
        );
        assert_eq!(remove(&mut event, "a.b"), Some(json!(1)));
        assert_eq!(remove(&mut event, "a.b"), None);
        assert_eq!(
            Value::Object(event),
            json!({"a": {}, "s": "x", "out": {"geo": {"city": "Paris"}}})
        );
    }
}
