//! Runs a [`QuerySpec`] over a collection's segments and shapes the answer as Keen does.
//!
//! The plan is the same for every analysis:
//!
//! 1. **Prune by time.** Segments whose `[min, max]` timestamp misses the range are skipped; in
//!    the others the rows of the range are found by binary search (rows are time-sorted).
//! 2. **Filter** into a row mask. A filter on a string column is decided once per dictionary
//!    entry, and on absent/null/boolean rows once per tag; only numbers are compared row by row.
//! 3. **Group and aggregate** with keys made of (tag, slot) pairs — dictionary codes, not
//!    strings — in a map local to the segment. Strings appear only when a segment's groups are
//!    folded into the query's answer.
//!
//! Segments are split among threads (one per core), each folding into its own partial answer;
//! the partial answers are merged at the end. The caller runs this on a blocking thread, never on
//! the async runtime, and passes a deadline and a memory budget ([`Limits`]).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::{Map, Value, json};
use tally_store::events::{Cell, Column, Segment, StoredSegment, Tag, cell_value, number_value, text_hash};

use crate::spec::{Analysis, Filter, FilterOp, QuerySpec};
use crate::timeframe::{TimeRange, buckets};

/// What one query may use.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Past this instant the query stops with [`ExecError::Timeout`].
    pub deadline: Option<Instant>,
    /// Bytes of groups, distinct values and kept values the query may hold.
    pub max_memory_bytes: usize,
    /// The most events an extraction may return.
    pub max_extraction_events: usize,
}

impl Limits {
    /// The configured limits for a query starting now.
    pub fn starting_now(config: &tally_core::config::QueryConfig) -> Limits {
        Limits {
            deadline: Some(Instant::now() + std::time::Duration::from_millis(config.timeout_ms)),
            max_memory_bytes: config.max_memory_bytes,
            max_extraction_events: config.max_extraction_events,
        }
    }
}

/// Why a query did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The query ran past its deadline (504).
    #[error("the query did not finish within its time limit")]
    Timeout,
    /// The query needs more than its budget (groups, distinct values, extraction size): a
    /// message asking for a narrower question (400).
    #[error("{0}")]
    TooBig(String),
    /// The spec cannot be run as given (e.g. bad interval for the range) (400).
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
}

/// A query's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The JSON body, `{"result": …}` (with `execution_metadata` when asked).
    Json(Value),
    /// An extraction as CSV text.
    Csv(String),
}

/// The result of `analysis` over no events (0 for counts, null for averages, [] for
/// select_unique): what an interval bucket without events shows.
pub fn empty_result(analysis: Analysis) -> Value {
    Acc::new(analysis, false).result(analysis)
}

/// Runs `spec` over `segments` (one collection's snapshot).
pub fn run(spec: &QuerySpec, segments: &[Arc<StoredSegment>], limits: &Limits) -> Result<Answer, ExecError> {
    let started = Instant::now();
    let range = spec.range;
    let segs: Vec<&Segment> = segments
        .iter()
        .map(|s| &s.segment)
        .filter(|s| {
            s.time_bounds()
                .is_some_and(|(lo, hi)| hi >= range.start_ms && lo < range.end_ms)
        })
        .collect();
    let (result, scanned) = if spec.analysis == Analysis::Extraction {
        return extraction(spec, &segs, limits)
            .map(|(answer, scanned)| with_metadata(spec, answer, scanned, started));
    } else {
        aggregate(spec, &segs, limits)?
    };
    Ok(with_metadata(
        spec,
        Answer::Json(json!({ "result": result })),
        scanned,
        started,
    ))
}

fn with_metadata(spec: &QuerySpec, answer: Answer, scanned: u64, started: Instant) -> Answer {
    match answer {
        Answer::Json(Value::Object(mut body)) if spec.include_metadata => {
            let properties = touched_properties(spec) as u64;
            body.insert(
                "execution_metadata".into(),
                json!({
                    "events_scanned": scanned,
                    "properties_per_event": properties,
                    "total_properties_scanned": scanned * properties,
                    "total_processing_time": started.elapsed().as_secs_f64(),
                }),
            );
            Answer::Json(Value::Object(body))
        }
        other => other,
    }
}

fn touched_properties(spec: &QuerySpec) -> usize {
    fn count(filters: &[Filter]) -> usize {
        filters
            .iter()
            .map(|f| match f {
                Filter::Property { .. } => 1,
                Filter::Or(inner) => count(inner),
            })
            .sum()
    }
    1 + usize::from(spec.target_property.is_some()) + spec.group_by.len() + count(&spec.filters)
}

fn check_deadline(limits: &Limits) -> Result<(), ExecError> {
    match limits.deadline {
        Some(deadline) if Instant::now() >= deadline => Err(ExecError::Timeout),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Filters

/// The rows of `seg` in `range` that pass every filter (deletes use this).
pub fn matching_rows(seg: &Segment, range: TimeRange, filters: &[Filter]) -> Vec<u32> {
    select(seg, seg.row_range(range.start_ms, range.end_ms), filters)
}

/// The rows of `seg`, whatever their time, that pass every filter (the live tail).
pub fn rows_passing(seg: &Segment, filters: &[Filter]) -> Vec<u32> {
    select(seg, 0..seg.rows(), filters)
}

/// A segment of just the rows of `seg` that pass every filter: what a caller whose key carries
/// filters may see of it (schema, SQL).
pub fn restrict_segment(seg: &Segment, filters: &[Filter]) -> Segment {
    let mut keep = vec![false; seg.rows()];
    for row in rows_passing(seg, filters) {
        keep[row as usize] = true;
    }
    seg.retain_rows(|r| keep[r])
}

/// The rows of `rows` (absolute row numbers of `seg`) that pass every filter.
fn select(seg: &Segment, rows: std::ops::Range<usize>, filters: &[Filter]) -> Vec<u32> {
    if filters.is_empty() {
        return rows.map(|r| r as u32).collect();
    }
    let mut mask = vec![true; rows.len()];
    for filter in filters {
        apply_filter(seg, rows.clone(), filter, &mut mask, Combine::And);
    }
    rows.zip(mask)
        .filter(|(_, keep)| *keep)
        .map(|(r, _)| r as u32)
        .collect()
}

/// How a filter's verdicts fold into a row mask.
#[derive(Debug, Clone, Copy)]
enum Combine {
    /// Filters of a query: every one must pass.
    And,
    /// The branches of an `or`: any may pass.
    Or,
}

/// Folds `filter`'s verdict on each of `rows` into `mask` (one slot per row), in place.
fn apply_filter(
    seg: &Segment,
    rows: std::ops::Range<usize>,
    filter: &Filter,
    mask: &mut [bool],
    how: Combine,
) {
    match filter {
        Filter::Or(inner) => {
            let mut any = vec![false; rows.len()];
            for f in inner {
                apply_filter(seg, rows.clone(), f, &mut any, Combine::Or);
            }
            fold(mask, any.into_iter(), how);
        }
        Filter::Property { property, op } => match seg.column(property) {
            None => {
                let verdict = matches(op, None);
                fold(mask, std::iter::repeat_n(verdict, rows.len()), how);
            }
            Some(column) => apply_column(column, rows, op, mask, how),
        },
    }
}

/// `mask[i] = mask[i] AND/OR verdicts[i]`, with the choice made once, outside the loop.
#[inline]
fn fold(mask: &mut [bool], verdicts: impl Iterator<Item = bool>, how: Combine) {
    match how {
        Combine::And => mask.iter_mut().zip(verdicts).for_each(|(m, v)| *m &= v),
        Combine::Or => mask.iter_mut().zip(verdicts).for_each(|(m, v)| *m |= v),
    }
}

fn apply_column(
    column: &Column,
    rows: std::ops::Range<usize>,
    op: &FilterOp,
    mask: &mut [bool],
    how: Combine,
) {
    // Decided once per dictionary entry and once per value-less tag.
    let code_ok: Vec<bool> = column
        .dict()
        .iter()
        .map(|s| matches(op, Some(Cell::Str(s))))
        .collect();
    let counts = column.tag_counts();
    let tags = &column.tags()[rows.clone()];
    let mut tag_ok = [false; 8];
    tag_ok[Tag::Absent as usize] = matches(op, None);
    tag_ok[Tag::Null as usize] = matches(op, Some(Cell::Null));
    tag_ok[Tag::EmptyObject as usize] = matches(op, Some(Cell::EmptyObject));
    let per_value = [Tag::Num, Tag::DateTime, Tag::Bool, Tag::List];
    if per_value.iter().all(|t| counts[*t as usize] == 0) {
        // Strings and value-less rows only (the common case): a table lookup per row.
        if code_ok.is_empty() {
            fold(mask, tags.iter().map(|&t| tag_ok[(t & 7) as usize]), how);
        } else {
            let codes = &column.codes()[rows];
            let verdicts = tags.iter().zip(codes).map(|(&t, &c)| {
                if t == Tag::Str as u8 {
                    code_ok[c as usize]
                } else {
                    tag_ok[(t & 7) as usize]
                }
            });
            fold(mask, verdicts, how);
        }
        return;
    }
    let list_ok: Vec<bool> = if counts[Tag::List as usize] > 0 {
        column
            .dict()
            .iter()
            .map(|s| matches(op, Some(Cell::List(s))))
            .collect()
    } else {
        Vec::new()
    };
    let bools = [
        matches(op, Some(Cell::Bool(false))),
        matches(op, Some(Cell::Bool(true))),
    ];
    let verdicts = rows.zip(tags).map(|(r, &tag)| match Tag::from_u8(tag) {
        tag @ (Tag::Absent | Tag::Null | Tag::EmptyObject) => tag_ok[tag as usize],
        Tag::Bool => bools[(column.codes()[r] != 0) as usize],
        Tag::Str => code_ok[column.codes()[r] as usize],
        Tag::List => list_ok[column.codes()[r] as usize],
        Tag::Num => matches(op, Some(Cell::Num(column.nums()[r]))),
        Tag::DateTime => matches(op, Some(Cell::DateTime(column.nums()[r] as i64))),
    });
    fold(mask, verdicts, how);
}

/// Whether a value (`None`: the property is missing) passes `op`, per section 9 "Filters".
pub fn matches(op: &FilterOp, cell: Option<Cell<'_>>) -> bool {
    let present = !matches!(cell, None | Some(Cell::Null));
    match op {
        FilterOp::Exists(want) => present == *want,
        FilterOp::Eq(Value::Null) => !present,
        FilterOp::Ne(Value::Null) => present,
        _ if !present => false,
        FilterOp::Eq(v) => cell.is_some_and(|c| equals_or_contains(c, v)),
        FilterOp::Ne(v) => cell.is_some_and(|c| !equals_or_contains(c, v)),
        FilterOp::Lt(v) => compare(cell, v).is_some_and(Ordering::is_lt),
        FilterOp::Lte(v) => compare(cell, v).is_some_and(Ordering::is_le),
        FilterOp::Gt(v) => compare(cell, v).is_some_and(Ordering::is_gt),
        FilterOp::Gte(v) => compare(cell, v).is_some_and(Ordering::is_ge),
        FilterOp::In(values) => match cell {
            Some(Cell::List(text)) => list_items(text).iter().any(|item| values.contains(item)),
            Some(c) => values.iter().any(|v| scalar_equals(c, v)),
            None => false,
        },
        FilterOp::Contains(needle) => any_string(cell, |s| s.contains(needle.as_str())),
        FilterOp::NotContains(needle) => match cell {
            Some(Cell::Str(_) | Cell::List(_)) => !any_string(cell, |s| s.contains(needle.as_str())),
            _ => false,
        },
        FilterOp::Regex(re) => any_string(cell, |s| re.is_match(s)),
        FilterOp::Within { lon, lat, max_miles } => match cell {
            Some(Cell::List(text)) => match list_items(text).as_slice() {
                [Value::Number(x), Value::Number(y)] => {
                    let (Some(x), Some(y)) = (x.as_f64(), y.as_f64()) else {
                        return false;
                    };
                    haversine_miles(*lon, *lat, x, y) <= *max_miles
                }
                _ => false,
            },
            _ => false,
        },
    }
}

fn list_items(text: &str) -> Vec<Value> {
    match serde_json::from_str(text) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

fn any_string(cell: Option<Cell<'_>>, test: impl Fn(&str) -> bool) -> bool {
    match cell {
        Some(Cell::Str(s)) => test(s),
        Some(Cell::List(text)) => list_items(text).iter().any(|v| v.as_str().is_some_and(&test)),
        _ => false,
    }
}

fn equals_or_contains(cell: Cell<'_>, v: &Value) -> bool {
    match cell {
        Cell::List(text) => {
            if v.is_array() {
                serde_json::from_str::<Value>(text).is_ok_and(|list| &list == v)
            } else {
                list_items(text).contains(v)
            }
        }
        c => scalar_equals(c, v),
    }
}

fn scalar_equals(cell: Cell<'_>, v: &Value) -> bool {
    match (cell, v) {
        (Cell::Num(n), Value::Number(m)) => m.as_f64() == Some(n),
        (Cell::Str(s), Value::String(t)) => s == t,
        (Cell::Bool(b), Value::Bool(c)) => b == *c,
        (Cell::DateTime(ms), Value::String(t)) => tally_core::time::parse_timestamp_ms(t) == Some(ms),
        (Cell::Null, Value::Null) => true,
        _ => false,
    }
}

fn compare(cell: Option<Cell<'_>>, v: &Value) -> Option<Ordering> {
    match (cell?, v) {
        (Cell::Num(n), Value::Number(m)) => n.partial_cmp(&m.as_f64()?),
        (Cell::Str(s), Value::String(t)) => Some(s.cmp(t.as_str())),
        (Cell::DateTime(ms), Value::String(t)) => Some(ms.cmp(&tally_core::time::parse_timestamp_ms(t)?)),
        (Cell::DateTime(ms), Value::Number(m)) => (ms as f64).partial_cmp(&m.as_f64()?),
        _ => None,
    }
}

fn haversine_miles(lon1: f64, lat1: f64, lon2: f64, lat2: f64) -> f64 {
    const EARTH_RADIUS_MILES: f64 = 3958.8;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_MILES * a.sqrt().asin()
}

// ---------------------------------------------------------------------------------------------
// Values as group keys and distinct values

/// A value as a group key or distinct value, comparable across segments. Strings borrow from
/// the segments, which outlive the query. Missing and null are the same key (`null`). Ordered:
/// null, numbers, strings, booleans, datetimes, lists.
#[derive(Debug, Clone, Copy)]
pub enum KeyValue<'a> {
    Null,
    Num(f64),
    Str(&'a str),
    Bool(bool),
    DateTime(i64),
    List(&'a str),
}

impl KeyValue<'_> {
    fn rank(&self) -> u8 {
        match self {
            KeyValue::Null => 0,
            KeyValue::Num(_) => 1,
            KeyValue::Str(_) => 2,
            KeyValue::Bool(_) => 3,
            KeyValue::DateTime(_) => 4,
            KeyValue::List(_) => 5,
        }
    }

    fn to_json(self) -> Value {
        match self {
            KeyValue::Null => Value::Null,
            KeyValue::Num(n) => number_value(n),
            KeyValue::Str(s) => Value::String(s.to_owned()),
            KeyValue::Bool(b) => Value::Bool(b),
            KeyValue::DateTime(ms) => cell_value(Cell::DateTime(ms)),
            KeyValue::List(text) => cell_value(Cell::List(text)),
        }
    }
}

impl PartialEq for KeyValue<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for KeyValue<'_> {}
impl PartialOrd for KeyValue<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for KeyValue<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (KeyValue::Num(a), KeyValue::Num(b)) => a.total_cmp(b),
            (KeyValue::Str(a), KeyValue::Str(b)) | (KeyValue::List(a), KeyValue::List(b)) => a.cmp(b),
            (KeyValue::Bool(a), KeyValue::Bool(b)) => a.cmp(b),
            (KeyValue::DateTime(a), KeyValue::DateTime(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}
impl Hash for KeyValue<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.rank().hash(state);
        match self {
            KeyValue::Null => {}
            KeyValue::Num(n) => n.to_bits().hash(state),
            KeyValue::Str(s) | KeyValue::List(s) => s.hash(state),
            KeyValue::Bool(b) => b.hash(state),
            KeyValue::DateTime(ms) => ms.hash(state),
        }
    }
}

/// A row's value in a column as a (tag, slot) pair local to the segment: dictionary code for
/// strings and lists, bits for numbers. Missing and null both give `(Null, 0)`.
#[inline]
fn local_key(column: Option<&Column>, row: usize) -> (u8, u64) {
    let Some(c) = column else {
        return (Tag::Null as u8, 0);
    };
    match Tag::from_u8(c.tags()[row]) {
        Tag::Absent | Tag::Null => (Tag::Null as u8, 0),
        Tag::Num => {
            let n = c.nums()[row];
            (Tag::Num as u8, if n == 0.0 { 0 } else { n.to_bits() })
        }
        Tag::DateTime => (Tag::DateTime as u8, c.nums()[row] as i64 as u64),
        tag @ (Tag::Str | Tag::List | Tag::Bool) => (tag as u8, c.codes()[row] as u64),
        Tag::EmptyObject => (Tag::EmptyObject as u8, 0),
    }
}

fn global_key(column: Option<&Column>, (tag, slot): (u8, u64)) -> KeyValue<'_> {
    match (Tag::from_u8(tag), column) {
        (Tag::Num, _) => KeyValue::Num(f64::from_bits(slot)),
        (Tag::DateTime, _) => KeyValue::DateTime(slot as i64),
        (Tag::Bool, _) => KeyValue::Bool(slot != 0),
        (Tag::Str, Some(c)) => KeyValue::Str(&c.dict()[slot as usize]),
        (Tag::List, Some(c)) => KeyValue::List(&c.dict()[slot as usize]),
        (Tag::EmptyObject, _) => KeyValue::List("{}"),
        _ => KeyValue::Null,
    }
}

// ---------------------------------------------------------------------------------------------
// Aggregation

/// The running state of one group.
#[derive(Debug, Clone)]
enum Acc<'a> {
    Count(u64),
    Sum {
        sum: f64,
        n: u64,
    },
    Min(Option<f64>),
    Max(Option<f64>),
    Values(Vec<f64>),
    /// Welford's running mean and sum of squared deviations.
    Moments {
        n: u64,
        mean: f64,
        m2: f64,
    },
    /// Distinct values local to a segment: string codes in a bitmap over the dictionary (when
    /// there is one group), anything else as (tag, slot).
    LocalUnique {
        codes: Vec<bool>,
        other: FxHashSet<(u8, u64)>,
        /// Only the number of distinct values is wanted: made global as [`Acc::DistinctCount`].
        count_only: bool,
    },
    /// Distinct values themselves (select_unique, funnel actors).
    Unique(UniqueSet<'a>),
    /// The number of distinct values (count_unique): strings as their 128-bit hashes, which
    /// merge without touching the strings; other values as values.
    DistinctCount {
        texts: TextSet,
        others: UniqueSet<'a>,
    },
}

/// A string's 128-bit hash ([`text_hash`]), hashed in sets by its low 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Text128(u128);

impl Hash for Text128 {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 as u64);
    }
}

type TextSet = std::collections::HashSet<Text128, std::hash::BuildHasherDefault<PassThrough>>;

/// A distinct value with its hash computed once: sets grow and merge without hashing strings
/// again, and equal hashes are confirmed by comparing values, so counts stay exact.
#[derive(Debug, Clone, Copy)]
struct Hashed<'a> {
    hash: u64,
    value: KeyValue<'a>,
}

impl<'a> Hashed<'a> {
    /// Strings and list texts hash as [`text_hash`] (what their column's dictionary keeps
    /// precomputed); other values by their `Hash`. A string and a list of equal text share a
    /// hash and differ in value, which is all the set needs.
    fn new(value: KeyValue<'a>) -> Hashed<'a> {
        let hash = match value {
            KeyValue::Str(s) | KeyValue::List(s) => text_hash(s) as u64,
            other => {
                let mut h = rustc_hash::FxHasher::default();
                other.hash(&mut h);
                h.finish()
            }
        };
        Hashed { hash, value }
    }

    /// A segment-local value, its string hash read from the column's dictionary.
    fn of_local(column: Option<&'a Column>, key: (u8, u64)) -> Hashed<'a> {
        match (Tag::from_u8(key.0), column) {
            (Tag::Str, Some(c)) => Hashed {
                hash: c.dict_hashes()[key.1 as usize] as u64,
                value: KeyValue::Str(&c.dict()[key.1 as usize]),
            },
            (Tag::List, Some(c)) => Hashed {
                hash: c.dict_hashes()[key.1 as usize] as u64,
                value: KeyValue::List(&c.dict()[key.1 as usize]),
            },
            _ => Hashed::new(global_key(column, key)),
        }
    }
}

impl PartialEq for Hashed<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.value == other.value
    }
}
impl Eq for Hashed<'_> {}
impl Hash for Hashed<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Passes a precomputed hash through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type UniqueSet<'a> = std::collections::HashSet<Hashed<'a>, std::hash::BuildHasherDefault<PassThrough>>;

/// Adds `b` to `a`, moving the smaller set into the bigger.
fn union<T: Eq + Hash, S: std::hash::BuildHasher>(
    a: &mut std::collections::HashSet<T, S>,
    b: std::collections::HashSet<T, S>,
) {
    if a.len() < b.len() {
        let small = std::mem::replace(a, b);
        a.extend(small);
    } else {
        a.extend(b);
    }
}

impl<'a> Acc<'a> {
    fn new(analysis: Analysis, local: bool) -> Acc<'a> {
        match analysis {
            Analysis::Count | Analysis::Extraction => Acc::Count(0),
            Analysis::Sum | Analysis::Average => Acc::Sum { sum: 0.0, n: 0 },
            Analysis::Minimum => Acc::Min(None),
            Analysis::Maximum => Acc::Max(None),
            Analysis::Median | Analysis::Percentile(_) => Acc::Values(Vec::new()),
            Analysis::StandardDeviation => Acc::Moments {
                n: 0,
                mean: 0.0,
                m2: 0.0,
            },
            Analysis::CountUnique | Analysis::SelectUnique if local => Acc::LocalUnique {
                codes: Vec::new(),
                other: FxHashSet::default(),
                count_only: analysis == Analysis::CountUnique,
            },
            Analysis::CountUnique => Acc::DistinctCount {
                texts: TextSet::default(),
                others: UniqueSet::default(),
            },
            Analysis::SelectUnique => Acc::Unique(UniqueSet::default()),
        }
    }

    #[inline]
    fn add_num(&mut self, x: f64) {
        match self {
            Acc::Sum { sum, n } => {
                *sum += x;
                *n += 1;
            }
            Acc::Min(m) => *m = Some(m.map_or(x, |m| m.min(x))),
            Acc::Max(m) => *m = Some(m.map_or(x, |m| m.max(x))),
            Acc::Values(v) => v.push(x),
            Acc::Moments { n, mean, m2 } => {
                *n += 1;
                let d = x - *mean;
                *mean += d / *n as f64;
                *m2 += d * (x - *mean);
            }
            _ => {}
        }
    }

    /// Folds `other` (already global) into `self`.
    fn merge(&mut self, other: Acc<'a>) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::Sum { sum, n }, Acc::Sum { sum: s2, n: n2 }) => {
                *sum += s2;
                *n += n2;
            }
            (Acc::Min(a), Acc::Min(b)) => {
                *a = match (*a, b) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                }
            }
            (Acc::Max(a), Acc::Max(b)) => {
                *a = match (*a, b) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    (x, y) => x.or(y),
                }
            }
            (Acc::Values(a), Acc::Values(mut b)) => a.append(&mut b),
            (
                Acc::Moments { n, mean, m2 },
                Acc::Moments {
                    n: n2,
                    mean: mean2,
                    m2: m22,
                },
            ) => {
                if n2 == 0 {
                    return;
                }
                let total = *n + n2;
                let d = mean2 - *mean;
                *mean += d * n2 as f64 / total as f64;
                *m2 += m22 + d * d * (*n as f64) * (n2 as f64) / total as f64;
                *n = total;
            }
            (Acc::Unique(a), Acc::Unique(b)) => union(a, b),
            (
                Acc::DistinctCount { texts, others },
                Acc::DistinctCount {
                    texts: texts2,
                    others: others2,
                },
            ) => {
                union(texts, texts2);
                union(others, others2);
            }
            _ => {}
        }
    }

    /// A segment-local state made global (codes → values).
    fn globalize(self, target: Option<&'a Column>) -> Acc<'a> {
        match self {
            local @ Acc::LocalUnique { count_only, .. } => {
                let mut global = if count_only {
                    Acc::DistinctCount {
                        texts: TextSet::default(),
                        others: UniqueSet::default(),
                    }
                } else {
                    Acc::Unique(UniqueSet::default())
                };
                global.absorb(local, target);
                global
            }
            other => other,
        }
    }

    /// Folds a segment-local state into this query-wide one; distinct values go straight into
    /// the set, each hashed once.
    fn absorb(&mut self, local: Acc<'a>, target: Option<&'a Column>) {
        match (self, local) {
            (Acc::DistinctCount { texts, others }, Acc::LocalUnique { codes, other, .. }) => {
                let seen = codes.iter().filter(|s| **s).count();
                texts.reserve(seen + other.len());
                if let Some(c) = target {
                    let hashes = c.dict_hashes();
                    for (code, _) in codes.iter().enumerate().filter(|(_, seen)| **seen) {
                        texts.insert(Text128(hashes[code]));
                    }
                }
                for key in other {
                    match (Tag::from_u8(key.0), target) {
                        (Tag::Str, Some(c)) => {
                            texts.insert(Text128(c.dict_hashes()[key.1 as usize]));
                        }
                        _ => {
                            others.insert(Hashed::of_local(target, key));
                        }
                    }
                }
            }
            (Acc::Unique(set), Acc::LocalUnique { codes, other, .. }) => {
                let seen = codes.iter().filter(|s| **s).count();
                set.reserve(seen + other.len());
                if let Some(c) = target {
                    let (dict, hashes) = (c.dict(), c.dict_hashes());
                    for (code, _) in codes.iter().enumerate().filter(|(_, seen)| **seen) {
                        set.insert(Hashed {
                            hash: hashes[code] as u64,
                            value: KeyValue::Str(&dict[code]),
                        });
                    }
                }
                set.extend(other.into_iter().map(|k| Hashed::of_local(target, k)));
            }
            (this, local) => this.merge(local.globalize(target)),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Acc::Values(v) => v.len() * 8,
            Acc::LocalUnique { codes, other, .. } => codes.len() + other.len() * 24,
            Acc::Unique(s) => s.len() * 32,
            Acc::DistinctCount { texts, others } => texts.len() * 16 + others.len() * 32,
            _ => 0,
        }
    }

    /// The analysis result of this state.
    fn result(self, analysis: Analysis) -> Value {
        match (analysis, self) {
            (_, Acc::Count(n)) => Value::from(n),
            (Analysis::Sum, Acc::Sum { sum, .. }) => number_value(sum),
            (_, Acc::Sum { sum, n }) => {
                if n == 0 {
                    Value::Null
                } else {
                    number_value(sum / n as f64)
                }
            }
            (_, Acc::Min(m) | Acc::Max(m)) => m.map_or(Value::Null, number_value),
            (analysis, Acc::Values(mut v)) => {
                let p = match analysis {
                    Analysis::Percentile(p) => p,
                    _ => 50.0,
                };
                nearest_rank(&mut v, p).map_or(Value::Null, number_value)
            }
            (_, Acc::Moments { n, m2, .. }) => {
                if n < 2 {
                    Value::Null
                } else {
                    number_value((m2 / (n - 1) as f64).sqrt())
                }
            }
            (_, Acc::DistinctCount { texts, others }) => {
                Value::from(texts.len() + others.iter().filter(|v| v.value != KeyValue::Null).count())
            }
            (Analysis::CountUnique, Acc::Unique(set)) => {
                Value::from(set.iter().filter(|v| v.value != KeyValue::Null).count())
            }
            (_, Acc::Unique(set)) => {
                let mut values: Vec<KeyValue> = set
                    .into_iter()
                    .map(|v| v.value)
                    .filter(|v| *v != KeyValue::Null)
                    .collect();
                values.sort();
                Value::Array(values.into_iter().map(KeyValue::to_json).collect())
            }
            (_, Acc::LocalUnique { .. }) => Value::Null,
        }
    }
}

/// The nearest-rank percentile: with values sorted v1..vn, v_k with k = max(1, ceil(p/100·n)).
pub fn nearest_rank(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    let k = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n);
    let (_, v, _) = values.select_nth_unstable_by(k - 1, f64::total_cmp);
    Some(*v)
}

/// Groups of one segment: (bucket, group key parts as (tag, slot) pairs) → (bucket, state).
type LocalGroups<'a> = FxHashMap<Box<[(u8, u64)]>, (usize, Acc<'a>)>;

/// One segment's groups as (bucket, group key) and state, ready to fold into [`Groups`].
type GroupStates<'a> = Vec<((usize, Vec<KeyValue<'a>>), Acc<'a>)>;

/// Groups of the whole query: (bucket index, group key) → state.
type Groups<'a> = FxHashMap<(usize, Vec<KeyValue<'a>>), Acc<'a>>;

/// The rows of a segment a query reads: a whole row range (no filters) or the rows that passed.
enum Selection {
    All(std::ops::Range<usize>),
    Rows(Vec<u32>),
}

impl Selection {
    fn of(seg: &Segment, range: TimeRange, filters: &[Filter]) -> Selection {
        let rows = seg.row_range(range.start_ms, range.end_ms);
        if filters.is_empty() {
            Selection::All(rows)
        } else {
            Selection::Rows(select(seg, rows, filters))
        }
    }

    fn len(&self) -> usize {
        match self {
            Selection::All(r) => r.len(),
            Selection::Rows(v) => v.len(),
        }
    }

    #[inline]
    fn for_each(&self, mut f: impl FnMut(usize)) {
        match self {
            Selection::All(r) => r.clone().for_each(f),
            Selection::Rows(v) => v.iter().for_each(|&r| f(r as usize)),
        }
    }
}

/// Runs an aggregating analysis; returns the `result` value and the events scanned.
fn aggregate(spec: &QuerySpec, segs: &[&Segment], limits: &Limits) -> Result<(Value, u64), ExecError> {
    let bucket_ranges = match spec.interval {
        Some(interval) => Some(buckets(spec.range, interval, spec.zone)?),
        None => None,
    };
    // Bigger segments first, dealt round-robin, so the threads get similar work.
    let mut segs = segs.to_vec();
    segs.sort_by_key(|s| std::cmp::Reverse(s.rows()));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(segs.len())
        .max(1);
    let partials: Vec<Result<(Groups, u64), ExecError>> = if threads == 1 {
        vec![aggregate_part(
            spec,
            segs.iter().copied(),
            bucket_ranges.as_deref(),
            limits,
        )]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let part = segs.iter().copied().skip(t).step_by(threads);
                    let bucket_ranges = bucket_ranges.as_deref();
                    scope.spawn(move || aggregate_part(spec, part, bucket_ranges, limits))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("query thread"))
                .collect()
        })
    };
    let mut groups = Groups::default();
    let mut scanned = 0;
    for partial in partials {
        let (part, n) = partial?;
        scanned += n;
        merge_groups(&mut groups, part);
    }
    Ok((shape(spec, groups, bucket_ranges.as_deref()), scanned))
}

fn merge_groups<'a>(into: &mut Groups<'a>, from: Groups<'a>) {
    for (key, acc) in from {
        match into.get_mut(&key) {
            Some(existing) => existing.merge(acc),
            None => {
                into.insert(key, acc);
            }
        }
    }
}

fn aggregate_part<'s>(
    spec: &QuerySpec,
    segs: impl Iterator<Item = &'s Segment>,
    bucket_ranges: Option<&[TimeRange]>,
    limits: &Limits,
) -> Result<(Groups<'s>, u64), ExecError> {
    let mut groups = Groups::default();
    let mut scanned = 0u64;
    let mut memory = 0usize;
    for seg in segs {
        check_deadline(limits)?;
        let target = spec.target_property.as_deref().and_then(|p| seg.column(p));
        if let Some(acc) = from_statistics(spec, seg, target, bucket_ranges) {
            scanned += seg.rows() as u64;
            merge_groups(&mut groups, [((0, Vec::new()), acc)].into_iter().collect());
            continue;
        }
        let selection = Selection::of(seg, spec.range, &spec.filters);
        scanned += seg.row_range(spec.range.start_ms, spec.range.end_ms).len() as u64;
        if selection.len() == 0 {
            continue;
        }
        let local = if spec.group_by.is_empty() {
            ungrouped(spec, seg, target, &selection, bucket_ranges, limits)?
        } else {
            grouped(spec, seg, target, &selection, bucket_ranges, limits, &mut memory)?
        };
        for (key, acc) in local {
            memory += acc.heap_bytes();
            if memory > limits.max_memory_bytes {
                return Err(too_big());
            }
            match groups.get_mut(&key) {
                Some(existing) => existing.absorb(acc, target),
                None => {
                    groups.insert(key, acc.globalize(target));
                }
            }
        }
    }
    Ok((groups, scanned))
}

/// Count, sum, average, minimum and maximum of a segment wholly inside the time range, with no
/// filter, group or interval to apply: read from the segment's summary, no scan.
fn from_statistics<'s>(
    spec: &QuerySpec,
    seg: &Segment,
    target: Option<&Column>,
    bucket_ranges: Option<&[TimeRange]>,
) -> Option<Acc<'s>> {
    if !spec.filters.is_empty() || !spec.group_by.is_empty() || bucket_ranges.is_some() {
        return None;
    }
    let (lo, hi) = seg.time_bounds()?;
    if lo < spec.range.start_ms || hi >= spec.range.end_ms {
        return None;
    }
    let stats = target.map(Column::num_stats).unwrap_or_default();
    let some = |x: f64| (stats.count > 0).then_some(x);
    Some(match spec.analysis {
        Analysis::Count => Acc::Count(seg.rows() as u64),
        Analysis::Sum | Analysis::Average => Acc::Sum {
            sum: stats.sum,
            n: stats.count,
        },
        Analysis::Minimum => Acc::Min(some(stats.min)),
        Analysis::Maximum => Acc::Max(some(stats.max)),
        _ => return None,
    })
}

/// The interval bucket of each row in turn: rows are time-sorted, so it only moves forward.
struct BucketCursor<'a> {
    timestamps: &'a [i64],
    ranges: Option<&'a [TimeRange]>,
    current: usize,
}

impl<'a> BucketCursor<'a> {
    fn new(seg: &'a Segment, ranges: Option<&'a [TimeRange]>) -> Self {
        Self {
            timestamps: seg.timestamps(),
            ranges,
            current: 0,
        }
    }

    /// The bucket of `row` (0 without an interval); rows must come in ascending order.
    #[inline]
    fn at(&mut self, row: usize) -> usize {
        if let Some(ranges) = self.ranges {
            let ts = self.timestamps[row];
            while self.current + 1 < ranges.len() && ts >= ranges[self.current].end_ms {
                self.current += 1;
            }
        }
        self.current
    }
}

/// No group_by: one state, or one per interval bucket.
fn ungrouped<'s>(
    spec: &QuerySpec,
    seg: &'s Segment,
    target: Option<&'s Column>,
    selection: &Selection,
    bucket_ranges: Option<&[TimeRange]>,
    limits: &Limits,
) -> Result<GroupStates<'s>, ExecError> {
    let analysis = spec.analysis;
    let mut accs: Vec<Acc> = (0..bucket_ranges.map_or(1, |b| b.len()))
        .map(|_| Acc::new(analysis, true))
        .collect();
    // Distinct strings with one state per bucket: a bitmap over the dictionary.
    let bitmap = matches!(analysis, Analysis::CountUnique | Analysis::SelectUnique)
        && target.is_some_and(|c| !c.dict().is_empty())
        && accs.len() * target.map_or(0, |c| c.dict().len()) <= 64 << 20;
    if bitmap && let Some(c) = target {
        for acc in &mut accs {
            if let Acc::LocalUnique { codes, .. } = acc {
                *codes = vec![false; c.dict().len()];
            }
        }
        // The commonest distinct question (no interval, no filter): one pass over the column's
        // tags and codes, with no per-row bookkeeping.
        if let (None, Selection::All(rows), [Acc::LocalUnique { codes, other, .. }]) =
            (bucket_ranges, selection, accs.as_mut_slice())
        {
            let (tags, row_codes) = (&c.tags()[rows.clone()], &c.codes()[rows.clone()]);
            for (i, (&tag, &code)) in tags.iter().zip(row_codes).enumerate() {
                if tag == Tag::Str as u8 {
                    codes[code as usize] = true;
                } else if tag > Tag::Null as u8 {
                    other.insert(local_key(target, rows.start + i));
                }
            }
            return Ok(accs.into_iter().map(|acc| ((0, Vec::new()), acc)).collect());
        }
    }
    let mut cursor = BucketCursor::new(seg, bucket_ranges);
    let mut seen = 0usize;
    let mut timed_out = false;
    selection.for_each(|row| {
        seen += 1;
        if seen.is_multiple_of(1_048_576) && check_deadline(limits).is_err() {
            timed_out = true;
        }
        let bucket = cursor.at(row);
        accumulate(&mut accs[bucket], target, row);
    });
    if timed_out {
        return Err(ExecError::Timeout);
    }
    Ok(accs
        .into_iter()
        .enumerate()
        .map(|(b, acc)| ((b, Vec::new()), acc))
        .collect())
}

/// group_by: a hash map keyed by (bucket, tag/slot pairs) — codes, not strings.
fn grouped<'s>(
    spec: &QuerySpec,
    seg: &'s Segment,
    target: Option<&'s Column>,
    selection: &Selection,
    bucket_ranges: Option<&[TimeRange]>,
    limits: &Limits,
    memory: &mut usize,
) -> Result<GroupStates<'s>, ExecError> {
    let group_cols: Vec<Option<&Column>> = spec.group_by.iter().map(|g| seg.column(g)).collect();
    if let Some(out) = grouped_dense(
        spec,
        seg,
        target,
        selection,
        bucket_ranges,
        &group_cols,
        limits,
        memory,
    )? {
        return Ok(out);
    }
    let mut local = LocalGroups::default();
    let mut key_buf: Vec<(u8, u64)> = Vec::with_capacity(group_cols.len() + 1);
    let mut cursor = BucketCursor::new(seg, bucket_ranges);
    let mut seen = 0usize;
    let mut failed = None;
    selection.for_each(|row| {
        if failed.is_some() {
            return;
        }
        seen += 1;
        if seen.is_multiple_of(65_536) {
            if let Err(e) = check_deadline(limits) {
                failed = Some(e);
            } else if *memory > limits.max_memory_bytes {
                failed = Some(too_big());
            }
        }
        let bucket = cursor.at(row);
        key_buf.clear();
        key_buf.push((u8::MAX, bucket as u64));
        key_buf.extend(group_cols.iter().map(|c| local_key(*c, row)));
        let acc = match local.get_mut(key_buf.as_slice()) {
            Some(entry) => &mut entry.1,
            None => {
                *memory += 64 + key_buf.len() * 16;
                &mut local
                    .entry(key_buf.clone().into_boxed_slice())
                    .or_insert_with(|| (bucket, Acc::new(spec.analysis, true)))
                    .1
            }
        };
        accumulate(acc, target, row);
    });
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(local
        .into_iter()
        .map(|(key, (bucket, acc))| {
            let global: Vec<KeyValue> = key[1..]
                .iter()
                .zip(&group_cols)
                .map(|(k, c)| global_key(*c, *k))
                .collect();
            ((bucket, global), acc)
        })
        .collect())
}

/// The most slots a dense group table may have.
const MAX_DENSE_SLOTS: usize = 1 << 20;

/// group_by on columns holding only strings (the common case: plans, categories, paths): the
/// group is an index computed from dictionary codes — no hashing. `None` when the columns do
/// not qualify or the table would be too big.
#[allow(clippy::too_many_arguments)]
fn grouped_dense<'s>(
    spec: &QuerySpec,
    seg: &'s Segment,
    target: Option<&'s Column>,
    selection: &Selection,
    bucket_ranges: Option<&[TimeRange]>,
    group_cols: &[Option<&'s Column>],
    limits: &Limits,
    memory: &mut usize,
) -> Result<Option<GroupStates<'s>>, ExecError> {
    if !group_cols.iter().all(|c| c.is_none_or(Column::only_strings)) {
        return Ok(None);
    }
    // Per column: dictionary size + 1 slot for null/missing.
    let dims: Vec<usize> = group_cols
        .iter()
        .map(|c| c.map_or(1, |c| c.dict().len() + 1))
        .collect();
    let buckets = bucket_ranges.map_or(1, <[TimeRange]>::len);
    let Some(slots) = dims
        .iter()
        .try_fold(buckets, |acc, d| acc.checked_mul(*d))
        .filter(|&n| n <= MAX_DENSE_SLOTS)
    else {
        return Ok(None);
    };
    let unique = matches!(spec.analysis, Analysis::CountUnique | Analysis::SelectUnique);
    let target_dict = target.map_or(0, |c| c.dict().len());
    let mut table: Vec<Option<Acc<'s>>> = (0..slots).map(|_| None).collect();
    *memory += slots * 8;
    let mut cursor = BucketCursor::new(seg, bucket_ranges);
    let mut seen = 0usize;
    let mut failed = None;
    let mut groups = 0usize;
    selection.for_each(|row| {
        if failed.is_some() {
            return;
        }
        seen += 1;
        if seen.is_multiple_of(1_048_576)
            && let Err(e) = check_deadline(limits)
        {
            failed = Some(e);
        }
        let bucket = cursor.at(row);
        let mut index = bucket;
        for (c, &dim) in group_cols.iter().zip(&dims) {
            let code = match c {
                Some(c) if c.tags()[row] == Tag::Str as u8 => c.codes()[row] as usize,
                _ => dim - 1,
            };
            index = index * dim + code;
        }
        let acc = table[index].get_or_insert_with(|| {
            groups += 1;
            let mut acc = Acc::new(spec.analysis, true);
            // Distinct strings: a bitmap per group while that stays small.
            if unique
                && let Acc::LocalUnique { codes, .. } = &mut acc
                && groups.saturating_mul(target_dict) <= 64 << 20
            {
                *codes = vec![false; target_dict];
            }
            acc
        });
        accumulate(acc, target, row);
    });
    if let Some(e) = failed {
        return Err(e);
    }
    *memory += groups * 64;
    let mut out = Vec::with_capacity(groups);
    for (mut index, acc) in table.into_iter().enumerate() {
        let Some(acc) = acc else { continue };
        let mut key = vec![KeyValue::Null; dims.len()];
        for (i, (c, &dim)) in group_cols.iter().zip(&dims).enumerate().rev() {
            let code = index % dim;
            index /= dim;
            if let Some(c) = c
                && code < dim - 1
            {
                key[i] = KeyValue::Str(&c.dict()[code]);
            }
        }
        out.push(((index, key), acc));
    }
    Ok(Some(out))
}

fn too_big() -> ExecError {
    ExecError::TooBig(
        "The query needs more memory than a query may use (too many groups or distinct values); narrow the timeframe, add filters or group by fewer properties."
            .into(),
    )
}

#[inline]
fn accumulate(acc: &mut Acc, target: Option<&Column>, row: usize) {
    match acc {
        Acc::Count(n) => *n += 1,
        Acc::LocalUnique { codes, other, .. } => {
            let Some(c) = target else { return };
            let tag = c.tags()[row];
            if tag == Tag::Str as u8 && !codes.is_empty() {
                codes[c.codes()[row] as usize] = true;
            } else if tag > Tag::Null as u8 {
                other.insert(local_key(target, row));
            }
        }
        _ => {
            if let Some(c) = target
                && c.tags()[row] == Tag::Num as u8
            {
                acc.add_num(c.nums()[row]);
            }
        }
    }
}

/// Shapes the groups into Keen's result (section 3.3).
fn shape(spec: &QuerySpec, mut groups: Groups, bucket_ranges: Option<&[TimeRange]>) -> Value {
    let analysis = spec.analysis;
    let grouped = !spec.group_by.is_empty();
    let empty = || Acc::new(analysis, false);
    let rows_of = |groups: Vec<(Vec<KeyValue>, Acc)>| -> Value {
        let mut rows: Vec<(Vec<KeyValue>, Value)> = groups
            .into_iter()
            .map(|(k, acc)| (k, acc.result(analysis)))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        if !spec.order_by.is_empty() {
            rows.sort_by(|a, b| {
                for order in &spec.order_by {
                    let ord = if order.property == "result" {
                        compare_results(&a.1, &b.1)
                    } else {
                        let i = spec
                            .group_by
                            .iter()
                            .position(|g| *g == order.property)
                            .unwrap_or(0);
                        a.0[i].cmp(&b.0[i])
                    };
                    let ord = if order.descending { ord.reverse() } else { ord };
                    if ord != Ordering::Equal {
                        return ord;
                    }
                }
                Ordering::Equal
            });
        }
        if let Some(limit) = spec.limit {
            rows.truncate(limit);
        }
        Value::Array(
            rows.into_iter()
                .map(|(keys, result)| {
                    let mut obj = Map::new();
                    for (name, key) in spec.group_by.iter().zip(keys) {
                        obj.insert(name.clone(), key.to_json());
                    }
                    obj.insert("result".into(), result);
                    Value::Object(obj)
                })
                .collect(),
        )
    };
    match bucket_ranges {
        None if !grouped => groups
            .remove(&(0, Vec::new()))
            .unwrap_or_else(empty)
            .result(analysis),
        None => rows_of(groups.into_iter().map(|((_, k), acc)| (k, acc)).collect()),
        Some(ranges) => {
            let mut per_bucket: Vec<Vec<(Vec<KeyValue>, Acc)>> =
                (0..ranges.len()).map(|_| Vec::new()).collect();
            for ((bucket, key), acc) in groups {
                if let Some(slot) = per_bucket.get_mut(bucket) {
                    slot.push((key, acc));
                }
            }
            Value::Array(
                ranges
                    .iter()
                    .zip(per_bucket)
                    .map(|(range, mut entries)| {
                        let value = if grouped {
                            rows_of(entries)
                        } else {
                            entries
                                .pop()
                                .map(|(_, acc)| acc)
                                .unwrap_or_else(empty)
                                .result(analysis)
                        };
                        json!({
                            "timeframe": {
                                "start": spec.zone.format_ms(range.start_ms),
                                "end": spec.zone.format_ms(range.end_ms),
                            },
                            "value": value,
                        })
                    })
                    .collect(),
            )
        }
    }
}

fn compare_results(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_f64().unwrap_or(0.0).total_cmp(&y.as_f64().unwrap_or(0.0))
        }
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Less,
        (_, Value::Null) => Ordering::Greater,
        (Value::Array(x), Value::Array(y)) => x.len().cmp(&y.len()),
        _ => Ordering::Equal,
    }
}

// ---------------------------------------------------------------------------------------------
// Extraction

fn extraction(spec: &QuerySpec, segs: &[&Segment], limits: &Limits) -> Result<(Answer, u64), ExecError> {
    let mut hits: Vec<(i64, u32, u32)> = Vec::new();
    let mut scanned = 0u64;
    for (s, seg) in segs.iter().enumerate() {
        check_deadline(limits)?;
        let rows = seg.row_range(spec.range.start_ms, spec.range.end_ms);
        scanned += rows.len() as u64;
        let ts = seg.timestamps();
        let rows = match spec.latest {
            Some(latest) if spec.filters.is_empty() => {
                rows.end.saturating_sub(latest).max(rows.start)..rows.end
            }
            _ => rows,
        };
        let mut selected = select(seg, rows, &spec.filters);
        if let Some(latest) = spec.latest {
            // Rows are time-sorted: only a segment's last `latest` can be among the newest.
            let keep = latest.min(limits.max_extraction_events);
            if selected.len() > keep {
                selected.drain(..selected.len() - keep);
            }
        }
        hits.extend(selected.into_iter().map(|r| (ts[r as usize], s as u32, r)));
        if spec.latest.is_none() && hits.len() > limits.max_extraction_events {
            return Err(ExecError::TooBig(format!(
                "More than {} events match this extraction; set 'latest' or narrow the timeframe or filters.",
                limits.max_extraction_events
            )));
        }
    }
    hits.sort_unstable();
    if let Some(latest) = spec.latest {
        let latest = latest.min(limits.max_extraction_events);
        if hits.len() > latest {
            hits.drain(..hits.len() - latest);
        }
    }
    let events: Vec<Value> = hits
        .iter()
        .map(|&(_, s, r)| match &spec.property_names {
            Some(names) => segs[s as usize].event_json_only(r as usize, names),
            None => segs[s as usize].event_json(r as usize),
        })
        .collect();
    if spec.csv {
        return Ok((
            Answer::Csv(to_csv(&events, spec.property_names.as_deref())),
            scanned,
        ));
    }
    Ok((Answer::Json(json!({ "result": events })), scanned))
}

/// Events as CSV: one column per flattened property (in `names` order when given, else sorted),
/// strings quoted when needed, lists as JSON text.
fn to_csv(events: &[Value], names: Option<&[String]>) -> String {
    let flat: Vec<Vec<(String, Value)>> = events
        .iter()
        .map(|e| {
            let mut out = Vec::new();
            flatten_value(String::new(), e, &mut out);
            out
        })
        .collect();
    let mut columns: Vec<String> = flat.iter().flatten().map(|(k, _)| k.clone()).collect();
    columns.sort();
    columns.dedup();
    if let Some(names) = names {
        let rank = |c: &String| {
            names
                .iter()
                .position(|n| c == n || c.starts_with(&format!("{n}.")))
                .unwrap_or(usize::MAX)
        };
        columns.sort_by_key(|c| (rank(c), c.clone()));
    }
    let mut out = String::new();
    out.push_str(&columns.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
    out.push('\n');
    for row in &flat {
        let map: HashMap<&str, &Value> = row.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let line: Vec<String> = columns
            .iter()
            .map(|c| match map.get(c.as_str()) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => csv_field(s),
                Some(v) => csv_field(&v.to_string()),
            })
            .collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn flatten_value(prefix: String, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_value(path, v, out);
            }
        }
        other => out.push((prefix, other.clone())),
    }
}

// ---------------------------------------------------------------------------------------------
// Actors (funnels)

/// The distinct non-null values of an actor property over some events; strings borrow from the
/// segments, which the caller holds for the whole funnel.
#[derive(Debug, Default)]
pub struct ActorSet<'a>(UniqueSet<'a>);

impl<'a> ActorSet<'a> {
    /// How many actors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The actors also in `other`.
    pub fn intersect(&self, other: &ActorSet<'a>) -> ActorSet<'a> {
        let (small, large) = if self.len() <= other.len() {
            (self, other)
        } else {
            (other, self)
        };
        ActorSet(small.0.iter().filter(|a| large.0.contains(a)).copied().collect())
    }

    /// The actors not in `other`.
    pub fn without(&self, other: &ActorSet<'a>) -> ActorSet<'a> {
        ActorSet(self.0.iter().filter(|a| !other.0.contains(a)).copied().collect())
    }

    /// The actors, sorted, as JSON values.
    pub fn to_json(&self) -> Value {
        let mut values: Vec<KeyValue> = self.0.iter().map(|h| h.value).collect();
        values.sort();
        Value::Array(values.into_iter().map(KeyValue::to_json).collect())
    }
}

/// The distinct values of `actor_property` among the events of `segments` in `range` that pass
/// `filters` (missing and null actors are not actors).
pub fn actors<'a>(
    segments: &'a [Arc<StoredSegment>],
    actor_property: &str,
    range: TimeRange,
    filters: &[Filter],
    limits: &Limits,
) -> Result<ActorSet<'a>, ExecError> {
    let mut global = Acc::Unique(UniqueSet::default());
    for stored in segments {
        check_deadline(limits)?;
        let seg = &stored.segment;
        let Some(target) = seg.column(actor_property) else {
            continue;
        };
        if seg
            .time_bounds()
            .is_none_or(|(lo, hi)| hi < range.start_ms || lo >= range.end_ms)
        {
            continue;
        }
        let selection = Selection::of(seg, range, filters);
        let mut local = Acc::LocalUnique {
            codes: vec![false; target.dict().len()],
            other: FxHashSet::default(),
            count_only: false,
        };
        selection.for_each(|row| accumulate(&mut local, Some(target), row));
        global.absorb(local, Some(target));
        if global.heap_bytes() > limits.max_memory_bytes {
            return Err(too_big());
        }
    }
    match global {
        Acc::Unique(set) => Ok(ActorSet(set)),
        _ => Ok(ActorSet::default()),
    }
}
