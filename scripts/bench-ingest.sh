#!/usr/bin/env bash
# Ingest benchmark: starts a release-built Tally on a fresh data directory, then runs
# `tally bench ingest` against it over loopback, printing events/s and p50/p99 acknowledgement
# latency for single events, 500-event batches and the /ping ceiling, all in one run.
#
#   scripts/bench-ingest.sh                 # 10 s per phase
#   SECONDS_PER_PHASE=20 CONNECTIONS=128 scripts/bench-ingest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
gen=${GEN_EVENTS:-$root/../shared/bench/gen_events.py}
seconds=${SECONDS_PER_PHASE:-10}
connections=${CONNECTIONS:-128}
port=${PORT:-18181}
# The log writer lets appends gather when a trial shows it commits faster (`log.group_commit_linger_us`;
# README). GROUP_COMMIT_LINGER_US overrides it (0 turns it off); unset, the server's default applies.
if [ -n "${GROUP_COMMIT_LINGER_US:-}" ]; then
  export TALLY_LOG__GROUP_COMMIT_LINGER_US=$GROUP_COMMIT_LINGER_US
fi

cargo build --release --bin tally
# The build has just written hundreds of MB (the binary alone is ~700 MB with its debug info),
# which the kernel writes back ~30 s later, in the middle of the run: on the development
# machine's disk that writeback held the log's syncs for up to a second ("Measured" in
# docs/ARCHITECTURE.md, 2026-12-06, 10:00–11:20 UTC). Write it back before anything is
# timed.
sync
tally=${CARGO_TARGET_DIR:-$root/target}/release/tally
work=$(mktemp -d)
trap 'kill -TERM "${server_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

python3 "$gen" -n 20000 --seed 1 > "$work/events.jsonl"
python3 "$gen" -n 200000 --seed 2 --format batch --batch-size 500 > "$work/batches.jsonl"
project=$("$tally" project create bench --data-dir "$work/data")
id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$project")
key=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["write_key"])' "$project")

"$tally" serve --data-dir "$work/data" --listen "127.0.0.1:$port" > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break
  sleep 0.1
done
echo "disk: $(df -h "$work" | tail -1 | awk '{print $1, $2}'), cores: $(nproc), log.group_commit_linger_us: ${GROUP_COMMIT_LINGER_US:-default}"
"$tally" bench ingest --addr "127.0.0.1:$port" --project "$id" --write-key "$key" \
  --events "$work/events.jsonl" --batches "$work/batches.jsonl" \
  --connections "$connections" --seconds "$seconds"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^tally_log_(fsync_seconds|group_commit_records)_(sum|count)|^tally_log_group_commit_lingers|^tally_events_accepted' || true
