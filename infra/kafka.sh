#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) for development and tests.
#   infra/kafka.sh install|start|stop|status
# Jars come from Maven Central through Maven and are cached under .local/kafka/libs,
# so the second run needs no network.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HOME_DIR="$ROOT/.local/kafka"
LIBS="$HOME_DIR/libs"
DATA="$HOME_DIR/data"
PORT="${KAFKA_PORT:-19092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
# An authenticated listener as well, so the SASL client path is tested against a real broker.
SASL_PORT="${KAFKA_SASL_PORT:-19094}"
PIDFILE="$HOME_DIR/kafka.pid"

die() { echo "kafka: $*" >&2; exit 1; }

need_java() {
  command -v java >/dev/null || die "Java is missing. Install Java 17 or newer (apt-get install -y openjdk-17-jre-headless)."
  local major
  major=$(java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -1)
  [ "${major:-0}" -ge 17 ] || die "Kafka 4.x needs Java 17 or newer; found ${major:-unknown}."
}

install() {
  if [ -f "$LIBS/.complete" ]; then return 0; fi
  need_java
  command -v mvn >/dev/null || die "Maven is missing. Install it (apt-get install -y maven); it fetches the broker jars."
  echo "kafka: resolving the broker jars with Maven (first run only, ~55 MB)..."
  mkdir -p "$LIBS"
  # Retries: a fresh CI machine's first download is the one most likely to meet a reset.
  if ! mvn -B -q -f "$ROOT/infra/kafka/pom.xml" dependency:copy-dependencies \
        -Dmaven.wagon.http.retryHandler.count=5 -Daether.connector.http.retryHandler.count=5 \
        -DoutputDirectory="$LIBS" -DincludeScope=runtime >"$HOME_DIR/mvn.log" 2>&1; then
    tail -20 "$HOME_DIR/mvn.log" >&2
    die "Maven could not fetch the Kafka jars from Maven Central (see $HOME_DIR/mvn.log). Is the registry reachable?"
  fi
  touch "$LIBS/.complete"
}

write_config() {
  mkdir -p "$DATA" "$HOME_DIR/logs"
  cat >"$HOME_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${CONTROLLER_PORT}
listeners=PLAINTEXT://127.0.0.1:${PORT},CONTROLLER://127.0.0.1:${CONTROLLER_PORT},SASL_PLAINTEXT://127.0.0.1:${SASL_PORT}
advertised.listeners=PLAINTEXT://127.0.0.1:${PORT},SASL_PLAINTEXT://127.0.0.1:${SASL_PORT}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_ehr-test="ehr-test-password";
log.dirs=${DATA}
num.partitions=3
auto.create.topics.enable=false
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
PROPS
}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  install
  if running; then echo "kafka: already running on 127.0.0.1:$PORT"; return 0; fi
  if port_open "$PORT"; then die "port $PORT is taken by another process; stop it or set KAFKA_PORT."; fi
  need_java
  write_config
  local cp="$LIBS/*"
  export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
  if [ ! -f "$DATA/meta.properties" ]; then
    local cluster_id
    cluster_id=$(java -cp "$cp" kafka.tools.StorageTool random-uuid)
    java -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" -Dkafka.logs.dir="$HOME_DIR/logs" \
      -cp "$cp" kafka.tools.StorageTool format -t "$cluster_id" -c "$HOME_DIR/server.properties" >/dev/null
  fi
  # shellcheck disable=SC2086
  nohup java $KAFKA_HEAP_OPTS -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties" -Dkafka.logs.dir="$HOME_DIR/logs" \
    -cp "$cp" kafka.Kafka "$HOME_DIR/server.properties" >"$HOME_DIR/logs/stdout.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    if port_open "$PORT"; then echo "kafka: ready on 127.0.0.1:$PORT"; return 0; fi
    running || { tail -30 "$HOME_DIR/logs/stdout.log" "$HOME_DIR/logs/server.log" >&2 2>/dev/null; die "broker exited during start"; }
    sleep 0.5
  done
  die "broker did not open port $PORT within 60 s (see $HOME_DIR/logs)"
}

stop() {
  if running; then
    local pid; pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    echo "kafka: stopped"
  fi
  rm -f "$PIDFILE"
}

status() { if running; then echo "kafka: running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; else echo "kafka: stopped"; return 1; fi; }

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  pid) cat "$PIDFILE" ;;
  *) echo "usage: $0 install|start|stop|status|pid" >&2; exit 2 ;;
esac
