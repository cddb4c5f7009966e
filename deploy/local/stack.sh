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
#   pg-kill            kill -9 PostgreSQL (a crash: its next start replays the WAL)
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
#   PG_TLS                allow           PostgreSQL always offers TLS (the platform CA's
#                                         certificate for 127.0.0.1/localhost); allow: plain
#                                         loopback connections too, no password; require: TCP
#                                         only over TLS (hostssl) and with a generated password
#                                         (scram-sha-256; ${DR_STATE_DIR}/postgres.password, 0600),
#                                         stack.env's DATABASE_URL (0600) carrying it and
#                                         sslmode=verify-full&sslrootcert=<pki>/ca.pem. An `up` of
#                                         a running cluster applies a change (reload); unset, the
#                                         mode of the last start is kept
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
# PostgreSQL: a throwaway cluster made with initdb and run with pg_ctl. With PG_TLS=allow it
# uses `trust` authentication for local and 127.0.0.1 connections: it is a dev/test cluster
# that only listens on the loopback address, never use this setup for anything real. The
# stack's own admin commands use the unix socket (`trust` in both modes). As root, the
# server runs as the `postgres` system user (initdb/postgres refuse root); if that user
# cannot reach ${DR_STATE_DIR}, or the socket path would be too long, the cluster lives
# in /tmp/dr-pg-<hash of the state dir path> instead (recorded in
# ${DR_STATE_DIR}/postgres.location). The URL is postgresql://postgres@127.0.0.1:${PG_PORT}/dr
# (PG_TLS=require: postgresql://postgres:<password>@...?sslmode=verify-full&sslrootcert=
# ${DR_STATE_DIR}/pki/ca.pem; logs show the password as ***). TLS is on:
# the server's certificate and key (pki/postgres.pem/.key, from the platform CA below) are
# copied to <cluster dir>/tls, the key mode 0600 and owned by the user the server runs as.
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
# inventory, policy, replication and failover; edges and upstream publishers get theirs from
# the registration service (edge-ca.pem). A principal is its certificate's CN
# (ssl.principal.mapping.rules). ACLs per topic prefix are set by `python -m shared.kafka_acl`
# (what each principal may write, read and which consumer groups it may use); stack.env names
# the admin certificate (DR_KAFKA_CERT_FILE/DR_KAFKA_KEY_FILE), the CA and the pki folder.
# Java tools (kafka-run) take `--command-config ${DR_STATE_DIR}/pki/admin.properties`.
#
# The parts live in deploy/local/lib/: common.sh (settings, logging, locks), kafka.sh,
# postgres.sh and gateway.sh (each component's settings, start/stop and own commands), and
# lifecycle.sh (up, down, status, logs, env, exec, purge); this file only dispatches.
#
# Exit codes: 0 ok, 1 failure, 2 missing prerequisite (the message names the Debian package).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"

# The parts, one file each: common (settings, logging, locks), then one per component with
# its settings, prerequisites, start/stop and its own commands, then the whole-stack commands.
# shellcheck source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/kafka.sh
source "$SCRIPT_DIR/lib/kafka.sh"
# shellcheck source=lib/postgres.sh
source "$SCRIPT_DIR/lib/postgres.sh"
# shellcheck source=lib/gateway.sh
source "$SCRIPT_DIR/lib/gateway.sh"
# shellcheck source=lib/lifecycle.sh
source "$SCRIPT_DIR/lib/lifecycle.sh"

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
    pg-kill) cmd_pg_kill ;;
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
