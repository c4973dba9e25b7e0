#!/usr/bin/env bash
# Fuzzes every room's HTTP API from its OpenAPI description (docs/openapi/)
# with schemathesis, against the real binary running all four rooms on a
# local nats-server, and fails on any 5xx response (or a dead process).
#
#   scripts/api-fuzz.sh                  # 500 examples per operation
#   API_FUZZ_EXAMPLES=500 scripts/api-fuzz.sh
#   API_FUZZ_SECONDS=600 scripts/api-fuzz.sh     # a time budget per spec
#   API_FUZZ_SEED=123 scripts/api-fuzz.sh        # reproduce a run
#   CHOCO_BIN=target/release/choco-factory scripts/api-fuzz.sh
#   scripts/api-fuzz.sh conch wrapper            # only these specs (core, <room>)
#
# Installs schemathesis from PyPI (pip) when missing and nats-server via
# scripts/setup.sh. Every room listens on ephemeral ports; the run's logs
# and schemathesis' reproduction reports stay in a temporary directory that
# is printed, and kept when the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
EXAMPLES="${API_FUZZ_EXAMPLES:-500}"
# Optional: a time budget per spec instead. schemathesis then repeats its
# fuzzing phase until the budget is spent (--max-time).
MAX_TIME="${API_FUZZ_SECONDS:-}"
SEED="${API_FUZZ_SEED:-}"

if ! command -v schemathesis >/dev/null 2>&1; then
  echo "api-fuzz: installing schemathesis ${SCHEMATHESIS_VERSION} from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check "schemathesis==${SCHEMATHESIS_VERSION}" >&2
fi
NATS_SERVER_BIN="$(scripts/setup.sh)"
export NATS_SERVER_BIN

BIN="${CHOCO_BIN:-}"
if [ -z "${BIN}" ]; then
  cargo build --locked --bin choco-factory
  BIN="target/debug/choco-factory"
fi

work="$(mktemp -d -t choco-api-fuzz.XXXXXX)"
factory_pid=""
status=1
cleanup() {
  if [ -n "${factory_pid}" ] && kill -0 "${factory_pid}" 2>/dev/null; then
    kill -TERM "${factory_pid}" 2>/dev/null || true
    wait "${factory_pid}" 2>/dev/null || true
  fi
  if [ "${status}" -eq 0 ]; then
    rm -rf "${work}"
  else
    echo "api-fuzz: logs and reports kept in ${work}" >&2
  fi
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Every room on ephemeral ports, JSON logs (read back for the addresses).
room_env=()
for room in WINNOWER CONCH MOULD WRAPPER; do
  for port in HTTP_PORT GRPC_PORT METRICS_PORT; do
    room_env+=("CHOCO_ROOMS__${room}__${port}=0")
  done
done
# The log exists before the reader below starts: the background job's
# redirection may not have run yet when it first opens the file.
: >"${work}/factory.log"
env -u RUST_LOG "${room_env[@]}" CHOCO_LOG__FORMAT=json \
  "${BIN}" dev --data-dir "${work}/nats" --nats-port "$(free_port)" \
  >"${work}/factory.log" 2>&1 &
factory_pid=$!

# The rooms' HTTP addresses, once all four are listening and ready.
addresses="$(python3 - "${work}/factory.log" "${factory_pid}" <<'PY'
import json, os, sys, time, urllib.request
log, pid = sys.argv[1], int(sys.argv[2])
labels = {"Winnowing Room": "winnower", "Fudge Room": "conch", "Moulding Room": "mould", "Wrapping Room": "wrapper"}
found, deadline = {}, time.time() + 60
while time.time() < deadline and len(found) < len(labels):
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("choco-factory exited during start-up")
    with open(log) as lines:
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "room listening" and entry.get("factory.room") in labels:
                found[labels[entry["factory.room"]]] = entry["http"]
    time.sleep(0.2)
if len(found) < len(labels):
    sys.exit("not every room listened within 60 s")
for room, addr in found.items():
    while True:
        try:
            if urllib.request.urlopen(f"http://{addr}/readyz", timeout=2).status == 200:
                break
        except Exception:
            pass
        if time.time() > deadline:
            sys.exit(f"{room} was not ready within 60 s")
        time.sleep(0.2)
    print(room, addr)
PY
)"
echo "api-fuzz: rooms ready: $(echo "${addresses}" | tr '\n' ' ')"

extra_args=()
if [ -n "${SEED}" ]; then
  extra_args+=(--seed "${SEED}")
fi
if [ -n "${MAX_TIME}" ]; then
  extra_args+=(--max-time "${MAX_TIME}")
fi
failed=()
fuzz() {
  local spec="$1" addr="$2" name
  name="$(basename "${spec}" .yaml)"
  echo "== schemathesis ${spec} against http://${addr} (${EXAMPLES} examples per operation)"
  # The coverage phase is left out, and one worker runs: on this CPython
  # (3.11.7) two threads compiling at once (Hypothesis describes its
  # lambdas with ast.parse) fail at random inside schemathesis ("AST
  # constructor recursion depth mismatch", seen in the coverage phase and,
  # with two workers, in fuzzing), before any request is judged.
  # /readyz takes no input and answers 503 by design while the room is
  # paused, which the fuzzed /admin/pause does at random; its answers are
  # tested in tests/ instead.
  local skip=()
  if [ "${name}" = "core" ]; then
    skip=(--exclude-path /readyz)
  fi
  if ! (cd "${work}" && schemathesis run "${OLDPWD}/${spec}" "${skip[@]}" \
    --url "http://${addr}" \
    --checks not_a_server_error \
    --phases examples,fuzzing \
    --max-examples "${EXAMPLES}" \
    --workers 1 \
    --request-timeout 20 \
    --generation-database none \
    --report junit,vcr --report-dir "${work}/reports-${name}" \
    --no-color "${extra_args[@]}"); then
    failed+=("${name}")
  fi
}

addr_of() { echo "${addresses}" | awk -v room="$1" '$1 == room { print $2 }'; }
specs=("$@")
if [ "${#specs[@]}" -eq 0 ]; then
  specs=(core conch winnower mould wrapper)
fi
for spec in "${specs[@]}"; do
  case "${spec}" in
    # The core routes are the same code in every room: fuzzed on one.
    core) fuzz docs/openapi/core.yaml "$(addr_of conch)" ;;
    conch | winnower | mould | wrapper) fuzz "docs/openapi/${spec}.yaml" "$(addr_of "${spec}")" ;;
    *) echo "api-fuzz: unknown spec ${spec} (core, conch, winnower, mould, wrapper)" >&2; exit 2 ;;
  esac
done

if ! kill -0 "${factory_pid}" 2>/dev/null; then
  echo "api-fuzz: choco-factory died during the run" >&2
  failed+=("process")
fi
panics="$(grep -c 'panicked at' "${work}/factory.log" || true)"
if [ "${panics}" != "0" ]; then
  echo "api-fuzz: ${panics} panic(s) in the log" >&2
  grep 'panicked at' "${work}/factory.log" | head -5 >&2
  failed+=("panics")
fi

if [ "${#failed[@]}" -gt 0 ]; then
  echo "api-fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
status=0
echo "api-fuzz: no 5xx from any room"
