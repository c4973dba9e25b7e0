//! What a request must pass before a room sees it, for HTTP and gRPC alike:
//! a bearer token with the route's scope (when tokens are configured), a
//! free slot among the room's concurrent requests, a size limit on what it
//! sends, and a deadline. Each refusal has its status on both protocols:
//!
//! | refusal            | HTTP | gRPC                |
//! |--------------------|------|---------------------|
//! | no or bad token    | 401  | `UNAUTHENTICATED`   |
//! | token lacks scope  | 403  | `PERMISSION_DENIED` |
//! | body too large     | 413  | `RESOURCE_EXHAUSTED`|
//! | room too busy      | 429  | `RESOURCE_EXHAUSTED`|
//! | deadline passed    | 504  | `DEADLINE_EXCEEDED` |
//!
//! Health and readiness stay open and outside the limits, so probes keep
//! answering under load; metrics are on their own port and never guarded.

pub mod config;
pub mod grpc_frames;
pub mod jwt;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use tokio::sync::Semaphore;

use super::api;
use super::api::Protocol;
use config::{AuthConfig, LimitsConfig};
use jwt::{AuthError, Verifier};

/// What a route lets a caller do, and so which scope it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health and readiness: no token, no limits.
    Open,
    Read,
    Write,
    Admin,
}

impl Access {
    /// HTTP: the method says it; `/admin/...` is its own class.
    pub fn of_http(method: &Method, path: &str) -> Access {
        if path == "/healthz" || path == "/readyz" {
            Access::Open
        } else if path.starts_with("/admin/") {
            Access::Admin
        } else if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            Access::Read
        } else {
            Access::Write
        }
    }

    /// gRPC: the method's name says it, by the Google API convention
    /// (AIP-131/132: `Get…`, `List…`, `BatchGet…` read); reflection reads,
    /// health is open, everything else writes.
    pub fn of_grpc(path: &str) -> Access {
        let path = path.trim_start_matches('/');
        let (service, method) = path.rsplit_once('/').unwrap_or((path, ""));
        if service == "grpc.health.v1.Health" {
            Access::Open
        } else if service.starts_with("grpc.reflection.")
            || ["Get", "List", "BatchGet"]
                .iter()
                .any(|prefix| method.starts_with(prefix))
        {
            Access::Read
        } else {
            Access::Write
        }
    }
}

/// The process-wide rules: the token verifier and scopes, and the limits.
#[derive(Debug)]
pub struct Policy {
    verifier: Option<Arc<Verifier>>,
    read_scope: Option<String>,
    write_scope: Option<String>,
    admin_scope: Option<String>,
    limits: LimitsConfig,
}

impl Policy {
    /// `verifier` is the one `config::validate` loaded from `[auth]`.
    pub fn new(verifier: Option<Arc<Verifier>>, auth: &AuthConfig, limits: &LimitsConfig) -> Self {
        Policy {
            verifier,
            read_scope: auth.read_scope.clone(),
            write_scope: auth.write_scope.clone(),
            admin_scope: auth
                .admin_scope
                .clone()
                .or_else(|| auth.write_scope.clone()),
            limits: limits.clone(),
        }
    }

    fn scope_for(&self, access: Access) -> Option<&str> {
        match access {
            Access::Open => None,
            Access::Read => self.read_scope.as_deref(),
            Access::Write => self.write_scope.as_deref(),
            Access::Admin => self.admin_scope.as_deref(),
        }
    }

    /// `Ok` when the request may go on; the refusal otherwise.
    fn authorize(&self, access: Access, headers: &HeaderMap) -> Result<(), AuthError> {
        let Some(verifier) = &self.verifier else {
            return Ok(());
        };
        if access == Access::Open {
            return Ok(());
        }
        let token = bearer(headers).ok_or(AuthError::Missing)?;
        let principal = verifier.verify(token)?;
        match self.scope_for(access) {
            Some(scope) if !principal.scopes.contains(scope) => {
                Err(AuthError::MissingScope(scope.to_string()))
            }
            _ => Ok(()),
        }
    }
}

/// `Authorization: Bearer <token>` (the scheme is case-insensitive; gRPC
/// metadata travels as the same header).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Why a request was refused before reaching the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Auth(AuthError),
    TooLarge { limit: usize },
    Busy { limit: usize },
    Timeout { after: std::time::Duration },
}

impl Refusal {
    fn message(&self) -> String {
        match self {
            Refusal::Auth(err) => err.to_string(),
            Refusal::TooLarge { limit } => format!("request larger than {limit} bytes"),
            Refusal::Busy { limit } => {
                format!("the room is serving {limit} requests already; retry shortly")
            }
            Refusal::Timeout { after } => {
                format!("no answer within {}", humantime::format_duration(*after))
            }
        }
    }

    fn http(&self) -> Response<axum::body::Body> {
        let (status, code) = match self {
            Refusal::Auth(err) if err.is_forbidden() => {
                (StatusCode::FORBIDDEN, "permission_denied")
            }
            Refusal::Auth(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Refusal::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Refusal::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
            Refusal::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        };
        let mut response = api::http_error(status, code, None, &self.message());
        let headers = response.headers_mut();
        match self {
            // RFC 6750 §3: tell the client which kind of token problem it is.
            Refusal::Auth(err) => {
                let challenge = if err.is_forbidden() {
                    "Bearer error=\"insufficient_scope\""
                } else if *err == AuthError::Missing {
                    "Bearer"
                } else {
                    "Bearer error=\"invalid_token\""
                };
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            Refusal::Busy { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }

    fn grpc(&self) -> tonic::Status {
        let message = self.message();
        match self {
            Refusal::Auth(err) if err.is_forbidden() => tonic::Status::permission_denied(message),
            Refusal::Auth(_) => tonic::Status::unauthenticated(message),
            Refusal::TooLarge { .. } | Refusal::Busy { .. } => {
                tonic::Status::resource_exhausted(message)
            }
            Refusal::Timeout { .. } => tonic::Status::deadline_exceeded(message),
        }
    }
}

/// The two bodies the guard sits in front of: axum's (HTTP) and tonic's
/// (gRPC). Each knows how to say a refusal and how to bound its request.
pub trait Wire: Sized + Send + 'static {
    const PROTOCOL: Protocol;
    fn refuse(refusal: &Refusal) -> Response<Self>;
    /// Bounds the request body as it streams in; HTTP bodies are bounded
    /// by axum's `DefaultBodyLimit` at the extractor instead.
    fn bound(body: Self, limits: &LimitsConfig) -> Self;
}

impl Wire for axum::body::Body {
    const PROTOCOL: Protocol = Protocol::Http;

    fn refuse(refusal: &Refusal) -> Response<Self> {
        refusal.http()
    }

    fn bound(body: Self, _limits: &LimitsConfig) -> Self {
        body
    }
}

impl Wire for tonic::body::Body {
    const PROTOCOL: Protocol = Protocol::Grpc;

    fn refuse(refusal: &Refusal) -> Response<Self> {
        refusal.grpc().into_http()
    }

    fn bound(body: Self, limits: &LimitsConfig) -> Self {
        tonic::body::Body::new(grpc_frames::FrameLimited::new(
            body,
            limits.max_grpc_message_bytes,
        ))
    }
}

/// One room's guard: the shared policy and the room's request slots
/// (shared by its HTTP and gRPC servers).
#[derive(Clone, Debug)]
pub struct GuardLayer {
    policy: Arc<Policy>,
    slots: Arc<Semaphore>,
}

impl GuardLayer {
    pub fn new(policy: Arc<Policy>) -> Self {
        let slots = Arc::new(Semaphore::new(policy.limits.max_concurrent_requests));
        GuardLayer { policy, slots }
    }
}

impl GuardLayer {
    pub fn limits(&self) -> &LimitsConfig {
        &self.policy.limits
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<Request<B>> for Guard<S>
where
    B: Wire,
    S: tower::Service<Request<B>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<B>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service that was polled ready serves this call; a clone takes
        // its place for the next one (tower's readiness contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let policy = self.layer.policy.clone();
        let limits = &policy.limits;
        let path = request.uri().path();
        let access = match B::PROTOCOL {
            Protocol::Http => Access::of_http(request.method(), path),
            Protocol::Grpc => Access::of_grpc(path),
        };

        if let Err(err) = policy.authorize(access, request.headers()) {
            // The reason is logged, never the token.
            tracing::info!(reason = %err, path, "request refused");
            let refusal = Refusal::Auth(err);
            return Box::pin(async move { Ok(B::refuse(&refusal)) });
        }
        if access == Access::Open {
            return Box::pin(inner.call(request));
        }
        let max_body = match B::PROTOCOL {
            Protocol::Http => limits.max_http_body_bytes,
            Protocol::Grpc => limits.max_grpc_message_bytes,
        };
        // A declared length is refused before a byte is read.
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if B::PROTOCOL == Protocol::Http && declared.is_some_and(|len| len > max_body as u64) {
            let refusal = Refusal::TooLarge { limit: max_body };
            return Box::pin(async move { Ok(B::refuse(&refusal)) });
        }
        let Ok(slot) = self.layer.slots.clone().try_acquire_owned() else {
            let refusal = Refusal::Busy {
                limit: limits.max_concurrent_requests,
            };
            tracing::debug!(path, "request refused: room busy");
            return Box::pin(async move { Ok(B::refuse(&refusal)) });
        };
        let timeout = limits.request_timeout;
        let request = request.map(|body| B::bound(body, limits));
        Box::pin(async move {
            // The slot is held until the response starts; a streamed body
            // finishes outside it.
            let _slot = slot;
            match tokio::time::timeout(timeout, inner.call(request)).await {
                Ok(response) => response,
                Err(_) => Ok(B::refuse(&Refusal::Timeout { after: timeout })),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_routes_are_classed_by_method_and_path() {
        assert_eq!(Access::of_http(&Method::GET, "/readyz"), Access::Open);
        assert_eq!(Access::of_http(&Method::GET, "/info"), Access::Read);
        assert_eq!(Access::of_http(&Method::POST, "/v1/winnow"), Access::Write);
        assert_eq!(
            Access::of_http(&Method::GET, "/admin/log-filter"),
            Access::Admin
        );
    }

    #[test]
    fn grpc_methods_are_classed_by_name() {
        assert_eq!(
            Access::of_grpc("/grpc.health.v1.Health/Check"),
            Access::Open
        );
        assert_eq!(
            Access::of_grpc("/choco.factory.conch.v1.FudgeRoom/GetProperties"),
            Access::Read
        );
        assert_eq!(
            Access::of_grpc("/choco.factory.wrapper.v1.WrappingRoom/ListTags"),
            Access::Read
        );
        assert_eq!(
            Access::of_grpc("/choco.factory.conch.v1.FudgeRoom/SyncProperty"),
            Access::Write
        );
        assert_eq!(
            Access::of_grpc("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Read
        );
    }

    #[test]
    fn only_a_bearer_scheme_with_a_token_counts() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(value).expect("ascii"),
            );
            bearer(&headers).map(str::to_string)
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
    }
}
