//! From a delivery to its lane: what it is (an own output, an input, or
//! neither), its envelope checked, its span opened.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cocoa_butter::metrics::Outcome;
use crate::cocoa_butter::room::InboundEvent;
use crate::cocoa_butter::telemetry::{self, EventIds, MessageSpan, propagation};

use super::{Delivery, Engine, Job, LaneMap, Route, Routing, Slot, route, secs};

impl Engine {
    /// Sends an input to its lane (or a refused message to be dead-lettered);
    /// returns one of the room's own outputs, seen back on its prefix, for
    /// the caller to acknowledge.
    pub(super) fn dispatch(
        self: &Arc<Self>,
        message: jetstream::Message,
        slot: Slot,
        lanes: &LaneMap,
        tasks: &TaskTracker,
        intake: &CancellationToken,
    ) -> Option<OwnOutput> {
        let started = Instant::now();
        let subject = message.subject.as_str();
        let action = subject
            .strip_prefix(&self.settings.subject_base)
            .unwrap_or(subject);
        let event_type = self.settings.event_type(action);
        self.metrics.received(self.metric_label(&event_type));

        let routing = Routing {
            inputs: self.room.inputs(),
            outputs: self.room.outputs(),
            max_envelope_bytes: self.max_envelope_bytes,
            service: &self.settings.service,
            contracts: Some(&self.contracts),
        };
        let verdict = match route(&routing, action, &event_type, &message.payload) {
            Route::OwnOutput => {
                // Acked by the pull loop itself: a task of its own per
                // output (one in two messages for most rooms) cost a spawn,
                // a wake-up and a hand-off for one publish. Its metadata is
                // not parsed: nothing of it is needed.
                return Some(OwnOutput {
                    message,
                    event_type,
                    started,
                    _slot: slot,
                });
            }
            Route::Input(envelope) => Ok(envelope),
            Route::Refused(err) => Err(err),
        };
        let (sequence, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(err) => {
                // Not a JetStream delivery: nothing to ack or dead-letter.
                tracing::warn!(error = %err, subject = %message.subject, "message without JetStream metadata ignored");
                return None;
            }
        };
        let (subject, action) = (subject.to_string(), action.to_string());

        // The span of this delivery, in the messaging conventions; it
        // continues the trace of whoever published the message.
        let incoming = propagation::TraceHeaders::from_nats(message.headers.as_ref());
        let span = telemetry::message_span(
            &MessageSpan {
                subject: &subject,
                consumer: &self.settings.durable_name,
                delivered,
                sequence,
                message_id: message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
                    .map(|id| id.as_str()),
                event: verdict.as_ref().ok().map(|envelope| EventIds {
                    event_id: &envelope.event_id,
                    correlation_id: envelope.correlation(),
                    aggregate_id: &envelope.aggregate_id,
                }),
            },
            &incoming,
        );

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
                return None;
            }
        };

        let aggregate = envelope.aggregate_id.clone();
        let job: Job = Box::new(Delivery {
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
        });
        let Ok(mut lanes_guard) = lanes.lock() else {
            // Only a panic while holding the lock poisons it; the message is
            // left unacknowledged and comes back after ack_wait.
            tracing::error!(
                sequence,
                "lane table poisoned; leaving the message for redelivery"
            );
            return None;
        };
        let job = match lanes_guard.get(&aggregate) {
            Some(lane) => match lane.send(job) {
                Ok(()) => return None,
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
        None
    }

    /// Acknowledges one of the room's own outputs: nothing to do with it.
    pub(super) async fn ack_own_output(&self, own: OwnOutput) {
        if let Err(err) = own.message.ack().await {
            tracing::warn!(error = %err, "ack of an own output failed; it will be redelivered and skipped again");
        }
        self.metrics
            .finished(&own.event_type, Outcome::Skipped, secs(own.started));
    }
}

/// One of the room's own outputs, come back on its prefix.
pub(super) struct OwnOutput {
    message: jetstream::Message,
    event_type: String,
    started: Instant,
    _slot: Slot,
}
