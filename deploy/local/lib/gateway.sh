# deploy/local/lib/gateway.sh — sourced by deploy/local/stack.sh (settings: see its header).
# shellcheck shell=bash

# ---------------------------------------------------------------- settings

GATEWAY_PORT="${GATEWAY_PORT:-18100}"
GATEWAY="${GATEWAY:-1}"
PYTHON="${PYTHON:-python3}"
NGINX_STATE="$DR_STATE_DIR/nginx"
NGINX_PIDFILE="$NGINX_STATE/nginx.pid"
NGINX_LOG="$NGINX_STATE/nginx.out"
NGINX_CONF="$NGINX_STATE/nginx.conf"
GATEWAY_URL="http://127.0.0.1:$GATEWAY_PORT"

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
