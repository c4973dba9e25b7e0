//! What the benches read off processes and the machine (CPU times; the
//! ports are `tests/common/ports.rs`), shared by
//! `benches/pipeline.rs` and `benches/archive.rs` through `#[path]`.

use super::Error;

/// User + system CPU seconds of process `pid` so far (`/proc/<pid>/stat`).
pub fn process_cpu_s(pid: u32) -> Result<f64, Error> {
    stat_cpu_s(&format!("/proc/{pid}/stat"))
}

/// The same for one thread of this process.
pub fn thread_cpu_s(tid: i32) -> Result<f64, Error> {
    stat_cpu_s(&format!("/proc/self/task/{tid}/stat"))
}

fn stat_cpu_s(path: &str) -> Result<f64, Error> {
    choco_factory::cocoa_butter::metrics::process::cpu_seconds(path)
        .ok_or_else(|| format!("cannot read the CPU time in {path}").into())
}

/// Stops a child as systemd would (SIGTERM), waiting up to 20 s for it.
pub async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait()).await;
}
