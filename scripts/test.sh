#!/usr/bin/env bash
# Sets up and runs the whole test suite: formatting, lints, unit and
# integration tests (each integration test starts its own nats-server).
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN="$(scripts/setup.sh)"
export NATS_SERVER_BIN
echo "== nats-server: ${NATS_SERVER_BIN} ($("${NATS_SERVER_BIN}" --version))"
echo "== hadolint Dockerfile"
PY_SCRIPTS="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
"$(command -v hadolint || echo "${PY_SCRIPTS}/hadolint")" Dockerfile
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets
