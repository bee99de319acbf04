//! `keen:url_parser`: a URL to `{"protocol","domain","path","anchor","query_string":{k: v}}`,
//! with missing parts left out.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;

use crate::jsontext::ObjectWriter;

/// The parsed form of `text`, or `None` if it is not an absolute URL with a host.
pub fn parse_url(text: &str) -> Option<Value> {
    let url = url::Url::parse(text.trim()).ok()?;
    let json = url_json(&url)?;
    Some(serde_json::from_str(&json).expect("url_json writes valid JSON"))
}

/// The add-on's output for an already parsed URL, as JSON text; `None` without a host.
/// `query_string` holds each parameter once (the last value given), keys in sorted order.
pub fn url_json(url: &url::Url) -> Option<Arc<str>> {
    let domain = url.host_str()?;
    let mut out = ObjectWriter::new();
    out.string("protocol", url.scheme());
    out.string("domain", domain);
    out.string("path", url.path());
    out.string_if_any("anchor", url.fragment());
    out.begin_object("query_string");
    let mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = url.query_pairs().collect();
    // Stable: a repeated name keeps its values in order, and the last one is written.
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (name, value)) in pairs.iter().enumerate() {
        if pairs.get(i + 1).is_some_and(|next| next.0 == *name) {
            continue;
        }
        out.string_key(name);
        out.string_value(value);
    }
    out.end_object();
    Some(out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keens_documented_example() {
        assert_eq!(
            parse_url("http://my-website.com/cool/link?source=twitter&foo=bar/#title"),
            Some(
                json!({"protocol": "http", "domain": "my-website.com", "path": "/cool/link", "anchor": "title",
                        "query_string": {"source": "twitter", "foo": "bar/"}})
            )
        );
        assert_eq!(
            parse_url("https://shop.example.com/docs?utm_source=ads&q=a%20b"),
            Some(
                json!({"protocol": "https", "domain": "shop.example.com", "path": "/docs",
                        "query_string": {"utm_source": "ads", "q": "a b"}})
            )
        );
        assert_eq!(
            parse_url("https://a.example/p?x=1&b=2&x=3&empty="),
            Some(json!({"protocol": "https", "domain": "a.example", "path": "/p",
                        "query_string": {"b": "2", "x": "3", "empty": ""}}))
        );
        for bad in ["", "not a url", "/relative/path", "mailto:someone@example.com"] {
            assert_eq!(parse_url(bad), None, "{bad}");
        }
    }
}
