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
use serde_json::value::RawValue;
use tally_core::error::{ErrorCode, EventError};

/// Checks that a request's `Content-Type` can carry JSON text.
pub fn check_content_type(content_type: Option<&str>) -> Result<(), EventError> {
    let Some(content_type) = content_type else {
        return Ok(());
    };
    let mut parts = content_type.split(';');
    let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let json_like = mime.is_empty()
        || mime == "application/json"
        || (mime.starts_with("application/") && mime.ends_with("+json"))
        || mime == "text/plain"
        || mime == "text/json"
        || mime == "application/x-www-form-urlencoded";
    if !json_like {
        return Err(EventError::new(
            ErrorCode::UnsupportedContentType,
            format!("Content-Type '{mime}' cannot carry events; send JSON as application/json."),
        ));
    }
    for param in parts {
        if let Some((name, value)) = param.split_once('=') {
            let value = value.trim().trim_matches('"').to_ascii_lowercase();
            if name.trim().eq_ignore_ascii_case("charset") && value != "utf-8" && value != "utf8" {
                return Err(EventError::new(
                    ErrorCode::UnsupportedContentType,
                    format!("charset '{value}' is not supported; send UTF-8."),
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

/// A batch body split into its collections, each a list of raw (not yet validated) events, in the
/// order they were sent.
pub type RawBatch<'a> = IndexMap<String, Vec<&'a RawValue>>;

/// Splits a batch body `{"collection": [event, ...], ...}`. Anything else is an
/// `InvalidBatchError`; the events themselves are validated one by one later.
pub fn parse_batch(body: &[u8]) -> Result<RawBatch<'_>, EventError> {
    let text = body_text(body, ErrorCode::InvalidBatch)?;
    serde_json::from_str::<RawBatch<'_>>(text).map_err(|e| {
        EventError::new(
            ErrorCode::InvalidBatch,
            format!(
                "A batch must be a JSON object whose values are lists of events, e.g. {{\"purchases\": [{{\"price\": 5}}]}} ({e})."
            ),
        )
    })
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
        ] {
            assert!(check_content_type(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "multipart/form-data; boundary=x",
            "image/png",
            "application/json; charset=utf-16",
        ] {
            assert_eq!(
                check_content_type(Some(bad)).unwrap_err().code,
                ErrorCode::UnsupportedContentType
            );
        }
    }

    #[test]
    fn batches_keep_their_order_and_refuse_other_shapes() {
        let batch = parse_batch(br#"{"b":[{"x":1}],"a":[{"y":2},3]}"#).unwrap();
        assert_eq!(batch.keys().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(batch["a"][1].get(), "3");
        for bad in [&b"[1]"[..], b"{\"a\":{}}", b"{\"a\":[1,]}", b"\xff", b"5"] {
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
