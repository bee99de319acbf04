//! Keen timestamps: ISO 8601 in, ISO 8601 with milliseconds in UTC out.
//!
//! Clients may send `keen.timestamp` with an offset (`2014-08-12T09:19:28.605+02:00`), with `Z`, or
//! without an offset, which means UTC. Tally stores every timestamp as UTC milliseconds and prints
//! it as `2014-08-12T07:19:28.605Z`.

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// Parses an ISO 8601 timestamp into Unix milliseconds. Accepts a `T` or a space between date and
/// time, optional fractional seconds, and an optional `Z` or `±HH:MM` offset (none means UTC). A
/// bare date means its midnight UTC. Years must be 1 to 9999.
pub fn parse_timestamp_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    let parsed = if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
        Some(dt.with_timezone(&Utc))
    } else if let Ok(dt) = DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z") {
        Some(dt.with_timezone(&Utc))
    } else if let Some(naive) = parse_naive(text) {
        Some(Utc.from_utc_datetime(&naive))
    } else {
        NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|naive| Utc.from_utc_datetime(&naive))
    }?;
    let year = chrono::Datelike::year(&parsed);
    if !(1..=9999).contains(&year) {
        return None;
    }
    Some(parsed.timestamp_millis())
}

fn parse_naive(text: &str) -> Option<NaiveDateTime> {
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
}

/// Prints Unix milliseconds as Keen does: `2014-08-12T09:19:28.605Z`.
pub fn format_timestamp_ms(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(dt) => dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_clients_send() {
        let z = parse_timestamp_ms("2014-08-12T09:19:28.605Z").unwrap();
        assert_eq!(format_timestamp_ms(z), "2014-08-12T09:19:28.605Z");
        assert_eq!(parse_timestamp_ms("2014-08-12T09:19:28.605"), Some(z));
        assert_eq!(parse_timestamp_ms("2014-08-12 09:19:28.605"), Some(z));
        assert_eq!(parse_timestamp_ms("2014-08-12T11:19:28.605+02:00"), Some(z));
        assert_eq!(parse_timestamp_ms("2014-08-12T11:19:28.605+0200"), Some(z));
        assert_eq!(
            format_timestamp_ms(parse_timestamp_ms("2014-08-12").unwrap()),
            "2014-08-12T00:00:00.000Z"
        );
        assert_eq!(
            format_timestamp_ms(parse_timestamp_ms("2014-08-12T09:19:28.605123456Z").unwrap()),
            "2014-08-12T09:19:28.605Z"
        );
    }

    #[test]
    fn refuses_what_is_not_a_timestamp() {
        for bad in ["", "yesterday", "2014-13-01T00:00:00Z", "12345", "2014-08-12T25:00:00Z"] {
            assert_eq!(parse_timestamp_ms(bad), None, "{bad}");
        }
    }
}
