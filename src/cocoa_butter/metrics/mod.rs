//! Per-room Prometheus metrics.
//!
//! Every room owns a [`Registry`], so the room's metrics port shows the
//! room's own series and nothing of its neighbours'; `room` is a constant
//! label of every series. The consumer names follow the platform's
//! (`choco_consumer_*`). docs/OPERATIONS.md lists every family.
//!
//! What is the process's rather than a room's lives here too, in one
//! [`ProcessMetrics`] served once per process on the first enabled room's
//! port (by name), without a `room` label: the NATS connection
//! (`choco_nats_*`), the build (`choco_build_info`) and the process itself
//! (`process_*`, [`process`]).
//!
//! Latency histograms carry the trace id as an OpenMetrics exemplar when
//! tracing is on. [`RoomMetrics::encode`] writes OpenMetrics text;
//! [`prometheus_text`] turns it into the classic Prometheus text format for
//! scrapers that do not ask for OpenMetrics.

pub mod process;

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::telemetry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub event_type: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route as declared (`/v1/documents/{document_id}`), never the raw path.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `/package.Service/Method`.
    pub method: String,
    /// The gRPC status code name (`OK`, `INVALID_ARGUMENT`).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub event_type: String,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `kv` or `object`.
    pub store: &'static str,
    pub bucket: String,
    pub operation: &'static str,
    /// `ok`, `conflict` (a compare-and-set lost) or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `http`, `grpc` or `metrics`.
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub git_sha: &'static str,
}

/// The exemplar of a latency observation: the trace it belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub event_type: String,
    pub reason: String,
}

/// How the handling of one delivery ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Handled, outputs published, acknowledged.
    Ok,
    /// Not an input of this room (its own outputs on the prefix): acknowledged untouched.
    Skipped,
    /// Failed transiently and handed back to the server for redelivery.
    Retried,
    /// Moved to the dead-letter stream.
    DeadLettered,
}

impl Outcome {
    /// Its slot in [`EventSeries::outcomes`].
    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Skipped => "skipped",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

impl prometheus_client::encoding::EncodeLabelValue for Outcome {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

type LatencyHistogram = HistogramWithExemplars<TraceExemplar>;

/// 0.5 ms .. ~4 s: slower than that is an incident, not a latency.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 14)
}

fn latency_histogram() -> LatencyHistogram {
    HistogramWithExemplars::new(latency_buckets())
}

fn exemplar() -> Option<TraceExemplar> {
    telemetry::current_trace_id().map(|trace_id| TraceExemplar { trace_id })
}

/// The state of the process's one NATS connection, which the runtime
/// updates and [`ProcessMetrics`] shows.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    pub connected: Gauge<i64, AtomicI64>,
    pub reconnects: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentLabels {
    pub domain: String,
    /// `written` or `failed`.
    pub outcome: &'static str,
}

/// The archivers' state (`runtime/archiver.rs`), per archived domain, which
/// [`ProcessMetrics`] shows: the archive is the process's, not a room's.
#[derive(Clone, Default)]
pub struct ArchiveMetrics {
    /// Messages of the stream not archived yet (stream last sequence minus
    /// the last archived one, as the archive consumer sees it).
    pub lag: Family<DomainLabels, Gauge<i64, AtomicI64>>,
    /// The last sequence archived.
    pub archived: Family<DomainLabels, Gauge<i64, AtomicI64>>,
    /// 1 while the archiver holds because storage fails.
    pub holding: Family<DomainLabels, Gauge<i64, AtomicI64>>,
    pub segments: Family<SegmentLabels, Counter>,
    /// Compressed bytes written.
    pub bytes: Family<DomainLabels, Counter>,
    /// Why each archiver is not ready (none when it is): what the
    /// archive's `/archive/readyz` answers from.
    not_ready: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Option<String>>>>,
}

impl ArchiveMetrics {
    /// Says whether the archiver of `domain` is ready, and if not why.
    pub fn set_not_ready(&self, domain: &str, reason: Option<String>) {
        // Only a panic while holding the lock poisons it; the map stays usable.
        let mut map = self.not_ready.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(domain.to_string(), reason);
    }

    /// Every archiver's readiness: `(all ready, domain → why not)`.
    pub fn readiness(&self) -> (bool, std::collections::BTreeMap<String, Option<String>>) {
        let map = self
            .not_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (map.values().all(Option::is_none), map)
    }

    /// Every series of `domain`, at 0.
    pub fn init(&self, domain: &str) {
        self.set_not_ready(domain, Some("starting".into()));
        let labels = DomainLabels {
            domain: domain.to_string(),
        };
        let _ = self.lag.get_or_create(&labels);
        let _ = self.archived.get_or_create(&labels);
        let _ = self.holding.get_or_create(&labels);
        let _ = self.bytes.get_or_create(&labels);
        for outcome in ["written", "failed"] {
            let _ = self.segments.get_or_create(&SegmentLabels {
                domain: domain.to_string(),
                outcome,
            });
        }
    }
}

/// The commit the binary was built from (`BUILD_GIT_SHA` at build time).
pub const GIT_SHA: &str = env!("BUILD_GIT_SHA");

/// What belongs to the process rather than to a room: its NATS
/// connection (`choco_nats_*`), its build (`choco_build_info`) and the
/// `process_*` families. One home, so that scraping every room's port does
/// not count the process four times: the metrics port of the first enabled
/// room by name (the conch's, 9102, when all four run; a room's own port
/// when a process runs one room), without a `room` label.
#[derive(Clone)]
pub struct ProcessMetrics {
    registry: Arc<Registry>,
}

impl ProcessMetrics {
    pub fn new(connection: &ConnectionMetrics, archive: &ArchiveMetrics) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "choco_archive_lag_messages",
            "Messages of an archived stream not archived yet",
            archive.lag.clone(),
        );
        registry.register(
            "choco_archive_sequence",
            "The last stream sequence archived",
            archive.archived.clone(),
        );
        registry.register(
            "choco_archive_holding",
            "1 while the archiver holds because its storage fails (nothing acked)",
            archive.holding.clone(),
        );
        registry.register(
            "choco_archive_segments",
            "Segment writes, by outcome (written, failed)",
            archive.segments.clone(),
        );
        registry.register(
            "choco_archive_written_bytes",
            "Compressed bytes of segments written",
            archive.bytes.clone(),
        );
        registry.register(
            "choco_nats_connected",
            "1 while the process's NATS connection is up",
            connection.connected.clone(),
        );
        registry.register(
            "choco_nats_reconnects",
            "Times the NATS connection came back after being lost",
            connection.reconnects.clone(),
        );
        let build = Family::<BuildLabels, Gauge<i64, AtomicI64>>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                git_sha: GIT_SHA,
            })
            .set(1);
        registry.register(
            "choco_build_info",
            "Always 1; the labels say which build is running",
            build,
        );
        registry.register_collector(Box::new(process::ProcessCollector));
        ProcessMetrics {
            registry: Arc::new(registry),
        }
    }
}

/// The handles a room's runtime updates.
#[derive(Clone)]
pub struct RoomMetrics {
    pub registry: Arc<Registry>,
    /// The process-wide families, on the one room that serves them.
    process: Option<Arc<Registry>>,
    received: Family<EventLabels, Counter>,
    processed: Family<OutcomeLabels, Counter>,
    dead_letters: Family<DeadLetterLabels, Counter>,
    duration: Family<OutcomeLabels, LatencyHistogram>,
    pub in_flight: Gauge<i64, AtomicI64>,
    pub ready: Gauge<i64, AtomicI64>,
    pub paused: Gauge<i64, AtomicI64>,
    pub consumer_pending: Gauge<i64, AtomicI64>,
    pub consumer_ack_pending: Gauge<i64, AtomicI64>,
    pub consumer_redelivered: Gauge<i64, AtomicI64>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<HttpLabels, LatencyHistogram>,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_duration: Family<GrpcLabels, LatencyHistogram>,
    published: Family<PublishLabels, Counter>,
    publish_duration: Family<EventLabels, LatencyHistogram>,
    store_duration: Family<StoreLabels, Histogram>,
    stream_replicas: Family<StreamLabels, Gauge<i64, AtomicI64>>,
    stream_current_replicas: Family<StreamLabels, Gauge<i64, AtomicI64>>,
    stream_replica_lag: Family<StreamLabels, Gauge<i64, AtomicI64>>,
    stream_leader_changes: Family<StreamLabels, Counter>,
    stream_removed_unconsumed: Family<StreamLabels, Counter>,
    connections_open: Family<ListenerLabels, Gauge<i64, AtomicI64>>,
    connections_refused: Family<ListenerLabels, Counter>,
    /// The handles of each declared event type's series, resolved once by
    /// `init_event_types`.
    known: Arc<OnceLock<KnownSeries>>,
}

/// The series a declared event type updates for every message, resolved
/// once at start: looked up by name in a map with a fast hash, a message's
/// metrics then cost no label allocation, SipHash or family lock (about 2 %
/// of a room's instructions per input, in a callgrind profile, went to
/// those). Undeclared types (`unknown`) go through the families.
type KnownSeries = HashMap<String, EventSeries, foldhash::fast::RandomState>;

/// `processed` and `duration` of one event type, one slot per [`Outcome`]
/// (an outcome without a slot, or with an empty one, goes through the
/// families).
type OutcomeSeries = [Option<(Counter, LatencyHistogram)>; 4];

struct EventSeries {
    received: Counter,
    /// `processed` and `duration`, by [`Outcome::index`], for the outcomes
    /// the type can end with (an input's three, an output's `skipped`).
    outcomes: OutcomeSeries,
    /// An output's `published` ok and error, and the duration of ok.
    published: Option<(Counter, Counter, LatencyHistogram)>,
}

impl RoomMetrics {
    /// The room's registry; `process` when this room's metrics port is the
    /// one that serves the process-wide families (see [`ProcessMetrics`]).
    pub fn new(room: &str, process: Option<&ProcessMetrics>) -> Self {
        let mut registry = Registry::with_labels(std::iter::once((
            std::borrow::Cow::Borrowed("room"),
            std::borrow::Cow::Owned(room.to_string()),
        )));
        let metrics = RoomMetrics {
            registry: Arc::default(),
            process: None,
            received: Family::default(),
            processed: Family::default(),
            dead_letters: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            in_flight: Gauge::default(),
            ready: Gauge::default(),
            paused: Gauge::default(),
            consumer_pending: Gauge::default(),
            consumer_ack_pending: Gauge::default(),
            consumer_redelivered: Gauge::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            grpc_requests: Family::default(),
            grpc_duration: Family::new_with_constructor(latency_histogram),
            published: Family::default(),
            publish_duration: Family::new_with_constructor(latency_histogram),
            store_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            stream_replicas: Family::default(),
            stream_current_replicas: Family::default(),
            stream_replica_lag: Family::default(),
            stream_leader_changes: Family::default(),
            stream_removed_unconsumed: Family::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
            known: Arc::default(),
        };
        for listener in ["http", "grpc", "metrics"] {
            let labels = ListenerLabels { listener };
            let _ = metrics.connections_open.get_or_create(&labels);
            let _ = metrics.connections_refused.get_or_create(&labels);
        }
        let m = &metrics;
        registry.register(
            "choco_consumer_messages_received",
            "Messages delivered to the room's consumer",
            m.received.clone(),
        );
        registry.register(
            "choco_consumer_messages_processed",
            "Deliveries the room finished with, by outcome",
            m.processed.clone(),
        );
        registry.register(
            "choco_consumer_dlq_messages",
            "Messages moved to the dead-letter stream, by reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "choco_consumer_processing_duration_seconds",
            "Time from delivery to acknowledgement, by outcome",
            m.duration.clone(),
        );
        registry.register(
            "choco_consumer_in_flight_messages",
            "Messages held by the room: queued behind their aggregate or being handled",
            m.in_flight.clone(),
        );
        registry.register(
            "choco_consumer_pending_messages",
            "Messages in the stream not yet delivered to the room's consumer (sampled)",
            m.consumer_pending.clone(),
        );
        registry.register(
            "choco_consumer_ack_pending_messages",
            "Messages delivered to the consumer and not yet acknowledged (sampled)",
            m.consumer_ack_pending.clone(),
        );
        registry.register(
            "choco_consumer_redelivered_messages",
            "Messages delivered more than once and not yet acknowledged (sampled)",
            m.consumer_redelivered.clone(),
        );
        registry.register(
            "choco_room_ready",
            "1 while the room is connected to NATS and bound to its consumer",
            m.ready.clone(),
        );
        registry.register(
            "choco_room_paused",
            "1 while an operator has the room paused (it pulls nothing and reports not ready)",
            m.paused.clone(),
        );
        registry.register(
            "choco_http_server_requests",
            "HTTP requests answered, by route, method and status",
            m.http_requests.clone(),
        );
        registry.register(
            "choco_http_server_request_duration_seconds",
            "HTTP request latency, by route, method and status",
            m.http_duration.clone(),
        );
        registry.register(
            "choco_grpc_server_requests",
            "gRPC calls answered, by method and status code",
            m.grpc_requests.clone(),
        );
        registry.register(
            "choco_grpc_server_request_duration_seconds",
            "gRPC call latency, by method and status code",
            m.grpc_duration.clone(),
        );
        registry.register(
            "choco_publish_messages",
            "Envelopes published to JetStream, by event type and outcome",
            m.published.clone(),
        );
        registry.register(
            "choco_publish_duration_seconds",
            "Time from sending an envelope to JetStream's acknowledgement",
            m.publish_duration.clone(),
        );
        registry.register(
            "choco_store_operation_duration_seconds",
            "Key-value and object store operations, by bucket, operation and outcome",
            m.store_duration.clone(),
        );
        registry.register(
            "choco_stream_replicas",
            "Copies of the room's stream the server is configured to keep (sampled)",
            m.stream_replicas.clone(),
        );
        registry.register(
            "choco_stream_current_replicas",
            "Copies of the room's stream that are up to date: its leader and every current replica \
             (sampled)",
            m.stream_current_replicas.clone(),
        );
        registry.register(
            "choco_stream_replica_lag_operations",
            "Operations the most-lagging replica of the room's stream is behind its leader (sampled)",
            m.stream_replica_lag.clone(),
        );
        registry.register(
            "choco_stream_leader_changes",
            "Times the room's stream was seen with a new leader",
            m.stream_leader_changes.clone(),
        );
        registry.register(
            "choco_stream_messages_removed_unconsumed",
            "Messages the stream's limits (max_age, max_bytes) removed before they were ever \
             delivered to the room",
            m.stream_removed_unconsumed.clone(),
        );
        registry.register(
            "choco_server_connections_open",
            "Client connections the room's listener holds now",
            m.connections_open.clone(),
        );
        registry.register(
            "choco_server_connections_refused",
            "Connections closed at accept because the listener's or the process's bound was reached",
            m.connections_refused.clone(),
        );
        RoomMetrics {
            registry: Arc::new(registry),
            process: process.map(|process| process.registry.clone()),
            ..metrics
        }
    }

    fn known(&self, event_type: &str) -> Option<&EventSeries> {
        self.known.get()?.get(event_type)
    }

    pub fn received(&self, event_type: &str) {
        if let Some(series) = self.known(event_type) {
            series.received.inc();
            return;
        }
        self.received
            .get_or_create(&EventLabels {
                event_type: event_type.to_string(),
            })
            .inc();
    }

    pub fn finished(&self, event_type: &str, outcome: Outcome, seconds: f64) {
        if let Some((processed, duration)) = self
            .known(event_type)
            .and_then(|series| series.outcomes.get(outcome.index())?.as_ref())
        {
            processed.inc();
            duration.observe(seconds, exemplar(), None);
            return;
        }
        let labels = OutcomeLabels {
            event_type: event_type.to_string(),
            outcome,
        };
        self.processed.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(seconds, exemplar(), None);
    }

    pub fn dead_lettered(&self, event_type: &str, reason: &str) {
        self.dead_letters
            .get_or_create(&DeadLetterLabels {
                event_type: event_type.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn http_request(&self, labels: HttpLabels, seconds: f64) {
        self.http_requests.get_or_create(&labels).inc();
        self.http_duration
            .get_or_create(&labels)
            .observe(seconds, exemplar(), None);
    }

    pub fn grpc_request(&self, labels: GrpcLabels, seconds: f64) {
        self.grpc_requests.get_or_create(&labels).inc();
        self.grpc_duration
            .get_or_create(&labels)
            .observe(seconds, exemplar(), None);
    }

    pub fn published(&self, event_type: &str, ok: bool, seconds: f64) {
        if let Some((published_ok, published_error, duration)) = self
            .known(event_type)
            .and_then(|series| series.published.as_ref())
        {
            if ok {
                published_ok.inc();
                duration.observe(seconds, exemplar(), None);
            } else {
                published_error.inc();
            }
            return;
        }
        self.published
            .get_or_create(&PublishLabels {
                event_type: event_type.to_string(),
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
        if ok {
            self.publish_duration
                .get_or_create(&EventLabels {
                    event_type: event_type.to_string(),
                })
                .observe(seconds, exemplar(), None);
        }
    }

    /// Makes the consumer series of the room's declared event types exist at
    /// 0 from the start (as Prometheus advises for known label sets), so
    /// `rate()` and the alerts over them work from the first scrape: for
    /// each input what it is received, processed and timed as, for each
    /// output its `skipped` (seen back on the prefix) and its publishes
    /// (ok and error), and the `unknown` bucket of undeclared types. Their
    /// handles are kept for the messages to come (see [`KnownSeries`]).
    pub fn init_event_types(&self, inputs: &[String], outputs: &[String]) {
        // Undeclared types count as `unknown`, through the family; the
        // declared ones' series are made below, with their handles.
        let _ = self.received.get_or_create(&EventLabels {
            event_type: "unknown".to_string(),
        });
        let mut known = KnownSeries::default();
        let declared = inputs
            .iter()
            .map(|input| (input, true))
            .chain(outputs.iter().map(|output| (output, false)));
        for (event_type, is_input) in declared {
            let ends = if is_input {
                &[Outcome::Ok, Outcome::Retried, Outcome::DeadLettered][..]
            } else {
                &[Outcome::Skipped][..]
            };
            // Each handle is cloned out in a statement of its own: a
            // family's read guard held while the same family creates the
            // next series would wait for itself.
            let mut outcomes = OutcomeSeries::default();
            for &outcome in ends {
                let labels = OutcomeLabels {
                    event_type: event_type.clone(),
                    outcome,
                };
                let processed = self.processed.get_or_create(&labels).clone();
                let duration = self.duration.get_or_create(&labels).clone();
                if let Some(slot) = outcomes.get_mut(outcome.index()) {
                    *slot = Some((processed, duration));
                }
            }
            let published = (!is_input).then(|| {
                let publish_labels = |outcome| PublishLabels {
                    event_type: event_type.clone(),
                    outcome,
                };
                let ok = self.published.get_or_create(&publish_labels("ok")).clone();
                let error = self
                    .published
                    .get_or_create(&publish_labels("error"))
                    .clone();
                let duration = self
                    .publish_duration
                    .get_or_create(&EventLabels {
                        event_type: event_type.clone(),
                    })
                    .clone();
                (ok, error, duration)
            });
            let received = self
                .received
                .get_or_create(&EventLabels {
                    event_type: event_type.clone(),
                })
                .clone();
            known.insert(
                event_type.clone(),
                EventSeries {
                    received,
                    outcomes,
                    published,
                },
            );
        }
        // Set once: the room's declared types do not change while it runs.
        let _ = self.known.set(known);
    }

    /// Makes the dead-letter series of every reason the room may give
    /// exist at 0: for each input, each of `reasons`; for undeclared types
    /// (`unknown`), the two reasons they can get.
    pub fn init_dead_letter_reasons(&self, inputs: &[String], reasons: &[&str]) {
        for event_type in inputs {
            for reason in reasons.iter().filter(|r| **r != "unknown_event_type") {
                let _ = self.dead_letters.get_or_create(&DeadLetterLabels {
                    event_type: event_type.clone(),
                    reason: reason.to_string(),
                });
            }
        }
        for reason in ["unknown_event_type", "envelope_too_large"] {
            let _ = self.dead_letters.get_or_create(&DeadLetterLabels {
                event_type: "unknown".into(),
                reason: reason.into(),
            });
        }
    }

    /// Makes the gRPC request series of every method of the room's service
    /// exist at 0 with code `OK`, so a rate or an error ratio over them
    /// works from the first scrape.
    pub fn init_grpc_methods(&self, methods: &[String]) {
        for method in methods {
            let labels = GrpcLabels {
                method: method.clone(),
                code: "OK".into(),
            };
            let _ = self.grpc_requests.get_or_create(&labels);
            let _ = self.grpc_duration.get_or_create(&labels);
        }
    }

    /// Makes the room's stream's series exist at 0 before the first sample,
    /// so rules over them work from the first scrape.
    pub fn init_stream(&self, stream: &str) {
        let labels = StreamLabels {
            stream: stream.to_string(),
        };
        let _ = self.stream_replicas.get_or_create(&labels);
        let _ = self.stream_current_replicas.get_or_create(&labels);
        let _ = self.stream_replica_lag.get_or_create(&labels);
        let _ = self.stream_leader_changes.get_or_create(&labels);
        let _ = self.stream_removed_unconsumed.get_or_create(&labels);
    }

    /// One sample of the room's stream's replication.
    pub fn stream_sampled(&self, stream: &str, configured: usize, current: usize, max_lag: u64) {
        let labels = StreamLabels {
            stream: stream.to_string(),
        };
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.stream_replicas
            .get_or_create(&labels)
            .set(gauge(configured as u64));
        self.stream_current_replicas
            .get_or_create(&labels)
            .set(gauge(current as u64));
        self.stream_replica_lag
            .get_or_create(&labels)
            .set(gauge(max_lag));
    }

    /// The open and refused counts of one listener (`http`, `grpc`, `metrics`).
    pub fn listener(&self, listener: &'static str) -> (Gauge<i64, AtomicI64>, Counter) {
        let labels = ListenerLabels { listener };
        (
            self.connections_open.get_or_create(&labels).clone(),
            self.connections_refused.get_or_create(&labels).clone(),
        )
    }

    pub fn stream_leader_changed(&self, stream: &str) {
        self.stream_leader_changes
            .get_or_create(&StreamLabels {
                stream: stream.to_string(),
            })
            .inc();
    }

    pub fn stream_removed_unconsumed(&self, stream: &str, messages: u64) {
        self.stream_removed_unconsumed
            .get_or_create(&StreamLabels {
                stream: stream.to_string(),
            })
            .inc_by(messages);
    }

    pub fn store_operation(&self, labels: StoreLabels, seconds: f64) {
        self.store_duration.get_or_create(&labels).observe(seconds);
    }

    /// The registry in the OpenMetrics text format.
    /// Whether this room's port is the process's home (see
    /// [`ProcessMetrics`]): it also reports what is shared by every room,
    /// such as the dead-letter stream.
    pub fn is_process_home(&self) -> bool {
        self.process.is_some()
    }

    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(process) = &self.process {
            let _ = encode_registry(&mut out, process);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

/// Rewrites OpenMetrics text as the classic Prometheus text format (0.0.4):
/// counters are named with their `_total` suffix in HELP and TYPE, `unknown`
/// becomes `untyped`, and exemplars, UNIT lines and `# EOF` go.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .map(|rest| ("# HELP ", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)))
        {
            let (kind, rest) = rest;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let tail = if kind == "# TYPE " && tail == "unknown" {
                "untyped"
            } else {
                tail
            };
            let suffix = if counters.contains(name) {
                "_total"
            } else {
                ""
            };
            out.push_str(&format!("{kind}{name}{suffix} {tail}\n"));
            continue;
        }
        // A sample, maybe with an exemplar after ` # `.
        let sample = line.split_once(" # ").map_or(line, |(sample, _)| sample);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Whether a scraper's `Accept` headers prefer OpenMetrics to the classic
/// text format, by their q-values (RFC 9110 §12.5.1): OpenMetrics when
/// `application/openmetrics-text` is acceptable (q > 0) and weighted at
/// least as high as any range matching `text/plain`; the text format
/// otherwise, and without an `Accept` at all.
pub fn prefers_openmetrics<'a>(accept: impl IntoIterator<Item = &'a str>) -> bool {
    let mut openmetrics: Option<f32> = None;
    let mut text: Option<f32> = None;
    for range in accept.into_iter().flat_map(|value| value.split(',')) {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|param| param.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, value)| value.trim().parse::<f32>().ok())
            // An unreadable q makes the range unusable rather than preferred.
            .unwrap_or(0.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut openmetrics,
            "text/plain" | "text/*" | "*/*" => &mut text,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |best: f32| best.max(q)));
    }
    match openmetrics {
        Some(q) if q > 0.0 => q >= text.unwrap_or(0.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_is_negotiated_by_q_values() {
        // What Prometheus sends by default.
        assert!(prefers_openmetrics([
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        ]));
        assert!(prefers_openmetrics(["application/openmetrics-text"]));
        assert!(!prefers_openmetrics([]));
        assert!(!prefers_openmetrics(["*/*"]));
        assert!(!prefers_openmetrics(["text/plain"]));
        // Named but refused, or ranked below the text format.
        assert!(!prefers_openmetrics(["application/openmetrics-text;q=0"]));
        assert!(!prefers_openmetrics([
            "application/openmetrics-text; q=0.2, text/plain; q=0.9"
        ]));
        assert!(!prefers_openmetrics([
            "application/openmetrics-text;q=banana"
        ]));
        // A substring of another type is not OpenMetrics.
        assert!(!prefers_openmetrics(["application/openmetrics-text-v2"]));
        // Several headers count together.
        assert!(prefers_openmetrics([
            "text/plain;q=0.1",
            "application/openmetrics-text"
        ]));
    }

    #[test]
    fn exposes_the_platform_metric_names_with_room_labels() {
        let metrics = RoomMetrics::new("conch", None);
        metrics.received("coordination.x");
        metrics.finished("coordination.x", Outcome::DeadLettered, 0.002);
        metrics.dead_lettered("coordination.x", "malformed_envelope");
        let text = metrics.encode();
        for expected in [
            r#"choco_consumer_messages_received_total{room="conch",event_type="coordination.x"} 1"#,
            r#"choco_consumer_messages_processed_total{room="conch",event_type="coordination.x",outcome="dead_lettered"} 1"#,
            r#"choco_consumer_dlq_messages_total{room="conch",event_type="coordination.x",reason="malformed_envelope"} 1"#,
            r#"choco_consumer_processing_duration_seconds_count{room="conch",event_type="coordination.x",outcome="dead_lettered"} 1"#,
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
    }

    /// A declared type's messages update the same series through the
    /// handles kept at start as an undeclared one does through the
    /// families, and the declared ones exist at 0 before any message.
    #[test]
    fn declared_event_types_count_through_their_kept_handles() {
        let metrics = RoomMetrics::new("conch", None);
        metrics.init_event_types(
            &["coordination.in".to_string()],
            &["coordination.out".to_string()],
        );
        // Each declared type keeps the handles of the outcomes it can end
        // with, and an output those of its publishes.
        for (declared, ends, publishes) in [
            (
                "coordination.in",
                &[Outcome::Ok, Outcome::Retried, Outcome::DeadLettered][..],
                false,
            ),
            ("coordination.out", &[Outcome::Skipped][..], true),
        ] {
            let series = metrics.known(declared);
            assert!(series.is_some(), "{declared} kept");
            for outcome in [
                Outcome::Ok,
                Outcome::Skipped,
                Outcome::Retried,
                Outcome::DeadLettered,
            ] {
                let kept = series.is_some_and(|series| series.outcomes[outcome.index()].is_some());
                assert_eq!(kept, ends.contains(&outcome), "{declared} {outcome:?}");
            }
            let kept = series.is_some_and(|series| series.published.is_some());
            assert_eq!(kept, publishes, "{declared} publishes");
        }
        assert!(metrics.known("unknown").is_none());
        let before = metrics.encode();
        for expected in [
            r#"choco_publish_messages_total{room="conch",event_type="coordination.out",outcome="error"} 0"#,
            r#"choco_consumer_messages_processed_total{room="conch",event_type="coordination.in",outcome="retried"} 0"#,
        ] {
            assert!(before.contains(expected), "missing {expected} in\n{before}");
        }
        metrics.received("coordination.in");
        metrics.finished("coordination.in", Outcome::Ok, 0.002);
        metrics.received("coordination.out");
        metrics.finished("coordination.out", Outcome::Skipped, 0.001);
        metrics.published("coordination.out", true, 0.003);
        metrics.published("coordination.out", false, 0.0);
        // An outcome a type was not declared with, and an undeclared type.
        metrics.finished("coordination.out", Outcome::Ok, 0.001);
        metrics.received("unknown");
        let text = metrics.encode();
        for expected in [
            r#"choco_consumer_messages_received_total{room="conch",event_type="coordination.in"} 1"#,
            r#"choco_consumer_messages_processed_total{room="conch",event_type="coordination.in",outcome="ok"} 1"#,
            r#"choco_consumer_processing_duration_seconds_count{room="conch",event_type="coordination.in",outcome="ok"} 1"#,
            r#"choco_consumer_messages_received_total{room="conch",event_type="coordination.out"} 1"#,
            r#"choco_consumer_messages_processed_total{room="conch",event_type="coordination.out",outcome="skipped"} 1"#,
            r#"choco_consumer_messages_processed_total{room="conch",event_type="coordination.out",outcome="ok"} 1"#,
            r#"choco_publish_messages_total{room="conch",event_type="coordination.out",outcome="ok"} 1"#,
            r#"choco_publish_messages_total{room="conch",event_type="coordination.out",outcome="error"} 1"#,
            r#"choco_publish_duration_seconds_count{room="conch",event_type="coordination.out"} 1"#,
            r#"choco_consumer_messages_received_total{room="conch",event_type="unknown"} 1"#,
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
    }

    #[test]
    fn the_prometheus_text_has_counter_names_with_total_and_no_exemplars() {
        let om = "# HELP a_x Some.\n# TYPE a_x counter\na_x_total{room=\"r\"} 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 1 # {trace_id=\"ab\"} 0.5\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP a_x_total Some.\n# TYPE a_x_total counter\na_x_total{room=\"r\"} 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\n"
        );
    }
}
