#!/usr/bin/env bash
# Query benchmark: Tally against DuckDB and chDB (ClickHouse) on the same events, in one run.
# Builds the release binary, prepares a venv with duckdb and chdb from PyPI, generates the
# events once (cached), then runs bench/query_bench.py, which loads Tally over HTTP and the two
# others from the same file, times a set of Keen queries and their SQL equivalents, and measures
# ingest-to-queryable latency, bytes on disk per event and Tally's peak memory.
#
#   scripts/bench-query.sh                       # 10,000,000 events
#   scripts/bench-query.sh -n 200000             # a quick run
#   scripts/bench-query.sh -n 2000000 --json-out /tmp/query-bench.json
#
# Arguments after -n go to the harness (see bench/query_bench.py --help). TALLY_BIN=path uses an
# existing binary instead of building one. Run by hand, not by CI: a full run needs ~5 GB for the
# events file and several GB of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
gen=${GEN_EVENTS:-$root/../shared/bench/gen_events.py}
cache=${TALLY_CACHE_DIR:-$HOME/.cache/tally}
events=10000000
if [ "${1:-}" = "-n" ]; then
  events=$2
  shift 2
fi

if [ -n "${TALLY_BIN:-}" ]; then
  tally=$TALLY_BIN
  echo "== using $tally (TALLY_BIN; not building)"
else
  target=/root/.cache/tally/target
  # One cargo build at a time on this machine: every build takes the lock.
  echo "== building the release binary (waiting for /tmp/tally-cargo.lock if another build runs)"
  CARGO_TARGET_DIR=$target flock -o /tmp/tally-cargo.lock cargo build --release -p tally
  tally=$target/release/tally
fi

venv=$cache/bench-venv
if ! "$venv/bin/python" -c 'import duckdb, chdb' 2>/dev/null; then
  echo "== creating $venv with duckdb and chdb"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade duckdb chdb
fi

file=$cache/bench-events-$events-seed1.jsonl
if [ ! -s "$file" ]; then
  echo "== generating $events events into $file"
  python3 "$gen" -n "$events" --seed 1 --end 2026-11-01T00:00:00Z > "$file.tmp"
  mv "$file.tmp" "$file"
fi
echo "== events: $file ($(du -h "$file" | cut -f1)); memory: $(free -g | awk '/^Mem:/ {print $2 " GB total, " $7 " GB available"}'), cores: $(nproc)"

exec "$venv/bin/python" "$root/bench/query_bench.py" --tally "$tally" --events "$file" "$@"
