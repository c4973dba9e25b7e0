#!/usr/bin/env bash
# The runtime against the bus's own limit and against bare servers:
# installs nats-server if missing, builds the release binary and runs
#   benches/pipeline.rs   rooms vs a bare async-nats loop (target/bench/pipeline.json)
#   benches/endpoints.rs  read endpoints vs bare axum/tonic (target/bench/endpoints.json)
#   benches/archive.rs    the archiver vs the stream's consume limit (target/bench/archive.json)
# and prints the tables the README shows.
#   scripts/bench.sh                         both, default sizes
#   scripts/bench.sh pipeline --only conch   one bench; options go to it
#   scripts/bench.sh endpoints --seconds 5
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN="$(scripts/setup.sh)"
export NATS_SERVER_BIN
case "${1:-}" in
pipeline | endpoints | archive)
    bench="$1"
    shift
    exec cargo bench --locked --bench "$bench" -- "$@"
    ;;
"") ;;
*)
    echo "usage: scripts/bench.sh [pipeline|endpoints|archive [options]]" >&2
    exit 2
    ;;
esac
cargo bench --locked --bench pipeline
cargo bench --locked --bench endpoints
cargo bench --locked --bench archive
