#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time.
#
#   scripts/fuzz.sh                 # each target 20 s (FUZZ_SECONDS, if set)
#   scripts/fuzz.sh 300             # each target 300 s
#   scripts/fuzz.sh --long          # each target FUZZ_SECONDS, default 600 s
#   scripts/fuzz.sh 60 envelope     # only the named targets
#
# Installs cargo-fuzz from crates.io when it is missing. cargo-fuzz needs
# unstable compiler flags (sanitizer coverage); on a stable toolchain
# RUSTC_BOOTSTRAP=1 allows them. The sanitizer is off by default
# (FUZZ_SANITIZER=address turns ASan on): the code under test is safe Rust,
# what the targets look for is panics, failed assertions, overflows (debug
# assertions are on) and runaway inputs (-timeout), and ASan doubles both
# the build and the runs. The first build compiles the whole crate graph
# instrumented into fuzz/target (about 13 minutes on two cores); later
# runs only relink.
#
# Seeds are fuzz/seeds/<target>/ (in git); what libFuzzer learns goes to
# fuzz/corpus/<target>/ and crashes to fuzz/artifacts/<target>/ (ignored).
# Reproduce a crash: RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> <file>
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
if [ "${1:-}" = "--long" ]; then
  seconds="${FUZZ_SECONDS:-600}"
  shift
elif [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  seconds="$1"
  shift
fi
sanitizer="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io" >&2
  cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

echo "== cargo fuzz build (sanitizer: ${sanitizer})"
cargo fuzz build --sanitizer "${sanitizer}"

failed=()
for target in "${targets[@]}"; do
  echo "== fuzz ${target} for ${seconds} s"
  mkdir -p "fuzz/corpus/${target}"
  if ! cargo fuzz run --sanitizer "${sanitizer}" "${target}" \
    "fuzz/corpus/${target}" "fuzz/seeds/${target}" -- \
    -max_total_time="${seconds}" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1; then
    failed+=("${target}")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} target(s), ${seconds} s each: no failure"
