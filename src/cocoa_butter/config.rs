//! Layered configuration.
//!
//! Layers, later wins: built-in defaults → the port table (`rooms.toml`) →
//! an optional config file (`--config`) → `CHOCO_` environment variables
//! (`__` nests: `CHOCO_ROOMS__CONCH__GRPC_PORT=17077`) → command-line flags.
//!
//! Figment does the merging and remembers where every value came from, which
//! is what `choco-factory config show` prints. This module then validates the
//! merged result once, so the rest of the runtime works with a
//! [`ValidatedConfig`] whose rooms are known, addressed and non-conflicting.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use super::guard::config::SettingError;
pub use super::guard::config::{AuthConfig, GRPC_MESSAGE_CEILING, LimitsConfig};
use super::guard::jwt::Verifier;
pub use super::telemetry::config::{LogConfig, LogFormat, OtlpProtocol, TracingConfig};
use super::tls::{self, ServerTls, TlsError};
use crate::cocoa_butter::streams::{
    BucketStorage, InvalidStreamSetting, StreamOverrides, StreamStorage, StreamsConfig,
};

/// The port table as shipped: compiled in so the binary knows its rooms even
/// when started from a directory without `rooms.toml`.
pub const BUILTIN_ROOMS_TOML: &str = include_str!("../../rooms.toml");

/// Where the port table is looked for when `--rooms-file` is not given.
pub const DEFAULT_ROOMS_FILE: &str = "rooms.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: cannot read {path}: {reason}")]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Layers(Box<figment::Error>),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Streams(#[from] InvalidStreamSetting),
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl From<SettingError> for ConfigError {
    fn from(err: SettingError) -> Self {
        ConfigError::Invalid {
            key: err.key,
            message: err.message,
        }
    }
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        ConfigError::Layers(Box::new(err))
    }
}

/// What `config show`, `Debug` and serialisation print instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// A secret from the configuration (a token, a password, an nkey seed).
///
/// A newtype rather than the `secrecy` crate: what is needed is that the
/// value never reaches a log line, an error or `config show`, which a
/// redacting `Debug` and `Serialize` give; the value lives as long as the
/// process anyway (the client keeps its own copy to reconnect), so wiping
/// it on drop would buy little.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// Only a string; any other type is refused without quoting it, since
    /// serde's usual "invalid type: integer `123`" would print the secret.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        const QUOTE: &str =
            "a secret must be a string (quote it); the value is not shown because it is a secret";
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
            fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
        }
        deserializer.deserialize_string(Visitor)
    }
}

/// The whole configuration as merged from every layer, before validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FactoryConfig {
    /// Address every room binds unless the room sets its own.
    pub bind: IpAddr,
    pub nats: NatsConfig,
    pub log: LogConfig,
    /// OpenTelemetry trace export; off unless an endpoint is configured
    /// here or in `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`.
    pub tracing: TracingConfig,
    /// Bearer-token verification on the rooms' HTTP and gRPC APIs; off
    /// unless a key is configured.
    pub auth: AuthConfig,
    /// Bounds on every input the rooms accept.
    pub limits: LimitsConfig,
    /// Consumer settings shared by every room; a room may override any of
    /// them under `rooms.<room>.consumer`.
    pub consumer: ConsumerConfig,
    /// Replicas, retention and placement of every stream and bucket the
    /// runtime creates (`rooms.<room>.streams` and `streams.dlq` override).
    pub streams: StreamsConfig,
    /// How long a SIGTERM waits for in-flight work before giving up on it.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// TLS on every room's HTTP and gRPC listeners; off unless a
    /// certificate is configured. The metrics listener stays plain.
    pub tls: ListenerTlsConfig,
    pub rooms: BTreeMap<String, RoomConfig>,
}

impl Default for FactoryConfig {
    fn default() -> Self {
        FactoryConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            nats: NatsConfig::default(),
            log: LogConfig::default(),
            tracing: TracingConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            consumer: ConsumerConfig::default(),
            streams: StreamsConfig::default(),
            shutdown_grace: Duration::from_secs(20),
            tls: ListenerTlsConfig::default(),
            rooms: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Every server of the cluster (or the one server): the client connects
    /// to one and fails over to the others on its own.
    pub url: ServerUrls,
    /// Name the connection carries on the server (`nats server report
    /// connections`). Unset: `choco-factory` for a process hosting every
    /// room, `choco-factory:<room>+<room>` for one hosting fewer, so
    /// `serve --rooms conch` is told apart from the rest.
    pub connection_name: Option<String>,
    /// Prefix of the reply subjects this client subscribes to (default
    /// `_INBOX`). Accounts that grant a narrow set of subjects give each
    /// user its own, e.g. `_INBOX_choco`; see deploy/nats/.
    pub inbox_prefix: Option<String>,
    /// Create missing streams and consumers, and update drifted consumers.
    /// With `false` the runtime only checks and reports.
    pub provision: bool,
    /// JetStream's duplicate window for the streams the runtime creates.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Timeout of JetStream API calls and publish acknowledgements.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often the client pings the server. A connection that stops
    /// answering (a blackholed network: no reset, no close) is dropped
    /// after two unanswered pings, so it is noticed within about three
    /// intervals; the rooms are not ready until the client reconnects.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Stream holding dead letters of every room.
    pub dlq_stream: String,
    /// Dead letters go to `<dlq_subject_prefix>.<room>.<event_type>`.
    pub dlq_subject_prefix: String,
    // Authentication: at most one way. Secrets may be given inline (or as
    // `CHOCO_NATS__...` variables) or, preferably, in a file of their own.
    /// A `.creds` file: a user JWT and its nkey seed (operator mode).
    pub credentials_file: Option<PathBuf>,
    /// A user nkey seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    pub nkey_seed_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    /// With `password` or `password_file`.
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub tls: NatsTlsConfig,
}

/// `nats.url`: the servers the client may connect to, written as one
/// string (`"nats://a:4222,nats://b:4222"`, as the NATS tools take it) or
/// as a TOML array (`["nats://a:4222", "nats://b:4222"]`). Every entry
/// reaches the client: async-nats parses a single `&str` as ONE address,
/// so handing it the comma-separated string fails with "invalid port".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrls(Vec<String>);

impl ServerUrls {
    pub fn one(url: impl Into<String>) -> Self {
        ServerUrls(vec![url.into()])
    }

    /// The entries as given (trimmed), for the client's `connect`.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// The list with any user info replaced, for messages and logs.
    pub fn redacted(&self) -> String {
        self.0
            .iter()
            .map(|url| redact_url(url))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every entry is a server address the client can parse.
    fn check(&self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            return Err(ConfigError::invalid(
                "nats.url",
                "names no server (nats://host:port, several comma-separated or as an array)",
            ));
        }
        for url in &self.0 {
            // The URL may carry `user:password@`: quote it only redacted.
            let shown = redact_url(url);
            if url.is_empty() || url.chars().any(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "nats.url",
                    format!(
                        "{shown:?} is not a server URL (nats://host:port, several comma-separated or as an array)"
                    ),
                ));
            }
            if let Err(err) = url.parse::<async_nats::ServerAddr>() {
                return Err(ConfigError::invalid(
                    "nats.url",
                    format!("{shown:?}: {err}"),
                ));
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for ServerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            One(String),
            Many(Vec<String>),
        }
        let entries = match Written::deserialize(deserializer)? {
            Written::One(list) => vec![list],
            Written::Many(list) => list,
        };
        // An array entry may itself be a comma-separated list; an empty
        // entry is kept so that validation can name it.
        Ok(ServerUrls(
            entries
                .iter()
                .flat_map(|entry| entry.split(','))
                .map(|url| url.trim().to_string())
                .collect(),
        ))
    }
}

impl Serialize for ServerUrls {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// TLS of the NATS connection. A server that requires TLS gets it whatever
/// is set here; these keys say which CA to trust, which client certificate
/// to present, and whether a server without TLS is refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTlsConfig {
    /// Refuse a server that does not offer TLS. Unset: required as soon as
    /// `ca_file` or `cert_file` is set (or the URL is `tls://`).
    pub required: Option<bool>,
    /// PEM CA certificate(s) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS, with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// TLS of the rooms' HTTP and gRPC listeners.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// PEM certificate chain, leaf first; with `key_file` turns TLS on.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA: when set, clients must present a certificate it signed.
    pub client_ca_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: ServerUrls::one("nats://127.0.0.1:4222"),
            connection_name: None,
            inbox_prefix: None,
            provision: true,
            duplicate_window: Duration::from_secs(120),
            request_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(2),
            dlq_stream: "choco:dlq".into(),
            dlq_subject_prefix: "choco.dlq".into(),
            credentials_file: None,
            nkey_seed: None,
            nkey_seed_file: None,
            token: None,
            token_file: None,
            user: None,
            password: None,
            password_file: None,
            tls: NatsTlsConfig::default(),
        }
    }
}

/// How a room pulls from its durable consumer and retries what fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Messages per pull request. The pull stream asks for the next batch
    /// when half of the current one is left, so pulls overlap.
    pub batch: usize,
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before a message that keeps failing transiently is dead-lettered.
    pub max_deliver: i64,
    /// Upper bound on messages held by the room at once (queued or
    /// handling), plus the one just pulled while it waits for a slot.
    pub max_in_flight: usize,
    /// Server-side bound on unacknowledged messages across all replicas.
    pub max_ack_pending: i64,
    /// Idle heartbeat the server sends while a pull waits. After two
    /// missed ones the room pulls again in place (a restarted server or a
    /// new consumer leader lost the pull): the longest a lost pull can
    /// stall delivery.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// First retry delay of a transient failure; doubles per delivery.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Longest one `Room::handle` call may take. On expiry the handler is
    /// cancelled and the delivery counts as a transient failure (nak with
    /// backoff), dead-lettered as `handler_timeout` on the last delivery.
    /// The ack deadline is not extended while a handler runs, so keep this
    /// below `ack_wait`: past it the server redelivers the message anyway.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// What replicas of the room sharing its consumer keep in order. Set
    /// on the server by `streams ensure` (or when the consumer is created);
    /// a running replica follows the server's.
    pub ordering: ReplicaOrdering,
    /// With `ordering = "pinned"`: how long the server keeps the pin of a
    /// replica that stopped pulling before it hands the stream to another
    /// (the fail-over time). At least four heartbeats.
    #[serde(with = "humantime_serde")]
    pub pinned_ttl: Duration,
}

/// The order guarantee of a room's consumer when several replicas of the
/// binary run the room (see docs/ARCHITECTURE.md, "Ordering across
/// replicas").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaOrdering {
    /// Replicas share the consumer and split its messages: throughput grows
    /// with replicas; events of one aggregate are in stream order within a
    /// replica, not across replicas.
    #[default]
    PerProcess,
    /// A JetStream priority group with a pinned client: the server delivers
    /// to one replica at a time and moves the pin to a standby when that
    /// replica stops pulling for `pinned_ttl`. Stream order (and so
    /// per-aggregate order) holds across replicas; throughput is one
    /// replica's.
    Pinned,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            batch: 10,
            ack_wait: Duration::from_secs(30),
            max_deliver: 3,
            max_in_flight: 256,
            max_ack_pending: 1000,
            heartbeat: Duration::from_secs(2),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(30),
            ordering: ReplicaOrdering::PerProcess,
            pinned_ttl: Duration::from_secs(20),
        }
    }
}

/// A room's partial override of [`ConsumerConfig`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerOverrides {
    pub batch: Option<usize>,
    #[serde(with = "humantime_serde")]
    pub ack_wait: Option<Duration>,
    pub max_deliver: Option<i64>,
    pub max_in_flight: Option<usize>,
    pub max_ack_pending: Option<i64>,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub retry_base: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub retry_max: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Option<Duration>,
    pub ordering: Option<ReplicaOrdering>,
    #[serde(with = "humantime_serde")]
    pub pinned_ttl: Option<Duration>,
}

impl ConsumerOverrides {
    fn apply(&self, base: &ConsumerConfig) -> ConsumerConfig {
        ConsumerConfig {
            batch: self.batch.unwrap_or(base.batch),
            ack_wait: self.ack_wait.unwrap_or(base.ack_wait),
            max_deliver: self.max_deliver.unwrap_or(base.max_deliver),
            max_in_flight: self.max_in_flight.unwrap_or(base.max_in_flight),
            max_ack_pending: self.max_ack_pending.unwrap_or(base.max_ack_pending),
            heartbeat: self.heartbeat.unwrap_or(base.heartbeat),
            retry_base: self.retry_base.unwrap_or(base.retry_base),
            retry_max: self.retry_max.unwrap_or(base.retry_max),
            handler_timeout: self.handler_timeout.unwrap_or(base.handler_timeout),
            ordering: self.ordering.unwrap_or(base.ordering),
            pinned_ttl: self.pinned_ttl.unwrap_or(base.pinned_ttl),
        }
    }
}

/// One row of the port table plus its overrides, as merged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomConfig {
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    pub service: Option<String>,
    pub label: Option<String>,
    pub domain: Option<String>,
    pub subject_prefix: Option<String>,
    /// Defaults to `choco:events:<domain>`.
    pub stream: Option<String>,
    pub bind: Option<IpAddr>,
    pub http_port: Option<u16>,
    pub grpc_port: Option<u16>,
    pub metrics_port: Option<u16>,
    #[serde(default)]
    pub consumer: ConsumerOverrides,
    /// The room's domain stream, over `[streams]`.
    #[serde(default)]
    pub streams: StreamOverrides,
    /// The room's own settings; only the room knows their shape.
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

fn enabled_by_default() -> bool {
    true
}

/// A room as the runtime uses it: every value present and checked.
#[derive(Debug, Clone, Serialize)]
pub struct RoomSettings {
    /// The key in the port table: `conch`.
    pub name: String,
    pub enabled: bool,
    /// `the-conch`: the `source_service` of everything the room publishes.
    pub service: String,
    /// `Fudge Room`: the `factory.room` field of every log line.
    pub label: String,
    pub domain: String,
    /// `choco.events.coordination.>`
    pub subject_prefix: String,
    /// `choco.events.coordination.`: prefix minus the wildcard.
    pub subject_base: String,
    pub stream: String,
    /// `choco-conch`
    pub durable_name: String,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub consumer: ConsumerConfig,
    /// How the room's domain stream is kept.
    pub streams: StreamStorage,
    /// How the room's key-value buckets and object store are kept.
    pub buckets: BucketStorage,
    /// How the dead-letter stream (shared by every room) is kept.
    pub dlq: StreamStorage,
    pub settings: serde_json::Value,
    /// Relative file paths in the room's settings are resolved against this:
    /// the folder of the port table in use (`--rooms-file`), else the
    /// working directory.
    pub base_dir: PathBuf,
}

impl RoomSettings {
    /// `coordination.property_sync.requested` for the action `property_sync.requested`.
    pub fn event_type(&self, action: &str) -> String {
        format!("{}.{}", self.domain, action)
    }

    /// A path from the room's settings, relative ones taken from `base_dir`.
    pub fn resolve_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// How the NATS connection authenticates, with secret files read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    #[default]
    None,
    /// Checked to hold a user JWT and seed; async-nats reads it again when
    /// connecting.
    CredentialsFile(PathBuf),
    NKey {
        seed: Secret,
        from: &'static str,
    },
    Token {
        token: Secret,
        from: &'static str,
    },
    UserPassword {
        user: String,
        password: Secret,
        from: &'static str,
    },
}

impl NatsAuth {
    /// The keys an operator should look at when the server refuses them.
    pub fn keys(&self) -> String {
        match self {
            NatsAuth::None => "no credentials (nats.credentials_file, nats.nkey_seed, \
                               nats.token or nats.user are all unset)"
                .into(),
            NatsAuth::CredentialsFile(_) => "nats.credentials_file".into(),
            NatsAuth::NKey { from, .. } | NatsAuth::Token { from, .. } => (*from).into(),
            NatsAuth::UserPassword { from, .. } => format!("nats.user and {from}"),
        }
    }
}

/// TLS of the NATS connection, files checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    pub required: bool,
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The configuration after every check passed.
#[derive(Debug, Clone)]
pub struct ValidatedConfig {
    pub factory: FactoryConfig,
    /// Every room of the port table, enabled or not, ordered by name.
    pub rooms: Vec<RoomSettings>,
    /// `streams.dlq` over `[streams]`, checked against every domain stream.
    pub dlq_storage: StreamStorage,
    /// `streams.buckets` over `[streams]`: the shared buckets
    /// (`choco_control`, `choco_dlq_replays`) and every room's.
    pub bucket_storage: BucketStorage,
    pub nats_auth: NatsAuth,
    pub nats_tls: NatsTls,
    /// `[tls]`, loaded: `None` serves plain HTTP and gRPC.
    pub listener_tls: Option<Arc<ServerTls>>,
    /// `[auth]`, its keys loaded: `None` requires no token.
    pub token_verifier: Option<Arc<Verifier>>,
}

impl ValidatedConfig {
    pub fn enabled_rooms(&self) -> impl Iterator<Item = &RoomSettings> {
        self.rooms.iter().filter(|room| room.enabled)
    }
}

fn check_limits(limits: &LimitsConfig) -> Result<(), ConfigError> {
    let positive = [
        ("limits.max_http_body_bytes", limits.max_http_body_bytes),
        (
            "limits.max_grpc_message_bytes",
            limits.max_grpc_message_bytes,
        ),
        ("limits.max_envelope_bytes", limits.max_envelope_bytes),
        (
            "limits.max_concurrent_requests",
            limits.max_concurrent_requests,
        ),
        ("limits.max_connections", limits.max_connections),
        (
            "limits.max_connections_per_listener",
            limits.max_connections_per_listener,
        ),
        (
            "limits.max_concurrent_streams",
            limits.max_concurrent_streams as usize,
        ),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err(ConfigError::invalid(key, "must be at least 1"));
        }
    }
    if limits.max_grpc_message_bytes > GRPC_MESSAGE_CEILING {
        return Err(ConfigError::invalid(
            "limits.max_grpc_message_bytes",
            format!("at most {GRPC_MESSAGE_CEILING} (the gRPC server's own ceiling)"),
        ));
    }
    for (key, value) in [
        ("limits.request_timeout", limits.request_timeout),
        ("limits.header_read_timeout", limits.header_read_timeout),
        ("limits.idle_timeout", limits.idle_timeout),
        (
            "limits.http2_keepalive_interval",
            limits.http2_keepalive_interval,
        ),
        (
            "limits.http2_keepalive_timeout",
            limits.http2_keepalive_timeout,
        ),
    ] {
        if value.is_zero() {
            return Err(ConfigError::invalid(key, "must be longer than zero"));
        }
    }
    if limits.max_connections_per_listener > limits.max_connections {
        return Err(ConfigError::invalid(
            "limits.max_connections_per_listener",
            format!(
                "{} is above limits.max_connections ({})",
                limits.max_connections_per_listener, limits.max_connections
            ),
        ));
    }
    if limits.request_timeout >= limits.idle_timeout {
        return Err(ConfigError::invalid(
            "limits.request_timeout",
            "must be shorter than limits.idle_timeout (a request that sends nothing back while \
             it runs would be cut by the idle timeout)",
        ));
    }
    if limits.header_read_timeout > limits.idle_timeout {
        return Err(ConfigError::invalid(
            "limits.header_read_timeout",
            "must not be longer than limits.idle_timeout (the idle timeout would close first)",
        ));
    }
    Ok(())
}

/// Issuer and audience are what stop a token minted for another service
/// from being accepted here, so they are required once tokens are; the
/// keys themselves are loaded (and refused) here, once, so `config check`
/// catches an unreadable or malformed key and the runtime uses what was
/// checked.
fn resolve_auth(auth: &AuthConfig) -> Result<Option<Arc<Verifier>>, ConfigError> {
    if !auth.enabled() {
        return Ok(None);
    }
    for (key, value) in [
        ("auth.issuer", &auth.issuer),
        ("auth.audience", &auth.audience),
    ] {
        if value.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::invalid(
                key,
                "required when a token key is configured",
            ));
        }
    }
    Ok(Verifier::load(auth)?.map(Arc::new))
}

/// Command-line values that sit on top of every other layer.
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    pub nats_url: Option<String>,
    pub bind: Option<IpAddr>,
    pub log_format: Option<LogFormat>,
    /// `--rooms conch,winnower`: run exactly these rooms.
    pub only_rooms: Option<Vec<String>>,
}

/// Where to read the layers from.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// `--rooms-file`; when absent, `rooms.toml` in the working directory if
    /// it exists, else the built-in table.
    pub rooms_file: Option<PathBuf>,
    /// `--config`
    pub config_file: Option<PathBuf>,
    pub cli: CliOverrides,
}

/// A provider that renames another one, so `config show` can say
/// "built-in port table" instead of "TOML source string".
struct Named<P> {
    name: &'static str,
    inner: P,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.inner.data()
    }
}

/// The secret keys that may come from the environment, as
/// (variable after `CHOCO_`, key path).
const SECRET_ENV: &[(&str, [&str; 2])] = &[
    ("NATS__NKEY_SEED", ["nats", "nkey_seed"]),
    ("NATS__TOKEN", ["nats", "token"]),
    ("NATS__PASSWORD", ["nats", "password"]),
];

/// `CHOCO_NATS__TOKEN` and the other secret variables, as plain strings.
struct SecretEnv;

impl Provider for SecretEnv {
    fn metadata(&self) -> Metadata {
        // "environment" in the name: `config show` then names the variable.
        Metadata::named("`CHOCO_` environment variable(s)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (var, [section, key]) in SECRET_ENV {
            let Some(value) = std::env::var_os(format!("CHOCO_{var}")) else {
                continue;
            };
            let Some(value) = value.to_str() else {
                return Err(figment::Error::from(format!(
                    "CHOCO_{var}: the value is not valid UTF-8"
                )));
            };
            let entry = root
                .entry(section.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, dict) = entry {
                dict.insert(key.to_string(), Value::from(value.to_string()));
            }
        }
        Ok(Profile::Default.collect(root))
    }
}

impl ConfigSources {
    /// Stacks every layer in order. Files that were asked for by name must exist.
    pub fn figment(&self) -> Result<Figment, ConfigError> {
        let mut figment = Figment::new().merge(Named {
            name: "built-in default",
            inner: Serialized::defaults(FactoryConfig::default()),
        });

        match &self.rooms_file {
            Some(path) => {
                ensure_readable("--rooms-file", path)?;
                figment = figment.merge(Toml::file_exact(path));
            }
            None if Path::new(DEFAULT_ROOMS_FILE).is_file() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_ROOMS_FILE));
            }
            None => {
                figment = figment.merge(Named {
                    name: "built-in port table (rooms.toml)",
                    inner: Toml::string(BUILTIN_ROOMS_TOML),
                });
            }
        }

        if let Some(path) = &self.config_file {
            ensure_readable("--config", path)?;
            figment = figment.merge(Toml::file_exact(path));
        }

        // CHOCO_CONFIG and CHOCO_ROOMS_FILE name files (read by clap), not
        // keys. Secrets are taken verbatim by `SecretEnv`: figment would
        // parse `CHOCO_NATS__TOKEN=0123` as a number (losing the zero) and
        // `[x]` as an array.
        let mut ignored = vec!["CONFIG", "ROOMS_FILE"];
        ignored.extend(SECRET_ENV.iter().map(|(var, _)| *var));
        figment = figment
            .merge(Env::prefixed("CHOCO_").ignore(&ignored).split("__"))
            .merge(SecretEnv);

        let cli = &self.cli;
        if let Some(url) = &cli.nats_url {
            figment = figment.merge(Serialized::default("nats.url", url));
        }
        if let Some(bind) = &cli.bind {
            figment = figment.merge(Serialized::default("bind", bind));
        }
        if let Some(format) = &cli.log_format {
            figment = figment.merge(Serialized::default("log.format", format));
        }
        Ok(figment)
    }

    pub fn load(&self) -> Result<ValidatedConfig, ConfigError> {
        let figment = self.figment()?;
        let factory: FactoryConfig = figment.extract()?;
        let mut config = validate(factory, self.cli.only_rooms.as_deref())?;
        let base_dir = self
            .rooms_file
            .as_deref()
            .and_then(Path::parent)
            .filter(|dir| !dir.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        for room in &mut config.rooms {
            room.base_dir = base_dir.clone();
        }
        Ok(config)
    }
}

fn ensure_readable(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .and_then(|meta| {
            if meta.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .map_err(|err| ConfigError::Unreadable {
            key,
            path: path.to_path_buf(),
            reason: err.to_string(),
        })
}

/// Checks the merged configuration and resolves every room's defaults.
pub fn validate(
    mut factory: FactoryConfig,
    only_rooms: Option<&[String]>,
) -> Result<ValidatedConfig, ConfigError> {
    factory.nats.url.check()?;
    check_name("nats.dlq_stream", &factory.nats.dlq_stream)?;
    if !(Duration::from_millis(100)..=Duration::from_secs(600))
        .contains(&factory.nats.ping_interval)
    {
        return Err(ConfigError::invalid(
            "nats.ping_interval",
            "must be between 100ms and 10m (a blackhole is noticed within about three intervals)",
        ));
    }
    if let Some(prefix) = &factory.nats.inbox_prefix {
        check_subject("nats.inbox_prefix", prefix, false)?;
    }
    check_subject(
        "nats.dlq_subject_prefix",
        &factory.nats.dlq_subject_prefix,
        false,
    )?;
    check_consumer("consumer", &factory.consumer)?;
    if let Some(endpoint) = &factory.tracing.endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        return Err(ConfigError::invalid(
            "tracing.endpoint",
            format!("{endpoint:?} is not an http:// or https:// URL of an OTLP receiver"),
        ));
    }

    check_limits(&factory.limits)?;
    let token_verifier = resolve_auth(&factory.auth)?;

    // Every room must come from the port table: a layer that names a room the
    // table does not know leaves it without a label or a domain.
    let known: Vec<&str> = factory
        .rooms
        .iter()
        .filter(|(_, room)| room.label.is_some() && room.domain.is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    for (name, room) in &factory.rooms {
        if room.label.is_none() || room.domain.is_none() {
            return Err(ConfigError::invalid(
                format!("rooms.{name}"),
                format!(
                    "unknown room; the port table (rooms.toml) has: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    if let Some(only) = only_rooms {
        for name in only {
            if !factory.rooms.contains_key(name) {
                return Err(ConfigError::invalid(
                    "--rooms",
                    format!(
                        "unknown room {name:?}; the port table (rooms.toml) has: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        for (name, room) in factory.rooms.iter_mut() {
            room.enabled = only.iter().any(|wanted| wanted == name);
        }
    }

    let mut rooms = Vec::with_capacity(factory.rooms.len());
    for (name, room) in &factory.rooms {
        rooms.push(resolve_room(&factory, name, room)?);
    }
    check_ports(&rooms)?;
    // JetStream refuses a duplicate window longer than the stream's age.
    for storage in rooms.iter().map(|room| &room.streams) {
        if !storage.max_age.is_zero() && storage.max_age < factory.nats.duplicate_window {
            return Err(ConfigError::invalid(
                format!("{}.max_age", storage.key),
                format!(
                    "{} is shorter than nats.duplicate_window ({}), which JetStream refuses",
                    humantime::format_duration(storage.max_age),
                    humantime::format_duration(factory.nats.duplicate_window)
                ),
            ));
        }
    }
    let dlq_storage = factory
        .streams
        .for_dlq(&rooms.iter().map(|room| &room.streams).collect::<Vec<_>>())?;
    for room in &mut rooms {
        room.dlq = dlq_storage.clone();
    }
    let bucket_storage = BucketStorage {
        provision: factory.nats.provision,
        ..factory.streams.for_buckets()?
    };
    if factory.nats.connection_name.is_none() {
        factory.nats.connection_name = Some(default_connection_name(&rooms));
    }
    let nats_auth = resolve_nats_auth(&factory.nats)?;
    let nats_tls = resolve_nats_tls(&factory.nats.tls)?;
    let listener_tls = resolve_listener_tls(&factory.tls)?;
    Ok(ValidatedConfig {
        factory,
        rooms,
        dlq_storage,
        bucket_storage,
        nats_auth,
        nats_tls,
        listener_tls,
        token_verifier,
    })
}

/// `choco-factory`, or `choco-factory:conch+mould` when only some rooms run.
fn default_connection_name(rooms: &[RoomSettings]) -> String {
    let enabled: Vec<&str> = rooms
        .iter()
        .filter(|room| room.enabled)
        .map(|room| room.name.as_str())
        .collect();
    if enabled.len() == rooms.len() {
        "choco-factory".into()
    } else {
        format!("choco-factory:{}", enabled.join("+"))
    }
}

/// A NATS URL (or a comma-separated list) with any `user:password@` or
/// `token@` replaced, for messages and `config show`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let start = url.find("://").map_or(0, |i| i + 3);
            match url[start..].rfind('@') {
                Some(at) => format!("{}{REDACTED}{}", &url[..start], &url[start + at..]),
                None => url.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A secret from its own file. One trailing line break is not part of it:
/// `echo "$TOKEN" > file` writes one.
fn read_secret(key: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Unreadable {
        key,
        path: path.to_path_buf(),
        reason: err.to_string(),
    })?;
    let value = text
        .strip_suffix('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(value))
}

/// A secret given inline or in a file, not both; `None` when neither.
fn inline_or_file(
    inline_key: &'static str,
    inline: Option<&Secret>,
    file_key: &'static str,
    file: Option<&Path>,
) -> Result<Option<(Secret, &'static str)>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            file_key,
            format!("{inline_key} is set too; give the secret one way"),
        )),
        (Some(secret), None) if secret.expose().is_empty() => {
            Err(ConfigError::invalid(inline_key, "is empty"))
        }
        (Some(secret), None) => Ok(Some((secret.clone(), inline_key))),
        (None, Some(path)) => Ok(Some((read_secret(file_key, path)?, file_key))),
        (None, None) => Ok(None),
    }
}

/// One way to authenticate, its secret read and checked: a bad file is
/// refused at start rather than by the server at every reconnect.
fn resolve_nats_auth(nats: &NatsConfig) -> Result<NatsAuth, ConfigError> {
    let mut ways = Vec::new();
    if nats.credentials_file.is_some() {
        ways.push("nats.credentials_file");
    }
    if nats.nkey_seed.is_some() {
        ways.push("nats.nkey_seed");
    } else if nats.nkey_seed_file.is_some() {
        ways.push("nats.nkey_seed_file");
    }
    if nats.token.is_some() {
        ways.push("nats.token");
    } else if nats.token_file.is_some() {
        ways.push("nats.token_file");
    }
    if nats.user.is_some() || nats.password.is_some() || nats.password_file.is_some() {
        ways.push("nats.user");
    }
    if let [first, second, ..] = ways[..] {
        return Err(ConfigError::invalid(
            second,
            format!("{first} is set too; configure one way to authenticate"),
        ));
    }

    if let Some(path) = &nats.credentials_file {
        let key = "nats.credentials_file";
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Unreadable {
            key,
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
        // The parser's message is not passed on: it could quote the file.
        if async_nats::ConnectOptions::with_credentials(&text).is_err() {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{} is not a NATS credentials file (a user JWT and its nkey seed)",
                    path.display()
                ),
            ));
        }
        return Ok(NatsAuth::CredentialsFile(path.clone()));
    }
    if let Some((seed, from)) = inline_or_file(
        "nats.nkey_seed",
        nats.nkey_seed.as_ref(),
        "nats.nkey_seed_file",
        nats.nkey_seed_file.as_deref(),
    )? {
        let is_user = nkeys::KeyPair::from_seed(seed.expose())
            .is_ok_and(|pair| pair.public_key().starts_with('U'));
        if !is_user {
            return Err(ConfigError::invalid(
                from,
                "is not a user nkey seed (one starts with SU)",
            ));
        }
        return Ok(NatsAuth::NKey { seed, from });
    }
    if let Some((token, from)) = inline_or_file(
        "nats.token",
        nats.token.as_ref(),
        "nats.token_file",
        nats.token_file.as_deref(),
    )? {
        return Ok(NatsAuth::Token { token, from });
    }
    let password = inline_or_file(
        "nats.password",
        nats.password.as_ref(),
        "nats.password_file",
        nats.password_file.as_deref(),
    )?;
    match (&nats.user, password) {
        (None, None) => Ok(NatsAuth::None),
        (Some(user), _) if user.trim().is_empty() => {
            Err(ConfigError::invalid("nats.user", "is empty"))
        }
        (Some(user), Some((password, from))) => Ok(NatsAuth::UserPassword {
            user: user.clone(),
            password,
            from,
        }),
        (Some(_), None) => Err(ConfigError::invalid(
            "nats.password",
            "is required with nats.user (or nats.password_file)",
        )),
        (None, Some((_, from))) => Err(ConfigError::invalid(
            "nats.user",
            format!("is required with {from}"),
        )),
    }
}

fn resolve_nats_tls(tls: &NatsTlsConfig) -> Result<NatsTls, ConfigError> {
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "nats.tls.key_file",
                "is required with nats.tls.cert_file",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "nats.tls.cert_file",
                "is required with nats.tls.key_file",
            ));
        }
    };
    tls::check_client_files(
        tls::Keys {
            cert: "nats.tls.cert_file",
            key: "nats.tls.key_file",
            ca: "nats.tls.ca_file",
        },
        tls.ca_file.as_deref(),
        identity
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path())),
    )?;
    // Trusting a CA or holding a client certificate means TLS is expected:
    // going on in plain text would send the credentials in the clear.
    let required = tls
        .required
        .unwrap_or(tls.ca_file.is_some() || identity.is_some());
    Ok(NatsTls {
        required,
        ca_file: tls.ca_file.clone(),
        identity,
    })
}

fn resolve_listener_tls(tls: &ListenerTlsConfig) -> Result<Option<Arc<ServerTls>>, ConfigError> {
    let keys = tls::Keys {
        cert: "tls.cert_file",
        key: "tls.key_file",
        ca: "tls.client_ca_file",
    };
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Ok(Some(Arc::new(ServerTls::load(
            keys,
            cert,
            key,
            tls.client_ca_file.as_deref(),
        )?))),
        (None, None) if tls.client_ca_file.is_some() => Err(ConfigError::invalid(
            "tls.client_ca_file",
            "needs tls.cert_file and tls.key_file: client certificates are only asked for over TLS",
        )),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::invalid(
            "tls.key_file",
            "is required with tls.cert_file",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            "tls.cert_file",
            "is required with tls.key_file",
        )),
    }
}

fn resolve_room(
    factory: &FactoryConfig,
    name: &str,
    room: &RoomConfig,
) -> Result<RoomSettings, ConfigError> {
    let key = |field: &str| format!("rooms.{name}.{field}");
    let required = |field: &str, value: &Option<String>| {
        value
            .clone()
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| ConfigError::invalid(key(field), "is required"))
    };
    if !is_token(name) {
        return Err(ConfigError::invalid(
            format!("rooms.{name}"),
            "a room name is lower-case letters, digits, '-' or '_'",
        ));
    }
    let service = required("service", &room.service)?;
    let label = required("label", &room.label)?;
    let domain = required("domain", &room.domain)?;
    if !is_token(&domain) {
        return Err(ConfigError::invalid(
            key("domain"),
            format!("{domain:?} is not a subject token (lower-case letters, digits, '-' or '_')"),
        ));
    }
    let subject_prefix = room
        .subject_prefix
        .clone()
        .unwrap_or_else(|| format!("choco.events.{domain}.>"));
    check_subject(&key("subject_prefix"), &subject_prefix, true)?;
    let subject_base = subject_prefix.trim_end_matches('>').to_string();

    let stream = room
        .stream
        .clone()
        .unwrap_or_else(|| format!("choco:events:{domain}"));
    check_name(&key("stream"), &stream)?;

    let consumer = room.consumer.apply(&factory.consumer);
    check_consumer(&key("consumer"), &consumer)?;

    let bind = room.bind.unwrap_or(factory.bind);
    let port = |field: &str, value: Option<u16>| {
        value.ok_or_else(|| ConfigError::invalid(key(field), "is required"))
    };
    Ok(RoomSettings {
        name: name.to_string(),
        enabled: room.enabled,
        durable_name: format!("choco-{name}"),
        service,
        label,
        domain,
        subject_prefix,
        subject_base,
        stream,
        http_addr: SocketAddr::new(bind, port("http_port", room.http_port)?),
        grpc_addr: SocketAddr::new(bind, port("grpc_port", room.grpc_port)?),
        metrics_addr: SocketAddr::new(bind, port("metrics_port", room.metrics_port)?),
        consumer,
        streams: factory.streams.for_room(
            name,
            &room.streams,
            factory.limits.max_envelope_bytes,
        )?,
        buckets: BucketStorage {
            provision: factory.nats.provision,
            ..factory.streams.for_buckets()?
        },
        // Resolved once every domain stream is (see `validate`).
        dlq: factory.streams.for_dlq(&[])?,
        settings: serde_json::Value::Object(room.settings.clone()),
        base_dir: PathBuf::from("."),
    })
}

/// Two enabled listeners on one port would make the second room fail at
/// bind time; refuse it up front and name both keys.
fn check_ports(rooms: &[RoomSettings]) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<u16, String> = BTreeMap::new();
    for room in rooms.iter().filter(|room| room.enabled) {
        for (field, addr) in [
            ("http_port", room.http_addr),
            ("grpc_port", room.grpc_addr),
            ("metrics_port", room.metrics_addr),
        ] {
            if addr.port() == 0 {
                continue;
            }
            let key = format!("rooms.{}.{field}", room.name);
            if let Some(other) = seen.insert(addr.port(), key.clone()) {
                return Err(ConfigError::invalid(
                    key,
                    format!("port {} is already used by {other}", addr.port()),
                ));
            }
        }
    }
    Ok(())
}

fn check_consumer(key: &str, consumer: &ConsumerConfig) -> Result<(), ConfigError> {
    let positive = |field: &str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(ConfigError::invalid(
                format!("{key}.{field}"),
                "must be greater than zero",
            ))
        }
    };
    positive("batch", consumer.batch > 0)?;
    positive("max_deliver", consumer.max_deliver > 0)?;
    positive("max_in_flight", consumer.max_in_flight > 0)?;
    positive("max_ack_pending", consumer.max_ack_pending > 0)?;
    positive("ack_wait", !consumer.ack_wait.is_zero())?;
    positive("heartbeat", !consumer.heartbeat.is_zero())?;
    positive("handler_timeout", !consumer.handler_timeout.is_zero())?;
    if consumer.heartbeat.saturating_mul(2) >= consumer.ack_wait {
        return Err(ConfigError::invalid(
            format!("{key}.heartbeat"),
            "must be less than half of ack_wait",
        ));
    }
    // A pinned replica keeps its pin by always having a pull waiting; its
    // pulls expire after at most half the ttl and two heartbeats must fit.
    if consumer.ordering == ReplicaOrdering::Pinned
        && consumer.pinned_ttl < consumer.heartbeat.saturating_mul(4)
    {
        return Err(ConfigError::invalid(
            format!("{key}.pinned_ttl"),
            "must be at least four times the heartbeat",
        ));
    }
    Ok(())
}

impl ConsumerConfig {
    /// How long one pull request waits on the server. On a pinned consumer
    /// (`pinned_ttl` as the server has it; zero is the server's default of
    /// two minutes): at most half the ttl, so a replica that keeps polling
    /// renews its pin before it lapses; never below two heartbeats.
    pub fn pull_expiry(&self, pinned_ttl: Option<Duration>) -> Duration {
        let idle = self.heartbeat.saturating_mul(6);
        match pinned_ttl {
            None => idle,
            Some(ttl) if ttl.is_zero() => idle.min(Duration::from_secs(60)),
            Some(ttl) => idle.min(ttl / 2).max(self.heartbeat.saturating_mul(2)),
        }
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A JetStream stream name: no whitespace, `.`, `*`, `>` or path separators.
fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let bad = name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c));
    if bad {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{name:?} is not a valid stream name (no whitespace, '.', '*', '>', '/', '\\')"
            ),
        ));
    }
    Ok(())
}

/// A dotted NATS subject. With `wildcard_tail`, it must end in `.>`.
fn check_subject(key: &str, subject: &str, wildcard_tail: bool) -> Result<(), ConfigError> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let malformed = subject.is_empty()
        || tokens.iter().any(|token| {
            token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control())
        });
    let wildcards_ok = tokens.iter().enumerate().all(|(i, token)| {
        let last = i + 1 == tokens.len();
        match *token {
            ">" => wildcard_tail && last,
            "*" => false,
            t => !t.contains('*') && !t.contains('>'),
        }
    });
    let tail_ok = !wildcard_tail || (tokens.len() >= 2 && tokens.last() == Some(&">"));
    if malformed || !wildcards_ok || !tail_ok {
        let expected = if wildcard_tail {
            "a dotted subject ending in '.>', like choco.events.coordination.>"
        } else {
            "a dotted subject without wildcards, like choco.dlq"
        };
        return Err(ConfigError::invalid(
            key,
            format!("{subject:?} is malformed: expected {expected}"),
        ));
    }
    Ok(())
}

/// Whether `config show` must hide the value at this key: any part of the
/// path that names a secret, so a misspelt key (`nats.pasword`, shown before
/// it is refused) or a room's own secret setting is hidden too. Keys ending
/// in `_file` hold paths and are shown.
pub fn is_secret_key(path: &str) -> bool {
    const WORDS: &[&str] = &[
        "pass",
        "token",
        "secret",
        "seed",
        "credential",
        "private_key",
        "api_key",
        "apikey",
    ];
    path.split('.').any(|part| {
        let part = part.to_ascii_lowercase();
        !part.ends_with("_file") && WORDS.iter().any(|w| part.contains(w))
    })
}

/// One leaf of the merged configuration and the layer it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub key: String,
    pub value: serde_json::Value,
    pub source: String,
}

/// Every leaf value of the merged configuration with its origin, for
/// `config show`.
pub fn provenance(figment: &Figment) -> Result<Vec<Provenance>, ConfigError> {
    let mut out = Vec::new();
    let root = figment.find_value("")?;
    walk(figment, "", &root, &mut out);
    Ok(out)
}

fn walk(figment: &Figment, prefix: &str, value: &Value, out: &mut Vec<Provenance>) {
    if let Value::Dict(_, dict) = value {
        for (key, child) in dict {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            walk(figment, &path, child, out);
        }
        return;
    }
    let source = figment
        .get_metadata(value.tag())
        .map(|meta| match &meta.source {
            Some(source) => format!("{} ({source})", meta.name),
            // Only the environment layer knows the exact variable.
            None if meta.name.contains("environment") => format!(
                "environment CHOCO_{}",
                prefix.replace('.', "__").to_uppercase()
            ),
            None => meta.name.to_string(),
        })
        .unwrap_or_else(|| "unknown".into());
    let unset = matches!(value, Value::Empty(..));
    let value = if is_secret_key(prefix) && !unset {
        serde_json::Value::String(REDACTED.into())
    } else if prefix == "nats.url" {
        // A string or an array of them: every entry redacted.
        match value.deserialize::<ServerUrls>() {
            Ok(urls) => serde_json::Value::String(urls.redacted()),
            Err(_) => serde_json::Value::Null,
        }
    } else {
        value
            .deserialize::<serde_json::Value>()
            .unwrap_or(serde_json::Value::Null)
    };
    out.push(Provenance {
        key: prefix.to_string(),
        value,
        source,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin() -> FactoryConfig {
        Figment::new()
            .merge(Serialized::defaults(FactoryConfig::default()))
            .merge(Toml::string(BUILTIN_ROOMS_TOML))
            .extract()
            .expect("the built-in table parses")
    }

    #[test]
    fn builtin_table_is_the_port_table() {
        let config = validate(builtin(), None).expect("valid");
        let conch = config
            .rooms
            .iter()
            .find(|r| r.name == "conch")
            .expect("conch");
        assert_eq!(conch.label, "Fudge Room");
        assert_eq!(conch.stream, "choco:events:coordination");
        assert_eq!(conch.subject_base, "choco.events.coordination.");
        assert_eq!(conch.grpc_addr.port(), 7077);
        assert_eq!(conch.durable_name, "choco-conch");
        assert_eq!(config.rooms.len(), 4);
    }

    #[test]
    fn two_rooms_on_one_port_name_both_keys() {
        let mut factory = builtin();
        factory.rooms.get_mut("winnower").expect("winnower").enabled = true;
        factory.rooms.get_mut("conch").expect("conch").grpc_port = Some(8086);
        let err = validate(factory, None).expect_err("conflict");
        let text = err.to_string();
        assert!(text.contains("rooms.winnower.http_port"), "{text}");
        assert!(text.contains("8086"), "{text}");
    }

    #[test]
    fn disabled_rooms_may_share_ports() {
        let mut factory = builtin();
        factory.rooms.get_mut("conch").expect("conch").grpc_port = Some(8086);
        validate(factory, Some(&["conch".to_string()])).expect("winnower is off");
    }

    #[test]
    fn malformed_subjects_are_refused() {
        for bad in [
            "choco.events.coordination",
            "choco..x.>",
            "choco.*.x.>",
            "a b.>",
            ">",
        ] {
            let mut factory = builtin();
            factory
                .rooms
                .get_mut("conch")
                .expect("conch")
                .subject_prefix = Some(bad.into());
            let err = validate(factory, None).expect_err(bad).to_string();
            assert!(
                err.starts_with("rooms.conch.subject_prefix"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn nats_url_takes_a_list_as_a_string_or_an_array() {
        let parse = |toml: &str| -> Result<ValidatedConfig, ConfigError> {
            let factory: FactoryConfig = Figment::from(Serialized::defaults(builtin()))
                .merge(Toml::string(toml))
                .extract()
                .map_err(ConfigError::from)?;
            validate(factory, None)
        };
        let string = parse("[nats]\nurl = \"nats://a:4222, nats://b:4223,tls://u:p@c:4224\"")
            .expect("comma-separated");
        assert_eq!(
            string.factory.nats.url.as_slice(),
            ["nats://a:4222", "nats://b:4223", "tls://u:p@c:4224"]
        );
        assert_eq!(
            string.factory.nats.url.redacted(),
            "nats://a:4222,nats://b:4223,tls://<redacted>@c:4224"
        );
        let array = parse("[nats]\nurl = [\"nats://a:4222\", \"nats://b:4223\"]").expect("array");
        assert_eq!(
            array.factory.nats.url.as_slice(),
            ["nats://a:4222", "nats://b:4223"]
        );
        let err = parse("[nats]\nurl = []").map(|_| ()).expect_err("empty");
        assert!(
            err.to_string().starts_with("nats.url: names no server"),
            "{err}"
        );
        let err = parse("[nats]\nurl = \"nats://a:4222,,nats://b:1\"")
            .map(|_| ())
            .expect_err("hole");
        assert!(err.to_string().starts_with("nats.url:"), "{err}");
        let err = parse("[nats]\nurl = \"nats://a:notaport\"")
            .map(|_| ())
            .expect_err("port");
        assert!(err.to_string().contains("nats://a:notaport"), "{err}");
    }

    #[test]
    fn streams_settings_resolve_per_room_and_for_the_dlq() {
        let mut factory = builtin();
        factory.streams.replicas = 3;
        factory.streams.dlq.max_age = Some(Duration::from_secs(86_400));
        factory
            .rooms
            .get_mut("conch")
            .expect("conch")
            .streams
            .replicas = Some(5);
        let config = validate(factory, None).expect("valid");
        let conch = config
            .rooms
            .iter()
            .find(|r| r.name == "conch")
            .expect("conch");
        assert_eq!(
            (conch.streams.replicas, conch.streams.key.as_str()),
            (5, "rooms.conch.streams")
        );
        let mould = config
            .rooms
            .iter()
            .find(|r| r.name == "mould")
            .expect("mould");
        assert_eq!(
            (mould.streams.replicas, mould.streams.key.as_str()),
            (3, "streams")
        );
        assert_eq!(conch.dlq, config.dlq_storage);
        assert_eq!(config.dlq_storage.max_age, Duration::from_secs(86_400));
        assert_eq!(config.bucket_storage.replicas, 3);
        let mut factory = builtin();
        factory.streams.replicas = 0;
        let err = validate(factory, None).map(|_| ()).expect_err("0 replicas");
        assert!(
            err.to_string()
                .starts_with("streams.replicas: 0 is not 1–5"),
            "{err}"
        );
    }

    #[test]
    fn connection_and_retention_limits_are_checked_against_each_other() {
        let mut factory = builtin();
        factory.limits.idle_timeout = Duration::from_secs(5);
        let err = validate(factory, None)
            .map(|_| ())
            .expect_err("request >= idle");
        assert!(
            err.to_string().starts_with("limits.request_timeout:"),
            "{err}"
        );
        let mut factory = builtin();
        factory.limits.max_connections_per_listener = factory.limits.max_connections + 1;
        let err = validate(factory, None)
            .map(|_| ())
            .expect_err("listener > process");
        assert!(
            err.to_string()
                .starts_with("limits.max_connections_per_listener:"),
            "{err}"
        );
        let mut factory = builtin();
        factory
            .rooms
            .get_mut("mould")
            .expect("mould")
            .streams
            .max_age = Some(Duration::from_secs(60));
        let err = validate(factory, None)
            .map(|_| ())
            .expect_err("age < window");
        assert!(
            err.to_string().starts_with("rooms.mould.streams.max_age:"),
            "{err}"
        );
    }

    #[test]
    fn unknown_rooms_are_refused() {
        let mut factory = builtin();
        factory.rooms.insert(
            "conchh".into(),
            RoomConfig {
                enabled: false,
                service: None,
                label: None,
                domain: None,
                subject_prefix: None,
                stream: None,
                bind: None,
                http_port: None,
                grpc_port: None,
                metrics_port: None,
                consumer: ConsumerOverrides::default(),
                streams: StreamOverrides::default(),
                settings: Default::default(),
            },
        );
        let err = validate(factory, None).expect_err("unknown").to_string();
        assert!(err.starts_with("rooms.conchh: unknown room"), "{err}");
        let err = validate(builtin(), Some(&["nope".into()]))
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("--rooms") && err.contains("nope"), "{err}");
    }

    #[test]
    fn room_consumer_overrides_only_what_they_set() {
        let mut factory = builtin();
        factory
            .rooms
            .get_mut("conch")
            .expect("conch")
            .consumer
            .max_deliver = Some(7);
        let config = validate(factory, None).expect("valid");
        let conch = config
            .rooms
            .iter()
            .find(|r| r.name == "conch")
            .expect("conch");
        assert_eq!(conch.consumer.max_deliver, 7);
        assert_eq!(conch.consumer.batch, 10);
    }

    fn with_nats(edit: impl FnOnce(&mut NatsConfig)) -> Result<ValidatedConfig, ConfigError> {
        let mut factory = builtin();
        edit(&mut factory.nats);
        validate(factory, None)
    }

    #[test]
    fn secrets_never_show_in_debug_or_serialisation() {
        let config = with_nats(|nats| {
            nats.user = Some("factory".into());
            nats.password = Some(Secret::new("hunter2-cocoa"));
        })
        .expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2-cocoa"), "{debug}");
        assert!(debug.contains(REDACTED), "{debug}");
        let json = serde_json::to_string(&config.factory).expect("json");
        assert!(!json.contains("hunter2-cocoa"), "{json}");
        assert_eq!(
            config.nats_auth,
            NatsAuth::UserPassword {
                user: "factory".into(),
                password: Secret::new("hunter2-cocoa"),
                from: "nats.password",
            }
        );
    }

    #[test]
    fn a_secret_of_another_type_is_refused_without_quoting_it() {
        let err = Figment::new()
            .merge(Serialized::defaults(FactoryConfig::default()))
            .merge(Toml::string("[nats]\ntoken = 987654321\n"))
            .extract::<FactoryConfig>()
            .expect_err("not a string")
            .to_string();
        assert!(!err.contains("987654321"), "{err}");
        assert!(err.contains("quote it"), "{err}");
    }

    #[test]
    fn one_way_to_authenticate_and_each_secret_once() {
        let err = with_nats(|nats| {
            nats.token = Some(Secret::new("t"));
            nats.user = Some("u".into());
        })
        .expect_err("two ways")
        .to_string();
        assert!(err.starts_with("nats.user: nats.token is set too"), "{err}");

        let err = with_nats(|nats| {
            nats.token = Some(Secret::new("t"));
            nats.token_file = Some("token".into());
        })
        .expect_err("inline and file")
        .to_string();
        assert!(
            err.starts_with("nats.token_file: nats.token is set too"),
            "{err}"
        );

        let err = with_nats(|nats| nats.password = Some(Secret::new("p")))
            .expect_err("no user")
            .to_string();
        assert!(err.starts_with("nats.user: is required"), "{err}");

        let err = with_nats(|nats| nats.user = Some("u".into()))
            .expect_err("no password")
            .to_string();
        assert!(err.starts_with("nats.password: is required"), "{err}");
    }

    #[test]
    fn a_bad_nkey_seed_is_refused_without_quoting_it() {
        for seed in ["SUnotaseed", "not even close"] {
            let err = with_nats(|nats| nats.nkey_seed = Some(Secret::new(seed)))
                .expect_err(seed)
                .to_string();
            assert!(
                err.starts_with("nats.nkey_seed: is not a user nkey seed"),
                "{err}"
            );
            assert!(!err.contains(seed), "{err}");
        }
        // An account seed is a seed, but not one a client logs in with.
        let account = nkeys::KeyPair::new_account().seed().expect("seed");
        let err = with_nats(|nats| nats.nkey_seed = Some(Secret::new(account.clone())))
            .expect_err("account seed")
            .to_string();
        assert!(!err.contains(&account), "{err}");
        let user = nkeys::KeyPair::new_user().seed().expect("seed");
        let config = with_nats(|nats| nats.nkey_seed = Some(Secret::new(user))).expect("user");
        assert!(matches!(config.nats_auth, NatsAuth::NKey { .. }));
    }

    #[test]
    fn secret_files_lose_one_trailing_line_break() {
        let dir = std::env::temp_dir().join(format!("choco-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, "abc \r\n").expect("write");
        let config = with_nats(|nats| nats.token_file = Some(file.clone())).expect("valid");
        assert_eq!(
            config.nats_auth,
            NatsAuth::Token {
                token: Secret::new("abc "),
                from: "nats.token_file",
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_keys_come_in_pairs() {
        let err = with_nats(|nats| nats.tls.cert_file = Some("c.pem".into()))
            .expect_err("no key")
            .to_string();
        assert!(err.starts_with("nats.tls.key_file: is required"), "{err}");
        let mut factory = builtin();
        factory.tls.client_ca_file = Some("ca.pem".into());
        let err = validate(factory, None).expect_err("no cert").to_string();
        assert!(err.starts_with("tls.client_ca_file: needs"), "{err}");
    }

    #[test]
    fn urls_and_secret_keys_are_redacted_for_show() {
        assert_eq!(
            redact_url("nats://a:b@h:4222, tls://tok@h2:4222,nats://h3:4222"),
            "nats://<redacted>@h:4222, tls://<redacted>@h2:4222,nats://h3:4222"
        );
        assert_eq!(redact_url("u:p@h:4222"), "<redacted>@h:4222");
        for secret in [
            "nats.token",
            "nats.password",
            "nats.nkey_seed",
            "nats.passwrod",
            "rooms.x.settings.api_key",
        ] {
            assert!(is_secret_key(secret), "{secret}");
        }
        for shown in [
            "nats.token_file",
            "nats.credentials_file",
            "nats.tls.key_file",
            "nats.user",
            "nats.url",
        ] {
            assert!(!is_secret_key(shown), "{shown}");
        }
    }

    #[test]
    fn pinned_ordering_is_per_room_and_its_ttl_must_outlast_four_heartbeats() {
        let mut factory = builtin();
        let conch = factory.rooms.get_mut("conch").expect("conch");
        conch.consumer.ordering = Some(ReplicaOrdering::Pinned);
        conch.consumer.pinned_ttl = Some(Duration::from_secs(8));
        conch.consumer.heartbeat = Some(Duration::from_secs(2));
        let config = validate(factory, None).expect("valid");
        for room in &config.rooms {
            let wanted = if room.name == "conch" {
                ReplicaOrdering::Pinned
            } else {
                ReplicaOrdering::PerProcess
            };
            assert_eq!(room.consumer.ordering, wanted, "{}", room.name);
        }
        let conch = config
            .rooms
            .iter()
            .find(|r| r.name == "conch")
            .expect("conch");
        // Pulls expire within half the ttl, so a live replica keeps its pin.
        assert_eq!(
            conch.consumer.pull_expiry(Some(conch.consumer.pinned_ttl)),
            Duration::from_secs(4)
        );
        assert_eq!(conch.consumer.pull_expiry(None), Duration::from_secs(12));

        let mut factory = builtin();
        factory.consumer.ordering = ReplicaOrdering::Pinned;
        factory.consumer.pinned_ttl =
            factory.consumer.heartbeat.saturating_mul(4) - Duration::from_secs(1);
        let err = validate(factory, None).expect_err("short ttl").to_string();
        assert!(err.starts_with("consumer.pinned_ttl"), "{err}");
    }

    #[test]
    fn a_zero_handler_timeout_is_refused_and_rooms_may_override_it() {
        let mut factory = builtin();
        factory.consumer.handler_timeout = Duration::ZERO;
        let err = validate(factory, None).expect_err("zero").to_string();
        assert!(err.starts_with("consumer.handler_timeout"), "{err}");

        let mut factory = builtin();
        let conch = factory.rooms.get_mut("conch").expect("conch");
        conch.consumer.handler_timeout = Some(Duration::ZERO);
        let err = validate(factory, None).expect_err("zero").to_string();
        assert!(
            err.starts_with("rooms.conch.consumer.handler_timeout"),
            "{err}"
        );

        let mut factory = builtin();
        let conch = factory.rooms.get_mut("conch").expect("conch");
        conch.consumer.handler_timeout = Some(Duration::from_secs(5));
        let config = validate(factory, None).expect("valid");
        let timeout = |name: &str| {
            config
                .rooms
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.consumer.handler_timeout)
        };
        assert_eq!(timeout("conch"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("mould"), Some(Duration::from_secs(30)));
    }
}
