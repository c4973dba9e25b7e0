//! The winnower's synchronous APIs: gRPC `choco.factory.winnower.v1.Winnower`
//! and its HTTP mirror. They run the same code as the events but record and
//! publish nothing: they are for editors and tools asking "would this pass?".

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tonic::{Request, Status};

use super::gate::{Rejection, SmartblockAccepted, SmartblockCreated};
use super::{SlopReport, SlopRequest, Winnower};
use crate::cocoa_butter::kit::api::{self, struct_from_pb};
use crate::cocoa_butter::kit::{ApiError, GrpcService, HandleError, JsonBody};

pub mod pb {
    tonic::include_proto!("choco.factory.winnower.v1");
}

pub fn http_routes(winnower: Arc<Winnower>) -> Router {
    Router::new()
        .route("/v1/winnow", post(winnow_http))
        .route("/v1/smartblocks/validate", post(validate_http))
        .route("/v1/manifest", get(manifest_http))
        .with_state(winnower)
}

async fn winnow_http(
    State(winnower): State<Arc<Winnower>>,
    JsonBody(request): JsonBody<SlopRequest>,
) -> Result<Json<SlopReport>, ApiError> {
    let report = winnower.winnow(request).await.map_err(ApiError::from)?;
    Ok(Json(report))
}

/// The outcome of the gate without recording anything.
struct Validation {
    accepted: Option<SmartblockAccepted>,
    rejection: Option<Rejection>,
    duplicate: bool,
}

async fn validate(
    winnower: &Winnower,
    block: &SmartblockCreated,
) -> Result<Validation, HandleError> {
    match winnower.gate().check(block) {
        Err(rejection) => Ok(Validation {
            accepted: None,
            rejection: Some(rejection),
            duplicate: false,
        }),
        Ok(accepted) => Ok(Validation {
            duplicate: winnower.recently_accepted(&block.block_id).await?,
            accepted: Some(accepted),
            rejection: None,
        }),
    }
}

fn targets(accepted: &Option<SmartblockAccepted>) -> Vec<String> {
    accepted
        .as_ref()
        .map(|a| a.federation_targets.clone())
        .unwrap_or_default()
}

async fn validate_http(
    State(winnower): State<Arc<Winnower>>,
    JsonBody(block): JsonBody<SmartblockCreated>,
) -> Result<Json<Value>, ApiError> {
    let validation = validate(&winnower, &block).await?;
    if let Some(rejection) = &validation.rejection
        && rejection.reason == "payload_invalid"
    {
        return Err(ApiError::field(rejection.field, rejection.message.clone()));
    }
    let body = match (&validation.rejection, validation.duplicate) {
        (Some(rejection), _) => json!({
            "accepted": false,
            "failed_step": rejection.step,
            "reason": rejection.reason.as_str(),
            "field": rejection.field,
            "message": rejection.message,
        }),
        (None, true) => json!({
            "accepted": false,
            "failed_step": "5 (idempotency)",
            "reason": "duplicate",
            "message": format!("block {:?} was accepted within the idempotency window", block.block_id),
            "federation_targets": targets(&validation.accepted),
        }),
        (None, false) => json!({
            "accepted": true,
            "federation_targets": targets(&validation.accepted),
            "smartblock_accepted": validation.accepted,
        }),
    };
    Ok(Json(body))
}

async fn manifest_http(State(winnower): State<Arc<Winnower>>) -> Json<Value> {
    let gate = winnower.gate();
    Json(json!({
        "catalog_schema_version": gate.catalog_schema_version(),
        "commands": gate.manifest().commands,
    }))
}

pub fn grpc_service(winnower: Arc<Winnower>) -> GrpcService {
    GrpcService {
        name: "choco.factory.winnower.v1.Winnower",
        routes: tonic::service::Routes::new(pb::winnower_server::WinnowerServer::new(
            WinnowerGrpc { winnower },
        )),
    }
}

struct WinnowerGrpc {
    winnower: Arc<Winnower>,
}

fn report_to_pb(report: SlopReport) -> pb::SlopReport {
    pb::SlopReport {
        document_id: report.document_id,
        score: report.score,
        threshold: report.threshold,
        slop: report.slop,
        findings: report
            .findings
            .into_iter()
            .map(|f| pb::Finding {
                rule: f.rule,
                message: f.message,
                start: f.start as u64,
                end: f.end as u64,
                excerpt: f.excerpt,
                weight: f.weight,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::winnower_server::Winnower for WinnowerGrpc {
    async fn winnow(
        &self,
        request: Request<pb::Document>,
    ) -> Result<tonic::Response<pb::SlopReport>, Status> {
        let document = request.into_inner();
        let request = SlopRequest {
            document_id: document.document_id,
            title: document.title,
            content: document.content,
            content_type: document.content_type,
        };
        let report = self
            .winnower
            .winnow(request)
            .await
            .map_err(ApiError::from)?;
        Ok(tonic::Response::new(report_to_pb(report)))
    }

    async fn validate_smartblock(
        &self,
        request: Request<pb::SmartblockCreated>,
    ) -> Result<tonic::Response<pb::Validation>, Status> {
        let message = request.into_inner();
        let block = SmartblockCreated {
            kind: message.r#type,
            block_id: message.block_id,
            command_slug: message.command_slug,
            schema_version: message.schema_version,
            federation_targets: message.federation_targets,
            semantic_layers: message.semantic_layers.map_or(Value::Null, struct_from_pb),
            document_id: message.document_id,
            author_id: message.author_id,
            block_type: message.block_type,
        };
        let validation = validate(&self.winnower, &block).await?;
        let reply = match (validation.rejection, validation.duplicate) {
            (Some(rejection), _) if rejection.reason == "payload_invalid" => {
                return Err(
                    ApiError::field(api::snake_case(rejection.field), rejection.message).into(),
                );
            }
            (Some(rejection), _) => pb::Validation {
                accepted: false,
                failed_step: rejection.step.to_string(),
                reason: rejection.reason.to_string(),
                message: rejection.message,
                federation_targets: Vec::new(),
            },
            (None, true) => pb::Validation {
                accepted: false,
                failed_step: "5 (idempotency)".into(),
                reason: "duplicate".into(),
                message: format!(
                    "block {:?} was accepted within the idempotency window",
                    block.block_id
                ),
                federation_targets: targets(&validation.accepted),
            },
            (None, false) => pb::Validation {
                accepted: true,
                federation_targets: targets(&validation.accepted),
                ..Default::default()
            },
        };
        Ok(tonic::Response::new(reply))
    }
}
