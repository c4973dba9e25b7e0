//! The wrapper's synchronous APIs: gRPC `choco.factory.wrapper.v1.Wrapper`
//! and its HTTP mirror. `Resolve` runs the event path's code without
//! publishing; the register calls write the same index the events do.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Request, Status};

use super::{
    FieldErrorOr, IndexedDocument, Resolution, ResolveRequest, TagRecord, Wrapper, check_tag,
};
use crate::cocoa_butter::kit::{ApiError, GrpcService, JsonBody};

pub mod pb {
    tonic::include_proto!("choco.factory.wrapper.v1");
}

pub fn http_routes(wrapper: Arc<Wrapper>) -> Router {
    Router::new()
        .route("/v1/resolve", post(resolve_http))
        .route("/v1/index/{repo}/{*path}", put(index_http))
        .route("/v1/tags", get(list_tags_http).post(register_tag_http))
        .with_state(wrapper)
}

impl From<FieldErrorOr> for ApiError {
    fn from(err: FieldErrorOr) -> Self {
        match err {
            FieldErrorOr::Field(err) => err.into(),
            FieldErrorOr::Handle(err) => err.into(),
        }
    }
}

async fn resolve_http(
    State(wrapper): State<Arc<Wrapper>>,
    JsonBody(request): JsonBody<ResolveRequest>,
) -> Result<Json<Resolution>, ApiError> {
    Ok(Json(wrapper.resolve(&request).await?))
}

/// The body of `PUT /v1/index/{repo}/{path}`: repo and path come from the URL.
#[derive(Debug, Deserialize)]
struct IndexBody {
    #[serde(default)]
    anchors: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
}

async fn index_http(
    State(wrapper): State<Arc<Wrapper>>,
    Path((repo, path)): Path<(String, String)>,
    JsonBody(body): JsonBody<IndexBody>,
) -> Result<Json<IndexedDocument>, ApiError> {
    let document = IndexedDocument {
        repo,
        path,
        anchors: body.anchors,
        tags: body.tags,
    };
    Ok(Json(wrapper.register_document(document).await?))
}

async fn list_tags_http(State(wrapper): State<Arc<Wrapper>>) -> Result<Json<Value>, ApiError> {
    let tags = wrapper.list_tags().await?;
    Ok(Json(json!({ "tags": tags })))
}

async fn register_tag_http(
    State(wrapper): State<Arc<Wrapper>>,
    JsonBody(tag): JsonBody<TagRecord>,
) -> Result<Json<TagRecord>, ApiError> {
    check_tag(&tag).map_err(ApiError::from)?;
    Ok(Json(wrapper.register_tag(tag).await?))
}

pub fn grpc_service(wrapper: Arc<Wrapper>) -> GrpcService {
    GrpcService {
        name: "choco.factory.wrapper.v1.Wrapper",
        routes: tonic::service::Routes::new(pb::wrapper_server::WrapperServer::new(WrapperGrpc {
            wrapper,
        })),
    }
}

struct WrapperGrpc {
    wrapper: Arc<Wrapper>,
}

fn resolution_to_pb(resolution: Resolution) -> pb::Resolution {
    pb::Resolution {
        document_id: resolution.document_id,
        unresolved: resolution.unresolved as u32,
        broken: resolution.broken as u32,
        tags: resolution
            .tags
            .into_iter()
            .map(|t| pb::TagResolution {
                tag: t.tag,
                canonical: t.canonical.unwrap_or_default(),
                status: t.status.to_string(),
                suggestion: t.suggestion.unwrap_or_default(),
            })
            .collect(),
        links: resolution
            .links
            .into_iter()
            .map(|l| pb::LinkVerification {
                link: l.link,
                repo: l.repo,
                path: l.path,
                anchor: l.anchor.unwrap_or_default(),
                status: l.status.to_string(),
                suggestion: l.suggestion.unwrap_or_default(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::wrapper_server::Wrapper for WrapperGrpc {
    async fn resolve(
        &self,
        request: Request<pb::Document>,
    ) -> Result<tonic::Response<pb::Resolution>, Status> {
        let document = request.into_inner();
        let request = ResolveRequest {
            document_id: document.document_id,
            repo: document.repo,
            path: document.path,
            content: document.content,
        };
        let resolution = self
            .wrapper
            .resolve(&request)
            .await
            .map_err(ApiError::from)?;
        Ok(tonic::Response::new(resolution_to_pb(resolution)))
    }

    async fn register_document(
        &self,
        request: Request<pb::IndexedDocument>,
    ) -> Result<tonic::Response<pb::IndexedDocument>, Status> {
        let document = request.into_inner();
        let stored = self
            .wrapper
            .register_document(IndexedDocument {
                repo: document.repo,
                path: document.path,
                anchors: document.anchors,
                tags: document.tags,
            })
            .await
            .map_err(ApiError::from)?;
        Ok(tonic::Response::new(pb::IndexedDocument {
            repo: stored.repo,
            path: stored.path,
            anchors: stored.anchors,
            tags: stored.tags,
        }))
    }

    async fn register_tag(
        &self,
        request: Request<pb::Tag>,
    ) -> Result<tonic::Response<pb::Tag>, Status> {
        let tag = request.into_inner();
        let record = TagRecord {
            tag: tag.tag,
            aliases: tag.aliases,
        };
        check_tag(&record).map_err(ApiError::from)?;
        let stored = self.wrapper.register_tag(record).await?;
        Ok(tonic::Response::new(pb::Tag {
            tag: stored.tag,
            aliases: stored.aliases,
        }))
    }

    async fn list_tags(
        &self,
        _request: Request<pb::ListTagsRequest>,
    ) -> Result<tonic::Response<pb::ListTagsResponse>, Status> {
        let tags = self.wrapper.list_tags().await?;
        Ok(tonic::Response::new(pb::ListTagsResponse {
            tags: tags
                .into_iter()
                .map(|t| pb::Tag {
                    tag: t.tag,
                    aliases: t.aliases,
                })
                .collect(),
        }))
    }
}
