//! The EventEnvelope: the JSON body of every message on `choco.events.>`.
//!
//! Wire-compatible with the platform's Go struct: `payload` is the payload's
//! bytes in standard base64 (how Go's encoding/json writes `[]byte`),
//! `content_hash` is the lower-case hex SHA-256 of those bytes, `created_at`
//! is RFC 3339. Unknown fields are tolerated so producers can add metadata.

use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The schema version of a payload whose contract has one major (and of
/// what the runtime writes without a contract). An event's own payload
/// schema sets its version: `contract/`.
pub const SCHEMA_VERSION: &str = "1.0.0";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub event_id: String,
    pub event_type: String,
    #[serde(default)]
    pub aggregate_id: String,
    #[serde(default)]
    pub correlation_id: String,
    #[serde(default)]
    pub content_hash: String,
    #[serde(default)]
    pub schema_version: String,
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub source_service: String,
}

/// Why a message body is not a usable envelope. Each of these is permanent:
/// redelivering the same bytes cannot fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("content_hash {claimed} does not match the payload's SHA-256 {actual}")]
    ContentHashMismatch { claimed: String, actual: String },
    #[error("schema_version {0:?} is not a version (MAJOR.MINOR.PATCH)")]
    UnsupportedSchemaVersion(String),
}

impl EnvelopeError {
    /// The dead-letter reason: stable, snake_case, meant for dashboards.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::Malformed(_) => "malformed_envelope",
            EnvelopeError::ContentHashMismatch { .. } => "content_hash_mismatch",
            EnvelopeError::UnsupportedSchemaVersion(_) => "unsupported_schema_version",
        }
    }
}

/// The major of a `schema_version` (`"2.1.0"` → 2).
pub fn major_of(version: &str) -> Option<u64> {
    version.split('.').next()?.trim().parse().ok()
}

/// Lower-case hex SHA-256.
pub fn content_hash(payload: &[u8]) -> String {
    lower_hex(&Sha256::digest(payload))
}

/// Whether `claimed` (hex, either case) is the SHA-256 of `payload`: the
/// claim decoded and compared as bytes, so the check of every input builds
/// no string.
fn hash_matches(claimed: &str, payload: &[u8]) -> bool {
    let mut claimed_bytes = [0u8; 32];
    hex::decode_to_slice(claimed, &mut claimed_bytes).is_ok()
        && claimed_bytes == Sha256::digest(payload).as_slice()
}

/// A digest in lower-case hex, written in one pass into a string of the
/// right size: `hex::encode` collects its digits one `char` at a time (2 %
/// of a room's instructions per input in a callgrind profile, for two
/// hashes).
fn lower_hex(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(digest.len() * 2);
    for byte in digest {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

impl EventEnvelope {
    /// Wraps a payload for publishing.
    pub fn new(
        event_id: Uuid,
        event_type: String,
        aggregate_id: String,
        correlation_id: String,
        payload: Vec<u8>,
        source_service: String,
    ) -> Self {
        EventEnvelope {
            event_id: event_id.to_string(),
            event_type,
            aggregate_id,
            correlation_id,
            content_hash: content_hash(&payload),
            schema_version: SCHEMA_VERSION.to_string(),
            payload,
            created_at: Utc::now(),
            source_service,
        }
    }

    /// Parses and checks a message body: structure, required fields, that
    /// the schema version has a major, and the content hash, in that order.
    /// Which majors an event may have is its contract's to say.
    pub fn decode(body: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: EventEnvelope = serde_json::from_slice(body)
            .map_err(|err| EnvelopeError::Malformed(err.to_string()))?;
        for (field, value) in [
            ("event_id", &envelope.event_id),
            ("event_type", &envelope.event_type),
            ("aggregate_id", &envelope.aggregate_id),
            ("content_hash", &envelope.content_hash),
            ("schema_version", &envelope.schema_version),
        ] {
            if value.trim().is_empty() {
                return Err(EnvelopeError::Malformed(format!("{field} is required")));
            }
        }
        if major_of(&envelope.schema_version).is_none() {
            return Err(EnvelopeError::UnsupportedSchemaVersion(
                envelope.schema_version,
            ));
        }
        if !hash_matches(envelope.content_hash.trim(), &envelope.payload) {
            return Err(EnvelopeError::ContentHashMismatch {
                actual: content_hash(&envelope.payload),
                claimed: envelope.content_hash,
            });
        }
        Ok(envelope)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings, bytes and a timestamp cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The correlation id to carry forward: the envelope's own, or its
    /// event id when the producer started a new chain.
    pub fn correlation(&self) -> &str {
        if self.correlation_id.is_empty() {
            &self.event_id
        } else {
            &self.correlation_id
        }
    }
}

/// What caused a set of outputs: an input event or an API request. Output
/// ids are derived from it, so handling the same cause twice yields the same
/// ids and JetStream's duplicate window drops the second copy.
#[derive(Debug, Clone)]
pub struct Cause {
    pub id: String,
    pub correlation_id: String,
    pub at: DateTime<Utc>,
}

impl Cause {
    pub fn of(envelope: &EventEnvelope) -> Self {
        Cause {
            id: envelope.event_id.clone(),
            correlation_id: envelope.correlation().to_string(),
            at: envelope.created_at,
        }
    }

    /// The UUIDv7 of the `index`-th output: its time is the cause's (taken
    /// from the cause's own UUIDv7 when it is one), its random bits a hash of
    /// the cause id and the index.
    pub fn output_id(&self, index: usize) -> Uuid {
        let millis = Uuid::parse_str(&self.id)
            .ok()
            .filter(|id| id.get_version_num() == 7)
            .and_then(|id| id.get_timestamp())
            .map(|ts| {
                let (secs, nanos) = ts.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000
            })
            .unwrap_or_else(|| u64::try_from(self.at.timestamp_millis()).unwrap_or(0));
        let digest = Sha256::new()
            .chain_update(self.id.as_bytes())
            .chain_update(b"/")
            .chain_update(index.to_be_bytes())
            .finalize();
        let mut random = [0u8; 10];
        random.copy_from_slice(&digest[..10]);
        uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
    }
}

/// RFC 3339 with as many fractional digits as needed, like Go's RFC3339Nano.
pub fn rfc3339(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

mod base64_bytes {
    use super::BASE64;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        // Go writes a nil []byte as null; the envelope requires a payload.
        let text = Option::<String>::deserialize(deserializer)?
            .ok_or_else(|| serde::de::Error::custom("payload is required"))?;
        BASE64
            .decode(text.as_bytes())
            .map_err(|err| serde::de::Error::custom(format!("payload is not base64: {err}")))
    }
}

/// A room's actions in one direction as a type (`room_actions!` declares
/// them): `Room::inputs`/`outputs`, the match in `Room::handle` and the
/// outputs a handler builds all come from one list, so an action is never
/// spelt twice.
pub trait Action: Copy + 'static {
    /// Every action of the type, in declaration order.
    const ALL: &'static [&'static str];

    /// The action as it follows the room's prefix (`conflict.detected`).
    fn as_str(self) -> &'static str;

    /// The action named `action`, if it is one of these.
    fn parse(action: &str) -> Option<Self>;
}

/// The actions a room publishes: only these build an [`Outbound`].
pub trait OutputAction: Action {}

/// Declares a room's input or output actions:
///
/// ```ignore
/// room_actions! {
///     /// What the room consumes.
///     pub enum Input: inputs {
///         Requested = "requested",
///     }
/// }
/// room_actions! {
///     pub enum Output: outputs {
///         Completed = "completed",
///         Failed = "failed",
///     }
/// }
/// ```
#[macro_export]
macro_rules! room_actions {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $direction:ident {
            $($(#[$variant_meta:meta])* $variant:ident = $action:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        impl $crate::cocoa_butter::envelope::Action for $name {
            const ALL: &'static [&'static str] = &[$($action),+];

            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $action),+
                }
            }

            fn parse(action: &str) -> Option<Self> {
                match action {
                    $($action => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        $crate::room_actions!(@direction $direction $name);
    };
    (@direction inputs $name:ident) => {};
    (@direction outputs $name:ident) => {
        impl $crate::cocoa_butter::envelope::OutputAction for $name {}
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EventEnvelope {
        EventEnvelope::new(
            Uuid::now_v7(),
            "coordination.property_sync.requested".into(),
            "doc-1".into(),
            String::new(),
            br#"{"a":1}"#.to_vec(),
            "test".into(),
        )
    }

    #[test]
    fn round_trips_and_matches_go_encoding() {
        let envelope = sample();
        let body = envelope.encode();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["payload"], "eyJhIjoxfQ==");
        assert_eq!(
            json["content_hash"],
            "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
        );
        assert_eq!(EventEnvelope::decode(&body).expect("valid"), envelope);
    }

    /// The claim is compared as bytes: either case passes, a claim of
    /// another length or with a non-hex digit fails, and the error names
    /// the actual hash in lower case.
    #[test]
    fn content_hash_claims_are_compared_as_bytes() {
        let good = sample();
        let mut upper = good.clone();
        upper.content_hash = good.content_hash.to_uppercase();
        assert_eq!(
            EventEnvelope::decode(&upper.encode())
                .expect("either case")
                .payload,
            good.payload
        );
        for claim in [
            &good.content_hash[..62],
            &format!("{}0", good.content_hash),
            &format!("{}g", &good.content_hash[..63]),
        ] {
            let mut bad = good.clone();
            bad.content_hash = claim.to_string();
            match EventEnvelope::decode(&bad.encode()) {
                Err(EnvelopeError::ContentHashMismatch { claimed, actual }) => {
                    assert_eq!(claimed, claim);
                    assert_eq!(actual, good.content_hash);
                }
                other => panic!("{claim}: {other:?}"),
            }
        }
        assert_eq!(
            content_hash(b"{\"a\":1}"),
            "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
        );
    }

    #[test]
    fn tolerates_unknown_fields() {
        let mut json: serde_json::Value = serde_json::from_slice(&sample().encode()).expect("json");
        json["extra"] = serde_json::json!({"x": 1});
        EventEnvelope::decode(&serde_json::to_vec(&json).expect("json")).expect("tolerated");
    }

    #[test]
    fn rejects_with_reasons() {
        let mut tampered = sample();
        tampered.payload = br#"{"a":2}"#.to_vec();
        let err = EventEnvelope::decode(&tampered.encode()).expect_err("tampered");
        assert_eq!(err.reason(), "content_hash_mismatch");

        let err = EventEnvelope::decode(b"not json").expect_err("garbage");
        assert_eq!(err.reason(), "malformed_envelope");

        let mut unversioned = sample();
        unversioned.schema_version = "latest".into();
        let err = EventEnvelope::decode(&unversioned.encode()).expect_err("no major");
        assert_eq!(err.reason(), "unsupported_schema_version");

        let mut json: serde_json::Value = serde_json::from_slice(&sample().encode()).expect("json");
        json["payload"] = serde_json::Value::Null;
        let err =
            EventEnvelope::decode(&serde_json::to_vec(&json).expect("json")).expect_err("nil");
        assert_eq!(err.reason(), "malformed_envelope");
    }

    /// 10,000 levels of nesting, wherever they are, neither overflow the
    /// stack nor pass: run on a thread with a 256 KiB stack, far less than
    /// a runtime worker's, so any recursion per level would show.
    #[test]
    fn deep_nesting_is_refused_without_deep_recursion() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let checked = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                // As the whole body: refused at its first token.
                let whole = EventEnvelope::decode(deep.as_bytes()).expect_err("an array");
                // In an unknown field: skipped iteratively, so tolerated.
                let mut body = sample().encode();
                body.pop();
                body.extend_from_slice(format!(r#","extra":{deep}}}"#).as_bytes());
                let tolerated = EventEnvelope::decode(&body).is_ok();
                // As any JSON value (what a payload field typed Value is):
                // serde_json's recursion limit (128) refuses it.
                let value = serde_json::from_str::<serde_json::Value>(&deep)
                    .expect_err("too deep")
                    .to_string();
                (whole.reason(), tolerated, value)
            })
            .expect("thread")
            .join()
            .expect("no stack overflow");
        assert_eq!(checked.0, "malformed_envelope");
        assert!(checked.1, "an unknown field is skipped, however deep");
        assert!(
            checked.2.contains("recursion limit exceeded"),
            "{}",
            checked.2
        );
    }

    #[test]
    fn output_ids_are_deterministic_v7() {
        let cause = Cause::of(&sample());
        let a = cause.output_id(0);
        assert_eq!(a, cause.output_id(0));
        assert_ne!(a, cause.output_id(1));
        assert_eq!(a.get_version_num(), 7);
    }
}
