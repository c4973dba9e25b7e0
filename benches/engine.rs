//! The consumer engine's per-event path without NATS, as the engine runs
//! it: route the delivery (decode the envelope, verify its content hash and
//! event type, check the payload is JSON), find the aggregate's lane and
//! take its turn, run a no-op room (one output, as the echo rooms make),
//! encode the output (envelope, headers, message id) and count the event
//! in the room's metrics. What NATS itself costs is the pipeline bench's.
//!
//! Time per event comes from criterion; allocations and bytes allocated
//! per event from a counting allocator wrapped around the system one, over
//! a separate run of the same path.
//!
//! Run: `cargo bench --bench engine` (writes target/bench/engine.json;
//! `scripts/bench-compare.sh` compares two such files). Under
//! `cargo test --all-targets` it runs each case once as a smoke test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use choco_factory::cocoa_butter::consumer::lane::{LaneQueue, Next, Sequenced};
use choco_factory::cocoa_butter::consumer::{Route, Routing, route};
use choco_factory::cocoa_butter::metrics::{Outcome, RoomMetrics};
use choco_factory::cocoa_butter::nats::OutputEncoder;
use choco_factory::cocoa_butter::{Cause, EventEnvelope, Outbound};
use criterion::{Criterion, Throughput};
use serde_json::json;

/// Counts every allocation (and its bytes) of the process.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

choco_factory::room_actions! {
    /// The no-op room's one output.
    enum Output: outputs {
        Completed = "property_sync.completed",
    }
}

const PREFIX: &str = "choco.events.coordination.";
const DOMAIN: &str = "coordination";
const ACTION: &str = "property_sync.requested";
const ROUTING: Routing<'static> = Routing {
    inputs: &[ACTION],
    outputs: &["property_sync.completed"],
    max_envelope_bytes: 1024 * 1024,
    service: "the-conch",
    contracts: None,
};

/// A delivery as the engine gets it: subject and body.
struct Delivery {
    subject: String,
    body: Vec<u8>,
    sequence: u64,
}

impl Sequenced for Delivery {
    fn sequence(&self) -> u64 {
        self.sequence
    }
}

/// `count` inputs spread over 64 aggregates, with a payload the size of a
/// property sync (about 300 bytes).
fn deliveries(count: u64) -> Vec<Delivery> {
    (0..count)
        .map(|sequence| {
            let document = format!("doc-{}", sequence % 64);
            let payload = json!({
                "document_id": document,
                "source": "vault",
                "properties": {
                    "title": "Quarterly cocoa report",
                    "status": "draft",
                    "owner": "ops@choco.example",
                    "tags": ["cocoa", "report", "q3"],
                    "revision": sequence,
                },
                "policy": "last_writer_wins",
            });
            let envelope = EventEnvelope::new(
                uuid::Uuid::now_v7(),
                format!("{DOMAIN}.{ACTION}"),
                document,
                format!("corr-{sequence}"),
                serde_json::to_vec(&payload).expect("JSON"),
                "bench".into(),
            );
            Delivery {
                subject: format!("{PREFIX}{ACTION}"),
                body: envelope.encode(),
                sequence,
            }
        })
        .collect()
}

/// What the engine keeps across events.
struct Engine {
    lanes: HashMap<String, LaneQueue<Delivery>>,
    encoder: OutputEncoder,
    metrics: RoomMetrics,
}

impl Engine {
    fn new() -> Self {
        Engine {
            lanes: HashMap::new(),
            encoder: OutputEncoder::new(PREFIX, DOMAIN, "the-conch"),
            metrics: RoomMetrics::new("conch", None),
        }
    }

    /// One event, start to finish; returns the encoded output's size.
    fn handle(&mut self, delivery: Delivery) -> usize {
        let started = Instant::now();
        let action = delivery
            .subject
            .strip_prefix(PREFIX)
            .unwrap_or(&delivery.subject);
        let event_type = format!("{DOMAIN}.{action}");
        self.metrics.received(&event_type);
        let Route::Input(envelope) = route(&ROUTING, action, &event_type, &delivery.body) else {
            panic!("the bench's inputs are valid");
        };
        // The lane of the aggregate: its turn comes at once (nothing waits).
        let lane = self.lanes.entry(envelope.aggregate_id.clone()).or_default();
        lane.push(delivery);
        let Next::Run(delivery) = lane.next(started, false) else {
            panic!("an idle lane runs its message");
        };
        black_box(&delivery);
        // A no-op room: one output naming the input.
        let output = Outbound::new(
            Output::Completed,
            &envelope.aggregate_id,
            json!({ "document_id": envelope.aggregate_id, "applied": 5 }),
        );
        let cause = Cause::of(&envelope);
        let encoded = self
            .encoder
            .encode(&cause, 0, &output)
            .expect("the output encodes");
        self.metrics
            .finished(&event_type, Outcome::Ok, started.elapsed().as_secs_f64());
        encoded.payload.len() + encoded.headers.len()
    }
}

fn route_only(delivery: &Delivery) -> bool {
    let action = delivery.subject.strip_prefix(PREFIX).unwrap_or_default();
    let event_type = format!("{DOMAIN}.{action}");
    matches!(
        route(&ROUTING, action, &event_type, &delivery.body),
        Route::Input(_)
    )
}

/// Allocations and bytes per event over `count` events of the full path.
fn allocations_per_event(count: u64) -> (f64, f64) {
    let mut engine = Engine::new();
    let inputs = deliveries(count);
    // The first event per aggregate creates its lane and metric series:
    // warm them so the figure is the steady state.
    for delivery in deliveries(64) {
        engine.handle(delivery);
    }
    let (before, before_bytes) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    );
    for delivery in inputs {
        black_box(engine.handle(delivery));
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let bytes = ALLOCATED_BYTES.load(Ordering::Relaxed) - before_bytes;
    (
        allocations as f64 / count as f64,
        bytes as f64 / count as f64,
    )
}

/// Criterion's median for a bench id, in nanoseconds, once it has run.
fn median_ns(id: &str) -> Option<f64> {
    let path = format!("target/criterion/{id}/new/estimates.json");
    let estimates: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn main() {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let mut criterion = Criterion::default().configure_from_args();
    {
        let mut group = criterion.benchmark_group("engine_per_event");
        group.throughput(Throughput::Elements(1));
        let inputs = deliveries(4096);
        let mut next = 0;
        group.bench_function("route", |b| {
            b.iter(|| {
                next = (next + 1) % inputs.len();
                black_box(route_only(&inputs[next]))
            })
        });
        let mut engine = Engine::new();
        group.bench_function("full_path", |b| {
            b.iter_batched(
                || deliveries(1).pop().expect("one delivery"),
                |delivery| black_box(engine.handle(delivery)),
                criterion::BatchSize::SmallInput,
            )
        });
        group.finish();
    }
    criterion.final_summary();

    let (allocations, bytes) = allocations_per_event(if bench { 100_000 } else { 100 });
    println!("engine per event: {allocations:.1} allocations, {bytes:.0} bytes allocated");
    let route_ns = median_ns("engine_per_event/route");
    let full_ns = median_ns("engine_per_event/full_path");
    if let (Some(route_ns), Some(full_ns)) = (route_ns, full_ns) {
        println!(
            "engine per event: route {:.2} µs, full path {:.2} µs (criterion medians)",
            route_ns / 1000.0,
            full_ns / 1000.0
        );
    }
    let report = json!({
        "bench": "engine",
        "route_ns_per_event": route_ns,
        "full_path_ns_per_event": full_ns,
        "allocations_per_event": allocations,
        "bytes_allocated_per_event": bytes,
    });
    let path = if bench {
        std::path::PathBuf::from("target/bench/engine.json")
    } else {
        std::env::temp_dir().join("choco-engine-smoke.json")
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, format!("{report:#}\n")) {
        Ok(()) => println!("written to {}", path.display()),
        Err(err) => eprintln!("cannot write {}: {err}", path.display()),
    }
}
