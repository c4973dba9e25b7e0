//! The conch's synchronous APIs: gRPC `choco.factory.conch.v1.Conch` and
//! its HTTP mirror. Both run the same rules as the event path and publish
//! the same events; bad requests are refused naming the field.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tonic::{Request, Status};

use super::Conch;
use super::sync::{self, PropertyState, SyncRequest};
use crate::cocoa_butter::{GrpcService, HandleError, decode_json};

pub mod pb {
    tonic::include_proto!("choco.factory.conch.v1");
}

/// Header (HTTP) and metadata key (gRPC) that carries a correlation id in.
const CORRELATION_HEADER: &str = "x-correlation-id";

pub fn http_routes(conch: Arc<Conch>) -> Router {
    Router::new()
        .route("/v1/properties/sync", post(sync_http))
        .route("/v1/documents/{document_id}/properties", get(properties_http))
        .with_state(conch)
}

fn http_error(status: StatusCode, code: &str, field: Option<&str>, message: &str) -> Response {
    let body = json!({ "error": { "code": code, "field": field, "message": message } });
    (status, axum::Json(body)).into_response()
}

fn handle_error_http(err: HandleError) -> Response {
    match err {
        HandleError::Transient(message) => {
            http_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", None, &message)
        }
        HandleError::Permanent { reason, detail } => {
            http_error(StatusCode::INTERNAL_SERVER_ERROR, &reason, None, &detail)
        }
    }
}

async fn sync_http(State(conch): State<Arc<Conch>>, headers: HeaderMap, body: Bytes) -> Response {
    let request: SyncRequest = match decode_json(&body) {
        Ok(request) => request,
        Err(err) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                Some(&err.field),
                &err.to_string(),
            );
        }
    };
    if let Err(err) = request.validate() {
        return http_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            Some(err.field),
            &err.to_string(),
        );
    }
    let correlation = headers
        .get(CORRELATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let property = request.property.clone();
    match conch.sync_now(request, correlation).await {
        Ok(result) => axum::Json(json!({
            "outcome": result.outcome,
            "property": result.property.as_ref().map(|state| sync::property_json(&property, state)),
            "policy": result.receipt.policy.map(|p| p.name()),
            "winner": result.receipt.winner,
            "event_ids": result.event_ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(err) => handle_error_http(err),
    }
}

async fn properties_http(
    State(conch): State<Arc<Conch>>,
    Path(document_id): Path<String>,
) -> Response {
    match conch.properties(&document_id).await {
        Ok(record) => {
            let properties: serde_json::Map<String, Value> = record
                .properties
                .iter()
                .map(|(name, state)| (name.clone(), sync::property_json(name, state)))
                .collect();
            axum::Json(json!({ "document_id": document_id, "properties": properties }))
                .into_response()
        }
        Err(err) => handle_error_http(err),
    }
}

pub fn grpc_service(conch: Arc<Conch>) -> GrpcService {
    GrpcService {
        name: "choco.factory.conch.v1.Conch",
        routes: tonic::service::Routes::new(pb::conch_server::ConchServer::new(ConchGrpc { conch })),
    }
}

struct ConchGrpc {
    conch: Arc<Conch>,
}

fn invalid(field: &str, message: &str) -> Status {
    let mut status = Status::invalid_argument(format!("{field}: {message}"));
    if let Ok(value) = field.parse() {
        status.metadata_mut().insert("x-choco-field", value);
    }
    status
}

fn handle_error_grpc(err: HandleError) -> Status {
    match err {
        HandleError::Transient(message) => Status::unavailable(message),
        HandleError::Permanent { reason, detail } => Status::internal(format!("{reason}: {detail}")),
    }
}

#[tonic::async_trait]
impl pb::conch_server::Conch for ConchGrpc {
    async fn sync_property(
        &self,
        request: Request<pb::SyncPropertyRequest>,
    ) -> Result<tonic::Response<pb::SyncPropertyResponse>, Status> {
        let correlation = request
            .metadata()
            .get(CORRELATION_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        let message = request.into_inner();
        let updated_at = message
            .updated_at
            .ok_or_else(|| invalid("updated_at", "is required"))
            .and_then(|ts| {
                from_timestamp(&ts).ok_or_else(|| invalid("updated_at", "is out of range"))
            })?;
        let sync_request = SyncRequest {
            document_id: message.document_id,
            property: message.property,
            value: message.value.map_or(Value::Null, to_json),
            base_revision: message.base_revision,
            author_id: message.author_id,
            updated_at,
            request_id: Some(message.request_id).filter(|id| !id.is_empty()),
        };
        sync_request
            .validate()
            .map_err(|err| invalid(err.field, &err.message))?;
        let property = sync_request.property.clone();
        let result = self
            .conch
            .sync_now(sync_request, correlation)
            .await
            .map_err(handle_error_grpc)?;
        Ok(tonic::Response::new(pb::SyncPropertyResponse {
            outcome: match result.outcome {
                sync::Outcome::Applied => pb::SyncOutcome::Applied,
                sync::Outcome::ConflictResolved => pb::SyncOutcome::ConflictResolved,
                sync::Outcome::Duplicate => pb::SyncOutcome::Duplicate,
            } as i32,
            property: result.property.as_ref().map(|state| to_pb(&property, state)),
            policy: result
                .receipt
                .policy
                .map(|policy| policy.name().to_string())
                .unwrap_or_default(),
            winner: match result.receipt.winner {
                None => pb::Winner::Unspecified,
                Some(sync::Winner::Current) => pb::Winner::Current,
                Some(sync::Winner::Incoming) => pb::Winner::Incoming,
                Some(sync::Winner::Merged) => pb::Winner::Merged,
            } as i32,
            event_ids: result.event_ids.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn get_properties(
        &self,
        request: Request<pb::GetPropertiesRequest>,
    ) -> Result<tonic::Response<pb::GetPropertiesResponse>, Status> {
        let document_id = request.into_inner().document_id;
        if document_id.trim().is_empty() {
            return Err(invalid("document_id", "must not be empty"));
        }
        let record = self
            .conch
            .properties(&document_id)
            .await
            .map_err(handle_error_grpc)?;
        Ok(tonic::Response::new(pb::GetPropertiesResponse {
            document_id,
            properties: record
                .properties
                .iter()
                .map(|(name, state)| to_pb(name, state))
                .collect(),
        }))
    }
}

fn to_pb(name: &str, state: &PropertyState) -> pb::Property {
    pb::Property {
        name: name.to_string(),
        value: Some(from_json(&state.value)),
        revision: state.revision,
        author_id: state.author_id.clone(),
        updated_at: Some(prost_types::Timestamp {
            seconds: state.updated_at.timestamp(),
            nanos: i32::try_from(state.updated_at.timestamp_subsec_nanos()).unwrap_or(0),
        }),
    }
}

fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// `google.protobuf.Value` → JSON. Numbers arrive as doubles; whole ones
/// become integers again so `3` round-trips as `3`, not `3.0`.
fn to_json(value: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
                Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(list)) => Value::Array(list.values.into_iter().map(to_json).collect()),
        Some(Kind::StructValue(object)) => Value::Object(
            object
                .fields
                .into_iter()
                .map(|(key, value)| (key, to_json(value)))
                .collect(),
        ),
    }
}

fn from_json(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(from_json).collect(),
        }),
        Value::Object(object) => Kind::StructValue(prost_types::Struct {
            fields: object
                .iter()
                .map(|(key, value)| (key.clone(), from_json(value)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_protobuf_values() {
        let value = json!({"n": 3, "f": 1.5, "s": "x", "a": [true, null], "o": {}});
        assert_eq!(to_json(from_json(&value)), value);
    }
}
