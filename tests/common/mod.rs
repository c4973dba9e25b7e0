//! Test harness: a real nats-server per test (ephemeral port, temporary
//! store) and the real `choco-factory` binary run against it.

#![allow(dead_code)]

pub mod cluster;
mod ports;
pub mod proxy;
pub mod seaweed;
pub mod steady;
pub mod workload;

pub use ports::free_ports;

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use choco_factory::cocoa_butter::EventEnvelope;
use choco_factory::cocoa_butter::nats_server::{self, ManagedNats};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const BIN: &str = env!("CARGO_BIN_EXE_choco-factory");

pub struct Nats {
    pub server: ManagedNats,
    _dir: tempfile::TempDir,
}

impl Nats {
    pub async fn start() -> Nats {
        Self::start_on(0).await
    }

    pub async fn start_on(port: u16) -> Nats {
        Self::start_durable(port, false).await
    }

    /// With `sync_always`, a SIGKILL of the server loses nothing it acked.
    pub async fn start_durable(port: u16, sync_always: bool) -> Nats {
        tls_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = nats_server::find_binary().expect("nats-server (run scripts/setup.sh)");
        let server = ManagedNats::start_with(binary, dir.path(), port, sync_always)
            .await
            .expect("nats-server starts");
        Nats { server, _dir: dir }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub async fn client(&self) -> (async_nats::Client, jetstream::Context) {
        let client = async_nats::connect(self.url()).await.expect("connect");
        let js = jetstream::new(client.clone());
        (client, js)
    }
}

/// *ring* as the process's rustls provider, as the binary has it: the
/// tests' HTTP client (reqwest, whose TLS the archive's S3 client enables
/// without a provider of its own) takes it. Every harness start calls it.
pub fn tls_provider() {
    choco_factory::cocoa_butter::tls::install_default_provider();
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    let [port] = free_ports().expect("a free port");
    port
}

/// The binary, running `serve` for the-conch on ephemeral ports.
pub struct Factory {
    pub child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    /// The sockets the harness bound and handed the process, by name.
    pre_bound: Vec<(String, SocketAddr)>,
}

pub fn conch_env(nats_url: &str) -> Vec<(String, String)> {
    room_env(nats_url, "CONCH")
}

/// Environment for one room on ephemeral ports (`room` upper-case).
pub fn room_env(nats_url: &str, room: &str) -> Vec<(String, String)> {
    let ports = ["HTTP_PORT", "GRPC_PORT", "METRICS_PORT"]
        .map(|port| (format!("CHOCO_ROOMS__{room}__{port}"), "0".to_string()));
    [
        ("CHOCO_NATS__URL", nats_url),
        // Fast retries keep fault tests short.
        ("CHOCO_CONSUMER__RETRY_BASE", "100ms"),
        ("CHOCO_CONSUMER__RETRY_MAX", "500ms"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain(ports)
    .collect()
}

/// The rooms by key and label.
const ROOMS: [(&str, &str); 4] = [
    ("conch", "Fudge Room"),
    ("winnower", "Winnowing Room"),
    ("mould", "Moulding Room"),
    ("wrapper", "Wrapping Room"),
];

/// Sockets the harness binds for every room the environment puts on
/// ephemeral ports (`CHOCO_ROOMS__<ROOM>__*_PORT=0`), handed to the binary
/// as a service manager does (`LISTEN_FDS`, `LISTEN_FDNAMES`): the harness
/// knows each port before the process starts, and no port is picked free
/// and then taken by someone else before the binary binds it.
struct PreBound {
    /// (`<room>-<http|grpc|metrics>`, socket), in the order passed.
    sockets: Vec<(String, std::net::TcpListener)>,
}

impl PreBound {
    fn for_env(env: &[(String, String)]) -> PreBound {
        let ephemeral = |room: &str, port: &str| {
            env.iter().any(|(key, value)| {
                key == &format!("CHOCO_ROOMS__{}__{port}", room.to_uppercase()) && value == "0"
            })
        };
        let mut sockets = Vec::new();
        for (room, _) in ROOMS {
            if ["HTTP_PORT", "GRPC_PORT", "METRICS_PORT"]
                .iter()
                .all(|port| ephemeral(room, port))
            {
                for kind in ["http", "grpc", "metrics"] {
                    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                    sockets.push((format!("{room}-{kind}"), socket));
                }
            }
        }
        PreBound { sockets }
    }

    /// Every socket's name and address (the process has its own copies).
    fn addresses(&self) -> Vec<(String, SocketAddr)> {
        self.sockets
            .iter()
            .map(|(name, socket)| (name.clone(), socket.local_addr().expect("bound")))
            .collect()
    }

    fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.sockets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, socket)| socket.local_addr().expect("bound"))
    }

    /// The room labelled `label`'s three addresses, if the harness bound them.
    fn room(&self, label: &str) -> Option<(SocketAddr, SocketAddr, SocketAddr)> {
        let (room, _) = ROOMS.iter().find(|(_, l)| *l == label)?;
        Some((
            self.addr(&format!("{room}-http"))?,
            self.addr(&format!("{room}-grpc"))?,
            self.addr(&format!("{room}-metrics"))?,
        ))
    }

    /// The command that runs `program` with `before` (a wrapper's own
    /// arguments) and hands it the sockets at descriptors 3, 4, … with
    /// their names. `LISTEN_PID` must name that process, known only once
    /// it runs, so a shell sets it and execs the program, which keeps the
    /// shell's pid (as a `prlimit` wrapper keeps its own).
    fn command(&self, program: &str, before: Vec<&str>) -> Command {
        if self.sockets.is_empty() {
            let mut command = Command::new(program);
            command.args(before);
            return command;
        }
        let mut command = Command::new("sh");
        command
            .args(["-c", r#"LISTEN_PID=$$ exec "$@""#, "sh", program])
            .args(before);
        let names: Vec<&str> = self.sockets.iter().map(|(n, _)| n.as_str()).collect();
        command
            .env("LISTEN_FDS", self.sockets.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let fds: Vec<i32> = self
            .sockets
            .iter()
            .map(|(_, socket)| std::os::fd::AsRawFd::as_raw_fd(socket))
            .collect();
        // SAFETY: runs in the forked child before exec and only calls
        // fcntl, dup2 and close, which are async-signal-safe; it touches no
        // memory but the descriptor list it owns.
        unsafe {
            command.pre_exec(move || {
                // First out of the way of 3.., then into place (dup2 clears
                // close-on-exec on the copy).
                let high: Vec<i32> = fds
                    .iter()
                    .map(|&fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1000))
                    .collect();
                for (index, &fd) in high.iter().enumerate() {
                    if fd < 0 || libc::dup2(fd, 3 + index as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                Ok(())
            });
        }
        command
    }
}

impl Factory {
    pub async fn start(nats_url: &str) -> Factory {
        Self::start_with(conch_env(nats_url), &["serve", "--rooms", "conch"]).await
    }

    /// Starts the binary and waits for the conch's "room listening" log line.
    pub async fn start_with(env: Vec<(String, String)>, args: &[&str]) -> Factory {
        Self::start_room(env, args, "Fudge Room").await
    }

    /// Starts the binary and waits until the room labelled `label` listens.
    pub async fn start_room(env: Vec<(String, String)>, args: &[&str], label: &str) -> Factory {
        Self::start_under(&[], env, args, label).await
    }

    /// Like [`Factory::start_room`], with the binary run by `wrapper`
    /// (`["prlimit", "--nofile=1024:1024", "--"]`).
    pub async fn start_under(
        wrapper: &[&str],
        env: Vec<(String, String)>,
        args: &[&str],
        label: &str,
    ) -> Factory {
        let pre_bound = PreBound::for_env(&env);
        Self::start_inner(wrapper, env, args, label, pre_bound).await
    }

    /// Starts the binary with `sockets` (`<room>-<http|grpc|metrics>`)
    /// passed as a service manager passes them, whatever the ports in `env`.
    pub async fn start_passing(
        env: Vec<(String, String)>,
        args: &[&str],
        label: &str,
        sockets: Vec<(String, std::net::TcpListener)>,
    ) -> Factory {
        Self::start_inner(&[], env, args, label, PreBound { sockets }).await
    }

    async fn start_inner(
        wrapper: &[&str],
        env: Vec<(String, String)>,
        args: &[&str],
        label: &str,
        pre_bound: PreBound,
    ) -> Factory {
        tls_provider();
        let (program, before) = match wrapper.split_first() {
            Some((program, rest)) => (*program, rest.iter().copied().chain([BIN]).collect()),
            None => (BIN, Vec::new()),
        };
        let mut child = pre_bound
            .command(program, before)
            .args(args)
            .envs(env)
            .env_remove("RUST_LOG")
            // The harness's own switch, not a configuration key.
            .env_remove("CHOCO_TEST_LOGS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn choco-factory");
        let stdout = child.stdout.take().expect("stdout");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if std::env::var_os("CHOCO_TEST_LOGS").is_some() {
                    eprintln!("[factory] {line}");
                }
                sink.lock().expect("logs").push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = logs.lock().expect("logs").iter().find_map(|line| {
                let json: Value = serde_json::from_str(line).ok()?;
                (json["message"] == "room listening" && json["factory.room"] == label)
                    .then_some(json)
            });
            if let Some(json) = found {
                let logged =
                    |k: &str| -> SocketAddr { json[k].as_str().expect(k).parse().expect("addr") };
                let logged = (logged("http"), logged("grpc"), logged("metrics"));
                // The room serves on the sockets the harness handed it.
                let (http, grpc, metrics) = match pre_bound.room(label) {
                    Some(bound) => {
                        assert_eq!(
                            logged, bound,
                            "{label} did not take the sockets it was passed"
                        );
                        bound
                    }
                    None => logged,
                };
                return Factory {
                    http,
                    grpc,
                    metrics,
                    child,
                    logs,
                    pre_bound: pre_bound.addresses(),
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("choco-factory exited early: {status}");
            }
            assert!(Instant::now() < deadline, "choco-factory did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub async fn wait_ready(&self) {
        wait_until(Duration::from_secs(20), || async {
            reqwest::get(self.url("/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// Waits until `/readyz` says 503 (NATS gone, paused, ...).
    pub async fn wait_not_ready(&self) {
        wait_until(Duration::from_secs(15), || async {
            reqwest::get(self.url("/readyz"))
                .await
                .is_ok_and(|r| r.status() == 503)
        })
        .await;
    }

    /// The room's `/metrics` (Prometheus text) from its metrics port.
    /// `path` on the metrics port: (status, body).
    pub async fn metrics_get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.metrics))
            .await
            .expect("metrics port");
        let status = response.status().as_u16();
        (status, response.text().await.expect("text"))
    }

    pub async fn scrape(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// The process id of the binary (a `prlimit` wrapper execs it, so the
    /// same id).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal");
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait")
    }

    /// The addresses of another room of the same process: the sockets the
    /// harness handed it, else what it logged.
    pub fn room_addrs(&self, label: &str) -> Option<(SocketAddr, SocketAddr, SocketAddr)> {
        if let Some((room, _)) = ROOMS.iter().find(|(_, l)| *l == label) {
            let addr = |kind: &str| {
                self.pre_bound
                    .iter()
                    .find(|(name, _)| name == &format!("{room}-{kind}"))
                    .map(|(_, addr)| *addr)
            };
            if let (Some(http), Some(grpc), Some(metrics)) =
                (addr("http"), addr("grpc"), addr("metrics"))
            {
                return Some((http, grpc, metrics));
            }
        }
        self.logs.lock().expect("logs").iter().find_map(|line| {
            let json: Value = serde_json::from_str(line).ok()?;
            if json["message"] != "room listening" || json["factory.room"] != label {
                return None;
            }
            let addr = |k: &str| json[k].as_str()?.parse().ok();
            Some((addr("http")?, addr("grpc")?, addr("metrics")?))
        })
    }

    pub fn logs_containing(&self, needle: &str) -> Vec<String> {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

/// Runs an operator command of the binary against `nats_url`:
/// (success, stdout, stderr).
pub fn cli(nats_url: &str, args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) = cli_status(nats_url, args);
    (code == Some(0), stdout, stderr)
}

/// Like [`cli`], with the exit status: (status, stdout, stderr).
pub fn cli_status(nats_url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(BIN)
        .args(args)
        .env("CHOCO_NATS__URL", nats_url)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub async fn wait_until<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn envelope(event_type: &str, aggregate: &str, payload: &Value) -> EventEnvelope {
    EventEnvelope::new(
        Uuid::now_v7(),
        event_type.to_string(),
        aggregate.to_string(),
        String::new(),
        serde_json::to_vec(payload).expect("json"),
        "tests".to_string(),
    )
}

/// Publishes a body with a message id and waits for JetStream to store it.
pub async fn publish_raw(js: &jetstream::Context, subject: &str, msg_id: &str, body: Vec<u8>) {
    let message = jetstream::message::PublishMessage::build()
        .payload(body.into())
        .message_id(msg_id);
    js.send_publish(subject.to_string(), message)
        .await
        .expect("publish")
        .await
        .expect("stored");
}

pub async fn publish(js: &jetstream::Context, subject: &str, envelope: &EventEnvelope) {
    publish_raw(js, subject, &envelope.event_id, envelope.encode()).await;
}

/// Creates the stream the conch owns (as the runtime would) so tests can
/// publish before the binary is up.
pub async fn ensure_coordination_stream(js: &jetstream::Context) {
    js.get_or_create_stream(jetstream::stream::Config {
        name: "choco:events:coordination".into(),
        subjects: vec!["choco.events.coordination.>".into()],
        storage: jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("stream");
}

/// A message read back from a stream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub headers: Option<async_nats::HeaderMap>,
    pub body: bytes::Bytes,
}

impl Stored {
    pub fn envelope(&self) -> EventEnvelope {
        EventEnvelope::decode(&self.body).expect("a valid envelope")
    }

    pub fn payload(&self) -> Value {
        serde_json::from_slice(&self.envelope().payload).expect("json payload")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    }
}

/// Every message currently in `stream` matching `filter`, read with an
/// ephemeral ordered consumer.
pub async fn read_all(js: &jetstream::Context, stream: &str, filter: &str) -> Vec<Stored> {
    let Ok(stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let pending = stream.cached_info().state.messages;
    if pending == 0 {
        return Vec::new();
    }
    // Retried: on a cluster that just regained its quorum the first
    // requests may time out while leaders are elected.
    let deadline = Instant::now() + Duration::from_secs(60);
    let consumer = loop {
        match stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                ..Default::default()
            })
            .await
        {
            Ok(consumer) => break consumer,
            Err(err) if Instant::now() < deadline => {
                eprintln!("ordered consumer on {filter}: {err}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => panic!("ordered consumer on {filter}: {err}"),
        }
    };
    // The consumer knows how many messages match: none, and there is
    // nothing to wait for; some, and they are read to the last (`pending`
    // 0), riding out a pause (a cluster electing a leader) on the way.
    if consumer.cached_info().num_pending == 0 {
        return Vec::new();
    }
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(Duration::from_millis(300), messages.next()).await {
            Ok(Some(Ok(message))) => {
                let pending = message.info().map(|i| i.pending).unwrap_or(0);
                out.push(Stored {
                    subject: message.subject.to_string(),
                    headers: message.headers.clone(),
                    body: message.payload.clone(),
                });
                if pending == 0 {
                    break;
                }
            }
            Ok(Some(Err(err))) if Instant::now() < deadline => {
                eprintln!("reading {filter}: {err}; going on");
            }
            Err(_elapsed) if Instant::now() < deadline => {}
            _ => panic!("reading {filter}: stopped after {} messages", out.len()),
        }
    }
    out
}

/// Waits until `stream` holds at least `count` messages matching `filter`,
/// then returns them all.
pub async fn wait_for(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    count: usize,
    limit: Duration,
) -> Vec<Stored> {
    let deadline = Instant::now() + limit;
    loop {
        let found = read_all(js, stream, filter).await;
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} messages on {filter}, found {}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `count` writes that cannot conflict (each its own property,
/// spread over `documents` documents): each must yield one `completed`.
pub async fn publish_independent_writes(
    js: &jetstream::Context,
    prefix: &str,
    count: usize,
    documents: usize,
) {
    ensure_coordination_stream(js).await;
    for i in 0..count {
        let doc = format!("{prefix}-{}", i % documents);
        let payload = sync_payload(
            &doc,
            &format!("p{i}"),
            serde_json::json!(i),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        );
        let event = envelope("coordination.property_sync.requested", &doc, &payload);
        publish(js, REQUESTED, &event).await;
    }
}

/// Waits for `count` messages, then makes sure no more arrive.
pub async fn exactly(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    count: usize,
) -> Vec<Stored> {
    if count > 0 {
        wait_for(js, stream, filter, count, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = read_all(js, stream, filter).await;
    assert_eq!(all.len(), count, "exactly {count} on {filter}");
    all
}

pub const COORDINATION: &str = "choco:events:coordination";
pub const REQUESTED: &str = "choco.events.coordination.property_sync.requested";
pub const COMPLETED: &str = "choco.events.coordination.property_sync.completed";
pub const DETECTED: &str = "choco.events.coordination.conflict.detected";
pub const RESOLVED: &str = "choco.events.coordination.conflict.resolved";

pub fn sync_payload(
    doc: &str,
    property: &str,
    value: Value,
    base: u64,
    author: &str,
    at: &str,
) -> Value {
    serde_json::json!({
        "document_id": doc,
        "property": property,
        "value": value,
        "base_revision": base,
        "author_id": author,
        "updated_at": at,
    })
}
