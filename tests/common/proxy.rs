//! A TCP proxy on loopback for fault tests: it forwards between its own
//! port and a target, and can make the network between them bad the ways
//! real ones are:
//! - `blackhole`: stop forwarding without closing anything, as a cut cable
//!   or a partition looks to both ends; bytes sent meanwhile arrive after
//!   `heal`, as retransmissions would;
//! - `delay`: every byte arrives this much later (the pipe stays full, as
//!   on a long link, rather than one chunk at a time);
//! - `throttle`: at most this many bytes per second each way;
//! - `reset`: every open connection is closed with a TCP reset at once;
//!   new ones are accepted as usual.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How the proxy treats traffic now.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Conditions {
    forwarding: bool,
    delay: Duration,
    /// Bytes per second each way; `None` is unlimited.
    rate: Option<u64>,
    /// Bumped by `reset`: connections older than the bump are reset.
    resets: u64,
}

pub struct Proxy {
    pub addr: SocketAddr,
    conditions: Arc<watch::Sender<Conditions>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `port` (0: any free one) and forwards to `target`.
    pub async fn start(port: u16, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let conditions = Arc::new(watch::Sender::new(Conditions {
            forwarding: true,
            delay: Duration::ZERO,
            rate: None,
            resets: 0,
        }));
        let state = conditions.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(connection(client, target, state.subscribe()));
            }
        });
        Proxy {
            addr,
            conditions,
            task,
        }
    }

    /// Stops forwarding; every connection stays open, silent both ways.
    pub fn blackhole(&self) {
        self.conditions.send_modify(|c| c.forwarding = false);
    }

    /// Forwards again, and clears a delay and a throttle.
    pub fn heal(&self) {
        self.conditions.send_modify(|c| {
            c.forwarding = true;
            c.delay = Duration::ZERO;
            c.rate = None;
        });
    }

    pub fn delay(&self, delay: Duration) {
        self.conditions.send_modify(|c| c.delay = delay);
    }

    pub fn throttle(&self, bytes_per_second: u64) {
        self.conditions
            .send_modify(|c| c.rate = Some(bytes_per_second.max(1)));
    }

    /// Resets every open connection (RST, not FIN).
    pub fn reset(&self) {
        self.conditions.send_modify(|c| c.resets += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(client: TcpStream, target: SocketAddr, mut state: watch::Receiver<Conditions>) {
    // While blackholed a new connection is held, not refused.
    if state.wait_for(|c| c.forwarding).await.is_err() {
        return;
    }
    let born = state.borrow().resets;
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let client = Arc::new(client);
    let server = Arc::new(server);
    let pumps = async {
        tokio::join!(
            pump(client.clone(), server.clone(), state.clone()),
            pump(server.clone(), client.clone(), state.clone()),
        )
    };
    let mut resets = state.clone();
    tokio::select! {
        _ = pumps => {}
        _ = resets.wait_for(|c| c.resets != born) => {
            // SO_LINGER 0: closing sends RST instead of FIN.
            for socket in [&client, &server] {
                let _ = socket2::SockRef::from(socket.as_ref()).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

/// Reads from `from` and writes to `to` under the conditions: a reader
/// stamps each chunk with when it arrived, a writer sends it once the delay
/// has passed, forwarding is on, and the throttle allows.
async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>, state: watch::Receiver<Conditions>) {
    let (chunks, mut queue) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if from.readable().await.is_err() {
                return;
            }
            match from.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if chunks
                        .send((Instant::now(), buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    };
    let writer = async move {
        let mut state = state;
        while let Some((arrived, chunk)) = queue.recv().await {
            let delay = state.borrow().delay;
            tokio::time::sleep_until(arrived + delay).await;
            // Bytes read while blackholed are held until the heal.
            if state.wait_for(|c| c.forwarding).await.is_err() {
                return;
            }
            let rate = state.borrow().rate;
            let mut written = 0;
            while written < chunk.len() {
                // Throttled: a slice per tenth of a second's allowance.
                let slice = rate.map_or(chunk.len() - written, |rate| {
                    ((rate / 10).max(1) as usize).min(chunk.len() - written)
                });
                if write_all(&to, &chunk[written..written + slice])
                    .await
                    .is_err()
                {
                    return;
                }
                written += slice;
                if let Some(rate) = rate {
                    tokio::time::sleep(Duration::from_secs_f64(slice as f64 / rate as f64)).await;
                }
            }
        }
        // The other end closed: pass the close on once its bytes are out.
        let _ = socket2::SockRef::from(to.as_ref()).shutdown(std::net::Shutdown::Write);
    };
    tokio::join!(reader, writer);
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
