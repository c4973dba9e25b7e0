//! Free ports on loopback, for the tests' harness and the benches (which
//! take this file with `#[path]`, as they take `cluster.rs`).

use std::net::TcpListener;

/// `N` distinct free ports on loopback, all bound at once before any is
/// released: taken one bind at a time, the kernel may hand out the port
/// the previous bind just released, and a process given one port twice
/// fails to start (the pipeline bench's smoke run did).
pub fn free_ports<const N: usize>() -> std::io::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}
