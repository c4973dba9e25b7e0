//! The runtime against the bus's own limit, side by side in one run on one
//! nats-server: for each room, events/s through the room (the release
//! binary, all four rooms running) and through a bare async-nats loop doing
//! the same NATS work per event with no room logic; the room's latency at
//! half its saturation rate; the binary's resident set idle and saturated;
//! and how long the four rooms take to be ready.
//!
//! Run: `scripts/bench.sh pipeline` (or `cargo bench --bench pipeline`, with
//! nats-server on PATH or in NATS_SERVER_BIN). Options after `--`:
//! `--events N` (saturation inputs per room and round, default 10000),
//! `--rounds N` (default 3; each rate is the median), `--latency-events
//! N` (default 2000), `--json PATH` (default target/bench/pipeline.json),
//! `--only ROOM`. Set `BENCH_KEEP_METRICS=1` to print each room's metrics
//! after its runs (what the profile of a slow room starts from), and
//! `BENCH_FACTORY_LOG=PATH` to keep the binary's log lines,
//! `BENCH_FACTORY_WRAPPER` to run it under a profiler (see `Factory::start`).
//!
//! How the limit is made the same work: the room's own metrics count, per
//! event, the key-value and object-store operations it made and the
//! messages it published (by operation and bucket); the bare loop replays
//! exactly that mix per event, with values, objects and outputs of the
//! room's average sizes, on buckets and a stream configured like the
//! room's, pulling with the room's batch and in-flight bound. Throughput of
//! both is measured the same way: from the stream timestamp of the first
//! input to that of the last output, inputs published concurrently by the
//! same publisher.
//!
//! A room's consumer reads its whole prefix, so the outputs it publishes
//! come back to it and are acknowledged untouched (it must see every
//! message on its prefix to dead-letter unknown event types). The loop is
//! run twice: reading only its inputs (the bus's bare limit) and reading
//! its prefix as a room does ("with echoes"), so the table separates what
//! the subject layout costs from what the runtime's own code costs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, kv, object_store, stream};
use choco_factory::cocoa_butter::EventEnvelope;
use choco_factory::cocoa_butter::nats_server::{self, ManagedNats};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

type Error = Box<dyn std::error::Error + Send + Sync>;

// The rooms and their inputs, shared with the soak test.
#[path = "../tests/common/workload.rs"]
mod workload;
use workload::{ROOMS, RoomCase, median};

// CPU times, and free ports (the tests'), shared with the archive bench.
#[path = "common/measure.rs"]
mod measure;
use measure::{process_cpu_s, thread_cpu_s};
#[path = "../tests/common/ports.rs"]
mod ports;
use ports::free_ports;

// The tests' three-node cluster (and the proxy it can route through), for
// `--cluster`; it takes `free_ports` from here.
#[path = "../tests/common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../tests/common/proxy.rs"]
#[allow(dead_code)]
mod proxy;

/// The servers the bench runs on: one, or a three-node cluster whose every
/// stream and bucket (the room's and the loop's) has three replicas.
enum Bus {
    Single(ManagedNats),
    Cluster(cluster::Cluster),
}

impl Bus {
    fn url(&self) -> String {
        match self {
            Bus::Single(nats) => nats.url(),
            Bus::Cluster(cluster) => cluster.urls(),
        }
    }

    /// CPU seconds of every server process so far.
    fn cpu_s(&self) -> Result<f64, Error> {
        let nodes: Vec<&ManagedNats> = match self {
            Bus::Single(nats) => vec![nats],
            Bus::Cluster(cluster) => cluster.nodes.iter().collect(),
        };
        nodes
            .iter()
            .map(|node| process_cpu_s(node.pid().ok_or("nats-server exited")?))
            .sum()
    }

    fn describe(&self) -> &'static str {
        match self {
            Bus::Single(_) => "one nats-server",
            Bus::Cluster(_) => "a three-node cluster, R3 streams and buckets",
        }
    }
}

/// Options after `--` (`scripts/bench.sh pipeline --only conch`).
#[derive(clap::Parser)]
struct Options {
    /// Saturation inputs per room and round.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Saturation rounds per room; each rate is their median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Inputs per room for the latency run.
    #[arg(long, default_value_t = 2_000)]
    latency_events: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench/pipeline.json"))]
    json: PathBuf,
    /// Measure one room (to profile it).
    #[arg(long)]
    only: Option<String>,
    /// Run on a three-node cluster with every stream and bucket R3
    /// (default JSON: target/bench/pipeline-cluster.json).
    #[arg(long)]
    cluster: bool,
    /// Passed by `cargo bench`. Without it (`cargo test --all-targets`) one
    /// small smoke pass checks that the bench still works, writing no
    /// figures anyone would quote.
    #[arg(long, hide = true)]
    bench: bool,
    /// What `cargo test <filter> -- --nocapture` passes to every test
    /// binary; a bench has no tests to filter, so it ignores them.
    #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
    _test_harness_args: Vec<String>,
}

fn options() -> Options {
    let mut options = <Options as clap::Parser>::parse();
    if !options.bench {
        options.events = 50;
        options.rounds = 1;
        options.latency_events = 20;
        options.json = std::env::temp_dir().join("choco-pipeline-smoke.json");
    }
    options.rounds = options.rounds.max(1);
    if options.cluster && options.bench && options.json.ends_with("pipeline.json") {
        options.json.set_file_name("pipeline-cluster.json");
    }
    options
}

fn main() -> Result<(), Error> {
    // reqwest's rustls (enabled for the archive's S3 client) takes the
    // process's provider: ring, as the binary.
    choco_factory::cocoa_butter::tls::install_default_provider();
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

#[derive(Debug, serde::Serialize)]
struct RoomResult {
    room: &'static str,
    events: usize,
    outputs_per_event: f64,
    limit_events_per_s: f64,
    room_events_per_s: f64,
    ratio: f64,
    /// The bare loop when it also receives and acks its own outputs, as a
    /// room does (its consumer reads its whole prefix).
    limit_with_echoes_events_per_s: f64,
    ratio_with_echoes: f64,
    offered_rate: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_p999_ms: f64,
    /// CPU time (user + system) per input at saturation, medians of the
    /// rounds: the binary's, the bare loop's threads', and the
    /// nats-server's during each.
    room_cpu_us_per_event: f64,
    limit_cpu_us_per_event: f64,
    cpu_ratio: f64,
    /// The same at the fixed offered rate of the latency run (half the
    /// room's saturation rate), the loop fed at that rate too.
    room_cpu_us_per_event_paced: f64,
    limit_cpu_us_per_event_paced: f64,
    cpu_ratio_paced: f64,
    server_cpu_us_per_event_room: f64,
    server_cpu_us_per_event_limit: f64,
    work_per_event: BTreeMap<String, f64>,
}

async fn run(options: Options) -> Result<(), Error> {
    let data = tempfile::tempdir()?;
    let bus = if options.cluster {
        Bus::Cluster(cluster::Cluster::start_as_deployed().await)
    } else {
        let binary = nats_server::find_binary()?;
        Bus::Single(ManagedNats::start(binary, data.path(), 0).await?)
    };
    let client = connect(&bus.url()).await?;
    let js = jetstream::new(client.clone());

    let replicas = if options.cluster { 3 } else { 1 };
    let mut factory = Factory::start(&bus.url(), replicas).await?;
    let ready_ms = factory.ready_after.as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = factory.rss_kib("VmRSS")?;
    eprintln!(
        "four rooms ready {ready_ms:.0} ms after start; idle resident set {:.1} MiB",
        idle_rss as f64 / 1024.0
    );

    let mut results = Vec::new();
    for case in ROOMS {
        if options
            .only
            .as_deref()
            .is_some_and(|only| only != case.name)
        {
            continue;
        }
        eprintln!("== {}", case.name);
        let result = bench_room(&js, &bus, &factory, case, &options).await?;
        eprintln!(
            "{}: limit {:.0}/s, room {:.0}/s (ratio {:.2}); CPU {:.0} µs/event room, {:.0} \
             loop (ratio {:.2}); p50 {:.2} ms, p99 {:.2} ms at {:.0}/s",
            result.room,
            result.limit_events_per_s,
            result.room_events_per_s,
            result.ratio,
            result.room_cpu_us_per_event,
            result.limit_cpu_us_per_event,
            result.cpu_ratio,
            result.latency_p50_ms,
            result.latency_p99_ms,
            result.offered_rate
        );
        results.push(result);
    }
    let peak_rss = factory.rss_kib("VmHWM")?;
    factory.stop().await;

    let machine = machine();
    println!();
    println!(
        "| room | limit events/s | limit with echoes | room events/s | room/limit | room/limit with echoes | p50 ms | p99 ms | p99.9 ms | at events/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            r.room,
            r.limit_events_per_s,
            r.limit_with_echoes_events_per_s,
            r.room_events_per_s,
            r.ratio,
            r.ratio_with_echoes,
            r.latency_p50_ms,
            r.latency_p99_ms,
            r.latency_p999_ms,
            r.offered_rate
        );
    }
    println!();
    println!(
        "| room | CPU µs/event, room | CPU µs/event, loop | room/loop | at half saturation: room | loop | room/loop | nats-server µs/event with the room | with the loop |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} |",
            r.room,
            r.room_cpu_us_per_event,
            r.limit_cpu_us_per_event,
            r.cpu_ratio,
            r.room_cpu_us_per_event_paced,
            r.limit_cpu_us_per_event_paced,
            r.cpu_ratio_paced,
            r.server_cpu_us_per_event_room,
            r.server_cpu_us_per_event_limit
        );
    }
    println!();
    println!(
        "binary, four rooms on {}: ready in {ready_ms:.0} ms; resident set idle {:.1} MiB, peak {:.1} MiB; {machine}",
        bus.describe(),
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );

    let report = json!({
        "machine": machine,
        "bus": bus.describe(),
        "git_sha": option_env!("BUILD_GIT_SHA"),
        "events_per_room": options.events,
        "rounds": options.rounds,
        "latency_events_per_room": options.latency_events,
        "ready_ms": ready_ms,
        "idle_rss_mib": idle_rss as f64 / 1024.0,
        "peak_rss_mib": peak_rss as f64 / 1024.0,
        "rooms": results,
    });
    if let Some(dir) = options.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&options.json, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("written to {}", options.json.display());
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} cores ({model})")
}

async fn bench_room(
    js: &jetstream::Context,
    bus: &Bus,
    factory: &Factory,
    case: &RoomCase,
    options: &Options,
) -> Result<RoomResult, Error> {
    let room_pid = factory.child.id().ok_or("the binary exited")?;
    let url = bus.url();
    let stream_name = format!("choco:events:{}", case.domain);
    let subject = format!("choco.events.{}.{}", case.domain, case.action);
    let durable = format!("choco-{}", case.name);

    // 1. and 2., in rounds: the room at saturation (its work counted by
    // its own metrics in the first round), then the bare loop doing that
    // work, without and with echoes. Each rate is the median of the
    // rounds, so a burst of load from elsewhere on the machine moves one
    // round, not the figure.
    let mut work = Vec::new();
    let mut room_run = None;
    let (mut room_rates, mut limit_rates, mut echo_rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut room_cpu, mut limit_cpu) = (Vec::new(), Vec::new());
    let (mut server_cpu_room, mut server_cpu_limit) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        let before = factory.metrics(case.name).await?;
        let cpu_before = (process_cpu_s(room_pid)?, bus.cpu_s()?);
        let run = saturate(
            js,
            &stream_name,
            &subject,
            &durable,
            case,
            &format!("sat{round}"),
            options.events,
        )
        .await?;
        let cpu_after = (process_cpu_s(room_pid)?, bus.cpu_s()?);
        let per_event = |cpu: f64| cpu * 1e6 / options.events as f64;
        room_cpu.push(per_event(cpu_after.0 - cpu_before.0));
        server_cpu_room.push(per_event(cpu_after.1 - cpu_before.1));
        let after = factory.metrics(case.name).await?;
        if round == 0 {
            if std::env::var_os("BENCH_KEEP_METRICS").is_some() {
                let addr = factory.metrics.get(case.name).ok_or("unknown room")?;
                let text = reqwest::get(format!("http://{addr}/metrics"))
                    .await?
                    .text()
                    .await?;
                eprintln!("{text}");
            }
            work = work_per_event(&before, &after, options.events);
        }
        room_rates.push(run.events_per_s);
        let (rate, _) = limit_run(
            js,
            case,
            &work,
            &run,
            Feed {
                events: options.events,
                echoes: false,
                paced: None,
            },
            &url,
        )
        .await?;
        limit_rates.push(rate);
        // The loop with echoes does the room's NATS work exactly (the room
        // also reads and acks its own outputs): its CPU is the baseline,
        // and the servers' during it the comparable figure.
        let server_before = bus.cpu_s()?;
        let (rate, loop_cpu) = limit_run(
            js,
            case,
            &work,
            &run,
            Feed {
                events: options.events,
                echoes: true,
                paced: None,
            },
            &url,
        )
        .await?;
        server_cpu_limit.push(per_event(bus.cpu_s()? - server_before));
        echo_rates.push(rate);
        limit_cpu.push(per_event(loop_cpu));
        eprintln!(
            "  round {round}: room {:.0}/s, limit {:.0}/s, limit with echoes {:.0}/s",
            room_rates[round], limit_rates[round], echo_rates[round]
        );
        room_run.get_or_insert(run);
    }
    let room_run = room_run.ok_or("no rounds")?;
    let outputs_per_event = room_run.outputs as f64 / options.events as f64;
    let (room_rate, limit, limit_with_echoes) = (
        median(&room_rates),
        median(&limit_rates),
        median(&echo_rates),
    );

    // 3. Latency at half the room's saturation rate, and the CPU per event
    // there, of the room and of the loop (with echoes) fed at that rate.
    let rate = room_rate / 2.0;
    let paced_cpu_before = process_cpu_s(room_pid)?;
    let latencies = paced(
        js,
        &stream_name,
        &subject,
        &durable,
        case,
        rate,
        options.latency_events,
    )
    .await?;
    let per_latency_event = |cpu: f64| cpu * 1e6 / options.latency_events as f64;
    let room_cpu_paced = per_latency_event(process_cpu_s(room_pid)? - paced_cpu_before);
    let feed = Feed {
        events: options.latency_events,
        echoes: true,
        paced: Some(rate),
    };
    let (_, loop_cpu_paced) = limit_run(js, case, &work, &room_run, feed, &url).await?;
    let limit_cpu_paced = per_latency_event(loop_cpu_paced);

    let (room_cpu, limit_cpu) = (median(&room_cpu), median(&limit_cpu));
    Ok(RoomResult {
        room_cpu_us_per_event: room_cpu,
        limit_cpu_us_per_event: limit_cpu,
        cpu_ratio: room_cpu / limit_cpu,
        room_cpu_us_per_event_paced: room_cpu_paced,
        limit_cpu_us_per_event_paced: limit_cpu_paced,
        cpu_ratio_paced: room_cpu_paced / limit_cpu_paced,
        server_cpu_us_per_event_room: median(&server_cpu_room),
        server_cpu_us_per_event_limit: median(&server_cpu_limit),
        room: case.name,
        events: options.events,
        outputs_per_event,
        limit_events_per_s: limit,
        room_events_per_s: room_rate,
        ratio: room_rate / limit,
        limit_with_echoes_events_per_s: limit_with_echoes,
        ratio_with_echoes: room_rate / limit_with_echoes,
        offered_rate: rate,
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: percentile(&latencies, 0.99),
        latency_p999_ms: percentile(&latencies, 0.999),
        work_per_event: work
            .iter()
            .map(|(op, count)| (op.label(), *count))
            .collect(),
    })
}

fn percentile(sorted_ms: &[f64], q: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted_ms.len() as f64 - 1.0) * q).round() as usize;
    sorted_ms[index.min(sorted_ms.len() - 1)]
}

fn input(case: &RoomCase, phase: &str, i: usize) -> EventEnvelope {
    case.input(
        &format!("{phase}-doc-{i}"),
        format!("bench-{phase}-{i}"),
        "bench",
    )
}

/// Publishes `envelopes` at `rate` per second (acks awaited out of order).
async fn publish_paced(
    js: &jetstream::Context,
    subject: &str,
    envelopes: Vec<EventEnvelope>,
    rate: f64,
) -> Result<(), Error> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    // The acks are awaited at the end: each resolves on its own reply, so
    // none holds the pace back.
    let mut acks = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        ticker.tick().await;
        let message = jetstream::message::PublishMessage::build()
            .payload(envelope.encode().into())
            .message_id(&envelope.event_id);
        acks.push(std::future::IntoFuture::into_future(
            js.send_publish(subject.to_string(), message).await?,
        ));
    }
    futures::future::try_join_all(acks).await?;
    Ok(())
}

/// Publishes `count` envelopes concurrently (a window of acks in flight).
async fn publish_all(
    js: &jetstream::Context,
    subject: &str,
    envelopes: Vec<EventEnvelope>,
) -> Result<(), Error> {
    futures::stream::iter(envelopes)
        .map(|envelope| {
            let js = js.clone();
            let subject = subject.to_string();
            async move {
                let message = jetstream::message::PublishMessage::build()
                    .payload(envelope.encode().into())
                    .message_id(&envelope.event_id);
                js.send_publish(subject, message).await?.await?;
                Ok::<_, Error>(())
            }
        })
        .buffer_unordered(256)
        .try_collect::<()>()
        .await
}

/// Waits until a durable consumer has nothing pending or unacknowledged.
async fn drained(js: &jetstream::Context, stream: &str, durable: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut consumer: jetstream::consumer::Consumer<pull::Config> =
            js.get_stream(stream).await?.get_consumer(durable).await?;
        let info = consumer.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{durable} did not drain").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stream's messages from `start` on: (subject, stored at (ns),
/// correlation id, size).
async fn read_from(
    js: &jetstream::Context,
    stream: &str,
    start: u64,
) -> Result<Vec<(String, i128, String, usize)>, Error> {
    let stream = js.get_stream(stream).await?;
    let last = stream.get_info().await?.state.last_sequence;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message?;
        let info = message.info()?;
        let sequence = info.stream_sequence;
        let stored = info.published.unix_timestamp_nanos();
        let correlation = serde_json::from_slice::<Value>(&message.payload)
            .ok()
            .and_then(|v| v["correlation_id"].as_str().map(str::to_string))
            .unwrap_or_default();
        out.push((
            message.subject.to_string(),
            stored,
            correlation,
            message.payload.len(),
        ));
        if sequence >= last {
            break;
        }
    }
    Ok(out)
}

/// The sequence the next message stored in `stream` will get.
async fn next_sequence(js: &jetstream::Context, stream: &str) -> Result<u64, Error> {
    Ok(js
        .get_stream(stream)
        .await?
        .get_info()
        .await?
        .state
        .last_sequence
        + 1)
}

/// `events` over the span from the first input's stream time to the last
/// output's: how both the room and the bare loop are timed.
fn events_per_s(
    messages: &[(String, i128, String, usize)],
    events: usize,
    is_input: impl Fn(&str) -> bool,
) -> f64 {
    let first = messages
        .iter()
        .filter(|m| is_input(&m.0))
        .map(|m| m.1)
        .min()
        .unwrap_or_default();
    let last = messages
        .iter()
        .filter(|m| !is_input(&m.0))
        .map(|m| m.1)
        .max()
        .unwrap_or(first);
    events as f64 / ((last - first) as f64 / 1e9)
}

struct SaturationRun {
    events_per_s: f64,
    outputs: usize,
    mean_output_bytes: usize,
}

async fn saturate(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    durable: &str,
    case: &RoomCase,
    phase: &str,
    events: usize,
) -> Result<SaturationRun, Error> {
    let start = next_sequence(js, stream).await?;
    let envelopes = (0..events).map(|i| input(case, phase, i)).collect();
    publish_all(js, subject, envelopes).await?;
    drained(js, stream, durable).await?;
    let messages = read_from(js, stream, start).await?;
    let (inputs, outputs): (Vec<_>, Vec<_>) =
        messages.iter().partition(|(s, ..)| s.as_str() == subject);
    if outputs.len() != inputs.len() * case.outputs {
        return Err(format!(
            "{}: {} outputs for {} inputs, {} expected; are some dead-lettered? (choco-factory dlq list --room {})",
            case.name,
            outputs.len(),
            inputs.len(),
            inputs.len() * case.outputs,
            case.name
        )
        .into());
    }
    let mean_output_bytes = outputs.iter().map(|m| m.3).sum::<usize>() / outputs.len().max(1);
    Ok(SaturationRun {
        events_per_s: events_per_s(&messages, inputs.len(), |s| s == subject),
        outputs: outputs.len(),
        mean_output_bytes,
    })
}

/// Inputs at `rate` per second; per event, from the input's stream time to
/// its last output's.
async fn paced(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    durable: &str,
    case: &RoomCase,
    rate: f64,
    events: usize,
) -> Result<Vec<f64>, Error> {
    let start = next_sequence(js, stream).await?;
    // Latency is read in stream time (input stored → last output stored),
    // so making the envelopes before pacing them does not move it.
    let envelopes = (0..events).map(|i| input(case, "lat", i)).collect();
    publish_paced(js, subject, envelopes, rate).await?;
    drained(js, stream, durable).await?;
    let messages = read_from(js, stream, start).await?;
    let mut input_at = BTreeMap::new();
    let mut done_at: BTreeMap<String, i128> = BTreeMap::new();
    for (s, at, correlation, _) in messages {
        if s == subject {
            input_at.insert(correlation, at);
        } else {
            let entry = done_at.entry(correlation).or_insert(at);
            *entry = (*entry).max(at);
        }
    }
    let mut latencies: Vec<f64> = input_at
        .iter()
        .filter_map(|(c, at)| done_at.get(c).map(|done| (done - at) as f64 / 1e6))
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// A store operation as the room's metrics name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Kv { bucket: String, operation: String },
    Object { bucket: String, operation: String },
    Publish,
}

impl Op {
    fn label(&self) -> String {
        match self {
            Op::Kv { bucket, operation } => format!("kv {bucket} {operation}"),
            Op::Object { bucket, operation } => format!("object {bucket} {operation}"),
            Op::Publish => "publish".into(),
        }
    }
}

type Counts = BTreeMap<Op, f64>;

/// Store operations and publishes per event, from two scrapes.
fn work_per_event(before: &Counts, after: &Counts, events: usize) -> Vec<(Op, f64)> {
    after
        .iter()
        .map(|(op, n)| {
            (
                op.clone(),
                (n - before.get(op).copied().unwrap_or(0.0)) / events as f64,
            )
        })
        .filter(|(_, per_event)| *per_event > 0.0)
        .collect()
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"'))
    })
}

fn parse_counts(text: &str) -> Counts {
    let mut counts = Counts::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let labels = labels.trim_end_matches('}');
        let op = match name {
            "choco_store_operation_duration_seconds_count" => {
                let bucket = label(labels, "bucket").unwrap_or_default().to_string();
                let operation = label(labels, "operation").unwrap_or_default().to_string();
                match label(labels, "store") {
                    Some("object") => Op::Object { bucket, operation },
                    _ => Op::Kv { bucket, operation },
                }
            }
            "choco_publish_messages_total" if label(labels, "outcome") == Some("ok") => Op::Publish,
            _ => continue,
        };
        *counts.entry(op).or_default() += value;
    }
    counts
}

/// The bare loop: the room's NATS work per event and nothing else.
/// The bare loop's rate. With `echoes`, its consumer filters on the whole
/// prefix, as a room's does, so its own outputs come back to it and are
/// acknowledged untouched, as a room does with its outputs.
/// How the bare loop is fed: how many inputs, whether it reads its own
/// outputs back (echoes), and at what rate (all at once when `None`).
#[derive(Clone, Copy)]
struct Feed {
    events: usize,
    echoes: bool,
    paced: Option<f64>,
}

async fn limit_run(
    js: &jetstream::Context,
    case: &RoomCase,
    work: &[(Op, f64)],
    room: &SaturationRun,
    feed: Feed,
    nats_url: &str,
) -> Result<(f64, f64), Error> {
    let Feed {
        events,
        echoes,
        paced,
    } = feed;
    let name = format!("bench_limit_{}", case.name);
    let stream_name = format!("bench:limit:{}", case.name);
    let subject_base = format!("bench.limit.{}", case.name);
    let input_subject = format!("{subject_base}.in");
    let _ = js.delete_stream(&stream_name).await;
    let room_stream = js
        .get_stream(format!("choco:events:{}", case.domain))
        .await?
        .get_info()
        .await?
        .config;
    js.create_stream(stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{subject_base}.>")],
        duplicate_window: room_stream.duplicate_window,
        storage: room_stream.storage,
        num_replicas: room_stream.num_replicas,
        ..Default::default()
    })
    .await?;
    let stream = js.get_stream(&stream_name).await?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: if echoes {
                format!("{subject_base}.>")
            } else {
                input_subject.clone()
            },
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;

    // Buckets like the room's, values of the room's mean sizes.
    let mut kv_stores = BTreeMap::new();
    let mut object_stores = BTreeMap::new();
    for (op, _) in work {
        match op {
            Op::Kv { bucket, .. } if !kv_stores.contains_key(bucket) => {
                let original = js
                    .get_stream(format!("KV_{bucket}"))
                    .await?
                    .get_info()
                    .await?;
                let value_bytes =
                    (original.state.bytes / original.state.messages.max(1)).max(16) as usize;
                let limit_bucket = format!("{name}_{}", kv_stores.len());
                let _ = js.delete_key_value(&limit_bucket).await;
                let store = js
                    .create_key_value(kv::Config {
                        bucket: limit_bucket,
                        history: original.config.max_messages_per_subject.max(1),
                        storage: original.config.storage,
                        num_replicas: original.config.num_replicas,
                        ..Default::default()
                    })
                    .await?;
                kv_stores.insert(bucket.clone(), (store, vec![b'v'; value_bytes]));
            }
            Op::Object { bucket, .. } if !object_stores.contains_key(bucket) => {
                let original = js
                    .get_stream(format!("OBJ_{bucket}"))
                    .await?
                    .get_info()
                    .await?;
                let puts = work
                    .iter()
                    .find(|(o, _)| matches!(o, Op::Object { bucket: b, operation } if b == bucket && operation == "put"))
                    .map_or(1.0, |(_, n)| *n * events as f64);
                let object_bytes = (original.state.bytes as f64 / puts.max(1.0)) as usize;
                let limit_bucket = format!("{name}_obj_{}", object_stores.len());
                let _ = js.delete_object_store(&limit_bucket).await;
                js.create_object_store(object_store::Config {
                    bucket: limit_bucket.clone(),
                    storage: original.config.storage,
                    num_replicas: original.config.num_replicas,
                    ..Default::default()
                })
                .await?;
                object_stores.insert(
                    bucket.clone(),
                    (limit_bucket, vec![b'o'; object_bytes.max(16)]),
                );
            }
            _ => {}
        }
    }
    let outputs_per_event = work
        .iter()
        .find(|(op, _)| *op == Op::Publish)
        .map_or(0.0, |(_, n)| *n);
    let output = Arc::new(vec![b'x'; room.mean_output_bytes.max(16)]);
    let work: Arc<Vec<(Op, f64)>> = Arc::new(work.to_vec());
    // The stores by name: the loop opens them on its own connection.
    let kv_names: BTreeMap<String, (String, Vec<u8>)> = kv_stores
        .iter()
        .map(|(bucket, (store, value))| (bucket.clone(), (store.name.clone(), value.clone())))
        .collect();
    let object_names: BTreeMap<String, (String, Vec<u8>)> = object_stores;

    // The room's pure work and the payloads to do it on, made before the
    // round so that only the work itself is in the loop's CPU time.
    let room_work = Arc::new(RoomWork::for_room(case.name)?);
    let payloads: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..events)
            .map(|i| serde_json::to_vec(&(case.payload)(&format!("limit-doc-{i}"))))
            .collect::<Result<_, _>>()?,
    );
    // The loop runs on a runtime of its own, with a connection of its own,
    // so the CPU time of that runtime's threads is the loop's alone: the
    // inputs are fed from this runtime, as they are for the room.
    let threads = Arc::new(std::sync::Mutex::new(Vec::<i32>::new()));
    let loop_runtime = {
        let threads = threads.clone();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                if let Ok(mut threads) = threads.lock() {
                    threads.push(nix::unistd::gettid().as_raw());
                }
            })
            .build()?
    };
    let consumed = loop_runtime.spawn({
        let (url, stream_name, name, subject_base) = (
            nats_url.to_string(),
            stream_name.clone(),
            name.clone(),
            subject_base.clone(),
        );
        async move {
            bare_loop(BareLoop {
                url,
                stream_name,
                durable: name,
                subject_base,
                events,
                echoes,
                outputs_per_event,
                output,
                work,
                kv_names,
                object_names,
                room_work,
                payloads,
            })
            .await
        }
    });
    let feeder = {
        let js = js.clone();
        let subject = input_subject.clone();
        let envelopes: Vec<_> = (0..events).map(|i| input(case, "limit", i)).collect();
        tokio::spawn(async move {
            match paced {
                Some(rate) => publish_paced(&js, &subject, envelopes, rate).await,
                None => publish_all(&js, &subject, envelopes).await,
            }
        })
    };
    let consumed = consumed.await;
    let loop_cpu: Result<f64, Error> = threads
        .lock()
        .map(|tids| {
            tids.iter()
                .map(|tid| thread_cpu_s(*tid).unwrap_or(0.0))
                .sum()
        })
        .map_err(|_| "thread list poisoned".into());
    // Before any early return: a runtime dropped inside this async context
    // would panic instead of returning the loop's error.
    loop_runtime.shutdown_background();
    consumed??;
    let loop_cpu = loop_cpu?;
    feeder.await??;
    drained(js, &stream_name, &name).await?;

    let messages = read_from(js, &stream_name, 1).await?;
    let rate = events_per_s(&messages, events, |s| s == input_subject);
    js.delete_stream(&stream_name).await?;
    Ok((rate, loop_cpu))
}

/// The room's own work on one input, done by the bare loop too, so that
/// the CPU ratio room/loop isolates what the runtime adds: the same pure
/// function the room's handler calls, on the same payload, from its bytes.
enum RoomWork {
    /// The slop scoring of the content, with the shipped rules.
    Winnower(Arc<choco_factory::rooms::winnower::slop::SlopRules>),
    /// The sync rules on a fresh record, and the record's encoding for the
    /// key-value write.
    Conch,
    /// Hydration (render, Markdown, sanitize) with the shipped templates
    /// and the room's default limits.
    Mould(Arc<choco_factory::rooms::mould::render::Renderer>),
    /// Tag and link extraction.
    Wrapper,
}

impl RoomWork {
    fn for_room(room: &str) -> Result<Self, Error> {
        use choco_factory::rooms::{mould::render, winnower::slop};
        Ok(match room {
            "winnower" => {
                let text = std::fs::read_to_string("config/slop-rules.toml")?;
                let file: slop::RulesFile = toml::from_str(&text)?;
                RoomWork::Winnower(Arc::new(slop::SlopRules::compile(file)?))
            }
            "conch" => RoomWork::Conch,
            "mould" => {
                let mut library = BTreeMap::new();
                for entry in std::fs::read_dir("config/templates")? {
                    let path = entry?.path();
                    let name = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or_default();
                    if let Some(slug) = name.strip_suffix(".md.j2") {
                        library.insert(slug.to_string(), std::fs::read_to_string(&path)?);
                    }
                }
                let limits = render::Limits {
                    fuel: 1_000_000,
                    recursion: 64,
                    max_output_bytes: 8 * 1024 * 1024,
                };
                RoomWork::Mould(Arc::new(render::Renderer::new(library, limits)?))
            }
            "wrapper" => RoomWork::Wrapper,
            other => return Err(format!("no pure work known for {other}").into()),
        })
    }

    /// The room's work on one input payload.
    fn run(&self, payload: &[u8]) -> Result<(), Error> {
        use choco_factory::rooms::conch::sync::{DocumentRecord, Policy, SyncRequest};
        use choco_factory::rooms::{mould::render::Format, wrapper::extract};
        let text = |value: &Value, key: &str| value[key].as_str().unwrap_or_default().to_string();
        match self {
            RoomWork::Winnower(rules) => {
                let value: Value = serde_json::from_slice(payload)?;
                std::hint::black_box(rules.score(&text(&value, "content"), true));
            }
            RoomWork::Conch => {
                let request: SyncRequest = serde_json::from_slice(payload)?;
                let mut record = DocumentRecord::default();
                let receipt = record.apply("cause", &request, Policy::LastWriterWins, 32);
                std::hint::black_box((receipt, serde_json::to_vec(&record)?));
            }
            RoomWork::Mould(renderer) => {
                let value: Value = serde_json::from_slice(payload)?;
                let rendered =
                    renderer.render(&text(&value, "source"), &value["data"], Format::Html)?;
                std::hint::black_box(rendered);
            }
            RoomWork::Wrapper => {
                let value: Value = serde_json::from_slice(payload)?;
                let found = extract::extract(
                    &text(&value, "content"),
                    &text(&value, "repo"),
                    &text(&value, "path"),
                );
                std::hint::black_box(found);
            }
        }
        Ok(())
    }
}

/// What the bare loop is given: names to open, and the room's work mix.
struct BareLoop {
    url: String,
    stream_name: String,
    durable: String,
    subject_base: String,
    events: usize,
    echoes: bool,
    outputs_per_event: f64,
    output: Arc<Vec<u8>>,
    work: Arc<Vec<(Op, f64)>>,
    kv_names: BTreeMap<String, (String, Vec<u8>)>,
    object_names: BTreeMap<String, (String, Vec<u8>)>,
    /// The room's pure work, and each input's payload bytes to do it on.
    room_work: Arc<RoomWork>,
    payloads: Arc<Vec<Vec<u8>>>,
}

/// The bus's limit: consume → the room's store work → publish → ack, with
/// the room's batch and in-flight bound, on a connection of its own.
async fn bare_loop(setup: BareLoop) -> Result<(), Error> {
    let client = connect(&setup.url).await?;
    let js = jetstream::new(client.clone());
    let mut kv_stores = KvStores::new();
    for (bucket, (name, value)) in &setup.kv_names {
        kv_stores.insert(
            bucket.clone(),
            (js.get_key_value(name).await?, value.clone()),
        );
    }
    let mut object_stores = ObjectStores::new();
    for (bucket, (name, bytes)) in &setup.object_names {
        object_stores.insert(
            bucket.clone(),
            (js.get_object_store(name).await?, bytes.clone()),
        );
    }
    let (kv_stores, object_stores) = (Arc::new(kv_stores), Arc::new(object_stores));
    let consumer: jetstream::consumer::Consumer<pull::Config> = js
        .get_stream(&setup.stream_name)
        .await?
        .get_consumer(&setup.durable)
        .await?;
    // Pulled the way the rooms pull: the runtime's own puller (async-nats'
    // pull stream can stall for tens of seconds, see nats/pull.rs), with the
    // rooms' batch, expiry and heartbeat.
    let defaults = choco_factory::cocoa_butter::config::ConsumerConfig::default();
    let mut messages = choco_factory::cocoa_butter::nats::pull::Puller::new(
        &js,
        &consumer,
        defaults.batch,
        defaults.pull_expiry(None),
        defaults.heartbeat,
        None,
    )
    .await?
    // The batch follows the backlog as the rooms' does.
    .with_max_batch(defaults.max_in_flight / 2);
    let in_flight = Arc::new(Semaphore::new(defaults.max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let mut handled = 0;
    let out_subject = format!("{}.out", setup.subject_base);
    let expected_echoes = if setup.echoes {
        (0..setup.events)
            .map(|i| share(setup.outputs_per_event, i))
            .sum()
    } else {
        0
    };
    let mut echoed = 0;
    while handled < setup.events || echoed < expected_echoes {
        let message = messages.next().await?;
        if message.subject.as_str() == out_subject {
            // Acked in place, as the rooms do: a task per echo would cost a
            // spawn and a wake-up for one publish.
            echoed += 1;
            message.ack().await?;
            continue;
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let (js, work, kv_stores, object_stores, output, room_work, payloads) = (
            js.clone(),
            setup.work.clone(),
            kv_stores.clone(),
            object_stores.clone(),
            setup.output.clone(),
            setup.room_work.clone(),
            setup.payloads.clone(),
        );
        let index = handled;
        let out_subject = out_subject.clone();
        let outputs_per_event = setup.outputs_per_event;
        tasks.spawn(async move {
            let _permit = permit;
            let key = format!("doc-{index}");
            if let Some(payload) = payloads.get(index) {
                room_work.run(payload)?;
            }
            replay_store_work(&work, &kv_stores, &object_stores, &key, index).await?;
            let publishes = share(outputs_per_event, index);
            let mut acks = Vec::with_capacity(publishes);
            for n in 0..publishes {
                let message = jetstream::message::PublishMessage::build()
                    .payload(output.as_slice().to_vec().into())
                    .message_id(format!("limit-{index}-{n}"));
                acks.push(js.send_publish(out_subject.clone(), message).await?);
            }
            for ack in acks {
                ack.await?;
            }
            message.ack().await?;
            Ok::<_, Error>(())
        });
        handled += 1;
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    // Acks are sent without waiting: out before this runtime goes away.
    client.flush().await?;
    Ok(())
}

/// Connects to every server of a comma-separated list (a `&str` alone
/// would be taken as one address).
async fn connect(urls: &str) -> Result<async_nats::Client, Error> {
    let servers = urls
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<async_nats::ServerAddr>, _>>()?;
    Ok(async_nats::connect(servers).await?)
}

type KvStores = BTreeMap<String, (kv::Store, Vec<u8>)>;
type ObjectStores = BTreeMap<String, (object_store::ObjectStore, Vec<u8>)>;

/// Event `index`'s share of an operation done `n` times per event on
/// average, so that fractional counts come out exact over the run.
fn share(n: f64, index: usize) -> usize {
    ((n * (index + 1) as f64).floor() - (n * index as f64).floor()) as usize
}

/// The key-value and object-store calls of one event, in the room's mix.
async fn replay_store_work(
    work: &[(Op, f64)],
    kv_stores: &KvStores,
    object_stores: &ObjectStores,
    key: &str,
    index: usize,
) -> Result<(), Error> {
    let mut revision = None;
    for (op, n) in work.iter() {
        for _ in 0..share(*n, index) {
            match op {
                Op::Kv { bucket, operation } => {
                    let Some((store, value)) = kv_stores.get(bucket) else {
                        continue;
                    };
                    match operation.as_str() {
                        "entry" | "get" => {
                            revision = store.entry(key).await?.map(|e| e.revision);
                        }
                        "create" => {
                            revision = Some(store.create(&key, value.clone().into()).await?);
                        }
                        "update" => {
                            let r = match revision {
                                Some(r) => store.update(&key, value.clone().into(), r).await?,
                                None => store.put(&key, value.clone().into()).await?,
                            };
                            revision = Some(r);
                        }
                        "keys" => {
                            let _: Vec<String> = store.keys().await?.try_collect().await?;
                        }
                        _ => {
                            revision = Some(store.put(&key, value.clone().into()).await?);
                        }
                    }
                }
                Op::Object { bucket, operation } => {
                    let Some((store, bytes)) = object_stores.get(bucket) else {
                        continue;
                    };
                    match operation.as_str() {
                        "put" => {
                            store.put(key, &mut bytes.as_slice()).await?;
                        }
                        "get" => {
                            if let Ok(mut object) = store.get(&key).await {
                                let mut sink = Vec::new();
                                tokio::io::AsyncReadExt::read_to_end(&mut object, &mut sink)
                                    .await?;
                            }
                        }
                        _ => {
                            let _ = store.info(&key).await;
                        }
                    }
                }
                Op::Publish => {}
            }
        }
    }
    Ok(())
}

/// The release binary with all four rooms, on free ports.
struct Factory {
    child: Child,
    metrics: BTreeMap<&'static str, SocketAddr>,
    ready_after: Duration,
}

impl Factory {
    async fn start(nats_url: &str, replicas: usize) -> Result<Factory, Error> {
        // BENCH_FACTORY_WRAPPER runs the binary under a profiler, e.g.
        // "valgrind --tool=callgrind --callgrind-out-file=target/cg.out"
        // (with few events: the binary runs some 50 times slower).
        let wrapper = std::env::var("BENCH_FACTORY_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(env!("CARGO_BIN_EXE_choco-factory"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_choco-factory")),
        };
        command
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
            .args(["serve"])
            .env("CHOCO_NATS__URL", nats_url)
            .env("CHOCO_STREAMS__REPLICAS", replicas.to_string())
            .env("CHOCO_LOG__FORMAT", "json")
            // The shipped log filter, not a quieter one: at `info` each
            // delivery opens its message span, whose fields the JSON layer
            // serializes; that is part of what a room costs as shipped
            // (under `warn` the span is off: a callgrind count of the
            // winnower was 9 % lower, 18 % before the span took all its
            // fields at once).
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        // BENCH_FACTORY_LOG=path keeps the binary's log lines (a stall in a
        // run shows there as a rebind).
        match std::env::var_os("BENCH_FACTORY_LOG") {
            Some(path) => command.stdout(std::fs::File::create(path)?),
            None => command.stdout(std::process::Stdio::null()),
        };
        let mut http = BTreeMap::new();
        let mut metrics = BTreeMap::new();
        let mut ports = free_ports::<{ ROOMS.len() * 3 }>()?.into_iter();
        for case in ROOMS {
            let upper = case.name.to_uppercase();
            for (key, map) in [
                ("HTTP_PORT", Some(&mut http)),
                ("GRPC_PORT", None),
                ("METRICS_PORT", Some(&mut metrics)),
            ] {
                let port = ports.next().ok_or("a free port for each listener")?;
                command.env(format!("CHOCO_ROOMS__{upper}__{key}"), port.to_string());
                if let Some(map) = map {
                    map.insert(case.name, SocketAddr::from(([127, 0, 0, 1], port)));
                }
            }
        }
        let started = Instant::now();
        let mut child = command.spawn()?;
        let client = reqwest::Client::new();
        for addr in http.values() {
            loop {
                // A binary that refused to start (its reason is on its
                // stderr) is an error now, not after the wait below.
                if let Some(status) = child.try_wait()? {
                    return Err(format!("the binary exited before it was ready: {status}").into());
                }
                let ready = client
                    .get(format!("http://{addr}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if ready {
                    break;
                }
                if started.elapsed() > Duration::from_secs(120) {
                    return Err("the rooms did not become ready".into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(Factory {
            child,
            metrics,
            ready_after: started.elapsed(),
        })
    }

    async fn metrics(&self, room: &str) -> Result<Counts, Error> {
        let addr = self.metrics.get(room).ok_or("unknown room")?;
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await?
            .text()
            .await?;
        Ok(parse_counts(&text))
    }

    fn rss_kib(&self, field: &str) -> Result<u64, Error> {
        let pid = self.child.id().ok_or("exited")?;
        Ok(workload::resident_kib(pid, field)?)
    }

    async fn stop(&mut self) {
        measure::stop(&mut self.child).await;
    }
}
