#!/usr/bin/env bash
# Sets up and runs the main job: every built room on a local nats-server
# (`choco-factory dev`). Extra arguments go to `dev`, e.g. --rooms conch.
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN="$(scripts/setup.sh)"
export NATS_SERVER_BIN
exec cargo run --release --locked -- dev "$@"
