#!/usr/bin/env bash
# The soak: all four rooms of the release binary at a steady offered load
# for a fixed time, then checks that every input yielded its outputs and
# that memory stayed flat (tests/soak.rs). Prints the figure the README
# quotes.
#   SOAK_SECONDS=600 SOAK_RATE=100 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN="$(scripts/setup.sh)"
export NATS_SERVER_BIN
exec cargo test --locked --release --test soak -- --ignored --nocapture
