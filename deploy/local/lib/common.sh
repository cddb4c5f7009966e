# deploy/local/lib/common.sh — sourced by deploy/local/stack.sh (settings: see its header).
# shellcheck shell=bash

# ---------------------------------------------------------------- settings shared by all parts

DR_STATE_DIR="$(realpath -m "${DR_STATE_DIR:-$REPO_ROOT/.state}")"
DR_CACHE_DIR="$(realpath -m "${DR_CACHE_DIR:-$REPO_ROOT/.cache}")"
LOG_LINES="${LOG_LINES:-200}"
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
