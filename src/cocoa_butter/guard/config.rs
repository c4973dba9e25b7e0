//! The guard's section of the configuration: `[auth]` (bearer tokens)
//! and `[limits]` (what a room accepts). The guard owns it and its error;
//! `config.rs` layers it in with the rest and checks it with the others.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A setting of the guard's section that cannot be used, named by its full
/// key (`auth.jwks_file`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingError {
    pub key: String,
    pub message: String,
}

impl SettingError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        SettingError {
            key: key.into(),
            message: message.into(),
        }
    }
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
    /// Client connections the whole process holds at once, on every
    /// listener together; lowered at start to what the open-file limit
    /// leaves after a reserve for NATS and the stores. Over it a new
    /// connection is closed at accept.
    pub max_connections: usize,
    /// Client connections one listener (a room's HTTP, gRPC or metrics
    /// port) holds at once; at most half of `max_connections`, so one port
    /// can never take the others' share.
    pub max_connections_per_listener: usize,
    /// An HTTP/1 request's headers must arrive within this; else the
    /// connection is closed (slow or stalled clients).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection on which neither side sent a byte for this long is
    /// closed (idle keep-alive, stalled clients, clients that stopped
    /// reading).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2 (gRPC and HTTP) pings an idle connection this often, and
    /// closes it when the ping is not answered within the timeout.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// Concurrent streams (requests) on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
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
            max_connections: 4096,
            max_connections_per_listener: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 100,
        }
    }
}
