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
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

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
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
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
    /// How long a SIGTERM waits for in-flight work before giving up on it.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
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
            shutdown_grace: Duration::from_secs(20),
            rooms: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    /// Name the connection carries on the server (`nats server report connections`).
    pub connection_name: String,
    /// Create missing streams and consumers, and update drifted consumers.
    /// With `false` the runtime only checks and reports.
    pub provision: bool,
    /// JetStream's duplicate window for the streams the runtime creates.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Timeout of JetStream API calls and publish acknowledgements.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Stream holding dead letters of every room.
    pub dlq_stream: String,
    /// Dead letters go to `<dlq_subject_prefix>.<room>.<event_type>`.
    pub dlq_subject_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            connection_name: "choco-factory".into(),
            provision: true,
            duplicate_window: Duration::from_secs(120),
            request_timeout: Duration::from_secs(5),
            dlq_stream: "choco:dlq".into(),
            dlq_subject_prefix: "choco.dlq".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, human-readable when it is.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            filter: "info,async_nats=warn".into(),
        }
    }
}

/// The OTLP protocols the exporter speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Where traces go. The standard `OTEL_*` variables apply too and win over
/// these keys, as the OpenTelemetry specification asks of every SDK:
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
/// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
/// `OTEL_SDK_DISABLED`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP endpoint (`http://collector:4317` for gRPC,
    /// `http://collector:4318` for HTTP). Unset: no export.
    pub endpoint: Option<String>,
    /// Unset: `OTEL_EXPORTER_OTLP_PROTOCOL`, else gRPC.
    pub protocol: Option<OtlpProtocol>,
    /// Unset: `OTEL_SERVICE_NAME`, else `choco-factory`.
    pub service_name: Option<String>,
}

/// Verification of bearer JWTs minted by the platform's auth service, done
/// locally from its keys. Off while no key source is set; once one is,
/// `issuer` and `audience` are required and every route but health and
/// readiness needs a valid token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the HS256 shared secret (its bytes, surrounding
    /// whitespace trimmed). A file, so the secret is never in the config.
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public keys: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA).
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS document (`{"keys": [...]}`), keys matched by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences).
    pub audience: Option<String>,
    /// Scope a token needs for read routes (HTTP GET/HEAD, gRPC `Get*` /
    /// `List*`, reflection). Unset: any valid token may read.
    pub read_scope: Option<String>,
    /// Scope a token needs for every other route. Unset: any valid token.
    pub write_scope: Option<String>,
    /// Scope for `/admin/...` routes. Unset: the write scope.
    pub admin_scope: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret_file: None,
            public_key_files: Vec::new(),
            jwks_file: None,
            issuer: None,
            audience: None,
            read_scope: None,
            write_scope: None,
            admin_scope: None,
            leeway: Duration::from_secs(30),
        }
    }
}

impl AuthConfig {
    /// Whether any key source is configured, i.e. tokens are required.
    pub fn enabled(&self) -> bool {
        self.hs256_secret_file.is_some()
            || !self.public_key_files.is_empty()
            || self.jwks_file.is_some()
    }
}

/// Bounds on what a room accepts, each answered with its own status when
/// exceeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest HTTP request body (413 beyond it).
    pub max_http_body_bytes: usize,
    /// Largest gRPC request message (`RESOURCE_EXHAUSTED` beyond it).
    pub max_grpc_message_bytes: usize,
    /// Largest event envelope a consumer accepts; a larger one is
    /// dead-lettered as `envelope_too_large`.
    pub max_envelope_bytes: usize,
    /// HTTP plus gRPC requests one room serves at once; more are refused
    /// (429 / `RESOURCE_EXHAUSTED`) rather than queued.
    pub max_concurrent_requests: usize,
    /// Longest a request may take (504 / `DEADLINE_EXCEEDED`).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// tonic's decoder refuses larger gRPC messages on its own.
pub const GRPC_MESSAGE_CEILING: usize = 4 * 1024 * 1024;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_http_body_bytes: 2 * 1024 * 1024,
            max_grpc_message_bytes: GRPC_MESSAGE_CEILING,
            max_envelope_bytes: 1024 * 1024,
            max_concurrent_requests: 512,
            request_timeout: Duration::from_secs(30),
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
    /// Upper bound on messages held by the room at once (queued or handling).
    pub max_in_flight: usize,
    /// Server-side bound on unacknowledged messages across all replicas.
    pub max_ack_pending: i64,
    /// Idle heartbeat of the pull stream; two missed ones rebind the consumer.
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
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            batch: 10,
            ack_wait: Duration::from_secs(30),
            max_deliver: 3,
            max_in_flight: 256,
            max_ack_pending: 1000,
            heartbeat: Duration::from_secs(5),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(30),
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

/// The configuration after every check passed.
#[derive(Debug, Clone)]
pub struct ValidatedConfig {
    pub factory: FactoryConfig,
    /// Every room of the port table, enabled or not, ordered by name.
    pub rooms: Vec<RoomSettings>,
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
    if limits.request_timeout.is_zero() {
        return Err(ConfigError::invalid(
            "limits.request_timeout",
            "must be longer than zero",
        ));
    }
    Ok(())
}

/// Issuer and audience are what stop a token minted for another service
/// from being accepted here, so they are required once tokens are; the
/// keys themselves are loaded (and refused) here too, so `config check`
/// catches an unreadable or malformed key.
fn check_auth(auth: &AuthConfig) -> Result<(), ConfigError> {
    if !auth.enabled() {
        return Ok(());
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
    super::guard::jwt::Verifier::load(auth).map(|_| ())
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

        // CHOCO_CONFIG and CHOCO_ROOMS_FILE name files (read by clap), not keys.
        figment = figment.merge(
            Env::prefixed("CHOCO_")
                .ignore(&["CONFIG", "ROOMS_FILE"])
                .split("__"),
        );

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
    for url in factory.nats.url.split(',') {
        let url = url.trim();
        if url.is_empty() || url.chars().any(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "nats.url",
                format!(
                    "{url:?} is not a server URL (nats://host:port, comma-separated for several)"
                ),
            ));
        }
        if let Err(err) = url.parse::<async_nats::ServerAddr>() {
            return Err(ConfigError::invalid("nats.url", format!("{url:?}: {err}")));
        }
    }
    check_name("nats.dlq_stream", &factory.nats.dlq_stream)?;
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
    check_auth(&factory.auth)?;

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
    Ok(ValidatedConfig { factory, rooms })
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
    if consumer.heartbeat * 2 >= consumer.ack_wait {
        return Err(ConfigError::invalid(
            format!("{key}.heartbeat"),
            "must be less than half of ack_wait",
        ));
    }
    Ok(())
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
    let value = value
        .deserialize::<serde_json::Value>()
        .unwrap_or(serde_json::Value::Null);
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
