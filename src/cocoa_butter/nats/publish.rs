//! Publishing a room's outputs as envelopes on its prefix.

use std::time::Instant;

use async_nats::jetstream::{self};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::future::try_join_all;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::cocoa_butter::config::RoomSettings;
use crate::cocoa_butter::contract::Outbound;
use crate::cocoa_butter::contract::{self, Contracts};
use crate::cocoa_butter::envelope::{Cause, EventEnvelope};
use crate::cocoa_butter::metrics::RoomMetrics;
use crate::cocoa_butter::telemetry::{self, propagation};

/// Headers on every envelope the runtime publishes, so tools can route and
/// trace without decoding the body.
pub mod event_headers {
    pub const EVENT_TYPE: &str = "Choco-Event-Type";
    pub const CORRELATION_ID: &str = "Choco-Correlation-Id";
}

/// Publishes a room's outputs as envelopes on its prefix, with ids derived
/// from their cause so that publishing the same outputs again is dropped by
/// JetStream's duplicate window.
///
/// Each publish carries the trace context of the work that caused it
/// (`traceparent`), gets a producer span when tracing is on, and is
/// counted and timed.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    encoder: OutputEncoder,
    metrics: RoomMetrics,
}

/// Turns a room's outputs into the messages that carry them: subject,
/// envelope, headers and message id; no I/O, so the micro-bench
/// (`benches/engine.rs`) measures it as the engine runs it.
#[derive(Clone)]
pub struct OutputEncoder {
    subject_base: String,
    domain: String,
    service: String,
    /// The outputs' majors (without them, every output is major 1).
    contracts: Contracts,
    /// `rooms.<room>.publish_previous_major`.
    previous_major: bool,
}

/// One output, ready to publish.
#[derive(Debug)]
pub struct EncodedOutput {
    pub subject: String,
    pub event_type: String,
    pub event_id: Uuid,
    /// `Nats-Msg-Id`: derived from the cause (or the idempotency key), so
    /// publishing the same outputs again is dropped as a duplicate.
    pub message_id: String,
    /// The event headers; the trace context is added at publish time, in
    /// the producer span.
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl OutputEncoder {
    /// Outputs on `subject_base` (`choco.events.coordination.`), typed
    /// `<domain>.<action>`, from `service`.
    pub fn new(subject_base: &str, domain: &str, service: &str) -> Self {
        OutputEncoder {
            subject_base: subject_base.to_string(),
            domain: domain.to_string(),
            service: service.to_string(),
            contracts: Contracts::default(),
            previous_major: false,
        }
    }

    /// Outputs at the majors `contracts` give them: the current one, or the
    /// previous one where there is one and `previous_major` is on.
    pub fn with_contracts(mut self, contracts: Contracts, previous_major: bool) -> Self {
        self.contracts = contracts;
        self.previous_major = previous_major;
        self
    }

    /// The `index`-th output of `cause`.
    pub fn encode(
        &self,
        cause: &Cause,
        index: usize,
        output: &Outbound,
    ) -> Result<EncodedOutput, PublishError> {
        let event_id = cause.output_id(index);
        let subject = format!("{}{}", self.subject_base, output.action);
        let event_type = format!("{}.{}", self.domain, output.action);
        let refused = |reason: String| PublishError {
            subject: subject.clone(),
            reason,
            bus_fault: false,
        };
        // At the major it was built at; during a migration window, an
        // output of its action's current major goes back one.
        let previous = self
            .previous_major
            .then(|| self.contracts.get(&output.action))
            .flatten()
            .filter(|contract| output.major == contract.current)
            .and_then(|contract| contract.to_previous(&output.payload))
            .transpose()
            .map_err(|err| refused(format!("writing it at its previous major: {err}")))?;
        let (version, payload) = match &previous {
            Some((major, value)) => (contract::version_of(*major), serde_json::to_vec(value)),
            None => (
                contract::version_of(output.major),
                serde_json::to_vec(&output.payload),
            ),
        };
        let payload = payload.map_err(|err| refused(err.to_string()))?;
        let mut envelope = EventEnvelope::new(
            event_id,
            event_type.clone(),
            output.aggregate_id.clone(),
            cause.correlation_id.clone(),
            payload,
            self.service.clone(),
        );
        envelope.schema_version = version;
        // Keyed by content: the key and the payload's hash, which the
        // envelope has computed already (hashing a key that repeats the
        // payload was a second SHA-256 of it, and a second serialization).
        let message_id = match &output.idempotency_key {
            Some(key) => format!(
                "{}:{}",
                event_type,
                crate::cocoa_butter::envelope::content_hash(
                    format!("{key}\n{}", envelope.content_hash).as_bytes()
                )
            ),
            None => event_id.to_string(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(event_headers::EVENT_TYPE, event_type.as_str());
        // Made header-safe: a correlation id comes from an input (or an
        // API caller), and a raw CR or LF would make the client panic.
        headers.insert(
            event_headers::CORRELATION_ID,
            header_safe(&cause.correlation_id),
        );
        Ok(EncodedOutput {
            subject,
            event_type,
            event_id,
            message_id,
            headers,
            payload: Bytes::from(envelope.encode()),
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("publishing {subject} failed: {reason}")]
pub struct PublishError {
    pub subject: String,
    pub reason: String,
    /// NATS did not answer (a timeout, a dropped connection, a stream
    /// without a leader): not the output's fault. `false` when JetStream
    /// refused the message itself (too large, ...).
    pub bus_fault: bool,
}

impl PublishError {
    pub(crate) fn from_kind(subject: String, err: &jetstream::context::PublishError) -> Self {
        use jetstream::context::PublishErrorKind as Kind;
        PublishError {
            subject,
            reason: err.to_string(),
            bus_fault: matches!(
                err.kind(),
                Kind::TimedOut | Kind::BrokenPipe | Kind::StreamNotFound | Kind::MaxAckPending
            ),
        }
    }
}

impl Publisher {
    pub fn new(js: jetstream::Context, room: &RoomSettings, metrics: RoomMetrics) -> Self {
        Publisher {
            js,
            encoder: OutputEncoder::new(&room.subject_base, &room.domain, &room.service),
            metrics,
        }
    }

    /// Publishes the room's outputs at the majors its contracts give them
    /// (see [`OutputEncoder::with_contracts`]).
    pub fn with_contracts(mut self, contracts: Contracts, previous_major: bool) -> Self {
        self.encoder = self.encoder.with_contracts(contracts, previous_major);
        self
    }

    /// Publishes every output and waits until JetStream stored each of them.
    /// Returns the event ids, in order.
    pub async fn publish(
        &self,
        cause: &Cause,
        outputs: &[Outbound],
    ) -> Result<Vec<Uuid>, PublishError> {
        let mut acks = Vec::with_capacity(outputs.len());
        let mut ids = Vec::with_capacity(outputs.len());
        for (index, output) in outputs.iter().enumerate() {
            let EncodedOutput {
                subject,
                event_type,
                event_id,
                message_id,
                mut headers,
                payload,
            } = self.encoder.encode(cause, index, output)?;
            let span =
                telemetry::publish_span(&subject, &event_id.to_string(), &output.aggregate_id);
            span.in_scope(propagation::outgoing)
                .write_nats(&mut headers);
            // `headers` replaces the whole map: it must come before the id.
            let message = jetstream::message::PublishMessage::build()
                .payload(payload)
                .headers(headers)
                .message_id(message_id);
            let started = Instant::now();
            let sent = self
                .js
                .send_publish(subject.clone(), message)
                .instrument(span.clone())
                .await;
            let ack = match sent {
                Ok(ack) => ack,
                Err(err) => {
                    self.metrics.published(&event_type, false, 0.0);
                    span.set_status(opentelemetry::trace::Status::error(err.to_string()));
                    return Err(PublishError::from_kind(subject, &err));
                }
            };
            let metrics = &self.metrics;
            acks.push(
                async move {
                    let acked = ack.await;
                    metrics.published(&event_type, acked.is_ok(), started.elapsed().as_secs_f64());
                    acked.map_err(|err| {
                        tracing::Span::current()
                            .set_status(opentelemetry::trace::Status::error(err.to_string()));
                        PublishError::from_kind(subject, &err)
                    })
                }
                .instrument(span),
            );
            ids.push(event_id);
        }
        try_join_all(acks).await?;
        Ok(ids)
    }
}

/// Header values are one line of printable text; keep a detail readable and short.
pub(crate) fn header_safe(detail: &str) -> HeaderValue {
    // Almost always already safe: then taken as it is, without a copy.
    if detail.len() <= 512 && !detail.chars().any(char::is_control) {
        return HeaderValue::from(detail);
    }
    let cleaned: String = detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect();
    HeaderValue::from(cleaned.as_str())
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;

    use super::{OutputEncoder, header_safe};
    use crate::cocoa_butter::contract::Outbound;
    use crate::cocoa_butter::envelope::Cause;

    fn cause(id: &str) -> Cause {
        Cause {
            id: id.to_string(),
            correlation_id: "corr-1".to_string(),
            at: Utc::now(),
        }
    }

    fn output(key: Option<&str>, payload: serde_json::Value) -> Outbound {
        Outbound {
            action: "link.verified".to_string(),
            aggregate_id: "doc-1".to_string(),
            payload,
            idempotency_key: key.map(str::to_string),
            major: 1,
        }
    }

    /// A keyed output's message id follows its key and its payload, not
    /// its cause: the same result of two inputs is one message, another
    /// result under the same key is another. Unkeyed, it is the event id.
    #[test]
    fn a_keyed_output_is_one_message_per_key_and_payload() {
        let encoder = OutputEncoder::new("choco.events.resolution.", "resolution", "the-wrapper");
        let id = |cause_id: &str, output: &Outbound| {
            encoder
                .encode(&cause(cause_id), 0, output)
                .map(|encoded| encoded.message_id)
                .map_err(|err| err.to_string())
        };
        let ok = output(Some("doc-1\nabc"), json!({"url": "a", "ok": true}));
        let broken = output(Some("doc-1\nabc"), json!({"url": "a", "ok": false}));
        let elsewhere = output(Some("doc-2\nabc"), json!({"url": "a", "ok": true}));
        assert_eq!(id("cause-1", &ok), id("cause-2", &ok));
        assert!(
            id("cause-1", &ok)
                .is_ok_and(|message_id| message_id.starts_with("resolution.link.verified:"))
        );
        assert_ne!(id("cause-1", &ok), id("cause-1", &broken));
        assert_ne!(id("cause-1", &ok), id("cause-1", &elsewhere));
        let unkeyed = output(None, json!({"url": "a", "ok": true}));
        let encoded = encoder.encode(&cause("cause-1"), 0, &unkeyed);
        assert!(encoded.is_ok_and(|encoded| encoded.message_id == encoded.event_id.to_string()));
    }

    /// A safe detail passes as it is; control characters become spaces,
    /// and a long one is cut at 512 characters, whichever path it takes.
    #[test]
    fn header_values_are_one_short_printable_line() {
        assert_eq!(header_safe("corr-1 ünïcode").as_str(), "corr-1 ünïcode");
        assert_eq!(header_safe("a\r\nb\tc").as_str(), "a  b c");
        let long = "é".repeat(600);
        assert_eq!(header_safe(&long).as_str(), "é".repeat(512));
        let long_with_newline = format!("{}\n", "x".repeat(300));
        assert_eq!(
            header_safe(&long_with_newline).as_str(),
            format!("{} ", "x".repeat(300))
        );
    }
}
