#!/usr/bin/env bash
# Sets up and runs the whole test suite: formatting, lints, unit and
# integration tests (each integration test starts its own nats-server),
# then a short schemathesis run over every room's HTTP API
# (scripts/api-fuzz.sh, under a minute).
# CHOCO_LONG_TESTS=1 adds the cargo-fuzz targets (scripts/fuzz.sh, 20 s
# each; their first, instrumented build takes about 13 minutes) and a
# two-minute soak of the four rooms (tests/soak.rs; scripts/soak.sh runs
# the long one).
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN="$(scripts/setup.sh)"
export NATS_SERVER_BIN
echo "== nats-server: ${NATS_SERVER_BIN} ($("${NATS_SERVER_BIN}" --version))"
echo "== hadolint Dockerfile"
PY_SCRIPTS="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
"$(command -v hadolint || echo "${PY_SCRIPTS}/hadolint")" Dockerfile
echo "== deploy/kubernetes and compose.yaml: schemas, references, checkov (scripts/deploy-check.sh)"
scripts/deploy-check.sh
# rustfmt on every .rs file by path, not only the modules `cargo fmt`
# reaches by following `mod` lines (a macro-declared module hid 13 files).
echo "== rustfmt --check on every .rs file"
find . -name '*.rs' -not -path '*/target/*' -not -path './.choco-dev/*' -print0 \
  | xargs -0 rustfmt --check --edition 2024
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets
echo "== API fuzzing: schemathesis against every room (scripts/api-fuzz.sh)"
scripts/api-fuzz.sh
if [ "${CHOCO_LONG_TESTS:-}" = "1" ]; then
  echo "== fuzzing: every cargo-fuzz target (scripts/fuzz.sh)"
  scripts/fuzz.sh
  echo "== soak: four rooms at a steady load for two minutes (tests/soak.rs)"
  SOAK_SECONDS="${SOAK_SECONDS:-120}" cargo test --locked --test soak -- --ignored --nocapture
else
  echo "== fuzzing and soak skipped (CHOCO_LONG_TESTS=1 runs them)"
fi
