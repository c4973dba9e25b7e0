//! The runtime as a user sees it: ports, endpoints, exit codes, signals.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// The port table as shipped binds (8087 / 7077 / 9102 for the-conch), and
/// every core endpoint answers on it. The only test using fixed ports.
#[tokio::test]
async fn port_table_binds_and_core_endpoints_answer() {
    let nats = Nats::start().await;
    let env = vec![
        ("CHOCO_NATS__URL".to_string(), nats.url()),
        ("CHOCO_LOG__FORMAT".to_string(), "json".to_string()),
    ];
    let factory = Factory::start_with(env, &["serve"]).await;
    assert_eq!(factory.http.port(), 8087);
    assert_eq!(factory.grpc.port(), 7077);
    assert_eq!(factory.metrics.port(), 9102);
    factory.wait_ready().await;

    let health: Value = reqwest::get(factory.url("/healthz"))
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");

    let info: Value = reqwest::get(factory.url("/info"))
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    assert_eq!(info["room"], "conch");
    assert_eq!(info["label"], "Fudge Room");
    assert_eq!(info["service"], "the-conch");
    assert_eq!(info["subject_prefix"], "choco.events.coordination.>");
    assert_eq!(info["stream"], "choco:events:coordination");
    assert_eq!(info["consumer"], "choco-conch");
    assert_eq!(info["addresses"]["grpc"], "127.0.0.1:7077");
    assert_eq!(info["ready"], true);

    // Every log line of the room carries its label.
    let room_lines = factory.logs_containing("consumer bound");
    assert!(
        room_lines
            .iter()
            .any(|l| l.contains(r#""factory.room":"Fudge Room""#)),
        "{room_lines:?}"
    );

    // gRPC health follows readiness, for the room's service and overall.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", factory.grpc))
        .expect("endpoint")
        .connect()
        .await
        .expect("grpc");
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "choco.factory.conch.v1.Conch"] {
        let health = &mut health;
        wait_until(Duration::from_secs(5), || {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
            }
        })
        .await;
    }

    // Reflection lists the room's service without proto files.
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"choco.factory.conch.v1.Conch".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // One event through, then the metrics show it under the room's labels.
    let (_client, js) = nats.client().await;
    let event = envelope(
        "coordination.property_sync.requested",
        "doc-metrics",
        &sync_payload(
            "doc-metrics",
            "title",
            json!("x"),
            0,
            "ann",
            "2026-01-01T00:00:00Z",
        ),
    );
    publish(&js, REQUESTED, &event).await;
    wait_for(&js, COORDINATION, COMPLETED, 1, Duration::from_secs(10)).await;
    let metrics_url = format!("http://{}/metrics", factory.metrics);
    wait_until(Duration::from_secs(5), || async {
        let text = reqwest::get(&metrics_url).await.expect("metrics").text().await.expect("text");
        text.contains(r#"choco_consumer_messages_received_total{room="conch",event_type="coordination.property_sync.requested"} 1"#)
            && text.contains(r#"choco_consumer_messages_processed_total{room="conch",event_type="coordination.property_sync.requested",outcome="ok"} 1"#)
            && text.contains("choco_consumer_processing_duration_seconds_bucket")
            && text.contains(r#"choco_room_ready{room="conch"} 1"#)
    })
    .await;
}

#[tokio::test]
async fn readiness_follows_the_nats_connection() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    // No server yet: the room serves HTTP but is not ready.
    let mut factory = Factory::start(&url).await;
    let status = reqwest::get(factory.url("/readyz"))
        .await
        .expect("readyz")
        .status();
    assert_eq!(status, 503);
    let body: Value = reqwest::get(factory.url("/readyz"))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(body["nats_connected"], false);

    let mut nats = Nats::start_on(port).await;
    factory.wait_ready().await;

    // The server dies: not ready. It comes back on the same store: ready again.
    nats.server.kill().await;
    factory.wait_not_ready().await;
    nats.server.restart().await.expect("restart");
    factory.wait_ready().await;

    factory.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(factory.wait_exit(Duration::from_secs(30)).await.success());
}

/// SIGTERM must not wait for a NATS server that is not there.
#[tokio::test]
async fn sigterm_exits_promptly_while_nats_is_unreachable() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let mut factory = Factory::start(&url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    factory.signal(nix::sys::signal::Signal::SIGTERM);
    let status = factory.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
}

fn run_refused(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .env("CHOCO_NATS__URL", "nats://127.0.0.1:1")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    // A refusal is immediate; a binary that starts serving instead is a
    // failure of this test, not a hang of the suite.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} {env:?} was not refused: it kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_configuration_is_refused_with_a_clear_message() {
    /// Environment, arguments, and what stderr must say.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (
            &[("CHOCO_ROOMS__CONCH__GRPC_PORT", "8087")],
            &["serve"],
            "rooms.conch.grpc_port: port 8087 is already used by rooms.conch.http_port",
        ),
        (
            &[],
            &["serve", "--rooms", "fudge"],
            "--rooms: unknown room \"fudge\"",
        ),
        (
            &[("CHOCO_ROOMS__FUDGE__ENABLED", "true")],
            &["serve"],
            "rooms.fudge: unknown room",
        ),
        (
            &[(
                "CHOCO_ROOMS__CONCH__SUBJECT_PREFIX",
                "choco.events.coordination",
            )],
            &["serve"],
            "rooms.conch.subject_prefix",
        ),
        (
            &[],
            &["--config", "/nonexistent/factory.toml", "serve"],
            "--config: cannot read /nonexistent/factory.toml",
        ),
        (
            &[(
                "CHOCO_ROOMS__CONCH__SETTINGS__DEFAULT_POLICY",
                "loudest_wins",
            )],
            &["serve"],
            "rooms.conch.settings.default_policy",
        ),
        (
            &[("CHOCO_NATS__URL", "nats://bad host:4222")],
            &["serve"],
            "nats.url",
        ),
    ];
    for (env, args, expected) in cases {
        let (code, stderr) = run_refused(env, args);
        assert_eq!(code, 2, "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?} {env:?}: expected {expected:?} in {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    }
}

#[test]
fn a_taken_port_is_refused_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let (code, stderr) = run_refused(&[("CHOCO_ROOMS__CONCH__GRPC_PORT", &port)], &["serve"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("rooms.conch.grpc_port: cannot listen on"),
        "{stderr}"
    );
}

#[test]
fn config_show_names_the_source_of_each_value() {
    let output = std::process::Command::new(BIN)
        .args(["config", "show"])
        .env("CHOCO_ROOMS__CONCH__GRPC_PORT", "17077")
        .output()
        .expect("run");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("rooms.conch.grpc_port").contains("17077"), "{text}");
    assert!(
        line("rooms.conch.grpc_port").contains("CHOCO_ROOMS__CONCH__GRPC_PORT"),
        "{text}"
    );
    assert!(
        line("rooms.conch.http_port").contains("rooms.toml"),
        "{text}"
    );
    assert!(line("nats.url").contains("built-in default"), "{text}");
}

/// SIGTERM while events stream in: in-flight work finishes and is acked,
/// the process exits 0, and a restart handles the rest with nothing lost
/// or doubled.
#[tokio::test]
async fn sigterm_drains_in_flight_work_and_exits_zero() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let total = 300;
    publish_independent_writes(&js, "drain", total, 30).await;
    // A short ack_wait so the messages the first process had buffered come
    // back quickly for the second.
    let mut env = conch_env(&nats.url());
    env.push(("CHOCO_CONSUMER__ACK_WAIT".into(), "3s".into()));
    env.push(("CHOCO_CONSUMER__HEARTBEAT".into(), "1s".into()));
    let mut factory = Factory::start_with(env.clone(), &["serve", "--rooms", "conch"]).await;
    wait_for(&js, COORDINATION, COMPLETED, 1, Duration::from_secs(20)).await;
    factory.signal(nix::sys::signal::Signal::SIGTERM);
    let status = factory.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");

    // Every message the room started was finished and acknowledged: each
    // delivered input is either acknowledged with its output published, or
    // still pending because the client had it buffered and never started it
    // (handed back at the stop, or redelivered by the server after
    // ack_wait). The room's consumer also receives its own outputs (they
    // follow the inputs in the stream, from sequence total + 1), so the
    // pending count may include outputs: from the ack floor and the last
    // delivered sequence, the pending inputs lie between the pending
    // messages beyond the outputs delivered and those not yet acked below
    // the last input. Both bounds are the same number when the stop came
    // before the first output or after the last input was acknowledged.
    let mut stream = js.get_stream(COORDINATION).await.expect("stream");
    let info = stream.consumer_info("choco-conch").await.expect("consumer");
    let outputs = read_all(&js, COORDINATION, COMPLETED).await.len() as u64;
    let total_inputs = total as u64;
    let delivered = info.delivered.stream_sequence;
    let delivered_inputs = delivered.min(total_inputs);
    let delivered_outputs = delivered - delivered_inputs;
    let pending = info.num_ack_pending as u64;
    let unacked_inputs = total_inputs.saturating_sub(info.ack_floor.stream_sequence);
    let pending_inputs = pending.saturating_sub(delivered_outputs)..=pending.min(unacked_inputs);
    assert!(
        outputs <= delivered_inputs && pending_inputs.contains(&(delivered_inputs - outputs)),
        "handled = delivered - never started: {outputs} outputs, \
         {delivered_inputs} inputs delivered, pending inputs in \
         {pending_inputs:?}: {info:?}"
    );
    // The pulls' batch grows with the backlog up to half the in-flight
    // bound (128), and the next pull goes out at half of it: that is the
    // most the client can hold unstarted, handed back (nak'd) at the stop.
    assert!(
        info.num_ack_pending <= 128 + 64,
        "at most the client's pull buffer: {info:?}"
    );

    let _again = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    wait_for(&js, COORDINATION, COMPLETED, total, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outputs = read_all(&js, COORDINATION, COMPLETED).await;
    assert_eq!(outputs.len(), total, "each input yields exactly one output");
    let _ = stream.info().await;
}

/// Every shipped config file is accepted as it is (and `config check`
/// also loads the winnower's rules and manifest, the room data files).
/// Files an example names that exist only on a real host (the auth
/// service's JWKS) are pointed at test fixtures.
#[test]
fn shipped_config_files_are_valid() {
    const ROOM_DATA: &[&str] = &["slop-rules.toml", "federation-manifest.toml", "tags.toml"];
    let mut checked = 0;
    for entry in std::fs::read_dir("config").expect("config/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !name.ends_with(".toml") || ROOM_DATA.contains(&name) {
            continue;
        }
        let output = std::process::Command::new(BIN)
            .args(["--config", path.to_str().expect("utf-8"), "config", "check"])
            .envs(
                (name == "production.toml")
                    .then_some(("CHOCO_AUTH__JWKS_FILE", "tests/fixtures/jwt/jwks.json")),
            )
            .output()
            .expect("run");
        assert!(
            output.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 5, "found the example configs");
}

/// Relative paths in room settings follow the port table, so the binary
/// runs from any working directory given `--rooms-file`.
#[test]
fn room_files_resolve_against_the_port_table_folder() {
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let table = std::path::absolute("rooms.toml").expect("path");
    let output = std::process::Command::new(BIN)
        .current_dir(elsewhere.path())
        .args([
            "--rooms-file",
            table.to_str().expect("utf-8"),
            "config",
            "check",
        ])
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = std::process::Command::new(BIN)
        .current_dir(elsewhere.path())
        .args(["config", "check"])
        .output()
        .expect("run");
    assert_eq!(
        output.status.code(),
        Some(1),
        "without the table, the files are not found"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("rooms.") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

/// A consumer whose settings drifted from the configuration is updated at
/// start-up; a stream that conflicts is refused loudly and the room stays
/// not ready.
#[tokio::test]
async fn drifted_consumers_are_updated_and_conflicting_streams_refused() {
    use async_nats::jetstream::{consumer, stream};
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    ensure_coordination_stream(&js).await;
    let coordination = js.get_stream(COORDINATION).await.expect("stream");
    coordination
        .create_consumer(consumer::pull::Config {
            durable_name: Some("choco-conch".into()),
            filter_subject: "choco.events.coordination.>".into(),
            ack_policy: consumer::AckPolicy::Explicit,
            max_deliver: 9,
            ack_wait: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .expect("drifted consumer");
    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;
    let info = coordination
        .consumer_info("choco-conch")
        .await
        .expect("consumer");
    assert_eq!(info.config.max_deliver, 3, "updated to the configuration");
    assert_eq!(info.config.ack_wait, Duration::from_secs(30));
    assert!(!factory.logs_containing("drifted").is_empty());
    drop(factory);

    // The same room against a stream it cannot use: memory storage.
    let other = Nats::start().await;
    let (_client, js) = other.client().await;
    js.create_stream(stream::Config {
        name: COORDINATION.into(),
        subjects: vec!["choco.events.coordination.>".into()],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("conflicting stream");
    let factory = Factory::start(&other.url()).await;
    let url = factory.url("/readyz");
    wait_until(Duration::from_secs(10), || async {
        !factory.logs_containing("Memory storage").is_empty()
    })
    .await;
    assert_eq!(reqwest::get(&url).await.expect("readyz").status(), 503);
    let line = factory.logs_containing("Memory storage").remove(0);
    assert!(line.contains("choco:events:coordination"), "{line}");
}

/// A `NOTIFY_SOCKET` listener standing in for systemd: what the unit hears.
struct SystemdSocket {
    socket: tokio::net::UnixDatagram,
    path: std::path::PathBuf,
    heard: String,
    _dir: tempfile::TempDir,
}

impl SystemdSocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("notify socket");
        SystemdSocket {
            socket,
            path,
            heard: String::new(),
            _dir: dir,
        }
    }

    fn env(&self) -> (String, String) {
        ("NOTIFY_SOCKET".into(), self.path.display().to_string())
    }

    /// Reads notifications until one holds `wanted`; returns that datagram.
    async fn until(&mut self, wanted: &str, within: Duration) -> String {
        let mut buf = vec![0u8; 4096];
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let n = tokio::time::timeout(left, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {wanted} in {within:?}; heard: {}", self.heard))
                .expect("recv");
            let note = String::from_utf8_lossy(&buf[..n]).to_string();
            self.heard.push_str(&note);
            self.heard.push('\n');
            if note.contains(wanted) {
                return note;
            }
        }
    }
}

/// Under systemd (`Type=notify`): READY=1 once every room is ready,
/// STOPPING=1 when a SIGTERM starts the shutdown.
#[tokio::test]
async fn systemd_hears_ready_and_stopping() {
    let nats = Nats::start().await;
    let mut systemd = SystemdSocket::bind();
    let mut env = conch_env(&nats.url());
    env.push(systemd.env());
    let mut factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;

    let ready = systemd.until("READY=1", Duration::from_secs(20)).await;
    assert!(ready.contains("STATUS=1 room(s): 1 ready"), "{ready}");
    // Ready means ready: the room answers /readyz with 200 by now.
    assert_eq!(
        reqwest::get(factory.url("/readyz"))
            .await
            .expect("readyz")
            .status(),
        200
    );

    factory.signal(nix::sys::signal::Signal::SIGTERM);
    systemd.until("STOPPING=1", Duration::from_secs(10)).await;
    assert!(factory.wait_exit(Duration::from_secs(20)).await.success());
}

/// A pause survives restarts, so a unit restarted with a paused room must
/// still finish starting: READY=1 once the paused room is bound and
/// waiting, STATUS naming it; a resume updates STATUS.
#[tokio::test]
async fn systemd_start_completes_with_a_paused_room() {
    let nats = Nats::start().await;
    let (ok, out, err) = cli(
        &nats.url(),
        &["room", "pause", "conch", "--reason", "audit"],
    );
    assert!(ok, "{out}{err}");
    let mut systemd = SystemdSocket::bind();
    let mut env = conch_env(&nats.url());
    env.push(systemd.env());
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;

    let ready = systemd.until("READY=1", Duration::from_secs(20)).await;
    assert!(
        ready.contains("STATUS=1 room(s): 0 ready, paused: conch"),
        "{ready}"
    );
    // Started is not ready: the paused room still says 503 to probes.
    assert_eq!(
        reqwest::get(factory.url("/readyz"))
            .await
            .expect("readyz")
            .status(),
        503
    );
    let (ok, out, err) = cli(&nats.url(), &["room", "resume", "conch"]);
    assert!(ok, "{out}{err}");
    systemd
        .until("STATUS=1 room(s): 1 ready", Duration::from_secs(10))
        .await;
}

/// `choco-factory health` says ready while the room is, and exits 1 naming
/// it when it is not; `health --live` (the container's HEALTHCHECK) passes
/// while the process lives, NATS or not.
#[tokio::test]
async fn the_health_command_follows_readiness() {
    let mut nats = Nats::start().await;
    let ports: [u16; 3] = free_ports().expect("free ports");
    let mut env = conch_env(&nats.url());
    for (key, port) in ["HTTP_PORT", "GRPC_PORT", "METRICS_PORT"].iter().zip(ports) {
        env.retain(|(k, _)| k != &format!("CHOCO_ROOMS__CONCH__{key}"));
        env.push((format!("CHOCO_ROOMS__CONCH__{key}"), port.to_string()));
    }
    let mut factory = Factory::start_with(env.clone(), &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    let health = |env: Vec<(String, String)>, mode: &'static [&'static str]| async move {
        tokio::process::Command::new(BIN)
            .args(["health", "--timeout", "2s"])
            .args(mode)
            .env("CHOCO_ROOMS__WINNOWER__ENABLED", "false")
            .env("CHOCO_ROOMS__MOULD__ENABLED", "false")
            .env("CHOCO_ROOMS__WRAPPER__ENABLED", "false")
            .envs(env)
            .output()
            .await
            .expect("run health")
    };
    let ready = health(env.clone(), &[]).await;
    assert!(ready.status.success(), "{ready:?}");
    assert!(String::from_utf8_lossy(&ready.stdout).contains("conch: ready"));

    nats.server.kill().await;
    factory.wait_not_ready().await;
    let not_ready = health(env.clone(), &[]).await;
    assert_eq!(not_ready.status.code(), Some(1), "{not_ready:?}");
    assert!(String::from_utf8_lossy(&not_ready.stdout).contains("conch:"));
    assert!(String::from_utf8_lossy(&not_ready.stderr).contains("not ready: conch"));
    // Waiting for NATS is not broken: the liveness probe (the container's
    // HEALTHCHECK) still passes, so no orchestrator restarts the process.
    let live = health(env.clone(), &["--live"]).await;
    assert!(live.status.success(), "{live:?}");
    assert!(String::from_utf8_lossy(&live.stdout).contains("conch: live"));
    factory.signal(nix::sys::signal::Signal::SIGKILL);
    factory.wait_exit(Duration::from_secs(10)).await;
    let gone = health(env, &["--live"]).await;
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not live: conch"));
}

/// The unit files pass `systemd-analyze verify` (systemd ships on this
/// machine kind), with ExecStart pointed at the binary under test.
#[test]
fn systemd_units_verify() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (source, instance) in [
        (
            "deploy/systemd/choco-factory.service",
            "choco-factory.service",
        ),
        (
            "deploy/systemd/choco-factory@.service",
            "choco-factory@conch.service",
        ),
        // Verified next to choco-factory.service, which its Service= names.
        (
            "deploy/systemd/choco-factory-conch-http.socket",
            "choco-factory-conch-http.socket",
        ),
    ] {
        let unit = std::fs::read_to_string(source)
            .expect("unit file")
            .replace("/usr/local/bin/choco-factory", BIN);
        let path = dir.path().join(instance);
        std::fs::write(&path, unit).expect("write");
        let output = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (from the systemd package)");
        let said = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{instance}: {said}");
        assert!(!said.contains(instance), "{instance} has warnings: {said}");
    }
}

/// The consumer series of every declared event type, the dead-letter
/// series of every reason and the gRPC series of every method exist at 0
/// from the first scrape, before any event or call, so rates and alerts
/// work at once.
#[tokio::test]
async fn known_series_exist_at_zero_from_the_start() {
    let nats = Nats::start().await;
    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;
    let text = factory.scrape().await;
    let series = |name: &str, labels: &[&str]| {
        text.lines().any(|line| {
            line.starts_with(name)
                && labels.iter().all(|label| line.contains(label))
                && line.ends_with(" 0")
        })
    };
    let input = r#"event_type="coordination.property_sync.requested""#;
    for outcome in ["ok", "retried", "dead_lettered"] {
        let outcome = format!(r#"outcome="{outcome}""#);
        assert!(
            series(
                "choco_consumer_messages_processed_total",
                &[input, &outcome]
            ),
            "{outcome} at 0:\n{text}"
        );
    }
    assert!(
        series("choco_consumer_messages_received_total", &[input]),
        "{text}"
    );
    assert!(
        series(
            "choco_consumer_messages_received_total",
            &[r#"event_type="unknown""#]
        ),
        "{text}"
    );
    assert!(
        series(
            "choco_consumer_messages_processed_total",
            &[
                r#"event_type="coordination.property_sync.completed""#,
                r#"outcome="skipped""#
            ]
        ),
        "{text}"
    );
    // Every dead-letter reason the room can give: the runtime's and its own.
    for reason in [
        "payload_invalid",
        "max_deliveries_exceeded",
        "handler_timeout",
        "corrupt_document_record",
    ] {
        let reason = format!(r#"reason="{reason}""#);
        assert!(
            series("choco_consumer_dlq_messages_total", &[input, &reason]),
            "{reason} at 0:\n{text}"
        );
    }
    assert!(
        series(
            "choco_consumer_dlq_messages_total",
            &[r#"event_type="unknown""#, r#"reason="unknown_event_type""#]
        ),
        "{text}"
    );
    // Every method of the room's gRPC service, with code OK.
    for method in ["SyncProperty", "GetProperties"] {
        let method = format!(r#"method="/choco.factory.conch.v1.Conch/{method}""#);
        assert!(
            series(
                "choco_grpc_server_requests_total",
                &[&method, r#"code="OK""#]
            ),
            "{method} at 0:\n{text}"
        );
    }
}

/// Sockets passed by a service manager (systemd socket activation:
/// `LISTEN_FDS`, `LISTEN_FDNAMES`) are served instead of the configured
/// ports: here someone else holds the configured ones, so binding them
/// would fail. A passed socket that no enabled room uses is named in a
/// warning and closed.
#[tokio::test]
async fn sockets_passed_by_the_service_manager_are_served_instead_of_binding() {
    let nats = Nats::start().await;
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    // Someone else holds the configured ports (each its own: the
    // configuration refuses one port for two listeners).
    let squatters = [bind(), bind(), bind()];
    let mut env = conch_env(&nats.url());
    for (key, value) in env.iter_mut() {
        for (port, squatter) in ["HTTP_PORT", "GRPC_PORT", "METRICS_PORT"]
            .iter()
            .zip(&squatters)
        {
            if key == &format!("CHOCO_ROOMS__CONCH__{port}") {
                *value = squatter.local_addr().expect("addr").port().to_string();
            }
        }
    }
    let sockets: Vec<(String, std::net::TcpListener)> =
        ["conch-http", "conch-grpc", "conch-metrics", "mould-http"]
            .into_iter()
            .map(|name| (name.to_string(), bind()))
            .collect();
    let passed_http = sockets[0].1.local_addr().expect("addr");
    let passed_metrics = sockets[2].1.local_addr().expect("addr");
    let factory =
        Factory::start_passing(env, &["serve", "--rooms", "conch"], "Fudge Room", sockets).await;
    assert_eq!(factory.http, passed_http);
    factory.wait_ready().await;
    let health = reqwest::get(format!("http://{passed_http}/healthz"))
        .await
        .expect("the passed HTTP socket answers");
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(format!("http://{passed_metrics}/metrics"))
        .await
        .expect("the passed metrics socket answers")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("choco_room_ready"), "{metrics}");
    wait_until(Duration::from_secs(10), || async {
        factory
            .logs_containing("no enabled room uses")
            .iter()
            .any(|line| line.contains("mould-http"))
    })
    .await;
    drop(squatters);
}
