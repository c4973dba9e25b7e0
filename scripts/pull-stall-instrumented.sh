#!/usr/bin/env bash
# Builds examples/pull_stall.rs against an instrumented copy of async-nats
# 0.51.0 (issue #18, "the stall") and runs it with the given options.
#
# The copy (taken from the cargo registry, patched in a scratch directory;
# nothing in the repository or its Cargo.lock changes) adds, in
# jetstream/consumer/pull.rs:
#   - counters: pulls sent by a `Stream`'s background task, messages read
#     while that task had not yet reported its pull, and messages read while
#     `pending_messages` was already 0 (each a decrement lost to
#     `saturating_sub`: the count then runs one above the truth), and the
#     failsafe's resets (a pull after expires + 5 s without one);
#   - an optional hold of the background task between queuing a pull and
#     reporting it (`--inject-every N --inject-us U`: every Nth pull, a
#     std::thread::sleep of U µs, i.e. a worker thread preempted there).
# Each round then prints one line of those counters.
#
#   scripts/pull-stall-instrumented.sh --rounds 20
#   scripts/pull-stall-instrumented.sh --rounds 2 --inject-every 100 --inject-us 2000
#   scripts/pull-stall-instrumented.sh --rounds 1 --heartbeat 5 --inject-every 400 --inject-us 2000
#
# WORK (default /tmp/pull-stall-instrumented) holds the copy and its build;
# the first build compiles tokio and async-nats (a few minutes on 2 cores).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${WORK:-/tmp/pull-stall-instrumented}"
src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/async-nats-0.51.0 2>/dev/null | head -n1)"
if [ -z "${src}" ]; then
  echo "async-nats 0.51.0 is not in the cargo registry: run cargo fetch in ${repo} first" >&2
  exit 1
fi
mkdir -p "${work}/crate/src"
rm -rf "${work}/async-nats"
cp -r "${src}" "${work}/async-nats"
chmod -R u+w "${work}/async-nats"

python3 - "${work}/async-nats/src/jetstream/consumer/pull.rs" <<'EOF'
import sys
p = sys.argv[1]
s = open(p).read()
def sub(old, new):
    global s
    assert old in s, f"async-nats changed: {old[:60]!r} not found"
    s = s.replace(old, new, 1)
sub("pub struct Stream {\n    pending_messages: usize,", """/// Instrumentation (scripts/pull-stall-instrumented.sh only).
pub mod stall_debug {
    use std::sync::atomic::{AtomicU64, Ordering};
    pub static LOST_DECREMENTS: AtomicU64 = AtomicU64::new(0);
    pub static READ_WHILE_REQUEST_UNREPORTED: AtomicU64 = AtomicU64::new(0);
    pub static PULLS: AtomicU64 = AtomicU64::new(0);
    pub static RESETS: AtomicU64 = AtomicU64::new(0);
    pub static INJECT_EVERY: AtomicU64 = AtomicU64::new(0);
    pub static INJECT_US: AtomicU64 = AtomicU64::new(0);
    pub fn snapshot() -> (u64, u64, u64, u64) {
        (
            LOST_DECREMENTS.load(Ordering::Relaxed),
            READ_WHILE_REQUEST_UNREPORTED.load(Ordering::Relaxed),
            PULLS.load(Ordering::Relaxed),
            RESETS.load(Ordering::Relaxed),
        )
    }
}

pub struct Stream {
    pending_messages: usize,""")
old = """                    let result = context
                        .client
                        .publish_with_reply(subject.clone(), inbox.clone(), request.clone())
                        .await
                        .map(|_| pending_reset);
"""
sub(old, old + """                    {
                        use std::sync::atomic::Ordering;
                        let n = stall_debug::PULLS.fetch_add(1, Ordering::Relaxed) + 1;
                        if pending_reset {
                            stall_debug::RESETS.fetch_add(1, Ordering::Relaxed);
                        }
                        let every = stall_debug::INJECT_EVERY.load(Ordering::Relaxed);
                        if every > 0 && n % every == 0 {
                            std::thread::sleep(std::time::Duration::from_micros(
                                stall_debug::INJECT_US.load(Ordering::Relaxed),
                            ));
                        }
                    }
""")
old2 = """                                self.pending_messages = self.pending_messages.saturating_sub(1);
                                self.pending_bytes =
                                    self.pending_bytes.saturating_sub(message.length);
                                return Poll::Ready(Some(Ok(jetstream::Message {"""
sub(old2, """                                if self.pending_messages == 0 {
                                    stall_debug::LOST_DECREMENTS
                                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                if self.pending_request {
                                    stall_debug::READ_WHILE_REQUEST_UNREPORTED
                                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
""" + old2)
open(p, "w").write(s)
EOF

python3 - "${repo}/examples/pull_stall.rs" "${work}/crate/src/main.rs" <<'EOF'
import sys
s = open(sys.argv[1]).read()
def sub(old, new):
    global s
    assert old in s, f"examples/pull_stall.rs changed: {old[:60]!r} not found"
    s = s.replace(old, new, 1)
sub("""    /// Print the per-second delivery counts of every round.""", """    /// (instrumented) every Nth pull of async-nats' Stream, hold its task
    /// --inject-us µs between queuing the pull and reporting it.
    #[arg(long, default_value_t = 0)]
    inject_every: u64,
    #[arg(long, default_value_t = 0)]
    inject_us: u64,
    /// Print the per-second delivery counts of every round.""")
sub("""async fn run(options: Options) -> Result<(), Error> {
""", """async fn run(options: Options) -> Result<(), Error> {
    use async_nats::jetstream::consumer::pull::stall_debug;
    stall_debug::INJECT_EVERY.store(options.inject_every, Ordering::Relaxed);
    stall_debug::INJECT_US.store(options.inject_us, Ordering::Relaxed);
""")
sub("""        let r = round(&options, index, &js, &monitor, &server).await?;
""", """        let before = stall_debug::snapshot();
        let r = round(&options, index, &js, &monitor, &server).await?;
        let after = stall_debug::snapshot();
        eprintln!(
            "  round {index:>2} async-nats Stream: pulls {}, messages read while a sent pull was unreported {}, \\
             decrements lost (count above the truth) {}, failsafe resets {}",
            after.2 - before.2, after.1 - before.1, after.0 - before.0, after.3 - before.3
        );
""")
open(sys.argv[2], "w").write(s)
EOF

cat > "${work}/crate/Cargo.toml" <<EOF
[package]
name = "pull-stall-instrumented"
version = "0.0.0"
edition = "2024"
publish = false

[[bin]]
name = "pull_stall_instrumented"
path = "src/main.rs"

[dependencies]
async-nats = { path = "${work}/async-nats", default-features = false, features = ["jetstream", "kv", "object-store", "service", "ring", "nkeys", "nuid", "server_2_10", "server_2_11", "server_2_12"] }
bytes = "1"
clap = { version = "4", features = ["derive"] }
futures = "0.3"
serde_json = "1"
tempfile = "3"
tokio = { version = "1", features = ["rt-multi-thread", "macros", "net", "time", "sync", "process", "fs"] }

[workspace]
EOF
# The repository's versions, so the build needs nothing the registry cache lacks.
cp "${repo}/Cargo.lock" "${work}/crate/Cargo.lock"
(cd "${work}/crate" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${work}/target}" cargo build --release --offline --quiet)
exec "${CARGO_TARGET_DIR:-${work}/target}/release/pull_stall_instrumented" "$@"
