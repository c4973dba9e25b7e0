//! Everything the runtime does on NATS JetStream besides pulling: the
//! connection, streams and consumers (created when missing, checked for
//! drift when present), publishing envelopes and dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::future::try_join_all;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use super::config::{
    ConsumerConfig, NatsAuth, NatsConfig, NatsTls, ReplicaOrdering, RoomSettings, ServerUrls,
};
use super::envelope::{Cause, EventEnvelope};
use super::metrics::{ConnectionMetrics, RoomMetrics, StoreLabels};
use super::room::Outbound;
use super::streams::{BucketStorage, StreamStorage};
use super::telemetry::{self, propagation};

/// Headers the runtime writes on every dead letter.
pub mod dlq_headers {
    pub const REASON: &str = "Choco-Dlq-Reason";
    pub const DETAIL: &str = "Choco-Dlq-Detail";
    pub const ROOM: &str = "Choco-Dlq-Room";
    pub const DELIVERIES: &str = "Choco-Dlq-Deliveries";
    pub const ORIGINAL_SUBJECT: &str = "Choco-Dlq-Original-Subject";
    pub const ORIGINAL_STREAM: &str = "Choco-Dlq-Original-Stream";
    pub const ORIGINAL_SEQUENCE: &str = "Choco-Dlq-Original-Sequence";
}

/// Headers on every envelope the runtime publishes, so tools can route and
/// trace without decoding the body.
pub mod event_headers {
    pub const EVENT_TYPE: &str = "Choco-Event-Type";
    pub const CORRELATION_ID: &str = "Choco-Correlation-Id";
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{key}: {reason}")]
    Credentials { key: &'static str, reason: String },
    #[error("stream {stream}: {reason}")]
    StreamConflict { stream: String, reason: String },
    /// The server refused the configured replicas, limits or placement
    /// (too few servers for the replicas: "insufficient resources").
    #[error("stream {stream}: {key}: {reason}")]
    StreamSettings {
        stream: String,
        key: String,
        reason: String,
    },
    #[error("stream {stream} does not exist and nats.provision is false")]
    StreamMissing { stream: String },
    #[error("consumer {consumer} on {stream}: {reason}")]
    ConsumerConflict {
        stream: String,
        consumer: String,
        reason: String,
    },
    #[error("consumer {consumer} on {stream} does not exist and nats.provision is false")]
    ConsumerMissing { stream: String, consumer: String },
    /// The server could not be asked; worth retrying.
    #[error("JetStream request failed: {0}")]
    Unavailable(String),
}

fn unavailable(err: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(err.to_string())
}

/// What making sure of a stream, consumer or bucket found, so the runtime
/// can log it and `streams ensure` can report it from the same code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisioned {
    /// It was there and matches the configuration.
    Present,
    /// It was missing and has been created.
    Created,
    /// It was there with other settings, each `setting: server → configured`;
    /// `updated` says whether the server now has the configured ones.
    Drifted { drift: Vec<String>, updated: bool },
}

/// The connection options every client of the factory shares: its name,
/// request timeout, credentials and TLS, all from `[nats]`.
pub async fn connect_options(
    nats: &NatsConfig,
    auth: &NatsAuth,
    tls: &NatsTls,
) -> Result<async_nats::ConnectOptions, BusError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(nats.connection_name.as_deref().unwrap_or("choco-factory"))
        .request_timeout(Some(nats.request_timeout))
        .ping_interval(nats.ping_interval)
        .require_tls(tls.required);
    if let Some(prefix) = &nats.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &tls.identity {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    options = match auth {
        NatsAuth::None => options,
        NatsAuth::CredentialsFile(path) => {
            options
                .credentials_file(path)
                .await
                .map_err(|err| BusError::Credentials {
                    key: "nats.credentials_file",
                    reason: format!("{}: {err}", path.display()),
                })?
        }
        NatsAuth::NKey { seed, .. } => options.nkey(seed.expose().to_string()),
        NatsAuth::Token { token, .. } => options.token(token.expose().to_string()),
        NatsAuth::UserPassword { user, password, .. } => {
            options.user_and_password(user.clone(), password.expose().to_string())
        }
    };
    Ok(options)
}

/// Why a connection attempt failed, in words an operator can act on.
/// async-nats reports only the kind of failure (the details of a TLS error
/// are logged by `async_nats` at debug level), so the hint names the keys.
pub fn explain_connect_failure(reason: &str, auth: &NatsAuth) -> Option<String> {
    let reason = reason.to_ascii_lowercase();
    if reason.contains("authorization violation") {
        Some(match auth {
            NatsAuth::None => "NATS requires credentials and none are configured: set \
                               nats.credentials_file, nats.nkey_seed_file, nats.token_file \
                               or nats.user with nats.password_file"
                .to_string(),
            _ => format!(
                "NATS refused the credentials from {} (authorization violation)",
                auth.keys()
            ),
        })
    } else if reason.contains("failed signing nonce") {
        Some(format!(
            "cannot sign the server's challenge with the key from {}",
            auth.keys()
        ))
    } else if reason.contains("tls") {
        Some(
            "the TLS handshake with NATS failed: check nats.tls.ca_file (does it sign the \
             server's certificate, for the host in nats.url?), nats.tls.cert_file and \
             nats.tls.key_file (does the server trust them?), and nats.tls.required; \
             log.filter async_nats=debug shows the handshake error"
                .to_string(),
        )
    } else {
        None
    }
}

/// Connects without waiting for the server: the client keeps retrying in
/// the background and the rooms report not-ready until it is connected.
/// That holds for refused credentials too (the server's accounts may be
/// fixed without restarting us), which are logged as errors on every
/// attempt. The connection's state and reconnects go to `metrics`.
pub async fn connect(
    nats: &NatsConfig,
    auth: &NatsAuth,
    tls: &NatsTls,
    metrics: &ConnectionMetrics,
) -> Result<async_nats::Client, BusError> {
    let metrics = metrics.clone();
    let was_connected = Arc::new(AtomicBool::new(false));
    let auth_for_events = auth.clone();
    let tls_configured = tls.required || tls.ca_file.is_some() || tls.identity.is_some();
    let failures = Arc::new(ConnectFailures::new(nats.url.clone()));
    connect_options(nats, auth, tls)
        .await?
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            let was_connected = was_connected.clone();
            let auth = auth_for_events.clone();
            let failures = failures.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        failures.reset();
                        metrics.connected.set(1);
                        if was_connected.swap(true, Ordering::AcqRel) {
                            metrics.reconnects.inc();
                            tracing::info!("reconnected to NATS");
                        } else {
                            tracing::info!("connected to NATS");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        metrics.connected.set(0);
                        tracing::warn!("disconnected from NATS");
                    }
                    async_nats::Event::ClientError(err) => {
                        let reason = err.to_string();
                        match explain_connect_failure(&reason, &auth) {
                            Some(hint) => tracing::error!(
                                error = %reason,
                                "{hint}; the rooms stay not ready and the client keeps retrying"
                            ),
                            None => failures.report(&reason, tls_configured).await,
                        }
                    }
                    // The server can also drop an established connection
                    // for its credentials (a revoked user, an expired JWT).
                    async_nats::Event::ServerError(err) => {
                        let reason = err.to_string();
                        match explain_connect_failure(&reason, &auth) {
                            Some(hint) => tracing::error!(error = %reason, "{hint}"),
                            None => tracing::warn!(error = %reason, "NATS server error"),
                        }
                    }
                    other => tracing::info!(event = %other, "NATS connection event"),
                }
            }
        })
        .connect(nats.url.as_slice())
        .await
        .map_err(|err| BusError::Connect {
            url: nats.url.redacted(),
            reason: err.to_string(),
        })
}

/// How often a run of failed connection attempts is reported again.
const CONNECT_FAILURE_EVERY: Duration = Duration::from_secs(30);

/// A run of failed connection attempts, reported as a warning at its first
/// attempt and every [`CONNECT_FAILURE_EVERY`] after, with the redacted
/// servers and why each one fails. async-nats says only "IO error" for a
/// refused port, a DNS failure and a failed TLS handshake alike, so the
/// report tries a TCP connection to each server itself to tell them apart.
struct ConnectFailures {
    urls: ServerUrls,
    attempts: AtomicU64,
    last_report: std::sync::Mutex<Option<Instant>>,
}

impl ConnectFailures {
    fn new(urls: ServerUrls) -> Self {
        ConnectFailures {
            urls,
            attempts: AtomicU64::new(0),
            last_report: std::sync::Mutex::new(None),
        }
    }

    fn reset(&self) {
        self.attempts.store(0, Ordering::Relaxed);
        *self.last_report.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    async fn report(&self, reason: &str, tls_configured: bool) {
        let attempts = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let due = {
            let mut last = self.last_report.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= CONNECT_FAILURE_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if !due {
            tracing::debug!(error = %reason, attempts, "NATS connection attempt failed");
            return;
        }
        let servers =
            futures::future::join_all(self.urls.as_slice().iter().map(|url| probe_tcp(url)))
                .await
                .join("; ");
        let tls_hint = if tls_configured {
            " A server that accepts TCP but refuses the connection may reject the TLS handshake: \
             check nats.tls.ca_file (does it sign the server's certificate, for the host in \
             nats.url?) and nats.tls.cert_file / key_file (does the server trust them?)."
        } else {
            ""
        };
        tracing::warn!(
            url = %self.urls.redacted(),
            error = %reason,
            attempts,
            servers = %servers,
            "cannot connect to NATS; the rooms stay not ready and the client keeps retrying \
             (each further attempt is logged at debug).{tls_hint}"
        );
    }
}

/// `host:port: <why>` for one server URL, from a plain TCP connection.
async fn probe_tcp(url: &str) -> String {
    let addr = match url.parse::<async_nats::ServerAddr>() {
        Ok(addr) => addr,
        Err(err) => return format!("{}: {err}", crate::cocoa_butter::config::redact_url(url)),
    };
    let target = format!("{}:{}", addr.host(), addr.port());
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(&target),
    )
    .await
    {
        Err(_) => format!("{target}: no answer to a TCP connection within 2s"),
        Ok(Err(err)) => format!("{target}: {err}"),
        Ok(Ok(_)) => format!("{target}: accepts TCP connections"),
    }
}

/// The stream configuration the runtime creates for a domain or the DLQ.
fn stream_config(
    name: &str,
    subject: String,
    duplicate_window: Duration,
    storage: &StreamStorage,
) -> stream::Config {
    let mut config = stream::Config {
        name: name.to_string(),
        subjects: vec![subject],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        duplicate_window,
        ..Default::default()
    };
    storage.apply(&mut config);
    config
}

/// Makes sure `name` exists, captures `subject` and is kept as `storage`
/// says. What JetStream cannot change in place — storage type, retention
/// policy — is a conflict the runtime refuses to paper over, and so is a
/// subject change: the factory owns the subject layout, and silently
/// re-pointing a stream would strand whatever consumes the old subjects.
/// What it can change (replicas, limits, compression, placement, the
/// duplicate window) is drift: updated when `nats.provision` is on,
/// reported either way.
pub async fn ensure_stream(
    js: &jetstream::Context,
    nats: &NatsConfig,
    name: &str,
    subject: String,
    storage: &StreamStorage,
) -> Result<Provisioned, BusError> {
    match js.get_stream(name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(unavailable)?;
            let config = &info.config;
            if config.storage != stream::StorageType::File {
                return Err(BusError::StreamConflict {
                    stream: name.into(),
                    reason: format!(
                        "uses {:?} storage, the factory expects file storage (JetStream cannot \
                         change a stream's storage in place: move its messages to a new stream)",
                        config.storage
                    ),
                });
            }
            if config.retention != stream::RetentionPolicy::Limits {
                return Err(BusError::StreamConflict {
                    stream: name.into(),
                    reason: format!(
                        "has the {:?} retention policy, the factory expects Limits (JetStream \
                         cannot change a stream's retention policy in place)",
                        config.retention
                    ),
                });
            }
            if !config.subjects.iter().any(|s| s == &subject) {
                return Err(BusError::StreamConflict {
                    stream: name.into(),
                    reason: format!(
                        "captures {:?}, the factory expects it to capture {subject:?}",
                        config.subjects
                    ),
                });
            }
            if storage.replicas <= 1 {
                warn_if_unreplicated(name, info, storage);
            }
            let mut drift: Vec<String> = storage
                .drift(config)
                .iter()
                .map(ToString::to_string)
                .collect();
            if config.duplicate_window != nats.duplicate_window {
                drift.push(format!(
                    "nats.duplicate_window: {} → {}",
                    humantime::format_duration(config.duplicate_window),
                    humantime::format_duration(nats.duplicate_window)
                ));
            }
            if drift.is_empty() {
                return Ok(Provisioned::Present);
            }
            if !nats.provision {
                tracing::warn!(
                    stream = name,
                    drift = %drift.join("; "),
                    "stream settings differ from the configuration; nats.provision is false, \
                     keeping the server's"
                );
                return Ok(Provisioned::Drifted {
                    drift,
                    updated: false,
                });
            }
            let mut wanted = config.clone();
            storage.apply(&mut wanted);
            wanted.duplicate_window = nats.duplicate_window;
            js.update_stream(&wanted)
                .await
                .map_err(|err| BusError::StreamSettings {
                    stream: name.into(),
                    key: storage.key.clone(),
                    reason: format!("updating {}: {err}", drift.join("; ")),
                })?;
            tracing::info!(stream = name, drift = %drift.join("; "), "stream settings updated");
            Ok(Provisioned::Drifted {
                drift,
                updated: true,
            })
        }
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            if !nats.provision {
                return Err(BusError::StreamMissing {
                    stream: name.into(),
                });
            }
            let created = js
                .create_stream(stream_config(name, subject, nats.duplicate_window, storage))
                .await
                .map_err(|err| BusError::StreamSettings {
                    stream: name.into(),
                    key: storage.key.clone(),
                    reason: format!("creating it with {} replica(s): {err}", storage.replicas),
                })?;
            tracing::info!(stream = name, replicas = storage.replicas, "created stream");
            warn_if_unreplicated(name, created.cached_info(), storage);
            Ok(Provisioned::Created)
        }
        Err(err) => Err(BusError::Unavailable(format!(
            "stream {name}: {err} (on a cluster: the stream or the cluster has no leader, a \
             lost quorum or an election under way)"
        ))),
    }
}

/// A stream of one replica on a clustered JetStream (its info names the
/// cluster) lives on one server only: say what losing it would do.
fn warn_if_unreplicated(name: &str, info: &stream::Info, storage: &StreamStorage) {
    let Some(cluster) = &info.cluster else { return };
    if cluster.name.is_none() || info.config.num_replicas > 1 {
        return;
    }
    tracing::warn!(
        stream = name,
        cluster = cluster.name.as_deref().unwrap_or_default(),
        server = cluster.leader.as_deref().unwrap_or_default(),
        "stream has one replica on a clustered JetStream: while its server is down the rooms \
         on it stop, and losing that server's disk loses the stream; set {}.replicas = 3",
        storage.key
    );
}

/// [`ensure_bucket_storage`], where a failure to check or put right the
/// bucket's settings does not keep a working bucket from opening: it is
/// logged and reported as drift left in place.
async fn bucket_storage_or_report(
    js: &jetstream::Context,
    stream_name: &str,
    storage: &BucketStorage,
) -> Provisioned {
    match ensure_bucket_storage(js, stream_name, storage).await {
        Ok(found) => found,
        Err(reason) => {
            tracing::warn!(
                stream = stream_name,
                error = %reason,
                "cannot check or update the bucket's replicas and placement; using it as it is"
            );
            Provisioned::Drifted {
                drift: vec![reason],
                updated: false,
            }
        }
    }
}

/// Puts a bucket's stream (`KV_<bucket>`, `OBJ_<bucket>`) to the
/// configured replicas and placement, when provisioning; reports either way.
async fn ensure_bucket_storage(
    js: &jetstream::Context,
    stream_name: &str,
    storage: &BucketStorage,
) -> Result<Provisioned, String> {
    let mut stream = js
        .get_stream(stream_name)
        .await
        .map_err(|err| format!("{stream_name}: {err}"))?;
    let info = stream
        .info()
        .await
        .map_err(|err| format!("{stream_name}: {err}"))?;
    let drift: Vec<String> = storage
        .drift(&info.config)
        .iter()
        .map(ToString::to_string)
        .collect();
    if drift.is_empty() {
        return Ok(Provisioned::Present);
    }
    if !storage.provision {
        tracing::warn!(
            stream = stream_name,
            drift = %drift.join("; "),
            "bucket settings differ from the configuration; nats.provision is false, keeping the server's"
        );
        return Ok(Provisioned::Drifted {
            drift,
            updated: false,
        });
    }
    let mut wanted = info.config.clone();
    storage.apply(&mut wanted);
    js.update_stream(&wanted).await.map_err(|err| {
        format!(
            "{stream_name}: updating {} (streams.buckets): {err}",
            drift.join("; ")
        )
    })?;
    tracing::info!(stream = stream_name, drift = %drift.join("; "), "bucket settings updated");
    Ok(Provisioned::Drifted {
        drift,
        updated: true,
    })
}

/// The durable pull consumer a room reads its prefix through.
pub fn consumer_config(room: &RoomSettings) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(room.durable_name.clone()),
        description: Some(format!("{} ({})", room.service, room.label)),
        filter_subject: room.subject_prefix.clone(),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: room.consumer.ack_wait,
        max_deliver: room.consumer.max_deliver,
        max_ack_pending: match room.consumer.ordering {
            ReplicaOrdering::PerProcess => room.consumer.max_ack_pending,
            // One replica receives at a time, so the server-side bound can
            // be the replica's own: then a delivered message always finds a
            // slot soon, and the replica never stops polling its pulls
            // (which would let its pin lapse) for want of one.
            ReplicaOrdering::Pinned => room
                .consumer
                .max_ack_pending
                .min(i64::try_from(room.consumer.max_in_flight).unwrap_or(i64::MAX)),
        },
        ..pinning(&room.consumer)
    }
}

/// The priority group pinned consumers are pulled through; one per consumer.
pub const PINNED_GROUP: &str = "replicas";

/// The priority-group part of a consumer's configuration.
fn pinning(consumer: &ConsumerConfig) -> consumer::pull::Config {
    match consumer.ordering {
        ReplicaOrdering::PerProcess => consumer::pull::Config::default(),
        ReplicaOrdering::Pinned => consumer::pull::Config {
            priority_policy: consumer::PriorityPolicy::PinnedClient,
            priority_groups: vec![PINNED_GROUP.to_string()],
            priority_timeout: consumer.pinned_ttl,
            ..Default::default()
        },
    }
}

/// Differences between the consumer on the server and the configured one,
/// as `field: server → configured`.
fn consumer_drift(actual: &consumer::Config, wanted: &consumer::pull::Config) -> Vec<String> {
    let mut drift = Vec::new();
    if actual.filter_subject != wanted.filter_subject {
        drift.push(format!(
            "filter_subject: {:?} → {:?}",
            actual.filter_subject, wanted.filter_subject
        ));
    }
    if actual.ack_wait != wanted.ack_wait {
        drift.push(format!(
            "ack_wait: {:?} → {:?}",
            actual.ack_wait, wanted.ack_wait
        ));
    }
    if actual.max_deliver != wanted.max_deliver {
        drift.push(format!(
            "max_deliver: {} → {}",
            actual.max_deliver, wanted.max_deliver
        ));
    }
    if actual.max_ack_pending != wanted.max_ack_pending {
        drift.push(format!(
            "max_ack_pending: {} → {}",
            actual.max_ack_pending, wanted.max_ack_pending
        ));
    }
    if actual.priority_policy != wanted.priority_policy
        || actual.priority_groups != wanted.priority_groups
    {
        drift.push(format!(
            "priority: {:?} {:?} → {:?} {:?}",
            actual.priority_policy,
            actual.priority_groups,
            wanted.priority_policy,
            wanted.priority_groups
        ));
    }
    if actual.priority_timeout != wanted.priority_timeout {
        drift.push(format!(
            "priority_timeout: {:?} → {:?}",
            actual.priority_timeout, wanted.priority_timeout
        ));
    }
    drift
}

/// Whether [`ensure_consumer`] may switch a consumer between the two
/// orderings. Only an operator's `streams ensure` does: a runtime switching
/// it at start would fight the replicas still running the other ordering
/// (their pulls fail against the new policy, they rebind and switch back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderingChange {
    Apply,
    /// Keep the server's ordering and follow it; warn that it differs.
    Follow,
}

/// A server before 2.11 accepts a consumer with a priority policy and
/// silently drops it: pinned ordering would then hold nothing.
fn kept_priority(
    consumer: &consumer::Consumer<consumer::pull::Config>,
    wanted: &consumer::pull::Config,
) -> Result<(), String> {
    if consumer.cached_info().config.priority_policy == wanted.priority_policy {
        Ok(())
    } else {
        Err(format!(
            "the server did not keep the priority policy {:?} (consumer.ordering = \"pinned\" needs nats-server 2.11 or later)",
            wanted.priority_policy
        ))
    }
}

/// Binds the room's durable consumer, made sure of by [`ensure_consumer`].
/// The consumer keeps the ordering it has on the server.
pub async fn bind_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    room: &RoomSettings,
) -> Result<consumer::PullConsumer, BusError> {
    let (_, stream) = provision_consumer(js, nats, room, OrderingChange::Follow).await?;
    stream
        .get_consumer(&room.durable_name)
        .await
        .map_err(unavailable)
}

/// Makes sure of the room's durable consumer: created when missing (with
/// `provision`), compared with the configuration when present. Drift is
/// updated on the server with `provision`, and reported either way.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    room: &RoomSettings,
    ordering: OrderingChange,
) -> Result<Provisioned, BusError> {
    Ok(provision_consumer(js, nats, room, ordering).await?.0)
}

/// [`ensure_consumer`], also handing back the stream it looked up, so that
/// binding does not ask the server for it again.
async fn provision_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    room: &RoomSettings,
    ordering: OrderingChange,
) -> Result<(Provisioned, jetstream::stream::Stream), BusError> {
    let stream = js.get_stream(&room.stream).await.map_err(unavailable)?;
    let mut wanted = consumer_config(room);
    let conflict = |reason: String| BusError::ConsumerConflict {
        stream: room.stream.clone(),
        consumer: room.durable_name.clone(),
        reason,
    };
    match stream.consumer_info(&room.durable_name).await {
        Ok(info) => {
            if info.config.ack_policy != consumer::AckPolicy::Explicit {
                return Err(conflict("is not an explicit-ack consumer".into()));
            }
            if info.config.deliver_subject.is_some() {
                return Err(conflict(
                    "is a push consumer; the room needs a pull consumer".into(),
                ));
            }
            let server_pinned =
                info.config.priority_policy == consumer::PriorityPolicy::PinnedClient;
            let configured_pinned = room.consumer.ordering == ReplicaOrdering::Pinned;
            if ordering == OrderingChange::Follow && server_pinned != configured_pinned {
                tracing::warn!(
                    consumer = %room.durable_name,
                    server = if server_pinned { "pinned" } else { "per_process" },
                    configured = ?room.consumer.ordering,
                    "the consumer's ordering on the server differs from the configuration; \
                     following the server's until `choco-factory streams ensure` switches it"
                );
                let mut effective = room.clone();
                effective.consumer.ordering = if server_pinned {
                    ReplicaOrdering::Pinned
                } else {
                    ReplicaOrdering::PerProcess
                };
                effective.consumer.pinned_ttl = info.config.priority_timeout;
                wanted = consumer_config(&effective);
            }
            let drift = consumer_drift(&info.config, &wanted);
            if drift.is_empty() {
                return Ok((Provisioned::Present, stream));
            }
            if nats.provision {
                stream
                    .update_consumer(wanted.clone())
                    .await
                    .map_err(|err| conflict(format!("cannot update drifted settings: {err}")))
                    .and_then(|updated| kept_priority(&updated, &wanted).map_err(conflict))?;
                tracing::warn!(drift = ?drift, consumer = %room.durable_name, "consumer settings drifted; updated them on the server");
            } else {
                tracing::error!(drift = ?drift, consumer = %room.durable_name, "consumer settings differ from the configuration and nats.provision is false; running with the server's");
            }
            Ok((
                Provisioned::Drifted {
                    drift,
                    updated: nats.provision,
                },
                stream,
            ))
        }
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::ConsumerInfoErrorKind::NotFound
            ) || matches!(err.kind(), jetstream::context::ConsumerInfoErrorKind::JetStream(ref js_err)
                    if js_err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
        {
            if !nats.provision {
                return Err(BusError::ConsumerMissing {
                    stream: room.stream.clone(),
                    consumer: room.durable_name.clone(),
                });
            }
            stream
                .create_consumer(wanted.clone())
                .await
                .map_err(|err| conflict(err.to_string()))
                .and_then(|created| kept_priority(&created, &wanted).map_err(conflict))?;
            tracing::info!(consumer = %room.durable_name, stream = %room.stream, "created consumer");
            Ok((Provisioned::Created, stream))
        }
        Err(err) => Err(unavailable(err)),
    }
}

/// A room's stream as the server has it, for `streams status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub exists: bool,
    pub messages: u64,
    pub bytes: u64,
    /// When the last message was stored (RFC 3339).
    pub last_activity: Option<String>,
    /// Its leader and how each replica keeps up.
    pub replication: Replication,
    /// What the server keeps it to.
    pub limits: Option<StreamLimits>,
}

/// A stream's limits as the server has them (-1: none).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamLimits {
    pub replicas: usize,
    /// Seconds; 0: no age limit.
    pub max_age_seconds: u64,
    pub max_bytes: i64,
    pub max_msg_size: i32,
    pub discard: String,
    pub compression: String,
}

/// Where a stream or consumer lives on a cluster and how its copies keep
/// up; on a single server only `leader` is set (the server's name).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Replication {
    pub cluster: Option<String>,
    /// `None` while it has no leader: a lost quorum, an election under way.
    pub leader: Option<String>,
    /// The copies other than the leader's.
    pub replicas: Vec<Replica>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Replica {
    pub name: String,
    /// Up to date with the leader.
    pub current: bool,
    pub offline: bool,
    /// Operations it is behind the leader.
    pub lag: u64,
    /// Milliseconds since the leader last heard from it.
    pub active_ms: u64,
}

impl Replication {
    pub fn from_info(cluster: Option<&stream::ClusterInfo>) -> Self {
        let Some(cluster) = cluster else {
            return Replication::default();
        };
        Replication {
            cluster: cluster.name.clone(),
            leader: cluster.leader.clone().filter(|leader| !leader.is_empty()),
            replicas: cluster
                .replicas
                .iter()
                .map(|peer| Replica {
                    name: peer.name.clone(),
                    current: peer.current,
                    offline: peer.offline,
                    lag: peer.lag.unwrap_or(0),
                    active_ms: u64::try_from(peer.active.as_millis()).unwrap_or(u64::MAX),
                })
                .collect(),
        }
    }

    /// Copies that are up to date: the leader's and every current replica.
    pub fn current_copies(&self) -> usize {
        usize::from(self.leader.is_some())
            + self
                .replicas
                .iter()
                .filter(|r| r.current && !r.offline)
                .count()
    }

    /// How far the most-lagging replica is behind, in operations.
    pub fn max_lag(&self) -> u64 {
        self.replicas.iter().map(|r| r.lag).max().unwrap_or(0)
    }
}

/// A room's durable consumer as the server has it, for `streams status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub exists: bool,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Delivered more than once, not yet acknowledged.
    pub redeliveries: u64,
    /// When the consumer last delivered (RFC 3339).
    pub last_activity: Option<String>,
    /// Its leader and how each replica keeps up (consumers follow their
    /// stream's replicas).
    pub replication: Replication,
}

fn rfc3339(time: async_nats::datetime::DateTime) -> Option<String> {
    chrono::DateTime::from_timestamp(time.unix_timestamp(), time.nanosecond())
        .map(|t| super::envelope::rfc3339(&t))
}

/// Reads the room's stream and consumer without changing either; a missing
/// one is reported as such, not as an error.
pub async fn room_status(
    js: &jetstream::Context,
    room: &RoomSettings,
) -> Result<(StreamStatus, ConsumerStatus), BusError> {
    let mut stream_status = StreamStatus {
        name: room.stream.clone(),
        exists: false,
        messages: 0,
        bytes: 0,
        last_activity: None,
        replication: Replication::default(),
        limits: None,
    };
    let mut consumer_status = ConsumerStatus {
        name: room.durable_name.clone(),
        exists: false,
        pending: 0,
        ack_pending: 0,
        redeliveries: 0,
        last_activity: None,
        replication: Replication::default(),
    };
    let stream = match js.get_stream(&room.stream).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok((stream_status, consumer_status));
        }
        Err(err) => return Err(unavailable(err)),
    };
    // `get_stream` has just fetched the stream's info.
    let info = stream.cached_info().clone();
    stream_status.exists = true;
    stream_status.messages = info.state.messages;
    stream_status.bytes = info.state.bytes;
    if info.state.last_sequence > 0 {
        stream_status.last_activity = rfc3339(info.state.last_timestamp);
    }
    stream_status.replication = Replication::from_info(info.cluster.as_ref());
    let config = &info.config;
    stream_status.limits = Some(StreamLimits {
        replicas: config.num_replicas.max(1),
        max_age_seconds: config.max_age.as_secs(),
        max_bytes: if config.max_bytes <= 0 {
            -1
        } else {
            config.max_bytes
        },
        max_msg_size: if config.max_message_size <= 0 {
            -1
        } else {
            config.max_message_size
        },
        discard: format!("{:?}", config.discard).to_lowercase(),
        compression: match config.compression {
            Some(stream::Compression::S2) => "s2".into(),
            _ => "none".into(),
        },
    });
    match stream.consumer_info(&room.durable_name).await {
        Ok(info) => {
            consumer_status.exists = true;
            consumer_status.pending = info.num_pending;
            consumer_status.ack_pending = info.num_ack_pending as u64;
            consumer_status.redeliveries = info.num_redelivered as u64;
            consumer_status.last_activity = info.delivered.last_active.and_then(rfc3339);
            consumer_status.replication = Replication::from_info(info.cluster.as_ref());
        }
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::ConsumerInfoErrorKind::NotFound
            ) || matches!(err.kind(), jetstream::context::ConsumerInfoErrorKind::JetStream(ref js_err)
                    if js_err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) => {}
        Err(err) => return Err(unavailable(err)),
    }
    Ok((stream_status, consumer_status))
}

/// Publishes a room's outputs as envelopes on its prefix, with ids derived
/// from their cause so that publishing the same outputs again is dropped by
/// JetStream's duplicate window.
///
/// Each publish carries the trace context of the work that caused it
/// (`traceparent`), gets a producer span when tracing is on, and is
/// counted and timed.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    subject_base: String,
    domain: String,
    service: String,
    metrics: RoomMetrics,
}

#[derive(Debug, thiserror::Error)]
#[error("publishing {subject} failed: {reason}")]
pub struct PublishError {
    pub subject: String,
    pub reason: String,
    /// NATS did not answer (a timeout, a dropped connection, a stream
    /// without a leader): not the output's fault. `false` when JetStream
    /// refused the message itself (too large, ...).
    pub bus_fault: bool,
}

impl PublishError {
    fn from_kind(subject: String, err: &jetstream::context::PublishError) -> Self {
        use jetstream::context::PublishErrorKind as Kind;
        PublishError {
            subject,
            reason: err.to_string(),
            bus_fault: matches!(
                err.kind(),
                Kind::TimedOut | Kind::BrokenPipe | Kind::StreamNotFound | Kind::MaxAckPending
            ),
        }
    }
}

impl From<PublishError> for super::room::HandleError {
    fn from(err: PublishError) -> Self {
        if err.bus_fault {
            super::room::HandleError::bus(err)
        } else {
            super::room::HandleError::transient(err)
        }
    }
}

impl Publisher {
    pub fn new(js: jetstream::Context, room: &RoomSettings, metrics: RoomMetrics) -> Self {
        Publisher {
            js,
            subject_base: room.subject_base.clone(),
            domain: room.domain.clone(),
            service: room.service.clone(),
            metrics,
        }
    }

    /// Publishes every output and waits until JetStream stored each of them.
    /// Returns the event ids, in order.
    pub async fn publish(
        &self,
        cause: &Cause,
        outputs: &[Outbound],
    ) -> Result<Vec<Uuid>, PublishError> {
        let mut acks = Vec::with_capacity(outputs.len());
        let mut ids = Vec::with_capacity(outputs.len());
        for (index, output) in outputs.iter().enumerate() {
            let event_id = cause.output_id(index);
            let subject = format!("{}{}", self.subject_base, output.action);
            let event_type = format!("{}.{}", self.domain, output.action);
            let span =
                telemetry::publish_span(&subject, &event_id.to_string(), &output.aggregate_id);
            let payload = serde_json::to_vec(&output.payload).map_err(|err| PublishError {
                subject: subject.clone(),
                reason: err.to_string(),
                bus_fault: false,
            })?;
            let envelope = EventEnvelope::new(
                event_id,
                event_type.clone(),
                output.aggregate_id.clone(),
                cause.correlation_id.clone(),
                payload,
                self.service.clone(),
            );
            let message_id = match &output.idempotency_key {
                Some(key) => format!(
                    "{}:{}",
                    event_type,
                    super::envelope::content_hash(key.as_bytes())
                ),
                None => event_id.to_string(),
            };
            let mut headers = HeaderMap::new();
            headers.insert(event_headers::EVENT_TYPE, event_type.as_str());
            // Made header-safe: a correlation id comes from an input (or an
            // API caller), and a raw CR or LF would make the client panic.
            headers.insert(
                event_headers::CORRELATION_ID,
                header_safe(&cause.correlation_id),
            );
            span.in_scope(propagation::outgoing)
                .write_nats(&mut headers);
            // `headers` replaces the whole map: it must come before the id.
            let message = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(envelope.encode()))
                .headers(headers)
                .message_id(message_id);
            let started = Instant::now();
            let sent = self
                .js
                .send_publish(subject.clone(), message)
                .instrument(span.clone())
                .await;
            let ack = match sent {
                Ok(ack) => ack,
                Err(err) => {
                    self.metrics.published(&event_type, false, 0.0);
                    span.set_status(opentelemetry::trace::Status::error(err.to_string()));
                    return Err(PublishError::from_kind(subject, &err));
                }
            };
            let metrics = self.metrics.clone();
            acks.push(
                async move {
                    let acked = ack.await;
                    metrics.published(&event_type, acked.is_ok(), started.elapsed().as_secs_f64());
                    acked.map_err(|err| {
                        tracing::Span::current()
                            .set_status(opentelemetry::trace::Status::error(err.to_string()));
                        PublishError::from_kind(subject, &err)
                    })
                }
                .instrument(span),
            );
            ids.push(event_id);
        }
        try_join_all(acks).await?;
        Ok(ids)
    }
}

/// Where a dead letter came from and why it is dead.
pub struct DeadLetter<'a> {
    pub room: &'a str,
    pub event_type: &'a str,
    pub reason: &'a str,
    pub detail: &'a str,
    pub deliveries: i64,
    pub original_subject: &'a str,
    pub original_stream: &'a str,
    pub original_sequence: u64,
    pub body: Bytes,
}

/// Moves a message to the dead-letter stream with its body unchanged. The
/// message id is the original's stream position, so dead-lettering the same
/// delivery twice stores it once.
pub async fn publish_dead_letter(
    js: &jetstream::Context,
    nats: &NatsConfig,
    letter: DeadLetter<'_>,
) -> Result<(), PublishError> {
    let subject = format!(
        "{}.{}.{}",
        nats.dlq_subject_prefix, letter.room, letter.event_type
    );
    let mut headers = HeaderMap::new();
    headers.insert(dlq_headers::REASON, letter.reason);
    headers.insert(dlq_headers::DETAIL, header_safe(letter.detail));
    headers.insert(dlq_headers::ROOM, letter.room);
    headers.insert(
        dlq_headers::DELIVERIES,
        letter.deliveries.to_string().as_str(),
    );
    headers.insert(dlq_headers::ORIGINAL_SUBJECT, letter.original_subject);
    headers.insert(dlq_headers::ORIGINAL_STREAM, letter.original_stream);
    headers.insert(
        dlq_headers::ORIGINAL_SEQUENCE,
        letter.original_sequence.to_string().as_str(),
    );
    let message = jetstream::message::PublishMessage::build()
        .payload(letter.body)
        .headers(headers)
        .message_id(format!(
            "dlq:{}:{}",
            letter.original_stream, letter.original_sequence
        ));
    js.send_publish(subject.clone(), message)
        .await
        .map_err(|err| PublishError::from_kind(subject.clone(), &err))?
        .await
        .map_err(|err| PublishError::from_kind(subject.clone(), &err))?;
    Ok(())
}

/// Header values are one line of printable text; keep a detail readable and short.
fn header_safe(detail: &str) -> HeaderValue {
    let cleaned: String = detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect();
    HeaderValue::from(cleaned.as_str())
}

/// A room's key-value bucket: named at build time, opened (and created
/// when missing: file storage, one revision per key) by `Room::prepare`
/// once NATS is reachable, then shared by every handler and API call.
/// Every operation is timed into the room's metrics and, with tracing on,
/// gets a client span.
pub struct KvBucket {
    js: jetstream::Context,
    bucket: String,
    description: &'static str,
    storage: BucketStorage,
    metrics: Option<RoomMetrics>,
    store: tokio::sync::OnceCell<kv::Store>,
}

impl KvBucket {
    /// A bucket of a room, kept as `rooms.<room>` says (`streams.buckets`)
    /// and observed in the room's metrics.
    pub fn for_room(
        ctx: &super::room::RoomContext,
        bucket: &str,
        description: &'static str,
    ) -> Self {
        ctx.store_streams.register(format!("KV_{bucket}"));
        KvBucket {
            metrics: Some(ctx.metrics.clone()),
            ..KvBucket::new(
                ctx.jetstream.clone(),
                bucket,
                description,
                ctx.settings.buckets.clone(),
            )
        }
    }

    /// A bucket outside any room (desired state, replays).
    pub fn new(
        js: jetstream::Context,
        bucket: &str,
        description: &'static str,
        storage: BucketStorage,
    ) -> Self {
        KvBucket {
            js,
            bucket: bucket.to_string(),
            description,
            storage,
            metrics: None,
            store: tokio::sync::OnceCell::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.bucket
    }

    /// Opens the bucket unless it is open already.
    pub async fn open(&self) -> Result<(), super::room::RoomError> {
        self.ensure().await.map(|_| ())
    }

    /// Opens the bucket, saying whether it had to be created or its
    /// replicas and placement put right ([`Provisioned::Present`] when it
    /// was open already).
    pub async fn ensure(&self) -> Result<Provisioned, super::room::RoomError> {
        let found = std::sync::Mutex::new(Provisioned::Present);
        let found_ref = &found;
        self.store
            .get_or_try_init(|| async move {
                if let Ok(store) = self.js.get_key_value(&self.bucket).await {
                    let checked = bucket_storage_or_report(
                        &self.js,
                        &format!("KV_{}", self.bucket),
                        &self.storage,
                    )
                    .await;
                    *found_ref.lock().unwrap_or_else(|e| e.into_inner()) = checked;
                    return Ok(store);
                }
                *found_ref.lock().unwrap_or_else(|e| e.into_inner()) = Provisioned::Created;
                self.js
                    .create_key_value(kv::Config {
                        bucket: self.bucket.clone(),
                        description: self.description.to_string(),
                        history: 1,
                        storage: stream::StorageType::File,
                        num_replicas: self.storage.replicas,
                        placement: self.storage.placement(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|err| {
                        super::room::RoomError::Nats(format!(
                            "key-value bucket {} (streams.buckets.replicas = {}): {err}",
                            self.bucket, self.storage.replicas
                        ))
                    })
            })
            .await?;
        Ok(found.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// The open bucket; before `open`, a transient failure (retried).
    pub fn store(&self) -> Result<Kv<'_>, super::room::HandleError> {
        let store = self.store.get().ok_or_else(|| {
            super::room::HandleError::bus(format!(
                "key-value bucket {} is not open yet",
                self.bucket
            ))
        })?;
        Ok(Kv {
            store,
            observer: StoreObserver {
                store: "kv",
                bucket: &self.bucket,
                metrics: self.metrics.as_ref(),
            },
        })
    }
}

/// Times one store operation into the metrics and wraps it in a span.
#[derive(Clone, Copy)]
struct StoreObserver<'a> {
    store: &'static str,
    bucket: &'a str,
    metrics: Option<&'a RoomMetrics>,
}

impl StoreObserver<'_> {
    /// `conflict` tells a lost compare-and-set from a failure.
    async fn observe<T, E: std::fmt::Display>(
        self,
        operation: &'static str,
        work: impl Future<Output = Result<T, E>>,
        conflict: impl FnOnce(&E) -> bool,
    ) -> Result<T, E> {
        let span = telemetry::store_span(self.store, operation, self.bucket);
        let started = Instant::now();
        let result = work.instrument(span.clone()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(err) if conflict(err) => "conflict",
            Err(err) => {
                span.set_status(opentelemetry::trace::Status::error(err.to_string()));
                "error"
            }
        };
        if let Some(metrics) = self.metrics {
            metrics.store_operation(
                StoreLabels {
                    store: self.store,
                    bucket: self.bucket.to_string(),
                    operation,
                    outcome,
                },
                started.elapsed().as_secs_f64(),
            );
        }
        result
    }
}

/// An open key-value bucket: the operations rooms use, observed.
#[derive(Clone, Copy)]
pub struct Kv<'a> {
    store: &'a kv::Store,
    observer: StoreObserver<'a>,
}

/// Whether a key (or an object name's subject token) is short enough to
/// put on the wire; see [`super::keys::MAX_KEY_BYTES`].
fn key_fits(token_len: usize) -> bool {
    token_len <= super::keys::MAX_KEY_BYTES
}

fn key_too_long(len: usize) -> String {
    format!(
        "a key of {len} bytes is longer than the {} the stores accept",
        super::keys::MAX_KEY_BYTES
    )
}

/// Refuses a write whose key does not fit, as the store's own error of
/// `kind` (each write has its error type).
fn writable_key<K>(key: &str, kind: K) -> Result<(), async_nats::error::Error<K>>
where
    K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq,
{
    if key_fits(key.len()) {
        Ok(())
    } else {
        Err(async_nats::error::Error::with_source(
            kind,
            key_too_long(key.len()),
        ))
    }
}

/// Keys longer than `MAX_KEY_BYTES` never reach NATS (its server would
/// drop the whole connection): writes are refused as invalid keys, reads
/// find nothing, since no such key can have been written.
impl Kv<'_> {
    pub async fn entry(&self, key: impl Into<String>) -> Result<Option<kv::Entry>, kv::EntryError> {
        let key = key.into();
        if !key_fits(key.len()) {
            return Ok(None);
        }
        self.observer
            .observe("entry", self.store.entry(key), |_| false)
            .await
    }

    pub async fn get(&self, key: impl Into<String>) -> Result<Option<Bytes>, kv::EntryError> {
        let key = key.into();
        if !key_fits(key.len()) {
            return Ok(None);
        }
        self.observer
            .observe("get", self.store.get(key), |_| false)
            .await
    }

    pub async fn put(&self, key: impl AsRef<str>, value: Bytes) -> Result<u64, kv::PutError> {
        writable_key(key.as_ref(), kv::PutErrorKind::InvalidKey)?;
        self.observer
            .observe("put", self.store.put(key, value), |_| false)
            .await
    }

    /// Writes `key` only if it has no value yet.
    pub async fn create(&self, key: impl AsRef<str>, value: Bytes) -> Result<u64, kv::CreateError> {
        writable_key(key.as_ref(), kv::CreateErrorKind::InvalidKey)?;
        self.observer
            .observe("create", self.store.create(key, value), |err| {
                err.kind() == kv::CreateErrorKind::AlreadyExists
            })
            .await
    }

    /// Writes `key` only if its revision is still `revision`.
    pub async fn update(
        &self,
        key: impl AsRef<str>,
        value: Bytes,
        revision: u64,
    ) -> Result<u64, kv::UpdateError> {
        writable_key(key.as_ref(), kv::UpdateErrorKind::InvalidKey)?;
        self.observer
            .observe("update", self.store.update(key, value, revision), |err| {
                err.kind() == kv::UpdateErrorKind::WrongLastRevision
            })
            .await
    }

    pub async fn keys(&self) -> Result<kv::Keys, kv::HistoryError> {
        self.observer
            .observe("keys", self.store.keys(), |_| false)
            .await
    }

    /// The key's latest value (if any), then every change to it. Only
    /// starting the watch is observed: the watch itself lives on.
    pub async fn watch_with_history(
        &self,
        key: impl AsRef<str>,
    ) -> Result<kv::Watch, kv::WatchError> {
        self.observer
            .observe("watch", self.store.watch_with_history(key), |_| false)
            .await
    }
}

/// A room's object store bucket, opened (and created when missing, file
/// storage) by `Room::prepare`, and observed, like [`KvBucket`].
pub struct ObjectBucket {
    js: jetstream::Context,
    bucket: String,
    description: &'static str,
    storage: BucketStorage,
    metrics: RoomMetrics,
    store: tokio::sync::OnceCell<object_store::ObjectStore>,
}

impl ObjectBucket {
    pub fn for_room(
        ctx: &super::room::RoomContext,
        bucket: &str,
        description: &'static str,
    ) -> Self {
        ctx.store_streams.register(format!("OBJ_{bucket}"));
        ObjectBucket {
            js: ctx.jetstream.clone(),
            bucket: bucket.to_string(),
            description,
            storage: ctx.settings.buckets.clone(),
            metrics: ctx.metrics.clone(),
            store: tokio::sync::OnceCell::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.bucket
    }

    pub async fn open(&self) -> Result<(), super::room::RoomError> {
        self.store
            .get_or_try_init(|| async {
                if let Ok(store) = self.js.get_object_store(&self.bucket).await {
                    bucket_storage_or_report(
                        &self.js,
                        &format!("OBJ_{}", self.bucket),
                        &self.storage,
                    )
                    .await;
                    return Ok(store);
                }
                self.js
                    .create_object_store(object_store::Config {
                        bucket: self.bucket.clone(),
                        description: Some(self.description.to_string()),
                        storage: stream::StorageType::File,
                        num_replicas: self.storage.replicas,
                        placement: self.storage.placement(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|err| {
                        super::room::RoomError::Nats(format!(
                            "object store {} (streams.buckets.replicas = {}): {err}",
                            self.bucket, self.storage.replicas
                        ))
                    })
            })
            .await
            .map(|_| ())
    }

    pub fn store(&self) -> Result<Objects<'_>, super::room::HandleError> {
        let store = self.store.get().ok_or_else(|| {
            super::room::HandleError::bus(format!("object store {} is not open yet", self.bucket))
        })?;
        Ok(Objects {
            store,
            observer: StoreObserver {
                store: "object",
                bucket: &self.bucket,
                metrics: Some(&self.metrics),
            },
        })
    }
}

/// An open object store: the operations rooms use, observed.
#[derive(Clone, Copy)]
pub struct Objects<'a> {
    store: &'a object_store::ObjectStore,
    observer: StoreObserver<'a>,
}

/// The length of an object name's subject token: the name in base64.
fn object_token_len(name: &str) -> usize {
    name.len().div_ceil(3) * 4
}

/// Names whose token is longer than `MAX_KEY_BYTES` never reach NATS, as
/// with [`Kv`]: writes are refused, reads find nothing.
impl Objects<'_> {
    pub async fn info(
        &self,
        name: &str,
    ) -> Result<object_store::ObjectInfo, object_store::InfoError> {
        if !key_fits(object_token_len(name)) {
            return Err(object_store::InfoError::new(
                object_store::InfoErrorKind::NotFound,
            ));
        }
        self.observer
            .observe("info", self.store.info(name), |_| false)
            .await
    }

    /// Opens an object for reading (the read itself is the caller's).
    pub async fn get(&self, name: &str) -> Result<object_store::Object, object_store::GetError> {
        if !key_fits(object_token_len(name)) {
            return Err(object_store::GetError::new(
                object_store::GetErrorKind::NotFound,
            ));
        }
        self.observer
            .observe("get", self.store.get(name), |_| false)
            .await
    }

    pub async fn put(
        &self,
        metadata: object_store::ObjectMetadata,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<object_store::ObjectInfo, object_store::PutError> {
        let len = object_token_len(&metadata.name);
        if !key_fits(len) {
            return Err(object_store::PutError::with_source(
                object_store::PutErrorKind::InvalidName,
                key_too_long(len),
            ));
        }
        self.observer
            .observe("put", self.store.put(metadata, data), |_| false)
            .await
    }
}
