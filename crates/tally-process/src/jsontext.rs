//! Writing an add-on's output object straight as JSON text.
//!
//! Add-on outputs are written into the stored event as text (see
//! [`EventAccess::set_json`](crate::access::EventAccess::set_json)), so building a `serde_json`
//! tree for each output only to serialise and free it again was pure cost: the GeoIP location,
//! the parsed URL and the referrer classification are written with this instead.

use std::sync::Arc;

/// A JSON object being written member by member. Keys are written as given (they are the
/// add-ons' own fixed names, or go through [`ObjectWriter::string_key`]); values are escaped.
pub(crate) struct ObjectWriter {
    out: Vec<u8>,
    /// Whether the next member needs a comma before it (false right after an opening brace).
    comma: bool,
}

impl ObjectWriter {
    pub(crate) fn new() -> Self {
        let mut out = Vec::with_capacity(192);
        out.push(b'{');
        Self { out, comma: false }
    }

    #[inline]
    fn separator(&mut self) {
        if self.comma {
            self.out.push(b',');
        }
        self.comma = true;
    }

    /// A fixed key (no escaping: callers pass plain ASCII names).
    #[inline]
    fn key(&mut self, key: &str) {
        self.separator();
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A key that comes from the data (a query parameter name), escaped.
    #[inline]
    pub(crate) fn string_key(&mut self, key: &str) {
        self.separator();
        serde_json::to_writer(&mut self.out, key).expect("a string serialises");
        self.out.push(b':');
    }

    /// A bare string value, after [`ObjectWriter::string_key`].
    #[inline]
    pub(crate) fn string_value(&mut self, value: &str) {
        serde_json::to_writer(&mut self.out, value).expect("a string serialises");
    }

    /// A string member.
    #[inline]
    pub(crate) fn string(&mut self, key: &str, value: &str) {
        self.key(key);
        self.string_value(value);
    }

    /// A string member, left out when the value is missing or empty.
    #[inline]
    pub(crate) fn string_if_any(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            self.string(key, value);
        }
    }

    /// A string member, `null` when the value is missing.
    #[inline]
    pub(crate) fn string_or_null(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.string(key, value),
            None => {
                self.key(key);
                self.out.extend_from_slice(b"null");
            }
        }
    }

    /// A member holding a two-number array (`[longitude, latitude]`).
    #[inline]
    pub(crate) fn pair(&mut self, key: &str, first: f64, second: f64) {
        self.key(key);
        self.out.push(b'[');
        serde_json::to_writer(&mut self.out, &first).expect("a number serialises");
        self.out.push(b',');
        serde_json::to_writer(&mut self.out, &second).expect("a number serialises");
        self.out.push(b']');
    }

    /// Opens a nested object member; its members follow, then [`ObjectWriter::end_object`].
    #[inline]
    pub(crate) fn begin_object(&mut self, key: &str) {
        self.key(key);
        self.out.push(b'{');
        self.comma = false;
    }

    /// Closes the object opened by [`ObjectWriter::begin_object`].
    #[inline]
    pub(crate) fn end_object(&mut self) {
        self.out.push(b'}');
        self.comma = true;
    }

    /// The finished object.
    #[inline]
    pub(crate) fn finish(mut self) -> Arc<str> {
        self.out.push(b'}');
        String::from_utf8(self.out).expect("JSON text is UTF-8").into()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    #[inline]
    fn writes_valid_json_with_escapes_nulls_and_nesting() {
        let mut out = ObjectWriter::new();
        out.string("a", "quote \" and \\ and \n");
        out.string_if_any("empty", Some(""));
        out.string_if_any("missing", None);
        out.string_or_null("n", None);
        out.begin_object("q");
        out.string_key("k\"ey");
        out.string_value("v");
        out.string_key("x");
        out.string_value("");
        out.end_object();
        out.begin_object("empty_object");
        out.end_object();
        out.pair("coordinates", -0.5, 51.25);
        let text = out.finish();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({"a": "quote \" and \\ and \n", "n": null, "q": {"k\"ey": "v", "x": ""},
                   "empty_object": {}, "coordinates": [-0.5, 51.25]})
        );
    }
}
