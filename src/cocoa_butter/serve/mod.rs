//! The three servers every room gets: HTTP (health, readiness, info and the
//! room's own routes), gRPC (the room's service, `grpc.health.v1.Health`
//! and server reflection) and metrics.
//!
//! Listeners are bound before anything starts, so a port that is taken
//! stops start-up with a message naming the room and the port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::cocoa_butter::api;
use crate::cocoa_butter::config::RoomSettings;
use crate::cocoa_butter::guard::GuardLayer;
use crate::cocoa_butter::metrics::{self, RoomMetrics};
use crate::cocoa_butter::room::GrpcService;
use crate::cocoa_butter::status::{BoundAddrs, RoomInfo, RoomState};
use crate::cocoa_butter::telemetry;
use hygiene::{ConnectionSettings, GuardedListener};

pub mod admin;
pub mod hygiene;
pub mod requests;

/// Descriptors of every contract under `proto/`, for server reflection.
pub const CHOCO_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/choco_descriptor.bin"));

/// The methods of a room's gRPC service as its descriptor declares them,
/// as the `method` label of the gRPC request families writes them
/// (`/choco.factory.conch.v1.Conch/SyncProperties`).
pub fn grpc_methods(service: &str) -> Vec<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(CHOCO_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    set.file
        .iter()
        .flat_map(|file| {
            let package = file.package().to_string();
            file.service
                .iter()
                .map(move |declared| (package.clone(), declared))
        })
        .filter(|(package, declared)| format!("{package}.{}", declared.name()) == service)
        .flat_map(|(_, declared)| {
            declared
                .method
                .iter()
                .map(|method| format!("/{service}/{}", method.name()))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{key}: cannot listen on {addr}: {reason}")]
    Bind {
        key: String,
        addr: SocketAddr,
        reason: String,
    },
    /// A socket the service manager passed that cannot serve (not a TCP
    /// listening socket, say).
    #[error("socket {name} from the service manager (LISTEN_FDS): {reason}")]
    Inherited { name: String, reason: String },
    #[error("gRPC server: {0}")]
    Grpc(String),
    #[error("HTTP server: {0}")]
    Http(String),
}

/// A room's three listening sockets, bound and not yet serving.
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    pub metrics: TcpListener,
}

/// Listening sockets the service manager passed to the process, by name:
/// systemd socket activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`,
/// a socket unit's `FileDescriptorName=`). A room takes `<room>-http`,
/// `<room>-grpc` and `<room>-metrics` instead of binding its configured
/// addresses, so the sockets outlive restarts of the process and a client
/// never finds the port closed. The test harness hands the process sockets
/// it bound the same way, so it knows every port before the process starts.
#[derive(Default)]
pub struct InheritedSockets {
    by_name: std::collections::BTreeMap<String, std::os::fd::OwnedFd>,
}

impl InheritedSockets {
    /// Takes the sockets passed to this process (none when `LISTEN_PID` is
    /// not this process). Called once, at start: from then on each socket
    /// is owned here until a room takes it.
    pub fn from_env() -> Result<Self, ServerError> {
        let passed = sd_notify::listen_fds_with_names().map_err(|err| ServerError::Inherited {
            name: "LISTEN_FDS".into(),
            reason: err.to_string(),
        })?;
        let mut by_name = std::collections::BTreeMap::new();
        for (fd, name) in passed {
            // SAFETY: these descriptors were passed to this process for it
            // to own (`LISTEN_PID` is ours, checked by sd-notify, which also
            // marks them close-on-exec); nothing else in the process knows
            // them, and each is wrapped exactly once, here.
            let owned =
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            by_name.insert(name, owned);
        }
        Ok(InheritedSockets { by_name })
    }

    /// The socket named `name`, now the caller's.
    fn take(&mut self, name: &str) -> Option<std::os::fd::OwnedFd> {
        self.by_name.remove(name)
    }

    /// The names of sockets no room took (a socket unit for a room that is
    /// not enabled here); they are closed when this is dropped.
    pub fn unclaimed(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }
}

impl Listeners {
    /// The room's three sockets: passed by the service manager when it
    /// passed them (see [`InheritedSockets`]), else bound to the room's
    /// configured addresses.
    pub async fn bind(
        room: &RoomSettings,
        inherited: &mut InheritedSockets,
    ) -> Result<Self, ServerError> {
        let mut listener = async |kind: &str, field: &'static str, addr: SocketAddr| {
            let name = format!("{}-{kind}", room.name);
            if let Some(fd) = inherited.take(&name) {
                let refused = |err: std::io::Error| ServerError::Inherited {
                    name: name.clone(),
                    reason: err.to_string(),
                };
                let socket = std::net::TcpListener::from(fd);
                // Not a listening TCP socket: no local address to serve on.
                socket.local_addr().map_err(refused)?;
                socket.set_nonblocking(true).map_err(refused)?;
                return TcpListener::from_std(socket).map_err(refused);
            }
            TcpListener::bind(addr)
                .await
                .map_err(|err| ServerError::Bind {
                    key: format!("rooms.{}.{field}", room.name),
                    addr,
                    reason: err.to_string(),
                })
        };
        Ok(Listeners {
            http: listener("http", "http_port", room.http_addr).await?,
            grpc: listener("grpc", "grpc_port", room.grpc_addr).await?,
            metrics: listener("metrics", "metrics_port", room.metrics_addr).await?,
        })
    }

    pub fn addrs(&self) -> std::io::Result<BoundAddrs> {
        Ok(BoundAddrs {
            http: self.http.local_addr()?,
            grpc: self.grpc.local_addr()?,
            metrics: self.metrics.local_addr()?,
        })
    }
}

#[derive(Clone)]
struct HttpState {
    info: Arc<RoomInfo>,
    state: Arc<RoomState>,
}

/// The room's HTTP routes behind the core's: health, readiness, info and
/// the log filter; every route traced and counted (outermost, so refusals
/// are counted too), then guarded.
pub fn http_router(
    info: Arc<RoomInfo>,
    state: Arc<RoomState>,
    metrics: RoomMetrics,
    guard: GuardLayer,
    room_routes: Router,
) -> Router {
    let observe = requests::ObserveLayer::new(requests::Protocol::Http, &info.label, metrics);
    let max_body = guard.limits().max_http_body_bytes;
    let core = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/info", get(info_route))
        .route("/admin/log-filter", get(get_log_filter).put(put_log_filter))
        .merge(admin::router(&info, &state))
        .with_state(HttpState { info, state });
    // route_layer: the layers see the matched route template. The body
    // limit applies where the room's extractor reads the body (413).
    core.merge(room_routes)
        .layer(DefaultBodyLimit::max(max_body))
        .route_layer(guard)
        .route_layer(observe)
}

/// The process's log filter (`RUST_LOG` syntax), as text.
async fn get_log_filter() -> Response {
    match telemetry::log_filter() {
        Ok(filter) => axum::Json(serde_json::json!({ "filter": filter })).into_response(),
        Err(err) => api::http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            None,
            &err.to_string(),
        ),
    }
}

/// Replaces the log filter of the whole process without a restart; the
/// body is the new filter in `RUST_LOG` syntax (`info,choco_factory=debug`).
async fn put_log_filter(body: String) -> Response {
    let directives = body.trim();
    if directives.is_empty() {
        return api::bad_request(
            "body",
            "expected a log filter such as \"info,choco_factory=debug\"",
        );
    }
    match telemetry::set_log_filter(directives) {
        Ok(()) => axum::Json(serde_json::json!({ "filter": directives })).into_response(),
        Err(telemetry::TelemetryError::Filter(reason)) => api::bad_request("body", &reason),
        Err(err) => api::http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            None,
            &err.to_string(),
        ),
    }
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(http): State<HttpState>) -> Response {
    readiness(&http.state)
}

/// `/readyz` of both the HTTP and the metrics port: 200 when ready, 503
/// with the reason otherwise.
fn archive_readiness(archive: &metrics::ArchiveMetrics) -> Response {
    let (ready, domains) = archive.readiness();
    let domains: serde_json::Map<String, serde_json::Value> = domains
        .into_iter()
        .map(|(domain, reason)| {
            (
                domain,
                serde_json::json!({"ready": reason.is_none(), "reason": reason}),
            )
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({"ready": ready, "domains": domains})),
    )
        .into_response()
}

fn readiness(state: &RoomState) -> Response {
    let nats = state.nats_connected();
    let consumer = state.consumer_bound();
    let servers = state.servers_up();
    let reason = state.not_ready_reason();
    let ready = reason.is_none();
    let body = serde_json::json!({
        "ready": ready,
        "nats_connected": nats,
        "consumer_bound": consumer,
        "servers_up": servers,
        "paused": state.paused(),
        "reason": reason,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn info_route(State(http): State<HttpState>) -> Response {
    let mut body = serde_json::to_value(&*http.info).unwrap_or_default();
    body["ready"] = serde_json::Value::Bool(http.state.ready());
    admin::add_run_state(&mut body, &http.info.room, &http.state).await;
    axum::Json(body).into_response()
}

/// Serves `router` on `listener`, over TLS when `tls` is given (then a
/// plain-text client fails its handshake and gets no answer), admitting
/// connections within `conn`'s limits: hyper's HTTP/1 header-read timeout,
/// HTTP/2 keep-alive pings, concurrent and pending-reset stream bounds.
/// On `shutdown` it stops accepting, lets requests in flight finish and
/// closes idle connections.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    conn: ConnectionSettings,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let mut listener = GuardedListener::new(listener, conn.limits.clone());
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(conn.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(conn.http2_keepalive_interval)
        .keep_alive_timeout(conn.http2_keepalive_timeout)
        .max_concurrent_streams(conn.max_concurrent_streams)
        .max_pending_accept_reset_streams(hygiene::MAX_PENDING_RESETS);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = conn.tls.clone();
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
                Some(tls) => match tls.handshake(io).await {
                    Ok(stream) => {
                        let connection = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned();
                        watcher.watch(connection).await
                    }
                    // A plain-text client or a rejected certificate: the
                    // client sees the failure; it is not the server's.
                    Err(err) => {
                        tracing::debug!(%peer, error = %err, "TLS handshake failed");
                        return;
                    }
                },
            };
            if let Err(err) = served {
                tracing::debug!(%peer, error = %err, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The operations port: `/metrics`, and `/healthz` and `/readyz` again, so
/// probes that sit next to the process (`choco-factory health`, the
/// container's health check, Kubernetes' probes) need neither the API's TLS
/// nor its tokens.
///
/// On the process's home port (`archive` given) also `/archive/readyz`:
/// 200 while every archiver runs and writes, 503 naming each that does not
/// (starting, stopped, its storage failing).
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: RoomMetrics,
    state: Arc<RoomState>,
    archive: Option<metrics::ArchiveMetrics>,
    conn: ConnectionSettings,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let mut router = Router::new()
        .route("/metrics", get(metrics_route))
        .with_state((metrics, state.clone()))
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move || {
                let state = state.clone();
                async move { readiness(&state) }
            }),
        );
    if let Some(archive) = archive {
        router = router.route(
            "/archive/readyz",
            get(move || {
                let archive = archive.clone();
                async move { archive_readiness(&archive) }
            }),
        );
    }
    // Plain: scrapers sit next to the process, and a Prometheus that
    // scrapes over TLS would need its own certificate set-up per target.
    let conn = ConnectionSettings { tls: None, ..conn };
    serve_http(listener, router, conn, shutdown).await
}

/// OpenMetrics (with exemplars) when the scraper asks for it, as Prometheus
/// does by default; the classic text format otherwise.
async fn metrics_route(
    State((metrics, state)): State<(RoomMetrics, Arc<RoomState>)>,
    headers: HeaderMap,
) -> Response {
    // Computed at the scrape from the one source of readiness, so the
    // gauge the paging alert reads can never disagree with `/readyz`.
    metrics.ready.set(i64::from(state.ready()));
    metrics.paused.set(i64::from(state.paused()));
    let wants_openmetrics = metrics::prefers_openmetrics(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok()),
    );
    let openmetrics = metrics.encode();
    let (body, content_type) = if wants_openmetrics {
        (
            openmetrics,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            metrics::prometheus_text(&openmetrics),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Serves the room's gRPC service with health and reflection. Health
/// follows readiness: SERVING for the room's service and for "" while the
/// room is ready, NOT_SERVING otherwise.
pub async fn serve_grpc(
    listener: TcpListener,
    service: GrpcService,
    state: Arc<RoomState>,
    observe: requests::ObserveLayer,
    guard: GuardLayer,
    conn: ConnectionSettings,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    // Health answers from the room's state at each call, the one source
    // of readiness, so an HTTP probe and a gRPC probe never disagree (a
    // reporter updated by polling lagged `/readyz` by up to 250 ms).
    let service_name = service.name;
    let health = tonic_health::pb::health_server::HealthServer::new(ReadinessHealth {
        state: state.clone(),
        service: service_name,
    });

    let reflection = |builder: tonic_reflection::server::Builder<'static>| {
        builder
            .register_encoded_file_descriptor_set(CHOCO_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(service_name)
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|err| ServerError::Grpc(err.to_string()))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|err| ServerError::Grpc(err.to_string()))?;

    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(conn.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(conn.http2_keepalive_timeout))
        .max_concurrent_streams(conn.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(hygiene::MAX_PENDING_RESETS));
    if let Some(tls) = &conn.tls {
        builder = builder
            .tls_config(tls.grpc_config())
            .map_err(|err| ServerError::Grpc(err.to_string()))?;
    }
    builder
        .layer(tower::ServiceBuilder::new().layer(observe).layer(guard))
        .add_routes(service.routes)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            // Admitted connections within the listener's limits, with
            // TCP_NODELAY (without it an answer larger than one segment
            // waits ~40 ms for the client's delayed ACK: benches/endpoints.rs
            // measured GetArtifact at 0.16 of a bare tonic).
            futures::stream::unfold(
                GuardedListener::new(listener, conn.limits.clone()),
                |mut listener| async move {
                    let (io, _peer) = listener.accept().await;
                    Some((Ok::<_, std::io::Error>(io), listener))
                },
            ),
            shutdown.cancelled_owned(),
        )
        .await
        .map_err(|err| ServerError::Grpc(err.to_string()))
}

/// `grpc.health.v1.Health` for the room's service and for "" (the server):
/// SERVING while the room is ready, NOT_SERVING otherwise; any other
/// service is NOT_FOUND on Check and SERVICE_UNKNOWN on Watch.
struct ReadinessHealth {
    state: Arc<RoomState>,
    service: &'static str,
}

impl ReadinessHealth {
    fn status(&self, service: &str) -> ServingStatus {
        if !service.is_empty() && service != self.service {
            ServingStatus::ServiceUnknown
        } else if self.state.ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    }
}

type HealthStream = std::pin::Pin<
    Box<
        dyn futures::Stream<Item = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>
            + Send,
    >,
>;

/// How often a Watch looks at the room's state for a change to send.
const HEALTH_WATCH_TICK: Duration = Duration::from_millis(100);

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for ReadinessHealth {
    async fn check(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        let service = request.into_inner().service;
        match self.status(&service) {
            ServingStatus::ServiceUnknown => Err(tonic::Status::not_found(format!(
                "unknown service {service:?}"
            ))),
            status => Ok(tonic::Response::new(
                tonic_health::pb::HealthCheckResponse {
                    status: status as i32,
                },
            )),
        }
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let service = request.into_inner().service;
        let watcher = ReadinessHealth {
            state: self.state.clone(),
            service: self.service,
        };
        // The current status at once, then each change.
        let stream = futures::stream::unfold(
            (watcher, service, None::<ServingStatus>),
            |(watcher, service, last)| async move {
                loop {
                    let status = watcher.status(&service);
                    if last != Some(status) {
                        let answer = tonic_health::pb::HealthCheckResponse {
                            status: status as i32,
                        };
                        return Some((Ok(answer), (watcher, service, Some(status))));
                    }
                    tokio::time::sleep(HEALTH_WATCH_TICK).await;
                }
            },
        );
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// Why a readiness probe (`choco-factory health`) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}: no answer within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("{0}: {1}")]
    Unreachable(SocketAddr, String),
    #[error("{0}: not {1} (HTTP {2})")]
    Refused(SocketAddr, Probe, u16),
}

/// What a probe asks: whether the process lives, or whether the room serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: the process answers, whatever NATS does. What a
    /// liveness check (a container HEALTHCHECK, Kubernetes' livenessProbe)
    /// should ask: a room waiting for NATS is correct and must not be
    /// restarted for it.
    Live,
    /// `/readyz`: the room is ready to take work. For readiness checks.
    Ready,
}

impl Probe {
    fn path(self) -> &'static str {
        match self {
            Probe::Live => "/healthz",
            Probe::Ready => "/readyz",
        }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Probe::Live => "live",
            Probe::Ready => "ready",
        })
    }
}

/// Asks a room's `/healthz` or `/readyz` on its metrics port (plain HTTP
/// and open even when the API has TLS and tokens), the way a container
/// runtime's health check would. A room bound to every interface is asked
/// on loopback.
pub async fn probe(addr: SocketAddr, probe: Probe, timeout: Duration) -> Result<(), ProbeError> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri = format!("http://{target}{}", probe.path())
        .parse::<axum::http::Uri>()
        .map_err(|err| ProbeError::Unreachable(target, err.to_string()))?;
    let response = tokio::time::timeout(timeout, client.get(uri))
        .await
        .map_err(|_| ProbeError::Timeout(target, timeout))?
        .map_err(|err| ProbeError::Unreachable(target, err.to_string()))?;
    if response.status() == StatusCode::OK {
        Ok(())
    } else {
        Err(ProbeError::Refused(
            target,
            probe,
            response.status().as_u16(),
        ))
    }
}
