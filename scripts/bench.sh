#!/usr/bin/env bash
# The runtime against the bus's own limit: installs nats-server if missing,
# builds the release binary and runs benches/pipeline.rs, which prints the
# table the README shows and writes target/bench/pipeline.json.
# Options go to the bench: scripts/bench.sh --events 10000 --only conch
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN="$(scripts/setup.sh)"
export NATS_SERVER_BIN
exec cargo bench --locked --bench pipeline -- "$@"
