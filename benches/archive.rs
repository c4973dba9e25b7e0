//! The archive against the stream's own consume limit, side by side in one
//! run on one nats-server: a stream holding a backlog of conch inputs is
//! read to its end, in alternating rounds, by
//!
//! - the limit: a bare loop in this process with the archive consumer's
//!   exact configuration (ack policy "all", the same `max_ack_pending`,
//!   pinned priority group), the runtime's puller with the archiver's batch,
//!   acknowledging the last message of every `segment_max_events` and doing
//!   nothing else;
//! - the archiver of the release binary (`[archive]` on the coordination
//!   domain, the local-directory backend, default segment settings): the
//!   same reading, plus building, compressing and writing each segment, its
//!   range in KV and the manifest.
//!
//! Both are timed the same way: from the moment each starts pulling (the
//! loop's first pull; the binary's `/archive/readyz` turning 200) until the
//! consumer's ack floor reaches the stream's last sequence, as the server
//! reports it. CPU per event: the binary's user + system time over those
//! instants (`/proc/<pid>/stat`), and for the loop that of the one thread
//! its runtime and its NATS connection run on; the nats-server's for each.
//! Each figure is the median of the rounds.
//!
//! Run: `scripts/bench.sh archive` (or `cargo bench --bench archive`).
//! Options after `--`: `--events N` (backlog, default 30000), `--rounds N`
//! (default 3), `--json PATH` (default target/bench/archive.json).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use choco_factory::cocoa_butter::archive::{ARCHIVE_BUCKET, ARCHIVE_CONSUMER, ArchiveConfig};
use choco_factory::cocoa_butter::nats::PINNED_GROUP;
use choco_factory::cocoa_butter::nats::pull::Puller;
use choco_factory::cocoa_butter::nats_server::{self, ManagedNats};
use choco_factory::cocoa_butter::runtime::archive_consumer_config;
use futures::{StreamExt, TryStreamExt};
use tokio::process::{Child, Command};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[path = "common/measure.rs"]
mod measure;
use measure::{process_cpu_s, thread_cpu_s};
#[path = "../tests/common/ports.rs"]
mod ports;
use ports::free_ports;

#[path = "../tests/common/workload.rs"]
#[allow(dead_code)]
mod workload;
use workload::{ROOMS, median};

const STREAM: &str = "choco:events:coordination";
const SUBJECTS: &str = "choco.events.coordination.>";
const LIMIT_CONSUMER: &str = "bench-archive-limit";

#[derive(clap::Parser)]
struct Options {
    /// Messages in the stream's backlog, read to the end in each round.
    #[arg(long, default_value_t = 30_000)]
    events: usize,
    /// Rounds of each reader; each figure is their median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench/archive.json"))]
    json: PathBuf,
    /// Passed by `cargo bench`. Without it (`cargo test --all-targets`) one
    /// small smoke pass checks that the bench still works.
    #[arg(long, hide = true)]
    bench: bool,
    /// What `cargo test <filter> -- --nocapture` passes to every test
    /// binary; a bench has no tests to filter, so it ignores them.
    #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
    _test_harness_args: Vec<String>,
}

/// One reading of the whole backlog.
#[derive(Clone, Copy, Debug)]
struct Reading {
    seconds: f64,
    cpu_s: f64,
    server_cpu_s: f64,
    /// The binary's peak resident set (the archiver's rounds only).
    peak_rss_kib: u64,
}

fn main() -> Result<(), Error> {
    // reqwest's rustls (the archive's S3 client) takes the process's
    // provider: ring, as the binary.
    choco_factory::cocoa_butter::tls::install_default_provider();
    let mut options = <Options as clap::Parser>::parse();
    if !options.bench {
        options.events = 2_000;
        options.rounds = 1;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

async fn run(options: Options) -> Result<(), Error> {
    let data = tempfile::tempdir()?;
    let nats = ManagedNats::start(nats_server::find_binary()?, data.path(), 0).await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client);
    let server_pid = nats.pid().ok_or("nats-server exited")?;

    // Whole segments: a last, partial one would close only on its age, and
    // the round would time the age limit.
    let archive = ArchiveConfig::default();
    let events = options.events.div_ceil(archive.segment_max_events) * archive.segment_max_events;
    let backlog_bytes = fill(&js, events).await?;
    let last = js
        .get_stream(STREAM)
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    eprintln!(
        "backlog: {last} messages, {:.1} MiB as stored bodies",
        backlog_bytes as f64 / 1048576.0
    );

    let mut limits = Vec::new();
    let mut archives = Vec::new();
    let mut archived_bytes = 0;
    for round in 0..options.rounds {
        let limit = limit_round(&nats.url(), &js, &archive, server_pid, last).await?;
        eprintln!("round {round}: limit {:.0}/s", last as f64 / limit.seconds);
        limits.push(limit);
        let dir = data.path().join(format!("archive-{round}"));
        let (reading, bytes) = archive_round(&nats.url(), &js, &dir, server_pid, last).await?;
        eprintln!(
            "round {round}: archive {:.0}/s",
            last as f64 / reading.seconds
        );
        archives.push(reading);
        archived_bytes = bytes;
    }

    let events = last as f64;
    let rate = |readings: &[Reading]| {
        median(
            &readings
                .iter()
                .map(|r| events / r.seconds)
                .collect::<Vec<_>>(),
        )
    };
    let per_event_us = |readings: &[Reading], pick: fn(&Reading) -> f64| {
        median(
            &readings
                .iter()
                .map(|r| pick(r) * 1e6 / events)
                .collect::<Vec<_>>(),
        )
    };
    let limit_rate = rate(&limits);
    let archive_rate = rate(&archives);
    let ratios: Vec<f64> = limits
        .iter()
        .zip(&archives)
        .map(|(limit, archive)| limit.seconds / archive.seconds)
        .collect();
    let report = serde_json::json!({
        "bench": "archive",
        "events": last,
        "rounds": options.rounds,
        "segment_max_events": archive.segment_max_events,
        "limit_events_per_s": limit_rate,
        "archive_events_per_s": archive_rate,
        "archive_over_limit": median(&ratios),
        "limit_cpu_us_per_event": per_event_us(&limits, |r| r.cpu_s),
        "archive_cpu_us_per_event": per_event_us(&archives, |r| r.cpu_s),
        "server_cpu_us_per_event_limit": per_event_us(&limits, |r| r.server_cpu_s),
        "server_cpu_us_per_event_archive": per_event_us(&archives, |r| r.server_cpu_s),
        "stored_bytes_per_event": backlog_bytes as f64 / events,
        "archived_bytes_per_event": archived_bytes as f64 / events,
        "archive_peak_rss_mib": archives.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
    });
    println!();
    println!(
        "| reader | events/s | ratio to the limit | CPU µs/event | nats-server µs/event | bytes/event |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| consume limit (ack every {} messages) | {limit_rate:.0} | 1 | {:.1} | {:.1} | {:.0} stored |",
        archive.segment_max_events,
        report["limit_cpu_us_per_event"]
            .as_f64()
            .unwrap_or_default(),
        report["server_cpu_us_per_event_limit"]
            .as_f64()
            .unwrap_or_default(),
        report["stored_bytes_per_event"]
            .as_f64()
            .unwrap_or_default(),
    );
    println!(
        "| archiver (local directory) | {archive_rate:.0} | {:.2} | {:.1} | {:.1} | {:.0} archived |",
        median(&ratios),
        report["archive_cpu_us_per_event"]
            .as_f64()
            .unwrap_or_default(),
        report["server_cpu_us_per_event_archive"]
            .as_f64()
            .unwrap_or_default(),
        report["archived_bytes_per_event"]
            .as_f64()
            .unwrap_or_default(),
    );
    println!(
        "\nThe binary (the wrapper idle, the archiver working): peak resident set {:.1} MiB.",
        report["archive_peak_rss_mib"].as_f64().unwrap_or_default()
    );
    if options.bench {
        if let Some(parent) = options.json.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&options.json, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("wrote {}", options.json.display());
    }
    Ok(())
}

/// The coordination stream with `events` conch inputs (as the runtime
/// would create it); the bytes of their bodies.
async fn fill(js: &jetstream::Context, events: usize) -> Result<usize, Error> {
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![SUBJECTS.into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let case = ROOMS
        .iter()
        .find(|case| case.name == "conch")
        .ok_or("no conch in the workload")?;
    let subject = format!("choco.events.{}.{}", case.domain, case.action);
    let bodies: Vec<(String, Vec<u8>)> = (0..events)
        .map(|i| {
            let envelope = case.input(
                &format!("doc-{}", i % 500),
                format!("bench-archive-{i}"),
                "bench",
            );
            (envelope.event_id.clone(), envelope.encode())
        })
        .collect();
    let bytes = bodies.iter().map(|(_, body)| body.len()).sum();
    futures::stream::iter(bodies)
        .map(|(id, body)| {
            let (js, subject) = (js.clone(), subject.clone());
            async move {
                let message = jetstream::message::PublishMessage::build()
                    .payload(body.into())
                    .message_id(id);
                js.send_publish(subject, message).await?.await?;
                Ok::<_, Error>(())
            }
        })
        .buffer_unordered(256)
        .try_collect::<()>()
        .await?;
    Ok(bytes)
}

/// The bare reader: the archive consumer's configuration under another
/// name, read on a current-thread runtime of its own (its one thread is
/// the loop's whole CPU, NATS connection included).
async fn limit_round(
    url: &str,
    js: &jetstream::Context,
    archive: &ArchiveConfig,
    server_pid: u32,
    last: u64,
) -> Result<Reading, Error> {
    let stream = js.get_stream(STREAM).await?;
    let _ = stream.delete_consumer(LIMIT_CONSUMER).await;
    let mut config = archive_consumer_config(archive);
    config.durable_name = Some(LIMIT_CONSUMER.into());
    stream.create_consumer(config).await?;

    let (url, archive) = (url.to_string(), archive.clone());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || -> Result<f64, Error> {
        let tid = nix::unistd::gettid().as_raw();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let client = async_nats::connect(url).await?;
            let js = jetstream::new(client.clone());
            let consumer: jetstream::consumer::Consumer<pull::Config> = js
                .get_stream(STREAM)
                .await?
                .get_consumer(LIMIT_CONSUMER)
                .await?;
            let defaults = choco_factory::cocoa_butter::config::ConsumerConfig::default();
            let cpu_before = thread_cpu_s(tid)?;
            let _ = started_tx.send(Instant::now());
            let mut messages = Puller::new(
                &js,
                &consumer,
                archive.segment_max_events.clamp(1, 256),
                defaults.pull_expiry(Some(archive.ack_wait)),
                defaults.heartbeat,
                Some(PINNED_GROUP),
            )
            .await?;
            let mut read = 0;
            loop {
                let message = messages.next().await?;
                read += 1;
                let seq = message.info()?.stream_sequence;
                if read % archive.segment_max_events == 0 || seq == last {
                    message.double_ack().await?;
                }
                if seq == last {
                    break;
                }
            }
            client.flush().await?;
            Ok(thread_cpu_s(tid)? - cpu_before)
        })
    });
    let started = started_rx.await?;
    let server_before = process_cpu_s(server_pid)?;
    let ended = acked_to(&stream, LIMIT_CONSUMER, last).await?;
    let server_cpu_s = process_cpu_s(server_pid)? - server_before;
    let cpu_s = reader.join().map_err(|_| "the limit's reader panicked")??;
    stream.delete_consumer(LIMIT_CONSUMER).await?;
    Ok(Reading {
        seconds: (ended - started).as_secs_f64(),
        cpu_s,
        server_cpu_s,
        peak_rss_kib: 0,
    })
}

/// The release binary archiving the backlog into `dir` from the first
/// sequence; the reading and the archive's size in bytes.
async fn archive_round(
    url: &str,
    js: &jetstream::Context,
    dir: &Path,
    server_pid: u32,
    last: u64,
) -> Result<(Reading, u64), Error> {
    let stream = js.get_stream(STREAM).await?;
    // Each round archives from scratch: no consumer, no recorded range.
    let _ = stream.delete_consumer(ARCHIVE_CONSUMER).await;
    let _ = js.delete_key_value(ARCHIVE_BUCKET).await;

    let mut factory = Factory::start(url, dir).await?;
    let pid = factory.child.id().ok_or("the binary exited")?;
    let readyz = format!("http://{}/archive/readyz", factory.metrics);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Archiving starts when its readiness turns 200 (it has its consumer and
    // sends its first pull next).
    loop {
        let ready = http
            .get(&readyz)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err("the archiver did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let (cpu_before, server_before) = (process_cpu_s(pid)?, process_cpu_s(server_pid)?);
    let ended = acked_to(&stream, ARCHIVE_CONSUMER, last).await?;
    let (cpu_s, server_cpu_s) = (
        process_cpu_s(pid)? - cpu_before,
        process_cpu_s(server_pid)? - server_before,
    );
    let peak_rss_kib = workload::resident_kib(pid, "VmHWM")?;
    factory.stop().await;
    Ok((
        Reading {
            seconds: (ended - started).as_secs_f64(),
            cpu_s,
            server_cpu_s,
            peak_rss_kib,
        },
        dir_bytes(dir)?,
    ))
}

/// When the server first reports `durable`'s ack floor at `last` (polled
/// every 5 ms: well under 1 % of a round).
async fn acked_to(stream: &stream::Stream, durable: &str, last: u64) -> Result<Instant, Error> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(info) = stream.consumer_info(durable).await
            && info.ack_floor.stream_sequence >= last
        {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!("{durable} did not reach sequence {last}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn dir_bytes(dir: &Path) -> Result<u64, Error> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

/// The release binary with only the wrapper serving (the coordination
/// stream has no room reading it here) and the coordination domain
/// archived into a local directory.
struct Factory {
    child: Child,
    /// The process's metrics port, where `/archive/readyz` is.
    metrics: SocketAddr,
}

impl Factory {
    async fn start(url: &str, dir: &Path) -> Result<Factory, Error> {
        let [http, grpc, metrics] = free_ports()?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], metrics));
        let child = Command::new(env!("CARGO_BIN_EXE_choco-factory"))
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
            .args(["serve", "--rooms", "wrapper"])
            .env("CHOCO_NATS__URL", url)
            .env("CHOCO_ARCHIVE__DOMAINS", r#"["coordination"]"#)
            .env("CHOCO_ARCHIVE__DIR", dir)
            .env("CHOCO_ROOMS__WRAPPER__HTTP_PORT", http.to_string())
            .env("CHOCO_ROOMS__WRAPPER__GRPC_PORT", grpc.to_string())
            .env(
                "CHOCO_ROOMS__WRAPPER__METRICS_PORT",
                metrics.port().to_string(),
            )
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Factory { child, metrics })
    }

    async fn stop(&mut self) {
        measure::stop(&mut self.child).await;
    }
}
