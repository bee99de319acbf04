#!/usr/bin/env python3
"""Cached answers benchmark: cached queries, dataset results, dataset refresh cost, and a 10-step
funnel against DuckDB.

Run by `scripts/bench-cached.sh` (which builds Tally and prepares the venv and events like
`scripts/bench-query.sh`):

    cached_bench.py --tally target/release/tally --events bench-events-N-seed1.jsonl [--json-out F]

In one run on this machine:

1. Starts `tally serve`, loads every event through the batch API and waits until queryable (the
   same loader as `query_bench.py`).
2. Cached query: `PUT` a saved query with a `refresh_rate` (count_unique user.id by plan over
   the 30 days), then times `GET …/saved/{name}/result` over one keep-alive HTTP connection
   (p50/p99 of `--samples` requests) against the same question as an ad-hoc query.
3. Dataset: `PUT` a dataset (daily purchases over the 30 days, indexed by product.id), then times
   `GET …/datasets/{name}/results` for random product ids against the equivalent ad-hoc query
   (count with an `eq` filter and a daily interval). Each answer is checked equal to the ad-hoc
   one for a few ids.
4. Refresh cost: the server's `tally_dataset_refresh_seconds` and `..._events_scanned` counters
   around (a) the dataset's first computation from scratch and (b) the refresh after 1% more
   purchases arrive for the last day.
5. Funnel: a 10-step funnel over pageviews (actor user.id, one page path per step), against the
   same question in DuckDB SQL (one pass: per user, a flag per step; then counts of users with
   every flag so far). Answers compared; medians of `--runs`.
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import query_bench as qb  # noqa: E402

WHOLE = {"start": qb.DATA_START, "end": qb.DATA_END}
STEPS = ["/", "/pricing", "/docs", "/blog", "/signup", "/login", "/checkout", "/cart", "/search", "/about"]


def request(client, method, path, key, body=None):
    headers = {"Authorization": key}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    t0 = time.perf_counter()
    client.conn.request(method, path, body=data, headers=headers)
    resp = client.conn.getresponse()
    raw = resp.read()
    answer = json.loads(raw) if raw else None
    return time.perf_counter() - t0, resp.status, answer


def percentiles(samples):
    s = sorted(samples)
    return {"p50_ms": 1000 * qb.nearest_rank(s, 50), "p99_ms": 1000 * qb.nearest_rank(s, 99), "n": len(s)}


def metric(client, name):
    client.conn.request("GET", "/metrics")
    text = client.conn.getresponse().read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    return 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tally", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--json-out")
    p.add_argument("--work-dir")
    p.add_argument("--samples", type=int, default=2000, help="timed requests of cached answers")
    p.add_argument("--ad-hoc-samples", type=int, default=30, help="timed requests of the ad-hoc equivalents")
    p.add_argument("--runs", type=int, default=3, help="timed funnel runs per engine")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="tally-cached-bench-", dir=args.work_dir)
    report = {"events_file": args.events, "cores": os.cpu_count()}
    tally = qb.Tally(args.tally, os.path.join(work, "tally-data"))
    try:
        watch = qb.RssWatch(tally, 14 * 2**30)
        watch.start()
        counts, acked, queryable = qb.load_tally(tally, args.events, 5000, 4, watch)
        qb.wait_store_settled(tally)
        report["events"] = sum(counts.values())
        client = tally.connect()
        base = f"/3.0/projects/{tally.project}"
        rng = random.Random(7)

        # 2. Cached query
        qb.log("== cached query vs ad-hoc")
        query = {"analysis_type": "count_unique", "event_collection": "pageviews", "target_property": "user.id",
                 "group_by": "user.plan", "timeframe": WHOLE}
        _, status, obj = request(client, "PUT", f"{base}/queries/saved/users-by-plan", tally.master_key,
                                 {"refresh_rate": 3600, "query": query})
        assert status in (200, 201), obj
        _, status, first = request(client, "GET", f"{base}/queries/saved/users-by-plan/result", tally.read_key)
        assert status == 200, first
        cached = [request(client, "GET", f"{base}/queries/saved/users-by-plan/result", tally.read_key)[0]
                  for _ in range(args.samples)]
        ad_hoc_body = {k: v for k, v in query.items() if k != "analysis_type"}
        ad_hoc = []
        for _ in range(args.ad_hoc_samples):
            t, status, answer = request(client, "POST", f"{base}/queries/count_unique", tally.read_key, ad_hoc_body)
            assert status == 200 and answer["result"] == first["result"], (answer, first["result"])
            ad_hoc.append(t)
        report["cached_query"] = {"cached": percentiles(cached), "ad_hoc": percentiles(ad_hoc)}
        qb.log(f"  cached {report['cached_query']['cached']}, ad-hoc {report['cached_query']['ad_hoc']}")

        # 3 and 4a. Dataset from scratch, then results by index value
        qb.log("== dataset results vs ad-hoc; first computation")
        products = [f"p{i:05d}" for i in range(5000)]
        definition = {"display_name": "Daily purchases by product", "index_by": "product.id",
                      "query": {"analysis_type": "count", "event_collection": "purchases", "interval": "daily",
                                "timeframe": WHOLE, "timezone": "UTC"}}
        seconds0 = metric(client, "tally_dataset_refresh_seconds")
        scanned0 = metric(client, "tally_dataset_refresh_events_scanned")
        _, status, echo = request(client, "PUT", f"{base}/datasets/by-product", tally.master_key, definition)
        assert status in (200, 201), echo
        results_path = lambda pid: (f"{base}/datasets/by-product/results?index_by={pid}"  # noqa: E731
                                    f"&timeframe={urllib.parse.quote(json.dumps(WHOLE))}")
        _, status, answer = request(client, "GET", results_path("p00001"), tally.read_key)
        assert status == 200, answer
        full_seconds = metric(client, "tally_dataset_refresh_seconds") - seconds0
        full_scanned = metric(client, "tally_dataset_refresh_events_scanned") - scanned0
        for pid in ["p00000", "p00001", "p04999", "p00777"]:
            _, _, from_dataset = request(client, "GET", results_path(pid), tally.read_key)
            body = dict(definition["query"], filters=[{"property_name": "product.id", "operator": "eq", "property_value": pid}])
            body.pop("analysis_type")
            _, _, expected = request(client, "POST", f"{base}/queries/count", tally.read_key, body)
            assert from_dataset == expected, (pid, from_dataset, expected)
        dataset = [request(client, "GET", results_path(rng.choice(products)), tally.read_key)[0]
                   for _ in range(args.samples)]
        ad_hoc = []
        for _ in range(args.ad_hoc_samples):
            body = dict(definition["query"], filters=[{"property_name": "product.id", "operator": "eq",
                                                        "property_value": rng.choice(products)}])
            body.pop("analysis_type")
            ad_hoc.append(request(client, "POST", f"{base}/queries/count", tally.read_key, body)[0])
        report["dataset_results"] = {"dataset": percentiles(dataset), "ad_hoc": percentiles(ad_hoc)}
        qb.log(f"  dataset {report['dataset_results']['dataset']}, ad-hoc {report['dataset_results']['ad_hoc']}")

        # 4b. Refresh after 1% new events on the last day
        qb.log("== refresh after 1% new purchases")
        new = max(1, counts.get("purchases", 0) // 100)
        events = [{"keen": {"timestamp": f"2026-10-31T{h:02d}:{m:02d}:00.000Z"},
                   "product": {"id": rng.choice(products), "category": "books"}, "price": 1.0}
                  for h, m in ((rng.randrange(24), rng.randrange(60)) for _ in range(new))]
        seconds0 = metric(client, "tally_dataset_refresh_seconds")
        scanned0 = metric(client, "tally_dataset_refresh_events_scanned")
        for i in range(0, len(events), 5000):
            status, raw, _ = client.post(f"{base}/events", json.dumps({"purchases": events[i:i + 5000]}).encode(), tally.write_key)
            assert status == 200, raw[:300]
        target = counts["purchases"] + new
        while qb.count_all(tally, client, "purchases") < target:
            time.sleep(0.05)
        # Wait until the dataset reflects the new events (the refresher ticks every 2 s); the
        # refreshes of every batch count towards the incremental cost.
        pid = events[-1]["product"]["id"]
        body = dict(definition["query"], filters=[{"property_name": "product.id", "operator": "eq", "property_value": pid}])
        body.pop("analysis_type")
        _, _, expected = request(client, "POST", f"{base}/queries/count", tally.read_key, body)
        for _ in range(600):
            _, _, from_dataset = request(client, "GET", results_path(pid), tally.read_key)
            if from_dataset == expected:
                break
            time.sleep(0.1)
        assert from_dataset == expected, "the dataset caught up with the new events"
        time.sleep(3)  # one more tick, so no refresh is in flight when the counters are read
        inc_seconds = metric(client, "tally_dataset_refresh_seconds") - seconds0
        inc_scanned = metric(client, "tally_dataset_refresh_events_scanned") - scanned0
        report["dataset_refresh"] = {"new_events": new, "full_seconds": full_seconds, "full_events_scanned": full_scanned,
                                     "incremental_seconds": inc_seconds, "incremental_events_scanned": inc_scanned,
                                     "cost_ratio": inc_seconds / full_seconds if full_seconds else None}
        qb.log(f"  {report['dataset_refresh']}")

        # 5. Funnel against DuckDB
        qb.log("== 10-step funnel: Tally vs DuckDB")
        steps = [{"event_collection": "pageviews", "actor_property": "user.id", "timeframe": WHOLE,
                  "filters": [{"property_name": "page.path", "operator": "eq", "property_value": path}]} for path in STEPS]
        tally_times = []
        for run in range(args.runs + 1):
            t, status, answer = request(client, "POST", f"{base}/queries/funnel", tally.read_key, {"steps": steps})
            assert status == 200, answer
            if run:
                tally_times.append(t)
        tally_result = answer["result"]
        con, _ = qb.load_duckdb(os.path.join(work, "bench.duckdb"), args.events)
        flags = ", ".join(f"bool_or(page_path = '{path}') AS s{i}" for i, path in enumerate(STEPS))
        counts_sql = ", ".join("count(*) FILTER (WHERE " + " AND ".join(f"s{j}" for j in range(i + 1)) + ")"
                               for i in range(len(STEPS)))
        sql = (f"SELECT {counts_sql} FROM (SELECT user_id, {flags} FROM pageviews "
               f"WHERE ts >= TIMESTAMP '2026-10-02 00:00:00' AND ts < TIMESTAMP '2026-11-01 00:00:00' GROUP BY user_id)")
        duck_times = []
        for run in range(args.runs + 1):
            t0 = time.perf_counter()
            duck_result = list(con.execute(sql).fetchone())
            if run:
                duck_times.append(time.perf_counter() - t0)
        assert duck_result == tally_result, (duck_result, tally_result)
        report["funnel_10_steps"] = {"result": tally_result, "tally_ms": 1000 * statistics.median(tally_times),
                                     "duckdb_ms": 1000 * statistics.median(duck_times)}
        report["funnel_10_steps"]["ratio"] = report["funnel_10_steps"]["tally_ms"] / report["funnel_10_steps"]["duckdb_ms"]
        qb.log(f"  {report['funnel_10_steps']}")
    finally:
        tally.stop()
    print(json.dumps(report, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
