//! The runtime's envelope checks on arbitrary message bodies: every body
//! gets a verdict (never a panic), every refusal is one of the documented
//! permanent reasons, and a valid envelope survives its own encoding.

#![no_main]

use choco_factory::cocoa_butter::consumer::verify;
use choco_factory::cocoa_butter::{EventEnvelope, HandleError};
use libfuzzer_sys::fuzz_target;

const REASONS: &[&str] = &[
    "malformed_envelope",
    "content_hash_mismatch",
    "unsupported_schema_version",
    "event_type_mismatch",
    "payload_invalid",
];

fn check(body: &[u8], event_type: &str) {
    match verify(body, event_type) {
        Ok(envelope) => assert_eq!(envelope.event_type, event_type),
        Err(HandleError::Permanent { reason, .. }) => {
            assert!(
                REASONS.contains(&reason.as_str()),
                "undocumented reason {reason}"
            )
        }
        Err(other) => panic!("a bad body must never be retried: {other}"),
    }
}

fuzz_target!(|body: &[u8]| {
    check(body, "coordination.property_sync.requested");
    if let Ok(envelope) = EventEnvelope::decode(body) {
        check(body, &envelope.event_type);
        // What the runtime writes reads back as the same envelope.
        let again = EventEnvelope::decode(&envelope.encode())
            .unwrap_or_else(|err| panic!("a re-encoded envelope is refused: {err}"));
        assert_eq!(again, envelope);
    }
});
