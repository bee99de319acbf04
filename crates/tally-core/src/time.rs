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
    let mut out = String::with_capacity(24);
    write_timestamp_ms(&mut out, ms);
    out
}

/// Appends Unix milliseconds as `2014-08-12T09:19:28.605Z` to `out`. This is on the ingest hot
/// path (every event is stamped twice), so it does civil-calendar arithmetic directly instead of
/// going through a general formatter. Years outside 0..=9999 are clamped to the range.
pub fn write_timestamp_ms(out: &mut String, ms: i64) {
    const MIN_MS: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = ms.clamp(MIN_MS, MAX_MS);
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let mut buf = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: i64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, in_day / 3_600_000);
    put(14, 2, in_day / 60_000 % 60);
    put(17, 2, in_day / 1000 % 60);
    put(20, 3, in_day % 1000);
    out.push_str(std::str::from_utf8(&buf).expect("ASCII digits"));
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01, in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
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

    proptest::proptest! {
        #[test]
        fn the_fast_formatter_agrees_with_chrono(ms in -62_167_219_200_000i64..253_402_300_799_999) {
            let expected = Utc.timestamp_millis_opt(ms).unwrap().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
            proptest::prop_assert_eq!(format_timestamp_ms(ms), expected);
        }
    }

    #[test]
    fn refuses_what_is_not_a_timestamp() {
        for bad in [
            "",
            "yesterday",
            "2014-13-01T00:00:00Z",
            "12345",
            "2014-08-12T25:00:00Z",
        ] {
            assert_eq!(parse_timestamp_ms(bad), None, "{bad}");
        }
    }
}
