//! A TCP proxy on loopback for fault tests: it forwards between its own
//! port and a target, and can be told to stop forwarding without closing
//! anything (a blackhole, as a cut network cable or a partition looks to
//! both ends) and to forward again.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    forwarding: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `port` (0: any free one) and forwards to `target`.
    pub async fn start(port: u16, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let forwarding = Arc::new(watch::Sender::new(true));
        let state = forwarding.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = state.subscribe();
                tokio::spawn(async move {
                    // While blackholed a new connection is held, not refused.
                    let mut wait = state.clone();
                    let _ = wait.wait_for(|on| *on).await;
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, state.clone()),
                        pump(server_read, client_write, state),
                    );
                });
            }
        });
        Proxy {
            addr,
            forwarding,
            task,
        }
    }

    /// Stops forwarding; every connection stays open, silent both ways.
    pub fn blackhole(&self) {
        self.forwarding.send_replace(false);
    }

    pub fn heal(&self) {
        self.forwarding.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut forwarding: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read while blackholed are held until the heal, as a
        // network that drops and retransmits would deliver them late.
        if forwarding.wait_for(|on| *on).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
