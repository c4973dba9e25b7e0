//! What a delivery is, decided before any I/O: one of the room's own
//! outputs coming back (acknowledged untouched), an input whose envelope
//! passed the runtime's checks, or something refused with the reason its
//! dead letter will carry. Public, with [`verify`], for the micro-bench
//! (`benches/engine.rs`) and the fuzz targets.

use crate::cocoa_butter::contract::{self, ContractError, Contracts};
use crate::cocoa_butter::dlq::reason;
use crate::cocoa_butter::envelope::{EnvelopeError, EventEnvelope, content_hash};
use crate::cocoa_butter::room::HandleError;

/// What routing needs to know of a room.
#[derive(Debug, Clone, Copy)]
pub struct Routing<'a> {
    pub inputs: &'a [&'static str],
    pub outputs: &'a [&'static str],
    /// `limits.max_envelope_bytes`.
    pub max_envelope_bytes: usize,
    /// The room's service name, for the refusal of an unknown type.
    pub service: &'a str,
    /// The majors each input accepts and their upcasters. Without them
    /// (the micro-bench), an input has the one major 1.
    pub contracts: Option<&'a Contracts>,
}

/// Where a delivery goes.
#[derive(Debug)]
pub enum Route {
    /// One of the room's outputs, seen again on its prefix: acknowledged
    /// untouched.
    OwnOutput,
    /// An input, its envelope verified: to the lane of its aggregate.
    Input(EventEnvelope),
    /// Never handled: dead-lettered with the error's reason.
    Refused(HandleError),
}

/// Routes a delivery of `body` on `action` (the subject minus the room's
/// prefix), whose event type is `event_type`.
pub fn route(routing: &Routing<'_>, action: &str, event_type: &str, body: &[u8]) -> Route {
    if routing.outputs.contains(&action) {
        return Route::OwnOutput;
    }
    let size = body.len();
    let verdict = if size > routing.max_envelope_bytes {
        // Checked before decoding, so an oversized body costs no parse.
        Err(HandleError::permanent(
            reason::ENVELOPE_TOO_LARGE,
            format!(
                "envelope of {size} bytes is larger than limits.max_envelope_bytes ({})",
                routing.max_envelope_bytes
            ),
        ))
    } else if routing.inputs.contains(&action) {
        verify(body, event_type)
            .and_then(|envelope| at_current_major(routing.contracts, action, envelope))
    } else {
        Err(HandleError::permanent(
            reason::UNKNOWN_EVENT_TYPE,
            format!(
                "{event_type} is not an input of {} (inputs: {})",
                routing.service,
                routing.inputs.join(", ")
            ),
        ))
    };
    match verdict {
        Ok(envelope) => Route::Input(envelope),
        Err(err) => Route::Refused(err),
    }
}

/// The runtime's part of validation: the envelope, its event type against
/// the subject, and that the payload is JSON at all. Public for the fuzz
/// targets (`fuzz/`).
pub fn verify(body: &[u8], event_type: &str) -> Result<EventEnvelope, HandleError> {
    let envelope = EventEnvelope::decode(body).map_err(|err| {
        let reason = match err {
            EnvelopeError::Malformed(_) => reason::MALFORMED_ENVELOPE,
            EnvelopeError::ContentHashMismatch { .. } => reason::CONTENT_HASH_MISMATCH,
            EnvelopeError::UnsupportedSchemaVersion(_) => reason::UNSUPPORTED_SCHEMA_VERSION,
        };
        HandleError::permanent(reason, err.to_string())
    })?;
    if envelope.event_type != event_type {
        return Err(HandleError::permanent(
            reason::EVENT_TYPE_MISMATCH,
            format!(
                "envelope says {:?} but arrived on the subject of {event_type:?}",
                envelope.event_type
            ),
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&envelope.payload).map_err(|err| {
        HandleError::permanent(
            reason::PAYLOAD_INVALID,
            format!("payload is not JSON: {err}"),
        )
    })?;
    Ok(envelope)
}

/// The input with its payload at its contract's current major: upcast step
/// by step when older, refused when its major is not one the room reads.
/// The envelope then says the current version, and its hash is the upcast
/// payload's, so what the handler sees is consistent.
pub fn at_current_major(
    contracts: Option<&Contracts>,
    action: &str,
    mut envelope: EventEnvelope,
) -> Result<EventEnvelope, HandleError> {
    let Some(contract) = contracts.and_then(|contracts| contracts.get(action)) else {
        if contract::major_of(&envelope.schema_version) == Some(1) {
            return Ok(envelope);
        }
        return Err(HandleError::permanent(
            reason::UNSUPPORTED_SCHEMA_VERSION,
            format!(
                "schema_version {:?} of {action}: this room reads major 1",
                envelope.schema_version
            ),
        ));
    };
    match contract.to_current(&envelope.schema_version, &envelope.payload) {
        Ok(None) => Ok(envelope),
        Ok(Some(payload)) => {
            envelope.content_hash = content_hash(&payload);
            envelope.payload = payload;
            envelope.schema_version = contract::version_of(contract.current);
            Ok(envelope)
        }
        Err(err @ ContractError::UnsupportedMajor { .. }) => Err(HandleError::permanent(
            reason::UNSUPPORTED_SCHEMA_VERSION,
            err.to_string(),
        )),
        Err(err @ ContractError::Upcast { .. }) => Err(HandleError::permanent(
            reason::PAYLOAD_INVALID,
            err.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTING: Routing<'static> = Routing {
        inputs: &["property_sync.requested"],
        outputs: &["conflict.detected"],
        max_envelope_bytes: 4096,
        service: "the-conch",
        contracts: None,
    };
    const INPUT: &str = "coordination.property_sync.requested";

    fn envelope(event_type: &str, payload: &[u8]) -> Vec<u8> {
        EventEnvelope::new(
            uuid::Uuid::now_v7(),
            event_type.into(),
            "doc-1".into(),
            "c-1".into(),
            payload.to_vec(),
            "test".into(),
        )
        .encode()
    }

    fn refusal(route: Route) -> &'static str {
        match route {
            Route::Refused(HandleError::Permanent { reason, .. }) => reason.as_str(),
            other => panic!("expected a permanent refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_input_with_a_good_envelope_goes_to_its_lane() {
        let body = envelope(INPUT, br#"{"document_id":"doc-1"}"#);
        match route(&ROUTING, "property_sync.requested", INPUT, &body) {
            Route::Input(envelope) => assert_eq!(envelope.aggregate_id, "doc-1"),
            other => panic!("expected an input, got {other:?}"),
        }
    }

    #[test]
    fn an_own_output_is_recognised_before_its_body_is_read() {
        let route = route(
            &ROUTING,
            "conflict.detected",
            "coordination.conflict.detected",
            b"not an envelope",
        );
        assert!(matches!(route, Route::OwnOutput));
    }

    #[test]
    fn each_refusal_names_its_reason() {
        let body = envelope(INPUT, b"{}");
        assert_eq!(
            refusal(route(&ROUTING, "made.up", "coordination.made.up", &body)),
            "unknown_event_type"
        );
        let large = envelope(INPUT, format!("\"{}\"", "x".repeat(5000)).as_bytes());
        assert_eq!(
            refusal(route(&ROUTING, "property_sync.requested", INPUT, &large)),
            "envelope_too_large"
        );
        let mismatched = envelope("coordination.other", b"{}");
        assert_eq!(
            refusal(route(
                &ROUTING,
                "property_sync.requested",
                INPUT,
                &mismatched
            )),
            "event_type_mismatch"
        );
        let not_json = envelope(INPUT, b"{oops");
        assert_eq!(
            refusal(route(&ROUTING, "property_sync.requested", INPUT, &not_json)),
            "payload_invalid"
        );
        assert_eq!(
            refusal(route(&ROUTING, "property_sync.requested", INPUT, b"{}")),
            "malformed_envelope"
        );
        let mut tampered: serde_json::Value =
            serde_json::from_slice(&envelope(INPUT, br#"{"a":1}"#)).expect("an envelope is JSON");
        tampered["content_hash"] = "0".repeat(64).into();
        let tampered = tampered.to_string();
        assert_eq!(
            refusal(route(
                &ROUTING,
                "property_sync.requested",
                INPUT,
                tampered.as_bytes()
            )),
            "content_hash_mismatch"
        );
    }
}
