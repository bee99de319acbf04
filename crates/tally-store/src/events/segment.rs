//! A segment: an immutable, time-sorted block of one collection's events, stored by column.
//!
//! Events are flattened to dotted property paths (`user.id`); Keen property names cannot contain
//! `.`, so the flattening is reversible and [`Segment::event_json`] gives each event back as it was
//! stored (key order aside, which carries no meaning). Rows are sorted by `keen.timestamp`
//! ([`Segment::timestamps`]), so a query finds its time range by binary search and skips segments
//! whose `[min_ts, max_ts]` misses it.
//!
//! On disk a segment is one file: a header, the timestamps, then each column (tags, number slots,
//! code slots, dictionary), ending in a CRC-32C of everything before it. A file that fails the
//! check is refused, never half-read.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;

use serde_json::{Map, Value};
use tally_core::time::format_timestamp_ms;

use super::build::SegmentBuilder;
use super::column::{Cell, Column, Dict, DictInterner, Tag};
use super::pace::Pacer;

/// How many rows (or dictionary entries) a merge copies between calls to its pacer.
const PACE_ROWS: usize = 1 << 14;

/// An immutable block of events of one collection, sorted by `keen.timestamp`.
#[derive(Debug, Clone, Default)]
pub struct Segment {
    /// `keen.timestamp` of each row, UTC milliseconds, ascending.
    pub(crate) timestamps: Vec<i64>,
    /// Columns by dotted property path.
    pub(crate) columns: BTreeMap<Arc<str>, Column>,
}

impl Segment {
    /// The row count.
    pub fn rows(&self) -> usize {
        self.timestamps.len()
    }

    /// `keen.timestamp` per row, ascending.
    pub fn timestamps(&self) -> &[i64] {
        &self.timestamps
    }

    /// The earliest and latest `keen.timestamp`, if the segment has rows.
    pub fn time_bounds(&self) -> Option<(i64, i64)> {
        Some((*self.timestamps.first()?, *self.timestamps.last()?))
    }

    /// The rows whose timestamp lies in `[start_ms, end_ms)`.
    pub fn row_range(&self, start_ms: i64, end_ms: i64) -> std::ops::Range<usize> {
        let from = self.timestamps.partition_point(|&t| t < start_ms);
        let to = self.timestamps.partition_point(|&t| t < end_ms);
        from..to.max(from)
    }

    /// The column of a dotted property path.
    pub fn column(&self, path: &str) -> Option<&Column> {
        self.columns.get(path)
    }

    /// Every column, by path.
    pub fn columns(&self) -> impl Iterator<Item = (&str, &Column)> {
        self.columns.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// Approximate bytes held in memory.
    pub fn heap_bytes(&self) -> usize {
        self.timestamps.len() * 8 + self.columns.values().map(Column::heap_bytes).sum::<usize>()
    }

    /// Builds a segment from events given as JSON text (see [`super::build`]). Events that are
    /// not JSON objects are skipped and counted in the second return value (the process stage
    /// never produces them).
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a str>) -> (Segment, usize) {
        let events = events.into_iter();
        let mut builder = SegmentBuilder::with_rows(events.size_hint().0);
        for text in events {
            builder.add(text);
        }
        builder.finish()
    }

    /// Concatenates segments into one, sorted by time.
    pub fn merge(parts: &[&Segment]) -> Segment {
        Self::merge_paced(parts, &mut Pacer::unpaced())
    }

    /// [`Segment::merge`], calling `pacer` at points where the work may rest (between columns
    /// and every [`PACE_ROWS`] rows).
    pub(crate) fn merge_paced(parts: &[&Segment], pacer: &mut Pacer<'_>) -> Segment {
        let mut order: Vec<(i64, u32, u32)> = Vec::with_capacity(parts.iter().map(|s| s.rows()).sum());
        for (p, seg) in parts.iter().enumerate() {
            order.extend(
                seg.timestamps
                    .iter()
                    .enumerate()
                    .map(|(r, &t)| (t, p as u32, r as u32)),
            );
        }
        // Stable, by time alone: rows of equal time keep part order, then row order, as
        // they were pushed (each part is already sorted, so this merges runs).
        order.sort_by_key(|&(t, _, _)| t);
        let n = order.len();
        // Column by column: each part's dictionary is mapped into the merged one once, then
        // rows are copied slot by slot in time order (no per-cell lookups by name or string).
        let mut paths: Vec<&Arc<str>> = parts.iter().flat_map(|s| s.columns.keys()).collect();
        paths.sort();
        paths.dedup();
        let mut columns = BTreeMap::new();
        for path in paths {
            let sources: Vec<Option<&Column>> = parts.iter().map(|s| s.columns.get(path.as_ref())).collect();
            // Sized for the case of no string in common (ids), so the table never grows.
            let entries = sources.iter().flatten().map(|c| c.dict.len()).sum::<usize>();
            let bytes = sources.iter().flatten().map(|c| c.dict.text_len()).sum::<usize>();
            let mut dict = DictInterner::with_capacity(entries, bytes);
            let remaps: Vec<Vec<u32>> = sources
                .iter()
                .map(|c| {
                    c.map_or_else(Vec::new, |c| {
                        let mut remap = Vec::with_capacity(c.dict.len());
                        for (i, text) in c.dict.iter().enumerate() {
                            remap.push(dict.intern(text));
                            if i % PACE_ROWS == PACE_ROWS - 1 {
                                pacer.pace();
                            }
                        }
                        remap
                    })
                })
                .collect();
            let has_nums = sources.iter().flatten().any(|c| !c.nums.is_empty());
            let has_codes = sources.iter().flatten().any(|c| !c.codes.is_empty());
            let mut tags = Vec::with_capacity(n);
            let mut nums = Vec::with_capacity(if has_nums { n } else { 0 });
            let mut codes = Vec::with_capacity(if has_codes { n } else { 0 });
            for (i, &(_, p, r)) in order.iter().enumerate() {
                if i % PACE_ROWS == PACE_ROWS - 1 {
                    pacer.pace();
                }
                let (p, r) = (p as usize, r as usize);
                match sources[p] {
                    None => {
                        tags.push(Tag::Absent as u8);
                        if has_nums {
                            nums.push(0.0);
                        }
                        if has_codes {
                            codes.push(0);
                        }
                    }
                    Some(c) => {
                        let tag = c.tags[r];
                        tags.push(tag);
                        if has_nums {
                            nums.push(c.nums.get(r).copied().unwrap_or(0.0));
                        }
                        if has_codes {
                            let code = c.codes.get(r).copied().unwrap_or(0);
                            let is_text = tag == Tag::Str as u8 || tag == Tag::List as u8;
                            codes.push(if is_text { remaps[p][code as usize] } else { code });
                        }
                    }
                }
            }
            let mut dict = dict.finish();
            dict.release_slack();
            columns.insert(path.clone(), Column::new(tags, nums, codes, dict));
            pacer.pace();
        }
        Segment {
            timestamps: order.iter().map(|&(t, _, _)| t).collect(),
            columns,
        }
    }

    /// The segment with only the rows for which `keep` is true (order kept); columns left with
    /// no value are dropped.
    pub fn retain_rows(&self, keep: impl Fn(usize) -> bool) -> Segment {
        let rows: Vec<u32> = (0..self.rows()).filter(|&r| keep(r)).map(|r| r as u32).collect();
        let columns = self
            .columns
            .iter()
            .map(|(k, c)| (k.clone(), c.gather(&rows)))
            .filter(|(_, c)| c.tags.iter().any(|&t| t != Tag::Absent as u8))
            .collect();
        Segment {
            timestamps: rows.iter().map(|&r| self.timestamps[r as usize]).collect(),
            columns,
        }
    }

    /// The segment without the property `path` (and anything nested under it).
    pub fn without_property(&self, path: &str) -> Segment {
        let nested = format!("{path}.");
        Segment {
            timestamps: self.timestamps.clone(),
            columns: self
                .columns
                .iter()
                .filter(|(k, _)| k.as_ref() != path && !k.starts_with(&nested))
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect(),
        }
    }

    /// Row `row` as the JSON event it was stored as.
    pub fn event_json(&self, row: usize) -> Value {
        let mut root = Map::new();
        for (path, column) in &self.columns {
            if let Some(cell) = column.cell(row) {
                insert_path(&mut root, path, cell_value(cell));
            }
        }
        Value::Object(root)
    }

    /// Row `row` restricted to `paths` (each a property or an object prefix).
    pub fn event_json_only(&self, row: usize, paths: &[String]) -> Value {
        let mut root = Map::new();
        for (path, column) in &self.columns {
            let wanted = paths.iter().any(|p| {
                path.as_ref() == p
                    || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'.'))
            });
            if wanted && let Some(cell) = column.cell(row) {
                insert_path(&mut root, path, cell_value(cell));
            }
        }
        Value::Object(root)
    }

    /// The segment as file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.heap_bytes() + 64);
        self.encode_to(&mut out).expect("writing to memory does not fail");
        out
    }

    /// Writes the segment's file bytes ([`Segment::encode`]) to `sink` a piece at a time, so
    /// the whole file is never in memory at once.
    pub fn encode_to(&self, sink: &mut impl Write) -> io::Result<()> {
        let mut out = Staged::new(sink);
        out.put(MAGIC)?;
        out.put_u64(self.rows() as u64)?;
        out.put_each(&self.timestamps, i64::to_le_bytes)?;
        out.put_u64(self.columns.len() as u64)?;
        for (path, column) in &self.columns {
            out.put_bytes(path.as_bytes())?;
            out.put(&column.tags)?;
            out.put(&[u8::from(!column.nums.is_empty()) | (u8::from(!column.codes.is_empty()) << 1)])?;
            out.put_each(&column.nums, f64::to_le_bytes)?;
            out.put_each(&column.codes, u32::to_le_bytes)?;
            out.put_u64(column.dict.len() as u64)?;
            for s in column.dict.iter() {
                out.put_bytes(s.as_bytes())?;
            }
        }
        out.finish()
    }

    /// Reads a segment file's bytes, checking its CRC and structure.
    pub fn decode(bytes: &[u8]) -> Result<Segment, String> {
        if bytes.len() < MAGIC.len() + 12 {
            return Err("too short".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("checksum mismatch".into());
        }
        let mut r = Reader { bytes: body, at: 0 };
        if r.take(MAGIC.len())? != MAGIC {
            return Err("not a Tally segment".into());
        }
        let rows = r.len_of(8)?;
        let timestamps = r
            .take(rows * 8)?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let ncols = r.len_of(1)?;
        let mut columns = BTreeMap::new();
        for _ in 0..ncols {
            let path = std::str::from_utf8(r.bytes_field()?)
                .map_err(|_| "column name is not UTF-8")?
                .to_owned();
            let tags = r.take(rows)?.to_vec();
            let flags = r.take(1)?[0];
            let nums = if flags & 1 != 0 {
                r.take(rows * 8)?
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect()
            } else {
                Vec::new()
            };
            let codes: Vec<u32> = if flags & 2 != 0 {
                r.take(rows * 4)?
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect()
            } else {
                Vec::new()
            };
            // Each entry is at least its 8-byte length.
            let dict_len = r.len_of(8)?;
            let mut dict = Dict::with_capacity(dict_len, 0);
            for _ in 0..dict_len {
                let s = std::str::from_utf8(r.bytes_field()?).map_err(|_| "dictionary entry is not UTF-8")?;
                dict.push(s);
            }
            dict.release_slack();
            for (row, &tag) in tags.iter().enumerate() {
                let tag = Tag::from_u8(tag);
                let needs_num = matches!(tag, Tag::Num | Tag::DateTime);
                let needs_code = matches!(tag, Tag::Str | Tag::List | Tag::Bool);
                if (needs_num && nums.is_empty()) || (needs_code && codes.is_empty()) {
                    return Err(format!("column {path}: row {row} has no value slot"));
                }
                if matches!(tag, Tag::Str | Tag::List) && codes[row] as usize >= dict.len() {
                    return Err(format!("column {path}: row {row} points outside the dictionary"));
                }
            }
            columns.insert(Arc::from(path.as_str()), Column::new(tags, nums, codes, dict));
        }
        if r.at != body.len() {
            return Err("trailing bytes".into());
        }
        Ok(Segment { timestamps, columns })
    }
}

const MAGIC: &[u8; 8] = b"TALLYSG1";

/// A cell as the JSON value it was stored from.
pub fn cell_value(cell: Cell<'_>) -> Value {
    match cell {
        Cell::Null => Value::Null,
        Cell::Num(n) => number_value(n),
        Cell::Str(s) => Value::String(s.to_owned()),
        Cell::Bool(b) => Value::Bool(b),
        Cell::List(text) => serde_json::from_str(text).unwrap_or(Value::Null),
        Cell::EmptyObject => Value::Object(Map::new()),
        Cell::DateTime(ms) => Value::String(format_timestamp_ms(ms)),
    }
}

/// A number as JSON: integral values print without a fraction (`5`, not `5.0`).
pub fn number_value(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

fn insert_path(root: &mut Map<String, Value>, path: &str, value: Value) {
    let mut node = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            node.insert(part.to_owned(), value);
            return;
        }
        let entry = node
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        node = entry.as_object_mut().expect("made an object above");
    }
}

/// The encoder's output: bytes gather in a small buffer, which goes to the sink (and into the
/// running CRC-32C) whenever it fills; big slices go straight through.
struct Staged<'w, W: Write> {
    sink: &'w mut W,
    pending: Vec<u8>,
    crc: u32,
}

/// How many bytes [`Staged`] gathers before passing them on.
const STAGED_BYTES: usize = 64 << 10;

impl<'w, W: Write> Staged<'w, W> {
    fn new(sink: &'w mut W) -> Self {
        Self {
            sink,
            pending: Vec::with_capacity(STAGED_BYTES + 16),
            crc: 0,
        }
    }

    #[inline]
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() >= STAGED_BYTES {
            self.spill()?;
            self.crc = crc32c::crc32c_append(self.crc, bytes);
            return self.sink.write_all(bytes);
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= STAGED_BYTES {
            self.spill()?;
        }
        Ok(())
    }

    /// Each value's little-endian bytes, a buffer's worth of values at a time (one capacity
    /// check and one spill check per block, not per value).
    fn put_each<T: Copy, const N: usize>(&mut self, values: &[T], bytes: fn(T) -> [u8; N]) -> io::Result<()> {
        for block in values.chunks(STAGED_BYTES / N) {
            self.pending.reserve(block.len() * N);
            for &value in block {
                self.pending.extend_from_slice(&bytes(value));
            }
            if self.pending.len() >= STAGED_BYTES {
                self.spill()?;
            }
        }
        Ok(())
    }

    fn put_u64(&mut self, n: u64) -> io::Result<()> {
        self.put(&n.to_le_bytes())
    }

    fn put_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put_u64(bytes.len() as u64)?;
        self.put(bytes)
    }

    fn spill(&mut self) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, &self.pending);
        self.sink.write_all(&self.pending)?;
        self.pending.clear();
        Ok(())
    }

    /// Passes on what is left, then the CRC-32C of everything before it.
    fn finish(mut self) -> io::Result<()> {
        self.spill()?;
        self.sink.write_all(&self.crc.to_le_bytes())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("truncated")?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    /// A count whose items take at least `min_item_bytes` each, checked against what is left so
    /// a damaged count cannot ask for a huge allocation.
    fn len_of(&mut self, min_item_bytes: usize) -> Result<usize, String> {
        let n = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err("a count exceeds the file".into());
        }
        Ok(n as usize)
    }

    fn bytes_field(&mut self) -> Result<&'a [u8], String> {
        let n = self.len_of(1)?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use std::time::Duration;

    use super::*;

    fn seg(events: &[Value]) -> Segment {
        let texts: Vec<String> = events.iter().map(Value::to_string).collect();
        Segment::from_events(texts.iter().map(String::as_str)).0
    }

    #[test]
    fn events_round_trip_through_columns_and_files() {
        let events = vec![
            json!({"keen": {"timestamp": "2026-01-02T00:00:00.000Z", "id": "b"}, "price": 5, "user": {"id": "u1", "tags": ["a", 1]}}),
            json!({"keen": {"timestamp": "2026-01-01T00:00:00.000Z", "id": "a"}, "price": "five", "empty": {}, "n": null, "ok": true, "f": 1.25}),
        ];
        let s = seg(&events);
        assert_eq!(s.rows(), 2);
        assert_eq!(s.time_bounds(), Some((1_767_225_600_000, 1_767_312_000_000)));
        // Sorted by time: the second event comes first.
        assert_eq!(s.event_json(0), events[1]);
        assert_eq!(s.event_json(1), events[0]);
        let decoded = Segment::decode(&s.encode()).unwrap();
        assert_eq!(decoded.event_json(0), events[1]);
        assert_eq!(decoded.event_json(1), events[0]);
        assert_eq!(s.column("price").unwrap().keen_type(), "num");
        assert_eq!(s.column("keen.timestamp").unwrap().keen_type(), "datetime");
        assert_eq!(
            s.event_json_only(1, &["user".into(), "price".into()]),
            json!({"price": 5, "user": {"id": "u1", "tags": ["a", 1]}})
        );
    }

    /// A segment bigger than the encoder's staging buffer, with a column (the tags) big
    /// enough to bypass it, written through a sink that takes a few bytes per call: the file
    /// is the same as one encoded in memory, and reads back.
    #[test]
    fn big_segments_stream_to_files_unchanged() {
        struct Trickle(Vec<u8>);
        impl Write for Trickle {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                let n = bytes.len().min(7);
                self.0.extend_from_slice(&bytes[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let events: Vec<Value> = (0..STAGED_BYTES + 100)
            .map(|i| json!({"keen": {"timestamp": format!("2026-01-01T00:00:{:02}.000Z", i % 60)}, "id": format!("e{i}")}))
            .collect();
        let s = seg(&events);
        let mut trickle = Trickle(Vec::new());
        s.encode_to(&mut trickle).unwrap();
        assert_eq!(trickle.0, s.encode());
        let decoded = Segment::decode(&trickle.0).unwrap();
        assert_eq!(decoded.rows(), events.len());
        for row in [0, 1, events.len() / 2, events.len() - 1] {
            assert_eq!(decoded.event_json(row), s.event_json(row));
        }
    }

    #[test]
    fn damaged_files_are_refused() {
        let s = seg(&[json!({"keen": {"timestamp": "2026-01-02T00:00:00.000Z"}, "a": "x"})]);
        let bytes = s.encode();
        for cut in 0..bytes.len() {
            assert!(Segment::decode(&bytes[..cut]).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(Segment::decode(&flipped).is_err());
    }

    #[test]
    fn merging_gives_the_same_events_as_building_from_all_of_them() {
        let mut all = Vec::new();
        for i in 0..60i64 {
            let value = match i % 5 {
                0 => json!(i),
                1 => json!(format!("s{}", i % 7)),
                2 => json!([i % 3, "x"]),
                3 => json!(i % 2 == 0),
                _ => json!(null),
            };
            let ts = format!("2026-01-01T00:{:02}:{:02}.000Z", (i * 7) % 60, i % 60);
            let mut event = json!({"keen": {"timestamp": ts, "id": format!("{i:024}")}, "v": value});
            if i % 4 == 0 {
                event["only_some"] = json!({"deep": format!("d{}", i % 3)});
            }
            all.push(event);
        }
        let parts: Vec<Segment> = all.chunks(17).map(seg).collect();
        let merged = Segment::merge(&parts.iter().collect::<Vec<_>>());
        let whole = seg(&all);
        assert_eq!(merged.rows(), whole.rows());
        assert_eq!(merged.timestamps(), whole.timestamps());
        let by_id = |s: &Segment| {
            let mut events: Vec<Value> = (0..s.rows()).map(|r| s.event_json(r)).collect();
            events.sort_by(|a, b| a["keen"]["id"].as_str().cmp(&b["keen"]["id"].as_str()));
            events
        };
        assert_eq!(by_id(&merged), by_id(&whole));
        assert_eq!(by_id(&Segment::decode(&merged.encode()).unwrap()), by_id(&whole));
        for (path, column) in merged.columns() {
            assert_eq!(
                column.tag_counts(),
                whole.column(path).unwrap().tag_counts(),
                "{path}"
            );
        }
    }

    #[test]
    fn a_paced_merge_rests_and_gives_the_same_segment() {
        let part = |offset: usize| {
            let events: Vec<String> = (0..40_000)
                .map(|i| {
                    let day = 1 + (i * 7 + offset) % 28;
                    json!({
                        "keen": {"timestamp": format!("2026-02-{day:02}T00:00:00.000Z")},
                        "id": format!("u{}", i + offset),
                        "n": i,
                    })
                    .to_string()
                })
                .collect();
            Segment::from_events(events.iter().map(String::as_str)).0
        };
        let (a, b) = (part(0), part(40_000));
        let busy = || true;
        let mut pacer = Pacer::new(&busy, Duration::from_secs(5));
        let paced = Segment::merge_paced(&[&a, &b], &mut pacer);
        assert!(
            pacer.rested() > Duration::ZERO,
            "80,000 rows take more than one slice"
        );
        let unpaced = Segment::merge(&[&a, &b]);
        assert_eq!(paced.rows(), 80_000);
        assert_eq!(paced.timestamps(), unpaced.timestamps());
        for row in (0..80_000).step_by(997) {
            assert_eq!(paced.event_json(row), unpaced.event_json(row));
        }
    }

    #[test]
    fn merge_and_retain_keep_order_and_values() {
        let a = seg(&[
            json!({"keen": {"timestamp": "2026-01-01T00:00:00.000Z"}, "a": 1}),
            json!({"keen": {"timestamp": "2026-01-03T00:00:00.000Z"}, "a": 3}),
        ]);
        let b = seg(&[json!({"keen": {"timestamp": "2026-01-02T00:00:00.000Z"}, "b": "x"})]);
        let m = Segment::merge(&[&a, &b]);
        assert_eq!(m.rows(), 3);
        assert!(m.timestamps().is_sorted());
        assert_eq!(m.event_json(1)["b"], "x");
        assert_eq!(m.event_json(2)["a"], 3);
        let kept = m.retain_rows(|r| r != 1);
        assert_eq!(kept.rows(), 2);
        assert!(kept.column("b").is_none());
        assert_eq!(m.row_range(1_767_312_000_000, 1_767_398_400_000), 1..2);
    }
}
