//! The conch's synchronous APIs: gRPC `choco.factory.conch.v1.Conch` and
//! its HTTP mirror. Both run the same rules as the event path and publish
//! the same events; bad requests are refused naming the field.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tonic::{Request, Status};

use super::Conch;
use super::sync::{self, PropertyState, SyncRequest, SyncRequestV1, TypedValue};
use crate::cocoa_butter::kit::api::{
    FieldError, FieldViolation, correlation_grpc, correlation_http, json_from_pb, json_to_pb,
};
use crate::cocoa_butter::kit::{ApiError, GrpcService, JsonBody};

pub mod pb {
    tonic::include_proto!("choco.factory.conch.v1");
}

pub fn http_routes(conch: Arc<Conch>) -> Router {
    Router::new()
        .route("/v1/properties/sync", post(sync_http))
        .route(
            "/v1/documents/{document_id}/properties",
            get(properties_http),
        )
        .with_state(conch)
}

fn field_violations(errors: Vec<FieldError>) -> Vec<FieldViolation> {
    errors.into_iter().map(FieldViolation::from).collect()
}

async fn sync_http(
    State(conch): State<Arc<Conch>>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<SyncRequestV1>,
) -> Result<Json<Value>, ApiError> {
    // The API keeps the major 1 shape; the rules work on the current one.
    let request = SyncRequest::from(request);
    let violations = request.violations();
    if !violations.is_empty() {
        return Err(field_violations(violations).into());
    }
    let correlation = correlation_http(&headers);
    let property = request.property.clone();
    let result = conch.sync_now(request, correlation).await?;
    Ok(Json(json!({
        "outcome": result.outcome,
        "property": result.property.as_ref().map(|state| sync::property_json(&property, state)),
        "policy": result.receipt.policy.map(|p| p.name()),
        "winner": result.receipt.winner,
        "event_ids": result.event_ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })))
}

async fn properties_http(
    State(conch): State<Arc<Conch>>,
    Path(document_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = conch.properties(&document_id).await?;
    let properties: serde_json::Map<String, Value> = record
        .properties
        .iter()
        .map(|(name, state)| (name.clone(), sync::property_json(name, state)))
        .collect();
    Ok(Json(
        json!({ "document_id": document_id, "properties": properties }),
    ))
}

pub fn grpc_service(conch: Arc<Conch>) -> GrpcService {
    GrpcService {
        name: "choco.factory.conch.v1.Conch",
        routes: tonic::service::Routes::new(pb::conch_server::ConchServer::new(ConchGrpc {
            conch,
        })),
    }
}

struct ConchGrpc {
    conch: Arc<Conch>,
}

#[tonic::async_trait]
impl pb::conch_server::Conch for ConchGrpc {
    async fn sync_property(
        &self,
        request: Request<pb::SyncPropertyRequest>,
    ) -> Result<tonic::Response<pb::SyncPropertyResponse>, Status> {
        let correlation = correlation_grpc(request.metadata());
        let message = request.into_inner();
        let mut violations = Vec::new();
        let updated_at = match message.updated_at.map(|ts| from_timestamp(&ts)) {
            Some(Some(at)) => at,
            missing => {
                let why = if missing.is_none() {
                    "is required"
                } else {
                    "is out of range"
                };
                violations.push(FieldViolation::new("updated_at", why));
                // Only so the other fields are checked too; never used.
                chrono::DateTime::UNIX_EPOCH
            }
        };
        let sync_request = SyncRequest {
            document_id: message.document_id,
            property: message.property,
            value: TypedValue::inferred(message.value.map_or(Value::Null, json_from_pb)),
            base_revision: message.base_revision,
            author_id: message.author_id,
            updated_at,
            request_id: Some(message.request_id).filter(|id| !id.is_empty()),
        };
        violations.extend(field_violations(sync_request.violations()));
        if !violations.is_empty() {
            return Err(ApiError::from(violations).into());
        }
        let property = sync_request.property.clone();
        let result = self.conch.sync_now(sync_request, correlation).await?;
        Ok(tonic::Response::new(pb::SyncPropertyResponse {
            outcome: match result.outcome {
                sync::Outcome::Applied => pb::SyncOutcome::Applied,
                sync::Outcome::ConflictResolved => pb::SyncOutcome::ConflictResolved,
                sync::Outcome::Duplicate => pb::SyncOutcome::Duplicate,
            } as i32,
            property: result
                .property
                .as_ref()
                .map(|state| to_pb(&property, state)),
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
            return Err(ApiError::field("document_id", "must not be empty").into());
        }
        let record = self.conch.properties(&document_id).await?;
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
        value: Some(json_to_pb(&state.value)),
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
