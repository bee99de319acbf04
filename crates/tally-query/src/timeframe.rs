//! Time frames, time zones and interval buckets (reference sections 3.1, 3.2 and 9 "Time").
//!
//! Everything here is pure: the current time is a parameter. A query's `timezone` becomes a
//! [`Zone`]; its `timeframe` becomes a [`TimeRange`] in UTC milliseconds ([`resolve_timeframe`]);
//! its `interval` becomes an [`Interval`], and [`buckets`] cuts the range into interval buckets.
//!
//! Unit boundaries (start of a minute, hour, day, Sunday-based week, month, year) are taken in the
//! query's zone. Days, weeks, months and years are calendar units: their boundaries are local
//! midnights, so with a named zone a day may last 23 or 25 hours. A local midnight that does not
//! exist (a DST gap) maps to the first instant after the gap; one that happens twice maps to the
//! earlier instant. Minutes and hours start where the local clock shows `:00` or where the zone's
//! offset changes, so an hour skipped by DST has no bucket and a repeated hour has two, each of
//! real length.

use std::fmt::Write as _;

use chrono::{
    DateTime, Datelike, FixedOffset, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone,
    Timelike,
};
use serde_json::Value;
use tally_core::error::ErrorCode;

use crate::spec::SpecError;

/// A resolved time range `[start_ms, end_ms)` in UTC milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// The query's time zone: an IANA zone (DST-correct) or a fixed offset in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    Named(chrono_tz::Tz),
    Fixed(chrono::FixedOffset),
}

/// Interval units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalUnit {
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

/// `minutely` … `yearly`, or `every_N_<unit>` (N units per bucket, counted from the range start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub every: u32,
    pub unit: IntervalUnit,
}

/// The most buckets one interval query may produce.
pub const MAX_BUCKETS: usize = 100_000;

/// The largest N accepted in `every_N_<unit>`.
pub const MAX_INTERVAL_EVERY: u32 = 1_000_000;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

fn spec_error(code: ErrorCode, message: String) -> SpecError {
    SpecError { code, message }
}

/// Short text of a JSON value for error messages: strings unquoted, the rest as JSON, and long
/// values cut.
fn show(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    const MAX: usize = 200;
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}…")
    } else {
        text
    }
}

impl Default for Zone {
    /// UTC, the zone of a query without `timezone`.
    fn default() -> Self {
        Zone::Named(chrono_tz::Tz::UTC)
    }
}

impl Zone {
    /// The UTC zone.
    pub fn utc() -> Zone {
        Zone::default()
    }

    /// Parses a `timezone` parameter: an IANA name (`"US/Pacific"`, `"UTC"`,
    /// `"America/New_York"`) or an offset from UTC in seconds, as a JSON integer (`-28800`) or a
    /// numeric string (`"-28800"`). Anything else is `InvalidParameter`.
    pub fn parse(value: &Value) -> Result<Zone, SpecError> {
        let bad = || {
            spec_error(
                ErrorCode::InvalidParameter,
                format!(
                    "The 'timezone' parameter must be an IANA time zone name (like \
                     \"US/Pacific\") or an offset from UTC in seconds (like -28800), not '{}'.",
                    show(value)
                ),
            )
        };
        let offset_secs: i64 = match value {
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => i,
                (None, Some(f)) if f.fract() == 0.0 && f.abs() < 86_400.0 => f as i64,
                _ => return Err(bad()),
            },
            Value::String(s) => {
                let s = s.trim();
                if s.is_empty() {
                    return Err(bad());
                }
                if let Ok(i) = s.parse::<i64>() {
                    i
                } else {
                    return s.parse::<chrono_tz::Tz>().map(Zone::Named).map_err(|_| bad());
                }
            }
            _ => return Err(bad()),
        };
        let secs = i32::try_from(offset_secs).map_err(|_| bad())?;
        FixedOffset::east_opt(secs).map(Zone::Fixed).ok_or_else(bad)
    }

    /// The zone's offset from UTC, in seconds east, at the instant `utc_ms`.
    pub fn offset_secs_at(&self, utc_ms: i64) -> i32 {
        match self {
            Zone::Fixed(offset) => offset.local_minus_utc(),
            Zone::Named(tz) => match DateTime::from_timestamp_millis(utc_ms) {
                Some(dt) => tz
                    .offset_from_utc_datetime(&dt.naive_utc())
                    .fix()
                    .local_minus_utc(),
                None => 0,
            },
        }
    }

    /// Prints the instant `utc_ms` as ISO 8601 with milliseconds in this zone:
    /// `2026-03-08T00:00:00.000-05:00`, or with `Z` when the offset in force is zero.
    pub fn format_ms(&self, utc_ms: i64) -> String {
        let offset = self.offset_secs_at(utc_ms);
        let local_ms = utc_ms.saturating_add(i64::from(offset) * 1000);
        let mut out = String::with_capacity(29);
        tally_core::time::write_timestamp_ms(&mut out, local_ms);
        if offset != 0 {
            out.pop(); // the `Z`
            let sign = if offset < 0 { '-' } else { '+' };
            let abs = offset.unsigned_abs();
            let _ = write!(out, "{sign}{:02}:{:02}", abs / 3600, abs / 60 % 60);
            if !abs.is_multiple_of(60) {
                // Only historical local mean times have offsets with seconds.
                let _ = write!(out, ":{:02}", abs % 60);
            }
        }
        out
    }

    /// The local wall-clock time at the instant `utc_ms`, or `None` outside chrono's range.
    fn local(&self, utc_ms: i64) -> Option<NaiveDateTime> {
        let utc = DateTime::from_timestamp_millis(utc_ms)?.naive_utc();
        let offset = self.offset_secs_at(utc_ms);
        utc.checked_add_signed(TimeDelta::seconds(i64::from(offset)))
    }

    /// The instant at which the local wall clock shows `local`. A time skipped by a DST gap maps
    /// to the first instant after the gap; a time shown twice maps to the earlier instant.
    fn instant_of_local(&self, local: NaiveDateTime) -> Option<i64> {
        match self {
            Zone::Fixed(offset) => {
                let utc =
                    local.checked_sub_signed(TimeDelta::seconds(i64::from(offset.local_minus_utc())))?;
                Some(utc.and_utc().timestamp_millis())
            }
            Zone::Named(tz) => match tz.from_local_datetime(&local) {
                LocalResult::Single(dt) => Some(dt.timestamp_millis()),
                LocalResult::Ambiguous(a, b) => Some(a.timestamp_millis().min(b.timestamp_millis())),
                LocalResult::None => self.first_instant_at_or_after(local),
            },
        }
    }

    /// For a local time inside a DST gap: the first instant whose local time is at or after it
    /// (the end of the gap). Binary search between the two offsets in force around it.
    fn first_instant_at_or_after(&self, local: NaiveDateTime) -> Option<i64> {
        let as_utc = local.and_utc().timestamp_millis();
        let before = i64::from(self.offset_secs_at(as_utc.checked_sub(2 * DAY_MS)?)) * 1000;
        let after = i64::from(self.offset_secs_at(as_utc.checked_add(2 * DAY_MS)?)) * 1000;
        let mut lo = as_utc - before.max(after) - HOUR_MS;
        let mut hi = as_utc - before.min(after) + HOUR_MS;
        // Invariant: local(lo) < local, local(hi) >= local (the window spans the gap).
        if self.local(hi)? < local {
            return Some(hi);
        }
        if self.local(lo)? >= local {
            return Some(lo);
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.local(mid)? >= local {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }
}

impl IntervalUnit {
    fn parse(word: &str) -> Option<IntervalUnit> {
        Some(match word {
            "minute" | "minutes" => IntervalUnit::Minute,
            "hour" | "hours" => IntervalUnit::Hour,
            "day" | "days" => IntervalUnit::Day,
            "week" | "weeks" => IntervalUnit::Week,
            "month" | "months" => IntervalUnit::Month,
            "year" | "years" => IntervalUnit::Year,
            _ => return None,
        })
    }

    /// The longest one unit can last, in milliseconds, with generous room for DST changes: used
    /// to bound the number of buckets from below before making any.
    fn max_len_ms(self) -> i64 {
        match self {
            IntervalUnit::Minute => MINUTE_MS,
            IntervalUnit::Hour => HOUR_MS,
            IntervalUnit::Day => 2 * DAY_MS,
            IntervalUnit::Week => 8 * DAY_MS,
            IntervalUnit::Month => 33 * DAY_MS,
            IntervalUnit::Year => 368 * DAY_MS,
        }
    }

    /// Fixed-length units (boundaries found from instants) versus calendar units (local dates).
    fn fixed_ms(self) -> Option<i64> {
        match self {
            IntervalUnit::Minute => Some(MINUTE_MS),
            IntervalUnit::Hour => Some(HOUR_MS),
            _ => None,
        }
    }
}

/// The start of the calendar unit (day, Sunday-based week, month, year) holding local time `t`.
fn floor_calendar(t: NaiveDateTime, unit: IntervalUnit) -> Option<NaiveDateTime> {
    let date = t.date();
    let start = match unit {
        IntervalUnit::Minute | IntervalUnit::Hour | IntervalUnit::Day => date,
        IntervalUnit::Week => {
            date.checked_sub_signed(TimeDelta::days(i64::from(date.weekday().num_days_from_sunday())))?
        }
        IntervalUnit::Month => NaiveDate::from_ymd_opt(date.year(), date.month(), 1)?,
        IntervalUnit::Year => NaiveDate::from_ymd_opt(date.year(), 1, 1)?,
    };
    start.and_hms_opt(0, 0, 0)
}

/// `k` calendar units after the unit start `t` (which is a local midnight on the first day of
/// its unit, so month arithmetic never meets a short month).
fn add_calendar(t: NaiveDateTime, unit: IntervalUnit, k: i64) -> Option<NaiveDateTime> {
    match unit {
        IntervalUnit::Minute => t.checked_add_signed(TimeDelta::try_minutes(k)?),
        IntervalUnit::Hour => t.checked_add_signed(TimeDelta::try_hours(k)?),
        IntervalUnit::Day => t.checked_add_signed(TimeDelta::try_days(k)?),
        IntervalUnit::Week => t.checked_add_signed(TimeDelta::try_weeks(k)?),
        IntervalUnit::Month | IntervalUnit::Year => {
            let months = if unit == IntervalUnit::Year {
                k.checked_mul(12)?
            } else {
                k
            };
            let index = i64::from(t.year())
                .checked_mul(12)?
                .checked_add(i64::from(t.month0()))?
                .checked_add(months)?;
            let year = i32::try_from(index.div_euclid(12)).ok()?;
            let month = u32::try_from(index.rem_euclid(12)).ok()? + 1;
            NaiveDate::from_ymd_opt(year, month, t.day())?.and_hms_opt(0, 0, 0)
        }
    }
}

/// Boundaries of one unit kind in one zone.
struct Grid {
    zone: Zone,
    unit: IntervalUnit,
}

impl Grid {
    /// The instant the unit holding `utc_ms` starts.
    ///
    /// For minutes and hours: the instant minus the time the local clock shows into its minute
    /// or hour, unless the zone's offset changed in between, in which case the unit starts at
    /// that change (so after a half-hour DST shift the clock's `:30` starts a bucket, and a
    /// repeated hour is a bucket of its own).
    fn floor(&self, utc_ms: i64) -> Option<i64> {
        let local = self.zone.local(utc_ms)?;
        let millis = i64::from(local.nanosecond() / 1_000_000);
        let into = match self.unit {
            IntervalUnit::Minute => i64::from(local.second()) * 1000 + millis,
            IntervalUnit::Hour => {
                (i64::from(local.minute()) * 60 + i64::from(local.second())) * 1000 + millis
            }
            unit => return self.zone.instant_of_local(floor_calendar(local, unit)?),
        };
        let candidate = utc_ms - into;
        if matches!(self.zone, Zone::Fixed(_)) {
            return Some(candidate);
        }
        let offset = self.zone.offset_secs_at(utc_ms);
        if self.zone.offset_secs_at(candidate) == offset {
            return Some(candidate);
        }
        // The offset changed within (candidate, utc_ms]: find the change.
        let (mut lo, mut hi) = (candidate, utc_ms);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.zone.offset_secs_at(mid) == offset {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    /// The boundary `k` units (k may be negative) from the unit start `start_ms`.
    fn step(&self, start_ms: i64, k: i64) -> Option<i64> {
        match self.unit.fixed_ms() {
            Some(len) => self.floor(start_ms.checked_add(len.checked_mul(k)?)?),
            None => {
                let local = floor_calendar(self.zone.local(start_ms)?, self.unit)?;
                self.zone.instant_of_local(add_calendar(local, self.unit, k)?)
            }
        }
    }
}

fn timeframe_error(value: &Value, why: &str) -> SpecError {
    let mut message = format!(
        "You sent in an invalid definition for the timeframe: '{}'.",
        show(value)
    );
    if !why.is_empty() {
        message.push(' ');
        message.push_str(why);
    }
    spec_error(ErrorCode::TimeframeDefinition, message)
}

/// Resolves a `timeframe` parameter to a UTC range, given the query's zone and the current time.
///
/// Relative: `this_N_<unit>` covers `[start of the current unit − (N−1) units, start of the next
/// unit)`; `previous_N_<unit>` covers `[start of the current unit − N units, start of the current
/// unit)`; units are minutes, hours, days, weeks (starting Sunday), months, years, singular or
/// plural; `this_day`, `previous_hour`, `today` and `yesterday` mean N = 1. Absolute:
/// `{"start": ISO, "end": ISO}` (start inclusive, end exclusive, no offset means UTC), also as a
/// JSON string holding that object. Anything else is `TimeframeDefinition`.
pub fn resolve_timeframe(value: &Value, zone: Zone, now_ms: i64) -> Result<TimeRange, SpecError> {
    match value {
        Value::Object(object) => absolute(value, object),
        Value::String(text) => {
            let trimmed = text.trim();
            if trimmed.starts_with('{') {
                return match serde_json::from_str::<Value>(trimmed) {
                    Ok(Value::Object(object)) => absolute(value, &object),
                    _ => Err(timeframe_error(value, "It is not a JSON object.")),
                };
            }
            relative(value, trimmed, zone, now_ms)
        }
        _ => Err(timeframe_error(
            value,
            "It must be a relative timeframe like \"this_7_days\" or an object with \"start\" and \"end\".",
        )),
    }
}

fn absolute(value: &Value, object: &serde_json::Map<String, Value>) -> Result<TimeRange, SpecError> {
    let bound = |key: &str| -> Result<i64, SpecError> {
        match object.get(key) {
            Some(Value::String(s)) => tally_core::time::parse_timestamp_ms(s)
                .ok_or_else(|| timeframe_error(value, &format!("Its '{key}' is not an ISO 8601 timestamp."))),
            Some(_) => Err(timeframe_error(
                value,
                &format!("Its '{key}' must be an ISO 8601 timestamp string."),
            )),
            None => Err(timeframe_error(value, &format!("It has no '{key}'."))),
        }
    };
    let start_ms = bound("start")?;
    let end_ms = bound("end")?;
    if start_ms >= end_ms {
        return Err(timeframe_error(value, "Its 'start' must be before its 'end'."));
    }
    Ok(TimeRange { start_ms, end_ms })
}

/// `this`/`previous`, N and the unit of a relative timeframe.
fn parse_relative(text: &str) -> Option<(bool, u64, IntervalUnit)> {
    match text {
        "today" => return Some((true, 1, IntervalUnit::Day)),
        "yesterday" => return Some((false, 1, IntervalUnit::Day)),
        _ => {}
    }
    let (this, rest) = if let Some(rest) = text.strip_prefix("this_") {
        (true, rest)
    } else {
        (false, text.strip_prefix("previous_")?)
    };
    let (n, unit) = match rest.split_once('_') {
        Some((n, unit)) => {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (n.parse::<u64>().ok()?, unit)
        }
        None => (1, rest),
    };
    Some((this, n, IntervalUnit::parse(unit)?))
}

fn relative(value: &Value, text: &str, zone: Zone, now_ms: i64) -> Result<TimeRange, SpecError> {
    let Some((this, n, unit)) = parse_relative(text) else {
        return Err(timeframe_error(value, ""));
    };
    if n == 0 {
        return Err(timeframe_error(value, "N must be at least 1."));
    }
    let too_far = || timeframe_error(value, "It reaches too far back.");
    let n = i64::try_from(n).map_err(|_| too_far())?;
    let grid = Grid { zone, unit };
    let current = grid.floor(now_ms).ok_or_else(too_far)?;
    let (start, end) = if this {
        (grid.step(current, 1 - n), grid.step(current, 1))
    } else {
        (grid.step(current, -n), Some(current))
    };
    let (Some(start_ms), Some(end_ms)) = (start, end) else {
        return Err(too_far());
    };
    // `this_` always holds now, even around odd offset changes.
    let end_ms = if this {
        end_ms.max(now_ms.saturating_add(1))
    } else {
        end_ms
    };
    if start_ms >= end_ms {
        return Err(timeframe_error(value, ""));
    }
    Ok(TimeRange { start_ms, end_ms })
}

impl Interval {
    /// Parses an `interval` parameter: `minutely`, `hourly`, `daily`, `weekly`, `monthly`,
    /// `yearly`, or `every_N_<unit>` with N from 1 to [`MAX_INTERVAL_EVERY`] and a singular or
    /// plural unit. Anything else is `IntervalDefinition`.
    pub fn parse(value: &Value) -> Result<Interval, SpecError> {
        let bad = || {
            spec_error(
                ErrorCode::IntervalDefinition,
                format!(
                    "The 'interval' parameter must be one of minutely, hourly, daily, weekly, \
                     monthly, yearly or every_N_<minutes|hours|days|weeks|months|years> with N \
                     from 1 to {MAX_INTERVAL_EVERY}, not '{}'.",
                    show(value)
                ),
            )
        };
        let Value::String(text) = value else {
            return Err(bad());
        };
        let unit = match text.trim() {
            "minutely" => Some(IntervalUnit::Minute),
            "hourly" => Some(IntervalUnit::Hour),
            "daily" => Some(IntervalUnit::Day),
            "weekly" => Some(IntervalUnit::Week),
            "monthly" => Some(IntervalUnit::Month),
            "yearly" => Some(IntervalUnit::Year),
            _ => None,
        };
        if let Some(unit) = unit {
            return Ok(Interval { every: 1, unit });
        }
        let rest = text.trim().strip_prefix("every_").ok_or_else(bad)?;
        let (n, unit) = rest.split_once('_').ok_or_else(bad)?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let every: u32 = n.parse().map_err(|_| bad())?;
        if every == 0 || every > MAX_INTERVAL_EVERY {
            return Err(bad());
        }
        let unit = IntervalUnit::parse(unit).ok_or_else(bad)?;
        Ok(Interval { every, unit })
    }
}

fn too_many_buckets() -> SpecError {
    spec_error(
        ErrorCode::IntervalDefinition,
        format!(
            "The 'interval' parameter would cut the timeframe into more than {MAX_BUCKETS} \
             buckets; use a longer interval or a shorter timeframe."
        ),
    )
}

/// Cuts `range` into interval buckets that partition it exactly, in order.
///
/// Boundaries are unit boundaries in `zone`; with `every_N_<unit>`, every Nth boundary counted
/// from the start of the unit holding `range.start_ms`. The first bucket starts at the range start
/// and the last ends at the range end, even mid-unit. An empty range gives no buckets. More than
/// [`MAX_BUCKETS`] buckets is `IntervalDefinition`, found before making them.
pub fn buckets(range: TimeRange, interval: Interval, zone: Zone) -> Result<Vec<TimeRange>, SpecError> {
    let TimeRange { start_ms, end_ms } = range;
    if start_ms >= end_ms {
        return Ok(Vec::new());
    }
    let every = i64::from(interval.every.max(1));
    // A lower bound on the count: the range length over the longest a bucket can be.
    let max_bucket_ms = interval.unit.max_len_ms().saturating_mul(every);
    let duration = (i128::from(end_ms) - i128::from(start_ms)) as u128;
    let lower_bound = duration / max_bucket_ms as u128;
    if lower_bound > MAX_BUCKETS as u128 {
        return Err(too_many_buckets());
    }
    let out_of_range = || {
        spec_error(
            ErrorCode::TimeframeDefinition,
            "The 'timeframe' parameter is outside the supported range of dates.".to_string(),
        )
    };
    let grid = Grid {
        zone,
        unit: interval.unit,
    };
    let origin = grid.floor(start_ms).ok_or_else(out_of_range)?;
    let mut out = Vec::with_capacity(lower_bound as usize + 2);
    let mut bucket_start = start_ms;
    let mut previous_boundary = origin;
    let mut k: i64 = 0;
    let mut stalled = 0u32;
    loop {
        k += 1;
        let boundary = match interval.unit.fixed_ms() {
            // Step from the last boundary and re-align, so a sub-hour offset change cannot
            // shift later boundaries.
            Some(_) => grid.step(previous_boundary, every),
            None => k.checked_mul(every).and_then(|steps| grid.step(origin, steps)),
        };
        let Some(boundary) = boundary else {
            // Past chrono's range: the rest of the range is one bucket.
            out.push(TimeRange {
                start_ms: bucket_start,
                end_ms,
            });
            break;
        };
        if boundary <= previous_boundary {
            // A calendar day skipped entirely (Pacific/Apia, 2011-12-30) starts where the next
            // one does: no bucket of its own. Only a broken zone could do this often.
            stalled += 1;
            if stalled > 1_000 {
                return Err(out_of_range());
            }
            continue;
        }
        previous_boundary = boundary;
        if boundary <= bucket_start {
            continue;
        }
        if boundary >= end_ms {
            out.push(TimeRange {
                start_ms: bucket_start,
                end_ms,
            });
            break;
        }
        out.push(TimeRange {
            start_ms: bucket_start,
            end_ms: boundary,
        });
        bucket_start = boundary;
        if out.len() >= MAX_BUCKETS {
            return Err(too_many_buckets());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ms(text: &str) -> i64 {
        tally_core::time::parse_timestamp_ms(text).expect("test timestamp")
    }

    fn range(start: &str, end: &str) -> TimeRange {
        TimeRange {
            start_ms: ms(start),
            end_ms: ms(end),
        }
    }

    fn named(name: &str) -> Zone {
        Zone::parse(&json!(name)).expect("test zone")
    }

    fn ny() -> Zone {
        named("America/New_York")
    }

    fn resolve(timeframe: &str, zone: Zone, now: &str) -> TimeRange {
        resolve_timeframe(&json!(timeframe), zone, ms(now)).expect("valid timeframe")
    }

    fn code(result: Result<impl std::fmt::Debug, SpecError>) -> ErrorCode {
        result.expect_err("expected an error").code
    }

    fn interval(text: &str) -> Interval {
        Interval::parse(&json!(text)).expect("valid interval")
    }

    fn assert_partition(r: TimeRange, parts: &[TimeRange]) {
        assert!(!parts.is_empty());
        assert_eq!(parts[0].start_ms, r.start_ms);
        assert_eq!(parts[parts.len() - 1].end_ms, r.end_ms);
        for pair in parts.windows(2) {
            assert_eq!(pair[0].end_ms, pair[1].start_ms);
        }
        for part in parts {
            assert!(part.start_ms < part.end_ms);
        }
    }

    // Zones

    #[test]
    fn zone_parses_names_and_offsets() {
        assert_eq!(named("UTC"), Zone::Named(chrono_tz::Tz::UTC));
        assert_eq!(named("US/Pacific"), Zone::Named(chrono_tz::Tz::US__Pacific));
        assert_eq!(ny(), Zone::Named(chrono_tz::Tz::America__New_York));
        let pst = Zone::Fixed(FixedOffset::west_opt(28_800).unwrap());
        assert_eq!(Zone::parse(&json!(-28800)).unwrap(), pst);
        assert_eq!(Zone::parse(&json!("-28800")).unwrap(), pst);
        assert_eq!(Zone::parse(&json!(-28800.0)).unwrap(), pst);
        assert_eq!(
            Zone::parse(&json!(0)).unwrap(),
            Zone::Fixed(FixedOffset::east_opt(0).unwrap())
        );
        assert_eq!(Zone::default(), Zone::utc());
    }

    #[test]
    fn zone_rejects_bad_values() {
        for bad in [
            json!("Mars/Olympus"),
            json!(""),
            json!(86_400),
            json!(-100_000_000_000i64),
            json!(1.5),
            json!(true),
            json!(null),
            json!(["UTC"]),
        ] {
            let err = Zone::parse(&bad).expect_err("bad zone");
            assert_eq!(err.code, ErrorCode::InvalidParameter, "{bad}");
            assert!(err.message.contains("'timezone'"), "{}", err.message);
        }
    }

    #[test]
    fn zone_offsets_follow_dst() {
        assert_eq!(ny().offset_secs_at(ms("2026-03-08T06:59:59.999Z")), -5 * 3600);
        assert_eq!(ny().offset_secs_at(ms("2026-03-08T07:00:00Z")), -4 * 3600);
        assert_eq!(ny().offset_secs_at(ms("2026-11-01T05:59:59.999Z")), -4 * 3600);
        assert_eq!(ny().offset_secs_at(ms("2026-11-01T06:00:00Z")), -5 * 3600);
        assert_eq!(Zone::utc().offset_secs_at(0), 0);
        assert_eq!(Zone::parse(&json!(19800)).unwrap().offset_secs_at(0), 19800);
    }

    #[test]
    fn format_ms_examples() {
        assert_eq!(
            Zone::utc().format_ms(ms("2016-11-02T00:00:00Z")),
            "2016-11-02T00:00:00.000Z"
        );
        assert_eq!(
            ny().format_ms(ms("2026-03-08T05:00:00Z")),
            "2026-03-08T00:00:00.000-05:00"
        );
        assert_eq!(
            ny().format_ms(ms("2026-03-09T04:00:00.123Z")),
            "2026-03-09T00:00:00.123-04:00"
        );
        assert_eq!(
            named("Asia/Kolkata").format_ms(ms("2026-01-01T00:00:00Z")),
            "2026-01-01T05:30:00.000+05:30"
        );
        assert_eq!(
            Zone::parse(&json!(-28800))
                .unwrap()
                .format_ms(ms("2026-01-01T00:00:00Z")),
            "2025-12-31T16:00:00.000-08:00"
        );
        assert_eq!(
            Zone::parse(&json!(0))
                .unwrap()
                .format_ms(ms("2026-01-01T00:00:00Z")),
            "2026-01-01T00:00:00.000Z"
        );
        // Europe/London in winter is UTC+0: `Z`.
        assert_eq!(
            named("Europe/London").format_ms(ms("2026-01-01T00:00:00Z")),
            "2026-01-01T00:00:00.000Z"
        );
        // Round trip through the timestamp parser.
        let t = ms("2026-07-04T12:34:56.789Z");
        assert_eq!(tally_core::time::parse_timestamp_ms(&ny().format_ms(t)), Some(t));
    }

    // Relative timeframes

    #[test]
    fn relative_days_in_utc() {
        let now = "2026-03-08T15:30:45.123Z";
        let day = range("2026-03-08T00:00:00Z", "2026-03-09T00:00:00Z");
        assert_eq!(resolve("this_day", Zone::utc(), now), day);
        assert_eq!(resolve("today", Zone::utc(), now), day);
        assert_eq!(resolve("this_1_days", Zone::utc(), now), day);
        assert_eq!(
            resolve("this_7_days", Zone::utc(), now),
            range("2026-03-02T00:00:00Z", "2026-03-09T00:00:00Z")
        );
        let yesterday = range("2026-03-07T00:00:00Z", "2026-03-08T00:00:00Z");
        assert_eq!(resolve("previous_day", Zone::utc(), now), yesterday);
        assert_eq!(resolve("yesterday", Zone::utc(), now), yesterday);
        assert_eq!(
            resolve("previous_7_days", Zone::utc(), now),
            range("2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z")
        );
    }

    #[test]
    fn relative_minutes_and_hours() {
        let now = "2026-03-08T15:30:45.123Z";
        assert_eq!(
            resolve("this_minute", Zone::utc(), now),
            range("2026-03-08T15:30:00Z", "2026-03-08T15:31:00Z")
        );
        assert_eq!(
            resolve("previous_5_minutes", Zone::utc(), now),
            range("2026-03-08T15:25:00Z", "2026-03-08T15:30:00Z")
        );
        assert_eq!(
            resolve("this_hour", Zone::utc(), now),
            range("2026-03-08T15:00:00Z", "2026-03-08T16:00:00Z")
        );
        assert_eq!(
            resolve("previous_3_hours", Zone::utc(), now),
            range("2026-03-08T12:00:00Z", "2026-03-08T15:00:00Z")
        );
        assert_eq!(
            resolve("this_24_hours", ny(), now),
            range("2026-03-07T16:00:00Z", "2026-03-08T16:00:00Z")
        );
        // Half-hour zone: local hours start at :30 UTC.
        assert_eq!(
            resolve("this_hour", named("Asia/Kolkata"), now),
            range("2026-03-08T15:30:00Z", "2026-03-08T16:30:00Z")
        );
        // Across the spring-forward gap: 01:00 EST and 03:00 EDT are an hour apart.
        assert_eq!(
            resolve("this_2_hours", ny(), "2026-03-08T07:30:00Z"),
            range("2026-03-08T06:00:00Z", "2026-03-08T08:00:00Z")
        );
    }

    #[test]
    fn relative_days_across_dst_in_new_york() {
        // Spring forward: 2026-03-08 lasts 23 hours in New York.
        let now = "2026-03-08T15:30:00Z";
        let today = resolve("today", ny(), now);
        assert_eq!(today, range("2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z"));
        assert_eq!(today.end_ms - today.start_ms, 23 * HOUR_MS);
        assert_eq!(
            resolve("this_2_days", ny(), now),
            range("2026-03-07T05:00:00Z", "2026-03-09T04:00:00Z")
        );
        assert_eq!(
            resolve("yesterday", ny(), now),
            range("2026-03-07T05:00:00Z", "2026-03-08T05:00:00Z")
        );
        assert_eq!(
            resolve("previous_day", ny(), "2026-03-09T12:00:00Z"),
            range("2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z")
        );
        // Before local midnight in New York it is still the previous day.
        assert_eq!(
            resolve("today", ny(), "2026-03-08T04:59:59.999Z"),
            range("2026-03-07T05:00:00Z", "2026-03-08T05:00:00Z")
        );
        // Fall back: 2026-11-01 lasts 25 hours.
        let today = resolve("today", ny(), "2026-11-01T12:00:00Z");
        assert_eq!(today, range("2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z"));
        assert_eq!(today.end_ms - today.start_ms, 25 * HOUR_MS);
    }

    #[test]
    fn relative_fixed_offset() {
        let zone = Zone::parse(&json!(-28800)).unwrap();
        assert_eq!(
            resolve("today", zone, "2026-03-08T15:30:00Z"),
            range("2026-03-08T08:00:00Z", "2026-03-09T08:00:00Z")
        );
        assert_eq!(
            resolve("today", zone, "2026-03-08T07:59:00Z"),
            range("2026-03-07T08:00:00Z", "2026-03-08T08:00:00Z")
        );
    }

    #[test]
    fn relative_weeks_start_on_sunday() {
        // 2026-03-08 is a Sunday; 2026-03-11 a Wednesday; 2026-03-14 a Saturday.
        let week = range("2026-03-08T00:00:00Z", "2026-03-15T00:00:00Z");
        for now in [
            "2026-03-08T00:00:00Z",
            "2026-03-11T12:00:00Z",
            "2026-03-14T23:59:59.999Z",
        ] {
            assert_eq!(resolve("this_week", Zone::utc(), now), week, "{now}");
        }
        assert_eq!(
            resolve("previous_week", Zone::utc(), "2026-03-11T12:00:00Z"),
            range("2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z")
        );
        assert_eq!(
            resolve("this_2_weeks", Zone::utc(), "2026-03-11T12:00:00Z"),
            range("2026-03-01T00:00:00Z", "2026-03-15T00:00:00Z")
        );
        // In New York the week holding the spring-forward day is 167 hours long.
        let r = resolve("this_week", ny(), "2026-03-11T12:00:00Z");
        assert_eq!(r, range("2026-03-08T05:00:00Z", "2026-03-15T04:00:00Z"));
    }

    #[test]
    fn relative_months_and_years() {
        let now = "2026-03-08T15:30:00Z";
        assert_eq!(
            resolve("this_month", Zone::utc(), now),
            range("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z")
        );
        assert_eq!(
            resolve("previous_2_months", Zone::utc(), now),
            range("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z")
        );
        assert_eq!(
            resolve("this_3_months", Zone::utc(), now),
            range("2026-01-01T00:00:00Z", "2026-04-01T00:00:00Z")
        );
        assert_eq!(
            resolve("previous_month", Zone::utc(), "2026-01-15T00:00:00Z"),
            range("2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z")
        );
        assert_eq!(
            resolve("this_14_months", Zone::utc(), now),
            range("2025-02-01T00:00:00Z", "2026-04-01T00:00:00Z")
        );
        assert_eq!(
            resolve("this_year", Zone::utc(), now),
            range("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z")
        );
        assert_eq!(
            resolve("previous_2_years", Zone::utc(), now),
            range("2024-01-01T00:00:00Z", "2026-01-01T00:00:00Z")
        );
        assert_eq!(
            resolve("this_month", ny(), now),
            range("2026-03-01T05:00:00Z", "2026-04-01T04:00:00Z")
        );
        assert_eq!(
            resolve("this_year", ny(), "2026-01-01T03:00:00Z"),
            range("2025-01-01T05:00:00Z", "2026-01-01T05:00:00Z")
        );
    }

    #[test]
    fn relative_rejects_bad_definitions() {
        let now = ms("2026-03-08T15:30:00Z");
        for bad in [
            json!("this_0_days"),
            json!("previous_0_hours"),
            json!("last_7_days"),
            json!("this_7_fortnights"),
            json!("this_-1_days"),
            json!("this_+1_days"),
            json!("this_1.5_days"),
            json!("this__days"),
            json!("this_7days"),
            json!("this"),
            json!("tomorrow"),
            json!(""),
            json!("this_99999999999999999999_days"),
            json!("this_99999999999_years"),
            json!("this_9999999999999999_minutes"),
            json!(7),
            json!(null),
            json!(true),
            json!(["this_7_days"]),
        ] {
            let err = resolve_timeframe(&bad, Zone::utc(), now).expect_err("bad timeframe");
            assert_eq!(err.code, ErrorCode::TimeframeDefinition, "{bad}");
            assert!(
                err.message
                    .starts_with("You sent in an invalid definition for the timeframe: '"),
                "{}",
                err.message
            );
        }
        let err = resolve_timeframe(&json!("this_7_fortnights"), Zone::utc(), now).unwrap_err();
        assert_eq!(
            err.message,
            "You sent in an invalid definition for the timeframe: 'this_7_fortnights'."
        );
    }

    // Absolute timeframes

    #[test]
    fn absolute_timeframes() {
        let now = 0;
        let expected = range("2012-08-13T19:00:00Z", "2013-09-20T19:00:00Z");
        let object = json!({"start": "2012-08-13T19:00:00.000Z", "end": "2013-09-20T19:00:00.000Z"});
        assert_eq!(resolve_timeframe(&object, ny(), now).unwrap(), expected);
        // Encoded as a JSON string.
        let text = json!(object.to_string());
        assert_eq!(resolve_timeframe(&text, Zone::utc(), now).unwrap(), expected);
        // No offset means UTC, even with another query zone; offsets are honoured.
        let naive = json!({"start": "2012-08-13T19:00:00", "end": "2013-09-20T21:00:00+02:00"});
        assert_eq!(resolve_timeframe(&naive, ny(), now).unwrap(), expected);
        // Unknown keys are ignored.
        let extra = json!({"start": "2012-08-13T19:00:00Z", "end": "2013-09-20T19:00:00Z", "x": 1});
        assert_eq!(resolve_timeframe(&extra, ny(), now).unwrap(), expected);
    }

    #[test]
    fn absolute_rejects_bad_definitions() {
        for bad in [
            json!({"start": "2013-01-01T00:00:00Z", "end": "2012-01-01T00:00:00Z"}),
            json!({"start": "2013-01-01T00:00:00Z", "end": "2013-01-01T00:00:00Z"}),
            json!({"start": "2013-01-01T00:00:00Z"}),
            json!({"end": "2013-01-01T00:00:00Z"}),
            json!({"start": "yesterday", "end": "2013-01-01T00:00:00Z"}),
            json!({"start": 1_356_998_400_000i64, "end": "2013-01-02T00:00:00Z"}),
            json!({}),
            json!("{\"start\": \"2013-01-01T00:00:00Z\""),
            json!("{not json}"),
        ] {
            assert_eq!(
                code(resolve_timeframe(&bad, Zone::utc(), 0)),
                ErrorCode::TimeframeDefinition,
                "{bad}"
            );
        }
    }

    // Intervals

    #[test]
    fn interval_parses() {
        let cases = [
            ("minutely", 1, IntervalUnit::Minute),
            ("hourly", 1, IntervalUnit::Hour),
            ("daily", 1, IntervalUnit::Day),
            ("weekly", 1, IntervalUnit::Week),
            ("monthly", 1, IntervalUnit::Month),
            ("yearly", 1, IntervalUnit::Year),
            ("every_2_days", 2, IntervalUnit::Day),
            ("every_1_day", 1, IntervalUnit::Day),
            ("every_15_minutes", 15, IntervalUnit::Minute),
            ("every_1_minute", 1, IntervalUnit::Minute),
            ("every_6_hours", 6, IntervalUnit::Hour),
            ("every_2_weeks", 2, IntervalUnit::Week),
            ("every_3_months", 3, IntervalUnit::Month),
            ("every_1_year", 1, IntervalUnit::Year),
            ("every_1000000_years", 1_000_000, IntervalUnit::Year),
        ];
        for (text, every, unit) in cases {
            assert_eq!(interval(text), Interval { every, unit }, "{text}");
        }
    }

    #[test]
    fn interval_rejects_bad_values() {
        for bad in [
            json!("fortnightly"),
            json!("Daily"),
            json!("every_0_days"),
            json!("every_-1_days"),
            json!("every_x_days"),
            json!("every__days"),
            json!("every_2_fortnights"),
            json!("every_2"),
            json!("every_1000001_days"),
            json!("every_99999999999999999999_days"),
            json!(""),
            json!(5),
            json!(["daily"]),
        ] {
            let err = Interval::parse(&bad).expect_err("bad interval");
            assert_eq!(err.code, ErrorCode::IntervalDefinition, "{bad}");
            assert!(err.message.contains("'interval'"), "{}", err.message);
        }
    }

    // Buckets

    fn starts(parts: &[TimeRange]) -> Vec<String> {
        parts
            .iter()
            .map(|p| tally_core::time::format_timestamp_ms(p.start_ms))
            .collect()
    }

    #[test]
    fn daily_buckets_clip_to_the_range() {
        let r = range("2026-03-01T12:00:00Z", "2026-03-04T06:00:00Z");
        let parts = buckets(r, interval("daily"), Zone::utc()).unwrap();
        assert_partition(r, &parts);
        assert_eq!(
            starts(&parts),
            [
                "2026-03-01T12:00:00.000Z",
                "2026-03-02T00:00:00.000Z",
                "2026-03-03T00:00:00.000Z",
                "2026-03-04T00:00:00.000Z"
            ]
        );
        // A range inside one unit is one bucket.
        let r = range("2026-03-01T12:00:00Z", "2026-03-01T13:00:00Z");
        assert_eq!(buckets(r, interval("daily"), Zone::utc()).unwrap(), vec![r]);
        // An empty range has no buckets.
        let r = TimeRange {
            start_ms: 5,
            end_ms: 5,
        };
        assert!(buckets(r, interval("daily"), Zone::utc()).unwrap().is_empty());
    }

    #[test]
    fn daily_buckets_across_dst_in_new_york() {
        let r = resolve("this_3_days", ny(), "2026-03-09T12:00:00Z");
        assert_eq!(r, range("2026-03-07T05:00:00Z", "2026-03-10T04:00:00Z"));
        let parts = buckets(r, interval("daily"), ny()).unwrap();
        assert_partition(r, &parts);
        let hours: Vec<i64> = parts.iter().map(|p| (p.end_ms - p.start_ms) / HOUR_MS).collect();
        assert_eq!(hours, [24, 23, 24]);
        let labels: Vec<String> = parts.iter().map(|p| ny().format_ms(p.start_ms)).collect();
        assert_eq!(
            labels,
            [
                "2026-03-07T00:00:00.000-05:00",
                "2026-03-08T00:00:00.000-05:00",
                "2026-03-09T00:00:00.000-04:00"
            ]
        );

        let r = resolve("this_3_days", ny(), "2026-11-02T12:00:00Z");
        let parts = buckets(r, interval("daily"), ny()).unwrap();
        assert_partition(r, &parts);
        let hours: Vec<i64> = parts.iter().map(|p| (p.end_ms - p.start_ms) / HOUR_MS).collect();
        assert_eq!(hours, [24, 25, 24]);
    }

    #[test]
    fn hourly_buckets_on_dst_days() {
        let spring = resolve("today", ny(), "2026-03-08T12:00:00Z");
        let parts = buckets(spring, interval("hourly"), ny()).unwrap();
        assert_partition(spring, &parts);
        assert_eq!(parts.len(), 23);
        assert!(parts.iter().all(|p| p.end_ms - p.start_ms == HOUR_MS));

        let autumn = resolve("today", ny(), "2026-11-01T12:00:00Z");
        let parts = buckets(autumn, interval("hourly"), ny()).unwrap();
        assert_partition(autumn, &parts);
        assert_eq!(parts.len(), 25);
        assert_eq!(ny().format_ms(parts[1].start_ms), "2026-11-01T01:00:00.000-04:00");
        assert_eq!(ny().format_ms(parts[2].start_ms), "2026-11-01T01:00:00.000-05:00");

        let parts = buckets(autumn, interval("every_6_hours"), ny()).unwrap();
        assert_partition(autumn, &parts);
        assert_eq!(parts.len(), 5);
    }

    #[test]
    fn every_two_days_counts_from_the_unit_holding_the_start() {
        let r = range("2026-03-01T12:00:00Z", "2026-03-06T00:00:00Z");
        let parts = buckets(r, interval("every_2_days"), Zone::utc()).unwrap();
        assert_partition(r, &parts);
        assert_eq!(
            starts(&parts),
            [
                "2026-03-01T12:00:00.000Z",
                "2026-03-03T00:00:00.000Z",
                "2026-03-05T00:00:00.000Z"
            ]
        );
    }

    #[test]
    fn weekly_monthly_yearly_buckets() {
        let r = range("2026-03-04T00:00:00Z", "2026-03-20T00:00:00Z");
        let parts = buckets(r, interval("weekly"), Zone::utc()).unwrap();
        assert_partition(r, &parts);
        assert_eq!(
            starts(&parts),
            [
                "2026-03-04T00:00:00.000Z",
                "2026-03-08T00:00:00.000Z",
                "2026-03-15T00:00:00.000Z"
            ]
        );

        let r = resolve("this_year", Zone::utc(), "2026-06-01T00:00:00Z");
        let parts = buckets(r, interval("monthly"), Zone::utc()).unwrap();
        assert_partition(r, &parts);
        assert_eq!(parts.len(), 12);
        assert_eq!(parts[1].end_ms - parts[1].start_ms, 28 * DAY_MS);
        assert_eq!(
            tally_core::time::format_timestamp_ms(parts[11].start_ms),
            "2026-12-01T00:00:00.000Z"
        );

        let parts = buckets(r, interval("every_5_months"), Zone::utc()).unwrap();
        assert_eq!(
            starts(&parts),
            [
                "2026-01-01T00:00:00.000Z",
                "2026-06-01T00:00:00.000Z",
                "2026-11-01T00:00:00.000Z"
            ]
        );

        let r = range("2020-07-01T00:00:00Z", "2023-02-01T00:00:00Z");
        let parts = buckets(r, interval("yearly"), Zone::utc()).unwrap();
        assert_partition(r, &parts);
        assert_eq!(
            starts(&parts),
            [
                "2020-07-01T00:00:00.000Z",
                "2021-01-01T00:00:00.000Z",
                "2022-01-01T00:00:00.000Z",
                "2023-01-01T00:00:00.000Z"
            ]
        );

        // Monthly in New York: boundaries are local midnights with the offset of the day.
        let r = resolve("this_year", ny(), "2026-06-01T00:00:00Z");
        let parts = buckets(r, interval("monthly"), ny()).unwrap();
        assert_partition(r, &parts);
        assert_eq!(ny().format_ms(parts[3].start_ms), "2026-04-01T00:00:00.000-04:00");
        assert_eq!(
            ny().format_ms(parts[11].start_ms),
            "2026-12-01T00:00:00.000-05:00"
        );
    }

    #[test]
    fn midnights_in_dst_gaps_and_overlaps() {
        // Santiago skips 2024-09-08 00:00-01:00: that day starts at 01:00 -03:00.
        let santiago = named("America/Santiago");
        let r = resolve("today", santiago, "2024-09-08T12:00:00Z");
        assert_eq!(r, range("2024-09-08T04:00:00Z", "2024-09-09T03:00:00Z"));
        assert_eq!(santiago.format_ms(r.start_ms), "2024-09-08T01:00:00.000-03:00");
        let r = range("2024-09-07T00:00:00Z", "2024-09-10T00:00:00Z");
        let parts = buckets(r, interval("daily"), santiago).unwrap();
        assert_partition(r, &parts);
        assert_eq!(parts.len(), 4);
        // Havana repeats 2024-11-03 00:00-01:00: the day starts at the earlier midnight.
        let havana = named("America/Havana");
        let r = resolve("today", havana, "2024-11-03T12:00:00Z");
        assert_eq!(r, range("2024-11-03T04:00:00Z", "2024-11-04T05:00:00Z"));
    }

    #[test]
    fn skipped_days_and_half_hour_shifts() {
        // Samoa skipped 2011-12-30 entirely: the daily buckets go from the 29th to the 31st.
        let apia = named("Pacific/Apia");
        let r = range("2011-12-28T12:00:00Z", "2012-01-01T12:00:00Z");
        let parts = buckets(r, interval("daily"), apia).unwrap();
        assert_partition(r, &parts);
        let labels: Vec<String> = parts.iter().map(|p| apia.format_ms(p.start_ms)).collect();
        assert_eq!(
            labels,
            [
                "2011-12-28T02:00:00.000-10:00",
                "2011-12-29T00:00:00.000-10:00",
                "2011-12-31T00:00:00.000+14:00",
                "2012-01-01T00:00:00.000+14:00",
                "2012-01-02T00:00:00.000+14:00"
            ]
        );
        // Lord Howe springs forward half an hour at 02:00 (+10:30 -> +11:00): the hour from the
        // change to 03:00 is its own 30-minute bucket, and later hours stay on `:00`.
        let lord_howe = named("Australia/Lord_Howe");
        let r = range("2026-10-03T13:30:00Z", "2026-10-03T18:00:00Z");
        let parts = buckets(r, interval("hourly"), lord_howe).unwrap();
        assert_partition(r, &parts);
        let labels: Vec<String> = parts.iter().map(|p| lord_howe.format_ms(p.start_ms)).collect();
        assert_eq!(
            labels,
            [
                "2026-10-04T00:00:00.000+10:30",
                "2026-10-04T01:00:00.000+10:30",
                "2026-10-04T02:30:00.000+11:00",
                "2026-10-04T03:00:00.000+11:00",
                "2026-10-04T04:00:00.000+11:00"
            ]
        );
    }

    #[test]
    fn too_many_buckets_are_refused_early() {
        let century = range("1950-01-01T00:00:00Z", "2050-01-01T00:00:00Z");
        let err = buckets(century, interval("minutely"), Zone::utc()).unwrap_err();
        assert_eq!(err.code, ErrorCode::IntervalDefinition);
        assert!(err.message.contains("'interval'"));
        let huge = TimeRange {
            start_ms: i64::MIN,
            end_ms: i64::MAX,
        };
        // Outside chrono's dates: refused, not a panic.
        assert_eq!(
            code(buckets(huge, interval("every_1000000_years"), ny())),
            ErrorCode::TimeframeDefinition
        );

        // Exactly the limit is fine; one more is not.
        let start = ms("2026-01-01T00:00:00Z");
        let exact = TimeRange {
            start_ms: start,
            end_ms: start + MAX_BUCKETS as i64 * MINUTE_MS,
        };
        assert_eq!(
            buckets(exact, interval("minutely"), Zone::utc()).unwrap().len(),
            MAX_BUCKETS
        );
        let over = TimeRange {
            start_ms: start,
            end_ms: exact.end_ms + 1,
        };
        assert_eq!(
            code(buckets(over, interval("minutely"), Zone::utc())),
            ErrorCode::IntervalDefinition
        );
    }

    const ZONES: &[&str] = &[
        "UTC",
        "America/New_York",
        "America/Santiago",
        "America/Havana",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Lord_Howe",
        "Europe/London",
        "Pacific/Apia",
    ];

    fn zone_strategy() -> impl Strategy<Value = Zone> {
        prop_oneof![
            (0..ZONES.len()).prop_map(|i| named(ZONES[i])),
            (-50_400i32..=50_400).prop_map(|s| Zone::Fixed(FixedOffset::east_opt(s).unwrap())),
        ]
    }

    fn unit_strategy() -> impl Strategy<Value = IntervalUnit> {
        prop_oneof![
            Just(IntervalUnit::Minute),
            Just(IntervalUnit::Hour),
            Just(IntervalUnit::Day),
            Just(IntervalUnit::Week),
            Just(IntervalUnit::Month),
            Just(IntervalUnit::Year),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn buckets_partition_the_range(
            zone in zone_strategy(),
            unit in unit_strategy(),
            every in 1u32..5,
            start in ms("1900-01-01T00:00:00Z")..ms("2100-01-01T00:00:00Z"),
            fraction in 0.0f64..1.0,
        ) {
            let max_len = match unit {
                IntervalUnit::Minute => 2_000 * MINUTE_MS,
                IntervalUnit::Hour => 2_000 * HOUR_MS,
                IntervalUnit::Day => 400 * DAY_MS,
                IntervalUnit::Week => 800 * DAY_MS,
                IntervalUnit::Month => 3_000 * DAY_MS,
                IntervalUnit::Year => 30_000 * DAY_MS,
            };
            let len = ((max_len as f64 * fraction) as i64).max(1);
            let r = TimeRange { start_ms: start, end_ms: start + len };
            let interval = Interval { every, unit };
            let parts = buckets(r, interval, zone).unwrap();
            prop_assert!(!parts.is_empty());
            prop_assert_eq!(parts[0].start_ms, r.start_ms);
            prop_assert_eq!(parts[parts.len() - 1].end_ms, r.end_ms);
            for pair in parts.windows(2) {
                prop_assert_eq!(pair[0].end_ms, pair[1].start_ms);
            }
            let grid = Grid { zone, unit };
            for part in &parts {
                prop_assert!(part.start_ms < part.end_ms);
            }
            // Every inner boundary is a unit boundary in the zone.
            for part in &parts[1..] {
                prop_assert_eq!(grid.floor(part.start_ms), Some(part.start_ms));
            }
        }

        #[test]
        fn relative_timeframes_hold_now(
            zone in zone_strategy(),
            unit in 0usize..6,
            n in 1u32..40,
            now in ms("1900-01-01T00:00:00Z")..ms("2100-01-01T00:00:00Z"),
        ) {
            let unit = ["minutes", "hours", "days", "weeks", "months", "years"][unit];
            let this = resolve_timeframe(&json!(format!("this_{n}_{unit}")), zone, now).unwrap();
            prop_assert!(this.start_ms <= now && now < this.end_ms);
            let previous = resolve_timeframe(&json!(format!("previous_{n}_{unit}")), zone, now).unwrap();
            prop_assert!(previous.start_ms < previous.end_ms);
            prop_assert!(previous.end_ms <= now);
            prop_assert!(previous.start_ms <= this.start_ms);
        }
    }
}
