#!/usr/bin/env python3
"""Query benchmark: Tally against DuckDB and chDB (ClickHouse) on the same events and questions.

Run by `scripts/bench-query.sh`, which builds Tally, prepares a venv with `duckdb` and `chdb`,
generates the events file once and calls:

    query_bench.py --tally target/release/tally --events bench-events-N-seed1.jsonl [--json-out F]

What it does, in one run on this machine:

1. Starts `tally serve` on a fresh data directory and a free port, loads every event through the
   batch API (bodies of ~5,000 events, a few keep-alive connections) and waits until `count`
   over all time equals the number of events of each collection.
2. Loads the same file into DuckDB (a file database, one native table per collection, nested
   properties flattened into columns, rows sorted by time) and into chDB (one MergeTree table per
   collection, ORDER BY timestamp, merged with OPTIMIZE FINAL).
3. Runs every query of `QUERIES` on the three engines: one warm-up (whose answers are compared
   across engines), then `--runs` timed runs, each with the timeframe's end moved by a few
   milliseconds so that no result cache can answer; the median is reported. Tally's time is the
   HTTP round trip on a keep-alive connection, JSON decoding included; DuckDB's and chDB's the
   in-process query including fetching the result into Python objects.
4. Freshness: under a steady background load, posts marker events one by one and measures the time
   from each 201 until a filtered `count` sees the marker.
5. Bytes on disk per event (Tally's `store/`, the DuckDB file, the chDB data directory) and
   Tally's peak RSS (VmHWM).

Prints a table and, with --json-out, writes the same numbers as JSON.

Reading the numbers: DuckDB answers some whole-range aggregates (min, max, count) from row-group
statistics when the time filter covers every row group, so those queries measure metadata look-ups
on its side, not scans; that is a real property of the engine, not a result cache.
"""
import argparse
import concurrent.futures
import datetime as dt
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import zoneinfo

import chdb.session
import duckdb

UTC = dt.timezone.utc

# The generator is run with --end 2026-11-01T00:00:00Z and its default 30 days, so every event
# lies in [2026-10-02T00:00Z, 2026-11-01T00:00Z).
DATA_START = "2026-10-02T00:00:00Z"
DATA_END = "2026-11-01T00:00:00Z"


def ms(iso):
    """Epoch milliseconds of an ISO-8601 time."""
    return round(dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def iso_ms(epoch_ms):
    """Keen's timestamp form, in UTC, with milliseconds."""
    t = dt.datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def sql_time(epoch_ms):
    """The same instant as a UTC literal both SQL dialects read ('YYYY-MM-DD hh:mm:ss.fff')."""
    return iso_ms(epoch_ms).replace("T", " ").rstrip("Z")


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# The query set. Each entry is one Keen question with its DuckDB and ClickHouse equivalents.
#
# `tf` is the timeframe [start, end) (the end is moved by a few ms per run); `{s}`/`{e}` in the
# SQL are replaced by it. `shape` says how the three answers are brought to one form for the
# comparison (see `normalize`). Keen semantics mirrored in SQL: [start, end), interval buckets in
# the query's zone, exact distinct counts (uniqExact), sample standard deviation, exact
# percentiles (nearest rank in Tally; quantile_disc / quantileExact in SQL, which may pick a
# neighbouring value: compared with a tolerance).

WHOLE = (DATA_START, DATA_END)                                   # the whole 30 days
WEEK_NY = ("2026-10-25T00:00:00-04:00", "2026-11-01T00:00:00-04:00")  # 7 local days in New York
DAY = ("2026-10-20T00:00:00Z", "2026-10-21T00:00:00Z")

NY = "America/New_York"
# DuckDB keeps `ts` as a plain TIMESTAMP holding UTC (see load_duckdb); ClickHouse as
# DateTime64(3, 'UTC').
D_RANGE = "ts >= TIMESTAMP '{s}' AND ts < TIMESTAMP '{e}'"
D_NY_DAY = f"date_trunc('day', timezone('{NY}', ts::TIMESTAMPTZ))"
C_RANGE = "ts >= toDateTime64('{s}', 3, 'UTC') AND ts < toDateTime64('{e}', 3, 'UTC')"


def f(prop, op, value):
    return {"property_name": prop, "operator": op, "property_value": value}


QUERIES = [
    dict(name="count daily 7d NY", collection="pageviews", analysis="count", tf=WEEK_NY,
         params={"interval": "daily", "timezone": NY}, shape="interval", zone=NY,
         duckdb=f"SELECT {D_NY_DAY} AS day, count(*) FROM pageviews WHERE {D_RANGE} GROUP BY day ORDER BY day",
         chdb=f"SELECT toStartOfDay(ts, '{NY}') AS day, count() FROM pageviews WHERE {C_RANGE} GROUP BY day ORDER BY day"),
    dict(name="count daily 30d", collection="pageviews", analysis="count", tf=WHOLE,
         params={"interval": "daily"}, shape="interval", zone="UTC",
         duckdb=f"SELECT date_trunc('day', ts) AS day, count(*) FROM pageviews WHERE {D_RANGE} GROUP BY day ORDER BY day",
         chdb=f"SELECT toStartOfDay(ts) AS day, count() FROM pageviews WHERE {C_RANGE} GROUP BY day ORDER BY day"),
    dict(name="count hourly 1d", collection="pageviews", analysis="count", tf=DAY,
         params={"interval": "hourly"}, shape="interval", zone="UTC",
         duckdb=f"SELECT date_trunc('hour', ts) AS hour, count(*) FROM pageviews WHERE {D_RANGE} GROUP BY hour ORDER BY hour",
         chdb=f"SELECT toStartOfHour(ts) AS hour, count() FROM pageviews WHERE {C_RANGE} GROUP BY hour ORDER BY hour"),
    dict(name="count_unique user.id by plan", collection="pageviews", analysis="count_unique", tf=WHOLE,
         params={"target_property": "user.id", "group_by": "user.plan"}, shape="groups",
         duckdb=f"SELECT user_plan, count(DISTINCT user_id) FROM pageviews WHERE {D_RANGE} GROUP BY user_plan ORDER BY user_plan",
         chdb=f"SELECT user_plan, uniqExact(user_id) FROM pageviews WHERE {C_RANGE} GROUP BY user_plan ORDER BY user_plan"),
    dict(name="count_unique session_id 7d", collection="pageviews", analysis="count_unique", tf=WEEK_NY,
         params={"target_property": "session_id"}, shape="scalar",
         duckdb=f"SELECT count(DISTINCT session_id) FROM pageviews WHERE {D_RANGE}",
         chdb=f"SELECT uniqExact(session_id) FROM pageviews WHERE {C_RANGE}"),
    dict(name="median load_time_ms", collection="pageviews", analysis="median", tf=WHOLE,
         params={"target_property": "page.load_time_ms"}, shape="scalar", tolerance=0.02,
         duckdb=f"SELECT quantile_disc(page_load_time_ms, 0.5) FROM pageviews WHERE {D_RANGE}",
         chdb=f"SELECT quantileExact(0.5)(page_load_time_ms) FROM pageviews WHERE {C_RANGE}"),
    dict(name="p99 load_time_ms", collection="pageviews", analysis="percentile", tf=WHOLE,
         params={"target_property": "page.load_time_ms", "percentile": 99}, shape="scalar", tolerance=0.02,
         duckdb=f"SELECT quantile_disc(page_load_time_ms, 0.99) FROM pageviews WHERE {D_RANGE}",
         chdb=f"SELECT quantileExact(0.99)(page_load_time_ms) FROM pageviews WHERE {C_RANGE}"),
    dict(name="min load_time_ms", collection="pageviews", analysis="minimum", tf=WHOLE,
         params={"target_property": "page.load_time_ms"}, shape="scalar",
         duckdb=f"SELECT min(page_load_time_ms) FROM pageviews WHERE {D_RANGE}",
         chdb=f"SELECT min(page_load_time_ms) FROM pageviews WHERE {C_RANGE}"),
    dict(name="sum price by category (USD)", collection="purchases", analysis="sum", tf=WHOLE,
         params={"target_property": "price", "group_by": "product.category", "filters": [f("currency", "eq", "USD")]},
         shape="groups",
         duckdb=f"SELECT product_category, sum(price) FROM purchases WHERE {D_RANGE} AND currency = 'USD' GROUP BY product_category ORDER BY product_category",
         chdb=f"SELECT product_category, sum(price) FROM purchases WHERE {C_RANGE} AND currency = 'USD' GROUP BY product_category ORDER BY product_category"),
    dict(name="average price by currency", collection="purchases", analysis="average", tf=WHOLE,
         params={"target_property": "price", "group_by": "currency"}, shape="groups",
         duckdb=f"SELECT currency, avg(price) FROM purchases WHERE {D_RANGE} GROUP BY currency ORDER BY currency",
         chdb=f"SELECT currency, avg(price) FROM purchases WHERE {C_RANGE} GROUP BY currency ORDER BY currency"),
    dict(name="max price", collection="purchases", analysis="maximum", tf=WHOLE,
         params={"target_property": "price"}, shape="scalar",
         duckdb=f"SELECT max(price) FROM purchases WHERE {D_RANGE}",
         chdb=f"SELECT max(price) FROM purchases WHERE {C_RANGE}"),
    dict(name="stddev price", collection="purchases", analysis="standard_deviation", tf=WHOLE,
         params={"target_property": "price"}, shape="scalar",
         duckdb=f"SELECT stddev_samp(price) FROM purchases WHERE {D_RANGE}",
         chdb=f"SELECT stddevSamp(price) FROM purchases WHERE {C_RANGE}"),
    dict(name="count with or filter", collection="pageviews", analysis="count", tf=WHOLE,
         params={"filters": [{"operator": "or", "property_value": [f("page.path", "eq", "/pricing"), f("user.plan", "eq", "enterprise")]}]},
         shape="scalar",
         duckdb=f"SELECT count(*) FROM pageviews WHERE {D_RANGE} AND (page_path = '/pricing' OR user_plan = 'enterprise')",
         chdb=f"SELECT count() FROM pageviews WHERE {C_RANGE} AND (page_path = '/pricing' OR user_plan = 'enterprise')"),
    dict(name="count by plan, path", collection="pageviews", analysis="count", tf=WHOLE,
         params={"group_by": ["user.plan", "page.path"]}, shape="groups",
         duckdb=f"SELECT user_plan, page_path, count(*) FROM pageviews WHERE {D_RANGE} GROUP BY user_plan, page_path ORDER BY user_plan, page_path",
         chdb=f"SELECT user_plan, page_path, count() FROM pageviews WHERE {C_RANGE} GROUP BY user_plan, page_path ORDER BY user_plan, page_path"),
    dict(name="signups daily NY by source", collection="signups", analysis="count", tf=WEEK_NY,
         params={"interval": "daily", "timezone": NY, "group_by": "source"}, shape="interval_groups", zone=NY,
         duckdb=f"SELECT {D_NY_DAY} AS day, source, count(*) FROM signups WHERE {D_RANGE} GROUP BY day, source ORDER BY day, source",
         chdb=f"SELECT toStartOfDay(ts, '{NY}') AS day, source, count() FROM signups WHERE {C_RANGE} GROUP BY day, source ORDER BY day, source"),
    dict(name="select_unique page.path", collection="pageviews", analysis="select_unique", tf=WHOLE,
         params={"target_property": "page.path"}, shape="list",
         duckdb=f"SELECT DISTINCT page_path FROM pageviews WHERE {D_RANGE} ORDER BY page_path",
         chdb=f"SELECT DISTINCT page_path FROM pageviews WHERE {C_RANGE} ORDER BY page_path"),
    dict(name="extraction latest 1000", collection="purchases", analysis="extraction", tf=WHOLE,
         params={"latest": 1000}, shape="extraction",
         duckdb=f"SELECT * FROM (SELECT * FROM purchases WHERE {D_RANGE} ORDER BY ts DESC LIMIT 1000) ORDER BY ts",
         chdb=f"SELECT * FROM (SELECT * FROM purchases WHERE {C_RANGE} ORDER BY ts DESC LIMIT 1000) ORDER BY ts"),
    # A rare user (the generator's user ids are Zipf-distributed: a high id has a few events).
    dict(name="count, selective filter", collection="pageviews", analysis="count", tf=WHOLE,
         params={"filters": [f("user.id", "eq", "u0054321")]}, shape="scalar",
         duckdb=f"SELECT count(*) FROM pageviews WHERE {D_RANGE} AND user_id = 'u0054321'",
         chdb=f"SELECT count() FROM pageviews WHERE {C_RANGE} AND user_id = 'u0054321'"),
]


# ---------------------------------------------------------------------------------------------
# Tally: the server process and a small HTTP client.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid, field):
    """A field of /proc/<pid>/status in bytes (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dir_bytes(path):
    """Bytes of the files under `path` (apparent size, like `du -b`)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class Tally:
    """A `tally serve` on a fresh data directory, with a project created before it starts."""

    def __init__(self, binary, data_dir):
        self.data_dir = data_dir
        out = subprocess.run([binary, "project", "create", "bench", "--data-dir", data_dir],
                             check=True, capture_output=True, text=True).stdout
        project = json.loads(out)
        self.project, self.write_key, self.read_key = project["id"], project["write_key"], project["read_key"]
        self.master_key = project["master_key"]
        self.port = free_port()
        self.log_path = os.path.join(os.path.dirname(data_dir), "tally-server.log")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", data_dir, "--listen", f"127.0.0.1:{self.port}"],
            stdout=self.log_file, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"tally did not start; see {self.log_path}:\n{self.tail()}")

    def tail(self, n=20):
        with open(self.log_path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])

    def connect(self):
        return Client("127.0.0.1", self.port)

    def rss(self):
        return proc_status(self.proc.pid, "VmRSS")

    def hwm(self):
        return proc_status(self.proc.pid, "VmHWM")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


class Client:
    """One keep-alive HTTP/1.1 connection (reconnects if the server closed it)."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.conn = http.client.HTTPConnection(host, port, timeout=300)

    def post(self, path, body, key):
        headers = {"Authorization": key, "Content-Type": "application/json"}
        for attempt in range(2):
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read(), resp.getheader("Retry-After")
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
                if attempt == 1:
                    raise

    def query(self, tally, analysis, body):
        """Runs a query; returns (seconds for the round trip including JSON decoding, result)."""
        data = json.dumps(body).encode()
        t0 = time.perf_counter()
        status, raw, _ = self.post(f"/3.0/projects/{tally.project}/queries/{analysis}", data, tally.read_key)
        answer = json.loads(raw)
        elapsed = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"Tally {analysis} {body} answered {status}: {raw[:500]!r}")
        return elapsed, answer["result"]


def count_all(tally, client, collection, filters=None, timeframe=None):
    body = {"event_collection": collection,
            "timeframe": timeframe or {"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}}
    if filters:
        body["filters"] = filters
    return client.query(tally, "count", body)[1]


# ---------------------------------------------------------------------------------------------
# Loading Tally through the batch API.

PREFIX = b'{"collection":"'
SEPARATOR = b'","event":'


def split_line(line):
    """(collection, event JSON bytes) of a generator line, without parsing the JSON: the
    generator writes exactly `{"collection":"C","event":{...}}`."""
    i = line.index(SEPARATOR)
    return line[len(PREFIX):i].decode(), line[i + len(SEPARATOR):line.rindex(b"}")]


def batch_bodies(path, batch_size, counts):
    """Request bodies of the batch API, `{"pageviews":[...],"purchases":[...]}`, of
    `batch_size` events each, counting events per collection into `counts`."""
    groups, n = {}, 0
    with open(path, "rb") as fh:
        for line in fh:
            collection, event = split_line(line)
            groups.setdefault(collection, []).append(event)
            counts[collection] = counts.get(collection, 0) + 1
            n += 1
            if n == batch_size:
                yield n, encode_batch(groups)
                groups, n = {}, 0
    if n:
        yield n, encode_batch(groups)


def encode_batch(groups):
    return b"{" + b",".join(b'"' + c.encode() + b'":[' + b",".join(evs) + b"]" for c, evs in groups.items()) + b"}"


def post_batch(tally, client, body):
    """Posts one batch body, retrying while Tally answers 503 (back-pressure)."""
    path = f"/3.0/projects/{tally.project}/events"
    while True:
        status, raw, retry = client.post(path, body, tally.write_key)
        if status == 503:
            time.sleep(float(retry or 1))
            continue
        if status != 200 or b'"success":false' in raw:
            raise RuntimeError(f"batch POST answered {status}: {raw[:500]!r}")
        return


class RssWatch(threading.Thread):
    """Stops the benchmark if Tally's RSS passes the limit (the store is held in memory)."""

    def __init__(self, tally, limit_bytes):
        super().__init__(daemon=True)
        self.tally, self.limit, self.exceeded = tally, limit_bytes, None

    def run(self):
        while self.tally.proc.poll() is None:
            rss = self.tally.rss() or 0
            if rss > self.limit:
                self.exceeded = rss
                log(f"!! Tally's RSS is {rss / 2**30:.1f} GiB, past the {self.limit / 2**30:.1f} GiB limit: stopping it")
                self.tally.proc.kill()
                return
            time.sleep(0.5)


def load_tally(tally, events_path, batch_size, connections, watch):
    counts = {}
    clients = [tally.connect() for _ in range(connections)]
    free = list(clients)
    lock = threading.Lock()

    def send(body):
        with lock:
            client = free.pop()
        try:
            post_batch(tally, client, body)
        finally:
            with lock:
                free.append(client)

    sent, last_report = 0, time.perf_counter()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        pending = set()
        for n, body in batch_bodies(events_path, batch_size, counts):
            if watch.exceeded:
                raise SystemExit("stopped: Tally's memory limit")
            pending.add(pool.submit(send, body))
            sent += n
            if len(pending) >= 2 * connections:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for d in done:
                    d.result()
            now = time.perf_counter()
            if now - last_report >= 10:
                log(f"  sent {sent:,} events ({sent / (now - t0):,.0f}/s), Tally RSS {(tally.rss() or 0) / 2**30:.2f} GiB")
                last_report = now
        for d in concurrent.futures.as_completed(pending):
            d.result()
    acked = time.perf_counter() - t0
    total = sum(counts.values())
    log(f"  all {total:,} events acknowledged in {acked:.1f} s: {total / acked:,.0f} events/s "
        f"({', '.join(f'{c} {n:,}' for c, n in sorted(counts.items()))})")

    # Acknowledged means durable in the event log; queryable means the process stage has put them
    # in the store. Wait for every collection's count to reach the number sent.
    client = tally.connect()
    last_report = time.perf_counter()
    while True:
        if watch.exceeded:
            raise SystemExit("stopped: Tally's memory limit")
        got = {c: count_all(tally, client, c) for c in counts}
        if got == counts:
            break
        now = time.perf_counter()
        if now - last_report >= 10:
            log(f"  queryable so far: {sum(got.values()):,} of {total:,}")
            last_report = now
        if now - t0 > 7200:
            raise RuntimeError(f"Tally's counts never reached the events sent: {got} != {counts}")
        time.sleep(0.5)
    queryable = time.perf_counter() - t0
    log(f"  all {total:,} events queryable after {queryable:.1f} s: {total / queryable:,.0f} events/s end to end")
    return counts, acked, queryable


def wait_store_settled(tally, quiet_secs=5.0, limit_secs=600):
    """Waits until store/manifest.json has not changed for `quiet_secs` (flushes and background
    merges done)."""
    manifest = os.path.join(tally.data_dir, "store", "manifest.json")
    t0 = time.perf_counter()
    last, since = None, time.perf_counter()
    while time.perf_counter() - t0 < limit_secs:
        try:
            st = os.stat(manifest)
            state = (st.st_mtime_ns, st.st_size)
        except OSError:
            state = None
        if state != last:
            last, since = state, time.perf_counter()
        elif time.perf_counter() - since >= quiet_secs:
            return time.perf_counter() - t0
        time.sleep(0.25)
    log(f"  (store/manifest.json still changing after {limit_secs} s)")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# DuckDB and chDB: the same events as native tables, nested properties flattened into columns.

# Per collection: (column, DuckDB type, ClickHouse type, JSON path in the event). `ab_variant`
# carries strings, numbers and null in the generated events: JSON text in DuckDB, a nullable
# string in ClickHouse.
COMMON = [
    ("user_id", "VARCHAR", "String", "user.id"),
    ("user_plan", "VARCHAR", "LowCardinality(String)", "user.plan"),
    ("user_age", "INTEGER", "UInt16", "user.age"),
    ("ip_address", "VARCHAR", "String", "ip_address"),
    ("user_agent", "VARCHAR", "LowCardinality(String)", "user_agent"),
]
COLUMNS = {
    "pageviews": COMMON + [
        ("page_path", "VARCHAR", "LowCardinality(String)", "page.path"),
        ("page_url", "VARCHAR", "String", "page.url"),
        ("page_load_time_ms", "DOUBLE", "Float64", "page.load_time_ms"),
        ("referrer_url", "VARCHAR", "LowCardinality(String)", "referrer.url"),
        ("session_id", "VARCHAR", "String", "session_id"),
        ("tags", "VARCHAR[]", "Array(LowCardinality(String))", "tags"),
        ("logged_in", "BOOLEAN", "Bool", "logged_in"),
        ("ab_variant", "JSON", "Nullable(String)", "ab_variant"),
    ],
    "purchases": COMMON + [
        ("product_id", "VARCHAR", "LowCardinality(String)", "product.id"),
        ("product_category", "VARCHAR", "LowCardinality(String)", "product.category"),
        ("quantity", "INTEGER", "UInt32", "quantity"),
        ("price", "DOUBLE", "Float64", "price"),
        ("currency", "VARCHAR", "LowCardinality(String)", "currency"),
        ("coupon", "VARCHAR", "LowCardinality(Nullable(String))", "coupon"),
    ],
    "signups": COMMON + [
        ("source", "VARCHAR", "LowCardinality(String)", "source"),
        ("referral_code", "VARCHAR", "String", "referral_code"),
    ],
}


def nested_type(paths, struct):
    """The nested type of an event's properties from their dotted paths and leaf types: DuckDB
    `STRUCT("a" T, ...)` or ClickHouse `Tuple(a T, ...)` (`struct` names the constructor)."""
    tree = {}
    for path, t in paths:
        node = tree
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = t

    def render(node):
        return ", ".join(
            (f'"{k}"' if struct == "STRUCT" else k) + " " + (f"{struct}({render(v)})" if isinstance(v, dict) else v)
            for k, v in node.items())
    return f"{struct}({render(tree)})"


def column_ref(path, quoted):
    """`event."user"."id"` (DuckDB, quoted) or `event.user.id` (ClickHouse) for `user.id`."""
    return "event." + ".".join((f'"{p}"' if quoted else p) for p in path.split("."))


def load_duckdb(path, events_path):
    """Loads the events into a DuckDB file: one table per collection, sorted by time (so that
    row-group min/max statistics prune time ranges). Time is a plain TIMESTAMP holding UTC, not a
    TIMESTAMPTZ: date_trunc on a TIMESTAMPTZ goes through ICU calendars and was ~10x slower for
    UTC day buckets over 8.5M rows (494 ms against 45 ms); zone buckets convert explicitly."""
    con = duckdb.connect(path)
    con.execute("SET TimeZone = 'UTC'")
    times = {}
    for c, cols in COLUMNS.items():
        t0 = time.perf_counter()
        # The file is read with an explicit schema for this collection's events (the other
        # collections' lines are filtered out); Keen's timestamp is ISO-8601 text, cast.
        event = nested_type([(p, t) for _, t, _, p in cols] + [("keen.timestamp", "VARCHAR")], "STRUCT")
        select = ", ".join(f"{column_ref(p, True)} AS {name}" for name, _, _, p in cols)
        con.execute(f"""
            CREATE TABLE {c} AS
            SELECT {column_ref("keen.timestamp", True)}::TIMESTAMP AS ts, {select}
            FROM read_json(?, format = 'newline_delimited',
                           columns = {{'collection': 'VARCHAR', 'event': '{event}'}})
            WHERE collection = '{c}'
            ORDER BY ts""", [events_path])
        times[c] = time.perf_counter() - t0
    con.execute("CHECKPOINT")
    return con, times


def load_chdb(data_dir, events_path):
    sess = chdb.session.Session(data_dir)
    sess.query("CREATE DATABASE IF NOT EXISTS bench ENGINE = Atomic")
    sess.query("USE bench")
    times = {}
    for c, cols in COLUMNS.items():
        t0 = time.perf_counter()
        ddl = ", ".join(f"{name} {ct}" for name, _, ct, _ in cols)
        sess.query(f"CREATE TABLE {c} (ts DateTime64(3, 'UTC'), {ddl}) ENGINE = MergeTree ORDER BY ts")
        # The file is read with the event as nested named tuples (LowCardinality is a storage
        # choice, not a read type); keys an event lacks become defaults or NULL.
        read = [(p, re.sub(r"LowCardinality\((.*)\)", r"\1", ct)) for _, _, ct, p in cols]
        event = nested_type(read + [("keen.timestamp", "String")], "Tuple")
        select = ", ".join(column_ref(p, False) for _, _, _, p in cols)
        sess.query(f"""
            INSERT INTO {c}
            SELECT parseDateTime64BestEffort(event.keen.timestamp, 3, 'UTC'), {select}
            FROM file('{events_path}', 'JSONEachRow', 'collection String, event {event}')
            WHERE collection = '{c}'
            SETTINGS input_format_json_read_numbers_as_strings = 1, input_format_skip_unknown_fields = 1""")
        # One part per table, as after Tally's merges and DuckDB's sorted CREATE TABLE AS.
        sess.query(f"OPTIMIZE TABLE {c} FINAL")
        times[c] = time.perf_counter() - t0
    return sess, times


def duck_run(con, sql):
    t0 = time.perf_counter()
    rows = con.execute(sql).fetchall()
    return time.perf_counter() - t0, rows


def chdb_run(sess, sql):
    t0 = time.perf_counter()
    rows = json.loads(sess.query(sql, "JSONCompact").bytes())["data"]
    return time.perf_counter() - t0, rows


# ---------------------------------------------------------------------------------------------
# Comparing answers: each engine's answer brought to one form.

def bucket_ms(value, zone):
    """Epoch ms of a bucket start: an ISO string with offset (Tally), a datetime (DuckDB: naive
    local time or aware), or ClickHouse's 'YYYY-MM-DD hh:mm:ss' local text."""
    if isinstance(value, str) and ("T" in value):
        return ms(value)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=zoneinfo.ZoneInfo(zone))
    return round(value.timestamp() * 1000)


def key_text(v):
    return None if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def num(v):
    return None if v is None else float(v)


def normalize(q, engine, result):
    shape = q["shape"]
    if shape == "scalar":
        return num(result if engine == "tally" else result[0][0])
    if shape == "groups":
        if engine == "tally":
            props = q["params"]["group_by"]
            props = [props] if isinstance(props, str) else props
            return {tuple(key_text(g[p]) for p in props): num(g["result"]) for g in result}
        return {tuple(key_text(k) for k in row[:-1]): num(row[-1]) for row in result}
    if shape == "interval":
        if engine == "tally":
            return {bucket_ms(b["timeframe"]["start"], q["zone"]): num(b["value"]) for b in result if b["value"]}
        return {bucket_ms(row[0], q["zone"]): num(row[1]) for row in result}
    if shape == "interval_groups":
        if engine == "tally":
            prop = q["params"]["group_by"]
            return {(bucket_ms(b["timeframe"]["start"], q["zone"]), key_text(g[prop])): num(g["result"])
                    for b in result for g in b["value"]}
        return {(bucket_ms(row[0], q["zone"]), key_text(row[1])): num(row[2]) for row in result}
    if shape == "list":
        return sorted(key_text(v) for v in (result if engine == "tally" else [r[0] for r in result]))
    if shape == "extraction":
        if engine == "tally":
            return sorted(ms(e["keen"]["timestamp"]) for e in result)
        return sorted(bucket_ms(r[0], "UTC") for r in result)
    raise ValueError(shape)


def describe(answer):
    """A short description of a normalized answer, to show that there was something to compare."""
    if isinstance(answer, dict):
        return f"{len(answer)} buckets/groups, total {sum(v or 0 for v in answer.values()):,.6g}"
    if isinstance(answer, list):
        return f"{len(answer)} values"
    return f"{answer:,.6g}" if isinstance(answer, float) else repr(answer)


def close(a, b, tolerance):
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-12)
    return a == b


def compare(q, answers):
    """Warnings for answers that differ from Tally's (counts must match exactly)."""
    warnings = []
    ref = normalize(q, "tally", answers["tally"])
    tolerance = q.get("tolerance", 1e-9)
    for engine in ("duckdb", "chdb"):
        other = normalize(q, engine, answers[engine])
        if not close(ref, other, tolerance):
            shown = lambda v: (repr(v)[:300] + "…") if len(repr(v)) > 300 else repr(v)
            warnings.append(f"MISMATCH {q['name']}: Tally {shown(ref)} vs {engine} {shown(other)}")
    return warnings


# ---------------------------------------------------------------------------------------------
# The query runs.

def tally_body(q, start_ms, end_ms):
    body = {"event_collection": q["collection"], "timeframe": {"start": iso_ms(start_ms), "end": iso_ms(end_ms)}}
    body.update(q["params"])
    return body


def run_queries(tally, con, sess, runs, shift_ms):
    client = tally.connect()
    results, warnings = [], []
    for q in QUERIES:
        start_ms, end_base = ms(q["tf"][0]), ms(q["tf"][1])
        times = {"tally": [], "duckdb": [], "chdb": []}
        # Run 0 is the warm-up (its answers are compared); runs 1..N are timed, each with the end
        # of the timeframe `k * shift_ms` later, so that no run repeats an earlier question.
        for k in range(runs + 1):
            end_ms = end_base + k * shift_ms
            s, e = sql_time(start_ms), sql_time(end_ms)
            t_t, a_t = client.query(tally, q["analysis"], tally_body(q, start_ms, end_ms))
            t_d, a_d = duck_run(con, q["duckdb"].format(s=s, e=e))
            t_c, a_c = chdb_run(sess, q["chdb"].format(s=s, e=e))
            if k == 0:
                mismatches = compare(q, {"tally": a_t, "duckdb": a_d, "chdb": a_c})
                warnings += mismatches
                summary = describe(normalize(q, "tally", a_t))
                summary += "" if mismatches else ", same in DuckDB and chDB"
                continue
            times["tally"].append(t_t)
            times["duckdb"].append(t_d)
            times["chdb"].append(t_c)
        row = {"query": q["name"], "answer": summary}
        for engine, ts in times.items():
            row[f"{engine}_ms"] = statistics.median(ts) * 1000
        row["tally_duckdb"] = row["tally_ms"] / row["duckdb_ms"]
        row["tally_chdb"] = row["tally_ms"] / row["chdb_ms"]
        results.append(row)
        log(f"  {q['name']:<30} Tally {row['tally_ms']:9.2f} ms   DuckDB {row['duckdb_ms']:9.2f} ms   "
            f"chDB {row['chdb_ms']:9.2f} ms   ({summary})")
    return results, warnings


# ---------------------------------------------------------------------------------------------
# Freshness: ingest-to-queryable latency under a steady load.

KEEN_TIMESTAMP = re.compile(rb',"keen":\{"timestamp":"[^"]*"\}')


def steady_bodies(events_path, batch_size, limit=200_000):
    """Batch bodies for the background load: events from the file without their timestamp, so
    Tally stamps them with the current time, as live traffic would be."""
    groups, n, bodies = {}, 0, []
    with open(events_path, "rb") as fh:
        for i, line in enumerate(fh):
            if i >= limit:
                break
            collection, event = split_line(line)
            groups.setdefault(collection, []).append(KEEN_TIMESTAMP.sub(b"", event))
            n += 1
            if n == batch_size:
                bodies.append(encode_batch(groups))
                groups, n = {}, 0
    return bodies


def freshness(tally, events_path, markers, rate, batch_size, poll_secs):
    bodies = steady_bodies(events_path, batch_size)
    stop = threading.Event()
    sent = [0]

    def background():
        client, interval = tally.connect(), batch_size / rate
        next_t, i = time.perf_counter(), 0
        while not stop.is_set():
            post_batch(tally, client, bodies[i % len(bodies)])
            sent[0] += batch_size
            i += 1
            next_t += interval
            time.sleep(max(0.0, next_t - time.perf_counter()))

    loader = threading.Thread(target=background, daemon=True)
    loader.start()
    time.sleep(2)  # let the load settle
    writer, reader = tally.connect(), tally.connect()
    now = dt.datetime.now(UTC)
    window = {"start": (now - dt.timedelta(hours=1)).isoformat(), "end": (now + dt.timedelta(hours=3)).isoformat()}
    nonce = os.urandom(4).hex()
    latencies, polls = [], 0
    t_begin = time.perf_counter()
    for i in range(markers):
        marker = f"fresh-{nonce}-{i}"
        event = json.dumps({"bench_marker": marker, "page": {"path": "/fresh"}, "user": {"id": "fresh"}}).encode()
        status, raw, _ = writer.post(f"/3.0/projects/{tally.project}/events/pageviews", event, tally.write_key)
        if status != 201:
            raise RuntimeError(f"marker POST answered {status}: {raw[:300]!r}")
        acked = time.perf_counter()
        while True:
            polls += 1
            if count_all(tally, reader, "pageviews", [f("bench_marker", "eq", marker)], window) == 1:
                latencies.append(time.perf_counter() - acked)
                break
            if time.perf_counter() - acked > 60:
                raise RuntimeError(f"marker {marker} not queryable after 60 s")
            time.sleep(poll_secs)
    elapsed = time.perf_counter() - t_begin
    stop.set()
    loader.join()
    achieved = sent[0] / (time.perf_counter() - t_begin + 2)
    latencies.sort()
    return {
        "markers": markers,
        "background_events_per_s": achieved,
        "p50_ms": nearest_rank(latencies, 50) * 1000,
        "p99_ms": nearest_rank(latencies, 99) * 1000,
        "max_ms": latencies[-1] * 1000,
        "polls_per_marker": polls / markers,
        "seconds": elapsed,
    }


def nearest_rank(sorted_values, p):
    k = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[k - 1]


# ---------------------------------------------------------------------------------------------

def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def gib(b):
    return f"{b / 2**30:.2f} GiB"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tally", required=True, help="the tally binary (release build)")
    p.add_argument("--events", required=True, help="gen_events.py JSON-lines file")
    p.add_argument("--json-out", help="also write the results as JSON to this file")
    p.add_argument("--work-dir", help="where the temporary data directories go (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--runs", type=int, default=5, help="timed runs per query (after one warm-up)")
    p.add_argument("--shift-ms", type=int, default=3, help="the timeframe end moves this much per run")
    p.add_argument("--batch-size", type=int, default=5000, help="events per batch POST while loading")
    p.add_argument("--connections", type=int, default=4, help="concurrent connections while loading")
    p.add_argument("--markers", type=int, default=200, help="marker events for the freshness test")
    p.add_argument("--steady-rate", type=float, default=2000, help="background events/s during the freshness test")
    p.add_argument("--steady-batch", type=int, default=100, help="events per background batch")
    p.add_argument("--max-rss-gb", type=float, default=14, help="stop if Tally's RSS passes this")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="tally-query-bench-", dir=args.work_dir)
    report = {"events_file": args.events, "work_dir": work, "cores": os.cpu_count(),
              "duckdb_version": duckdb.__version__, "chdb_version": chdb.__version__}
    log(f"work directory {work}; {os.cpu_count()} cores; duckdb {duckdb.__version__}, chdb {report['chdb_version']}")
    tally = None
    try:
        # 1. Tally
        log("== Tally: start, load through the batch API, wait until queryable")
        tally = Tally(args.tally, os.path.join(work, "tally-data"))
        log(f"  tally serve on 127.0.0.1:{tally.port}, project {tally.project}")
        watch = RssWatch(tally, args.max_rss_gb * 2**30)
        watch.start()
        counts, acked, queryable = load_tally(tally, args.events, args.batch_size, args.connections, watch)
        events = sum(counts.values())
        report.update(events=events, counts=counts,
                      tally_load={"ack_seconds": acked, "events_per_s_acked": events / acked,
                                  "queryable_seconds": queryable, "events_per_s_queryable": events / queryable})
        settled = wait_store_settled(tally)
        store_bytes = dir_bytes(os.path.join(tally.data_dir, "store"))
        log_bytes = dir_bytes(os.path.join(tally.data_dir, "log"))
        hwm_load = tally.hwm()
        log(f"  store settled after {settled:.1f} s more: store/ {gib(store_bytes)} "
            f"({store_bytes / events:.1f} B/event), event log {gib(log_bytes)}; Tally RSS {gib(tally.rss())}, peak {gib(hwm_load)}")

        # 2. DuckDB and chDB
        log("== DuckDB: native tables from the same file")
        duck_path = os.path.join(work, "bench.duckdb")
        t0 = time.perf_counter()
        con, duck_times = load_duckdb(duck_path, args.events)
        duck_load = time.perf_counter() - t0
        duck_bytes = os.path.getsize(duck_path) + (os.path.getsize(duck_path + ".wal") if os.path.exists(duck_path + ".wal") else 0)
        log(f"  loaded in {duck_load:.1f} s ({', '.join(f'{c} {t:.1f} s' for c, t in duck_times.items())}); "
            f"file {gib(duck_bytes)} ({duck_bytes / events:.1f} B/event)")
        log("== chDB: MergeTree tables from the same file")
        ch_path = os.path.join(work, "chdb")
        t0 = time.perf_counter()
        sess, ch_times = load_chdb(ch_path, args.events)
        ch_load = time.perf_counter() - t0
        # The table data only (the data directory also holds ClickHouse's own logs and metadata).
        ch_data_bytes = sum(dir_bytes(d) for d in [os.path.join(ch_path, "store")] if os.path.isdir(d))
        ch_bytes = dir_bytes(ch_path)
        log(f"  loaded in {ch_load:.1f} s ({', '.join(f'{c} {t:.1f} s' for c, t in ch_times.items())}, each with OPTIMIZE FINAL); "
            f"data dir {gib(ch_bytes)} ({ch_bytes / events:.1f} B/event; table parts {ch_data_bytes / events:.1f} B/event)")
        for c, n in counts.items():
            d = con.execute(f"SELECT count(*) FROM {c}").fetchone()[0]
            h = int(json.loads(sess.query(f"SELECT count() FROM {c}", "JSONCompact").bytes())["data"][0][0])
            if d != n or h != n:
                log(f"  WARNING: {c}: sent {n}, DuckDB has {d}, chDB has {h}")
        report.update(duckdb_load_seconds=duck_load, chdb_load_seconds=ch_load)

        # 3. Queries
        log(f"== Queries: warm-up + {args.runs} runs each, end of timeframe +{args.shift_ms} ms per run, median")
        results, warnings = run_queries(tally, con, sess, args.runs, args.shift_ms)
        for w in warnings:
            log("  WARNING: " + w)
        hwm_query = tally.hwm()
        report.update(queries=results, warnings=warnings)

        # 4. Freshness
        log(f"== Freshness: {args.markers} markers under {args.steady_rate:,.0f} events/s in batches of {args.steady_batch}")
        fresh = freshness(tally, args.events, args.markers, args.steady_rate, args.steady_batch, 0.005)
        log(f"  p50 {fresh['p50_ms']:.1f} ms, p99 {fresh['p99_ms']:.1f} ms, max {fresh['max_ms']:.1f} ms "
            f"({fresh['polls_per_marker']:.1f} polls per marker; background load {fresh['background_events_per_s']:,.0f} events/s)")
        report["freshness"] = fresh
        hwm_end = tally.hwm()
        harness_hwm = proc_status(os.getpid(), "VmHWM")

        # 5. Summary
        g_d = geomean([r["tally_duckdb"] for r in results])
        g_c = geomean([r["tally_chdb"] for r in results])
        worst = max(results, key=lambda r: r["tally_duckdb"])
        report.update(
            geomean_tally_duckdb=g_d, geomean_tally_chdb=g_c,
            worst_tally_duckdb={"query": worst["query"], "ratio": worst["tally_duckdb"]},
            bytes_per_event={"tally_store": store_bytes / events, "duckdb_file": duck_bytes / events,
                             "chdb_data_dir": ch_bytes / events, "chdb_table_parts": ch_data_bytes / events,
                             "tally_event_log": log_bytes / events},
            memory={"tally_peak_after_load": hwm_load, "tally_peak_after_queries": hwm_query,
                    "tally_peak_at_end": hwm_end, "harness_peak_duckdb_chdb": harness_hwm},
        )
        print_table(report)
        if args.json_out:
            with open(args.json_out, "w") as fh:
                json.dump(report, fh, indent=2)
            log(f"results written to {args.json_out}")
    finally:
        if tally:
            tally.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def print_table(r):
    n = r["events"]
    print()
    print(f"Query benchmark: {n:,} events ({', '.join(f'{c} {k:,}' for c, k in sorted(r['counts'].items()))}), "
          f"{r['cores']} cores, DuckDB {r['duckdb_version']}, chDB {r['chdb_version']}")
    print(f"Load: Tally {r['tally_load']['events_per_s_acked']:,.0f} events/s acknowledged, "
          f"{r['tally_load']['events_per_s_queryable']:,.0f} events/s to queryable ({r['tally_load']['queryable_seconds']:.1f} s); "
          f"DuckDB {r['duckdb_load_seconds']:.1f} s; chDB {r['chdb_load_seconds']:.1f} s")
    print()
    header = f"{'query':<30} {'Tally ms':>10} {'DuckDB ms':>10} {'chDB ms':>10} {'T/DuckDB':>9} {'T/chDB':>9}"
    print(header)
    print("-" * len(header))
    for q in r["queries"]:
        flag = "  !" if q["tally_duckdb"] > 2 else ""
        print(f"{q['query']:<30} {q['tally_ms']:>10.2f} {q['duckdb_ms']:>10.2f} {q['chdb_ms']:>10.2f} "
              f"{q['tally_duckdb']:>9.2f} {q['tally_chdb']:>9.2f}{flag}")
    print("-" * len(header))
    ok = lambda cond: "ok" if cond else "MISSED"
    print(f"geometric mean Tally/DuckDB {r['geomean_tally_duckdb']:.2f} (target ≤ 1: {ok(r['geomean_tally_duckdb'] <= 1)}), "
          f"Tally/chDB {r['geomean_tally_chdb']:.2f} (target ≤ 1: {ok(r['geomean_tally_chdb'] <= 1)})")
    w = r["worst_tally_duckdb"]
    print(f"worst Tally/DuckDB {w['ratio']:.2f} ({w['query']}; target ≤ 2: {ok(w['ratio'] <= 2)})")
    fr = r["freshness"]
    print(f"freshness (ingest → queryable) p50 {fr['p50_ms']:.1f} ms, p99 {fr['p99_ms']:.1f} ms, max {fr['max_ms']:.1f} ms "
          f"(target p99 ≤ 1000 ms: {ok(fr['p99_ms'] <= 1000)}) under {fr['background_events_per_s']:,.0f} events/s")
    b = r["bytes_per_event"]
    print(f"bytes/event on disk: Tally store/ {b['tally_store']:.1f}, DuckDB file {b['duckdb_file']:.1f}, "
          f"chDB data dir {b['chdb_data_dir']:.1f} (table parts {b['chdb_table_parts']:.1f}); "
          f"Tally's event log {b['tally_event_log']:.1f}")
    m = r["memory"]
    print(f"Tally peak RSS (VmHWM): {gib(m['tally_peak_after_load'])} after loading, "
          f"{gib(m['tally_peak_after_queries'])} after queries, {gib(m['tally_peak_at_end'])} at the end; "
          f"harness (DuckDB + chDB in-process) {gib(m['harness_peak_duckdb_chdb'])}")
    if r["warnings"]:
        print(f"{len(r['warnings'])} answer mismatch(es), see the warnings above")
    print()


if __name__ == "__main__":
    main()
