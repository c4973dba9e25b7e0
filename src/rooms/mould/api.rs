//! The mould's synchronous APIs: gRPC `choco.factory.mould.v1.Mould` and
//! its HTTP mirror. `Hydrate` renders and stores like the event path (it
//! does not publish); artifacts are served with their content type and an
//! ETag from their content hash.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tonic::{Request, Status};

use super::render::RenderError;
use super::{HydrateError, Hydrated, HydrationRequest, Mould};
use crate::cocoa_butter::kit::api::{invalid_argument, struct_from_pb};
use crate::cocoa_butter::kit::{ApiError, GrpcService, JsonBody};

pub mod pb {
    tonic::include_proto!("choco.factory.mould.v1");
}

pub fn http_routes(mould: Arc<Mould>) -> Router {
    Router::new()
        .route("/v1/hydrate", post(hydrate_http))
        .route("/v1/artifacts/{document_id}", get(artifact_http))
        .route("/v1/templates", get(templates_http))
        .with_state(mould)
}

/// The field a render error is the fault of.
fn render_field(err: &RenderError) -> &'static str {
    if err.kind == "undefined_variable" {
        "data"
    } else {
        "source"
    }
}

fn artifact_json(hydrated: &Hydrated) -> Value {
    json!({
        "document_id": hydrated.document_id,
        "format": hydrated.format,
        "content_type": hydrated.content_type,
        "content": String::from_utf8_lossy(&hydrated.content),
        "artifact": hydrated.artifact,
    })
}

async fn hydrate_http(
    State(mould): State<Arc<Mould>>,
    JsonBody(request): JsonBody<HydrationRequest>,
) -> Result<Response, ApiError> {
    match mould.hydrate(request).await {
        Ok(hydrated) => Ok(axum::Json(artifact_json(&hydrated)).into_response()),
        Err(HydrateError::Invalid { field, message }) => Err(ApiError::field(field, message)),
        // The room's own shape: the template error's kind and line too.
        Err(HydrateError::Render(err)) => {
            let body = json!({ "error": {
                "code": "invalid_argument",
                "field": render_field(&err),
                "kind": err.kind,
                "message": err.message,
                "line": err.line,
            }});
            Ok((StatusCode::BAD_REQUEST, axum::Json(body)).into_response())
        }
        Err(HydrateError::Unavailable(err)) => Err(err.into()),
    }
}

async fn artifact_http(
    State(mould): State<Arc<Mould>>,
    Path(document_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some((content, metadata)) = mould.artifact(&document_id).await? else {
        return Err(no_artifact(&document_id));
    };
    let etag = format!(
        "\"{}\"",
        metadata.get("content_hash").cloned().unwrap_or_default()
    );
    let content_type = metadata
        .get("content_type")
        .cloned()
        .unwrap_or_else(|| "application/octet-stream".into());
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|wanted| {
            wanted
                .split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        content.into_response()
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    Ok(response)
}

fn no_artifact(document_id: &str) -> ApiError {
    ApiError::NotFound {
        field: "document_id",
        message: format!("no artifact for {document_id:?}"),
    }
}

async fn templates_http(State(mould): State<Arc<Mould>>) -> axum::Json<Value> {
    let templates: Vec<Value> = mould
        .template_slugs()
        .iter()
        .map(|slug| json!({ "smartblock": slug, "call": format!("/{slug} <block id>") }))
        .collect();
    axum::Json(json!({ "templates": templates }))
}

pub fn grpc_service(mould: Arc<Mould>) -> GrpcService {
    GrpcService {
        name: "choco.factory.mould.v1.Mould",
        routes: tonic::service::Routes::new(pb::mould_server::MouldServer::new(MouldGrpc {
            mould,
        })),
    }
}

struct MouldGrpc {
    mould: Arc<Mould>,
}

fn artifact_ref(hydrated: &Hydrated) -> pb::ArtifactRef {
    pb::ArtifactRef {
        bucket: hydrated.artifact.bucket.clone(),
        key: hydrated.artifact.key.clone(),
        size: hydrated.artifact.size,
        content_hash: hydrated.artifact.content_hash.clone(),
    }
}

#[tonic::async_trait]
impl pb::mould_server::Mould for MouldGrpc {
    async fn hydrate(
        &self,
        request: Request<pb::HydrationRequest>,
    ) -> Result<tonic::Response<pb::HydratedDocument>, Status> {
        let message = request.into_inner();
        let request = HydrationRequest {
            document_id: message.document_id,
            source: message.source,
            data: message.data.map_or(Value::Null, struct_from_pb),
            format: message.format,
        };
        match self.mould.hydrate(request).await {
            Ok(hydrated) => Ok(tonic::Response::new(pb::HydratedDocument {
                artifact: Some(artifact_ref(&hydrated)),
                document_id: hydrated.document_id,
                format: hydrated.format.as_str().to_string(),
                content_type: hydrated.content_type.to_string(),
                content: hydrated.content,
            })),
            Err(HydrateError::Invalid { field, message }) => {
                Err(ApiError::field(field, message).into())
            }
            Err(HydrateError::Render(err)) => {
                let mut status = invalid_argument(
                    render_field(&err),
                    &format!("{}: {}", err.kind, err.message),
                );
                if let Ok(kind) = err.kind.parse() {
                    status.metadata_mut().insert("x-choco-error-kind", kind);
                }
                if let Some(line) = err.line.and_then(|line| line.to_string().parse().ok()) {
                    status.metadata_mut().insert("x-choco-error-line", line);
                }
                Err(status)
            }
            Err(HydrateError::Unavailable(err)) => Err(err.into()),
        }
    }

    async fn get_artifact(
        &self,
        request: Request<pb::GetArtifactRequest>,
    ) -> Result<tonic::Response<pb::Artifact>, Status> {
        let document_id = request.into_inner().document_id;
        if document_id.trim().is_empty() {
            return Err(ApiError::field("document_id", "must not be empty").into());
        }
        let Some((content, metadata)) = self.mould.artifact(&document_id).await? else {
            return Err(no_artifact(&document_id).into());
        };
        let hash = metadata.get("content_hash").cloned().unwrap_or_default();
        Ok(tonic::Response::new(pb::Artifact {
            format: metadata.get("format").cloned().unwrap_or_default(),
            content_type: metadata.get("content_type").cloned().unwrap_or_default(),
            artifact: Some(pb::ArtifactRef {
                bucket: self.mould.bucket().to_string(),
                key: document_id.clone(),
                size: content.len() as u64,
                content_hash: hash,
            }),
            document_id,
            content,
        }))
    }
}
