//! The rooms' read endpoints against bare axum and tonic servers doing the
//! same work, side by side in one run on one nats-server.
//!
//! "The same work" is the room's own handlers: the bare server is this
//! bench binary started again as a second process (`--bare-server`), which
//! builds the conch and the mould through their `RoomSpec` exactly as the
//! runtime does and serves `Room::http_routes` with `axum::serve` and
//! `Room::grpc_service` with a plain `tonic::transport::Server`, with none
//! of the runtime's layers. The room side is the release binary with the
//! same two rooms. So the ratio is what the runtime's serving stack costs a
//! read: access guard, concurrency and body limits, request timeout,
//! request metrics and server spans, health and readiness routes.
//!
//! Endpoints: the conch's `GET /v1/documents/{id}/properties` and gRPC
//! `GetProperties` (a key-value read and its JSON or protobuf rendering),
//! the mould's `GET /v1/artifacts/{id}` and gRPC `GetArtifact` (an
//! object-store read). The load is closed-loop: `--connections N` (default
//! 16) clients, each on its own connection, sending the next request when
//! the last one is answered, over documents seeded through the room's API.
//! Bare and room alternate in `--rounds` rounds (default 3) of
//! `--seconds` each (default 3), so machine noise falls on both alike; the
//! rate is the median of the rounds, latency percentiles over all requests.
//! Any answer but success stops the bench: a rate of errors is not a rate.
//!
//! Run: `scripts/bench.sh` (both benches) or `cargo bench --bench
//! endpoints`. Writes `target/bench/endpoints.json`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use bytes::Bytes;
use choco_factory::cocoa_butter::config::{CliOverrides, ConfigSources};
use choco_factory::cocoa_butter::metrics::RoomMetrics;
use choco_factory::cocoa_butter::nats::Publisher;
use choco_factory::cocoa_butter::nats_server::{self, ManagedNats};
use choco_factory::cocoa_butter::{RoomContext, RoomSpec};
use choco_factory::rooms::{self, conch, mould};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::process::Command;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The rooms whose read endpoints are measured.
const ROOMS: [&str; 2] = ["conch", "mould"];
/// Documents seeded per room; requests cycle over them.
const DOCUMENTS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    ConchHttp,
    ConchGrpc,
    MouldHttp,
    MouldGrpc,
}

impl Endpoint {
    const ALL: [Endpoint; 4] = [
        Endpoint::ConchHttp,
        Endpoint::ConchGrpc,
        Endpoint::MouldHttp,
        Endpoint::MouldGrpc,
    ];

    fn name(self) -> &'static str {
        match self {
            Endpoint::ConchHttp => "conch GET /v1/documents/{id}/properties",
            Endpoint::ConchGrpc => "conch gRPC GetProperties",
            Endpoint::MouldHttp => "mould GET /v1/artifacts/{id}",
            Endpoint::MouldGrpc => "mould gRPC GetArtifact",
        }
    }

    fn room(self) -> &'static str {
        match self {
            Endpoint::ConchHttp | Endpoint::ConchGrpc => "conch",
            Endpoint::MouldHttp | Endpoint::MouldGrpc => "mould",
        }
    }

    fn grpc(self) -> bool {
        matches!(self, Endpoint::ConchGrpc | Endpoint::MouldGrpc)
    }
}

/// Options after `--` (`scripts/bench.sh endpoints --seconds 5`).
#[derive(clap::Parser)]
struct Options {
    /// Closed-loop clients, each on its own connection.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Rounds of bare then room (alternating who goes first).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Length of one side of a round.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Where the JSON report goes.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench/endpoints.json"))]
    json: PathBuf,
    /// Passed by `cargo bench`; without it (`cargo test --all-targets`) one
    /// short smoke pass checks that the bench still works.
    #[arg(long, hide = true)]
    bench: bool,
    /// What `cargo test <filter> -- --nocapture` passes to every test
    /// binary; a bench has no tests to filter, so it ignores them.
    #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
    _test_harness_args: Vec<String>,
    /// Run as the bare server (the bench starts itself again with this).
    #[arg(long, hide = true)]
    bare_server: bool,
}

fn options() -> Options {
    let mut options = <Options as clap::Parser>::parse();
    if !options.bench {
        options.connections = 4;
        options.rounds = 1;
        options.seconds = 0.3;
        options.json = std::env::temp_dir().join("choco-endpoints-smoke.json");
    }
    options.rounds = options.rounds.max(1);
    options.connections = options.connections.max(1);
    options
}

fn main() -> Result<(), Error> {
    // reqwest's rustls (enabled for the archive's S3 client) takes the
    // process's provider: ring, as the binary.
    choco_factory::cocoa_butter::tls::install_default_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let options = options();
    if options.bare_server {
        return runtime.block_on(bare_server());
    }
    runtime.block_on(run(options))
}

/// One room's ports, the same shape for the binary and the bare server.
#[derive(Clone, Copy)]
struct Ports {
    http: SocketAddr,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

fn free_addr() -> Result<SocketAddr, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn ports() -> Result<BTreeMap<&'static str, Ports>, Error> {
    ROOMS
        .iter()
        .map(|room| {
            Ok((
                *room,
                Ports {
                    http: free_addr()?,
                    grpc: free_addr()?,
                    metrics: free_addr()?,
                },
            ))
        })
        .collect()
}

/// Configuration for either process: only the measured rooms, on `ports`.
fn configure(command: &mut Command, nats_url: &str, ports: &BTreeMap<&'static str, Ports>) {
    command
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .env("CHOCO_NATS__URL", nats_url)
        .env("CHOCO_LOG__FORMAT", "json")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null());
    for spec in rooms::REGISTRY {
        let upper = spec.name.to_uppercase();
        match ports.get(spec.name) {
            Some(p) => {
                for (key, addr) in [
                    ("HTTP_PORT", p.http),
                    ("GRPC_PORT", p.grpc),
                    ("METRICS_PORT", p.metrics),
                ] {
                    command.env(
                        format!("CHOCO_ROOMS__{upper}__{key}"),
                        addr.port().to_string(),
                    );
                }
            }
            None => {
                command.env(format!("CHOCO_ROOMS__{upper}__ENABLED"), "false");
            }
        }
    }
}

/// The bare side: the rooms' own routes and services, built as the runtime
/// builds them, served without any of the runtime's layers. Runs until the
/// bench kills it.
async fn bare_server() -> Result<(), Error> {
    let config = ConfigSources {
        rooms_file: None,
        config_file: None,
        cli: CliOverrides::default(),
    }
    .load()?;
    let client = async_nats::connect(config.factory.nats.url.as_slice()).await?;
    let js = async_nats::jetstream::new(client);
    let mut servers = tokio::task::JoinSet::new();
    for settings in config.enabled_rooms() {
        let spec: &RoomSpec = rooms::REGISTRY
            .iter()
            .find(|spec| spec.name == settings.name)
            .ok_or("unknown room")?;
        let metrics = RoomMetrics::new(&settings.name, None);
        let room = (spec.build)(RoomContext {
            settings: settings.clone(),
            jetstream: js.clone(),
            publisher: Publisher::new(js.clone(), settings, metrics.clone()),
            metrics,
            store_streams: Default::default(),
        })?;
        room.prepare().await?;
        // TCP_NODELAY as on the runtime's listeners, so the sides differ
        // only in the runtime's layers.
        let http = tokio::net::TcpListener::bind(settings.http_addr)
            .await?
            .tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
        let router = room.clone().http_routes();
        servers.spawn(async move { axum::serve(http, router).await.map_err(Error::from) });
        let grpc = room.grpc_service();
        let addr = settings.grpc_addr;
        servers.spawn(async move {
            tonic::transport::Server::builder()
                .add_routes(grpc.routes)
                .serve(addr)
                .await
                .map_err(Error::from)
        });
    }
    match servers.join_next().await {
        Some(result) => result?,
        None => Ok(()),
    }
}

#[derive(Debug, serde::Serialize)]
struct Sample {
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, serde::Serialize)]
struct EndpointResult {
    endpoint: &'static str,
    bare: Sample,
    room: Sample,
    ratio: f64,
}

async fn run(options: Options) -> Result<(), Error> {
    let data = tempfile::tempdir()?;
    let nats = ManagedNats::start(nats_server::find_binary()?, data.path(), 0).await?;

    let room_ports = ports()?;
    let mut room_side = Command::new(env!("CARGO_BIN_EXE_choco-factory"));
    room_side.arg("serve");
    configure(&mut room_side, &nats.url(), &room_ports);
    let room_child = room_side.spawn()?;
    wait_ready(&room_ports).await?;

    let bare_ports = ports()?;
    let mut bare_side = Command::new(std::env::current_exe()?);
    bare_side.arg("--bare-server");
    configure(&mut bare_side, &nats.url(), &bare_ports);
    let bare_child = bare_side.spawn()?;
    wait_listening(&bare_ports).await?;

    seed(&room_ports).await?;

    let mut results = Vec::new();
    for endpoint in Endpoint::ALL {
        let mut bare = Series::default();
        let mut room = Series::default();
        for round in 0..options.rounds {
            // Alternate who goes first, so a drift of the machine's load
            // within a round falls on both sides.
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_bare in order {
                let ports = if is_bare { &bare_ports } else { &room_ports };
                let series = if is_bare { &mut bare } else { &mut room };
                let addr = ports[endpoint.room()];
                series.add(load(endpoint, addr, &options).await?);
            }
        }
        let result = EndpointResult {
            endpoint: endpoint.name(),
            ratio: room.rate() / bare.rate(),
            bare: bare.sample(),
            room: room.sample(),
        };
        eprintln!(
            "{}: bare {:.0}/s, room {:.0}/s (ratio {:.2})",
            result.endpoint, result.bare.requests_per_s, result.room.requests_per_s, result.ratio
        );
        results.push(result);
    }
    drop(room_child);
    drop(bare_child);

    println!();
    println!(
        "| endpoint | bare req/s | room req/s | room/bare | bare p50 / p99 ms | room p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
            r.endpoint,
            r.bare.requests_per_s,
            r.room.requests_per_s,
            r.ratio,
            r.bare.p50_ms,
            r.bare.p99_ms,
            r.room.p50_ms,
            r.room.p99_ms
        );
    }
    let report = json!({
        "git_sha": option_env!("BUILD_GIT_SHA"),
        "connections": options.connections,
        "rounds": options.rounds,
        "seconds_per_round": options.seconds,
        "endpoints": results,
    });
    if let Some(dir) = options.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&options.json, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("written to {}", options.json.display());
    Ok(())
}

async fn wait_ready(ports: &BTreeMap<&'static str, Ports>) -> Result<(), Error> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    for p in ports.values() {
        while !client
            .get(format!("http://{}/readyz", p.http))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            if started.elapsed() > Duration::from_secs(30) {
                return Err("the rooms did not become ready".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// The bare server has no readiness route: it is ready once both of each
/// room's listeners accept, which it binds after preparing the room.
async fn wait_listening(ports: &BTreeMap<&'static str, Ports>) -> Result<(), Error> {
    let started = Instant::now();
    for p in ports.values() {
        for addr in [p.http, p.grpc] {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(format!("the bare server did not listen on {addr}").into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    Ok(())
}

fn document(i: usize) -> String {
    format!("bench-doc-{}", i % DOCUMENTS)
}

/// Documents for both rooms, written through the room's own API (both
/// sides read the same buckets): four properties per conch document and a
/// rendered artifact per mould document.
async fn seed(ports: &BTreeMap<&'static str, Ports>) -> Result<(), Error> {
    let client = reqwest::Client::new();
    for i in 0..DOCUMENTS {
        let doc = document(i);
        for (property, value) in [
            ("title", json!(format!("Golden ticket {doc}"))),
            ("status", json!("published")),
            ("tags", json!(["cocoa", "fudge", "release"])),
            ("word_count", json!(1200 + i)),
        ] {
            let response = client
                .post(format!("http://{}/v1/properties/sync", ports["conch"].http))
                .json(
                    &json!({"document_id": doc, "property": property, "value": value,
                    "base_revision": 0, "author_id": "ann", "updated_at": "2026-03-01T10:00:00Z"}),
                )
                .send()
                .await?;
            if !response.status().is_success() {
                return Err(format!("seeding the conch: {}", response.text().await?).into());
            }
        }
        let response = client
            .post(format!("http://{}/v1/hydrate", ports["mould"].http))
            .json(&json!({"document_id": doc, "format": "html",
                "source": "# {{ title }}\n\nThe factory floor, section by section.\n\n/invention b1\n",
                "data": {"title": format!("Document {doc}"), "blocks": {"b1": {"title": "Cocoa jet"}}}}))
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!("seeding the mould: {}", response.text().await?).into());
        }
    }
    Ok(())
}

/// What one round of load measured.
struct Round {
    requests: usize,
    elapsed: Duration,
    latencies_ms: Vec<f64>,
}

#[derive(Default)]
struct Series {
    rates: Vec<f64>,
    latencies_ms: Vec<f64>,
}

impl Series {
    fn add(&mut self, round: Round) {
        self.rates
            .push(round.requests as f64 / round.elapsed.as_secs_f64());
        self.latencies_ms.extend(round.latencies_ms);
    }

    fn rate(&self) -> f64 {
        let mut rates = self.rates.clone();
        rates.sort_by(f64::total_cmp);
        rates.get(rates.len() / 2).copied().unwrap_or(0.0)
    }

    fn sample(&mut self) -> Sample {
        self.latencies_ms.sort_by(f64::total_cmp);
        Sample {
            requests_per_s: self.rate(),
            p50_ms: percentile(&self.latencies_ms, 0.50),
            p99_ms: percentile(&self.latencies_ms, 0.99),
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `options.connections` closed-loop clients against one endpoint at
/// `addr` for `options.seconds`.
async fn load(endpoint: Endpoint, ports: Ports, options: &Options) -> Result<Round, Error> {
    let deadline = Instant::now() + Duration::from_secs_f64(options.seconds);
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..options.connections {
        clients.spawn(async move {
            if endpoint.grpc() {
                grpc_client(endpoint, ports.grpc, client, deadline).await
            } else {
                http_client(endpoint, ports.http, client, deadline).await
            }
        });
    }
    let mut latencies_ms = Vec::new();
    while let Some(result) = clients.join_next().await {
        latencies_ms.extend(result??);
    }
    Ok(Round {
        requests: latencies_ms.len(),
        elapsed: started.elapsed(),
        latencies_ms,
    })
}

/// One HTTP/1.1 keep-alive connection; returns each request's latency.
async fn http_client(
    endpoint: Endpoint,
    addr: SocketAddr,
    client: usize,
    deadline: Instant,
) -> Result<Vec<f64>, Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let mut latencies = Vec::new();
    let mut i = client;
    while Instant::now() < deadline {
        let path = match endpoint {
            Endpoint::ConchHttp => format!("/v1/documents/{}/properties", document(i)),
            _ => format!("/v1/artifacts/{}", document(i)),
        };
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let sent = Instant::now();
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{}: {status} {}",
                endpoint.name(),
                String::from_utf8_lossy(&body)
            )
            .into());
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        i += 1;
    }
    drop(sender);
    driver.abort();
    Ok(latencies)
}

/// One HTTP/2 connection with one request in flight at a time.
async fn grpc_client(
    endpoint: Endpoint,
    addr: SocketAddr,
    client: usize,
    deadline: Instant,
) -> Result<Vec<f64>, Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut conch = conch::pb::conch_client::ConchClient::new(channel.clone());
    let mut mould = mould::pb::mould_client::MouldClient::new(channel);
    let mut latencies = Vec::new();
    let mut i = client;
    while Instant::now() < deadline {
        let document_id = document(i);
        let sent = Instant::now();
        let answered = match endpoint {
            Endpoint::ConchGrpc => conch
                .get_properties(conch::pb::GetPropertiesRequest { document_id })
                .await
                .map(|r| !r.into_inner().properties.is_empty()),
            _ => mould
                .get_artifact(mould::pb::GetArtifactRequest { document_id })
                .await
                .map(|r| !r.into_inner().content.is_empty()),
        };
        match answered {
            Ok(true) => {}
            Ok(false) => return Err(format!("{}: an empty answer", endpoint.name()).into()),
            Err(status) => return Err(format!("{}: {status}", endpoint.name()).into()),
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        i += 1;
    }
    Ok(latencies)
}
