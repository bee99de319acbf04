//! `keen:url_parser`: a URL to `{"protocol","domain","path","anchor","query_string":{k: v}}`,
//! with missing parts left out.

use serde_json::{Map, Value};

/// The parsed form of `text`, or `None` if it is not an absolute URL with a host.
pub fn parse_url(text: &str) -> Option<Value> {
    let url = url::Url::parse(text.trim()).ok()?;
    let domain = url.host_str()?;
    let mut out = Map::new();
    out.insert("protocol".into(), Value::String(url.scheme().to_string()));
    out.insert("domain".into(), Value::String(domain.to_string()));
    out.insert("path".into(), Value::String(url.path().to_string()));
    if let Some(fragment) = url.fragment().filter(|f| !f.is_empty()) {
        out.insert("anchor".into(), Value::String(fragment.to_string()));
    }
    let mut query = Map::new();
    for (name, value) in url.query_pairs() {
        query.insert(name.into_owned(), Value::String(value.into_owned()));
    }
    out.insert("query_string".into(), Value::Object(query));
    Some(Value::Object(out))
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
        for bad in ["", "not a url", "/relative/path", "mailto:someone@example.com"] {
            assert_eq!(parse_url(bad), None, "{bad}");
        }
    }
}
