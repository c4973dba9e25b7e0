//! Checking the merged configuration once, across sections, into a
//! [`ValidatedConfig`]: ports, names, subjects, limits, TLS and key files,
//! every room resolved with its defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cocoa_butter::guard::config::{AuthConfig, GRPC_MESSAGE_CEILING, LimitsConfig};
use crate::cocoa_butter::guard::jwt::Verifier;
use crate::cocoa_butter::streams::BucketStorage;
use crate::cocoa_butter::tls::{self, ServerTls};

use super::secrets::resolve_nats_auth;
use super::*;

pub(super) fn check_limits(limits: &LimitsConfig) -> Result<(), ConfigError> {
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
pub(super) fn resolve_auth(auth: &AuthConfig) -> Result<Option<Arc<Verifier>>, ConfigError> {
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
    let domains: Vec<&str> = rooms.iter().map(|room| room.domain.as_str()).collect();
    factory.archive.validate(&domains)?;
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
pub(super) fn default_connection_name(rooms: &[RoomSettings]) -> String {
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

pub(super) fn resolve_nats_tls(tls: &NatsTlsConfig) -> Result<NatsTls, ConfigError> {
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

pub(super) fn resolve_listener_tls(
    tls: &ListenerTlsConfig,
) -> Result<Option<Arc<ServerTls>>, ConfigError> {
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

pub(super) fn resolve_room(
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
        publish_previous_major: room.publish_previous_major,
        settings: serde_json::Value::Object(room.settings.clone()),
        base_dir: PathBuf::from("."),
    })
}

/// Two enabled listeners on one port would make the second room fail at
/// bind time; refuse it up front and name both keys.
pub(super) fn check_ports(rooms: &[RoomSettings]) -> Result<(), ConfigError> {
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

pub(super) fn check_consumer(key: &str, consumer: &ConsumerConfig) -> Result<(), ConfigError> {
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

pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A JetStream stream name: no whitespace, `.`, `*`, `>` or path separators.
pub(super) fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
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
pub(super) fn check_subject(
    key: &str,
    subject: &str,
    wildcard_tail: bool,
) -> Result<(), ConfigError> {
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
