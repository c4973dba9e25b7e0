//! What the benches read off processes and the machine, shared by
//! `benches/pipeline.rs` and `benches/archive.rs` through `#[path]`.

use std::net::TcpListener;

use super::Error;

/// `N` distinct free ports on loopback, all bound at once before any is
/// released: one bind at a time may be handed the port the previous one
/// just released, and a binary given the same port twice refuses to start
/// (a smoke run failed so). The tests' `common::free_ports` has the same
/// signature, for the cluster the pipeline bench borrows from them.
pub fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

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
