//! Running the handler on one input and settling the message: ack, nak
//! with a delay, hold in place for NATS, or dead-letter.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures::FutureExt;
use opentelemetry::trace::Status;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::cocoa_butter::config::ConsumerConfig;
use crate::cocoa_butter::dlq::{self, DeadLetter, Reason, reason};
use crate::cocoa_butter::metrics::Outcome;
use crate::cocoa_butter::nats;
use crate::cocoa_butter::room::{HandleError, InboundEvent};
use crate::cocoa_butter::status::BusHold;
use crate::cocoa_butter::telemetry::{self, propagation};

use super::lane::AwaitRedelivery;
use super::{Engine, Job, secs};

impl Engine {
    /// Runs the room's handler on one message and settles the message,
    /// inside the message's span and with its trace headers in scope.
    pub(super) async fn process(&self, mut job: Job) -> Option<AwaitRedelivery> {
        let span = std::mem::replace(&mut job.span, tracing::Span::none());
        let incoming = std::mem::take(&mut job.incoming);
        propagation::with_incoming(incoming, self.settle(job))
            .instrument(span)
            .await
    }

    async fn settle(&self, job: Job) -> Option<AwaitRedelivery> {
        let mut hold: Option<BusHold<'_>> = None;
        let mut attempts: i64 = 0;
        // Failures of NATS met while every stream answered the probe.
        let mut while_answering = 0;
        let published = loop {
            match self.handle_and_publish(&job).await {
                // The streams answer now. A call that failed during an
                // election that has just ended (a publish that timed out
                // while the stream had no leader) succeeds when made again,
                // so it is made again once, in place. Failing again while
                // everything answers, it is no leadership or connection
                // fault (a deleted bucket, say): retried like any transient
                // failure, deliveries counted.
                Err(HandleError::Bus(detail)) if !self.bus_is_failing().await => {
                    while_answering += 1;
                    if while_answering > 1 {
                        break Err(HandleError::Transient(detail));
                    }
                    tracing::debug!(error = %detail, "NATS failed a call but answers now: once more in place");
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
            Ok(Err(HandleError::permanent(reason::HANDLER_PANIC, what)))
        })
        .unwrap_or_else(|_elapsed| Err(timed_out(&self.settings.consumer, &job.event)));
        if let Err(err) = &handled {
            handler_span.set_status(Status::error(err.to_string()));
        }
        let outputs = handled?;
        if let Some(undeclared) = outputs
            .iter()
            .find(|output| !self.room.outputs().contains(&output.action.as_str()))
        {
            return Err(HandleError::permanent(
                reason::UNDECLARED_OUTPUT,
                format!(
                    "the handler returned {:?}, which is not an output of {} (outputs: {})",
                    undeclared.action,
                    self.settings.service,
                    self.room.outputs().join(", ")
                ),
            ));
        }
        Ok(self.publisher.publish(&job.event.cause(), &outputs).await?)
    }

    /// Dead-letters a permanent failure, or a transient one on its last
    /// delivery; naks any other transient failure with a growing delay.
    pub(super) async fn finish_failed(
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
        let (reason, detail) = match failed(err, delivered, max_deliver) {
            Failed::DeadLetter { reason, detail } => (reason, detail),
            Failed::Retry { detail } => {
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
            reason: reason.as_str(),
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
                self.state.count_dead_letter();
                if let Err(err) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %err, "term ack failed; the dead letter is deduplicated on redelivery");
                }
                self.metrics.dead_lettered(label, reason.as_str());
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

    /// The `event_type` label of the room's metrics (see [`metric_label`]).
    pub(super) fn metric_label<'a>(&self, event_type: &'a str) -> &'a str {
        metric_label(
            &self.settings.domain,
            self.room.inputs(),
            self.room.outputs(),
            event_type,
        )
    }

    fn retry_delay(&self, delivered: i64) -> Duration {
        retry_delay(&self.settings.consumer, delivered, fastrand::f64())
    }
}

/// What becomes of an input whose handling failed, decided without NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failed {
    /// Nak'd with a growing delay; the server redelivers it.
    Retry { detail: String },
    /// Moved to the dead-letter stream with `reason`, then term'd.
    DeadLetter { reason: Reason, detail: String },
}

/// A permanent failure is dead-lettered at once; a transient one is retried
/// until its last delivery (`consumer.max_deliver`), then dead-lettered as
/// `max_deliveries_exceeded`. Only lanes hold an input for NATS (see
/// `Engine::settle`); anywhere else a NATS failure is retried like any
/// transient one.
pub(super) fn failed(err: HandleError, delivered: i64, max_deliver: i64) -> Failed {
    match err {
        HandleError::Permanent { reason, detail } => Failed::DeadLetter { reason, detail },
        HandleError::Transient(detail) | HandleError::Bus(detail) if delivered >= max_deliver => {
            Failed::DeadLetter {
                reason: reason::MAX_DELIVERIES_EXCEEDED,
                detail,
            }
        }
        HandleError::Transient(detail) | HandleError::Bus(detail) => Failed::Retry { detail },
    }
}

/// A handler that outlived `consumer.handler_timeout`. Its future has been
/// dropped, which cancels it at its current await point (a handler blocking
/// its thread cannot be cancelled; rooms run CPU work off the async workers
/// with bounds of their own). A hang may be momentary (a dependency that
/// stopped answering), so it is retried like a transient failure; on the
/// last delivery it is dead-lettered as `handler_timeout` rather than the
/// generic `max_deliveries_exceeded`, so that a hanging handler is told
/// apart from a failing dependency.
pub(super) fn timed_out(consumer: &ConsumerConfig, event: &InboundEvent) -> HandleError {
    let detail = format!(
        "the handler did not finish within {:?}",
        consumer.handler_timeout
    );
    if event.delivered >= consumer.max_deliver {
        HandleError::permanent(reason::HANDLER_TIMEOUT, detail)
    } else {
        HandleError::transient(format!("handler_timeout: {detail}"))
    }
}

/// `retry_base · 2^(delivered-1)`, capped at `retry_max`, times a jitter
/// factor of 0.75 to 1.25 from `unit` (uniform in [0, 1)), so a burst of
/// failures does not come back as a burst.
pub(super) fn retry_delay(consumer: &ConsumerConfig, delivered: i64, unit: f64) -> Duration {
    let exponent = u32::try_from(delivered.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
    let base = consumer
        .retry_base
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(consumer.retry_max);
    base.mul_f64(0.75 + unit.clamp(0.0, 1.0) * 0.5)
}

/// The `event_type` label of the room's metrics: a declared input or
/// output, else `unknown`, so that whoever may publish on the room's prefix
/// cannot create metric series (the dead letter keeps the real subject, and
/// its log line the real type).
pub(super) fn metric_label<'a>(
    domain: &str,
    inputs: &[&str],
    outputs: &[&str],
    event_type: &'a str,
) -> &'a str {
    let action = event_type
        .strip_prefix(domain)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(event_type);
    if inputs.contains(&action) || outputs.contains(&action) {
        event_type
    } else {
        "unknown"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permanent_failure_is_dead_lettered_at_once_with_its_reason() {
        let err = HandleError::permanent(reason::PAYLOAD_INVALID, "body: expected an object");
        assert_eq!(
            failed(err, 1, 3),
            Failed::DeadLetter {
                reason: reason::PAYLOAD_INVALID,
                detail: "body: expected an object".into()
            }
        );
    }

    #[test]
    fn a_transient_failure_is_retried_until_its_last_delivery() {
        for delivered in 1..3 {
            assert_eq!(
                failed(HandleError::transient("store down"), delivered, 3),
                Failed::Retry {
                    detail: "store down".into()
                }
            );
        }
        assert_eq!(
            failed(HandleError::transient("store down"), 3, 3),
            Failed::DeadLetter {
                reason: reason::MAX_DELIVERIES_EXCEEDED,
                detail: "store down".into()
            }
        );
    }

    #[test]
    fn a_nats_failure_outside_a_lane_counts_like_a_transient_one() {
        assert!(matches!(
            failed(HandleError::bus("no leader"), 1, 3),
            Failed::Retry { .. }
        ));
        assert!(matches!(
            failed(HandleError::bus("no leader"), 3, 3),
            Failed::DeadLetter { reason, .. } if reason == "max_deliveries_exceeded"
        ));
    }

    fn event(delivered: i64) -> InboundEvent {
        let envelope = crate::cocoa_butter::EventEnvelope::new(
            uuid::Uuid::nil(),
            "coordination.property_sync.requested".into(),
            "doc-1".into(),
            "c-1".into(),
            b"{}".to_vec(),
            "test".into(),
        );
        InboundEvent {
            envelope,
            action: "property_sync.requested".into(),
            subject: "choco.events.coordination.property_sync.requested".into(),
            stream_sequence: 1,
            delivered,
        }
    }

    #[test]
    fn a_handler_timeout_is_retried_then_dead_lettered_as_handler_timeout() {
        let consumer = ConsumerConfig::default();
        assert!(matches!(
            timed_out(&consumer, &event(1)),
            HandleError::Transient(detail) if detail.starts_with("handler_timeout: ")
        ));
        assert!(matches!(
            timed_out(&consumer, &event(consumer.max_deliver)),
            HandleError::Permanent { reason, .. } if reason == "handler_timeout"
        ));
    }

    #[test]
    fn retry_delays_double_per_delivery_up_to_the_cap_within_the_jitter() {
        let consumer = ConsumerConfig {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            ..ConsumerConfig::default()
        };
        let middle = |delivered| retry_delay(&consumer, delivered, 0.5);
        assert_eq!(middle(1), Duration::from_secs(1));
        assert_eq!(middle(2), Duration::from_secs(2));
        assert_eq!(middle(5), Duration::from_secs(16));
        assert_eq!(middle(6), Duration::from_secs(30));
        assert_eq!(middle(i64::MAX), Duration::from_secs(30));
        // Delivery counts below 1 (never sent by the server) act as 1.
        assert_eq!(middle(0), Duration::from_secs(1));
        assert_eq!(retry_delay(&consumer, 2, 0.0), Duration::from_millis(1500));
        assert_eq!(retry_delay(&consumer, 2, 1.0), Duration::from_millis(2500));
    }

    #[test]
    fn only_declared_event_types_become_metric_labels() {
        let inputs = ["property_sync.requested"];
        let outputs = ["conflict.detected"];
        let label = |event_type| metric_label("coordination", &inputs, &outputs, event_type);
        assert_eq!(
            label("coordination.property_sync.requested"),
            "coordination.property_sync.requested"
        );
        assert_eq!(
            label("coordination.conflict.detected"),
            "coordination.conflict.detected"
        );
        assert_eq!(label("coordination.made.up"), "unknown");
        assert_eq!(label("refinement.property_sync.requested"), "unknown");
    }
}
