#!/usr/bin/env bash
# deploy/local/prereqs.sh — the system packages the platform needs on Debian 12, installed
# when missing. Used by `make up/test/demo/run` and by .ci/run.
#
#   deploy/local/prereqs.sh          check; install what is missing
#   deploy/local/prereqs.sh --ci     also docker-compose (CI checks docker-compose.yml with it)
#
# What is checked, and the Debian package that provides it:
#   make                                    make
#   java 17+ (Kafka broker)                 openjdk-17-jre-headless
#   mvn (fetches the Kafka jars once)       maven
#   initdb/pg_ctl (throwaway PostgreSQL)    postgresql
#   psql                                    postgresql-client
#   python3.11 able to make a venv          python3.11 python3.11-venv python3-venv
#   rsync, kcat, promtool, nginx            rsync kcat prometheus nginx
#
# Nothing missing: prints one line, exit 0.
# Missing and root: `apt-get update` once, then `apt-get install`; package scripts must not
#   start daemons (nginx, prometheus, postgresql would), so a temporary /usr/sbin/policy-rc.d
#   refuses service start-up during the install. Waits for another apt/dpkg run to finish.
# Missing and not root: prints the one command to run, exit 2.
set -euo pipefail

CI_EXTRAS=0
for arg in "$@"; do
  case "$arg" in
    --ci) CI_EXTRAS=1 ;;
    *)
      echo "usage: $0 [--ci]" >&2
      exit 2
      ;;
  esac
done

java_ok() {
  local j="${JAVA_HOME:+$JAVA_HOME/bin/}java" v
  command -v "$j" >/dev/null 2>&1 || return 1
  v="$("$j" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')"
  v="${v#1.}"
  v="${v%%[.+-]*}"
  [[ "$v" =~ ^[0-9]+$ ]] && ((v >= 17))
}

initdb_ok() {
  local d
  for d in "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin; do
    [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]] && return 0
  done
  command -v initdb >/dev/null 2>&1
}

python_ok() {
  command -v python3.11 >/dev/null 2>&1 &&
    python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1
}

PKGS=()
want() {
  echo "[prereqs] missing: $1 -> Debian package(s): ${*:2}"
  PKGS+=("${@:2}")
}

command -v make >/dev/null 2>&1 || want make make
java_ok || want "java 17+" openjdk-17-jre-headless
command -v mvn >/dev/null 2>&1 || want mvn maven
initdb_ok || want "initdb/pg_ctl" postgresql
command -v psql >/dev/null 2>&1 || want psql postgresql-client
python_ok || want "python3.11 with venv" python3.11 python3.11-venv python3-venv
command -v rsync >/dev/null 2>&1 || want rsync rsync
command -v kcat >/dev/null 2>&1 || want kcat kcat
command -v promtool >/dev/null 2>&1 || want promtool prometheus
{ command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]]; } || want nginx nginx
if ((CI_EXTRAS)); then
  command -v docker-compose >/dev/null 2>&1 || want docker-compose docker-compose
fi

if ((${#PKGS[@]} == 0)); then
  echo "[prereqs] all system packages present"
  exit 0
fi

INSTALL="apt-get install -y --no-install-recommends ${PKGS[*]}"
if [[ $EUID -ne 0 ]]; then
  echo "[prereqs] ERROR: not root, so nothing was installed. Run this once, then try again:"
  echo "  sudo apt-get update && sudo $INSTALL"
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive
echo "[prereqs] $INSTALL"
policy_added=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\n# added by deploy/local/prereqs.sh: no service start-up during apt-get install\nexit 101\n' \
    >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  policy_added=1
fi
LOCK=(-o DPkg::Lock::Timeout=600)
apt_rc=0
{ apt-get "${LOCK[@]}" update && apt-get "${LOCK[@]}" install -y --no-install-recommends "${PKGS[@]}"; } ||
  apt_rc=$?
if ((policy_added)); then rm -f /usr/sbin/policy-rc.d; fi
if ((apt_rc != 0)); then
  echo "[prereqs] ERROR: apt-get failed (exit code $apt_rc)"
  exit "$apt_rc"
fi
echo "[prereqs] installed: ${PKGS[*]}"
