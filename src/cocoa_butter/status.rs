//! A room's state: the only source of its readiness. `/readyz`, gRPC
//! health, the `choco_room_ready` gauge (computed at scrape), systemd's
//! READY/STATUS and NATS discovery all read [`RoomState`], so they can
//! never disagree. Also what the room reports about itself (`/info`).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use async_nats::jetstream;
use serde::Serialize;
use tokio::sync::watch;

use crate::cocoa_butter::config::NatsConfig;
use crate::cocoa_butter::control::Desired;
use crate::cocoa_butter::streams::BucketStorage;

/// Whether a room can do its work right now (behind /readyz and gRPC
/// health), and what the room reports about itself at run time (`/info`,
/// `$SRV.STATS`, the admin routes).
pub struct RoomState {
    js: jetstream::Context,
    nats: NatsConfig,
    /// How the shared buckets (`choco_control`, replays) are kept.
    buckets: BucketStorage,
    bound: AtomicBool,
    /// Servers of the room that failed and are not serving again yet.
    servers_down: AtomicUsize,
    /// The operator's desired state from `choco_control`, as last seen.
    desired: watch::Sender<Desired>,
    last_error: Mutex<Option<LastError>>,
    /// The room's dead letters: sampled from the DLQ stream, and counted up
    /// at once when the room dead-letters, so discovery sees it without a
    /// JetStream request per `$SRV.STATS`.
    dead_letters: AtomicU64,
    /// Inputs held in place because NATS failed their handling, and the
    /// last such failure: the room is not ready while any is held.
    bus_holds: AtomicUsize,
    bus_fault: Mutex<Option<String>>,
    /// The room's stream or consumer has no leader or does not answer, as
    /// last sampled (`None` while they are led).
    replication_fault: Mutex<Option<String>>,
    /// What the sampler last saw, kept across restarts of the consumer
    /// loop: the stream's leader (to count changes) and the stream sequence
    /// up to which removals by the stream's limits have been counted.
    pub sampled: Mutex<SampledStream>,
}

#[derive(Debug, Default)]
pub struct SampledStream {
    pub leader: Option<String>,
    pub removals_counted_upto: Option<u64>,
}

/// One input held for a failure of NATS; releases its count when dropped.
pub(crate) struct BusHold<'a> {
    state: &'a RoomState,
}

impl Drop for BusHold<'_> {
    fn drop(&mut self) {
        self.state.bus_holds.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The last thing that went wrong in a room, for people.
#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    pub message: String,
    /// RFC 3339.
    pub at: String,
}

impl RoomState {
    pub fn new(js: jetstream::Context, nats: NatsConfig, buckets: BucketStorage) -> Self {
        RoomState {
            buckets,
            js,
            nats,
            bound: AtomicBool::new(false),
            servers_down: AtomicUsize::new(0),
            desired: watch::Sender::new(Desired::default()),
            last_error: Mutex::new(None),
            dead_letters: AtomicU64::new(0),
            bus_holds: AtomicUsize::new(0),
            bus_fault: Mutex::new(None),
            replication_fault: Mutex::new(None),
            sampled: Mutex::new(SampledStream::default()),
        }
    }

    /// What the last sample of the room's stream and consumer found wrong
    /// with their leadership, or `None`.
    pub fn set_replication_fault(&self, fault: Option<String>) {
        match self.replication_fault.lock() {
            Ok(mut guard) => *guard = fault,
            Err(poisoned) => *poisoned.into_inner() = fault,
        }
    }

    fn replication_fault(&self) -> Option<String> {
        match self.replication_fault.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn hold_for_bus(&self, detail: &str) -> BusHold<'_> {
        match self.bus_fault.lock() {
            Ok(mut guard) => *guard = Some(detail.to_string()),
            Err(poisoned) => *poisoned.into_inner() = Some(detail.to_string()),
        }
        self.bus_holds.fetch_add(1, Ordering::AcqRel);
        BusHold { state: self }
    }

    /// The last NATS failure an input is held for, while any is.
    fn bus_fault(&self) -> Option<String> {
        if self.bus_holds.load(Ordering::Acquire) == 0 {
            return None;
        }
        match self.bus_fault.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The JetStream context the room's operator routes work with.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn bucket_storage(&self) -> &BucketStorage {
        &self.buckets
    }

    pub fn nats_config(&self) -> &NatsConfig {
        &self.nats
    }

    pub fn nats_connected(&self) -> bool {
        self.js.client().connection_state() == async_nats::connection::State::Connected
    }

    pub fn consumer_bound(&self) -> bool {
        self.bound.load(Ordering::Acquire)
    }

    pub fn set_bound(&self, bound: bool) {
        self.bound.store(bound, Ordering::Release);
    }

    pub fn servers_up(&self) -> bool {
        self.servers_down.load(Ordering::Acquire) == 0
    }

    /// A server of the room failed (`true`) or serves again (`false`).
    pub fn set_server_down(&self, down: bool) {
        if down {
            self.servers_down.fetch_add(1, Ordering::AcqRel);
        } else {
            self.servers_down.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub fn paused(&self) -> bool {
        self.desired.borrow().paused
    }

    /// The operator's desired state as this process last saw it.
    pub fn desired(&self) -> Desired {
        self.desired.borrow().clone()
    }

    /// Records the desired state read from `choco_control`.
    pub fn set_desired(&self, desired: Desired) {
        self.desired.send_replace(desired);
    }

    /// Follows changes of the desired state.
    pub fn watch_desired(&self) -> watch::Receiver<Desired> {
        self.desired.subscribe()
    }

    pub fn record_error(&self, message: impl Into<String>) {
        let error = LastError {
            message: message.into(),
            at: crate::cocoa_butter::envelope::rfc3339(&chrono::Utc::now()),
        };
        // A poisoned lock only means a panic mid-write of a diagnostic.
        match self.last_error.lock() {
            Ok(mut guard) => *guard = Some(error),
            Err(poisoned) => *poisoned.into_inner() = Some(error),
        }
    }

    pub fn last_error(&self) -> Option<LastError> {
        match self.last_error.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.load(Ordering::Relaxed)
    }

    pub fn set_dead_letters(&self, count: u64) {
        self.dead_letters.store(count, Ordering::Relaxed);
    }

    /// Counts a dead letter the room just wrote, before the next sample.
    pub fn count_dead_letter(&self) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Running as its operator wants it: ready, or paused on purpose with
    /// nothing else wrong. What systemd's READY=1 waits for: a pause
    /// survives restarts, so a paused room is a desired state of a
    /// started unit, not a start that has not finished.
    pub fn as_desired(&self) -> bool {
        self.fault().is_none()
    }

    /// Why the room is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(fault) = self.fault() {
            return Some(fault);
        }
        let desired = self.desired.borrow();
        if desired.paused {
            return Some(match &desired.reason {
                Some(reason) => format!("paused by an operator: {reason}"),
                None => "paused by an operator".into(),
            });
        }
        None
    }

    /// What keeps the room from serving other than an operator's pause.
    fn fault(&self) -> Option<String> {
        if !self.nats_connected() {
            return Some("not connected to NATS".into());
        }
        if !self.consumer_bound() {
            return Some(match self.last_error() {
                Some(error) => format!("consumer not bound (last error: {})", error.message),
                None => "consumer not bound".into(),
            });
        }
        if !self.servers_up() {
            return Some("a server of the room is restarting".into());
        }
        if let Some(fault) = self.replication_fault() {
            return Some(fault);
        }
        if let Some(fault) = self.bus_fault() {
            return Some(format!(
                "holding inputs until NATS answers (not counted as deliveries): {fault}"
            ));
        }
        None
    }
}

/// Where a room's three servers listen, as bound.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BoundAddrs {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

/// What `/info` shows.
#[derive(Debug, Clone, Serialize)]
pub struct RoomInfo {
    pub room: String,
    pub label: String,
    pub service: String,
    pub version: &'static str,
    pub domain: String,
    pub subject_prefix: String,
    pub stream: String,
    pub consumer: String,
    pub grpc_service: &'static str,
    pub addresses: BoundAddrs,
}
