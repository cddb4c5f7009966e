#!/usr/bin/env bash
# deploy/local/run-tests.sh — run the test suite against the local stack.
#
# 1. remembers whether the stack (deploy/local/stack.sh: Kafka and PostgreSQL) was already up;
# 2. brings it up (a no-op when it is) and exports the variables of stack.env
#    (KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL);
# 3. runs `.venv/bin/pytest tests -q -ra --durations=15 $PYTEST_ARGS` (without `tests` when
#    PYTEST_ARGS names test paths of its own);
# 4. brings the stack down again only if this script started it (also on Ctrl-C);
# 5. exits with pytest's exit code. Exit code 5 ("no tests collected") is reported
#    loudly and kept as a failure: a run that tests nothing must not look green.
#
# Settings: PYTEST_ARGS (extra pytest arguments, split on spaces), PYTEST (default
# <repo>/.venv/bin/pytest), KEEP_STACK=1 (never bring the stack down), plus every
# setting of stack.sh (DR_STATE_DIR, KAFKA_PORT, PG_PORT, DATABASE_URL, ...).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"
STACK="$SCRIPT_DIR/stack.sh"
PYTEST="${PYTEST:-$REPO_ROOT/.venv/bin/pytest}"

say() { printf '[run-tests] %s\n' "$*" >&2; }

if [[ ! -x "$PYTEST" ]]; then
  say "ERROR: $PYTEST not found; run 'make venv' first"
  exit 2
fi

started_stack=0
if "$STACK" status --core >/dev/null 2>&1; then
  say "stack already up; it will be left running"
else
  started_stack=1
fi

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if ((started_stack)) && [[ "${KEEP_STACK:-0}" != "1" ]]; then
    say "bringing the stack down (this script started it)"
    "$STACK" down || say "WARNING: 'stack.sh down' failed"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$STACK" up

# Export KEY=VALUE lines literally (no shell evaluation of the values).
while IFS='=' read -r key value; do
  [[ -n "$key" && "$key" != \#* ]] || continue
  export "$key=$value"
done < <("$STACK" env)

extra=()
if [[ -n "${PYTEST_ARGS:-}" ]]; then
  read -r -a extra <<<"$PYTEST_ARGS"
fi

# The whole suite, unless PYTEST_ARGS names test files or folders itself
# (e.g. PYTEST_ARGS="tests/e2e/test_agent_e2e.py -x" runs that file alone).
where=(tests)
for arg in "${extra[@]}"; do
  if [[ "$arg" == tests/* || "$arg" == tests ]]; then
    where=()
    break
  fi
done

cd "$REPO_ROOT"
say "KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS DATABASE_URL=$(sed -E 's#^(postgresql://[^:/@]*):[^@]*@#\1:***@#' <<<"$DATABASE_URL")"
say "running: $PYTEST ${where[*]} -q -ra --durations=15 ${extra[*]}"
set +e
"$PYTEST" "${where[@]}" -q -ra --durations=15 "${extra[@]}"
rc=$?
set -e

case "$rc" in
  0) say "pytest passed" ;;
  5)
    say "=================================================================="
    say "ERROR: pytest collected NO tests (exit code 5). Treated as a failure."
    say "=================================================================="
    ;;
  *) say "pytest FAILED with exit code $rc" ;;
esac
exit "$rc"
