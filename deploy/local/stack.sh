#!/usr/bin/env bash
# deploy/local/stack.sh — the local Kafka + PostgreSQL stack and the nginx gateway, without Docker.
#
# Usage: deploy/local/stack.sh COMMAND [ARGS]
#
#   up                 start Kafka, PostgreSQL and the gateway (no-op for what is already
#                      running), then write and print ${DR_STATE_DIR}/stack.env
#   down               stop all three (succeeds when nothing is running); data is kept
#   status [--core]    one line per component; exit 1 if any component is down
#                      (--core: only Kafka and PostgreSQL decide the exit code)
#   logs [kafka|postgres|nginx] [-f]
#                      print the last ${LOG_LINES:-200} lines of a log (-f: follow)
#   env                print ${DR_STATE_DIR}/stack.env (exit 1 if the stack was never up)
#   exec CMD [ARGS]    run CMD with the variables of stack.env exported
#   kafka-restart      stop and start Kafka only, keeping its data (for fault tests)
#   pg-restart         stop and start PostgreSQL only, keeping its data (for fault tests)
#   kafka-stop | kafka-start | pg-stop | pg-start | gateway-stop | gateway-start
#                      one component only, for fault tests that need an outage window
#   kafka-run CLASS [ARGS]
#                      run a Kafka tool class on the cached classpath, e.g.
#                      kafka-run org.apache.kafka.tools.TopicCommand \
#                          --bootstrap-server 127.0.0.1:19092 --list
#   purge              down, then delete the state dir (and the PostgreSQL data dir
#                      if it lives in /tmp); the download cache is kept
#
# Settings (environment variables, with defaults):
#   DR_STATE_DIR          <repo>/.state   data, logs, pid files, stack.env
#   DR_CACHE_DIR          <repo>/.cache   downloaded Kafka jars (kept by purge)
#   KAFKA_VERSION         3.9.1           must be 3.x (4.x breaks the Python clients)
#   SCALA_VERSION         2.13
#   KAFKA_PORT            19092           the client listener on 127.0.0.1 (SSL with client
#                                         certificates; PLAINTEXT with KAFKA_SECURITY=plaintext)
#   KAFKA_SECURITY        tls             tls: mutual TLS on every listener, the StandardAuthorizer
#                                         with ACLs (nothing allowed without one); plaintext: no
#                                         authentication (a benchmark baseline). Changing it needs
#                                         a `down` first.
#   KAFKA_CONTROLLER_PORT 19093           KRaft controller listener on 127.0.0.1
#   KAFKA_HEAP_OPTS       -Xmx512m -Xms256m
#   KAFKA_JVM_OPTS        -XX:+UseSerialGC -Djava.awt.headless=true
#   KAFKA_START_TIMEOUT   240             seconds to wait for the broker to answer (a broker
#                                         reloading many partitions on a slow disk needs minutes)
#   KAFKA_STOP_TIMEOUT    120             seconds between SIGTERM and SIGKILL
#   PG_PORT               15432           PostgreSQL on 127.0.0.1
#   PG_START_TIMEOUT      60
#   PG_BINDIR             (auto)          directory with initdb/pg_ctl/postgres; found
#                                         via `pg_config --bindir`, then the newest
#                                         /usr/lib/postgresql/*/bin, then $PATH
#   DATABASE_URL          (unset)         if set to anything but the URL of the managed
#                                         cluster, PostgreSQL is NOT started: `up` only
#                                         checks that this database answers
#   JAVA_HOME             (unset)         use $JAVA_HOME/bin/java instead of `java`
#   GATEWAY_PORT          18100           the nginx gateway on 127.0.0.1 (one base URL)
#   GATEWAY               1               0: do not start the gateway (nor require nginx)
#   DR_<SERVICE>_HTTP_PORT 8101..8105     upstream ports the gateway routes to (registration,
#                                         inventory, policy, replication, failover)
#   PYTHON                python3         renders the gateway config (standard library only)
#
# Kafka: the official Maven Central artifacts (org.apache.kafka:kafka_${SCALA_VERSION},
# plus kafka-tools for the CLI tool classes, plus slf4j-reload4j/reload4j as the logging
# backend, as in the Kafka binary distribution) are fetched ONCE with `mvn
# dependency:copy-dependencies` into ${DR_CACHE_DIR}/kafka-${KAFKA_VERSION}/libs. The
# broker runs in KRaft mode, one node that is both broker and controller, with its data
# in ${DR_STATE_DIR}/kafka/data.
#
# PostgreSQL: a throwaway cluster made with initdb and run with pg_ctl. It uses `trust`
# authentication for local and 127.0.0.1 connections: it is a dev/test cluster that only
# listens on the loopback address, never use this setup for anything real. As root, the
# server runs as the `postgres` system user (initdb/postgres refuse root); if that user
# cannot reach ${DR_STATE_DIR}, or the socket path would be too long, the cluster lives
# in /tmp/dr-pg-<hash of the state dir path> instead (recorded in
# ${DR_STATE_DIR}/postgres.location). The URL is postgresql://postgres@127.0.0.1:${PG_PORT}/dr
#
# Gateway: nginx (Debian package: nginx) in the foreground (`daemon off`), detached with setsid,
# its config rendered from deploy/nginx/nginx.conf.template by `python3 -m scripts.gateway`,
# pid/temp/logs under ${DR_STATE_DIR}/nginx. It routes by path prefix to the services on their
# local ports (see the template) and serves the merged OpenAPI document at /openapi.json; a
# service that is not running answers 502 through it. stack.env gets DR_GATEWAY_URL.
#
# Kafka security (KAFKA_SECURITY=tls): on first start openssl makes a platform CA under
# ${DR_STATE_DIR}/pki (ca.pem; ca.key stays there, mode 0600), the broker's certificate
# (CN=broker, a super user; SANs 127.0.0.1 and localhost) and one client certificate per
# platform principal: admin (a super user: topic tooling, tests, operators), registration,
# inventory, policy, replication, failover and edge. A principal is its certificate's CN
# (ssl.principal.mapping.rules). ACLs per topic prefix are set by `python -m shared.kafka_acl`
# (what each principal may write, read and which consumer groups it may use); stack.env names
# the admin certificate (DR_KAFKA_CERT_FILE/DR_KAFKA_KEY_FILE), the CA and the pki folder.
# Java tools (kafka-run) take `--command-config ${DR_STATE_DIR}/pki/admin.properties`.
#
# Exit codes: 0 ok, 1 failure, 2 missing prerequisite (the message names the Debian package).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"

DR_STATE_DIR="$(realpath -m "${DR_STATE_DIR:-$REPO_ROOT/.state}")"
DR_CACHE_DIR="$(realpath -m "${DR_CACHE_DIR:-$REPO_ROOT/.cache}")"
KAFKA_VERSION="${KAFKA_VERSION:-3.9.1}"
SCALA_VERSION="${SCALA_VERSION:-2.13}"
KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:--XX:+UseSerialGC -Djava.awt.headless=true}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-240}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-120}"
PG_PORT="${PG_PORT:-15432}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"
LOG_LINES="${LOG_LINES:-200}"

# Logging backend for Kafka 3.9 (slf4j 1.7 API + log4j 1.x API): the versions the
# Kafka 3.9 binary distribution ships (kafka_2.13 itself depends on slf4j-api 1.7.36).
SLF4J_VERSION="1.7.36"
RELOAD4J_VERSION="1.2.25"
DEPENDENCY_PLUGIN_VERSION="3.8.1"

KAFKA_HOME="$DR_CACHE_DIR/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_MARKER="$KAFKA_HOME/.complete"
KAFKA_WANT="kafka_${SCALA_VERSION}:${KAFKA_VERSION} kafka-tools:${KAFKA_VERSION} slf4j-reload4j:${SLF4J_VERSION} reload4j:${RELOAD4J_VERSION}"
KAFKA_STATE="$DR_STATE_DIR/kafka"
KAFKA_DATA="$KAFKA_STATE/data"
KAFKA_PIDFILE="$KAFKA_STATE/kafka.pid"
KAFKA_LOG="$KAFKA_STATE/kafka.log"
KAFKA_PROPS="$KAFKA_STATE/server.properties"
KAFKA_LOG4J="$KAFKA_STATE/log4j.properties"
KAFKA_TOOLS_LOG4J="$KAFKA_STATE/tools-log4j.properties"
KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
KAFKA_SECURITY="${KAFKA_SECURITY:-tls}"
PKI_DIR="$DR_STATE_DIR/pki"
PKI_PRINCIPALS="admin registration inventory policy replication failover edge"
if [[ "$KAFKA_SECURITY" == "tls" ]]; then
  KAFKA_LISTENERS="SSL://127.0.0.1:${KAFKA_PORT},CONTROLLER://127.0.0.1:${KAFKA_CONTROLLER_PORT}"
elif [[ "$KAFKA_SECURITY" == "plaintext" ]]; then
  KAFKA_LISTENERS="PLAINTEXT://127.0.0.1:${KAFKA_PORT},CONTROLLER://127.0.0.1:${KAFKA_CONTROLLER_PORT}"
else
  printf '[stack] ERROR: KAFKA_SECURITY must be tls or plaintext, not %s\n' "$KAFKA_SECURITY" >&2
  exit 1
fi

GATEWAY_PORT="${GATEWAY_PORT:-18100}"
GATEWAY="${GATEWAY:-1}"
PYTHON="${PYTHON:-python3}"
NGINX_STATE="$DR_STATE_DIR/nginx"
NGINX_PIDFILE="$NGINX_STATE/nginx.pid"
NGINX_LOG="$NGINX_STATE/nginx.out"
NGINX_CONF="$NGINX_STATE/nginx.conf"
GATEWAY_URL="http://127.0.0.1:$GATEWAY_PORT"

PG_LOCATION_FILE="$DR_STATE_DIR/postgres.location"
PG_MANAGED_URL="postgresql://postgres@127.0.0.1:$PG_PORT/dr"
STACK_ENV="$DR_STATE_DIR/stack.env"
STATE_MARKER="$DR_STATE_DIR/.dr-stack"

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }
is_root() { [[ $EUID -eq 0 ]]; }

# ---------------------------------------------------------------- small helpers

# pid_alive PID: the process exists and is not a zombie.
pid_alive() {
  local pid="$1" state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
  [[ "$state" != "Z" ]]
}

pid_cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# external_db: DATABASE_URL is set and is not the URL of the cluster managed here.
external_db() { [[ -n "${DATABASE_URL:-}" && "${DATABASE_URL}" != "$PG_MANAGED_URL" ]]; }

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
    echo "${JAVA_HOME}/bin/java"
  else
    command -v java || true
  fi
}

java_major() {
  local v
  v="$("$1" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')"
  v="${v#1.}"
  echo "${v%%[.+-]*}"
}

find_pg_bindir() {
  local d
  if [[ -n "${PG_BINDIR:-}" ]]; then
    echo "$PG_BINDIR"
    return
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
      echo "$d"
      return
    fi
  fi
  d="$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  if [[ -n "$d" && -x "$d/initdb" ]]; then
    echo "$d"
    return
  fi
  if command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return
  fi
  echo ""
}

PG_BIN="$(find_pg_bindir)"

pg_tool() {
  # pg_tool NAME: path of a PostgreSQL client/server program, or empty.
  if [[ -n "$PG_BIN" && -x "$PG_BIN/$1" ]]; then
    echo "$PG_BIN/$1"
  else
    command -v "$1" 2>/dev/null || true
  fi
}

# Prerequisites. Collect every missing thing, then exit 2 with the packages to install.
MISSING=()
need() { MISSING+=("$1 (Debian package: $2)"); }
report_missing() {
  if ((${#MISSING[@]})); then
    printf '[stack] ERROR: missing prerequisites:\n' >&2
    printf '[stack]   - %s\n' "${MISSING[@]}" >&2
    printf '[stack] install them with: apt-get install -y --no-install-recommends <packages above>\n' >&2
    exit 2
  fi
}

check_kafka_prereqs() {
  local j major
  j="$(java_bin)"
  if [[ -z "$j" ]]; then
    need "java 17" openjdk-17-jre-headless
  else
    major="$(java_major "$j")"
    if ! [[ "$major" =~ ^[0-9]+$ ]] || ((major < 11)); then
      need "java 11+ (found '$major' at $j; 17 recommended)" openjdk-17-jre-headless
    fi
  fi
  if ! kafka_libs_complete && ! command -v mvn >/dev/null 2>&1; then
    need "mvn (to fetch the Kafka jars once)" maven
  fi
}

check_pg_prereqs() {
  if [[ -z "$(pg_tool psql)" ]]; then need psql postgresql-client; fi
  if external_db; then
    return
  fi
  local t
  for t in initdb pg_ctl postgres; do
    if [[ -z "$PG_BIN" || ! -x "$PG_BIN/$t" ]]; then need "$t" postgresql; fi
  done
  if is_root; then
    if ! id -u postgres >/dev/null 2>&1; then
      need "the 'postgres' system user (initdb/postgres refuse to run as root)" postgresql
    fi
    if ! command -v runuser >/dev/null 2>&1 && ! command -v su >/dev/null 2>&1; then
      need "runuser or su" util-linux
    fi
  fi
}

check_kafka_version() {
  case "$KAFKA_VERSION" in
    3.9.*) ;;
    3.*) log "warning: KAFKA_VERSION=$KAFKA_VERSION; this stack is tested with 3.9.x" ;;
    *) die "KAFKA_VERSION=$KAFKA_VERSION is not supported: use 3.9.x (Kafka 4.x breaks the Python clients)" ;;
  esac
}

# Serialise up/down/restarts of one state dir. Children must not inherit fd 9 (9>&-),
# or the lock would be held for as long as Kafka/PostgreSQL run.
take_lock() {
  mkdir -p "$DR_STATE_DIR"
  [[ -f "$STATE_MARKER" ]] || echo "state dir of deploy/local/stack.sh" >"$STATE_MARKER"
  exec 9>"$DR_STATE_DIR/.stack.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 600 9 || die "could not lock $DR_STATE_DIR/.stack.lock within 600 s"
  fi
}

# ---------------------------------------------------------------- Kafka

kafka_libs_complete() {
  [[ -f "$KAFKA_MARKER" && "$(cat "$KAFKA_MARKER")" == "$KAFKA_WANT" ]] &&
    compgen -G "$KAFKA_LIBS/kafka_${SCALA_VERSION}-${KAFKA_VERSION}.jar" >/dev/null
}

write_kafka_pom() {
  cat >"$KAFKA_HOME/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/local/stack.sh: the jars of a Kafka ${KAFKA_VERSION} broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.dr-stack</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>${KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_${SCALA_VERSION}</artifactId>
      <version>${KAFKA_VERSION}</version>
    </dependency>
    <!-- CLI tool classes (TopicCommand, ConsumerGroupCommand, ...); Connect is not needed. -->
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>${KAFKA_VERSION}</version>
      <exclusions>
        <exclusion><groupId>org.apache.kafka</groupId><artifactId>connect-runtime</artifactId></exclusion>
        <exclusion><groupId>com.fasterxml.jackson.jaxrs</groupId><artifactId>jackson-jaxrs-json-provider</artifactId></exclusion>
      </exclusions>
    </dependency>
    <!-- Logging backend: slf4j 1.7 binding to reload4j (log4j 1.2 API), as shipped by Kafka 3.9. -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>${SLF4J_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>ch.qos.reload4j</groupId>
      <artifactId>reload4j</artifactId>
      <version>${RELOAD4J_VERSION}</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>${DEPENDENCY_PLUGIN_VERSION}</version>
      </plugin>
    </plugins>
  </build>
</project>
EOF
}

fetch_kafka() {
  if kafka_libs_complete; then
    return
  fi
  local tmp t0=$SECONDS
  mkdir -p "$KAFKA_HOME"
  write_kafka_pom
  tmp="$KAFKA_HOME/libs.partial"
  rm -rf "$tmp"
  log "kafka: fetching Kafka $KAFKA_VERSION jars from Maven Central (one time) into $KAFKA_LIBS"
  if ! mvn -B -Dstyle.color=never -f "$KAFKA_HOME/pom.xml" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
    >"$KAFKA_HOME/mvn.log" 2>&1 9>&-; then
    grep -E 'ERROR|FAIL' "$KAFKA_HOME/mvn.log" | head -n 40 >&2 || tail -n 40 "$KAFKA_HOME/mvn.log" >&2
    rm -rf "$tmp"
    die "kafka: 'mvn dependency:copy-dependencies' failed (network?); full output in $KAFKA_HOME/mvn.log"
  fi
  compgen -G "$tmp/kafka_${SCALA_VERSION}-${KAFKA_VERSION}.jar" >/dev/null ||
    die "kafka: the fetched jars do not include kafka_${SCALA_VERSION}-${KAFKA_VERSION}.jar"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  echo "$KAFKA_WANT" >"$KAFKA_MARKER"
  log "kafka: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars fetched in $((SECONDS - t0)) s"
}

# The command line of a short-lived Kafka tool JVM (C1 only: starts faster).
kafka_tool_cmd() {
  KAFKA_TOOL_CMD=("$(java_bin)" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto -Xmx256m
    -Dlog4j.configuration="file:$KAFKA_TOOLS_LOG4J" -cp "$KAFKA_LIBS/*")
}

# kafka_java MAINCLASS [ARGS...]
kafka_java() {
  kafka_tool_cmd
  "${KAFKA_TOOL_CMD[@]}" "$@"
}

# The platform CA, the certificates of the broker and of each platform principal and the
# edge-issuing CA (once; kept across restarts; the edge CA is added to an older folder):
# deploy/make-pki.sh.
make_pki() {
  [[ "$KAFKA_SECURITY" == "tls" ]] || return 0
  [[ -f "$PKI_DIR/edge-ca.pem" ]] && return 0
  log "kafka: making the platform CA and certificates in $PKI_DIR"
  # shellcheck disable=SC2086
  "$SCRIPT_DIR/../make-pki.sh" "$PKI_DIR" $PKI_PRINCIPALS || die "kafka: making the certificates in $PKI_DIR failed"
}

# Kafka's security settings for KAFKA_SECURITY.
kafka_security_config() {
  if [[ "$KAFKA_SECURITY" != "tls" ]]; then
    echo "inter.broker.listener.name=PLAINTEXT"
    echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    return
  fi
  cat <<EOF
# Mutual TLS on both listeners (the controller's too: the broker talks to it as CN=broker);
# a client's principal is its certificate's CN; nothing is allowed without an ACL.
inter.broker.listener.name=SSL
listener.security.protocol.map=CONTROLLER:SSL,SSL:SSL
ssl.client.auth=required
ssl.keystore.type=PEM
ssl.keystore.location=$PKI_DIR/broker.keystore.pem
ssl.key.password=$(cat "$PKI_DIR/broker.password")
ssl.truststore.type=PEM
ssl.truststore.location=$PKI_DIR/ca.pem
ssl.principal.mapping.rules=RULE:^CN=([^,]+)(,.*)?\$/\$1/,DEFAULT
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:broker;User:admin
EOF
}

write_kafka_config() {
  mkdir -p "$KAFKA_DATA"
  make_pki
  cat >"$KAFKA_PROPS" <<EOF
# Generated by deploy/local/stack.sh on every start; edits are overwritten.
# Single-node KRaft: this process is both the broker and the (only) controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${KAFKA_CONTROLLER_PORT}
listeners=${KAFKA_LISTENERS}
advertised.listeners=${KAFKA_LISTENERS%%,*}
controller.listener.names=CONTROLLER
$(kafka_security_config)
log.dirs=${KAFKA_DATA}
num.partitions=4
default.replication.factor=1
auto.create.topics.enable=true
# One broker: internal topics cannot have more than one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
# Fewer internal partitions than the defaults (50): faster first consumer group / txn.
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
group.initial.rebalance.delay.ms=0
# message.max.bytes: Kafka's default (about 1 MiB).
# Small machine (2 cores): fewer threads than the defaults.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=2
# Deleted topics (test platforms delete theirs) leave the disk after 1 s, not 60 s.
log.segment.delete.delay.ms=1000
EOF
  cat >"$KAFKA_LOG4J" <<'EOF'
# Generated by deploy/local/stack.sh. The broker logs to stdout, which goes to kafka.log.
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.network.RequestChannel$=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.clients=WARN
EOF
  cat >"$KAFKA_TOOLS_LOG4J" <<'EOF'
# Generated by deploy/local/stack.sh: Kafka CLI tools log warnings to stderr only.
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.appender.stderr.Target=System.err
EOF
}

format_kafka_storage() {
  if [[ -f "$KAFKA_DATA/meta.properties" ]]; then
    return
  fi
  local cid
  cid="$(kafka_java kafka.tools.StorageTool random-uuid 9>&- | tail -n 1)"
  [[ -n "$cid" ]] || die "kafka: StorageTool random-uuid printed nothing"
  log "kafka: formatting KRaft storage in $KAFKA_DATA (cluster id $cid)"
  kafka_java kafka.tools.StorageTool format -t "$cid" -c "$KAFKA_PROPS" 9>&- >/dev/null ||
    die "kafka: StorageTool format failed"
}

# Prints the pid of the broker started from this state dir, or fails.
kafka_pid() {
  local pid
  [[ -f "$KAFKA_PIDFILE" ]] || return 1
  pid="$(cat "$KAFKA_PIDFILE" 2>/dev/null || true)"
  pid_alive "$pid" || return 1
  [[ "$(pid_cmdline "$pid")" == *kafka.Kafka*"$KAFKA_PROPS"* ]] || return 1
  echo "$pid"
}

# The broker runs, but with other ports than configured now: refuse to guess.
check_kafka_running_ports() {
  local want="listeners=${KAFKA_LISTENERS}"
  if ! grep -qxF "$want" "$KAFKA_PROPS" 2>/dev/null; then
    die "kafka: the broker of $DR_STATE_DIR runs with other ports or KAFKA_SECURITY ($(grep '^listeners=' "$KAFKA_PROPS" 2>/dev/null || echo '?')); run '$0 down' first"
  fi
}

kafka_fail_start() {
  local pid="${1:-}"
  log "kafka: last lines of $KAFKA_LOG:"
  tail -n 40 "$KAFKA_LOG" >&2 || true
  if [[ -n "$pid" ]] && pid_alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$KAFKA_PIDFILE"
  die "kafka: $2"
}

start_kafka() {
  local pid deadline t0=$SECONDS log_offset=0
  if pid="$(kafka_pid)"; then
    check_kafka_running_ports
    if port_open "$KAFKA_PORT"; then
      log "kafka: already running (pid $pid) on $KAFKA_BOOTSTRAP"
      return
    fi
    log "kafka: pid $pid is running but $KAFKA_BOOTSTRAP does not answer yet; waiting"
  else
    rm -f "$KAFKA_PIDFILE"
    if port_open "$KAFKA_PORT"; then
      die "kafka: port $KAFKA_PORT is already in use by another process (set KAFKA_PORT)"
    fi
    if port_open "$KAFKA_CONTROLLER_PORT"; then
      die "kafka: port $KAFKA_CONTROLLER_PORT is in use by another process (set KAFKA_CONTROLLER_PORT)"
    fi
    fetch_kafka
    write_kafka_config
    format_kafka_storage
    # Keep the previous run's log as kafka.log.1 when it grew large.
    if [[ -f "$KAFKA_LOG" ]] && (($(stat -c %s "$KAFKA_LOG") > 50 * 1024 * 1024)); then
      mv -f "$KAFKA_LOG" "$KAFKA_LOG.1"
    fi
    printf '\n===== %s stack.sh: starting Kafka %s =====\n' "$(date -Is)" "$KAFKA_VERSION" >>"$KAFKA_LOG"
    log_offset="$(stat -c %s "$KAFKA_LOG")"
    local -a heap jvm
    read -r -a heap <<<"$KAFKA_HEAP_OPTS"
    read -r -a jvm <<<"$KAFKA_JVM_OPTS"
    (
      cd "$KAFKA_STATE"
      exec setsid nohup "$(java_bin)" "${heap[@]}" "${jvm[@]}" \
        -Dlog4j.configuration="file:$KAFKA_LOG4J" -Dkafka.logs.dir="$KAFKA_STATE" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" >>"$KAFKA_LOG" 2>&1 </dev/null 9>&-
    ) &
    pid=$!
    echo "$pid" >"$KAFKA_PIDFILE"
    log "kafka: started pid $pid, waiting for $KAFKA_BOOTSTRAP (up to ${KAFKA_START_TIMEOUT} s)"
  fi
  deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  until port_open "$KAFKA_PORT"; do
    pid_alive "$pid" || kafka_fail_start "" "the broker exited during start-up"
    ((SECONDS < deadline)) || kafka_fail_start "$pid" "no answer on $KAFKA_BOOTSTRAP after ${KAFKA_START_TIMEOUT} s"
    sleep 0.3
  done
  # One real metadata round trip through the Admin client (it retries until the broker
  # has caught up with the metadata log; bounded by what is left of the deadline).
  local left=$((deadline - SECONDS))
  ((left >= 20)) || left=20
  kafka_tool_cmd
  local -a client_config=()
  [[ "$KAFKA_SECURITY" == "tls" ]] && client_config=(--command-config "$PKI_DIR/admin.properties")
  if ! timeout "$left" "${KAFKA_TOOL_CMD[@]}" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$KAFKA_BOOTSTRAP" "${client_config[@]}" --list >/dev/null 9>&-; then
    kafka_fail_start "$pid" "the broker listens but a metadata request (TopicCommand --list) failed"
  fi
  tail -c "+$((log_offset + 1))" "$KAFKA_LOG" | grep -q 'Kafka Server started' ||
    log "kafka: warning: 'Kafka Server started' not found in $KAFKA_LOG (is logging set up?)"
  log "kafka: ready on $KAFKA_BOOTSTRAP (pid $pid) in $((SECONDS - t0)) s"
}

stop_kafka() {
  local pid deadline
  if ! pid="$(kafka_pid)"; then
    rm -f "$KAFKA_PIDFILE"
    log "kafka: not running"
    return
  fi
  log "kafka: stopping pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if pid_alive "$pid"; then
    log "kafka: still running after ${KAFKA_STOP_TIMEOUT} s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    pid_alive "$pid" && die "kafka: pid $pid survived SIGKILL"
  fi
  rm -f "$KAFKA_PIDFILE"
  log "kafka: stopped"
}

# ---------------------------------------------------------------- PostgreSQL

# Where the cluster lives: recorded at the first `up` in postgres.location.
pg_area() {
  if [[ -f "$PG_LOCATION_FILE" ]]; then
    cat "$PG_LOCATION_FILE"
  else
    echo "$DR_STATE_DIR/postgres"
  fi
}

pg_fallback_area() {
  echo "/tmp/dr-pg-$(printf '%s' "$DR_STATE_DIR" | sha256sum | cut -c1-12)"
}

# as_pg CMD...: run CMD as the postgres user when we are root (from / so that the
# postgres user does not need access to the current directory).
as_pg() {
  if is_root; then
    if command -v runuser >/dev/null 2>&1; then
      (cd / && runuser -u postgres -- "$@")
    else
      (cd / && su -s /bin/sh postgres -c "$(printf '%q ' "$@")")
    fi
  else
    "$@"
  fi
}

# Choose (first time) and prepare the directory that holds data/, run/ and postgres.log.
prepare_pg_area() {
  local area sock
  if [[ -f "$PG_LOCATION_FILE" ]]; then
    area="$(cat "$PG_LOCATION_FILE")"
  else
    area="$DR_STATE_DIR/postgres"
    sock="$area/run/.s.PGSQL.$PG_PORT"
    if ((${#sock} > 100)); then
      log "postgres: $area is too deep for a unix socket path; using $(pg_fallback_area)"
      area="$(pg_fallback_area)"
    elif is_root; then
      mkdir -p "$area"
      chown postgres:postgres "$area"
      chmod 700 "$area"
      if ! as_pg test -w "$area" -a -x "$area"; then
        log "postgres: the postgres user cannot reach $area (a parent dir is not"
        log "postgres: traversable); using $(pg_fallback_area) for the data instead"
        rmdir "$area" 2>/dev/null || true
        area="$(pg_fallback_area)"
      fi
    fi
    echo "$area" >"$PG_LOCATION_FILE"
  fi
  if [[ -L "$area" ]]; then die "postgres: $area is a symlink; refusing to use it"; fi
  mkdir -p "$area"
  if is_root; then
    chown postgres:postgres "$area"
    chmod 700 "$area"
    as_pg test -w "$area" || die "postgres: the postgres user cannot write $area"
  fi
  as_pg mkdir -p "$area/run"
  echo "$area"
}

pg_pid() {
  # Prints the postmaster pid of the managed cluster, or fails.
  local area pid
  area="$(pg_area)"
  [[ -f "$area/data/postmaster.pid" ]] || return 1
  pid="$(head -n 1 "$area/data/postmaster.pid" 2>/dev/null || true)"
  pid_alive "$pid" || return 1
  [[ "$(pid_cmdline "$pid")" == *postgres* ]] || return 1
  echo "$pid"
}

# The managed cluster runs, but on another port than PG_PORT: refuse to guess.
check_pg_running_port() {
  local port
  port="$(sed -n 4p "$(pg_area)/data/postmaster.pid" 2>/dev/null || true)"
  if [[ -n "$port" && "$port" != "$PG_PORT" ]]; then
    die "postgres: the cluster of $DR_STATE_DIR runs on port $port, not PG_PORT=$PG_PORT; run '$0 down' first"
  fi
}

psql_admin() {
  "$(pg_tool psql)" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"
}

check_db_url() {
  local url="$1" isready
  isready="$(pg_tool pg_isready)"
  if [[ -n "$isready" ]] && ! "$isready" -q -t 10 -d "$url"; then
    return 1
  fi
  "$(pg_tool psql)" -X -q -t -A -v ON_ERROR_STOP=1 -c 'select 1' "$url" >/dev/null
}

start_pg() {
  local area data t0=$SECONDS pid
  if external_db; then
    log "postgres: DATABASE_URL is set; not starting a cluster, checking that it answers"
    check_db_url "$DATABASE_URL" || die "postgres: DATABASE_URL does not answer (psql/pg_isready failed)"
    log "postgres: external database answers"
    return
  fi
  if pid="$(pg_pid)"; then
    check_pg_running_port
    log "postgres: already running (pid $pid) on 127.0.0.1:$PG_PORT"
  else
    area="$(prepare_pg_area)"
    data="$area/data"
    if [[ ! -f "$data/PG_VERSION" ]]; then
      log "postgres: initdb in $data"
      if ! as_pg "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C \
        >"$DR_STATE_DIR/initdb.log" 2>&1 9>&-; then
        cat "$DR_STATE_DIR/initdb.log" >&2
        die "postgres: initdb failed"
      fi
      echo "include_if_exists = 'dr-stack.conf'" | as_pg tee -a "$data/postgresql.conf" >/dev/null
    fi
    # Settings are rewritten on every start so that PG_PORT can change.
    as_pg tee "$data/dr-stack.conf" >/dev/null <<EOF
# Generated by deploy/local/stack.sh on every start; edits are overwritten.
# Throwaway dev/test cluster: trust auth (see pg_hba.conf), loopback only.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$area/run'
max_connections = 200
shared_buffers = 32MB
fsync = on
timezone = 'UTC'
log_timezone = 'UTC'
EOF
    if port_open "$PG_PORT"; then
      die "postgres: port $PG_PORT is already in use by another process (set PG_PORT)"
    fi
    log "postgres: starting on 127.0.0.1:$PG_PORT (data $data)"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$area/postgres.log" -w -t "$PG_START_TIMEOUT" -s start 9>&-; then
      tail -n 40 "$area/postgres.log" >&2 || true
      die "postgres: pg_ctl start failed"
    fi
  fi
  if [[ "$(psql_admin -t -A -c "select 1 from pg_database where datname = 'dr'")" != "1" ]]; then
    log "postgres: creating database dr"
    psql_admin -c 'create database dr'
  fi
  check_db_url "$PG_MANAGED_URL" || die "postgres: $PG_MANAGED_URL does not answer"
  log "postgres: ready at $PG_MANAGED_URL in $((SECONDS - t0)) s"
}

stop_pg() {
  local area pid deadline
  area="$(pg_area)"
  if ! pid="$(pg_pid)"; then
    log "postgres: not running"
    return
  fi
  log "postgres: stopping pid $pid (pg_ctl stop -m fast)"
  if [[ -n "$PG_BIN" && -x "$PG_BIN/pg_ctl" ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$area/data" -m fast -w -t 60 -s stop 9>&- ||
      die "postgres: pg_ctl stop failed"
  else
    # No pg_ctl: SIGINT is what "fast" shutdown sends to the postmaster.
    kill -INT "$pid"
    deadline=$((SECONDS + 60))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    pid_alive "$pid" && die "postgres: pid $pid did not stop"
  fi
  log "postgres: stopped"
}

# ---------------------------------------------------------------- gateway (nginx)

nginx_bin() {
  command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true
}

check_gateway_prereqs() {
  [[ "$GATEWAY" == "1" ]] || return 0
  [[ -n "$(nginx_bin)" ]] || need "nginx (the gateway; GATEWAY=0 skips it)" nginx
  command -v "$PYTHON" >/dev/null 2>&1 || need "$PYTHON (renders the gateway config)" python3
}

# Prints the pid of the nginx master started from this state dir, or fails.
gateway_pid() {
  local pid
  [[ -f "$NGINX_PIDFILE" ]] || return 1
  pid="$(cat "$NGINX_PIDFILE" 2>/dev/null || true)"
  pid_alive "$pid" || return 1
  [[ "$(pid_cmdline "$pid")" == *nginx*"$NGINX_CONF"* ]] || return 1
  echo "$pid"
}

render_gateway() {
  (
    cd "$REPO_ROOT"
    "$PYTHON" -m scripts.gateway render --state-dir "$NGINX_STATE" \
      --listen "127.0.0.1:$GATEWAY_PORT" \
      --registration "127.0.0.1:${DR_REGISTRATION_HTTP_PORT:-8101}" \
      --inventory "127.0.0.1:${DR_INVENTORY_HTTP_PORT:-8102}" \
      --policy "127.0.0.1:${DR_POLICY_HTTP_PORT:-8103}" \
      --replication "127.0.0.1:${DR_REPLICATION_HTTP_PORT:-8104}" \
      --failover "127.0.0.1:${DR_FAILOVER_HTTP_PORT:-8105}" >/dev/null
  ) || die "gateway: rendering $NGINX_CONF failed"
}

start_gateway() {
  if [[ "$GATEWAY" != "1" ]]; then
    log "gateway: skipped (GATEWAY=$GATEWAY)"
    return
  fi
  local pid nginx deadline
  if pid="$(gateway_pid)"; then
    log "gateway: already running (pid $pid) on $GATEWAY_URL"
    return
  fi
  port_open "$GATEWAY_PORT" &&
    die "gateway: port $GATEWAY_PORT is already in use by another process (set GATEWAY_PORT)"
  nginx="$(nginx_bin)"
  mkdir -p "$NGINX_STATE"
  render_gateway
  "$nginx" -p "$NGINX_STATE" -e "$NGINX_STATE/error.log" -c "$NGINX_CONF" -t -q 9>&- ||
    die "gateway: nginx -t rejected $NGINX_CONF"
  printf '\n===== %s stack.sh: starting nginx =====\n' "$(date -Is)" >>"$NGINX_LOG"
  (
    exec setsid nohup "$nginx" -p "$NGINX_STATE" -e "$NGINX_STATE/error.log" -c "$NGINX_CONF" \
      >>"$NGINX_LOG" 2>&1 </dev/null 9>&-
  ) &
  deadline=$((SECONDS + 15))
  until port_open "$GATEWAY_PORT" && gateway_pid >/dev/null; do
    if ((SECONDS >= deadline)); then
      tail -n 20 "$NGINX_STATE/error.log" "$NGINX_LOG" >&2 2>/dev/null || true
      die "gateway: nginx did not answer on $GATEWAY_URL within 15 s"
    fi
    sleep 0.2
  done
  log "gateway: ready on $GATEWAY_URL (pid $(gateway_pid))"
}

stop_gateway() {
  local pid deadline
  if ! pid="$(gateway_pid)"; then
    log "gateway: not running"
    return
  fi
  log "gateway: stopping nginx pid $pid (SIGQUIT)"
  kill -QUIT "$pid" 2>/dev/null || true
  deadline=$((SECONDS + 10))
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if pid_alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$NGINX_PIDFILE"
  log "gateway: stopped"
}

# ---------------------------------------------------------------- commands

database_url() {
  if external_db; then echo "$DATABASE_URL"; else echo "$PG_MANAGED_URL"; fi
}

write_stack_env() {
  local tmp="$STACK_ENV.tmp.$$"
  {
    echo "KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP"
    echo "DR_KAFKA_SECURITY=$KAFKA_SECURITY"
    if [[ "$KAFKA_SECURITY" == "tls" ]]; then
      echo "DR_KAFKA_CA_FILE=$PKI_DIR/ca.pem"
      echo "DR_KAFKA_CERT_FILE=$PKI_DIR/admin.pem"
      echo "DR_KAFKA_KEY_FILE=$PKI_DIR/admin.key"
      echo "DR_KAFKA_PKI_DIR=$PKI_DIR"
    fi
    echo "DATABASE_URL=$(database_url)"
    if [[ "$GATEWAY" == "1" ]]; then echo "DR_GATEWAY_URL=$GATEWAY_URL"; fi
  } >"$tmp"
  mv -f "$tmp" "$STACK_ENV"
}

# Before starting anything: fail early on ports taken by other processes.
preflight_ports() {
  if ! kafka_pid >/dev/null; then
    port_open "$KAFKA_PORT" && die "kafka: port $KAFKA_PORT is already in use by another process (set KAFKA_PORT)"
    port_open "$KAFKA_CONTROLLER_PORT" &&
      die "kafka: port $KAFKA_CONTROLLER_PORT is already in use by another process (set KAFKA_CONTROLLER_PORT)"
  else
    check_kafka_running_ports
  fi
  if ! external_db; then
    if ! pg_pid >/dev/null; then
      port_open "$PG_PORT" && die "postgres: port $PG_PORT is already in use by another process (set PG_PORT)"
    else
      check_pg_running_port
    fi
  fi
  return 0
}

cmd_up() {
  local t0=$SECONDS
  check_kafka_version
  check_kafka_prereqs
  check_pg_prereqs
  check_gateway_prereqs
  report_missing
  take_lock
  preflight_ports
  start_pg
  start_kafka
  start_gateway
  write_stack_env
  log "stack up in $((SECONDS - t0)) s; $STACK_ENV:"
  cat "$STACK_ENV"
}

cmd_down() {
  take_lock
  stop_gateway
  stop_kafka
  stop_pg
}

cmd_status() {
  local rc=0 pid core=0
  [[ "${1:-}" == "--core" ]] && core=1
  if pid="$(kafka_pid)"; then
    check_kafka_running_ports
    if port_open "$KAFKA_PORT"; then
      echo "kafka     running  pid $pid  $KAFKA_BOOTSTRAP"
    else
      echo "kafka     starting pid $pid  $KAFKA_BOOTSTRAP (not answering)"
      rc=1
    fi
  else
    echo "kafka     stopped  -  $KAFKA_BOOTSTRAP"
    rc=1
  fi
  if external_db; then
    if check_db_url "$DATABASE_URL" >/dev/null 2>&1; then
      echo "postgres  external answering  $DATABASE_URL"
    else
      echo "postgres  external NOT answering  $DATABASE_URL"
      rc=1
    fi
  elif pid="$(pg_pid)"; then
    if port_open "$PG_PORT"; then
      echo "postgres  running  pid $pid  127.0.0.1:$PG_PORT  $(pg_area)/data"
    else
      echo "postgres  starting pid $pid  127.0.0.1:$PG_PORT (not answering)"
      rc=1
    fi
  else
    echo "postgres  stopped  -  127.0.0.1:$PG_PORT"
    rc=1
  fi
  if [[ "$GATEWAY" != "1" ]]; then
    echo "nginx     disabled (GATEWAY=$GATEWAY)"
  elif pid="$(gateway_pid)"; then
    if port_open "$GATEWAY_PORT"; then
      echo "nginx     running  pid $pid  $GATEWAY_URL"
    else
      echo "nginx     starting pid $pid  $GATEWAY_URL (not answering)"
      ((core)) || rc=1
    fi
  else
    echo "nginx     stopped  -  $GATEWAY_URL"
    ((core)) || rc=1
  fi
  return "$rc"
}

cmd_logs() {
  local which="${1:-all}" follow=()
  if [[ "${2:-}" == "-f" || "$which" == "-f" ]]; then
    follow=(-F)
    [[ "$which" == "-f" ]] && which="${2:-all}"
  fi
  case "$which" in
    kafka) tail -n "$LOG_LINES" "${follow[@]}" "$KAFKA_LOG" ;;
    postgres | pg) tail -n "$LOG_LINES" "${follow[@]}" "$(pg_area)/postgres.log" ;;
    nginx | gateway) tail -n "$LOG_LINES" "${follow[@]}" "$NGINX_STATE/error.log" "$NGINX_STATE/access.log" ;;
    all)
      echo "===== kafka: $KAFKA_LOG"
      tail -n "$LOG_LINES" "$KAFKA_LOG" 2>/dev/null || echo "(no log yet)"
      echo "===== postgres: $(pg_area)/postgres.log"
      tail -n "$LOG_LINES" "$(pg_area)/postgres.log" 2>/dev/null || echo "(no log yet)"
      echo "===== nginx: $NGINX_STATE/error.log"
      tail -n "$LOG_LINES" "$NGINX_STATE/error.log" 2>/dev/null || echo "(no log yet)"
      ;;
    *) die "logs: unknown component '$which' (kafka|postgres|nginx)" ;;
  esac
}

cmd_env() {
  [[ -f "$STACK_ENV" ]] || die "no $STACK_ENV: run '$0 up' first"
  cat "$STACK_ENV"
}

cmd_exec() {
  (($#)) || die "exec: missing command"
  [[ -f "$STACK_ENV" ]] || die "no $STACK_ENV: run '$0 up' first"
  local key value
  while IFS='=' read -r key value; do
    [[ -n "$key" && "$key" != \#* ]] || continue
    export "$key=$value"
  done <"$STACK_ENV"
  exec "$@"
}

cmd_kafka_restart() {
  check_kafka_version
  check_kafka_prereqs
  report_missing
  take_lock
  stop_kafka
  start_kafka
}

cmd_pg_restart() {
  external_db && die "pg-restart: DATABASE_URL points to an external database; not restarting it"
  check_pg_prereqs
  report_missing
  take_lock
  stop_pg
  start_pg
}

# Separate stop/start, for fault tests that need an outage window.
cmd_kafka_stop() {
  take_lock
  stop_kafka
}

cmd_kafka_start() {
  check_kafka_version
  check_kafka_prereqs
  report_missing
  take_lock
  start_kafka
}

cmd_pg_stop() {
  external_db && die "pg-stop: DATABASE_URL points to an external database; not stopping it"
  take_lock
  stop_pg
}

cmd_pg_start() {
  check_pg_prereqs
  report_missing
  take_lock
  start_pg
}

cmd_gateway_stop() {
  take_lock
  stop_gateway
}

cmd_gateway_start() {
  check_gateway_prereqs
  report_missing
  take_lock
  start_gateway
}

cmd_kafka_run() {
  (($#)) || die "kafka-run: missing CLASS"
  check_kafka_prereqs
  report_missing
  kafka_libs_complete || { take_lock; fetch_kafka; exec 9>&-; }
  [[ -f "$KAFKA_TOOLS_LOG4J" ]] || { mkdir -p "$KAFKA_STATE"; write_kafka_config; }
  kafka_java "$@"
}

cmd_purge() {
  local area
  if [[ -d "$DR_STATE_DIR" ]]; then
    case "$DR_STATE_DIR" in
      / | "$REPO_ROOT" | "$HOME" | /tmp | /work) die "purge: refusing to delete $DR_STATE_DIR" ;;
    esac
    if [[ ! -f "$STATE_MARKER" ]] && [[ -n "$(ls -A "$DR_STATE_DIR")" ]]; then
      die "purge: $DR_STATE_DIR has no $(basename "$STATE_MARKER") marker; refusing to delete it"
    fi
  fi
  cmd_down
  area="$(pg_area)"
  if [[ "$area" == /tmp/dr-pg-* && -d "$area" ]]; then
    log "purge: removing $area"
    rm -rf "$area"
  fi
  log "purge: removing $DR_STATE_DIR"
  rm -rf "$DR_STATE_DIR"
}

usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

main() {
  local cmd="${1:-}"
  (($#)) && shift
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status "$@" ;;
    logs) cmd_logs "$@" ;;
    env) cmd_env ;;
    exec) cmd_exec "$@" ;;
    kafka-restart) cmd_kafka_restart ;;
    pg-restart) cmd_pg_restart ;;
    kafka-stop) cmd_kafka_stop ;;
    kafka-start) cmd_kafka_start ;;
    pg-stop) cmd_pg_stop ;;
    pg-start) cmd_pg_start ;;
    gateway-stop) cmd_gateway_stop ;;
    gateway-start) cmd_gateway_start ;;
    kafka-run) cmd_kafka_run "$@" ;;
    purge) cmd_purge ;;
    -h | --help | help) usage ;;
    "") usage >&2; exit 1 ;;
    *) log "unknown command '$cmd'"; usage >&2; exit 1 ;;
  esac
}

main "$@"
