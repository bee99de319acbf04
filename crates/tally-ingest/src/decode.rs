//! Decoding request bodies into event bytes: content types, the batch envelope, and the base64
//! `data` parameter of the image-beacon GET.
//!
//! Keen's clients send JSON as `application/json`, and `navigator.sendBeacon` sends the same JSON
//! as `text/plain`; both are accepted, as is a missing content type. Types that cannot carry JSON
//! text (`multipart/form-data`, images, ...) and charsets other than UTF-8 are refused.

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use indexmap::IndexMap;
use tally_core::error::{ErrorCode, EventError};

/// Checks that a request's `Content-Type` can carry JSON text.
pub fn check_content_type(content_type: Option<&str>) -> Result<(), EventError> {
    let Some(content_type) = content_type else {
        return Ok(());
    };
    let mut parts = content_type.split(';');
    // Compared without lowercasing into a new string: this runs for every request that sends
    // events.
    let mime = parts.next().unwrap_or("").trim();
    let is = |name: &str| mime.eq_ignore_ascii_case(name);
    // `get` is None off a character boundary, where no ASCII prefix or suffix can match.
    let starts = |prefix: &str| {
        mime.get(..prefix.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(prefix))
    };
    let ends = |suffix: &str| {
        (mime.len().checked_sub(suffix.len()))
            .and_then(|at| mime.get(at..))
            .is_some_and(|t| t.eq_ignore_ascii_case(suffix))
    };
    let json_like = mime.is_empty()
        || is("application/json")
        || (starts("application/") && ends("+json"))
        || is("text/plain")
        || is("text/json")
        || is("application/x-www-form-urlencoded");
    if !json_like {
        return Err(EventError::new(
            ErrorCode::UnsupportedContentType,
            format!(
                "Content-Type '{}' cannot carry events; send JSON as application/json.",
                mime.to_ascii_lowercase()
            ),
        ));
    }
    for param in parts {
        if let Some((name, value)) = param.split_once('=') {
            let value = value.trim().trim_matches('"');
            let utf8 = value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8");
            if name.trim().eq_ignore_ascii_case("charset") && !utf8 {
                return Err(EventError::new(
                    ErrorCode::UnsupportedContentType,
                    format!(
                        "charset '{}' is not supported; send UTF-8.",
                        value.to_ascii_lowercase()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks that a body is UTF-8 text, once: everything parsed from it afterwards is read as text
/// (`serde_json::from_str`), which does not check each string again (checking the body and then
/// every string while splitting the batch and again while validating each event was three passes
/// over every byte). `code` is the error code to use otherwise.
pub fn body_text(body: &[u8], code: ErrorCode) -> Result<&str, EventError> {
    std::str::from_utf8(body)
        .map_err(|e| EventError::new(code, format!("Request body is not valid UTF-8 ({e}).")))
}

/// A batch body split into its collections, each a list of raw (not yet validated) events' text,
/// in the order they were sent. A collection named twice keeps one list, in body order.
pub type RawBatch<'a> = IndexMap<String, Vec<&'a str>>;

/// Splits a batch body `{"collection": [event, ...], ...}` into each event's text. Anything
/// else is an `InvalidBatchError`.
///
/// Only the envelope is parsed here. Each event's extent is found by a structural scan (strings
/// skipped with `memchr`, brackets counted), not by parsing it: every event is parsed and
/// validated next ([`crate::validate::check_event_text`]), and a JSON parse here as well cost
/// ingest 6–15% of its CPU per batch (serde's `RawValue`; measured with the process stage off).
/// So an event whose text is not JSON passes this split; the ingestor finds it
/// ([`crate::validate::json_syntax`], the check `RawValue` made) and refuses the whole batch,
/// as it would have been refused here.
pub fn parse_batch(body: &[u8]) -> Result<RawBatch<'_>, EventError> {
    let text = body_text(body, ErrorCode::InvalidBatch)?;
    split_batch(text).map_err(|why| invalid_batch(&why))
}

/// The `InvalidBatchError` for a body that is not a batch, saying why.
pub fn invalid_batch(why: &str) -> EventError {
    EventError::new(
        ErrorCode::InvalidBatch,
        format!(
            "A batch must be a JSON object whose values are lists of events, e.g. {{\"purchases\": [{{\"price\": 5}}]}} ({why})."
        ),
    )
}

fn split_batch(text: &str) -> Result<RawBatch<'_>, String> {
    let mut scan = Scan {
        text: text.as_bytes(),
        at: 0,
    };
    let mut batch = RawBatch::new();
    scan.expect(b'{', "the body must be an object")?;
    if !scan.eat(b'}') {
        loop {
            let name = scan.name(text)?;
            scan.expect(b':', "expected ':' after a collection name")?;
            scan.expect(b'[', "each collection's value must be a list of events")?;
            let events = batch.entry(name).or_default();
            if !scan.eat(b']') {
                loop {
                    scan.skip_space();
                    let start = scan.at;
                    scan.skip_value()?;
                    events.push(&text[start..scan.at]);
                    if scan.eat(b']') {
                        break;
                    }
                    scan.expect(b',', "expected ',' or ']' after an event")?;
                }
            }
            if scan.eat(b'}') {
                break;
            }
            scan.expect(b',', "expected ',' or '}' after a collection's list")?;
        }
    }
    scan.skip_space();
    if scan.at != scan.text.len() {
        return Err(scan.error("trailing characters after the batch"));
    }
    Ok(batch)
}

/// A cursor over a batch body's bytes for [`split_batch`].
struct Scan<'a> {
    text: &'a [u8],
    at: usize,
}

impl Scan<'_> {
    fn error(&self, what: &str) -> String {
        format!("{what}, at byte {}", self.at)
    }

    fn skip_space(&mut self) {
        while self
            .text
            .get(self.at)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.at += 1;
        }
    }

    /// Skips whitespace, then takes `byte` if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        self.skip_space();
        let next = self.text.get(self.at) == Some(&byte);
        self.at += usize::from(next);
        next
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<(), String> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    /// A collection name: a JSON string, decoded (names are short, so serde does it, escapes and
    /// all).
    fn name(&mut self, text: &str) -> Result<String, String> {
        self.skip_space();
        if self.text.get(self.at) != Some(&b'"') {
            return Err(self.error("expected a collection name"));
        }
        let start = self.at;
        self.skip_string()?;
        serde_json::from_str(&text[start..self.at]).map_err(|e| format!("bad collection name: {e}"))
    }

    /// From an opening quote to just past its closing quote.
    fn skip_string(&mut self) -> Result<(), String> {
        let mut at = self.at + 1;
        loop {
            match memchr::memchr2(b'"', b'\\', self.text.get(at..).unwrap_or_default()) {
                None => return Err(self.error("a string is not closed")),
                Some(i) if self.text[at + i] == b'\\' => at += i + 2,
                Some(i) => {
                    self.at = at + i + 1;
                    return Ok(());
                }
            }
        }
    }

    /// Past one event: a string, an object or array (brackets counted outside strings), or
    /// anything else up to the next delimiter. What it holds is not checked here.
    fn skip_value(&mut self) -> Result<(), String> {
        self.skip_space();
        match self.text.get(self.at) {
            None => Err(self.error("the body ends inside a list")),
            Some(b'"') => self.skip_string(),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                loop {
                    match self.text.get(self.at) {
                        None => return Err(self.error("the body ends inside an event")),
                        Some(b'"') => {
                            self.skip_string()?;
                            continue;
                        }
                        Some(b'{' | b'[') => depth += 1,
                        Some(b'}' | b']') => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Ok(());
                            }
                        }
                        Some(_) => {}
                    }
                    self.at += 1;
                }
            }
            Some(_) => {
                let rest = &self.text[self.at..];
                let len = rest
                    .iter()
                    .position(|b| matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r'))
                    .unwrap_or(rest.len());
                if len == 0 {
                    return Err(self.error("expected an event"));
                }
                self.at += len;
                Ok(())
            }
        }
    }
}

/// Both base64 alphabets are mapped onto the standard one before decoding, which accepts padding
/// or its absence.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes the image beacon's `data` parameter: standard or URL-safe base64, padded or not, with
/// `+` that arrived as a space (Python's client does not escape it) turned back into `+`, and line
/// breaks ignored.
pub fn decode_beacon_data(data: &str) -> Result<Vec<u8>, EventError> {
    let normalized: String = data
        .chars()
        .filter(|c| *c != '\n' && *c != '\r')
        .map(|c| match c {
            ' ' => '+',
            '-' => '+',
            '_' => '/',
            other => other,
        })
        .collect();
    LENIENT.decode(normalized.trim_end_matches('=')).map_err(|e| {
        EventError::new(
            ErrorCode::InvalidEvent,
            format!("The 'data' parameter is not valid base64 ({e})."),
        )
    })
}

/// Encodes bytes as standard base64; for tests and the bench tool.
pub fn encode_base64(bytes: &[u8]) -> String {
    general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::json_syntax;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    use proptest::prelude::*;

    #[test]
    fn content_types_that_carry_json_are_accepted() {
        for ok in [
            None,
            Some("application/json"),
            Some("application/json; charset=utf-8"),
            Some("text/plain;charset=UTF-8"),
            Some("application/vnd.api+json"),
            Some("Application/JSON; Charset=\"UTF8\""),
            Some("APPLICATION/VND.API+JSON"),
            Some(" text/json "),
        ] {
            assert!(check_content_type(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "multipart/form-data; boundary=x",
            "image/png",
            "application/json; charset=utf-16",
            "application/+jsonx",
            "applicatioé/+json",
        ] {
            assert_eq!(
                check_content_type(Some(bad)).unwrap_err().code,
                ErrorCode::UnsupportedContentType
            );
        }
        let refused = check_content_type(Some("Image/PNG")).unwrap_err();
        assert!(refused.message.contains("'image/png'"), "{}", refused.message);
    }

    /// The rule as first written, lowercasing into new strings: the oracle for the one that
    /// compares in place.
    fn content_type_carries_json(content_type: &str) -> bool {
        let mut parts = content_type.split(';');
        let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let json_like = mime.is_empty()
            || mime == "application/json"
            || (mime.starts_with("application/") && mime.ends_with("+json"))
            || mime == "text/plain"
            || mime == "text/json"
            || mime == "application/x-www-form-urlencoded";
        json_like
            && parts.all(|param| match param.split_once('=') {
                Some((name, value)) => {
                    let value = value.trim().trim_matches('"').to_ascii_lowercase();
                    !name.trim().eq_ignore_ascii_case("charset") || value == "utf-8" || value == "utf8"
                }
                None => true,
            })
    }

    proptest! {
        #[test]
        fn content_types_are_judged_as_the_lowercasing_rule_does(
            content_type in "[ ]?(application|APPLICATION|text|Text|image|applicatioé)/(json|JSON|plain|vnd\\.x\\+json|x-www-form-urlencoded|\\+json|é\\+JSON|png)[ ]?(;[ ]?(charset|CHARSET|boundary)=\"?(utf-8|UTF8|utf-16|x)\"?){0,2}",
            arbitrary in "\\PC{0,40}",
        ) {
            for text in [content_type.as_str(), arbitrary.as_str()] {
                prop_assert_eq!(
                    check_content_type(Some(text)).is_ok(),
                    content_type_carries_json(text),
                    "{:?}",
                    text
                );
            }
        }
    }

    /// What serde makes of a batch, spans and all: the oracle the split is checked against. A
    /// collection named twice keeps one list, in body order, as the split does.
    fn serde_split(text: &str) -> Option<Vec<(String, Vec<&str>)>> {
        use serde::de::{Deserializer as _, MapAccess, Visitor};
        use serde_json::value::RawValue;
        struct Batch;
        impl<'de> Visitor<'de> for Batch {
            type Value = Vec<(String, Vec<&'de str>)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a batch")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, Vec<&'de str>)> = Vec::new();
                while let Some((name, events)) = map.next_entry::<String, Vec<&'de RawValue>>()? {
                    let events = events.into_iter().map(RawValue::get);
                    match out.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, list)) => list.extend(events),
                        None => out.push((name, events.collect())),
                    }
                }
                Ok(out)
            }
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let batch = (&mut de).deserialize_map(Batch).ok()?;
        de.end().ok()?;
        Some(batch)
    }

    fn split(text: &str) -> Option<Vec<(String, Vec<&str>)>> {
        split_batch(text).ok().map(|b| b.into_iter().collect())
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let text = "[a-z\"\\\\\u{e9}\\[\\]{},: \n]{0,6}";
        crate::validate::tests::arb_json_from(text, text)
    }

    fn batch_text() -> impl Strategy<Value = String> {
        (
            prop::collection::btree_map(
                "[a-z\"\\\\ ]{0,4}",
                prop::collection::vec(json_value(), 0..5),
                0..4,
            ),
            any::<bool>(),
        )
            .prop_map(|(batch, pretty)| {
                let value = serde_json::to_value(batch).expect("a map");
                if pretty {
                    serde_json::to_string_pretty(&value).expect("text")
                } else {
                    value.to_string()
                }
            })
    }

    proptest! {
        /// On any batch, the split finds the events serde finds, with the same text.
        #[test]
        fn the_split_finds_what_serde_finds(text in batch_text()) {
            prop_assert_eq!(split(&text), serde_split(&text));
        }

        /// On a batch with a byte cut out or put in, the split never panics, agrees with serde
        /// whenever serde reads a batch, and reads one serde refuses only when some event's own
        /// text is not JSON by [`json_syntax`] (the check the ingestor then makes, which refuses
        /// the batch): together, the split and that check accept exactly what serde did.
        #[test]
        fn the_split_of_damaged_batches_fails_safe(
            text in batch_text(),
            at in any::<prop::sample::Index>(),
            insert in prop::option::of(prop::sample::select(&b"{}[]\",:\\ 1ae"[..])),
        ) {
            let mut bytes = text.into_bytes();
            let at = at.index(bytes.len() + 1);
            match insert {
                Some(b) => bytes.insert(at, b),
                None if at < bytes.len() => { bytes.remove(at); }
                None => {}
            }
            let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
            match (split(&text), serde_split(&text)) {
                (Some(ours), Some(serde)) => {
                    prop_assert!(ours.iter().flat_map(|(_, events)| events).all(|e| json_syntax(e).is_ok()));
                    prop_assert_eq!(ours, serde);
                }
                (None, Some(serde)) => prop_assert!(false, "refused a batch serde reads: {serde:?}"),
                (Some(ours), None) => {
                    let malformed = ours.iter().flat_map(|(_, events)| events).any(|e| json_syntax(e).is_err());
                    prop_assert!(malformed, "split a body serde refuses: {text:?}");
                }
                (None, None) => {}
            }
        }
    }

    #[test]
    fn a_collection_named_twice_keeps_all_its_events_in_order() {
        let batch = parse_batch(br#"{"a":[1],"b":[2],"a":[3]}"#).unwrap();
        assert_eq!(
            batch.into_iter().collect::<Vec<_>>(),
            [("a".into(), vec!["1", "3"]), ("b".into(), vec!["2"])]
        );
    }

    #[test]
    fn batches_keep_their_order_and_refuse_other_shapes() {
        let batch = parse_batch(br#"{"b":[{"x":1}],"a":[{"y":2},3]}"#).unwrap();
        assert_eq!(batch.keys().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(batch["a"][1], "3");
        for bad in [
            &b"[1]"[..],
            b"{\"a\":{}}",
            b"{\"a\":[1,]}",
            b"\xff",
            b"5",
            b"",
            b"{",
            b"{\"a\":[{\"b\":\"}]}",
            b"{\"a\":[{}]}}",
            b"{\"a\":[{}] x}",
            b"{\"a\" [1]}",
            b"{a:[1]}",
            b"{\"a\":[{\"b\":[1}",
        ] {
            assert_eq!(parse_batch(bad).unwrap_err().code, ErrorCode::InvalidBatch);
        }
    }

    proptest! {
        #[test]
        fn beacon_data_decodes_in_every_client_encoding(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            for encoded in [
                STANDARD.encode(&bytes),
                STANDARD.encode(&bytes).replace('+', " "),
                URL_SAFE.encode(&bytes),
                URL_SAFE_NO_PAD.encode(&bytes),
            ] {
                prop_assert_eq!(decode_beacon_data(&encoded).unwrap(), bytes.clone());
            }
        }
    }

    #[test]
    fn bad_base64_is_an_invalid_event() {
        assert_eq!(
            decode_beacon_data("!!!").unwrap_err().code,
            ErrorCode::InvalidEvent
        );
    }
}
