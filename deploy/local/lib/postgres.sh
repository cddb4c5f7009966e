# deploy/local/lib/postgres.sh — sourced by deploy/local/stack.sh (settings: see its header).
# shellcheck shell=bash

# ---------------------------------------------------------------- settings

PG_PORT="${PG_PORT:-15432}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"
PG_LOCATION_FILE="$DR_STATE_DIR/postgres.location"
PG_PLAIN_URL="postgresql://postgres@127.0.0.1:$PG_PORT/dr"
# PG_TLS: allow (TLS offered, plain loopback accepted without a password) or require (TCP only
# over TLS and with the generated password of postgres.password). Unset, the mode of the last
# start is kept (recorded in postgres.tls: a later `make test` or a test's `stack.sh pg-restart`
# does not undo `PG_TLS=require make up`); allow the first time.
PG_TLS_FILE="$DR_STATE_DIR/postgres.tls"
PG_PASSWORD_FILE="$DR_STATE_DIR/postgres.password"
if [[ -z "${PG_TLS:-}" ]]; then
  PG_TLS="$(cat "$PG_TLS_FILE" 2>/dev/null || echo allow)"
fi
if [[ "$PG_TLS" != "allow" && "$PG_TLS" != "require" ]]; then
  printf '[stack] ERROR: PG_TLS must be allow or require, not %s\n' "$PG_TLS" >&2
  exit 1
fi

# pg_tls_url: the URL with PG_TLS=require: the password, and the server's certificate checked
# against the platform CA.
pg_tls_url() {
  local password
  password="$(cat "$PG_PASSWORD_FILE" 2>/dev/null || true)"
  echo "postgresql://postgres${password:+:$password}@127.0.0.1:$PG_PORT/dr?sslmode=verify-full&sslrootcert=$PKI_DIR/ca.pem"
}

pg_managed_url() {
  if [[ "$PG_TLS" == "require" ]]; then pg_tls_url; else echo "$PG_PLAIN_URL"; fi
}

# A URL for logs: its password masked.
redact_url() { sed -E 's#^(postgresql://[^:/@]*):[^@]*@#\1:***@#' <<<"$1"; }

# external_db: DATABASE_URL is set and is not a URL of the cluster managed here.
external_db() {
  [[ -n "${DATABASE_URL:-}" && "${DATABASE_URL}" != "$PG_PLAIN_URL" && "${DATABASE_URL}" != "$(pg_tls_url)" ]]
}

# ---------------------------------------------------------------- prerequisites

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

# psql_admin: as postgres over the cluster's unix socket (`local ... trust`: no password, in
# either PG_TLS mode).
psql_admin() {
  "$(pg_tool psql)" -X -q -v ON_ERROR_STOP=1 -h "$(pg_area)/run" -p "$PG_PORT" -U postgres -d postgres "$@"
}

# The generated password of postgres (PG_TLS=require): made once, mode 0600, set at every start.
set_pg_password() {
  if [[ ! -s "$PG_PASSWORD_FILE" ]]; then
    (umask 077 && openssl rand -hex 24 >"$PG_PASSWORD_FILE") || die "postgres: cannot make $PG_PASSWORD_FILE (openssl)"
  fi
  chmod 600 "$PG_PASSWORD_FILE"
  # on stdin, not in the command line (ps)
  psql_admin <<<"ALTER ROLE postgres PASSWORD '$(cat "$PG_PASSWORD_FILE")'" >/dev/null
}

check_db_url() {
  local url="$1" isready
  isready="$(pg_tool pg_isready)"
  if [[ -n "$isready" ]] && ! "$isready" -q -t 10 -d "$url"; then
    return 1
  fi
  "$(pg_tool psql)" -X -q -t -A -v ON_ERROR_STOP=1 -c 'select 1' "$url" >/dev/null
}

# The server certificate (deploy/make-pki.sh: CN=postgres, SANs 127.0.0.1 and localhost), copied
# where the server reads it: PostgreSQL refuses a key that others may read, and the pki folder
# (0700, the caller's) is not the postgres user's.
install_pg_certificate() {
  local area="$1" owner=()
  make_pki
  is_root && owner=(-o postgres -g postgres)
  install -d -m 700 "${owner[@]}" "$area/tls"
  install -m 644 "${owner[@]}" "$PKI_DIR/postgres.pem" "$area/tls/server.pem"
  install -m 600 "${owner[@]}" "$PKI_DIR/postgres.key" "$area/tls/server.key"
}

# Settings and pg_hba, rewritten on every start (and reloaded by an `up` of a running cluster)
# so that PG_PORT and PG_TLS can change.
write_pg_config() {
  local area="$1" data="$1/data" host_method=host method=trust
  local what="with or without TLS (host), no password (loopback only)"
  install_pg_certificate "$area"
  echo "$PG_TLS" >"$PG_TLS_FILE"
  if [[ "$PG_TLS" == "require" ]]; then
    host_method=hostssl
    method=scram-sha-256
    what="only over TLS (hostssl), with the password"
  fi
  as_pg tee "$data/dr-stack.conf" >/dev/null <<EOF
# Generated by deploy/local/stack.sh on every start; edits are overwritten.
# Throwaway dev/test cluster, loopback only (see pg_hba.conf).
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$area/run'
max_connections = 200
shared_buffers = 32MB
fsync = on
timezone = 'UTC'
log_timezone = 'UTC'
ssl = on
ssl_cert_file = '$area/tls/server.pem'
ssl_key_file = '$area/tls/server.key'
ssl_min_protocol_version = 'TLSv1.2'
EOF
  # the default pg_hba.conf (hba_file itself only changes with a restart; a reload applies this)
  as_pg tee "$data/pg_hba.conf" >/dev/null <<EOF
# Generated by deploy/local/stack.sh on every start; edits are overwritten.
# PG_TLS=$PG_TLS: TCP connections $what.
# TYPE        DATABASE  USER  ADDRESS       METHOD
local         all       all                 trust
$host_method  all       all   127.0.0.1/32  $method
$host_method  all       all   ::1/128       $method
EOF
}

start_pg() {
  local area data t0=$SECONDS pid url
  if external_db; then
    log "postgres: DATABASE_URL is set; not starting a cluster, checking that it answers"
    check_db_url "$DATABASE_URL" || die "postgres: DATABASE_URL does not answer (psql/pg_isready failed)"
    log "postgres: external database answers"
    return
  fi
  if pid="$(pg_pid)"; then
    check_pg_running_port
    log "postgres: already running (pid $pid) on 127.0.0.1:$PG_PORT; reloading its settings (PG_TLS=$PG_TLS)"
    write_pg_config "$(pg_area)"
    as_pg "$PG_BIN/pg_ctl" -D "$(pg_area)/data" -s reload 9>&- || die "postgres: pg_ctl reload failed"
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
    write_pg_config "$area"
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
  if [[ "$PG_TLS" == "require" ]]; then set_pg_password; fi
  url="$(pg_managed_url)"
  check_db_url "$url" || die "postgres: $(redact_url "$url") does not answer"
  log "postgres: ready at $(redact_url "$url") in $((SECONDS - t0)) s"
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

# kill_pg: a crash, not a shutdown: SIGKILL to the postmaster and every process it started
# (no checkpoint; the next start replays the WAL).
kill_pg() {
  local pid children deadline
  if ! pid="$(pg_pid)"; then
    log "postgres: not running"
    return
  fi
  children="$(pgrep -P "$pid" || true)"
  log "postgres: killing pid $pid and its processes (SIGKILL)"
  kill -KILL "$pid" 2>/dev/null || true
  # shellcheck disable=SC2086
  [[ -z "$children" ]] || kill -KILL $children 2>/dev/null || true
  # Gone, not only dead: the next postmaster refuses to start while the old pid exists,
  # even as a zombie not yet reaped by its parent.
  deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  pid_alive "$pid" && die "postgres: pid $pid did not die"
  if kill -0 "$pid" 2>/dev/null; then
    # a zombie nobody reaps holds nothing: its lock file is stale
    log "postgres: pid $pid is a zombie; removing its stale postmaster.pid"
    rm -f "$(pg_area)/data/postmaster.pid"
  fi
  log "postgres: killed"
}

# ---------------------------------------------------------------- commands

cmd_pg_restart() {
  external_db && die "pg-restart: DATABASE_URL points to an external database; not restarting it"
  check_pg_prereqs
  report_missing
  take_lock
  stop_pg
  start_pg
}

# Separate stop/start, for fault tests that need an outage window.
cmd_pg_stop() {
  external_db && die "pg-stop: DATABASE_URL points to an external database; not stopping it"
  take_lock
  stop_pg
}

cmd_pg_kill() {
  external_db && die "pg-kill: DATABASE_URL points to an external database; not killing it"
  take_lock
  kill_pg
}

cmd_pg_start() {
  check_pg_prereqs
  report_missing
  take_lock
  start_pg
}
