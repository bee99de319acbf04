//! Differential test of the query API against an independent implementation.
//!
//! 20,000 realistic events (the shared benchmark generator, fixed seed) go into a real Tally over
//! the batch API and into DuckDB (`tests/differential/duckdb_oracle.py`, where every filter,
//! grouping and statistic is SQL). A few hundred random Keen queries, from a seeded generator
//! here, mixing every numeric and unique analysis with absolute timeframes, named and
//! fixed-offset time zones (including a DST change), intervals, typed filters (with `or`, missing
//! properties, type mismatches and lists) and one- or two-property group_by, are asked of both,
//! and the answers must agree: numbers to a relative 1e-9, everything else exactly. So it proves
//! that Tally's analyses follow reference sections 3.3 and 9 on data and queries nobody wrote
//! expected answers for.
//!
//! Random funnels (2–6 steps over the three collections, string or numeric actors, per-step
//! timeframes and filters, optional and inverted steps) are compared with the same question
//! answered by DuckDB set operations (`INTERSECT`/`EXCEPT` of each step's distinct actors).
//!
//! Before the random queries, a sweep runs every filter operator, with a value of the right JSON
//! type and of a wrong one, on the properties where absence, null, mixed types and lists matter.
//!
//! It needs Python with `duckdb`, named by `TALLY_TEST_PYTHON` (scripts/test.sh installs it).
//! Without it the test reports itself skipped, unless `TALLY_REQUIRE_ALL_TESTS` is set. To hunt
//! further, `TALLY_DIFFERENTIAL_SEED` and `TALLY_DIFFERENTIAL_QUERIES` change the random queries.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use tally_core::time::{format_timestamp_ms, parse_timestamp_ms};

use serde_json::{Map, Value, json};

use crate::support::{TestServer, status_json};

const EVENTS: usize = 20_000;
const QUERIES: usize = 300;
const FUNNELS: usize = 40;
const SEED: u64 = 0x5eed_d1ff;
/// The generator's events lie in the 30 days before 2026-11-01T00:00:00Z.
const DATA_END: &str = "2026-11-01T00:00:00Z";
/// Query timeframes fall within 2026-09-30T00:00Z..2026-11-03T00:00Z: around the data, so some
/// buckets are empty, and across New York's DST change (2026-11-01T06:00Z) and Berlin's
/// (2026-10-25T01:00Z).
const DOMAIN_START_MS: i64 = 1_790_726_400_000;
const DOMAIN_END_MS: i64 = 1_793_664_000_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// The Python that has `duckdb`, or `None` when the test should be skipped.
fn python() -> Option<String> {
    let require = std::env::var("TALLY_REQUIRE_ALL_TESTS").is_ok();
    let Ok(candidate) = std::env::var("TALLY_TEST_PYTHON") else {
        assert!(!require, "TALLY_TEST_PYTHON is not set; scripts/test.sh sets it");
        return None;
    };
    let has_duckdb = Command::new(&candidate)
        .args(["-c", "import duckdb"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_duckdb {
        return Some(candidate);
    }
    assert!(
        !require,
        "duckdb is not installed for {candidate}; scripts/test.sh installs it"
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_queries_agree_with_duckdb() {
    let Some(python) = python() else {
        println!("SKIPPED: no Python with duckdb in TALLY_TEST_PYTHON (run scripts/test.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let events_path = dir.path().join("events.jsonl");
    let events = generate_events(&python, &events_path);
    assert_eq!(events.len(), EVENTS);

    let server = TestServer::start().await;
    let mut per_collection: BTreeMap<String, u64> = BTreeMap::new();
    for chunk in events.chunks(1000) {
        let mut body: Map<String, Value> = Map::new();
        for (collection, event) in chunk {
            *per_collection.entry(collection.clone()).or_default() += 1;
            let list = body.entry(collection.clone()).or_insert_with(|| json!([]));
            list.as_array_mut().unwrap().push(event.clone());
        }
        let (status, answer) = status_json(server.post("/events", &Value::Object(body)).await).await;
        assert_eq!(status, 200, "{answer}");
        for entries in answer.as_object().unwrap().values() {
            for entry in entries.as_array().unwrap() {
                assert_eq!(entry["success"], true, "{entry}");
            }
        }
    }
    for (collection, n) in &per_collection {
        wait_count(&server, collection, *n).await;
    }

    let mut oracle = Oracle::start(&python, &events_path);
    let mut rng = Rng(knob("TALLY_DIFFERENTIAL_SEED").unwrap_or(SEED));
    let n = knob("TALLY_DIFFERENTIAL_QUERIES").map_or(QUERIES, |n| n as usize);
    let mut queries = operator_sweep(&mut rng);
    let swept = queries.len();
    let timestamps: Vec<i64> = events
        .iter()
        .map(|(_, e)| parse_ms(e["keen"]["timestamp"].as_str().unwrap()))
        .collect();
    queries.extend((0..n).map(|_| random_query(&mut rng, &timestamps)));
    let mut mismatches = Vec::new();
    let mut shapes = Shapes::default();
    let funnels: Vec<Funnel> = (0..FUNNELS).map(|_| random_funnel(&mut rng)).collect();
    let mut funnels_non_trivial = 0;
    for funnel in &funnels {
        let (status, answer) = status_json(
            server
                .http
                .post(server.project_url("/queries/funnel"))
                .header("Authorization", &server.project.read_key)
                .json(&funnel.tally)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let expected = oracle.ask(&funnel.oracle);
        if expected
            .as_array()
            .is_some_and(|counts| counts.iter().filter(|c| c.as_u64() > Some(0)).count() >= 2)
        {
            funnels_non_trivial += 1;
        }
        if status != 200 || answer["result"] != expected {
            mismatches.push(format!(
                "POST /queries/funnel {}\n  tally:  {}\n  oracle: {}",
                funnel.tally,
                truncate(&answer.to_string()),
                truncate(&expected.to_string())
            ));
        }
    }
    println!(
        "differential: compared {FUNNELS} random funnels with DuckDB set operations; {funnels_non_trivial} \
         with two or more non-empty steps"
    );
    assert!(funnels_non_trivial >= FUNNELS / 2, "{funnels_non_trivial}");
    for q in &queries {
        let body = q.tally_body();
        let (status, answer) = status_json(
            server
                .http
                .post(server.project_url(&format!("/queries/{}", q.analysis)))
                .header("Authorization", &server.project.read_key)
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let expected = oracle.ask(&q.oracle_request());
        let got = if status == 200 {
            answer["result"].clone()
        } else {
            json!({"status": status, "body": answer})
        };
        shapes.count(q, &expected);
        if status != 200 || !same(&got, &expected) {
            mismatches.push(format!(
                "POST /queries/{} {}\n  tally:  {}\n  oracle: {}",
                q.analysis,
                body,
                truncate(&got.to_string()),
                truncate(&expected.to_string())
            ));
        }
    }
    println!(
        "differential: compared {} queries with DuckDB ({swept} sweeping the filter operators, {} \
         random); {} with an interval, {} grouped, {} filtered, {} with a non-empty answer; {} \
         disagreed",
        queries.len(),
        queries.len() - swept,
        shapes.interval,
        shapes.grouped,
        shapes.filtered,
        shapes.non_trivial,
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} queries disagree with DuckDB:\n\n{}",
        mismatches.len(),
        queries.len(),
        mismatches
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    // The generator must produce queries that select something, or agreeing proves little.
    assert!(shapes.non_trivial >= queries.len() / 2, "{}", shapes.non_trivial);
}

/// A number from the environment, to explore beyond the fixed seed and count.
fn knob(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
    )
}

/// Runs the benchmark generator into `path` and returns its events as `(collection, event)`.
fn generate_events(python: &str, path: &Path) -> Vec<(String, Value)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/bench/gen_events.py");
    let file = std::fs::File::create(path).unwrap();
    let status = Command::new(python)
        .arg(&script)
        .args([
            "-n",
            &EVENTS.to_string(),
            "--seed",
            "3",
            "--end",
            DATA_END,
            "--days",
            "30",
        ])
        .stdout(file)
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let mut record: Value = serde_json::from_str(line).unwrap();
            let collection = record["collection"].as_str().unwrap().to_string();
            (collection, record["event"].take())
        })
        .collect()
}

/// Polls `count` until it reaches `n` (a hang guard, not a timing assertion).
async fn wait_count(server: &TestServer, collection: &str, n: u64) {
    let body = json!({"event_collection": collection,
        "timeframe": {"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}});
    for _ in 0..3000 {
        let response = server
            .http
            .post(server.project_url("/queries/count"))
            .header("Authorization", &server.project.read_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, answer) = status_json(response).await;
        assert_eq!(status, 200, "{answer}");
        if answer["result"].as_u64() == Some(n) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{collection} never reached {n} events");
}

/// The DuckDB oracle: a child process answering one JSON query per line.
struct Oracle {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Oracle {
    fn start(python: &str, events: &Path) -> Oracle {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/differential/duckdb_oracle.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(events)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut oracle = Oracle { child, stdin, stdout };
        assert_eq!(oracle.read(), json!({"ready": true}));
        oracle
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the DuckDB oracle exited (its stderr is above)");
        serde_json::from_str(&line).unwrap()
    }

    /// The oracle's `result` for a query; an oracle error fails the test.
    fn ask(&mut self, request: &Value) -> Value {
        writeln!(self.stdin, "{request}").unwrap();
        self.stdin.flush().unwrap();
        let mut answer = self.read();
        assert!(
            answer.get("error").is_none(),
            "the oracle failed on {request}: {answer}"
        );
        answer["result"].take()
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Equal JSON, with numbers equal to a relative 1e-9 (float sums depend on the order of addition).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn truncate(text: &str) -> String {
    const MAX: usize = 1500;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// How many compared queries had each shape, so the summary shows what was covered.
#[derive(Default)]
struct Shapes {
    interval: usize,
    grouped: usize,
    filtered: usize,
    non_trivial: usize,
}

impl Shapes {
    fn count(&mut self, q: &Query, expected: &Value) {
        self.interval += usize::from(q.interval.is_some());
        self.grouped += usize::from(!q.group_by.is_empty());
        self.filtered += usize::from(!q.filters.is_empty());
        self.non_trivial += usize::from(non_trivial(expected));
    }
}

/// Whether an answer holds anything but zeros, nulls and empty lists.
fn non_trivial(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Array(items) => items.iter().any(non_trivial),
        Value::Object(map) => map.iter().any(|(k, v)| k != "timeframe" && non_trivial(v)),
        _ => true,
    }
}

// ---------------------------------------------------------------------------------------------
// Random queries

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The JSON type a property has everywhere in the generated data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Num,
    Str,
    Bool,
    /// A list of strings (`tags`).
    List,
    /// Sometimes a string, sometimes a number, sometimes null (`ab_variant`).
    Mixed,
}

struct Prop {
    name: &'static str,
    kind: Kind,
    /// Few distinct values: fine for select_unique and for group_by with an interval.
    few: bool,
}

const fn prop(name: &'static str, kind: Kind, few: bool) -> Prop {
    Prop { name, kind, few }
}

const USER: [Prop; 3] = [
    prop("user.id", Kind::Str, false),
    prop("user.plan", Kind::Str, true),
    prop("user.age", Kind::Num, false),
];
const PAGEVIEWS: [Prop; 6] = [
    prop("page.path", Kind::Str, false),
    prop("page.load_time_ms", Kind::Num, false),
    prop("logged_in", Kind::Bool, true),
    prop("tags", Kind::List, false),
    prop("ab_variant", Kind::Mixed, true),
    prop("referrer.url", Kind::Str, false),
];
const PURCHASES: [Prop; 6] = [
    prop("price", Kind::Num, false),
    prop("quantity", Kind::Num, true),
    prop("currency", Kind::Str, true),
    prop("product.category", Kind::Str, true),
    prop("product.id", Kind::Str, false),
    prop("coupon", Kind::Str, true),
];
const SIGNUPS: [Prop; 2] = [
    prop("source", Kind::Str, true),
    prop("referral_code", Kind::Str, false),
];

fn props(collection: &str) -> Vec<&'static Prop> {
    let own: &'static [Prop] = match collection {
        "pageviews" => &PAGEVIEWS,
        "purchases" => &PURCHASES,
        _ => &SIGNUPS,
    };
    USER.iter().chain(own).collect()
}

/// A property of another collection: missing from every event of this one.
fn foreign(rng: &mut Rng, collection: &str) -> &'static Prop {
    let others: Vec<&'static Prop> = [&PAGEVIEWS[..], &PURCHASES[..], &SIGNUPS[..]]
        .into_iter()
        .flatten()
        .filter(|p| !props(collection).iter().any(|q| q.name == p.name))
        .collect();
    others[rng.below(others.len() as u64) as usize]
}

/// A plausible value of a property (sometimes one that occurs in no event).
fn sample(rng: &mut Rng, prop: &Prop) -> Value {
    let s = |rng: &mut Rng, items: &[&str]| json!(rng.pick(items));
    match prop.name {
        "user.id" => json!(format!(
            "u{:07}",
            rng.pick(&[0, 1, 2, 3, 5, 8, 13, 21, 500, 4000, 99999])
        )),
        "user.plan" => s(rng, &["free", "pro", "enterprise", "business"]),
        "user.age" => json!(rng.int(17, 78)),
        "page.path" => s(
            rng,
            &[
                "/",
                "/pricing",
                "/docs",
                "/docs/api",
                "/blog",
                "/blog/post-3",
                "/product/17",
                "/zzz",
            ],
        ),
        "page.load_time_ms" => json!(rng.int(500, 8000) as f64 / 10.0),
        "logged_in" => json!(rng.chance(0.5)),
        "tags" => s(
            rng,
            &["new", "returning", "beta", "mobile", "campaign", "vip", "trial"],
        ),
        "ab_variant" => rng
            .pick(&[json!("A"), json!("B"), json!(1), json!(2), json!("C")])
            .clone(),
        "referrer.url" => s(
            rng,
            &[
                "",
                "https://t.co/abc123",
                "https://www.facebook.com/",
                "https://github.com/some/repo",
            ],
        ),
        "price" => json!(rng.int(100, 15000) as f64 / 100.0),
        "quantity" => json!(rng.int(0, 6)),
        "currency" => s(rng, &["USD", "EUR", "GBP", "JPY", "CHF"]),
        "product.category" => s(
            rng,
            &[
                "books",
                "games",
                "music",
                "software",
                "hardware",
                "courses",
                "gift-cards",
            ],
        ),
        "product.id" => json!(format!("p{:05}", rng.pick(&[0, 1, 2, 7, 42, 4999]))),
        "coupon" => s(rng, &["SPRING", "VIP10", "WINTER"]),
        "source" => s(rng, &["organic", "ads", "referral", "partner", "tv"]),
        "referral_code" => s(rng, &["", "R0042", "R5000", "R9999"]),
        other => panic!("no samples for {other}"),
    }
}

/// A substring to look for in a string property.
fn needle(rng: &mut Rng, prop: &Prop) -> Value {
    let text = sample(rng, prop);
    let text = text.as_str().unwrap_or("o");
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() || rng.chance(0.2) {
        return json!(rng.pick(&["o", "e", "/", "-", "x"]));
    }
    let from = rng.below(chars.len() as u64) as usize;
    let to = from + 1 + rng.below((chars.len() - from) as u64) as usize;
    json!(chars[from..to].iter().collect::<String>())
}

/// A pattern on which Rust's `regex` and DuckDB's RE2 agree.
fn pattern(rng: &mut Rng, prop: &Prop) -> Value {
    let specific: &[&str] = match prop.name {
        "page.path" => &[
            "^/docs",
            "o[0-9]",
            "^/product/[0-9]+$",
            "s$",
            "^/blog/post-1[0-9]?$",
        ],
        "tags" => &["^(vip|trial)$", "e$", "^[a-m]"],
        "user.id" => &["^u00000[0-9][0-9]$", "7", "0{6}"],
        "product.category" => &["^(books|games)$", "s$", "ware"],
        "referral_code" => &["^R[0-9]{4}$", "^$", "R[5-9]"],
        "referrer.url" => &["^https://(www\\.)?[a-z]+\\.com/", "google", "\\?"],
        _ => &["^[a-f]", "o", "[A-Z]", "^.{3}$"],
    };
    json!(rng.pick(specific))
}

/// A value of another JSON type than the property's: it never matches (`ne`: every present
/// value matches).
fn wrong_type(rng: &mut Rng, prop: &Prop) -> Value {
    match prop.kind {
        Kind::Num => json!(rng.pick(&["10", "free", ""])),
        Kind::Bool => json!(rng.pick(&["true", "1"])),
        _ => json!(rng.pick(&[1, 42, 0])),
    }
}

/// Every operator, with a value of the property's type and of another, on the properties where
/// absence, null, mixed types and lists matter: a count over the whole data, one filter each.
fn operator_sweep(rng: &mut Rng) -> Vec<Query> {
    let cases: [(&'static str, &'static Prop); 6] = [
        ("purchases", &PURCHASES[5]), // coupon: mostly missing
        ("purchases", &PURCHASES[0]), // price
        ("pageviews", &PAGEVIEWS[4]), // ab_variant: strings, numbers, null, missing
        ("pageviews", &PAGEVIEWS[3]), // tags: lists
        ("pageviews", &PAGEVIEWS[2]), // logged_in: booleans
        ("signups", &PAGEVIEWS[0]),   // page.path: missing from every signup
    ];
    let mut out = Vec::new();
    for (collection, prop) in cases {
        let name = prop.name;
        let mut filters = vec![
            filter(name, "exists", json!(true)),
            filter(name, "exists", json!(false)),
            filter(name, "eq", Value::Null),
            filter(name, "ne", Value::Null),
            filter(name, "contains", needle(rng, prop)),
            filter(name, "not_contains", needle(rng, prop)),
            filter(name, "regex", pattern(rng, prop)),
        ];
        for op in ["eq", "ne", "lt", "gte"] {
            // Order comparisons take numbers and strings only (a boolean is a 400).
            if prop.kind != Kind::Bool || matches!(op, "eq" | "ne") {
                filters.push(filter(name, op, sample(rng, prop)));
            }
            filters.push(filter(name, op, wrong_type(rng, prop)));
        }
        filters.push(filter(name, "in", json!([sample(rng, prop), sample(rng, prop)])));
        filters.push(filter(
            name,
            "in",
            json!([wrong_type(rng, prop), sample(rng, prop)]),
        ));
        out.extend(filters.into_iter().map(|f| Query {
            analysis: "count",
            collection,
            target: None,
            start_ms: DOMAIN_START_MS,
            end_ms: DOMAIN_END_MS,
            text_offset: 0,
            timezone: None,
            interval: None,
            filters: vec![f],
            group_by: vec![],
            group_by_string: false,
            percentile: None,
        }));
    }
    out
}

fn filter(name: &str, op: &str, value: Value) -> Value {
    json!({"property_name": name, "operator": op, "property_value": value})
}

/// A random filter on a property of `collection` (sometimes a missing one, or keen.timestamp).
fn random_filter(rng: &mut Rng, collection: &str) -> Value {
    if rng.chance(0.05) {
        let at = rng.int(DOMAIN_START_MS, DOMAIN_END_MS);
        let op = rng.pick(&["lt", "gte", "gt", "lte"]);
        return filter("keen.timestamp", op, json!(iso(at, 0)));
    }
    // Often a property that some or all events lack, where "present and not null" matters.
    let (prop, sparse) = match (rng.below(100), collection) {
        (0..=9, _) => (foreign(rng, collection), true),
        (10..=24, "purchases") => (&PURCHASES[5], true),
        (10..=24, "pageviews") => (&PAGEVIEWS[4], true),
        _ => (*rng.pick(&props(collection)), false),
    };
    let name = prop.name;
    let wrong = |rng: &mut Rng| wrong_type(rng, prop);
    let null_ops = rng.chance(0.08);
    if null_ops {
        return match rng.below(4) {
            0 => filter(name, "eq", Value::Null),
            1 => filter(name, "ne", Value::Null),
            2 => filter(name, "exists", json!(false)),
            _ => filter(name, "exists", json!(true)),
        };
    }
    match prop.kind {
        Kind::Num | Kind::Str => {
            let mut ops = vec!["eq", "ne", "lt", "lte", "gt", "gte", "in"];
            if prop.kind == Kind::Str {
                ops.extend(["contains", "not_contains", "regex", "eq", "in"]);
            }
            if sparse {
                // The operators whose answer depends on how absent values are treated.
                ops = vec!["ne", "ne", "not_contains", "not_contains", "eq", "lt", "in"];
            }
            let op = *rng.pick(&ops);
            match op {
                "in" => {
                    let n = rng.int(1, 4);
                    let mut values: Vec<Value> = (0..n).map(|_| sample(rng, prop)).collect();
                    if rng.chance(0.15) {
                        values.push(wrong(rng));
                    }
                    filter(name, "in", json!(values))
                }
                "contains" | "not_contains" => filter(name, op, needle(rng, prop)),
                "regex" => filter(name, op, pattern(rng, prop)),
                // `ne` with a wrong type keeps every present value; the others keep nothing.
                "ne" if rng.chance(0.3) => filter(name, op, wrong(rng)),
                _ if rng.chance(if sparse { 0.15 } else { 0.04 }) => filter(name, op, wrong(rng)),
                _ => filter(name, op, sample(rng, prop)),
            }
        }
        Kind::Bool => match rng.below(3) {
            0 => filter(name, "ne", sample(rng, prop)),
            1 => filter(name, "in", json!([sample(rng, prop)])),
            _ => filter(name, "eq", sample(rng, prop)),
        },
        Kind::List => match *rng.pick(&["eq", "ne", "in", "contains", "not_contains", "regex"]) {
            "in" => filter(name, "in", json!([sample(rng, prop), sample(rng, prop)])),
            "contains" => filter(name, "contains", json!(rng.pick(&["e", "mob", "v", "zz"]))),
            "not_contains" => filter(name, "not_contains", json!(rng.pick(&["e", "mob", "v", "zz"]))),
            "regex" => filter(name, "regex", pattern(rng, prop)),
            op => filter(name, op, sample(rng, prop)),
        },
        // Compared as the filter value's JSON type: "A" never equals 1, 2 is never < "B".
        Kind::Mixed => match *rng.pick(&["eq", "ne", "in", "lt", "gte", "contains", "regex"]) {
            "in" => filter(name, "in", json!([sample(rng, prop), sample(rng, prop)])),
            "contains" => filter(name, "contains", json!("A")),
            "regex" => filter(name, "regex", json!("^[AC]$")),
            op => filter(name, op, sample(rng, prop)),
        },
    }
}

struct Query {
    analysis: &'static str,
    collection: &'static str,
    target: Option<&'static str>,
    start_ms: i64,
    end_ms: i64,
    /// The offset (seconds) the timeframe's ISO strings are written in; the instants are the same.
    text_offset: i64,
    timezone: Option<Value>,
    interval: Option<&'static str>,
    filters: Vec<Value>,
    group_by: Vec<&'static str>,
    /// `group_by` sent as a plain string rather than a one-element list.
    group_by_string: bool,
    percentile: Option<f64>,
}

impl Query {
    fn tally_body(&self) -> Value {
        let mut body = json!({
            "event_collection": self.collection,
            "timeframe": {"start": iso(self.start_ms, self.text_offset), "end": iso(self.end_ms, self.text_offset)},
        });
        if let Some(target) = self.target {
            body["target_property"] = json!(target);
        }
        if let Some(tz) = &self.timezone {
            body["timezone"] = tz.clone();
        }
        if let Some(interval) = self.interval {
            body["interval"] = json!(interval);
        }
        if !self.filters.is_empty() {
            body["filters"] = json!(self.filters);
        }
        if self.group_by_string {
            body["group_by"] = json!(self.group_by[0]);
        } else if !self.group_by.is_empty() {
            body["group_by"] = json!(self.group_by);
        }
        if let Some(p) = self.percentile {
            body["percentile"] = json!(p);
        }
        body
    }

    fn oracle_request(&self) -> Value {
        json!({
            "analysis": self.analysis,
            "collection": self.collection,
            "target_property": self.target,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "timezone": self.timezone,
            "interval": self.interval,
            "filters": self.filters,
            "group_by": self.group_by,
            "percentile": self.percentile,
        })
    }
}

/// A random funnel: the Tally request body and the oracle's request.
struct Funnel {
    tally: Value,
    oracle: Value,
}

/// 2–6 steps over random collections, with one actor property (a string or a number), day- or
/// hour-aligned timeframes per step, a filter now and then, and optional and inverted steps
/// after the first.
fn random_funnel(rng: &mut Rng) -> Funnel {
    let actor = *rng.pick(&["user.id", "user.id", "user.id", "user.age"]);
    let steps = rng.int(2, 6);
    let (mut tally, mut oracle) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let collection = *rng.pick(&["pageviews", "pageviews", "purchases", "signups"]);
        let days = rng.int(1, 30);
        let start = DOMAIN_START_MS + rng.int(0, (DOMAIN_END_MS - DOMAIN_START_MS) / DAY_MS - days) * DAY_MS;
        let start = start + rng.int(0, 23) * HOUR_MS;
        let end = (start + days * DAY_MS).min(DOMAIN_END_MS);
        let filters: Vec<Value> = if rng.chance(0.4) {
            vec![random_filter(rng, collection)]
        } else {
            vec![]
        };
        let optional = i > 0 && rng.chance(0.2);
        let inverted = i > 0 && rng.chance(0.15);
        tally.push(json!({
            "event_collection": collection, "actor_property": actor,
            "timeframe": {"start": iso(start, 0), "end": iso(end, 0)},
            "filters": filters, "optional": optional, "inverted": inverted,
        }));
        oracle.push(json!({
            "collection": collection, "actor_property": actor, "start_ms": start, "end_ms": end,
            "filters": filters, "optional": optional, "inverted": inverted,
        }));
    }
    Funnel {
        tally: json!({ "steps": tally }),
        oracle: json!({"analysis": "funnel", "steps": oracle}),
    }
}

const ANALYSES: [&str; 10] = [
    "count",
    "count_unique",
    "sum",
    "average",
    "minimum",
    "maximum",
    "median",
    "percentile",
    "standard_deviation",
    "select_unique",
];

/// A random query; `timestamps` are the events' `keen.timestamp`s in milliseconds.
fn random_query(rng: &mut Rng, timestamps: &[i64]) -> Query {
    let collection = *rng.pick(&[
        "pageviews",
        "pageviews",
        "pageviews",
        "purchases",
        "purchases",
        "purchases",
        "signups",
    ]);
    let analysis = *rng.pick(&ANALYSES);
    let interval = if rng.chance(0.4) {
        None
    } else {
        Some(*rng.pick(&[
            "hourly",
            "hourly",
            "daily",
            "daily",
            "weekly",
            "monthly",
            "yearly",
            "every_6_hours",
            "every_12_hours",
            "every_2_days",
            "every_2_weeks",
            "every_3_months",
        ]))
    };
    let own = props(collection);

    let target = match analysis {
        "count" => None,
        "count_unique" => Some(if rng.chance(0.05) {
            foreign(rng, collection)
        } else {
            *rng.pick(&own)
        }),
        "select_unique" => {
            let mut choices: Vec<&Prop> = own.iter().copied().filter(|p| p.few).collect();
            if interval.is_none() {
                choices.extend(
                    own.iter()
                        .copied()
                        .filter(|p| matches!(p.name, "user.age" | "page.path")),
                );
            }
            Some(*rng.pick(&choices))
        }
        _ => Some(if rng.chance(0.08) {
            // Strings, booleans, missing or mixed properties: numeric analyses skip non-numbers.
            if rng.chance(0.3) {
                foreign(rng, collection)
            } else {
                *rng.pick(&own)
            }
        } else {
            let numbers: Vec<&Prop> = own.iter().copied().filter(|p| p.kind == Kind::Num).collect();
            *rng.pick(&numbers)
        }),
    }
    .map(|p| p.name);

    // The timeframe: shorter for finer intervals; aligned to UTC days, hours, events' own
    // timestamps (start inclusive, end exclusive) or nothing.
    let max_len = match interval {
        Some("hourly") => 3 * DAY_MS,
        Some("every_6_hours" | "every_12_hours") => 10 * DAY_MS,
        _ => DOMAIN_END_MS - DOMAIN_START_MS,
    };
    let (start_ms, end_ms) = match rng.below(12) {
        10 | 11 => {
            let a = *rng.pick(timestamps);
            let b = *rng.pick(timestamps);
            let b = b.clamp(a - max_len, a + max_len);
            (a.min(b), a.max(b).max(a.min(b) + 1))
        }
        0..=3 => {
            let len = rng.int(HOUR_MS / 4, max_len);
            let start = rng.int(DOMAIN_START_MS, DOMAIN_END_MS - len);
            (start, start + len)
        }
        4..=6 => {
            let days = rng.int(1, max_len / DAY_MS);
            let start =
                DOMAIN_START_MS + rng.int(0, (DOMAIN_END_MS - DOMAIN_START_MS) / DAY_MS - days) * DAY_MS;
            (start, start + days * DAY_MS)
        }
        _ => {
            let hours = rng.int(1, max_len / HOUR_MS);
            let start =
                DOMAIN_START_MS + rng.int(0, (DOMAIN_END_MS - DOMAIN_START_MS) / HOUR_MS - hours) * HOUR_MS;
            (start, start + hours * HOUR_MS)
        }
    };
    let text_offset = *rng.pick(&[0, 0, 0, -8 * 3600, 5 * 3600 + 1800, 2 * 3600]);
    let timezone = match rng.below(8) {
        0 => None,
        7 => Some(json!(*rng.pick(&["19800", "-18000", "America/Los_Angeles"]))),
        1 => Some(json!("UTC")),
        2 => Some(json!("America/New_York")),
        3 => Some(json!("Europe/Berlin")),
        4 => Some(json!("Asia/Kolkata")),
        5 => Some(json!(-28800)),
        _ => Some(json!(if rng.chance(0.5) {
            "America/New_York"
        } else {
            "Europe/Berlin"
        })),
    };

    let filters = match rng.below(20) {
        0..=7 => vec![],
        8..=13 => vec![random_filter(rng, collection)],
        14..=17 => vec![random_filter(rng, collection), random_filter(rng, collection)],
        _ => {
            let n = rng.int(2, 3);
            let inner: Vec<Value> = (0..n).map(|_| random_filter(rng, collection)).collect();
            let or = json!({"operator": "or", "property_value": inner});
            if rng.chance(0.5) {
                vec![or, random_filter(rng, collection)]
            } else {
                vec![or]
            }
        }
    };

    // group_by: low-cardinality properties with an interval; more without (user.id only on the
    // smallest collection), now and then a missing property (one null group).
    let mut groupable: Vec<&'static str> = own
        .iter()
        .filter(|p| p.kind != Kind::List)
        .filter(|p| match interval {
            Some(_) => p.few,
            None => p.name != "user.id" || collection == "signups",
        })
        .map(|p| p.name)
        .collect();
    if rng.chance(0.1) {
        groupable.push(foreign(rng, collection).name);
    }
    let mut group_by = Vec::new();
    match rng.below(20) {
        0..=10 => {}
        11..=17 => group_by.push(*rng.pick(&groupable)),
        _ => {
            let first = *rng.pick(&groupable);
            let rest: Vec<&str> = groupable.iter().copied().filter(|g| *g != first).collect();
            group_by = vec![first, *rng.pick(&rest)];
        }
    }
    let group_by_string = group_by.len() == 1 && rng.chance(0.5);
    let percentile = (analysis == "percentile").then(|| {
        if rng.chance(0.3) {
            rng.int(0, 10_000) as f64 / 100.0
        } else {
            *rng.pick(&[
                0.0, 1.0, 5.0, 10.0, 25.0, 33.33, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0,
            ])
        }
    });
    Query {
        analysis,
        collection,
        target,
        start_ms,
        end_ms,
        text_offset,
        timezone,
        interval,
        filters,
        group_by,
        group_by_string,
        percentile,
    }
}

/// `ms` as ISO 8601 with milliseconds, written at `offset_secs` from UTC (`Z` for 0).
fn iso(ms: i64, offset_secs: i64) -> String {
    let local = format_timestamp_ms(ms + offset_secs * 1000);
    if offset_secs == 0 {
        return local;
    }
    let sign = if offset_secs < 0 { '-' } else { '+' };
    let abs = offset_secs.abs();
    format!(
        "{}{sign}{:02}:{:02}",
        local.trim_end_matches('Z'),
        abs / 3600,
        abs / 60 % 60
    )
}

/// Milliseconds since the epoch of the generator's `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn parse_ms(text: &str) -> i64 {
    parse_timestamp_ms(text).unwrap_or_else(|| panic!("not a timestamp: {text}"))
}

#[test]
fn iso_writes_instants_at_an_offset() {
    assert_eq!(iso(DOMAIN_START_MS, 0), "2026-09-30T00:00:00.000Z");
    assert_eq!(
        iso(DOMAIN_START_MS + 1, -8 * 3600),
        "2026-09-29T16:00:00.001-08:00"
    );
    assert_eq!(
        iso(DOMAIN_END_MS - 1, 5 * 3600 + 1800),
        "2026-11-03T05:29:59.999+05:30"
    );
    assert_eq!(iso(951_782_400_000, 0), "2000-02-29T00:00:00.000Z");
    for ms in [
        951_782_400_000,
        DOMAIN_START_MS + 1,
        DOMAIN_END_MS - 1,
        1_772_755_200_123,
    ] {
        assert_eq!(parse_ms(&iso(ms, 0)), ms);
    }
}
