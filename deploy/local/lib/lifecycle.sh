# deploy/local/lib/lifecycle.sh — sourced by deploy/local/stack.sh (settings: see its header).
# shellcheck shell=bash

# The commands on the whole stack: up, down, status, logs, env, exec, purge.

database_url() {
  if external_db; then echo "$DATABASE_URL"; else pg_managed_url; fi
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
  chmod 600 "$tmp" # DATABASE_URL may hold a password
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
  sed -E 's#^(DATABASE_URL=postgresql://[^:/@]*):[^@]*@#\1:***@#' "$STACK_ENV"
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
