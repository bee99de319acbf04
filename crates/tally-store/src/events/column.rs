//! One property's values in one segment, every JSON type kept.
//!
//! JSON is schemaless: `price` may be a number in one event and a string in the next. A column
//! therefore stores, per row, a type tag ([`Tag`]) and the value in the slot that type uses:
//! numbers and datetimes in `nums` (f64; datetimes as UTC milliseconds), strings, lists and empty
//! objects as codes into the segment column's dictionary (`codes`), booleans as code 0 or 1. A
//! slot vector exists only once some row needs it, so a numeric column carries no codes and a
//! string column no floats. Queries work on tags and codes; a string filter is decided once per
//! dictionary entry, and grouping uses codes, not strings.

use std::hash::BuildHasher;
use std::sync::OnceLock;

/// A row's type in a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Tag {
    /// The event has no such property.
    Absent = 0,
    /// JSON `null`.
    Null = 1,
    /// A number (`nums`).
    Num = 2,
    /// A string (`codes` → dictionary).
    Str = 3,
    /// A boolean (`codes`: 0 or 1).
    Bool = 4,
    /// A list of primitives, as JSON text (`codes` → dictionary).
    List = 5,
    /// An empty object, `{}` (nothing to flatten, still part of the event).
    EmptyObject = 6,
    /// `keen.timestamp` and `keen.created_at`: UTC milliseconds (`nums`).
    DateTime = 7,
}

impl Tag {
    /// The tag for a stored byte; unknown bytes (a damaged file) read as absent.
    pub fn from_u8(byte: u8) -> Tag {
        match byte {
            1 => Tag::Null,
            2 => Tag::Num,
            3 => Tag::Str,
            4 => Tag::Bool,
            5 => Tag::List,
            6 => Tag::EmptyObject,
            7 => Tag::DateTime,
            _ => Tag::Absent,
        }
    }

    /// Keen's schema type name (reference section 5).
    pub fn keen_type(self) -> &'static str {
        match self {
            Tag::Absent | Tag::Null => "null",
            Tag::Num => "num",
            Tag::Str => "string",
            Tag::Bool => "bool",
            Tag::List => "list",
            Tag::EmptyObject => "object",
            Tag::DateTime => "datetime",
        }
    }
}

/// One value, borrowed from a column or from an event being stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    Null,
    Num(f64),
    Str(&'a str),
    Bool(bool),
    /// JSON text of a list.
    List(&'a str),
    EmptyObject,
    /// UTC milliseconds.
    DateTime(i64),
}

/// The 128-bit hash of a string or list text, as [`Column::dict_hashes`] holds it (XXH3-128).
/// Distinct counts of strings compare these instead of the strings, as ClickHouse's
/// `uniqExact` does: two different strings are counted as one only if their 128-bit hashes
/// collide, which for a billion distinct strings has a chance below 10⁻²⁰. Users that need the
/// values themselves use the low 64 bits as a hash and compare values.
pub fn text_hash(text: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(text.as_bytes())
}

/// A column's distinct strings and list texts, by dictionary code: all their bytes in one
/// buffer, and where each entry ends. Two allocations per column instead of one per string, so
/// building, merging and dropping segments whose columns have a value per event (event ids, IP
/// addresses, session ids) no longer allocates, reference-counts and frees every string (an
/// `Arc<str>` each before: `tally bench store` measured the write path at 3.86–3.99 µs per
/// event with this, 4.50–4.81 µs with those).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dict {
    /// The entries' text, one after another.
    text: String,
    /// `ends[code]` is where entry `code` ends in `text`; it starts where the one before ends.
    ends: Vec<usize>,
}

impl Dict {
    /// An empty dictionary with room for `entries` entries of `bytes` bytes in all.
    pub(crate) fn with_capacity(entries: usize, bytes: usize) -> Dict {
        Dict {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(entries),
        }
    }

    /// Appends `s` (whether or not it is already there) and returns its code.
    pub(crate) fn push(&mut self, s: &str) -> u32 {
        self.text.push_str(s);
        self.ends.push(self.text.len());
        (self.ends.len() - 1) as u32
    }

    /// The entry with code `code`.
    #[inline]
    pub fn get(&self, code: usize) -> &str {
        let start = if code == 0 { 0 } else { self.ends[code - 1] };
        &self.text[start..self.ends[code]]
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The entries in code order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|code| self.get(code))
    }

    /// The bytes of all entries together.
    pub(crate) fn text_len(&self) -> usize {
        self.text.len()
    }

    /// Approximate bytes held in memory.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }

    /// Gives back room reserved and not used, when it is more than a quarter: a merged
    /// dictionary is sized for every part's entries (a column repeating long values across
    /// parts fills a fraction of that), a decoded one grows by doubling, and such segments are
    /// held for as long as they exist. A fresh segment's (built from a batch) is left as it
    /// is: it lives until the next flush merges it.
    pub(crate) fn release_slack(&mut self) {
        if self.text.capacity() > self.text.len() + self.text.len() / 4 {
            self.text.shrink_to_fit();
        }
        if self.ends.capacity() > self.ends.len() + self.ends.len() / 4 {
            self.ends.shrink_to_fit();
        }
    }
}

impl std::ops::Index<usize> for Dict {
    type Output = str;

    #[inline]
    fn index(&self, code: usize) -> &str {
        self.get(code)
    }
}

/// Builds a [`Dict`] of distinct entries: each string gets the code it got the first time.
#[derive(Debug, Default)]
pub(crate) struct DictInterner {
    dict: Dict,
    /// Codes, found by the hash of their entry's text.
    codes: hashbrown::HashTable<u32>,
}

impl DictInterner {
    /// Room for `entries` distinct entries of `bytes` bytes in all, without growing.
    pub(crate) fn with_capacity(entries: usize, bytes: usize) -> Self {
        Self {
            dict: Dict::with_capacity(entries, bytes),
            codes: hashbrown::HashTable::with_capacity(entries),
        }
    }

    /// The code of `s`, adding it if it is new.
    pub(crate) fn intern(&mut self, s: &str) -> u32 {
        let Self { dict, codes } = self;
        let hash = interning_hash(s);
        if let Some(&code) = codes.find(hash, |&code| dict.get(code as usize) == s) {
            return code;
        }
        let code = dict.push(s);
        codes.insert_unique(hash, code, |&code| interning_hash(dict.get(code as usize)));
        code
    }

    /// The dictionary (with any room it does not use: see [`Dict::release_slack`]).
    pub(crate) fn finish(self) -> Dict {
        self.dict
    }
}

/// The hash the interner files entries under (fast; not [`text_hash`], which is for counting).
fn interning_hash(s: &str) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(s)
}

/// A column of a sealed segment.
#[derive(Debug, Clone)]
pub struct Column {
    /// One [`Tag`] byte per row.
    pub(crate) tags: Vec<u8>,
    /// Numbers and datetimes, one slot per row; empty when no row has one.
    pub(crate) nums: Vec<f64>,
    /// Dictionary codes and booleans, one slot per row; empty when no row has one.
    pub(crate) codes: Vec<u32>,
    /// Distinct strings and list texts of this column in this segment.
    pub(crate) dict: Dict,
    /// [`text_hash`] of each dictionary entry, computed the first time a query needs them
    /// (distinct counts, sets of values): merging distinct values across segments then compares
    /// 16-byte hashes in one array instead of hashing strings scattered over the heap. Lazily,
    /// because only the columns such queries touch need them.
    pub(crate) dict_hashes: OnceLock<Vec<u128>>,
    /// Summary of the numbers, so that a segment wholly inside a query's time range can answer
    /// count, sum, minimum and maximum without a scan (what DuckDB's zone maps do).
    pub(crate) stats: NumStats,
    /// How many rows carry each tag (indexed by the tag byte): lets a query pick a plan (e.g.
    /// "only strings: group by dictionary code") without scanning.
    pub(crate) counts: [u64; 8],
}

/// Count, sum, minimum and maximum of a column's numbers (not datetimes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumStats {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for NumStats {
    fn default() -> Self {
        Self {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl NumStats {
    fn of(tags: &[u8], nums: &[f64]) -> NumStats {
        let mut s = NumStats::default();
        if nums.is_empty() {
            return s;
        }
        for (&tag, &n) in tags.iter().zip(nums) {
            if tag == Tag::Num as u8 {
                s.count += 1;
                s.sum += n;
                s.min = s.min.min(n);
                s.max = s.max.max(n);
            }
        }
        s
    }
}

impl Column {
    /// A column from its parts; the number summary is computed here.
    pub(crate) fn new(tags: Vec<u8>, nums: Vec<f64>, codes: Vec<u32>, dict: Dict) -> Column {
        let stats = NumStats::of(&tags, &nums);
        let mut counts = [0u64; 8];
        for &tag in &tags {
            counts[(tag & 7) as usize] += 1;
        }
        Column {
            tags,
            nums,
            codes,
            dict,
            dict_hashes: OnceLock::new(),
            stats,
            counts,
        }
    }

    /// [`text_hash`] of each dictionary entry, by code.
    pub fn dict_hashes(&self) -> &[u128] {
        self.dict_hashes
            .get_or_init(|| self.dict.iter().map(text_hash).collect())
    }

    /// Count, sum, minimum and maximum of the numbers.
    pub fn num_stats(&self) -> NumStats {
        self.stats
    }

    /// The row count.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    /// Whether the column has no rows.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// The tag bytes, one per row.
    pub fn tags(&self) -> &[u8] {
        &self.tags
    }

    /// The tag of `row`.
    #[inline]
    pub fn tag(&self, row: usize) -> Tag {
        Tag::from_u8(self.tags[row])
    }

    /// The number slots (empty if the column has no numbers or datetimes).
    pub fn nums(&self) -> &[f64] {
        &self.nums
    }

    /// The code slots (empty if the column has no strings, lists or booleans).
    pub fn codes(&self) -> &[u32] {
        &self.codes
    }

    /// The dictionary the codes of strings and lists point into.
    pub fn dict(&self) -> &Dict {
        &self.dict
    }

    /// The value at `row`, or `None` when absent.
    #[inline]
    pub fn cell(&self, row: usize) -> Option<Cell<'_>> {
        Some(match self.tag(row) {
            Tag::Absent => return None,
            Tag::Null => Cell::Null,
            Tag::Num => Cell::Num(self.nums[row]),
            Tag::DateTime => Cell::DateTime(self.nums[row] as i64),
            Tag::Str => Cell::Str(&self.dict[self.codes[row] as usize]),
            Tag::List => Cell::List(&self.dict[self.codes[row] as usize]),
            Tag::Bool => Cell::Bool(self.codes[row] != 0),
            Tag::EmptyObject => Cell::EmptyObject,
        })
    }

    /// How many rows carry each tag, indexed by the tag byte.
    pub fn tag_counts(&self) -> [u64; 8] {
        self.counts
    }

    /// Whether every present value is a string (or null): then the codes are the values.
    pub fn only_strings(&self) -> bool {
        let c = self.counts;
        c[Tag::Num as usize]
            + c[Tag::Bool as usize]
            + c[Tag::List as usize]
            + c[Tag::EmptyObject as usize]
            + c[Tag::DateTime as usize]
            == 0
    }

    /// The column's Keen type: the most frequent non-null type, `null` if there is none.
    pub fn keen_type(&self) -> &'static str {
        dominant_type(&self.tag_counts())
    }

    /// Approximate bytes held in memory.
    pub fn heap_bytes(&self) -> usize {
        self.tags.len()
            + self.nums.len() * 8
            + self.codes.len() * 4
            + self.dict.heap_bytes()
            + self.dict_hashes.get().map_or(0, |h| h.len() * 16)
    }

    /// The column restricted to `rows` (in that order).
    pub(crate) fn gather(&self, rows: &[u32]) -> Column {
        let (tags, nums) = self.gather_tags_and_nums(rows);
        let codes = if self.codes.is_empty() {
            Vec::new()
        } else {
            rows.iter().map(|&r| self.codes[r as usize]).collect()
        };
        Column::new(tags, nums, codes, self.dict.clone())
    }

    /// The tag and number slots of `rows`, in that order.
    fn gather_tags_and_nums(&self, rows: &[u32]) -> (Vec<u8>, Vec<f64>) {
        let tags = rows.iter().map(|&r| self.tags[r as usize]).collect();
        let nums = if self.nums.is_empty() {
            Vec::new()
        } else {
            rows.iter().map(|&r| self.nums[r as usize]).collect()
        };
        (tags, nums)
    }

    /// The column with its rows in the order `rows` gives (a permutation of all rows), its
    /// dictionary renumbered by first appearance in that order: what building the column row
    /// by row in that order would have made.
    pub(crate) fn gather_recoded(&self, rows: &[u32]) -> Column {
        let (tags, nums) = self.gather_tags_and_nums(rows);
        let mut dict = Dict::with_capacity(self.dict.len(), self.dict.text_len());
        let codes = if self.codes.is_empty() {
            Vec::new()
        } else {
            let mut renumbered = vec![u32::MAX; self.dict.len()];
            rows.iter()
                .zip(&tags)
                .map(|(&r, &tag)| {
                    let code = self.codes[r as usize];
                    if tag != Tag::Str as u8 && tag != Tag::List as u8 {
                        return code;
                    }
                    let new = &mut renumbered[code as usize];
                    if *new == u32::MAX {
                        *new = dict.push(self.dict.get(code as usize));
                    }
                    *new
                })
                .collect()
        };
        Column::new(tags, nums, codes, dict)
    }
}

/// The Keen type name for a column given how many rows carry each tag.
pub fn dominant_type(counts: &[u64; 8]) -> &'static str {
    let mut best: Option<(u64, u8)> = None;
    for tag in 2..8u8 {
        let n = counts[tag as usize];
        if n > 0 && best.is_none_or(|(m, _)| n > m) {
            best = Some((n, tag));
        }
    }
    best.map_or("null", |(_, tag)| Tag::from_u8(tag).keen_type())
}

/// Builds a column row by row. Rows a property skips are filled in as absent.
#[derive(Debug, Default)]
pub(crate) struct ColumnBuilder {
    tags: Vec<u8>,
    nums: Vec<f64>,
    codes: Vec<u32>,
    dict: DictInterner,
    /// The rows the column will have, when known: every slot vector in use ends that long, so
    /// each is allocated once at that size instead of growing by doubling (each growth is a
    /// copy, and new memory is costly to touch).
    rows: usize,
}

impl ColumnBuilder {
    /// A builder for a column of `rows` rows.
    pub(crate) fn with_rows(rows: usize) -> Self {
        Self {
            tags: Vec::with_capacity(rows),
            rows,
            ..Self::default()
        }
    }

    /// Sets `row` (which must not be before the last row set) to `cell`. Setting the last row
    /// again replaces its value (the last one wins, and the column keeps one slot per row).
    pub(crate) fn set(&mut self, row: usize, cell: Cell<'_>) {
        if self.tags.len() == row + 1 {
            self.tags.truncate(row);
            self.nums.truncate(row);
            self.codes.truncate(row);
        }
        self.pad(row);
        match cell {
            Cell::Null => self.push(Tag::Null, None, None),
            Cell::Num(n) => self.push(Tag::Num, Some(n), None),
            Cell::DateTime(ms) => self.push(Tag::DateTime, Some(ms as f64), None),
            Cell::Bool(b) => self.push(Tag::Bool, None, Some(b as u32)),
            Cell::Str(s) => {
                let code = self.dict.intern(s);
                self.push(Tag::Str, None, Some(code))
            }
            Cell::List(s) => {
                let code = self.dict.intern(s);
                self.push(Tag::List, None, Some(code))
            }
            Cell::EmptyObject => self.push(Tag::EmptyObject, None, None),
        }
    }

    fn push(&mut self, tag: Tag, num: Option<f64>, code: Option<u32>) {
        let row = self.tags.len();
        self.tags.push(tag as u8);
        if let Some(n) = num {
            if self.nums.capacity() == 0 {
                self.nums.reserve_exact(self.rows.max(row + 1));
            }
            if self.nums.len() < row {
                self.nums.resize(row, 0.0);
            }
            self.nums.push(n);
        }
        if let Some(c) = code {
            if self.codes.capacity() == 0 {
                self.codes.reserve_exact(self.rows.max(row + 1));
            }
            if self.codes.len() < row {
                self.codes.resize(row, 0);
            }
            self.codes.push(c);
        }
    }

    fn pad(&mut self, rows: usize) {
        if self.tags.len() < rows {
            self.tags.resize(rows, Tag::Absent as u8);
        }
    }

    /// The column with `rows` rows; slot vectors padded to full length.
    pub(crate) fn finish(mut self, rows: usize) -> Column {
        self.pad(rows);
        if !self.nums.is_empty() {
            self.nums.resize(rows, 0.0);
        }
        if !self.codes.is_empty() {
            self.codes.resize(rows, 0);
        }
        Column::new(self.tags, self.nums, self.codes, self.dict.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_types_keep_every_value() {
        let mut b = ColumnBuilder::default();
        b.set(0, Cell::Num(1.5));
        b.set(2, Cell::Str("x"));
        b.set(3, Cell::Bool(true));
        b.set(4, Cell::Str("x"));
        b.set(5, Cell::List("[1,2]"));
        b.set(6, Cell::Null);
        let c = b.finish(8);
        assert_eq!(c.len(), 8);
        assert_eq!(c.cell(0), Some(Cell::Num(1.5)));
        assert_eq!(c.cell(1), None);
        assert_eq!(c.cell(2), Some(Cell::Str("x")));
        assert_eq!(c.cell(3), Some(Cell::Bool(true)));
        assert_eq!(c.cell(4), Some(Cell::Str("x")));
        assert_eq!(c.cell(5), Some(Cell::List("[1,2]")));
        assert_eq!(c.cell(6), Some(Cell::Null));
        assert_eq!(c.cell(7), None);
        assert_eq!(c.dict().len(), 2);
        assert_eq!(c.keen_type(), "string");
    }

    proptest::proptest! {
        /// Interning gives each distinct string one code, in order of first appearance, and
        /// the dictionary gives every string back (empty and multi-byte ones included).
        #[test]
        fn interned_strings_come_back_by_code(
            strings in proptest::collection::vec("(|a|b|ab|é|[a-z€]{0,12})", 0..200),
            sized in proptest::bool::ANY,
        ) {
            let mut interner = if sized { DictInterner::with_capacity(4, 8) } else { DictInterner::default() };
            let codes: Vec<u32> = strings.iter().map(|s| interner.intern(s)).collect();
            let dict = interner.finish();
            let mut first_seen: Vec<&str> = Vec::new();
            for (s, &code) in strings.iter().zip(&codes) {
                proptest::prop_assert_eq!(&dict[code as usize], s.as_str());
                if !first_seen.contains(&s.as_str()) {
                    proptest::prop_assert_eq!(code as usize, first_seen.len());
                    first_seen.push(s);
                }
            }
            proptest::prop_assert_eq!(dict.len(), first_seen.len());
            proptest::prop_assert_eq!(dict.iter().collect::<Vec<_>>(), first_seen);
        }
    }
}
