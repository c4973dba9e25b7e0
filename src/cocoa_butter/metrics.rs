//! Per-room Prometheus metrics.
//!
//! Every room owns a [`Registry`], so the room's metrics port shows the
//! room's own series and nothing of its neighbours'. The names follow the
//! platform's consumer metrics (`choco_consumer_*`).

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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

/// The handles a room's consumer updates.
#[derive(Clone)]
pub struct RoomMetrics {
    pub registry: Arc<Registry>,
    received: Family<EventLabels, Counter>,
    processed: Family<OutcomeLabels, Counter>,
    dead_letters: Family<DeadLetterLabels, Counter>,
    duration: Family<OutcomeLabels, Histogram>,
    pub in_flight: Gauge<i64, AtomicI64>,
    pub ready: Gauge<i64, AtomicI64>,
}

impl RoomMetrics {
    pub fn new(room: &str) -> Self {
        // `room` is a constant label of the registry: every series has it.
        let mut registry = Registry::with_labels(std::iter::once((
            std::borrow::Cow::Borrowed("room"),
            std::borrow::Cow::Owned(room.to_string()),
        )));
        let received = Family::<EventLabels, Counter>::default();
        let processed = Family::<OutcomeLabels, Counter>::default();
        let dead_letters = Family::<DeadLetterLabels, Counter>::default();
        let duration = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            // 0.5 ms .. ~4 s: a handler that is slower than that is an incident.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0005, 2.0, 14,
            ))
        });
        let in_flight = Gauge::<i64, AtomicI64>::default();
        let ready = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "choco_consumer_messages_received",
            "Messages delivered to the room's consumer",
            received.clone(),
        );
        registry.register(
            "choco_consumer_messages_processed",
            "Deliveries the room finished with, by outcome",
            processed.clone(),
        );
        registry.register(
            "choco_consumer_dlq_messages",
            "Messages moved to the dead-letter stream, by reason",
            dead_letters.clone(),
        );
        registry.register(
            "choco_consumer_processing_duration_seconds",
            "Time from delivery to acknowledgement, by outcome",
            duration.clone(),
        );
        registry.register(
            "choco_consumer_in_flight_messages",
            "Messages held by the room: queued behind their aggregate or being handled",
            in_flight.clone(),
        );
        registry.register(
            "choco_room_ready",
            "1 while the room is connected to NATS and bound to its consumer",
            ready.clone(),
        );
        RoomMetrics {
            registry: Arc::new(registry),
            received,
            processed,
            dead_letters,
            duration,
            in_flight,
            ready,
        }
    }

    pub fn received(&self, event_type: &str) {
        self.received
            .get_or_create(&EventLabels {
                event_type: event_type.to_string(),
            })
            .inc();
    }

    pub fn finished(&self, event_type: &str, outcome: Outcome, seconds: f64) {
        let labels = OutcomeLabels {
            event_type: event_type.to_string(),
            outcome,
        };
        self.processed.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(seconds);
    }

    pub fn dead_lettered(&self, event_type: &str, reason: &str) {
        self.dead_letters
            .get_or_create(&DeadLetterLabels {
                event_type: event_type.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The registry in the text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_platform_metric_names_with_room_labels() {
        let metrics = RoomMetrics::new("conch");
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
}
