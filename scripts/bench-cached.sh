#!/usr/bin/env bash
# Cached answers benchmark: cached query and dataset results against the same questions ad hoc,
# the cost of a dataset refresh after 1% new events against computing it from scratch, and a
# 10-step funnel against DuckDB. Same set-up as scripts/bench-query.sh (release build, venv with
# duckdb, cached events file); see bench/cached_bench.py.
#
#   scripts/bench-cached.sh                 # 10,000,000 events
#   scripts/bench-cached.sh -n 200000       # a quick run
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
else
  target=/root/.cache/tally/target
  echo "== building the release binary (waiting for /tmp/tally-cargo.lock if another build runs)"
  CARGO_TARGET_DIR=$target flock -o /tmp/tally-cargo.lock cargo build --release -p tally
  tally=$target/release/tally
fi
venv=$cache/bench-venv
if ! "$venv/bin/python" -c 'import duckdb, chdb' 2>/dev/null; then
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
exec "$venv/bin/python" "$root/bench/cached_bench.py" --tally "$tally" --events "$file" "$@"
