//! Building a [`Segment`] from events given as JSON text: the store's write path.
//!
//! Every event the process stage hands to the store passes through here, so this is the store's
//! share of the cost of each event. [`SegmentBuilder`] reads each event's text once with a serde
//! visitor and puts every value straight into its column: no `serde_json::Value` tree, no
//! string per flattened path (paths are built in one reused buffer), and a row's columns are
//! found by guessing that it has the same shape as the row before (events of one collection
//! usually do) before falling back to a hash lookup. It replaced a tree and a string per path
//! per event: in the single-event ingest benchmark, the thread that builds segments had spent
//! 21% of its samples in `malloc` alone, and its CPU went from ~0.45 to ~0.30 CPU-seconds per
//! 2 s with this builder.
//!
//! What a segment holds is exactly what parsing each event into a `serde_json::Value` and
//! flattening it would give (`from_values`, kept in the tests as the reference; the rare event
//! below that takes the fallback goes through that same flattening, [`flatten_event`]):
//!
//! * nested objects become dotted paths; a non-root empty object is an `EmptyObject` cell;
//! * a list is stored as the JSON text `serde_json` writes for it;
//! * a repeated name keeps its last value (as `serde_json`'s map does): an event with a
//!   repeated name at any depth is rare, so it simply takes the reference path;
//! * text that is not a JSON object is skipped and counted;
//! * rows are sorted by `keen.timestamp` (stable), and dictionary codes are numbered by first
//!   appearance in that order.
//!
//! A property test checks the two paths build identical segments, for events with Keen's
//! names. One difference remains outside them: when two names Keen forbids (`a.b` beside
//! `a: {b}`) flatten onto one path in one event, the value replaced may stay behind as an
//! unused dictionary entry in one builder and not the other (the stored values are the same).
//! Ingest refuses such names.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use tally_core::time::parse_timestamp_ms;

#[cfg(test)]
use super::column::Column;
use super::column::{Cell, ColumnBuilder};
use super::segment::Segment;

/// The properties stored as datetimes rather than strings, when they parse as one.
const DATETIME_PATHS: [&str; 2] = ["keen.timestamp", "keen.created_at"];

/// The path whose value orders a segment's rows.
const TIMESTAMP_PATH: &str = "keen.timestamp";

/// Builds one segment from events added one at a time.
#[derive(Default)]
pub(crate) struct SegmentBuilder<'a> {
    /// How many events are coming, if known (columns are allocated at that size).
    expected_rows: usize,
    /// Columns in the order their paths were first seen (sorted by path at the end).
    columns: Vec<(Arc<str>, ColumnBuilder)>,
    /// Path → index in `columns`.
    index: FxHashMap<Arc<str>, usize>,
    /// The column index of each cell of the previous row, in order: the guess for this row.
    last_shape: Vec<usize>,
    /// `keen.timestamp` of each row, in arrival order.
    timestamps: Vec<i64>,
    /// Events that were not JSON objects.
    skipped: usize,
    /// The row being read, reused from event to event.
    row: RowScratch<'a>,
}

/// One value of the row being read; strings borrow from the event's text where they can.
#[derive(Debug)]
enum Pending<'a> {
    Null,
    Num(f64),
    Bool(bool),
    Str(&'a str),
    /// A string with escapes, unescaped into [`RowScratch::owned`].
    OwnedStr(Range<usize>),
    /// A list's JSON text, in [`RowScratch::owned`].
    List(Range<usize>),
    EmptyObject,
    DateTime(i64),
}

/// The cells of the event being read, kept apart until the whole event has parsed, so that a
/// bad event leaves nothing behind in the columns.
#[derive(Default)]
struct RowScratch<'a> {
    /// The path of the value being read (`user.id`), grown and cut back as objects nest.
    path: String,
    /// Every cell's path, one after another.
    paths: String,
    /// Each cell: its path (a range of `paths`) and value.
    cells: Vec<(Range<usize>, Pending<'a>)>,
    /// Unescaped strings and list texts of this row.
    owned: String,
    /// The names of the objects being read, innermost last, to notice a repeated name: each
    /// object's names start at the mark its reader took.
    names: Vec<Range<usize>>,
    name_text: String,
    /// Some object repeats a name (or has a name Keen forbids): the row takes the reference
    /// path.
    needs_reference: bool,
    /// `keen.timestamp`, if it is a string that parses.
    timestamp_ms: Option<i64>,
}

impl RowScratch<'_> {
    fn clear(&mut self) {
        self.path.clear();
        self.paths.clear();
        self.cells.clear();
        self.owned.clear();
        self.names.clear();
        self.name_text.clear();
        self.needs_reference = false;
        self.timestamp_ms = None;
    }
}

impl<'a> SegmentBuilder<'a> {
    /// A builder for about `rows` events.
    pub(crate) fn with_rows(rows: usize) -> Self {
        Self {
            expected_rows: rows,
            timestamps: Vec::with_capacity(rows),
            ..Self::default()
        }
    }

    /// Adds one event. Text that is not a JSON object is skipped (and counted).
    pub(crate) fn add(&mut self, text: &'a str) {
        self.row.clear();
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = de
            .deserialize_any(ValueReader {
                row: &mut self.row,
                root: true,
            })
            .and_then(|is_object| de.end().map(|()| is_object));
        match parsed {
            Ok(true) if !self.row.needs_reference => self.commit_row(),
            Ok(true) => self.add_via_value(text),
            Ok(false) | Err(_) => self.skipped += 1,
        }
    }

    /// Moves the row's cells into their columns.
    fn commit_row(&mut self) {
        let row = self.timestamps.len();
        self.timestamps.push(self.row.timestamp_ms.unwrap_or(0));
        let row_scratch = &self.row;
        let mut shape_matches = true;
        for (i, (range, pending)) in row_scratch.cells.iter().enumerate() {
            let path = &row_scratch.paths[range.clone()];
            let guess = if shape_matches {
                self.last_shape
                    .get(i)
                    .copied()
                    .filter(|&c| &*self.columns[c].0 == path)
            } else {
                None
            };
            let column = match guess {
                Some(c) => c,
                None => {
                    if shape_matches {
                        shape_matches = false;
                        self.last_shape.truncate(i);
                    }
                    let c = column_index(&mut self.columns, &mut self.index, path, self.expected_rows);
                    self.last_shape.push(c);
                    c
                }
            };
            let cell = match pending {
                Pending::Null => Cell::Null,
                Pending::Num(n) => Cell::Num(*n),
                Pending::Bool(b) => Cell::Bool(*b),
                Pending::Str(s) => Cell::Str(s),
                Pending::OwnedStr(r) => Cell::Str(&row_scratch.owned[r.clone()]),
                Pending::List(r) => Cell::List(&row_scratch.owned[r.clone()]),
                Pending::EmptyObject => Cell::EmptyObject,
                Pending::DateTime(ms) => Cell::DateTime(*ms),
            };
            self.columns[column].1.set(row, cell);
        }
        self.last_shape.truncate(row_scratch.cells.len());
    }

    /// The reference path for one event: a `Value` tree, flattened.
    fn add_via_value(&mut self, text: &str) {
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
            self.skipped += 1;
            return;
        };
        let (ts, cells) = flatten_event(map);
        let row = self.timestamps.len();
        self.timestamps.push(ts);
        for (path, value) in &cells {
            let column = column_index(&mut self.columns, &mut self.index, path, self.expected_rows);
            set_value(&mut self.columns[column].1, row, path, value);
        }
        // The next row's guess starts afresh.
        self.last_shape.clear();
    }

    /// The segment, rows sorted by `keen.timestamp`, and how many events were skipped.
    pub(crate) fn finish(self) -> (Segment, usize) {
        let rows = self.timestamps.len();
        let sorted = self.timestamps.is_sorted();
        let order: Vec<u32> = if sorted {
            Vec::new()
        } else {
            let mut order: Vec<u32> = (0..rows as u32).collect();
            order.sort_by_key(|&r| self.timestamps[r as usize]);
            order
        };
        let columns = self
            .columns
            .into_iter()
            .map(|(path, builder)| {
                let column = builder.finish(rows);
                let column = if sorted {
                    column
                } else {
                    column.gather_recoded(&order)
                };
                (path, column)
            })
            .collect();
        let timestamps = if sorted {
            self.timestamps
        } else {
            order.iter().map(|&r| self.timestamps[r as usize]).collect()
        };
        (Segment { timestamps, columns }, self.skipped)
    }
}

/// The index of `path`'s column, created (for about `rows` rows) if new.
fn column_index(
    columns: &mut Vec<(Arc<str>, ColumnBuilder)>,
    index: &mut FxHashMap<Arc<str>, usize>,
    path: &str,
    rows: usize,
) -> usize {
    if let Some(&c) = index.get(path) {
        return c;
    }
    let path: Arc<str> = Arc::from(path);
    columns.push((path.clone(), ColumnBuilder::with_rows(rows)));
    index.insert(path, columns.len() - 1);
    columns.len() - 1
}

/// Reads one value at the row's current path. Returns whether it was an object (what the root
/// must be).
struct ValueReader<'r, 'a> {
    row: &'r mut RowScratch<'a>,
    root: bool,
}

impl<'de> ValueReader<'_, 'de> {
    /// Records a cell at the current path; a scalar or list at the root is not an event.
    fn cell(self, pending: Pending<'de>) -> bool {
        if self.root {
            return false;
        }
        let start = self.row.paths.len();
        self.row.paths.push_str(&self.row.path);
        let end = self.row.paths.len();
        self.row.cells.push((start..end, pending));
        true
    }

    fn string(self, s: &str, borrowed: Option<&'de str>) -> bool {
        if !self.root
            && DATETIME_PATHS.contains(&self.row.path.as_str())
            && let Some(ms) = parse_timestamp_ms(s)
        {
            if self.row.path == TIMESTAMP_PATH {
                self.row.timestamp_ms = Some(ms);
            }
            return self.cell(Pending::DateTime(ms));
        }
        let pending = match borrowed {
            Some(b) => Pending::Str(b),
            None => {
                let start = self.row.owned.len();
                self.row.owned.push_str(s);
                Pending::OwnedStr(start..self.row.owned.len())
            }
        };
        self.cell(pending)
    }
}

impl<'de> DeserializeSeed<'de> for ValueReader<'_, 'de> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueReader<'_, 'de> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let row = self.row;
        let path_len = row.path.len();
        // This object's names are the entries of `names` from here on: a nested object's names
        // are cut off again when it ends.
        let floor = row.names.len();
        let name_text_len = row.name_text.len();
        let mut any = false;
        while map
            .next_key_seed(NameReader {
                row: &mut *row,
                floor,
            })?
            .is_some()
        {
            any = true;
            map.next_value_seed(ValueReader {
                row: &mut *row,
                root: false,
            })?;
            row.path.truncate(path_len);
        }
        row.names.truncate(floor);
        row.name_text.truncate(name_text_len);
        if !any && !self.root {
            let start = row.paths.len();
            row.paths.push_str(&row.path);
            let end = row.paths.len();
            row.cells.push((start..end, Pending::EmptyObject));
        }
        Ok(true)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        if self.root {
            return Ok(false);
        }
        let start = self.row.owned.len();
        self.row.owned.push_str(&Value::Array(items).to_string());
        let range = start..self.row.owned.len();
        Ok(self.cell(Pending::List(range)))
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<bool, E> {
        Ok(self.string(s, Some(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<bool, E> {
        Ok(self.string(s, None))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<bool, E> {
        Ok(self.cell(Pending::Num(n as f64)))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<bool, E> {
        Ok(self.cell(Pending::Num(n as f64)))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<bool, E> {
        Ok(self.cell(Pending::Num(n)))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<bool, E> {
        Ok(self.cell(Pending::Bool(b)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(self.cell(Pending::Null))
    }
}

/// Reads a property name of the object whose names start at `floor`: notes whether the object
/// already had it, and appends it to the path.
struct NameReader<'r, 'a> {
    row: &'r mut RowScratch<'a>,
    floor: usize,
}

impl<'de> DeserializeSeed<'de> for NameReader<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameReader<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a property name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<(), E> {
        let row = self.row;
        // An object's names are few: a scan is cheaper than a set.
        // A name that is empty or holds a dot (Keen allows neither) could flatten onto another
        // name's path; the reference path decides what such an event stores.
        if name.is_empty()
            || name.contains('.')
            || row.names[self.floor..]
                .iter()
                .any(|r| &row.name_text[r.clone()] == name)
        {
            row.needs_reference = true;
        }
        let start = row.name_text.len();
        row.name_text.push_str(name);
        row.names.push(start..row.name_text.len());
        if !row.path.is_empty() {
            row.path.push('.');
        }
        row.path.push_str(name);
        Ok(())
    }
}

/// The reference path: parses the event into a `Value` tree and flattens it. Returns the row's
/// `keen.timestamp` (0 when missing or not a datetime) and its cells by path.
fn flatten_event(map: Map<String, Value>) -> (i64, Vec<(String, Value)>) {
    let mut cells = Vec::new();
    flatten(String::new(), map, &mut cells);
    let ts = cells
        .iter()
        .find(|(path, _)| path == TIMESTAMP_PATH)
        .and_then(|(_, v)| v.as_str())
        .and_then(parse_timestamp_ms)
        .unwrap_or(0);
    (ts, cells)
}

fn flatten(prefix: String, map: Map<String, Value>, out: &mut Vec<(String, Value)>) {
    if map.is_empty() && !prefix.is_empty() {
        out.push((prefix, Value::Object(Map::new())));
        return;
    }
    for (key, value) in map {
        let path = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Object(inner) => flatten(path, inner, out),
            other => out.push((path, other)),
        }
    }
}

/// Sets `row` of `builder` (the column of `path`) to a flattened value.
fn set_value(builder: &mut ColumnBuilder, row: usize, path: &str, value: &Value) {
    let list;
    let cell = match value {
        Value::Null => Cell::Null,
        Value::Bool(b) => Cell::Bool(*b),
        Value::Number(n) => Cell::Num(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => match DATETIME_PATHS
            .contains(&path)
            .then(|| parse_timestamp_ms(s))
            .flatten()
        {
            Some(ms) => Cell::DateTime(ms),
            None => Cell::Str(s),
        },
        Value::Array(_) => {
            list = value.to_string();
            Cell::List(&list)
        }
        Value::Object(_) => Cell::EmptyObject,
    };
    builder.set(row, cell);
}

/// The reference builder: each event parsed into a `Value` tree and flattened, rows sorted by
/// time, then columns built in that order. Slow (a tree and a string per path, per event), kept
/// to check [`SegmentBuilder`] against.
#[cfg(test)]
pub(crate) fn from_values<'a>(events: impl IntoIterator<Item = &'a str>) -> (Segment, usize) {
    let mut rows: Vec<(i64, Vec<(String, Value)>)> = Vec::new();
    let mut skipped = 0;
    for text in events {
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
            skipped += 1;
            continue;
        };
        rows.push(flatten_event(map));
    }
    rows.sort_by_key(|(ts, _)| *ts);
    let mut builders: std::collections::BTreeMap<Arc<str>, ColumnBuilder> = Default::default();
    let mut timestamps = Vec::with_capacity(rows.len());
    for (row, (ts, cells)) in rows.iter().enumerate() {
        timestamps.push(*ts);
        for (path, value) in cells {
            if !builders.contains_key(path.as_str()) {
                builders.insert(Arc::from(path.as_str()), ColumnBuilder::default());
            }
            let builder = builders.get_mut(path.as_str()).expect("inserted above");
            set_value(builder, row, path, value);
        }
    }
    let n = timestamps.len();
    let columns = builders.into_iter().map(|(k, b)| (k, b.finish(n))).collect();
    (Segment { timestamps, columns }, skipped)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn streaming(texts: &[String]) -> (Segment, usize) {
        let mut builder = SegmentBuilder::default();
        for text in texts {
            builder.add(text);
        }
        builder.finish()
    }

    /// Segments are equal column by column: tags, number slots (bit for bit), code slots and
    /// dictionaries in order.
    fn assert_same(a: &(Segment, usize), b: &(Segment, usize)) {
        assert_eq!(a.1, b.1, "skipped");
        assert_eq!(a.0.timestamps, b.0.timestamps, "timestamps");
        let paths = |s: &Segment| s.columns.keys().cloned().collect::<Vec<_>>();
        assert_eq!(paths(&a.0), paths(&b.0), "paths");
        for (path, x) in &a.0.columns {
            let y = &b.0.columns[path];
            assert_eq!(x.tags, y.tags, "{path} tags");
            let bits = |c: &Column| c.nums.iter().map(|n| n.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(x), bits(y), "{path} nums");
            assert_eq!(x.codes, y.codes, "{path} codes");
            assert_eq!(x.dict, y.dict, "{path} dict");
        }
    }

    fn check(texts: &[String]) {
        assert_same(&streaming(texts), &from_values(texts.iter().map(String::as_str)));
    }

    #[test]
    fn cases_the_reference_path_defines() {
        let texts: Vec<String> = [
            r#"{"keen":{"timestamp":"2026-01-02T00:00:00.000Z","created_at":"2026-01-02T00:00:01.000Z","id":"b"},"price":5,"user":{"id":"u1","tags":["a",1, {"x": 2.50}]}}"#,
            r#"{"keen":{"timestamp":"2026-01-01T00:00:00.000Z","id":"a"},"price":"five","empty":{},"n":null,"ok":true,"f":1.25}"#,
            r#"{"keen":{"timestamp":"not a time","created_at":7},"esc":"a"bé
","big":18446744073709551616,"neg":-3}"#,
            r#"{"a":1,"a":{"b":2}}"#,
            r#"{"a":{"x":1},"b":2,"a":{"y":3}}"#,
            r#"{"a":{"x":1,"x":[1]}}"#,
            r#"{"a":{"b":{"x":1}},"c":{"b":{"x":2}}}"#,
            r#"{}"#,
            r#"[1,2]"#,
            r#""text""#,
            r#"{"a":1} trailing"#,
            r#"{"a":"#,
            r#"  {"keen":{"timestamp":"2025-12-31T23:59:59.999Z"},"a":[]}  "#,
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        check(&texts);
        let (segment, skipped) = streaming(&texts);
        assert_eq!(skipped, 5);
        assert_eq!(segment.rows(), 8);
    }

    #[test]
    fn a_repeated_name_keeps_its_last_value() {
        let (segment, _) = streaming(&[r#"{"a":{"x":1},"b":2,"a":{"y":3}}"#.to_string()]);
        assert_eq!(segment.event_json(0), json!({"a": {"y": 3}, "b": 2}));
    }

    #[test]
    fn rows_of_changing_shapes_land_in_their_columns() {
        let texts: Vec<String> = (0..50)
            .map(|i| match i % 3 {
                0 => json!({"a": i, "b": "x", "c": {"d": i}}),
                1 => json!({"b": "y", "c": {"d": i}, "e": [i]}),
                _ => json!({"a": i, "z": null}),
            })
            .map(|v| v.to_string())
            .collect();
        check(&texts);
        let (segment, _) = streaming(&texts);
        for (i, text) in texts.iter().enumerate() {
            let expected: Value = serde_json::from_str(text).unwrap();
            assert_eq!(segment.event_json(i), expected);
        }
    }

    fn name() -> impl Strategy<Value = String> {
        // Few names, so objects repeat names and rows share and change shapes.
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("keen".to_string()),
            Just("timestamp".to_string()),
            Just("created_at".to_string()),
            Just("é\"q".to_string()),
        ]
    }

    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            (-1e6f64..1e6).prop_map(|f| format!("{f:e}")),
            Just("1e400".to_string()),
            Just("18446744073709551616".to_string()),
            // Escapes (quotes, backslashes, control and non-ASCII characters) make serde_json
            // hand over an unescaped copy instead of a slice of the text.
            "[a-c\"\\\\\n\u{e9}]{0,4}".prop_map(|s| Value::String(s).to_string()),
            // Not JSON: the event is skipped by both paths.
            Just("\"unterminated".to_string()),
            Just("\"2026-01-02T03:04:05.678Z\"".to_string()),
            Just("\"2026-01-02T03:04:05+02:00\"".to_string()),
            Just("\"\\u0041b\"".to_string()),
        ]
    }

    /// JSON text, written by hand so that it can repeat names and vary spacing.
    fn json_text() -> impl Strategy<Value = String> {
        scalar().prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec((name(), inner), 0..5).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{}: {v}", Value::String(k)))
                        .collect();
                    format!("{{ {} }}", members.join(","))
                }),
            ]
        })
    }

    /// An event: mostly one with a `keen.timestamp` (a few distinct times, so rows arrive out of
    /// order and tie), sometimes any JSON text at all.
    fn event() -> impl Strategy<Value = String> {
        let timestamp = prop_oneof![
            (0u32..4).prop_map(|h| format!("\"2026-01-02T0{h}:00:00.000Z\"")),
            Just("\"2026-01-02T05:00:00+02:00\"".to_string()),
            Just("\"soon\"".to_string()),
            Just("17".to_string()),
        ];
        prop_oneof![
            1 => json_text(),
            3 => (timestamp, json_text(), json_text()).prop_map(|(ts, a, b)| {
                format!(r#"{{"keen":{{"timestamp":{ts},"id":{a}}},"x":{b}}}"#)
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn streaming_builds_what_the_reference_builds(texts in prop::collection::vec(event(), 0..12)) {
            check(&texts);
        }
    }
}
