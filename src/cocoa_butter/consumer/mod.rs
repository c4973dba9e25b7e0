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

mod dispatch;
pub mod lane;
mod route;
mod settle;

pub use route::{Route, Routing, at_current_major, route, verify};

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cocoa_butter::config::{NatsConfig, RoomSettings};
use crate::cocoa_butter::contract::Contracts;
use crate::cocoa_butter::metrics::RoomMetrics;
use crate::cocoa_butter::nats::pull::{PullError, Puller};
use crate::cocoa_butter::nats::{self, Publisher};
use crate::cocoa_butter::room::{InboundEvent, Room};
use crate::cocoa_butter::status::RoomState;
use crate::cocoa_butter::streams::StoreStreams;
use crate::cocoa_butter::telemetry::propagation;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot open the pull stream: {0}")]
    Open(#[source] PullError),
    #[error("pull stream failed: {0}")]
    Stream(#[source] PullError),
    #[error("pull stream ended")]
    Ended,
}

/// One room's consumer: everything needed to turn deliveries into outcomes.
pub struct Engine {
    pub room: Arc<dyn Room>,
    /// The majors of the room's inputs and their upcasters.
    pub contracts: Contracts,
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
    /// when a store call fails (see `Engine::bus_is_failing`).
    pub store_streams: StoreStreams,
}

/// A delivery on its way through a lane, boxed: a [`Delivery`] is over
/// 1 KB and moves through the lane's channel, its queue and into its
/// processing future; boxed, each of those moves copies a pointer (a
/// callgrind profile counted some 11 KB of memcpy per input unboxed).
type Job = Box<Delivery>;

/// A delivery holding its share of the in-flight bound until dropped.
struct Delivery {
    message: jetstream::Message,
    event: InboundEvent,
    event_type: String,
    started: Instant,
    /// The message's span: every line and child span of its handling.
    span: tracing::Span,
    incoming: propagation::TraceHeaders,
    _slot: Slot,
}

/// Only the gauge it counts in, not the room's whole metrics: a clone of
/// those is a dozen reference counts bumped and dropped per message.
struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge<i64, AtomicI64>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// How long a stopping consumer waits for more of its pulls' messages to
/// arrive, to hand them back (see `Puller::drain`).
const HAND_BACK_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

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
        .map_err(ConsumerError::Open)?
        // Up to half the in-flight bound while a backlog lasts: the rest
        // of the slots stay for the messages already pulled.
        .with_max_batch(cfg.max_in_flight / 2);

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
                Err(err) => break Err(ConsumerError::Stream(err)),
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
                    // In this order: a free slot is taken before the
                    // keepalive timer is ever polled, so the common case
                    // registers no timer.
                    biased;
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
                in_flight: self.metrics.in_flight.clone(),
            };
            if let Some(own) = self.dispatch(message, slot, &lanes, &tasks, &intake) {
                self.ack_own_output(own).await;
            }
        };
        // Stop pulling. Messages the client already buffered, or that are
        // still arriving for the pulls made, were delivered to us but never
        // started: hand them back at once so a replica (or our restart)
        // takes them now rather than after ack_wait.
        for message in messages.drain(HAND_BACK_GRACE).await {
            hand_back(message).await;
        }
        drop(messages);
        tasks.close();
        tasks.wait().await;
        result
    }
}

fn secs(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}
