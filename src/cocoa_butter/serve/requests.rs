//! One tower layer for every request a room serves, HTTP or gRPC: a server
//! span that continues the caller's trace (`traceparent` header or gRPC
//! metadata, which travel as the same HTTP/2 headers), the incoming trace
//! headers in scope for anything the handler publishes, and the request
//! counter and latency histogram.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::MatchedPath;
use axum::http::{Request, Response};
use tracing::Instrument;

pub use crate::cocoa_butter::api::Protocol;
use crate::cocoa_butter::metrics::{GrpcLabels, HttpLabels, RoomMetrics};
use crate::cocoa_butter::telemetry::propagation::{self, TraceHeaders};

#[derive(Clone)]
pub struct ObserveLayer {
    protocol: Protocol,
    room: Arc<str>,
    metrics: RoomMetrics,
}

impl ObserveLayer {
    pub fn new(protocol: Protocol, room: &str, metrics: RoomMetrics) -> Self {
        ObserveLayer {
            protocol,
            room: room.into(),
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<Request<B>> for Observe<S>
where
    S: tower::Service<Request<B>, Response = Response<R>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let started = Instant::now();
        let incoming = TraceHeaders::from_http(request.headers());
        let method = request.method().as_str().to_string();
        let layer = self.layer.clone();
        let (span, route) = match layer.protocol {
            Protocol::Http => {
                // Route templates, not raw paths: bounded label values.
                let route = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
                let span = tracing::info_span!(
                    "http.request",
                    otel.name = %format!("{method} {route}"),
                    otel.kind = "server",
                    otel.status_code = tracing::field::Empty,
                    http.request.method = %method,
                    http.route = %route,
                    http.response.status_code = tracing::field::Empty,
                    factory.room = %layer.room,
                );
                (span, route)
            }
            Protocol::Grpc => {
                let path = request.uri().path().to_string();
                let (service, rpc) = path
                    .trim_start_matches('/')
                    .split_once('/')
                    .unwrap_or(("", ""));
                let span = tracing::info_span!(
                    "grpc.request",
                    otel.name = %path.trim_start_matches('/'),
                    otel.kind = "server",
                    otel.status_code = tracing::field::Empty,
                    rpc.system = "grpc",
                    rpc.service = %service,
                    rpc.method = %rpc,
                    rpc.grpc.status_code = tracing::field::Empty,
                    factory.room = %layer.room,
                );
                (span, path)
            }
        };
        // Probes are counted but not traced: a kubelet's or load
        // balancer's, every few seconds, would bury the requests worth a
        // trace (884 probe spans in one short run before this).
        let span = if is_probe(layer.protocol, &route) {
            tracing::Span::none()
        } else {
            propagation::continue_trace(&span, &incoming);
            span
        };
        let response = self.inner.call(request);
        let record_span = span.clone();
        Box::pin(
            async move {
                let response = propagation::with_incoming(incoming, response).await?;
                let seconds = started.elapsed().as_secs_f64();
                match layer.protocol {
                    Protocol::Http => {
                        let status = response.status().as_u16();
                        // As i64: tracing-opentelemetry exports a u16 as text.
                        record_span.record("http.response.status_code", i64::from(status));
                        if status >= 500 {
                            record_span.record("otel.status_code", "ERROR");
                        }
                        layer.metrics.http_request(
                            HttpLabels {
                                route,
                                method,
                                status,
                            },
                            seconds,
                        );
                    }
                    Protocol::Grpc => {
                        // Unary calls that fail answer "trailers-only": the
                        // status is in the headers. A response without it
                        // is a success whose status follows in trailers.
                        let code = response
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<i32>().ok())
                            .map_or(tonic::Code::Ok, tonic::Code::from);
                        record_span.record("rpc.grpc.status_code", code as i32);
                        if is_server_fault(code) {
                            record_span.record("otel.status_code", "ERROR");
                        }
                        // Unknown paths would make a label per probe.
                        let method = if code == tonic::Code::Unimplemented {
                            "unknown".to_string()
                        } else {
                            route
                        };
                        layer.metrics.grpc_request(
                            GrpcLabels {
                                method,
                                code: code_name(code).to_string(),
                            },
                            seconds,
                        );
                    }
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Health and readiness probes: `/healthz`, `/readyz`, and gRPC health.
fn is_probe(protocol: Protocol, route: &str) -> bool {
    match protocol {
        Protocol::Http => route == "/healthz" || route == "/readyz",
        Protocol::Grpc => route.starts_with("/grpc.health.v1.Health/"),
    }
}

/// The codes that mean the server failed, as OpenTelemetry's gRPC
/// conventions count them; the rest are the caller's.
fn is_server_fault(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    )
}

/// `INVALID_ARGUMENT`, as the gRPC specification spells the codes.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
