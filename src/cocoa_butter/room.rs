//! The contract between the runtime and a room.
//!
//! A room is one [`RoomSpec`] (its name in the port table and how to build
//! it) and one type implementing [`Room`]. The runtime owns everything else:
//! the NATS connection, streams, the durable consumer, ordering, retries,
//! dead letters, the three servers, metrics and logs.

use std::sync::Arc;

use async_nats::jetstream;
use async_trait::async_trait;
use serde::de::DeserializeOwned;

use super::config::RoomSettings;
use super::envelope::{Cause, EventEnvelope};
use super::metrics::RoomMetrics;
use super::nats::Publisher;
use super::nats::streams::StoreStreams;

/// How a room enters the runtime: `rooms/mod.rs` lists one per room.
pub struct RoomSpec {
    /// The room's key in the port table (`conch`).
    pub name: &'static str,
    /// Checks the room's `settings` without touching the network, so
    /// `config check` and start-up refuse bad settings before anything runs.
    pub check: fn(&RoomSettings) -> Result<(), RoomError>,
    /// Builds the room. Must not block or do I/O: NATS may not be up yet.
    pub build: fn(RoomContext) -> Result<Arc<dyn Room>, RoomError>,
    /// The room's settings when `rooms.<room>.settings` sets nothing, as
    /// JSON, so `config show` lists every setting with its default.
    pub defaults: fn() -> serde_json::Value,
}

/// What the runtime hands a room when building it.
#[derive(Clone)]
pub struct RoomContext {
    pub settings: RoomSettings,
    pub jetstream: jetstream::Context,
    /// Publishes envelopes on the room's own prefix.
    pub publisher: Publisher,
    /// The room's metrics; its buckets time their operations into them.
    pub metrics: RoomMetrics,
    /// Where the room's buckets register the streams they live on.
    pub store_streams: StoreStreams,
}

/// A room's gRPC service, served on its gRPC port next to health and reflection.
pub struct GrpcService {
    /// Fully-qualified service name (`choco.factory.conch.v1.Conch`), for
    /// the health service and reflection.
    pub name: &'static str,
    pub routes: tonic::service::Routes,
}

/// One thing a room does to documents in transit.
#[async_trait]
pub trait Room: Send + Sync + 'static {
    /// Actions on the room's prefix it consumes (`property_sync.requested`).
    fn inputs(&self) -> &'static [&'static str];

    /// Actions it publishes on its prefix. The consumer sees them come back
    /// on the prefix and acknowledges them untouched.
    fn outputs(&self) -> &'static [&'static str];

    /// Creates what the room keeps in NATS (key-value buckets, object
    /// stores). Called before the consumer is bound, and again after every
    /// rebind, so it must be idempotent.
    async fn prepare(&self) -> Result<(), RoomError>;

    /// Handles one input. Returned outputs are published by the runtime with
    /// ids derived from the input, then the input is acknowledged.
    async fn handle(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError>;

    /// Routes merged into the room's HTTP server, next to /healthz, /readyz, /info.
    fn http_routes(self: Arc<Self>) -> axum::Router;

    fn grpc_service(self: Arc<Self>) -> GrpcService;
}

/// An input delivered to a room, its envelope already verified.
#[derive(Debug, Clone)]
pub struct InboundEvent {
    pub envelope: EventEnvelope,
    /// The subject minus the room's prefix: `property_sync.requested`.
    pub action: String,
    pub subject: String,
    pub stream_sequence: u64,
    /// 1 on first delivery.
    pub delivered: i64,
}

impl InboundEvent {
    /// Decodes the payload as JSON of type `T`; a mismatch is a permanent
    /// `payload_invalid` failure naming the field.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, HandleError> {
        decode_json(&self.envelope.payload)
            .map_err(|err| HandleError::permanent("payload_invalid", err.to_string()))
    }

    pub fn cause(&self) -> Cause {
        Cause::of(&self.envelope)
    }
}

/// A JSON document that does not fit the expected type, with the field at
/// fault when there is one (`"body"` when the whole document is unusable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct JsonError {
    pub field: String,
    pub message: String,
}

/// Parses JSON and names the offending field: its path for a bad value,
/// its name for a missing one.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string);
        let field = match (missing, path.as_str()) {
            (Some(name), "." | "") => name,
            (Some(name), parent) => format!("{parent}.{name}"),
            (None, "." | "") => "body".to_string(),
            (None, path) => path.to_string(),
        };
        JsonError { field, message }
    })
}

/// An event a room wants published on its prefix.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Outbound {
    /// `conflict.detected`; the subject is the room's prefix plus this.
    pub action: String,
    pub aggregate_id: String,
    pub payload: serde_json::Value,
    /// Deduplicates by what the output says rather than by what caused it:
    /// when set, the `Nats-Msg-Id` is derived from this key, so two inputs
    /// producing the same output inside the duplicate window store it once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl Outbound {
    pub fn new(action: &str, aggregate_id: &str, payload: serde_json::Value) -> Self {
        Outbound {
            action: action.to_string(),
            aggregate_id: aggregate_id.to_string(),
            payload,
            idempotency_key: None,
        }
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// Why handling failed, which decides what happens to the message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandleError {
    /// The input can never succeed: dead-lettered at once with `reason`.
    #[error("{reason}: {detail}")]
    Permanent { reason: String, detail: String },
    /// Something the room depends on is unavailable: retried with backoff,
    /// dead-lettered after the last delivery.
    #[error("{0}")]
    Transient(String),
    /// NATS itself failed the room (a key-value or object-store call, a
    /// publish): a stream without a leader, a lost quorum, a leader change,
    /// a dropped connection. Not the input's fault, so it never counts
    /// toward `max_deliver`: the engine holds the input (keeping it alive
    /// with in-progress acks) and handles it again in place once NATS
    /// answers, while the room reports not ready.
    #[error("NATS: {0}")]
    Bus(String),
}

impl HandleError {
    pub fn permanent(reason: &str, detail: impl Into<String>) -> Self {
        HandleError::Permanent {
            reason: reason.to_string(),
            detail: detail.into(),
        }
    }

    pub fn transient(detail: impl std::fmt::Display) -> Self {
        HandleError::Transient(detail.to_string())
    }

    /// A failed call to NATS (a store operation, a publish).
    pub fn bus(detail: impl std::fmt::Display) -> Self {
        HandleError::Bus(detail.to_string())
    }
}

/// A room could not be built or prepared.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// Bad `rooms.<room>.settings`; `key` is the full dotted key.
    #[error("{key}: {message}")]
    Settings { key: String, message: String },
    #[error("{0}")]
    Nats(String),
}

impl RoomSettings {
    /// Deserializes the room's own `settings` table into its settings type;
    /// an error names the full key (`rooms.conch.settings.default_policy`).
    pub fn room_settings<T: DeserializeOwned>(&self) -> Result<T, RoomError> {
        serde_path_to_error::deserialize(self.settings.clone()).map_err(|err| {
            let path = err.path().to_string();
            let field = if path == "." { String::new() } else { path };
            self.settings_error(&field, err.into_inner().to_string())
        })
    }

    /// A refusal of one of the room's settings, `field` relative to
    /// `settings` (`"threshold"`, `""` for the table itself).
    pub fn settings_error(&self, field: &str, message: impl Into<String>) -> RoomError {
        let key = if field.is_empty() {
            format!("rooms.{}.settings", self.name)
        } else {
            format!("rooms.{}.settings.{field}", self.name)
        };
        RoomError::Settings {
            key,
            message: message.into(),
        }
    }
}
