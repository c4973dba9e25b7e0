//! Handlers that panic or hang, run by the real runtime (as a library)
//! against a real nats-server: the poisoned messages end in `choco:dlq`
//! with their reason, and the room keeps serving everything else meanwhile.
//!
//! The room here is a test room, `probe`, built from a `RoomSpec` of this
//! file: its handler reads `{"n", "mode"}` and, by `mode`, panics, hangs
//! (until the runtime's `consumer.handler_timeout` cancels it), hangs on
//! its first delivery only, or answers with one `work.completed`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use choco_factory::cocoa_butter::config::{
    ConsumerConfig, FactoryConfig, RoomConfig, ServerUrls, ValidatedConfig, validate,
};
use choco_factory::cocoa_butter::contract::EventContract;
use choco_factory::cocoa_butter::runtime;
use choco_factory::cocoa_butter::{
    GrpcService, HandleError, InboundEvent, Outbound, Room, RoomError, RoomSpec,
};
use common::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const STREAM: &str = "choco:events:probing";
choco_factory::room_actions! {
    /// The probe room's one input.
    enum Input: inputs {
        WorkRequested = "work.requested",
    }
}

choco_factory::room_actions! {
    /// The probe room's one output.
    enum Output: outputs {
        WorkCompleted = "work.completed",
    }
}

choco_factory::room_actions! {
    /// An output the probe room does not declare (a room's bug).
    enum Undeclared: outputs {
        WorkStrayed = "work.strayed",
    }
}

const REQUESTED: &str = "choco.events.probing.work.requested";
const COMPLETED: &str = "choco.events.probing.work.completed";
const DLQ_SUBJECT: &str = "choco.dlq.probe.probing.work.requested";
const MAX_DELIVER: i64 = 3;
const HANDLER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a `slow` input's handler takes: under the keepalive test's
/// ack wait, so only waiting in its lane can outlast that.
const SLOW: Duration = Duration::from_secs(1);

/// Handler calls currently hanging (dropped = cancelled by the runtime).
static HANGING: AtomicUsize = AtomicUsize::new(0);
/// Healthy inputs handled while at least one handler was hanging.
static HANDLED_WHILE_HANGING: AtomicUsize = AtomicUsize::new(0);
/// Handler calls per input `n`.
static CALLS: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());
/// How many calls input 1000 (hanging, aggregate `hang-0`) had had when
/// input 3001 (same aggregate, queued behind it) was handled.
static HANG_0_CALLS_BEFORE_3001: Mutex<Option<u32>> = Mutex::new(None);

struct Hanging;

impl Hanging {
    fn enter() -> Hanging {
        HANGING.fetch_add(1, Ordering::SeqCst);
        Hanging
    }
}

impl Drop for Hanging {
    fn drop(&mut self) {
        HANGING.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(serde::Deserialize)]
struct Work {
    n: u64,
    mode: String,
}

struct Probe;

const SPEC: RoomSpec = RoomSpec {
    name: "probe",
    check: |_| Ok(()),
    build: |_| Ok(Arc::new(Probe)),
    defaults: || serde_json::json!({}),
    contracts: || {
        vec![
            EventContract::input::<serde_json::Value>(Input::WorkRequested, "work to do"),
            EventContract::output::<serde_json::Value>(Output::WorkCompleted, "work done"),
        ]
    },
};
static REGISTRY: &[RoomSpec] = &[SPEC];

async fn hang() {
    let _hanging = Hanging::enter();
    // A day is forever here: only the runtime's deadline ends it.
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
}

#[async_trait]
impl Room for Probe {
    fn inputs(&self) -> &'static [&'static str] {
        &["work.requested"]
    }

    fn outputs(&self) -> &'static [&'static str] {
        &["work.completed"]
    }

    async fn prepare(&self) -> Result<(), RoomError> {
        Ok(())
    }

    async fn handle(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        let work: Work = event.payload()?;
        {
            let mut calls = CALLS.lock().expect("calls");
            *calls.entry(work.n).or_default() += 1;
            if work.n == 3001 {
                *HANG_0_CALLS_BEFORE_3001.lock().expect("order") =
                    Some(calls.get(&1000).copied().unwrap_or(0));
            }
        }
        match work.mode.as_str() {
            "panic" => panic!("poisoned input {}", work.n),
            "hang" => hang().await,
            "hang_once" if event.delivered == 1 => hang().await,
            "slow" => tokio::time::sleep(SLOW).await,
            "stray" => {
                return Ok(vec![Outbound::new(
                    Undeclared::WorkStrayed,
                    &event.envelope.aggregate_id,
                    json!({ "n": work.n }),
                )]);
            }
            _ => {
                // Only the healthy inputs count (n < 1000; 3000 and 3001 wait
                // on purpose).
                if work.n < 1000 && HANGING.load(Ordering::SeqCst) > 0 {
                    HANDLED_WHILE_HANGING.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        Ok(vec![Outbound::new(
            Output::WorkCompleted,
            &event.envelope.aggregate_id,
            json!({ "n": work.n, "delivered": event.delivered }),
        )])
    }

    fn http_routes(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
    }

    fn grpc_service(self: Arc<Self>) -> GrpcService {
        GrpcService {
            name: "choco.test.Probe",
            routes: tonic::service::Routes::default(),
        }
    }
}

/// The probe room on free ports, with a short handler deadline and fast
/// retries, validated the way the binary validates its configuration.
fn config(nats_url: &str, ports: [u16; 3], ack_wait: Duration) -> ValidatedConfig {
    let [http_port, grpc_port, metrics_port] = ports;
    let mut factory = FactoryConfig::default();
    factory.nats.url = ServerUrls::one(nats_url);
    factory.consumer = ConsumerConfig {
        ack_wait,
        heartbeat: Duration::from_secs(1),
        max_deliver: MAX_DELIVER,
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        handler_timeout: HANDLER_TIMEOUT,
        ..ConsumerConfig::default()
    };
    factory.shutdown_grace = Duration::from_secs(5);
    factory.rooms.insert(
        "probe".into(),
        RoomConfig {
            enabled: true,
            service: Some("the-probe".into()),
            label: Some("Probe Room".into()),
            domain: Some("probing".into()),
            subject_prefix: None,
            stream: None,
            bind: None,
            http_port: Some(http_port),
            grpc_port: Some(grpc_port),
            metrics_port: Some(metrics_port),
            consumer: Default::default(),
            streams: Default::default(),
            publish_previous_major: false,
            settings: Default::default(),
        },
    );
    validate(factory, None).expect("the probe room's configuration is valid")
}

/// The runtime serving the probe room in this process, ready.
struct Probing {
    readyz: String,
    shutdown: CancellationToken,
    runtime: tokio::task::JoinHandle<Result<(), runtime::RuntimeError>>,
}

impl Probing {
    async fn start(nats_url: &str, ack_wait: Duration) -> Probing {
        let ports = free_ports().expect("free ports for the probe room");
        let shutdown = CancellationToken::new();
        let runtime = tokio::spawn(runtime::run(
            config(nats_url, ports, ack_wait),
            REGISTRY,
            shutdown.clone(),
        ));
        let readyz = format!("http://127.0.0.1:{}/readyz", ports[0]);
        wait_until(Duration::from_secs(20), || ready(&readyz)).await;
        Probing {
            readyz,
            shutdown,
            runtime,
        }
    }

    /// Stops it as a signal would, and expects a clean stop.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.runtime)
            .await
            .expect("the runtime stops")
            .expect("joined")
            .expect("a clean stop");
    }
}

async fn ready(url: &str) -> bool {
    reqwest::get(url).await.is_ok_and(|r| r.status() == 200)
}

/// The probe's panics are expected: keep their messages (and backtraces)
/// out of the test output; any other panic is reported as usual.
fn quiet_expected_panics() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let expected = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|message| message.starts_with("poisoned input"));
        if !expected {
            report(info);
        }
    }));
}

#[tokio::test]
async fn panicking_and_hanging_handlers_are_dead_lettered_while_the_room_serves_the_rest() {
    quiet_expected_panics();
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let probe = Probing::start(&nats.url(), Duration::from_secs(10)).await;
    let readyz = probe.readyz.clone();

    // Readiness, watched for the whole test.
    let not_ready = Arc::new(AtomicUsize::new(0));
    let watching = CancellationToken::new();
    let watcher = tokio::spawn({
        let (not_ready, watching, readyz) = (not_ready.clone(), watching.clone(), readyz.clone());
        async move {
            while !watching.is_cancelled() {
                if !ready(&readyz).await {
                    not_ready.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // Poison first, so that the healthy inputs arrive while it is in hand:
    // three hanging inputs, three panicking ones, one that hangs only on
    // its first delivery, and one healthy input queued behind a hanging one
    // of the same aggregate (it must wait for it: per-aggregate order).
    let mut modes: Vec<(u64, &str, String)> = Vec::new();
    for i in 0..3 {
        modes.push((1000 + i, "hang", format!("hang-{i}")));
        modes.push((2000 + i, "panic", format!("panic-{i}")));
    }
    modes.push((3000, "hang_once", "slow-once".into()));
    modes.push((3001, "ok", "hang-0".into()));
    // And one whose handler returns an output the room does not declare.
    modes.push((4000, "stray", "stray-0".into()));
    let healthy = 300u64;
    for n in 0..healthy {
        modes.push((n, "ok", format!("doc-{}", n % 30)));
    }
    let started = Instant::now();
    for (n, mode, aggregate) in &modes {
        let event = envelope(
            "probing.work.requested",
            aggregate,
            &json!({ "n": n, "mode": mode }),
        );
        publish(&js, REQUESTED, &event).await;
    }

    // Every healthy input (and the two that only had to wait) yields its
    // output exactly once.
    let expected_outputs = healthy as usize + 2;
    let outputs = wait_for(
        &js,
        STREAM,
        COMPLETED,
        expected_outputs,
        Duration::from_secs(60),
    )
    .await;
    eprintln!(
        "{expected_outputs} outputs in {:?}; {} healthy inputs handled while a handler hung",
        started.elapsed(),
        HANDLED_WHILE_HANGING.load(Ordering::SeqCst)
    );

    // The seven poisoned inputs are dead-lettered with their reasons.
    let letters = wait_for(&js, "choco:dlq", "choco.dlq.>", 7, Duration::from_secs(60)).await;
    eprintln!("7 dead letters in {:?}", started.elapsed());
    let mut by_n: HashMap<u64, &Stored> = HashMap::new();
    for letter in &letters {
        assert_eq!(letter.subject, DLQ_SUBJECT);
        let work: serde_json::Value =
            serde_json::from_slice(&letter.envelope().payload).expect("payload");
        let n = work["n"].as_u64().expect("n");
        assert!(
            by_n.insert(n, letter).is_none(),
            "input {n} dead-lettered twice"
        );
    }
    let strayed = by_n[&4000];
    assert_eq!(
        strayed.header("Choco-Dlq-Reason").as_deref(),
        Some("undeclared_output"),
        "an undeclared output is never published"
    );
    assert!(
        strayed
            .header("Choco-Dlq-Detail")
            .expect("detail")
            .contains("work.strayed"),
        "the detail names the output"
    );
    for i in 0..3 {
        let hung = by_n[&(1000 + i)];
        assert_eq!(
            hung.header("Choco-Dlq-Reason").as_deref(),
            Some("handler_timeout")
        );
        assert_eq!(
            hung.header("Choco-Dlq-Deliveries"),
            Some(MAX_DELIVER.to_string()),
            "a hang is retried up to max_deliver"
        );
        assert!(
            hung.header("Choco-Dlq-Detail")
                .expect("detail")
                .contains("3s"),
            "the detail names the deadline"
        );
        let panicked = by_n[&(2000 + i)];
        assert_eq!(
            panicked.header("Choco-Dlq-Reason").as_deref(),
            Some("handler_panic")
        );
        assert_eq!(
            panicked.header("Choco-Dlq-Deliveries").as_deref(),
            Some("1"),
            "a panic is permanent: the same bytes panic again"
        );
        assert_eq!(
            panicked.header("Choco-Dlq-Detail"),
            Some(format!("poisoned input {}", 2000 + i))
        );
    }

    // Nothing lost or doubled, and the hanging handlers were cancelled.
    let outputs_after = exactly(&js, STREAM, COMPLETED, expected_outputs).await;
    let ns: BTreeSet<u64> = outputs_after
        .iter()
        .map(|m| m.payload()["n"].as_u64().expect("n"))
        .collect();
    let wanted: BTreeSet<u64> = (0..healthy).chain([3000, 3001]).collect();
    assert_eq!(ns, wanted, "each healthy input has its one output");
    assert_eq!(outputs.len(), outputs_after.len());
    exactly(&js, "choco:dlq", "choco.dlq.>", 7).await;
    let calls = CALLS.lock().expect("calls").clone();
    for i in 0..3 {
        assert_eq!(
            calls[&(1000 + i)],
            MAX_DELIVER as u32,
            "hang {i}: one call per delivery"
        );
        assert_eq!(calls[&(2000 + i)], 1, "panic {i}: not retried");
    }
    assert_eq!(calls[&3000], 2, "hung once, then handled on the redelivery");
    assert_eq!(
        *HANG_0_CALLS_BEFORE_3001.lock().expect("order"),
        Some(MAX_DELIVER as u32),
        "3001 waited behind every delivery of the hanging input of its aggregate"
    );
    let slow_once = outputs_after
        .iter()
        .find(|m| m.payload()["n"] == 3000)
        .expect("the hang-once input's output");
    assert_eq!(slow_once.payload()["delivered"], 2);
    assert_eq!(
        HANGING.load(Ordering::SeqCst),
        0,
        "every hanging call was cancelled"
    );
    // The hanging inputs were in hand for at least 3 × 3 s: every healthy
    // input was handled inside that window, not after it.
    assert!(
        HANDLED_WHILE_HANGING.load(Ordering::SeqCst) >= healthy as usize,
        "the healthy inputs were handled while handlers hung"
    );
    let stream = js.get_stream(STREAM).await.expect("stream");
    wait_until(Duration::from_secs(20), || async {
        let info = stream.consumer_info("choco-probe").await.expect("consumer");
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;

    // Ready throughout, and it still is.
    watching.cancel();
    watcher.await.expect("watcher");
    assert_eq!(not_ready.load(Ordering::SeqCst), 0, "the room stayed ready");
    assert!(ready(&readyz).await);

    probe.stop().await;
}

/// Inputs queued in their aggregate's lane behind slow ones wait longer
/// than `ack_wait` in all, each handler call staying under it: the lane
/// keeps the waiting ones alive (in-progress acks), so the server never
/// redelivers them and each is handled once, on its first delivery.
#[tokio::test]
async fn inputs_waiting_in_their_lane_past_ack_wait_are_not_redelivered() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let probe = Probing::start(&nats.url(), Duration::from_secs(3)).await;

    // Six slow inputs and a quick one, all of one aggregate: the last ones
    // wait some 6 s in the lane, twice the ack wait.
    let inputs: Vec<(u64, &str)> = (5000..5006)
        .map(|n| (n, "slow"))
        .chain([(5006, "ok")])
        .collect();
    for (n, mode) in &inputs {
        let event = envelope(
            "probing.work.requested",
            "slow-lane",
            &json!({ "n": n, "mode": mode }),
        );
        publish(&js, REQUESTED, &event).await;
    }
    let outputs = wait_for(
        &js,
        STREAM,
        COMPLETED,
        inputs.len(),
        Duration::from_secs(60),
    )
    .await;
    // Anything redelivered would be handled again after the others.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let outputs_after = read_all(&js, STREAM, COMPLETED).await;
    assert_eq!(outputs_after.len(), outputs.len(), "no input handled twice");
    for output in &outputs_after {
        assert_eq!(
            output.payload()["delivered"],
            1,
            "handled on its first delivery: {}",
            output.payload()
        );
    }
    let calls = CALLS.lock().expect("calls").clone();
    for (n, _) in &inputs {
        assert_eq!(calls.get(n), Some(&1), "input {n}: one handler call");
    }

    probe.stop().await;
}
