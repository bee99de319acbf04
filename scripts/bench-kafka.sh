#!/usr/bin/env bash
# Kafka benchmark against a real broker of its own (scripts/kafka.sh on port 19392): inbound
# events/s from a topic into queryable storage, against Kafka's own ConsumerPerformance and
# librdkafka reading the same topic in the same run (the ceilings); inbound with outbound on;
# produced-to-queryable latency p50/p99.
#
#   scripts/bench-kafka.sh               # 200,000 events from gen_events.py
#   EVENTS=1000000 scripts/bench-kafka.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
gen=${GEN_EVENTS:-$root/../shared/bench/gen_events.py}
export TALLY_KAFKA_PORT=${TALLY_KAFKA_PORT:-19392}
export TALLY_KAFKA_RUN_DIR=${TALLY_KAFKA_RUN_DIR:-/tmp/tally-kafka-bench}
brokers=127.0.0.1:$TALLY_KAFKA_PORT
cargo build --release --bin tally
sync # the build's writes, written back now rather than mid-run (see bench-ingest.sh)
tally=${CARGO_TARGET_DIR:-$root/target}/release/tally
work=$(mktemp -d)
scripts/kafka.sh start
trap 'scripts/kafka.sh stop; rm -rf "$work"' EXIT
events=${EVENTS:-200000}
python3 "$gen" -n "$events" --seed 1 > "$work/events.jsonl"
topic=tallybench$(date +%s).events
# Produce the events once; Kafka's own consumer then reads the same topic for the ceiling.
"$tally" bench kafka --brokers "$brokers" --events "$work/events.jsonl" --topic "$topic" --latency-events 0 --only-produce
echo "ceiling, Kafka's ConsumerPerformance on the same topic:"
scripts/kafka.sh tool org.apache.kafka.tools.ConsumerPerformance --bootstrap-server "$brokers" \
  --topic "$topic" --messages "$events" --timeout 60000 2>/dev/null | grep -A1 '^start.time' \
  | awk -F', *' 'NR == 1 { for (i = 1; i <= NF; i++) h[i] = $i } NR == 2 { for (i = 3; i <= NF; i++) printf "  %s: %s\n", h[i], $i }'
"$tally" bench kafka --brokers "$brokers" --events "$work/events.jsonl" --topic "$topic" --reuse-topic "$@"
