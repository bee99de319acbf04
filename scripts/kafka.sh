#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, no ZooKeeper) on 127.0.0.1 for tests and
# benchmarks, fetched from Maven Central: no tarball, no Docker.
#
#   scripts/kafka.sh start   fetch Kafka if needed, format a fresh data directory, start, wait
#   scripts/kafka.sh stop    stop the broker started by `start`
#   scripts/kafka.sh restart stop it and start it again on the same data (tests of outages)
#   scripts/kafka.sh status  exit 0 if it runs
#   scripts/kafka.sh tool CLASS ARGS…   run one of Kafka's own tools against it, e.g.
#       scripts/kafka.sh tool org.apache.kafka.tools.ConsumerPerformance --bootstrap-server …
#
# The jars are cached under ${TALLY_CACHE_DIR:-~/.cache/tally}/kafka-VERSION/lib; each start
# uses a new data directory under ${TALLY_KAFKA_RUN_DIR:-/tmp/tally-kafka}. The broker listens
# on ${TALLY_KAFKA_PORT:-19092} (controller: port + 1). Needs Java 17 and Maven.
set -euo pipefail

version=${TALLY_KAFKA_VERSION:-3.9.2}
cache=${TALLY_CACHE_DIR:-$HOME/.cache/tally}
home=$cache/kafka-$version
run=${TALLY_KAFKA_RUN_DIR:-/tmp/tally-kafka}
port=${TALLY_KAFKA_PORT:-19092}
controller_port=$((port + 1))

fetch() {
  if [ -f "$home/lib/.complete" ]; then
    return
  fi
  echo "==> fetching Apache Kafka $version from Maven Central into $home" >&2
  rm -rf "$home" && mkdir -p "$home"
  # kafka_2.13 is the broker; kafka-tools holds Kafka's own console and performance clients
  # (the consumer benchmark's ceiling). kafka_2.13 leaves the logging binding to the
  # distribution; slf4j-reload4j is the one the 3.9 tarball ships (without it the broker logs
  # nothing).
  cat >"$home/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>tally.test</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$version</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$version</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>1.7.36</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId><version>1.7.36</version></dependency>
  </dependencies>
</project>
POM
  mvn -B -q -f "$home/pom.xml" org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DoutputDirectory="$home/lib" -DincludeScope=runtime
  cat >"$home/log4j.properties" <<'LOG'
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
LOG
  touch "$home/lib/.complete"
}

running() {
  [ -f "$run/pid" ] && kill -0 "$(cat "$run/pid")" 2>/dev/null
}

start() {
  fetch
  if running; then
    echo "Kafka is already running on 127.0.0.1:$port (pid $(cat "$run/pid"))" >&2
    return
  fi
  rm -rf "$run" && mkdir -p "$run/data"
  cat >"$run/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$run/data
num.partitions=1
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.retention.hours=24
log.segment.bytes=104857600
PROPS
  local cp="$home/lib/*"
  local log="-Dlog4j.configuration=file:$home/log4j.properties -Dkafka.logs.dir=$run/logs"
  local cluster_id
  # shellcheck disable=SC2086
  cluster_id=$(java $log -cp "$cp" kafka.tools.StorageTool random-uuid | tail -1)
  # shellcheck disable=SC2086
  java $log -cp "$cp" kafka.tools.StorageTool format -t "$cluster_id" -c "$run/server.properties" >"$run/format.log"
  launch
}

# Starts the broker on the formatted data directory and waits until it serves.
launch() {
  local cp="$home/lib/*"
  local log="-Dlog4j.configuration=file:$home/log4j.properties -Dkafka.logs.dir=$run/logs"
  # shellcheck disable=SC2086
  nohup java -Xms256m -Xmx512m -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true $log -cp "$cp" kafka.Kafka "$run/server.properties" \
    >"$run/broker.log" 2>&1 &
  echo $! >"$run/pid"
  # A hang guard for a broker that never comes up, not a timing requirement.
  for _ in $(seq 1 240); do
    if grep -q "Kafka Server started" "$run/broker.log"; then
      echo "Kafka $version is running on 127.0.0.1:$port (pid $(cat "$run/pid"); log $run/broker.log)" >&2
      return
    fi
    if ! running; then
      echo "Kafka exited during start; its log:" >&2
      tail -40 "$run/broker.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "Kafka did not start within 2 minutes; its log: $run/broker.log" >&2
  exit 1
}

stop() {
  if running; then
    local pid
    pid=$(cat "$run/pid")
    kill "$pid"
    for _ in $(seq 1 120); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$run/pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart)
    stop
    fetch
    launch
    ;;
  status) running ;;
  fetch) fetch ;;
  tool)
    fetch
    shift
    # The tools log warnings only, to stderr, so that their reports on stdout stay parseable.
    printf 'log4j.rootLogger=WARN, stderr\nlog4j.appender.stderr=org.apache.log4j.ConsoleAppender\nlog4j.appender.stderr.Target=System.err\nlog4j.appender.stderr.layout=org.apache.log4j.PatternLayout\nlog4j.appender.stderr.layout.ConversionPattern=[%%d] %%p %%m (%%c)%%n\n' >"$home/tools-log4j.properties"
    exec java -Xmx512m -Dlog4j.configuration="file:$home/tools-log4j.properties" -cp "$home/lib/*" "$@"
    ;;
  *)
    echo "usage: $0 start|stop|restart|status|fetch|tool" >&2
    exit 2
    ;;
esac
