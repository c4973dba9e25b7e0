//! The runtime: starts the enabled rooms, keeps them running, stops them.
//!
//! Start-up refuses bad input before anything runs: every enabled room must
//! be built into the binary, pass its settings check and bind its three
//! ports. Then one NATS connection is shared by all rooms, and each room
//! gets its servers and a supervised consumer, all inside the room's span.
//!
//! Shutdown (the `shutdown` token, cancelled on SIGTERM/SIGINT): stop
//! pulling, finish and acknowledge in-flight work, flush the connection,
//! then close the servers.
//!
//! - `mod.rs`: [`run`], the order of start and stop, and `start_room`'s
//!   wiring of one room;
//! - `supervise.rs`: a room's consumer kept bound (backoff, pause and
//!   resume from `choco_control`) and its servers kept serving;
//! - `sampler.rs`: lag, replication and dead-letter samples;
//! - `discovery.rs`: NATS service discovery; `systemd.rs`: READY, STATUS,
//!   the watchdog.
//! - `archiver.rs`: the archive's consumer of each archived stream, writing
//!   segments to storage (off unless `[archive]` lists domains).

mod archiver;
mod discovery;
mod sampler;
mod supervise;
mod systemd;

pub use archiver::consumer_config as archive_consumer_config;
use discovery::*;
use sampler::*;
use supervise::*;
use systemd::*;

use std::sync::Arc;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::config::{RoomSettings, ValidatedConfig};
use super::consumer::Engine;
use super::contract::Contracts;
use super::dlq::reason;
use super::guard::{GuardLayer, Policy};
use super::metrics::{ArchiveMetrics, ConnectionMetrics, ProcessMetrics, RoomMetrics};
use super::nats::{self, BusError, Publisher};
use super::room::{RoomContext, RoomSpec};
use super::serve::hygiene;
use super::serve::requests::{ObserveLayer, Protocol};
use super::serve::{self, InheritedSockets, Listeners, ServerError};
use super::status::{RoomInfo, RoomState};
use super::telemetry::room_span;
use crate::cocoa_butter::streams::StoreStreams;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Refused at start-up: nothing was started.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Bind(#[from] ServerError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Finds the spec of every enabled room and runs its settings check.
pub fn check_rooms<'a>(
    config: &ValidatedConfig,
    registry: &'a [RoomSpec],
) -> Result<Vec<(&'a RoomSpec, RoomSettings)>, RuntimeError> {
    let mut selected = Vec::new();
    for settings in config.enabled_rooms() {
        let Some(spec) = registry.iter().find(|spec| spec.name == settings.name) else {
            let built: Vec<&str> = registry.iter().map(|spec| spec.name).collect();
            return Err(RuntimeError::Refused(format!(
                "rooms.{name}: enabled, but this build has no implementation of it \
                 (built: {built}); disable it (CHOCO_ROOMS__{upper}__ENABLED=false) or pick rooms with --rooms",
                name = settings.name,
                built = built.join(", "),
                upper = settings.name.to_uppercase(),
            )));
        };
        (spec.check)(settings).map_err(|err| RuntimeError::Refused(err.to_string()))?;
        selected.push((spec, settings.clone()));
    }
    if selected.is_empty() {
        return Err(RuntimeError::Refused(
            "no room is enabled: enable one in rooms.toml, with CHOCO_ROOMS__<ROOM>__ENABLED=true, or with --rooms".into(),
        ));
    }
    Ok(selected)
}

/// Runs the enabled rooms until `shutdown` is cancelled.
pub async fn run(
    config: ValidatedConfig,
    registry: &[RoomSpec],
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let selected = check_rooms(&config, registry)?;
    let policy = Arc::new(Policy::new(
        config.token_verifier.clone(),
        &config.factory.auth,
        &config.factory.limits,
    ));

    // Descriptors first: the soft limit raised to the hard one, and the
    // connection bounds kept below it, so NATS, the stores and every other
    // listener keep descriptors whatever one port receives.
    let limits = &config.factory.limits;
    let descriptors = hygiene::DescriptorBudget::raise();
    let max_connections = descriptors.connections(limits.max_connections);
    let per_listener = limits
        .max_connections_per_listener
        .min((max_connections / 2).max(1));
    tracing::info!(
        open_files_was = descriptors.was,
        open_files = descriptors.soft,
        open_files_hard = descriptors.hard,
        max_connections,
        max_connections_per_listener = per_listener,
        "descriptor budget"
    );
    if max_connections < limits.max_connections {
        tracing::warn!(
            configured = limits.max_connections,
            max_connections,
            "limits.max_connections lowered to what the open-file limit leaves (raise LimitNOFILE)"
        );
    }
    let connections = ConnectionBudget {
        process: hygiene::ProcessBudget::new(max_connections),
        per_listener,
        limits: limits.clone(),
    };

    // Bind every port before connecting or spawning anything (or take the
    // sockets the service manager passed).
    let mut inherited = InheritedSockets::from_env()?;
    let mut bound = Vec::with_capacity(selected.len());
    for (spec, settings) in selected {
        let listeners = Listeners::bind(&settings, &mut inherited).await?;
        bound.push((spec, settings, listeners));
    }
    let unclaimed = inherited.unclaimed();
    if !unclaimed.is_empty() {
        tracing::warn!(
            sockets = %unclaimed.join(", "),
            "sockets passed by the service manager that no enabled room uses; closing them"
        );
    }
    drop(inherited);

    let nats = config.factory.nats.clone();
    let connection_metrics = ConnectionMetrics::default();
    let client = nats::connect(
        &nats,
        &config.nats_auth,
        &config.nats_tls,
        &connection_metrics,
    )
    .await?;
    let listener_tls = config.listener_tls.clone();
    if listener_tls.is_some() {
        // tonic builds its TLS acceptor from the process-wide provider.
        super::tls::install_default_provider();
    }
    let js = jetstream::ContextBuilder::new()
        .timeout(nats.request_timeout)
        .build(client.clone());

    let shared = Shared {
        js,
        nats: nats.clone(),
        policy,
        connections,
        listener_tls,
        bucket_storage: config.bucket_storage.clone(),
        max_envelope_bytes: config.factory.limits.max_envelope_bytes,
        intake: CancellationToken::new(),
        stop_servers: CancellationToken::new(),
        consumers: TaskTracker::new(),
        servers: TaskTracker::new(),
    };
    let mut states: Vec<(String, Arc<RoomState>)> = Vec::new();
    // The process's own families get one home: the first room's port
    // (rooms come in name order).
    let archive_metrics = ArchiveMetrics::default();
    let mut process_metrics = Some(ProcessMetrics::new(&connection_metrics, &archive_metrics));
    for (spec, settings, listeners) in bound {
        let home = process_metrics.take();
        let name = settings.name.clone();
        // The archive's readiness is the process's too: on the home port.
        let archive = home.as_ref().map(|_| &archive_metrics);
        let state = start_room(&shared, spec, settings, listeners, home.as_ref(), archive)?;
        states.push((name, state));
    }
    archiver::start_archivers(
        &config,
        &shared.js,
        &shared.consumers,
        &shared.intake,
        &archive_metrics,
    )
    .map_err(|err| RuntimeError::Refused(format!("archive: {err}")))?;
    let Shared {
        intake,
        stop_servers,
        consumers,
        servers,
        ..
    } = shared;
    consumers.close();
    servers.close();
    let notifier = tokio::spawn(notify_systemd(states, shutdown.clone()));

    shutdown.cancelled().await;
    tracing::info!("shutting down: finishing in-flight work");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    notifier.abort();
    intake.cancel();
    let grace = config.factory.shutdown_grace;
    if tokio::time::timeout(grace, consumers.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight work did not finish in time; the server will redeliver it"
        );
    }
    // Flushing waits for the server; with no server there is nothing to
    // flush to, so it must not hold the exit.
    match tokio::time::timeout(nats.request_timeout, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "flushing the NATS connection failed"),
        Err(_) => tracing::warn!("NATS is unreachable; exiting without flushing"),
    }
    stop_servers.cancel();
    servers.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// What every room of the process shares: the NATS context, the request
/// policy, the connection budget, and the tasks and tokens shutdown works
/// through.
struct Shared {
    js: jetstream::Context,
    nats: crate::cocoa_butter::config::NatsConfig,
    policy: Arc<Policy>,
    connections: ConnectionBudget,
    listener_tls: Option<Arc<crate::cocoa_butter::tls::ServerTls>>,
    bucket_storage: crate::cocoa_butter::streams::BucketStorage,
    max_envelope_bytes: usize,
    /// Cancelled first at shutdown: stop pulling, finish in-flight work.
    intake: CancellationToken,
    /// Cancelled last: close the servers.
    stop_servers: CancellationToken,
    consumers: TaskTracker,
    servers: TaskTracker,
}

/// The descriptor budget as every listener gets it: a process-wide bound
/// and a per-listener one, below the open-file limit.
struct ConnectionBudget {
    process: hygiene::ProcessBudget,
    per_listener: usize,
    limits: crate::cocoa_butter::config::LimitsConfig,
}

impl ConnectionBudget {
    fn settings(
        &self,
        metrics: &RoomMetrics,
        listener: &'static str,
        tls: Option<Arc<crate::cocoa_butter::tls::ServerTls>>,
    ) -> hygiene::ConnectionSettings {
        let (open, refused) = metrics.listener(listener);
        let limits = &self.limits;
        hygiene::ConnectionSettings {
            tls,
            limits: hygiene::ListenerLimits {
                listener,
                max_connections: self.per_listener,
                idle_timeout: limits.idle_timeout,
                process: self.process.clone(),
                refused,
                open,
            },
            header_read_timeout: limits.header_read_timeout,
            http2_keepalive_interval: limits.http2_keepalive_interval,
            http2_keepalive_timeout: limits.http2_keepalive_timeout,
            max_concurrent_streams: limits.max_concurrent_streams,
        }
    }
}

/// One room, wired: built from its spec, its metrics' known series made,
/// its state and `/info`, its three servers (each restarted on failure)
/// and its supervised consumer, all inside the room's span. `home` when
/// its metrics port serves the process's own families.
fn start_room(
    shared: &Shared,
    spec: &RoomSpec,
    settings: RoomSettings,
    listeners: Listeners,
    home: Option<&ProcessMetrics>,
    archive: Option<&ArchiveMetrics>,
) -> Result<Arc<RoomState>, RuntimeError> {
    let span = room_span(&settings.label);
    let metrics = RoomMetrics::new(&settings.name, home);
    metrics.init_stream(&settings.stream);
    let contracts = Contracts::new((spec.contracts)());
    let publisher = Publisher::new(shared.js.clone(), &settings, metrics.clone())
        .with_contracts(contracts.clone(), settings.publish_previous_major);
    let store_streams = StoreStreams::default();
    let room = (spec.build)(RoomContext {
        settings: settings.clone(),
        jetstream: shared.js.clone(),
        publisher: publisher.clone(),
        metrics: metrics.clone(),
        store_streams: store_streams.clone(),
    })
    .map_err(|err| RuntimeError::Refused(err.to_string()))?;
    let disagreements = contracts.mismatches(room.inputs(), room.outputs());
    if !disagreements.is_empty() {
        return Err(RuntimeError::Refused(format!(
            "rooms.{}: its event contracts and its inputs/outputs disagree: {}",
            settings.name,
            disagreements.join("; ")
        )));
    }
    let declared = |actions: &[&str]| -> Vec<String> {
        actions.iter().map(|a| settings.event_type(a)).collect()
    };
    metrics.init_event_types(&declared(room.inputs()), &declared(room.outputs()));
    let reasons: Vec<&str> = reason::RUNTIME
        .iter()
        .chain(room.dead_letter_reasons())
        .map(|reason| reason.as_str())
        .collect();
    metrics.init_dead_letter_reasons(&declared(room.inputs()), &reasons);
    let addrs = listeners
        .addrs()
        .map_err(|err| RuntimeError::Refused(format!("rooms.{}: {err}", settings.name)))?;
    let state = Arc::new(RoomState::new(
        shared.js.clone(),
        shared.nats.clone(),
        shared.bucket_storage.clone(),
    ));
    let grpc = room.clone().grpc_service();
    metrics.init_grpc_methods(&serve::grpc_methods(grpc.name));
    let info = Arc::new(RoomInfo {
        room: settings.name.clone(),
        label: settings.label.clone(),
        service: settings.service.clone(),
        version: env!("CARGO_PKG_VERSION"),
        domain: settings.domain.clone(),
        subject_prefix: settings.subject_prefix.clone(),
        stream: settings.stream.clone(),
        consumer: settings.durable_name.clone(),
        grpc_service: grpc.name,
        addresses: addrs,
    });
    span.in_scope(|| {
        tracing::info!(
            http = %addrs.http,
            grpc = %addrs.grpc,
            metrics = %addrs.metrics,
            room = %settings.name,
            tls = shared.listener_tls.is_some(),
            mutual_tls = shared.listener_tls.as_ref().is_some_and(|tls| tls.mutual()),
            "room listening"
        );
    });

    // One guard per room: HTTP and gRPC share its request slots.
    let guard = GuardLayer::new(shared.policy.clone());
    let router = serve::http_router(
        info,
        state.clone(),
        metrics.clone(),
        guard.clone(),
        room.clone().http_routes(),
    );
    let http_conn = shared
        .connections
        .settings(&metrics, "http", shared.listener_tls.clone());
    let grpc_conn = shared
        .connections
        .settings(&metrics, "grpc", shared.listener_tls.clone());
    let metrics_conn = shared.connections.settings(&metrics, "metrics", None);
    shared.servers.spawn(
        keep_serving(
            "http",
            state.clone(),
            addrs.http,
            listeners.http,
            shared.stop_servers.clone(),
            move |l, s| serve::serve_http(l, router.clone(), http_conn.clone(), s),
        )
        .instrument(span.clone()),
    );
    let grpc_room = room.clone();
    let grpc_state = state.clone();
    let mut first_grpc = Some(grpc);
    let observe_grpc = ObserveLayer::new(Protocol::Grpc, &settings.label, metrics.clone());
    shared.servers.spawn(
        keep_serving(
            "grpc",
            state.clone(),
            addrs.grpc,
            listeners.grpc,
            shared.stop_servers.clone(),
            move |l, s| {
                let service = first_grpc
                    .take()
                    .unwrap_or_else(|| grpc_room.clone().grpc_service());
                serve::serve_grpc(
                    l,
                    service,
                    grpc_state.clone(),
                    observe_grpc.clone(),
                    guard.clone(),
                    grpc_conn.clone(),
                    s,
                )
            },
        )
        .instrument(span.clone()),
    );
    let server_metrics = metrics.clone();
    let archive_home = archive.cloned();
    let metrics_state = state.clone();
    shared.servers.spawn(
        keep_serving(
            "metrics",
            state.clone(),
            addrs.metrics,
            listeners.metrics,
            shared.stop_servers.clone(),
            move |l, s| {
                serve::serve_metrics(
                    l,
                    server_metrics.clone(),
                    metrics_state.clone(),
                    archive_home.clone(),
                    metrics_conn.clone(),
                    s,
                )
            },
        )
        .instrument(span.clone()),
    );

    let engine = Arc::new(Engine {
        room,
        contracts,
        settings,
        nats: shared.nats.clone(),
        js: shared.js.clone(),
        publisher,
        metrics,
        max_envelope_bytes: shared.max_envelope_bytes,
        state: state.clone(),
        intake: shared.intake.clone(),
        store_streams,
    });
    shared
        .consumers
        .spawn(supervise(engine, shared.intake.clone()).instrument(span));
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cocoa_butter::config::ConfigSources;

    #[test]
    fn an_enabled_room_missing_from_the_build_is_refused() {
        let config = ConfigSources::default()
            .load()
            .expect("the shipped table is valid");
        let Err(err) = check_rooms(&config, &[]) else {
            panic!("nothing is built, yet the rooms were accepted");
        };
        assert!(
            err.to_string()
                .contains("enabled, but this build has no implementation"),
            "{err}"
        );
    }
}
