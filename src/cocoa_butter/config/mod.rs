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
//!
//! - `mod.rs`: the schema of the sections config owns (`[nats]`,
//!   `[consumer]`, the rooms) and what validation resolves them into
//!   ([`RoomSettings`], [`ValidatedConfig`]); the guard's `[auth]`/`[limits]`,
//!   telemetry's `[log]`/`[tracing]` and the `[streams]` settings are their
//!   parts' own, layered in here. `[nats]` and `[consumer]` stay here because
//!   [`RoomSettings`], which every part reads, is built from them: in their
//!   parts they would make those parts and config import each other;
//! - `sources.rs`: the layers and their order; `secrets.rs`: [`Secret`] and
//!   secret files; `validate.rs`: the cross-section checks; `show.rs`:
//!   `config show`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::archive::config::{ArchiveConfig, ArchiveSettingError};
use super::guard::config::SettingError;
pub use super::guard::config::{AuthConfig, GRPC_MESSAGE_CEILING, LimitsConfig};
use super::guard::jwt::Verifier;
pub use super::telemetry::config::{LogConfig, LogFormat, OtlpProtocol, TracingConfig};
use super::tls::{ServerTls, TlsError};
mod secrets;
mod show;
mod sources;
mod validate;

pub use secrets::{REDACTED, Secret};
pub use show::{Provenance, is_secret_key, provenance, redact_url};
pub use sources::{CliOverrides, ConfigSources};
pub use validate::validate;

use crate::cocoa_butter::streams::{
    BucketStorage, InvalidStreamSetting, StreamOverrides, StreamStorage, StreamsConfig,
};

/// The port table as shipped: compiled in so the binary knows its rooms even
/// when started from a directory without `rooms.toml`.
pub const BUILTIN_ROOMS_TOML: &str = include_str!("../../../rooms.toml");

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

impl From<ArchiveSettingError> for ConfigError {
    fn from(err: ArchiveSettingError) -> Self {
        ConfigError::Invalid {
            key: format!("archive.{}", err.key),
            message: err.reason,
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
    /// Every message of the listed domains' streams kept in object storage
    /// past their retention; off unless domains are listed.
    pub archive: ArchiveConfig,
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
            archive: ArchiveConfig::default(),
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
    /// Publish every output that has a previous major at that major instead
    /// of the current one: a migration window for consumers not yet moved
    /// to a breaking change (docs/OPERATIONS.md, "Changing an event").
    #[serde(default)]
    pub publish_previous_major: bool,
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
    /// `rooms.<room>.publish_previous_major`.
    pub publish_previous_major: bool,
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

#[cfg(test)]
mod tests;
