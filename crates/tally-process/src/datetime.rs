//! `keen:date_time_parser`: an ISO-8601 timestamp to its calendar parts, in the timestamp's own
//! offset (reference §9): `millisecond, second, minute, hour, day_of_week` (ISO, Monday = 1),
//! `day_of_week_string, day_of_month, week` (ISO week), `month, year, timezone_offset` (minutes
//! east of UTC).

use chrono::{DateTime, Datelike, FixedOffset, NaiveDateTime, Timelike, Weekday};
use serde_json::{Value, json};

/// The parts of `text`, or `None` if it is not a timestamp.
pub fn parse_date_time(text: &str) -> Option<Value> {
    let text = text.trim();
    let time: DateTime<FixedOffset> = DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
                .map(|naive| naive.and_utc().fixed_offset())
        })?;
    Some(json!({
        "millisecond": time.timestamp_subsec_millis(),
        "second": time.second(),
        "minute": time.minute(),
        "hour": time.hour(),
        "day_of_week": time.weekday().number_from_monday(),
        "day_of_week_string": weekday_name(time.weekday()),
        "day_of_month": time.day(),
        "week": time.iso_week().week(),
        "month": time.month(),
        "year": time.year(),
        "timezone_offset": time.offset().local_minus_utc() / 60,
    }))
}

fn weekday_name(day: Weekday) -> &'static str {
    match day {
        Weekday::Mon => "Monday",
        Weekday::Tue => "Tuesday",
        Weekday::Wed => "Wednesday",
        Weekday::Thu => "Thursday",
        Weekday::Fri => "Friday",
        Weekday::Sat => "Saturday",
        Weekday::Sun => "Sunday",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_in_the_timestamps_own_offset() {
        assert_eq!(
            parse_date_time("2026-03-08T23:30:05.123-05:00"),
            Some(
                json!({"millisecond": 123, "second": 5, "minute": 30, "hour": 23, "day_of_week": 7,
                        "day_of_week_string": "Sunday", "day_of_month": 8, "week": 10, "month": 3,
                        "year": 2026, "timezone_offset": -300})
            )
        );
        let utc = parse_date_time("2024-12-30T00:00:00.000Z").unwrap();
        assert_eq!(
            (
                utc["week"].clone(),
                utc["year"].clone(),
                utc["day_of_week_string"].clone()
            ),
            (json!(1), json!(2024), json!("Monday"))
        );
        assert_eq!(
            parse_date_time("2024-02-29 12:00:00").unwrap()["timezone_offset"],
            json!(0)
        );
        assert_eq!(parse_date_time("yesterday"), None);
    }
}
