//! The consumer engine: from a durable pull consumer to acknowledged work.
//!
//! ```text
//! pull stream ──▶ dispatch ──┬─▶ not an input: own output → ack │ unknown → DLQ
//!  (batch, heartbeats)       ├─▶ bad envelope/payload → DLQ (no retries)
//!                            └─▶ lane of its aggregate_id ──▶ Room::handle
//!                                   (one at a time, in        ├─ Ok → publish outputs → ack
//!                                    stream order)            ├─ Permanent → DLQ → term
//!                                                             ├─ Transient → nak(backoff) or DLQ on last delivery
//!                                                             └─ Bus → hold in place, handle again once NATS answers
//! ```
//!
//! Ordering: each aggregate has at most one lane, and a lane handles its
//! messages one after another in the order they were pulled, which is
//! stream order. Lanes of different aggregates run concurrently; a semaphore
//! bounds the messages held at once (`consumer.max_in_flight`).
//!
//! A transient failure is nak'd with a delay so the server redelivers it. So
//! that later events of the same aggregate cannot overtake it meanwhile, its
//! lane holds them (keeping them alive with in-progress acks) until the
//! nak'd message comes back, or until its delay plus one ack-wait has passed
//! (then another replica has it).
//!
//! A failure of NATS itself (`HandleError::Bus`: a store call or a publish
//! that timed out, a stream without a leader) is not the input's fault and
//! must not burn its deliveries: the lane keeps the message (in-progress
//! acks), waits with backoff and handles it again in place, as often as it
//! takes, while the room reports not ready. Since every lane does so, the
//! room's slots fill and it stops pulling until NATS answers again.
//!
//! Every handler call has a deadline (`consumer.handler_timeout`): one that
//! has not returned by then is cancelled and retried like a transient
//! failure, and dead-lettered as `handler_timeout` on its last delivery.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::FutureExt;
use opentelemetry::trace::Status;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::config::{NatsConfig, RoomSettings};
use super::control::Desired;
use super::dlq::{self, DeadLetter};
use super::envelope::EventEnvelope;
use super::metrics::{Outcome, RoomMetrics};
use super::nats::pull::{PullError, Puller};
use super::nats::streams::{BucketStorage, StoreStreams};
use super::nats::{self, Publisher};
use super::room::{HandleError, InboundEvent, Room};
use super::telemetry::{self, propagation};

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
struct BusHold<'a> {
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

    fn hold_for_bus(&self, detail: &str) -> BusHold<'_> {
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

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot open the pull stream: {0}")]
    Open(String),
    #[error("pull stream failed: {0}")]
    Stream(String),
    #[error("pull stream ended")]
    Ended,
}

/// One room's consumer: everything needed to turn deliveries into outcomes.
pub struct Engine {
    pub room: Arc<dyn Room>,
    pub settings: RoomSettings,
    pub nats: NatsConfig,
    pub js: jetstream::Context,
    pub publisher: Publisher,
    pub metrics: RoomMetrics,
    /// Larger envelopes are dead-lettered unread (`limits.max_envelope_bytes`).
    pub max_envelope_bytes: usize,
    /// Where the engine reports its last error and its dead letters.
    pub state: Arc<RoomState>,
    /// Cancelled at shutdown: an input held for a NATS failure is then
    /// left unacknowledged (the server redelivers it after `ack_wait`).
    pub intake: CancellationToken,
    /// The streams under the room's buckets, probed with its own stream
    /// when a store call fails (see [`Engine::bus_is_failing`]).
    pub store_streams: StoreStreams,
}

/// A delivery holding its share of the in-flight bound until dropped.
struct Job {
    message: jetstream::Message,
    event: InboundEvent,
    event_type: String,
    started: Instant,
    /// The message's span: every line and child span of its handling.
    span: tracing::Span,
    incoming: propagation::TraceHeaders,
    _slot: Slot,
}

struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: RoomMetrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

/// After a nak, the lane waits for this sequence to come back.
#[derive(Clone, Copy)]
struct AwaitRedelivery {
    sequence: u64,
    until: Instant,
}

type LaneMap = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>>;

/// Returns a message that was delivered but never started, so a replica
/// (or this process after a restart) gets it now rather than after ack_wait.
async fn hand_back(message: jetstream::Message) {
    if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
        tracing::debug!(error = %err, "handing back a message failed; it returns after ack_wait");
    }
}

impl Engine {
    /// Pulls and dispatches until `intake` is cancelled (then drains what it
    /// holds and returns Ok) or the pull stream fails (then drains and
    /// returns the error, and the supervisor binds again).
    pub async fn run(
        self: Arc<Self>,
        consumer: PullConsumer,
        intake: CancellationToken,
    ) -> Result<(), ConsumerError> {
        let cfg = &self.settings.consumer;
        // Pull as the consumer on the server is set up (which is the
        // configured ordering unless an operator has yet to switch it).
        let server = &consumer.cached_info().config;
        let pinned_ttl = (server.priority_policy
            == async_nats::jetstream::consumer::PriorityPolicy::PinnedClient)
            .then_some(server.priority_timeout);
        // Our own puller, not async-nats' pull stream, whose counting race
        // stalls delivery for tens of seconds under load (see nats/pull.rs). A
        // standby replica's pulls of a pinned consumer wait until the
        // pinned one's pin lapses; the puller keeps and renews the pin id.
        let mut messages = Puller::new(
            &self.js,
            &consumer,
            cfg.batch,
            cfg.pull_expiry(pinned_ttl),
            cfg.heartbeat,
            pinned_ttl.is_some().then_some(nats::PINNED_GROUP),
        )
        .await
        .map_err(|err| ConsumerError::Open(err.to_string()))?;

        let slots = Arc::new(Semaphore::new(cfg.max_in_flight));
        let lanes: LaneMap = Arc::default();
        let tasks = TaskTracker::new();
        let result = loop {
            let next = tokio::select! {
                _ = intake.cancelled() => break Ok(()),
                next = messages.next() => next,
            };
            let message = match next {
                Ok(message) => message,
                Err(PullError::Closed) => break Err(ConsumerError::Ended),
                Err(err) => break Err(ConsumerError::Stream(err.to_string())),
            };
            // The slot is taken once a message is here, not before polling:
            // so the pull stream is polled, and keeps its pulls open (and a
            // pinned replica its pin), while every slot is busy. At most
            // this one message waits for a slot; with `pinned` the server
            // bounds unacked messages by `max_in_flight`, so the wait is
            // short.
            // While every slot is held (lanes holding inputs for a failing
            // NATS, say), the waiting message is kept alive so it does not
            // come back as a counted redelivery.
            let keepalive = cfg.ack_wait / 3;
            let acquire = slots.clone().acquire_owned();
            tokio::pin!(acquire);
            let permit = loop {
                tokio::select! {
                    _ = intake.cancelled() => break None,
                    permit = &mut acquire => break permit.ok(),
                    _ = tokio::time::sleep(keepalive) => {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                }
            };
            let Some(permit) = permit else {
                hand_back(message).await;
                break Ok(());
            };
            self.metrics.in_flight.inc();
            let slot = Slot {
                _permit: permit,
                metrics: self.metrics.clone(),
            };
            self.dispatch(message, slot, &lanes, &tasks, &intake);
        };
        // Stop pulling. Messages the client already buffered were delivered
        // to us but never started: hand them back at once so a replica (or
        // our restart) takes them now rather than after ack_wait.
        while let Some(message) = messages.next_buffered() {
            hand_back(message).await;
        }
        drop(messages);
        tasks.close();
        tasks.wait().await;
        result
    }

    fn dispatch(
        self: &Arc<Self>,
        message: jetstream::Message,
        slot: Slot,
        lanes: &LaneMap,
        tasks: &TaskTracker,
        intake: &CancellationToken,
    ) {
        let started = Instant::now();
        let (sequence, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(err) => {
                // Not a JetStream delivery: nothing to ack or dead-letter.
                tracing::warn!(error = %err, subject = %message.subject, "message without JetStream metadata ignored");
                return;
            }
        };
        let subject = message.subject.to_string();
        let action = subject
            .strip_prefix(&self.settings.subject_base)
            .unwrap_or(&subject)
            .to_string();
        let event_type = self.settings.event_type(&action);
        self.metrics.received(self.metric_label(&event_type));

        if self.room.outputs().contains(&action.as_str()) {
            let engine = self.clone();
            tasks.spawn(async move {
                let _slot = slot;
                if let Err(err) = message.ack().await {
                    tracing::warn!(error = %err, "ack of an own output failed; it will be redelivered and skipped again");
                }
                engine.metrics.finished(&event_type, Outcome::Skipped, secs(started));
            }.in_current_span());
            return;
        }

        // The span of this delivery, in the messaging conventions; it
        // continues the trace of whoever published the message.
        let incoming = propagation::TraceHeaders::from_nats(message.headers.as_ref());
        let span = telemetry::message_span(
            &subject,
            &self.settings.durable_name,
            delivered,
            sequence,
            &incoming,
        );
        if let Some(id) = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
        {
            span.record("messaging.message.id", id.as_str());
        }

        let size = message.payload.len();
        let verdict = if size > self.max_envelope_bytes {
            // Checked before decoding, so an oversized body costs no parse.
            Err(HandleError::permanent(
                "envelope_too_large",
                format!(
                    "envelope of {size} bytes is larger than limits.max_envelope_bytes ({})",
                    self.max_envelope_bytes
                ),
            ))
        } else if self.room.inputs().contains(&action.as_str()) {
            verify(&message.payload, &event_type)
        } else {
            Err(HandleError::permanent(
                "unknown_event_type",
                format!(
                    "{event_type} is not an input of {} (inputs: {})",
                    self.settings.service,
                    self.room.inputs().join(", ")
                ),
            ))
        };
        let envelope = match verdict {
            Ok(envelope) => envelope,
            Err(err) => {
                let engine = self.clone();
                tasks.spawn(
                    async move {
                        let _slot = slot;
                        engine
                            .finish_failed(&message, &event_type, sequence, delivered, started, err)
                            .await;
                    }
                    .instrument(span),
                );
                return;
            }
        };

        span.record("event_id", tracing::field::display(&envelope.event_id));
        span.record("correlation_id", envelope.correlation());
        span.record("aggregate_id", envelope.aggregate_id.as_str());
        let aggregate = envelope.aggregate_id.clone();
        let job = Job {
            event: InboundEvent {
                envelope,
                action,
                subject,
                stream_sequence: sequence,
                delivered,
            },
            message,
            event_type,
            started,
            span,
            incoming,
            _slot: slot,
        };
        let Ok(mut lanes_guard) = lanes.lock() else {
            // Only a panic while holding the lock poisons it; the message is
            // left unacknowledged and comes back after ack_wait.
            tracing::error!(
                sequence,
                "lane table poisoned; leaving the message for redelivery"
            );
            return;
        };
        let job = match lanes_guard.get(&aggregate) {
            Some(lane) => match lane.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        // A fresh channel with its receiver alive accepts the send.
        let _ = sender.send(job);
        lanes_guard.insert(aggregate.clone(), sender);
        drop(lanes_guard);
        tasks.spawn(
            self.clone()
                .lane(aggregate, receiver, lanes.clone(), intake.clone()),
        );
    }

    /// Handles one aggregate's messages in order, then removes itself.
    async fn lane(
        self: Arc<Self>,
        aggregate: String,
        mut receiver: mpsc::UnboundedReceiver<Job>,
        lanes: LaneMap,
        intake: CancellationToken,
    ) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut awaiting: Option<AwaitRedelivery> = None;
        let keepalive = self.settings.consumer.ack_wait / 3;
        loop {
            while let Ok(job) = receiver.try_recv() {
                queue.push_back(job);
            }
            if let Some(wait) = awaiting {
                if let Some(pos) = queue
                    .iter()
                    .position(|job| job.event.stream_sequence == wait.sequence)
                {
                    if let Some(job) = queue.remove(pos) {
                        awaiting = self
                            .process_in_lane(job, &mut queue, &mut receiver, keepalive)
                            .await;
                    }
                    continue;
                }
                if Instant::now() >= wait.until || intake.is_cancelled() {
                    // Gone to another replica, or we are shutting down: the
                    // held messages go on (or are redelivered after ack_wait).
                    awaiting = None;
                    if intake.is_cancelled() {
                        queue.clear();
                    }
                    continue;
                }
                let tick = (Instant::now() + keepalive).min(wait.until);
                tokio::select! {
                    job = receiver.recv() => if let Some(job) = job { queue.push_back(job) },
                    _ = tokio::time::sleep_until(tick.into()) => {
                        for job in &queue {
                            let _ = job.message.ack_with(AckKind::Progress).await;
                        }
                    }
                    _ = intake.cancelled() => {}
                }
                continue;
            }
            let job = match queue.pop_front() {
                Some(job) => job,
                None => {
                    // Leave only when nothing can arrive: the dispatcher
                    // sends under the same lock.
                    let Ok(mut guard) = lanes.lock() else { return };
                    match receiver.try_recv() {
                        Ok(job) => job,
                        Err(_) => {
                            guard.remove(&aggregate);
                            return;
                        }
                    }
                }
            };
            awaiting = self
                .process_in_lane(job, &mut queue, &mut receiver, keepalive)
                .await;
        }
    }

    /// Processes `job` while the lane's later messages wait: they are
    /// taken off the channel and kept alive with in-progress acks, so a
    /// long handler or an input held for NATS does not let them pass
    /// `ack_wait` and come back as redeliveries (each counting toward
    /// `max_deliver`).
    async fn process_in_lane(
        &self,
        job: Job,
        queue: &mut VecDeque<Job>,
        receiver: &mut mpsc::UnboundedReceiver<Job>,
        keepalive: Duration,
    ) -> Option<AwaitRedelivery> {
        // Boxed: inline, processing (handler, publish, store spans) made
        // the lane future ~12 KiB, copied into every spawned lane task;
        // boxed it is ~2 KiB.
        let mut processing = Box::pin(self.process(job));
        let mut next_keepalive = Instant::now() + keepalive;
        let mut open = true;
        loop {
            tokio::select! {
                settled = &mut processing => return settled,
                job = receiver.recv(), if open => match job {
                    Some(job) => queue.push_back(job),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(next_keepalive.into()) => {
                    for job in queue.iter() {
                        let _ = job.message.ack_with(AckKind::Progress).await;
                    }
                    next_keepalive = Instant::now() + keepalive;
                }
            }
        }
    }

    /// Runs the room's handler on one message and settles the message,
    /// inside the message's span and with its trace headers in scope.
    async fn process(&self, mut job: Job) -> Option<AwaitRedelivery> {
        let span = std::mem::replace(&mut job.span, tracing::Span::none());
        let incoming = std::mem::take(&mut job.incoming);
        propagation::with_incoming(incoming, self.settle(job))
            .instrument(span)
            .await
    }

    async fn settle(&self, job: Job) -> Option<AwaitRedelivery> {
        let mut hold: Option<BusHold<'_>> = None;
        let mut attempts: i64 = 0;
        let published = loop {
            match self.handle_and_publish(&job).await {
                // The store or the stream answered, so it is no leadership
                // or connection fault (a deleted bucket, say): retried like
                // any transient failure, deliveries counted.
                Err(HandleError::Bus(detail)) if !self.bus_is_failing().await => {
                    break Err(HandleError::Transient(detail));
                }
                Err(HandleError::Bus(detail)) => {
                    attempts += 1;
                    if hold.is_none() {
                        tracing::warn!(
                            error = %detail,
                            event_type = %job.event_type,
                            "NATS failed this input's handling; holding it and handling it again \
                             in place once NATS answers (not counted as a delivery)"
                        );
                        self.state.record_error(format!(
                            "{}: waiting for NATS: {detail}",
                            job.event_type
                        ));
                    }
                    if hold.is_none() {
                        hold = Some(self.state.hold_for_bus(&detail));
                    }
                    self.metrics
                        .finished(&job.event_type, Outcome::Retried, secs(job.started));
                    if !self
                        .wait_holding(&job.message, self.retry_delay(attempts))
                        .await
                    {
                        // Shutting down: left unacknowledged, redelivered
                        // after ack_wait without a nak counting against it.
                        return None;
                    }
                }
                other => break other,
            }
        };
        drop(hold);
        let event = &job.event;
        match published {
            Ok(_) => {
                if let Err(err) = job.message.ack().await {
                    tracing::warn!(error = %err, "ack failed; the redelivery will publish nothing new");
                }
                tracing::debug!(event_type = %job.event_type, "handled");
                self.metrics
                    .finished(&job.event_type, Outcome::Ok, secs(job.started));
                None
            }
            Err(err) => {
                self.finish_failed(
                    &job.message,
                    &job.event_type,
                    event.stream_sequence,
                    event.delivered,
                    job.started,
                    err,
                )
                .await
            }
        }
    }

    /// Whether NATS is failing the room itself: its connection is down, or
    /// its stream or a stream under its buckets does not answer or has no
    /// leader (a lost quorum, an election under way). A stream that is
    /// simply missing answers (from the meta leader) and is not a bus fault.
    async fn bus_is_failing(&self) -> bool {
        if !self.state.nats_connected() {
            return true;
        }
        let probe = self.nats.request_timeout.min(Duration::from_secs(2));
        let mut streams = vec![self.settings.stream.clone()];
        streams.extend(self.store_streams.names());
        for name in streams {
            match tokio::time::timeout(probe, self.js.get_stream(&name)).await {
                Err(_elapsed) => return true,
                // Answered: the stream is not there (a deleted bucket),
                // which no waiting fixes.
                Ok(Err(err))
                    if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                        if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
                Ok(Err(_)) => return true,
                Ok(Ok(stream)) => {
                    let leaderless = stream.cached_info().cluster.is_some()
                        && nats::Replication::from_info(stream.cached_info().cluster.as_ref())
                            .leader
                            .is_none();
                    if leaderless {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Waits `delay` while keeping `message` alive with in-progress acks;
    /// `false` when the runtime is shutting down instead.
    async fn wait_holding(&self, message: &jetstream::Message, delay: Duration) -> bool {
        let keepalive = self.settings.consumer.ack_wait / 3;
        let until = Instant::now() + delay;
        // At once too: the failed attempt itself may have taken most of
        // an ack wait (a store call that timed out).
        let _ = message.ack_with(AckKind::Progress).await;
        loop {
            let now = Instant::now();
            if now >= until {
                return true;
            }
            let step = (until - now).min(keepalive);
            tokio::select! {
                _ = self.intake.cancelled() => return false,
                _ = tokio::time::sleep(step) => {}
            }
            // Lost while the consumer has no leader: then the server
            // redelivers after ack_wait, and the copy waits in this lane.
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }

    /// One run of the room's handler on the input and, when it succeeds,
    /// the publishing of its outputs.
    async fn handle_and_publish(&self, job: &Job) -> Result<Vec<uuid::Uuid>, HandleError> {
        let handler_span = telemetry::handler_span(&self.settings.service, &job.event_type);
        let deadline = self.settings.consumer.handler_timeout;
        let handled = AssertUnwindSafe(
            tokio::time::timeout(deadline, self.room.handle(&job.event))
                .instrument(handler_span.clone()),
        )
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Ok(Err(HandleError::permanent("handler_panic", what)))
        })
        .unwrap_or_else(|_elapsed| Err(self.timed_out(&job.event)));
        if let Err(err) = &handled {
            handler_span.set_status(Status::error(err.to_string()));
        }
        match handled {
            Ok(outputs) => Ok(self.publisher.publish(&job.event.cause(), &outputs).await?),
            Err(err) => Err(err),
        }
    }

    /// A handler that outlived `consumer.handler_timeout`. Its future has
    /// been dropped, which cancels it at its current await point (a handler
    /// blocking its thread cannot be cancelled; rooms run CPU work off the
    /// async workers with bounds of their own). A hang may be momentary (a
    /// dependency that stopped answering), so it is retried like a transient
    /// failure; on the last delivery it is dead-lettered as `handler_timeout`
    /// rather than the generic `max_deliveries_exceeded`, so that a hanging
    /// handler is told apart from a failing dependency.
    fn timed_out(&self, event: &InboundEvent) -> HandleError {
        let deadline = self.settings.consumer.handler_timeout;
        let detail = format!("the handler did not finish within {deadline:?}");
        if event.delivered >= self.settings.consumer.max_deliver {
            HandleError::permanent("handler_timeout", detail)
        } else {
            HandleError::transient(format!("handler_timeout: {detail}"))
        }
    }

    /// Dead-letters a permanent failure, or a transient one on its last
    /// delivery; naks any other transient failure with a growing delay.
    async fn finish_failed(
        &self,
        message: &jetstream::Message,
        event_type: &str,
        sequence: u64,
        delivered: i64,
        started: Instant,
        err: HandleError,
    ) -> Option<AwaitRedelivery> {
        let max_deliver = self.settings.consumer.max_deliver;
        let label = self.metric_label(event_type);
        tracing::Span::current().set_status(Status::error(err.to_string()));
        let (reason, detail) = match err {
            HandleError::Permanent { reason, detail } => (reason, detail),
            // Only lanes hold for NATS (see `settle`); anywhere else a NATS
            // failure is retried like any transient one.
            HandleError::Transient(detail) | HandleError::Bus(detail)
                if delivered >= max_deliver =>
            {
                ("max_deliveries_exceeded".to_string(), detail)
            }
            HandleError::Transient(detail) | HandleError::Bus(detail) => {
                let delay = self.retry_delay(delivered);
                tracing::warn!(
                    error = %detail,
                    event_type,
                    delivered,
                    retry_in = ?delay,
                    "transient failure; retrying"
                );
                self.state
                    .record_error(format!("{event_type}: transient failure: {detail}"));
                if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(error = %err, "nak failed; the server redelivers after ack_wait");
                }
                self.metrics
                    .finished(label, Outcome::Retried, secs(started));
                return Some(AwaitRedelivery {
                    sequence,
                    until: Instant::now() + delay + self.settings.consumer.ack_wait,
                });
            }
        };
        let letter = DeadLetter {
            room: &self.settings.name,
            event_type,
            reason: &reason,
            detail: &detail,
            deliveries: delivered,
            original_subject: &message.subject,
            original_stream: &self.settings.stream,
            original_sequence: sequence,
            body: message.payload.clone(),
        };
        match dlq::publish_dead_letter(&self.js, &self.nats, letter).await {
            Ok(()) => {
                tracing::warn!(reason = %reason, detail = %detail, event_type, sequence, "dead-lettered");
                self.state
                    .record_error(format!("{event_type}: dead-lettered ({reason}): {detail}"));
                self.state.dead_letters.fetch_add(1, Ordering::Relaxed);
                if let Err(err) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %err, "term ack failed; the dead letter is deduplicated on redelivery");
                }
                self.metrics.dead_lettered(label, &reason);
                self.metrics
                    .finished(label, Outcome::DeadLettered, secs(started));
                None
            }
            Err(err) => {
                // Cannot even dead-letter: hand it back and try again later.
                let delay = self.retry_delay(delivered);
                tracing::error!(error = %err, reason = %reason, "dead-lettering failed; retrying");
                self.state
                    .record_error(format!("{event_type}: dead-lettering failed: {err}"));
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                self.metrics
                    .finished(label, Outcome::Retried, secs(started));
                Some(AwaitRedelivery {
                    sequence,
                    until: Instant::now() + delay + self.settings.consumer.ack_wait,
                })
            }
        }
    }

    /// The `event_type` label of the room's metrics: a declared input or
    /// output, else `unknown`, so that whoever may publish on the room's
    /// prefix cannot create metric series (the dead letter keeps the real
    /// subject, and its log line the real type).
    fn metric_label<'a>(&self, event_type: &'a str) -> &'a str {
        let action = event_type
            .strip_prefix(self.settings.domain.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(event_type);
        if self.room.inputs().contains(&action) || self.room.outputs().contains(&action) {
            event_type
        } else {
            "unknown"
        }
    }

    /// `retry_base · 2^(delivered-1)`, capped at `retry_max`, with ±25 % jitter
    /// so a burst of failures does not come back as a burst.
    fn retry_delay(&self, delivered: i64) -> Duration {
        let cfg = &self.settings.consumer;
        let exponent = u32::try_from(delivered.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        let base = cfg
            .retry_base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(cfg.retry_max);
        base.mul_f64(0.75 + fastrand::f64() * 0.5)
    }
}

/// The runtime's part of validation: the envelope, its event type against
/// the subject, and that the payload is JSON at all. Public for the fuzz
/// targets (`fuzz/`).
pub fn verify(body: &[u8], event_type: &str) -> Result<EventEnvelope, HandleError> {
    let envelope = EventEnvelope::decode(body)
        .map_err(|err| HandleError::permanent(err.reason(), err.to_string()))?;
    if envelope.event_type != event_type {
        return Err(HandleError::permanent(
            "event_type_mismatch",
            format!(
                "envelope says {:?} but arrived on the subject of {event_type:?}",
                envelope.event_type
            ),
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&envelope.payload).map_err(|err| {
        HandleError::permanent("payload_invalid", format!("payload is not JSON: {err}"))
    })?;
    Ok(envelope)
}

fn secs(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}
