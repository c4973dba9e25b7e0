//! Connecting to NATS: the options every client of the factory shares, the
//! connection with its event callbacks, and what to say while it fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cocoa_butter::config::{NatsAuth, NatsConfig, NatsTls, ServerUrls};
use crate::cocoa_butter::metrics::ConnectionMetrics;

use super::BusError;

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
