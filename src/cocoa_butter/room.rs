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

pub use super::api::JsonError;
use super::api::{self, decode_json};
use super::config::RoomSettings;
use super::contract::EventContract;
pub use super::contract::Outbound;
pub use super::dlq::{Reason, reason};
use super::envelope::Action;
use super::envelope::{Cause, EventEnvelope};
use super::metrics::RoomMetrics;
use super::nats::{KvBucket, ObjectBucket, PublishError, Publisher, StoreError};
use crate::cocoa_butter::streams::StoreStreams;

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
    /// One contract per input and output: its payload type and majors
    /// (`contract/`). The runtime refuses to start a room whose contracts
    /// and `inputs()`/`outputs()` disagree.
    pub contracts: fn() -> Vec<EventContract>,
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

impl RoomContext {
    /// A key-value bucket of the room, kept as `rooms.<room>` says
    /// (`streams.buckets`), timed into the room's metrics, and probed with
    /// the room's stream when a call fails.
    pub fn kv_bucket(&self, bucket: &str, description: &'static str) -> KvBucket {
        self.store_streams.register(format!("KV_{bucket}"));
        KvBucket::new(
            self.jetstream.clone(),
            bucket,
            description,
            self.settings.buckets.clone(),
        )
        .observed(self.metrics.clone())
    }

    /// An object store of the room, kept and observed like
    /// [`RoomContext::kv_bucket`].
    pub fn object_bucket(&self, bucket: &str, description: &'static str) -> ObjectBucket {
        self.store_streams.register(format!("OBJ_{bucket}"));
        ObjectBucket::new(
            self.jetstream.clone(),
            bucket,
            description,
            self.settings.buckets.clone(),
            self.metrics.clone(),
        )
    }
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

    /// The reasons the room dead-letters with besides the runtime's own
    /// ([`reason::RUNTIME`]), so their metric series exist from the start.
    fn dead_letter_reasons(&self) -> &'static [Reason] {
        &[]
    }

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
            .map_err(|err| HandleError::permanent(reason::PAYLOAD_INVALID, err.to_string()))
    }

    /// Which of the room's inputs this is, for `handle` to match on
    /// exhaustively. The runtime hands a room only the inputs it declares,
    /// so the refusal (`unknown_event_type`) is for a room whose `inputs()`
    /// and `I` disagree.
    pub fn input<I: Action>(&self) -> Result<I, HandleError> {
        I::parse(&self.action).ok_or_else(|| {
            HandleError::permanent(
                reason::UNKNOWN_EVENT_TYPE,
                format!("{} is not an input of this room", self.action),
            )
        })
    }

    pub fn cause(&self) -> Cause {
        Cause::of(&self.envelope)
    }
}

/// Why handling failed, which decides what happens to the message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandleError {
    /// The input can never succeed: dead-lettered at once with `reason`.
    #[error("{reason}: {detail}")]
    Permanent { reason: Reason, detail: String },
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
    pub fn permanent(reason: Reason, detail: impl Into<String>) -> Self {
        HandleError::Permanent {
            reason,
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

    /// As an HTTP answer: transient → 503, permanent → 500 with the reason
    /// as the code.
    pub fn into_http(self) -> axum::response::Response {
        use axum::http::StatusCode;
        match self {
            HandleError::Transient(message) | HandleError::Bus(message) => api::http_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                None,
                &message,
            ),
            HandleError::Permanent { reason, detail } => api::http_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                reason.as_str(),
                None,
                &detail,
            ),
        }
    }

    /// As a gRPC status: transient → UNAVAILABLE, permanent → INTERNAL.
    pub fn into_grpc(self) -> tonic::Status {
        match self {
            HandleError::Transient(message) | HandleError::Bus(message) => {
                tonic::Status::unavailable(message)
            }
            HandleError::Permanent { reason, detail } => {
                tonic::Status::internal(format!("{reason}: {detail}"))
            }
        }
    }
}

impl From<PublishError> for HandleError {
    fn from(err: PublishError) -> Self {
        if err.bus_fault {
            HandleError::bus(err)
        } else {
            HandleError::transient(err)
        }
    }
}

/// A bucket that is not open yet is a NATS failure like any other: the
/// input is held and handled again once the bucket answers.
impl From<StoreError> for HandleError {
    fn from(err: StoreError) -> Self {
        HandleError::bus(err)
    }
}

/// A handler's failure answers an HTTP call as [`HandleError::into_http`].
impl axum::response::IntoResponse for HandleError {
    fn into_response(self) -> axum::response::Response {
        self.into_http()
    }
}

/// A handler's failure answers a gRPC call as [`HandleError::into_grpc`].
impl From<HandleError> for tonic::Status {
    fn from(err: HandleError) -> Self {
        err.into_grpc()
    }
}

/// Why a room's API call failed, answered the same way on both protocols:
/// bad fields as 400 / `INVALID_ARGUMENT` naming them (every one in
/// `error.violations` and `google.rpc.BadRequest` when there are several),
/// anything else as the room's work failed. HTTP handlers return
/// `Result<_, ApiError>` and use `?`; gRPC ones convert with `?` too.
#[derive(Debug)]
pub enum ApiError {
    /// One bad field, and why (`message` without the field: answers say
    /// `field: message`).
    Field { field: String, message: String },
    /// Every bad field of the request.
    Fields(Vec<api::FieldViolation>),
    /// What the call names (`field`) does not exist: 404 / `NOT_FOUND`.
    NotFound {
        field: &'static str,
        message: String,
    },
    /// The room's work failed.
    Handle(HandleError),
}

impl ApiError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Field {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<api::JsonError> for ApiError {
    fn from(err: api::JsonError) -> Self {
        ApiError::Field {
            field: err.field,
            message: err.message,
        }
    }
}

impl From<api::FieldError> for ApiError {
    fn from(err: api::FieldError) -> Self {
        ApiError::Field {
            field: err.field.to_string(),
            message: err.message,
        }
    }
}

impl From<Vec<api::FieldViolation>> for ApiError {
    fn from(violations: Vec<api::FieldViolation>) -> Self {
        ApiError::Fields(violations)
    }
}

impl From<HandleError> for ApiError {
    fn from(err: HandleError) -> Self {
        ApiError::Handle(err)
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        match self {
            ApiError::Field { field, message } => {
                let text = api::FieldViolation::new(field.clone(), message).text();
                api::bad_request(&field, &text)
            }
            ApiError::Fields(violations) => api::bad_request_fields(&violations),
            ApiError::NotFound { field, message } => api::http_error(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                Some(field),
                &message,
            ),
            ApiError::Handle(err) => err.into_http(),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::Field { field, message } => api::invalid_argument(&field, &message),
            ApiError::Fields(violations) => api::invalid_arguments(&violations),
            ApiError::NotFound { message, .. } => tonic::Status::not_found(message),
            ApiError::Handle(err) => err.into_grpc(),
        }
    }
}

/// A JSON request body decoded as `T`, for a room's HTTP handlers: a body
/// that does not fit is refused with 400 naming the field, as
/// [`decode_json`] names it; a body over the size limit keeps its own
/// answer (413).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = axum::response::Response;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        use axum::response::IntoResponse;
        let bytes = bytes::Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        decode_json(&bytes)
            .map(JsonBody)
            .map_err(|err| ApiError::from(err).into_response())
    }
}

/// A room could not be built or prepared.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// Bad `rooms.<room>.settings`; `key` is the full dotted key.
    #[error("{key}: {message}")]
    Settings { key: String, message: String },
    /// Preparing what the room keeps in NATS failed (`what` says which).
    #[error("{what}: {source}")]
    Prepare {
        what: String,
        #[source]
        source: HandleError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    async fn http(err: ApiError) -> (StatusCode, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).expect("JSON"))
    }

    #[tokio::test]
    async fn an_api_error_answers_the_same_on_both_protocols() {
        let bad = || ApiError::field("document_id", "must not be empty");
        let (status, body) = http(bad()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["field"], "document_id");
        assert_eq!(body["error"]["message"], "document_id: must not be empty");
        let grpc = tonic::Status::from(bad());
        assert_eq!(grpc.code(), tonic::Code::InvalidArgument);
        assert_eq!(grpc.message(), "document_id: must not be empty");

        let json: ApiError = decode_json::<SyncLike>(br#"{"a": 1}"#)
            .map(|_| ())
            .expect_err("b is missing")
            .into();
        let (status, body) = http(json).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["field"], "b");

        let several = || {
            ApiError::from(vec![
                api::FieldViolation::new("a", "is required"),
                api::FieldViolation::new("b", "is too long"),
            ])
        };
        let (_, body) = http(several()).await;
        assert_eq!(
            body["error"]["violations"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(
            tonic::Status::from(several()).code(),
            tonic::Code::InvalidArgument
        );

        let missing = || ApiError::NotFound {
            field: "document_id",
            message: "no artifact for \"d\"".into(),
        };
        assert_eq!(http(missing()).await.0, StatusCode::NOT_FOUND);
        assert_eq!(tonic::Status::from(missing()).code(), tonic::Code::NotFound);

        let down = || ApiError::from(HandleError::bus("no leader"));
        assert_eq!(http(down()).await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(tonic::Status::from(down()).code(), tonic::Code::Unavailable);
        let broken = || ApiError::from(HandleError::permanent(reason::PAYLOAD_INVALID, "x"));
        assert_eq!(http(broken()).await.0, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(tonic::Status::from(broken()).code(), tonic::Code::Internal);
    }

    #[derive(Debug, serde::Deserialize)]
    struct SyncLike {
        #[allow(dead_code)]
        a: u32,
        #[allow(dead_code)]
        b: String,
    }
}
