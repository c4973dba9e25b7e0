//! Reproducer for issue #18's stall: a bare async-nats pull loop that
//! delivers nothing for tens of seconds while the same client publishes.
//!
//! One nats-server (JetStream, file store in a temp dir, started here), one
//! stream `stall.>` with inputs on `stall.in` and outputs on `stall.out`,
//! one durable pull consumer. Per round: N inputs are published (preloaded,
//! or concurrently by the same client as the pipeline bench's bare loop
//! does), and the loop, for each input, publishes one output (JetStream
//! publish with `Nats-Msg-Id`, ack awaited or left to async-nats' acker)
//! and acks the input, at most `--in-flight` at once.
//!
//! It logs deliveries per second, and every gap of at least `--gap` seconds
//! with what the server and the wire showed during it: the consumer's
//! `num_pending` / `num_ack_pending` / `num_waiting`, and, from a second
//! connection that receives a copy of every pull request
//! (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`) and of everything the
//! server sends to the pull inbox, how many messages the server still owed
//! the client when it went quiet (requested − delivered − released by
//! 408/409 statuses).
//!
//! Modes (`--mode`):
//! - `stream`: `consumer.stream().max_messages_per_batch(b).expires(e)
//!   [.heartbeat(h)].messages()`, what the runtime (heartbeat 5 s, expiry
//!   30 s) and the bench's bare loop (no heartbeat, expiry 30 s) use. A
//!   stalled round recovers through the stream's own failsafe (a pull after
//!   expires + 5 s without one) or, with `--heartbeat`, ends with a
//!   missed-heartbeat error after 2 × heartbeat, on which the loop builds a
//!   new stream, as the runtime's supervisor does.
//! - `fetch`: one-shot `consumer.batch()` pulls (each its own inbox, ending
//!   at `b` messages or the server's 408), `--fetch-depth` in flight and read
//!   in order. Not a fix: when the input runs dry, the pull being read can
//!   wait for its expiry while the last messages went to a later pull.
//! - `own`: the fix, [`Puller`]: one inbox, pull requests sent and counted
//!   by the task that reads the inbox, so a pull's messages can never be
//!   read before the pull is counted; a pull whose server answer is unknown
//!   is counted as finished (the loop may ask for too much, never too
//!   little); silence of 2 × heartbeat re-pulls in place.
//!
//! The cause, in short (async-nats 0.51.0, `jetstream/consumer/pull.rs`):
//! `Stream` sends its pulls from a background task, which reports each one
//! over a channel only after `publish_with_reply` has queued it; `poll_next`
//! adds the batch to `pending_messages` when it reads that report, and
//! subtracts one per message with `saturating_sub`. When the task is held
//! between queuing and reporting (a preempted worker thread on a busy
//! machine) and the reader meanwhile drains the old pull's messages and the
//! new pull's, the decrements below zero are lost and the count ends a
//! whole batch above the truth: more than half a batch "still owed", so no
//! further pull, while the server holds none (`num_waiting` 0, no
//! heartbeats). Nothing is delivered until the failsafe (expires + 5 s =
//! 35 s) or the missed-heartbeat error (2 × 5 s). `scripts/pull-stall-
//! instrumented.sh` builds this program against a copy of async-nats that
//! counts the lost decrements and can hold the task at that point
//! (`--inject-every N --inject-us U`); `--own-inject-every/--own-inject-us`
//! hold the [`Puller`] at the same point, which it survives.
//!
//! Run (release; NATS_SERVER_BIN or nats-server on PATH):
//!
//! ```text
//! cargo build --release --example pull_stall
//! target/release/examples/pull_stall --rounds 20 --mode stream --batch 10
//! target/release/examples/pull_stall --rounds 20 --mode stream --heartbeat 5
//! target/release/examples/pull_stall --rounds 20 --mode own --heartbeat 1 \
//!     --own-inject-every 100 --own-inject-us 2000
//! ```
//!
//! `--hogs N` adds N busy-looping processes for the run (a shared machine),
//! `--feed preload` publishes all inputs before consuming, `--acks detached`
//! drops the publish-ack futures (async-nats' acker then holds up to
//! `--max-ack-inflight` of them), `--echoes` makes the consumer read
//! `stall.>` so that outputs come back and are acked untouched.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull, stream};
use async_nats::{Client, StatusCode, Subject};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

type Error = Box<dyn std::error::Error + Send + Sync>;

const STREAM: &str = "stall";
const DURABLE: &str = "loop";
const IN: &str = "stall.in";
const OUT: &str = "stall.out";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Stream,
    Fetch,
    Own,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Acks {
    /// Each output's publish ack is awaited before the input is acked.
    Await,
    /// The publish-ack future is dropped (async-nats' acker awaits it).
    Detached,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Feed {
    /// The same client publishes the inputs while the loop consumes.
    Concurrent,
    /// All inputs are stored before the loop starts.
    Preload,
}

#[derive(clap::Parser, Debug, Clone)]
struct Options {
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Pull expiry in seconds (the bare loop: 30, async-nats' default; the
    /// runtime: 6 × heartbeat = 30).
    #[arg(long, default_value_t = 30.0)]
    expires: f64,
    /// Idle heartbeat in seconds; 0 = none (the bare loop), the runtime: 5.
    #[arg(long, default_value_t = 0.0)]
    heartbeat: f64,
    #[arg(long, value_enum, default_value_t = Acks::Await)]
    acks: Acks,
    #[arg(long, value_enum, default_value_t = Feed::Concurrent)]
    feed: Feed,
    /// Messages held at once (the runtime's and the bare loop's bound).
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Outputs per input.
    #[arg(long, default_value_t = 1)]
    outputs: usize,
    /// The consumer reads the whole prefix: outputs come back and are acked.
    #[arg(long)]
    echoes: bool,
    /// async-nats' bound on publish acks in flight (its default is 5000).
    #[arg(long, default_value_t = 5000)]
    max_ack_inflight: usize,
    /// Concurrent `batch()` pulls in `fetch` mode.
    #[arg(long, default_value_t = 2)]
    fetch_depth: usize,
    /// Busy-looping processes alongside (a shared machine).
    #[arg(long, default_value_t = 0)]
    hogs: usize,
    /// A gap of at least this many seconds is reported.
    #[arg(long, default_value_t = 2.0)]
    gap: f64,
    /// Give up on a round after this many seconds.
    #[arg(long, default_value_t = 50.0)]
    round_timeout: f64,
    /// Tokio worker threads (the bench: the machine's cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Every Nth pull request of `own` mode, the reading task sleeps this
    /// many µs (`--inject-us`) between sending the pull and counting it: a
    /// worker thread preempted at the point where async-nats' `Stream` loses
    /// its count (see the instrumented copy described in README.md).
    #[arg(long, default_value_t = 0)]
    own_inject_every: u64,
    #[arg(long, default_value_t = 0)]
    own_inject_us: u64,
    /// Print the per-second delivery counts of every round.
    #[arg(long)]
    per_second: bool,
}

fn main() -> Result<(), Error> {
    let options = <Options as clap::Parser>::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = options.workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build()?.block_on(run(options))
}

// ---------------------------------------------------------------- server

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn nats_server_binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| "nats-server not found: set NATS_SERVER_BIN".into())
}

impl Server {
    async fn start() -> Result<Server, Error> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let child = Command::new(nats_server_binary()?)
            .args(["--jetstream", "--store_dir"])
            .arg(dir.path().join("store"))
            .args(["--addr", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.log"))?)
            .kill_on_drop(true)
            .spawn()?;
        let server = Server {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("nats-server did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name in parentheses; utime and stime are the
    // 14th and 15th fields of the whole line.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // rest starts at field 3 (state); utime = field 14 → index 11.
    let hz = 100.0; // CLK_TCK on Linux
    (ticks(11) + ticks(12)) / hz
}

fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id())
}

// ------------------------------------------------------------ wire watch

/// What a second connection sees of the loop's pulls: every pull request
/// (a copy of the MSG.NEXT publish) and everything sent to the pull inbox.
#[derive(Default)]
struct Wire {
    requests: u64,
    requested: u64,
    delivered: u64,
    /// Messages released by 408/409 statuses (their Nats-Pending-Messages).
    released: u64,
    heartbeats: u64,
    statuses: Vec<String>,
    last_request: Option<Instant>,
    last_inbox_message: Option<Instant>,
    request_times: Vec<Instant>,
}

impl Wire {
    /// What the server still owes the client: requested, not delivered,
    /// not released by a status.
    fn owed(&self) -> i64 {
        self.requested as i64 - self.delivered as i64 - self.released as i64
    }
}

/// Subscribes before the round starts: a copy of every pull request, and
/// every pull inbox (`_INBOX.<id>`: two tokens; publish-ack and API replies
/// go to the three-token `_INBOX.<id>.<token>` of the client's request
/// multiplexer, so they are not copied).
async fn watch_wire(
    monitor: Client,
    wire: Arc<Mutex<Wire>>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let mut requests = monitor
        .subscribe(format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}"))
        .await?;
    let mut inboxes = monitor.subscribe("_INBOX.*").await?;
    monitor.flush().await?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                // A pull is counted before what was delivered for it when
                // both are waiting.
                biased;
                Some(request) = requests.next() => {
                    let batch = serde_json::from_slice::<serde_json::Value>(&request.payload)
                        .ok()
                        .and_then(|v| v["batch"].as_u64())
                        .unwrap_or(0);
                    let mut wire = wire.lock().unwrap();
                    wire.requests += 1;
                    wire.requested += batch;
                    wire.last_request = Some(Instant::now());
                    wire.request_times.push(Instant::now());
                }
                Some(message) = inboxes.next() => {
                    let mut wire = wire.lock().unwrap();
                    wire.last_inbox_message = Some(Instant::now());
                    match message.status {
                        None | Some(StatusCode::OK) => wire.delivered += 1,
                        Some(StatusCode::IDLE_HEARTBEAT) => wire.heartbeats += 1,
                        Some(status) => {
                            let pending = message
                                .headers
                                .as_ref()
                                .and_then(|h| h.get("Nats-Pending-Messages"))
                                .and_then(|v| v.as_str().parse::<u64>().ok());
                            // A status without the header ends its pull;
                            // what it released is unknown (counted as 0).
                            wire.released += pending.unwrap_or(0);
                            let line = format!(
                                "{} {:?} pending={:?}",
                                status.as_u16(),
                                message.description,
                                pending
                            );
                            if wire.statuses.len() < 50 {
                                wire.statuses.push(line);
                            }
                        }
                    }
                }
                else => break,
            }
        }
    }))
}

// ------------------------------------------------------------- the fix

/// A pull loop whose accounting cannot drift upward: the task that reads
/// the inbox is the one that sends and counts the pull requests, so no
/// message of a pull is seen before the pull is counted (async-nats'
/// `Stream` counts a pull only when its background task reports it sent,
/// and every message of that pull read before the report is lost from the
/// count, which then stays too high until the server owes nothing while the
/// client thinks it is still owed more than half a batch: no further pull).
///
/// Where the server's answer leaves the count unknown (a status without
/// `Nats-Pending-Messages`, silence for 2 × heartbeat), the count is reset
/// to zero: the loop may then ask for more than it needs (bounded by the
/// consumer's `max_ack_pending` and `max_waiting`), never for less.
pub struct Puller {
    client: Client,
    subject: String,
    inbox: Subject,
    subscriber: async_nats::Subscriber,
    request: Bytes,
    batch: usize,
    heartbeat: Duration,
    /// Messages requested and neither delivered nor released by a status.
    owed: usize,
    last_heard: Instant,
    context: jetstream::Context,
    /// Re-pulls after silence (for the report).
    pub silent_repulls: u64,
    pulls: u64,
    /// (every Nth pull, µs): a stall injected between a pull and its count.
    inject: (u64, u64),
}

impl Puller {
    pub async fn new(
        context: &jetstream::Context,
        consumer: &PullConsumer,
        batch: usize,
        expires: Duration,
        heartbeat: Duration,
    ) -> Result<Puller, Error> {
        let client = context.client();
        let info = consumer.cached_info();
        let subject = format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            info.stream_name, info.name
        );
        let inbox = Subject::from(client.new_inbox());
        let subscriber = client.subscribe(inbox.clone()).await?;
        let mut request = serde_json::json!({
            "batch": batch,
            "expires": expires.as_nanos() as u64,
        });
        if !heartbeat.is_zero() {
            request["idle_heartbeat"] = serde_json::json!(heartbeat.as_nanos() as u64);
        }
        Ok(Puller {
            client,
            subject,
            inbox,
            subscriber,
            request: Bytes::from(serde_json::to_vec(&request)?),
            batch,
            heartbeat,
            owed: 0,
            last_heard: Instant::now(),
            context: context.clone(),
            silent_repulls: 0,
            pulls: 0,
            inject: (0, 0),
        })
    }

    async fn pull(&mut self) -> Result<(), Error> {
        self.client
            .publish_with_reply(
                self.subject.clone(),
                self.inbox.clone(),
                self.request.clone(),
            )
            .await?;
        self.pulls += 1;
        if self.inject.0 > 0 && self.pulls.is_multiple_of(self.inject.0) {
            std::thread::sleep(Duration::from_micros(self.inject.1));
        }
        self.owed += self.batch;
        Ok(())
    }

    pub async fn next(&mut self) -> Result<jetstream::Message, Error> {
        loop {
            if self.owed <= self.batch / 2 {
                self.pull().await?;
            }
            let silence = if self.heartbeat.is_zero() {
                Duration::from_secs(3600)
            } else {
                self.heartbeat * 2
            };
            let deadline = tokio::time::Instant::from_std(self.last_heard + silence);
            let message = tokio::select! {
                message = self.subscriber.next() => message,
                _ = tokio::time::sleep_until(deadline) => {
                    // Neither a message nor a heartbeat for two heartbeats:
                    // the server holds no pull of ours. Pull again in place.
                    self.silent_repulls += 1;
                    self.owed = 0;
                    self.last_heard = Instant::now();
                    continue;
                }
            };
            let Some(message) = message else {
                return Err("pull inbox closed".into());
            };
            self.last_heard = Instant::now();
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.owed = self.owed.saturating_sub(1);
                    return Ok(jetstream::Message {
                        context: self.context.clone(),
                        message,
                    });
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::TIMEOUT) | Some(StatusCode::REQUEST_TERMINATED) => {
                    let description = message.description.as_deref().unwrap_or_default();
                    if description.starts_with("Exceeded MaxRequest")
                        || description == "Consumer Deleted"
                        || description == "Consumer is push based"
                    {
                        return Err(description.to_string().into());
                    }
                    match message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Pending-Messages"))
                        .and_then(|v| v.as_str().parse::<usize>().ok())
                    {
                        Some(released) => self.owed = self.owed.saturating_sub(released),
                        // Unknown: count the pulls as finished.
                        None => self.owed = 0,
                    }
                }
                Some(StatusCode::NOT_FOUND) => self.owed = 0,
                Some(status) => {
                    return Err(format!("pull status {status}: {:?}", message.description).into());
                }
            }
        }
    }
}

// ------------------------------------------------------------ the round

struct RoundResult {
    events_per_s: f64,
    wall_s: f64,
    longest_gap_s: f64,
    gaps: Vec<String>,
    per_second: Vec<u64>,
    client_cpu_s: f64,
    server_cpu_s: f64,
    rebinds: u64,
    silent_repulls: u64,
    completed: bool,
}

async fn publish_inputs(js: jetstream::Context, round: usize, events: usize) -> Result<(), Error> {
    futures::stream::iter(0..events)
        .map(|i| {
            let js = js.clone();
            async move {
                let message = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(format!(
                        "{{\"round\":{round},\"i\":{i},\"pad\":\"{}\"}}",
                        "x".repeat(200)
                    )))
                    .message_id(format!("in-{round}-{i}"));
                js.send_publish(IN, message).await?.await?;
                Ok::<_, Error>(())
            }
        })
        .buffer_unordered(256)
        .try_collect::<()>()
        .await
}

enum Source {
    Stream(Box<pull::Stream>),
    Own(Box<Puller>),
    Fetch(Box<FetchPipeline>),
}

/// `fetch_depth` one-shot `batch()` pulls in flight, read in order.
struct FetchPipeline {
    consumer: PullConsumer,
    batch: usize,
    expires: Duration,
    heartbeat: Duration,
    queue: VecDeque<tokio::task::JoinHandle<Result<pull::Batch, Error>>>,
    current: Option<pull::Batch>,
    depth: usize,
}

impl FetchPipeline {
    fn spawn_one(&mut self) {
        let consumer = self.consumer.clone();
        let (batch, expires, heartbeat) = (self.batch, self.expires, self.heartbeat);
        self.queue.push_back(tokio::spawn(async move {
            let mut builder = consumer.batch().max_messages(batch).expires(expires);
            if !heartbeat.is_zero() {
                builder = builder.heartbeat(heartbeat);
            }
            Ok(builder.messages().await?)
        }));
    }

    async fn next(&mut self) -> Result<jetstream::Message, Error> {
        loop {
            while self.queue.len() < self.depth {
                self.spawn_one();
            }
            if self.current.is_none() {
                let Some(handle) = self.queue.pop_front() else {
                    continue;
                };
                self.current = Some(handle.await??);
                self.spawn_one();
            }
            let Some(current) = self.current.as_mut() else {
                continue;
            };
            match current.next().await {
                Some(Ok(message)) => return Ok(message),
                Some(Err(err)) => return Err(err),
                None => self.current = None,
            }
        }
    }
}

async fn open_source(
    options: &Options,
    js: &jetstream::Context,
    consumer: &PullConsumer,
) -> Result<Source, Error> {
    let expires = Duration::from_secs_f64(options.expires);
    let heartbeat = Duration::from_secs_f64(options.heartbeat);
    Ok(match options.mode {
        Mode::Stream => {
            let mut builder = consumer
                .stream()
                .max_messages_per_batch(options.batch)
                .expires(expires);
            if !heartbeat.is_zero() {
                builder = builder.heartbeat(heartbeat);
            }
            Source::Stream(Box::new(builder.messages().await?))
        }
        Mode::Own => Source::Own(Box::new(
            Puller::new(js, consumer, options.batch, expires, heartbeat).await?,
        )),
        Mode::Fetch => Source::Fetch(Box::new(FetchPipeline {
            consumer: consumer.clone(),
            batch: options.batch,
            expires,
            heartbeat,
            queue: VecDeque::new(),
            current: None,
            depth: options.fetch_depth.max(1),
        })),
    })
}

async fn round(
    options: &Options,
    index: usize,
    js: &jetstream::Context,
    monitor: &Client,
    server: &Server,
) -> Result<RoundResult, Error> {
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["stall.>".into()],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(DURABLE.into()),
            filter_subject: if options.echoes {
                "stall.>".into()
            } else {
                IN.into()
            },
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let consumer: PullConsumer = stream.get_consumer(DURABLE).await?;

    let wire = Arc::new(Mutex::new(Wire::default()));
    let wire_task = watch_wire(monitor.clone(), wire.clone()).await?;

    if options.feed == Feed::Preload {
        publish_inputs(js.clone(), index, options.events).await?;
    }

    let delivered = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicUsize::new(0));
    let (cpu0, scpu0) = (own_cpu_seconds(), server.pid().map_or(0.0, cpu_seconds));
    let started = Instant::now();

    // Per-100 ms sampler: per-second counts and gaps.
    let sampler = {
        let delivered = delivered.clone();
        let done = done.clone();
        let wire = wire.clone();
        let monitor = monitor.clone();
        let gap_threshold = Duration::from_secs_f64(options.gap);
        tokio::spawn(async move {
            let monitor_js = jetstream::new(monitor);
            let mut per_second = Vec::new();
            let mut last_count = 0;
            let mut last_change = Instant::now();
            let mut second_start = Instant::now();
            let mut second_base = 0;
            let mut gaps = Vec::new();
            let mut longest = Duration::ZERO;
            let mut in_gap: Option<(Instant, i64, u64)> = None;
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            while !done.load(Ordering::Acquire) {
                ticker.tick().await;
                let now = Instant::now();
                let count = delivered.load(Ordering::Acquire);
                if now.duration_since(second_start) >= Duration::from_secs(1) {
                    per_second.push(count - second_base);
                    second_base = count;
                    second_start = now;
                }
                if count != last_count {
                    if let Some((since, _owed, _requests)) = in_gap.take() {
                        let began = since - gap_threshold;
                        let gap = now.duration_since(began);
                        let w = wire.lock().unwrap();
                        let pulls_after: Vec<String> = w
                            .request_times
                            .iter()
                            .filter(|t| **t > began)
                            .take(3)
                            .map(|t| format!("+{:.1} s", t.duration_since(began).as_secs_f64()))
                            .collect();
                        let line = format!(
                            "gap of {:.1} s (±0.1) after {} delivered; \
                             first pulls after the last delivery before it: {}; statuses so far {:?}",
                            gap.as_secs_f64(),
                            last_count,
                            pulls_after.join(", "),
                            w.statuses
                        );
                        drop(w);
                        eprintln!("    {line}");
                        gaps.push(line);
                    }
                    last_count = count;
                    last_change = now;
                } else if in_gap.is_none() && now.duration_since(last_change) >= gap_threshold {
                    let (owed, requests, since_request, since_inbox, heartbeats) = {
                        let w = wire.lock().unwrap();
                        (
                            w.owed(),
                            w.requests,
                            w.last_request.map(|t| now.duration_since(t).as_secs_f64()),
                            w.last_inbox_message
                                .map(|t| now.duration_since(t).as_secs_f64()),
                            w.heartbeats,
                        )
                    };
                    let info = match monitor_js.get_stream(STREAM).await {
                        Ok(s) => match s.consumer_info(DURABLE).await {
                            Ok(i) => format!(
                                "num_pending {} num_ack_pending {} num_waiting {} delivered {} ack_floor {}",
                                i.num_pending,
                                i.num_ack_pending,
                                i.num_waiting,
                                i.delivered.stream_sequence,
                                i.ack_floor.stream_sequence
                            ),
                            Err(e) => format!("consumer info failed: {e}"),
                        },
                        Err(e) => format!("stream info failed: {e}"),
                    };
                    eprintln!(
                        "    STALL at {:.1} s: {} delivered, nothing for {:.1} s; server: {info}; wire: \
                         {requests} pulls, still owed by the server by the monitor's count (approximate: two subscriptions) {owed}, last pull {:?} s ago, last inbox message {:?} s ago, {heartbeats} heartbeats",
                        now.duration_since(started).as_secs_f64(),
                        count,
                        gap_threshold.as_secs_f64(),
                        since_request,
                        since_inbox,
                    );
                    in_gap = Some((now, owed, requests));
                }
                let gap = now.duration_since(last_change);
                if gap > longest {
                    longest = gap;
                }
            }
            if let Some((since, _, _)) = in_gap {
                gaps.push(format!(
                    "gap of {:.1} s not ended (round over)",
                    (Instant::now().duration_since(since) + gap_threshold).as_secs_f64()
                ));
            }
            per_second.push(delivered.load(Ordering::Acquire) - second_base);
            (per_second, gaps, longest)
        })
    };

    let feeder = (options.feed == Feed::Concurrent)
        .then(|| tokio::spawn(publish_inputs(js.clone(), index, options.events)));

    let mut source = open_source(options, js, &consumer).await?;
    let in_flight = Arc::new(Semaphore::new(options.in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let expected_echoes = if options.echoes {
        options.events * options.outputs
    } else {
        0
    };
    let (mut inputs, mut echoes) = (0usize, 0usize);
    let mut rebinds = 0;
    let deadline = Instant::now() + Duration::from_secs_f64(options.round_timeout);
    let mut completed = true;
    while inputs < options.events || echoes < expected_echoes {
        if Instant::now() > deadline {
            completed = false;
            break;
        }
        let next = match &mut source {
            Source::Stream(s) => match tokio::time::timeout_at(deadline.into(), s.next()).await {
                Err(_) => continue,
                Ok(None) => Err("stream ended".into()),
                Ok(Some(r)) => r.map_err(Error::from),
            },
            Source::Own(p) => match tokio::time::timeout_at(deadline.into(), p.next()).await {
                Err(_) => continue,
                Ok(r) => r,
            },
            Source::Fetch(f) => match tokio::time::timeout_at(deadline.into(), f.next()).await {
                Err(_) => continue,
                Ok(r) => r,
            },
        };
        let message = match next {
            Ok(message) => message,
            Err(err) => {
                // What the runtime's supervisor does: a new pull stream.
                eprintln!("    pull failed ({err}); binding a new one");
                rebinds += 1;
                source = open_source(options, js, &consumer).await?;
                continue;
            }
        };
        delivered.fetch_add(1, Ordering::AcqRel);
        let permit = in_flight.clone().acquire_owned().await?;
        if message.subject.as_str() == OUT {
            echoes += 1;
            tasks.spawn(async move {
                let _permit = permit;
                message.ack().await?;
                Ok::<_, Error>(())
            });
            continue;
        }
        let (js, acks, outputs, handled) =
            (js.clone(), options.acks, options.outputs, handled.clone());
        let n = inputs;
        tasks.spawn(async move {
            let _permit = permit;
            let mut pending = Vec::with_capacity(outputs);
            for k in 0..outputs {
                let out = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(format!(
                        "{{\"out\":{n},\"pad\":\"{}\"}}",
                        "y".repeat(200)
                    )))
                    .message_id(format!("out-{index}-{n}-{k}"));
                pending.push(js.send_publish(OUT, out).await?);
            }
            match acks {
                Acks::Await => {
                    for ack in pending {
                        ack.await?;
                    }
                }
                Acks::Detached => drop(pending),
            }
            message.ack().await?;
            handled.fetch_add(1, Ordering::AcqRel);
            Ok::<_, Error>(())
        });
        inputs += 1;
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    if let Some(feeder) = feeder {
        feeder.await??;
    }
    if options.acks == Acks::Detached {
        js.wait_for_acks().await;
    }
    let wall = started.elapsed();
    done.store(true, Ordering::Release);
    let (per_second, gaps, longest) = sampler.await?;
    let silent_repulls = match &source {
        Source::Own(p) => p.silent_repulls,
        _ => 0,
    };
    drop(source);
    wire_task.abort();

    let (cpu1, scpu1) = (own_cpu_seconds(), server.pid().map_or(0.0, cpu_seconds));
    Ok(RoundResult {
        events_per_s: inputs as f64 / wall.as_secs_f64(),
        wall_s: wall.as_secs_f64(),
        longest_gap_s: longest.as_secs_f64(),
        gaps,
        per_second,
        client_cpu_s: cpu1 - cpu0,
        server_cpu_s: scpu1 - scpu0,
        rebinds,
        silent_repulls,
        completed,
    })
}

async fn run(options: Options) -> Result<(), Error> {
    let server = Server::start().await?;
    let stalls = Arc::new(AtomicU64::new(0));
    let client = async_nats::ConnectOptions::new()
        .event_callback({
            let stalls = stalls.clone();
            move |event| {
                let stalls = stalls.clone();
                async move {
                    if let async_nats::Event::SlowConsumer(sid) = event {
                        stalls.fetch_add(1, Ordering::Relaxed);
                        eprintln!("    client: slow consumer on subscription {sid} (a message was dropped)");
                    }
                }
            }
        })
        .connect(server.url())
        .await?;
    let monitor = async_nats::connect(server.url()).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(options.max_ack_inflight)
        .build(client.clone());

    let mut hogs = Vec::new();
    for _ in 0..options.hogs {
        hogs.push(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    eprintln!(
        "pull_stall: {options:?}\n  nats-server {} (pid {:?}), {} cores",
        nats_server_version(),
        server.pid(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rates = Vec::new();
    let mut longest = 0f64;
    let mut stalled_rounds = 0;
    let (mut cpu, mut scpu, mut events) = (0.0, 0.0, 0usize);
    for index in 0..options.rounds {
        let r = round(&options, index, &js, &monitor, &server).await?;
        eprintln!(
            "  round {index:>2}: {:>6.0} events/s, {:.2} s, longest gap {:.1} s, rebinds {}, silent re-pulls {}, \
             CPU client {:.0} µs/event, server {:.0} µs/event{}",
            r.events_per_s,
            r.wall_s,
            r.longest_gap_s,
            r.rebinds,
            r.silent_repulls,
            r.client_cpu_s / options.events as f64 * 1e6,
            r.server_cpu_s / options.events as f64 * 1e6,
            if r.completed { "" } else { " (NOT COMPLETED)" }
        );
        if options.per_second || !r.gaps.is_empty() {
            eprintln!("    per second: {:?}", r.per_second);
        }
        if !r.gaps.is_empty() {
            stalled_rounds += 1;
        }
        longest = longest.max(r.longest_gap_s);
        rates.push(r.events_per_s);
        cpu += r.client_cpu_s;
        scpu += r.server_cpu_s;
        events += options.events;
    }
    for mut hog in hogs {
        let _ = hog.kill().await;
    }
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    println!(
        "mode={:?} batch={} expires={}s heartbeat={}s acks={:?} feed={:?} echoes={} hogs={}: {} rounds, \
         median {:.0} events/s, min {:.0}, max {:.0}; rounds with a gap ≥ {} s: {}; longest gap {:.1} s; \
         CPU per event: client {:.0} µs, server {:.0} µs; slow-consumer drops {}",
        options.mode,
        options.batch,
        options.expires,
        options.heartbeat,
        options.acks,
        options.feed,
        options.echoes,
        options.hogs,
        rates.len(),
        median,
        sorted[0],
        sorted[sorted.len() - 1],
        options.gap,
        stalled_rounds,
        longest,
        cpu / events as f64 * 1e6,
        scpu / events as f64 * 1e6,
        stalls.load(Ordering::Relaxed),
    );
    drop(server);
    Ok(())
}

fn nats_server_version() -> String {
    nats_server_binary()
        .ok()
        .and_then(|bin| {
            std::process::Command::new(bin)
                .arg("--version")
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
