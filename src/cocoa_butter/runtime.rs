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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::config::{RoomSettings, ValidatedConfig};
use super::consumer::{ConsumerError, Engine};
use super::control::{self, Control, ControlError};
use super::dlq::{self, reason};
use super::guard::{GuardLayer, Policy};
use super::metrics::{ConnectionMetrics, ProcessMetrics, RoomMetrics};
use super::nats::{self, BusError, Publisher};
use super::room::{RoomContext, RoomError, RoomSpec};
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

/// Why one attempt at running a room's consumer ended.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error(transparent)]
    Control(#[from] ControlError),
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
    let process_budget = hygiene::ProcessBudget::new(max_connections);
    let connection_settings =
        |metrics: &RoomMetrics, listener: &'static str, tls: Option<Arc<super::tls::ServerTls>>| {
            let (open, refused) = metrics.listener(listener);
            hygiene::ConnectionSettings {
                tls,
                limits: hygiene::ListenerLimits {
                    listener,
                    max_connections: per_listener,
                    idle_timeout: limits.idle_timeout,
                    process: process_budget.clone(),
                    refused,
                    open,
                },
                header_read_timeout: limits.header_read_timeout,
                http2_keepalive_interval: limits.http2_keepalive_interval,
                http2_keepalive_timeout: limits.http2_keepalive_timeout,
                max_concurrent_streams: limits.max_concurrent_streams,
            }
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

    let intake = CancellationToken::new();
    let mut states: Vec<(String, Arc<RoomState>)> = Vec::new();
    let stop_servers = CancellationToken::new();
    let consumers = TaskTracker::new();
    let servers = TaskTracker::new();

    // The process's own families get one home: the first room's port
    // (rooms come in name order).
    let mut process_metrics = Some(ProcessMetrics::new(&connection_metrics));
    for (spec, settings, listeners) in bound {
        let span = room_span(&settings.label);
        let metrics = RoomMetrics::new(&settings.name, process_metrics.take().as_ref());
        metrics.init_stream(&settings.stream);
        let publisher = Publisher::new(js.clone(), &settings, metrics.clone());
        let store_streams = StoreStreams::default();
        let room = (spec.build)(RoomContext {
            settings: settings.clone(),
            jetstream: js.clone(),
            publisher: publisher.clone(),
            metrics: metrics.clone(),
            store_streams: store_streams.clone(),
        })
        .map_err(|err| RuntimeError::Refused(err.to_string()))?;
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
            js.clone(),
            nats.clone(),
            config.bucket_storage.clone(),
        ));
        states.push((settings.name.clone(), state.clone()));
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
                tls = listener_tls.is_some(),
                mutual_tls = listener_tls.as_ref().is_some_and(|tls| tls.mutual()),
                "room listening"
            );
        });

        // One guard per room: HTTP and gRPC share its request slots.
        let guard = GuardLayer::new(policy.clone());
        let router = serve::http_router(
            info,
            state.clone(),
            metrics.clone(),
            guard.clone(),
            room.clone().http_routes(),
        );
        let http_conn = connection_settings(&metrics, "http", listener_tls.clone());
        let grpc_conn = connection_settings(&metrics, "grpc", listener_tls.clone());
        let metrics_conn = connection_settings(&metrics, "metrics", None);
        servers.spawn(
            keep_serving(
                "http",
                state.clone(),
                addrs.http,
                listeners.http,
                stop_servers.clone(),
                move |l, s| serve::serve_http(l, router.clone(), http_conn.clone(), s),
            )
            .instrument(span.clone()),
        );
        let grpc_room = room.clone();
        let grpc_state = state.clone();
        let mut first_grpc = Some(grpc);
        let observe_grpc = ObserveLayer::new(Protocol::Grpc, &settings.label, metrics.clone());
        servers.spawn(
            keep_serving(
                "grpc",
                state.clone(),
                addrs.grpc,
                listeners.grpc,
                stop_servers.clone(),
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
        let metrics_state = state.clone();
        servers.spawn(
            keep_serving(
                "metrics",
                state.clone(),
                addrs.metrics,
                listeners.metrics,
                stop_servers.clone(),
                move |l, s| {
                    serve::serve_metrics(
                        l,
                        server_metrics.clone(),
                        metrics_state.clone(),
                        metrics_conn.clone(),
                        s,
                    )
                },
            )
            .instrument(span.clone()),
        );

        let engine = Arc::new(Engine {
            room,
            settings,
            nats: nats.clone(),
            js: js.clone(),
            publisher,
            metrics,
            max_envelope_bytes: config.factory.limits.max_envelope_bytes,
            state: state.clone(),
            intake: intake.clone(),
            store_streams,
        });
        consumers.spawn(supervise(engine, intake.clone()).instrument(span));
    }
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

/// Tells systemd (`Type=notify`) READY=1 once every enabled room runs as
/// its operator wants it (ready, or paused on purpose), keeps STATUS saying
/// which rooms are ready, paused or waiting, and pings its watchdog while
/// the runtime is alive. Without `NOTIFY_SOCKET` the notifications are
/// no-ops.
async fn notify_systemd(states: Vec<(String, Arc<RoomState>)>, shutdown: CancellationToken) {
    use sd_notify::NotifyState;
    let mut announced = false;
    let mut last_status = String::new();
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog.map_or(Duration::from_millis(100), |w| {
        (w / 2).min(Duration::from_millis(100))
    });
    let mut last_ping = std::time::Instant::now();
    loop {
        let status = systemd_status(&states);
        let started = states.iter().all(|(_, state)| state.as_desired());
        if (started && !announced) || (announced && status != last_status) {
            let mut notes = vec![NotifyState::Status(&status)];
            if !announced {
                notes.insert(0, NotifyState::Ready);
            }
            if let Err(err) = sd_notify::notify(&notes) {
                tracing::warn!(error = %err, "cannot notify systemd");
            }
            announced = true;
            last_status.clone_from(&status);
        }
        if let Some(interval) = watchdog
            && last_ping.elapsed() >= interval / 2
        {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            last_ping = std::time::Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// The unit's one-line STATUS: `4 room(s): 3 ready, paused: conch`, with a
/// `waiting: <room>` part for rooms that are neither.
fn systemd_status(states: &[(String, Arc<RoomState>)]) -> String {
    let mut ready = 0;
    let mut paused = Vec::new();
    let mut waiting = Vec::new();
    for (name, state) in states {
        if state.ready() {
            ready += 1;
        } else if state.as_desired() {
            paused.push(name.as_str());
        } else {
            waiting.push(name.as_str());
        }
    }
    let mut status = format!("{} room(s): {ready} ready", states.len());
    if !paused.is_empty() {
        status.push_str(&format!(", paused: {}", paused.join(" ")));
    }
    if !waiting.is_empty() {
        status.push_str(&format!(", waiting: {}", waiting.join(" ")));
    }
    status
}

/// Keeps one room's consumer running: provisions, binds, consumes; after a
/// failure, marks the room not ready and tries again with backoff.
async fn supervise(engine: Arc<Engine>, intake: CancellationToken) {
    let state = &engine.state;
    let mut backoff = Backoff::default();
    // NATS service discovery (`$SRV.PING|INFO|STATS`), started once the
    // room first binds and kept for the life of the process.
    let mut discovery: Option<async_nats::service::Service> = None;
    loop {
        let attempt = attempt(&engine, &intake, &mut backoff, &mut discovery).await;
        state.set_bound(false);
        match attempt {
            Ok(()) => return,
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::error!(error = %err, retry_in = ?delay, "room consumer stopped; restarting");
                state.record_error(format!("consumer stopped: {err}"));
                tokio::select! {
                    _ = intake.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn attempt(
    engine: &Arc<Engine>,
    intake: &CancellationToken,
    backoff: &mut Backoff,
    discovery: &mut Option<async_nats::service::Service>,
) -> Result<(), AttemptError> {
    let settings = &engine.settings;
    let nats = &engine.nats;
    let state = &engine.state;
    let control = Control::new(engine.js.clone(), settings.buckets.clone());
    let setup = async {
        nats::ensure_stream(
            &engine.js,
            nats,
            &settings.stream,
            settings.subject_prefix.clone(),
            &settings.streams,
        )
        .await?;
        dlq::ensure_stream(&engine.js, nats, &settings.dlq).await?;
        engine.room.prepare().await?;
        // Read the operator's desired state before the first pull: a room
        // paused before a restart must not take a single message after it.
        control.open().await?;
        state.set_desired(control.get(&settings.name).await?);
        Ok::<_, AttemptError>(nats::bind_consumer(&engine.js, nats, settings).await?)
    };
    // Setting up holds no messages, so a shutdown may abandon it.
    let consumer = tokio::select! {
        _ = intake.cancelled() => return Ok(()),
        consumer = setup => consumer?,
    };
    if discovery.is_none() {
        match announce(engine).await {
            Ok(service) => *discovery = Some(service),
            Err(err) => {
                tracing::warn!(error = %err, "cannot answer NATS service discovery; will try again")
            }
        }
    }
    state.set_bound(true);
    backoff.reset();
    tracing::info!(consumer = %settings.durable_name, "consumer bound");
    let background = intake.child_token();
    let sampler = tokio::spawn(
        sample_lag(consumer.clone(), engine.clone(), background.clone())
            .instrument(tracing::Span::current()),
    );
    let follower = tokio::spawn(
        follow_control(
            control,
            settings.name.clone(),
            engine.state.clone(),
            background.clone(),
        )
        .instrument(tracing::Span::current()),
    );
    let consumed = consume(engine, consumer, intake).await;
    background.cancel();
    let _ = sampler.await;
    let _ = follower.await;
    consumed?;
    Ok(())
}

/// Pulls while the room is not paused, until `intake` is cancelled or the
/// pull stream fails. A pause stops pulling the way a shutdown does (hand
/// back what the client buffered, finish what is in flight) but keeps the
/// consumer bound; a resume opens a new pull stream on it.
async fn consume(
    engine: &Arc<Engine>,
    consumer: jetstream::consumer::PullConsumer,
    intake: &CancellationToken,
) -> Result<(), ConsumerError> {
    let mut desired = engine.state.watch_desired();
    loop {
        if desired.borrow_and_update().paused {
            tracing::warn!("paused by an operator: not pulling until resumed");
            tokio::select! {
                _ = intake.cancelled() => return Ok(()),
                _ = until_desired(&mut desired, false) => {}
            }
            tracing::info!("resumed by an operator: pulling again");
        }
        tracing::info!("room ready");
        let pulling = intake.child_token();
        let run = engine.clone().run(consumer.clone(), pulling.clone());
        tokio::pin!(run);
        let finished = tokio::select! {
            result = &mut run => Some(result),
            _ = until_desired(&mut desired, true) => None,
        };
        let result = match finished {
            Some(result) => result,
            None => {
                tracing::info!("pausing: finishing in-flight work");
                pulling.cancel();
                run.await
            }
        };
        result?;
        if intake.is_cancelled() {
            return Ok(());
        }
    }
}

/// Resolves once the desired state is `paused` (at once if it is already).
async fn until_desired(desired: &mut tokio::sync::watch::Receiver<control::Desired>, paused: bool) {
    if desired.wait_for(|d| d.paused == paused).await.is_err() {
        // The state outlives its engines; without it nothing can change.
        std::future::pending::<()>().await;
    }
}

/// Keeps the room's desired state equal to its `choco_control` entry until
/// `stop`, watching it again (with backoff) when the watch fails. An entry
/// that does not parse is logged and ignored: the room keeps the last
/// state it understood.
async fn follow_control(
    control: Control,
    room: String,
    state: Arc<RoomState>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let followed = async {
            let mut watch = control.watch(&room).await?;
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|err| ControlError::Unavailable(err.into()))?;
                match control::decode(&room, &entry) {
                    Ok(desired) => state.set_desired(desired),
                    Err(err) => {
                        tracing::error!(error = %err, "ignoring a desired state that does not parse")
                    }
                }
            }
            Ok::<_, ControlError>(())
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = followed => outcome,
        };
        let delay = backoff.next_delay();
        match outcome {
            Ok(()) => tracing::warn!(retry_in = ?delay, "the control watch ended; watching again"),
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?delay, "the control watch failed; watching again")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// How often the consumer's lag and the room's dead letters are read from
/// the server.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Copies the consumer's pending, ack-pending and redelivered counts from
/// the server into the room's gauges, and the room's dead-letter count into
/// its state, until `stop`. A failed read leaves the last values: the lag
/// of a room that cannot reach NATS is unknown, and `choco_nats_connected`
/// already says so.
async fn sample_lag(
    consumer: jetstream::consumer::PullConsumer,
    engine: Arc<Engine>,
    stop: CancellationToken,
) {
    let metrics = &engine.metrics;
    let stream = &engine.settings.stream;
    let mut unanswered = 0u32;
    loop {
        let consumer_info = consumer.get_info().await;
        let stream_info = engine
            .js
            .get_stream(stream)
            .await
            .map(|handle| handle.cached_info().clone());
        match &consumer_info {
            Ok(info) => {
                let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                metrics.consumer_pending.set(gauge(info.num_pending));
                metrics
                    .consumer_ack_pending
                    .set(gauge(info.num_ack_pending as u64));
                metrics
                    .consumer_redelivered
                    .set(gauge(info.num_redelivered as u64));
            }
            Err(err) => tracing::debug!(error = %err, "cannot read the consumer's lag"),
        }
        if let Ok(info) = &stream_info {
            let replication = nats::Replication::from_info(info.cluster.as_ref());
            metrics.stream_sampled(
                stream,
                info.config.num_replicas.max(1),
                replication.current_copies(),
                replication.max_lag(),
            );
            let mut sampled = match engine.state.sampled.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(now) = &replication.leader {
                if sampled.leader.as_ref().is_some_and(|before| before != now) {
                    metrics.stream_leader_changed(stream);
                }
                sampled.leader = Some(now.clone());
            }
            // Messages below the stream's first sequence are gone; those
            // above the last one delivered to the room were gone before it
            // ever saw them (discard-old is otherwise a silent drop). Not
            // the ack floor: lanes acknowledge out of order, so the floor
            // can sit far below what was handled.
            if let Ok(consumer_info) = &consumer_info {
                let removed_upto = info.state.first_sequence.saturating_sub(1);
                let floor = consumer_info
                    .delivered
                    .stream_sequence
                    .max(sampled.removals_counted_upto.unwrap_or(0));
                if removed_upto > floor {
                    metrics.stream_removed_unconsumed(stream, removed_upto - floor);
                    tracing::warn!(
                        stream = %stream,
                        removed = removed_upto - floor,
                        "the stream's limits removed messages the room had not handled"
                    );
                }
                sampled.removals_counted_upto = Some(floor.max(removed_upto));
            }
        }
        let leaderless = |cluster: Option<&jetstream::stream::ClusterInfo>| {
            cluster.is_some() && nats::Replication::from_info(cluster).leader.is_none()
        };
        let fault = match (&stream_info, &consumer_info) {
            (Ok(info), _) if leaderless(info.cluster.as_ref()) => Some(format!(
                "stream {stream} has no leader (the cluster lost its quorum or elects one)"
            )),
            (_, Ok(info)) if leaderless(info.cluster.as_ref()) => Some(format!(
                "consumer {} has no leader (the cluster lost its quorum or elects one)",
                engine.settings.durable_name
            )),
            (Ok(_), Ok(_)) => None,
            (Err(err), _) => Some(format!("stream {stream} does not answer: {err}")),
            (_, Err(err)) => Some(format!(
                "consumer {} does not answer: {err}",
                engine.settings.durable_name
            )),
        };
        // One unanswered request is a blip; two in a row are not.
        unanswered = if stream_info.is_err() || consumer_info.is_err() {
            unanswered + 1
        } else {
            0
        };
        if fault.is_none() || unanswered != 1 {
            engine.state.set_replication_fault(fault);
        }
        // The dead-letter stream is every room's, so the process's home
        // room samples its replication, once, for the under-replicated
        // alert to cover it (a poison message has nowhere else to go).
        if metrics.is_process_home()
            && let Ok(dlq) = engine.js.get_stream(&engine.nats.dlq_stream).await
        {
            let info = dlq.cached_info();
            let replication = nats::Replication::from_info(info.cluster.as_ref());
            metrics.stream_sampled(
                &engine.nats.dlq_stream,
                info.config.num_replicas.max(1),
                replication.current_copies(),
                replication.max_lag(),
            );
        }
        match dlq::count_for_room(&engine.js, &engine.nats, &engine.settings.name).await {
            Ok(count) => engine.state.set_dead_letters(count),
            Err(err) => tracing::debug!(error = %err, "cannot count the room's dead letters"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(LAG_SAMPLE_INTERVAL) => {}
        }
    }
    engine.state.set_replication_fault(None);
}

/// What the room says about itself to NATS service discovery: the `data` of
/// its endpoint in `$SRV.STATS`, and the reply of that endpoint. Built from
/// what the runtime already keeps (the sampled gauges, the room's state),
/// because the stats handler runs inside the discovery task and must not
/// wait on the server.
fn discovery_data(state: &RoomState, metrics: &RoomMetrics) -> serde_json::Value {
    serde_json::json!({
        "pending": metrics.consumer_pending.get(),
        "ack_pending": metrics.consumer_ack_pending.get(),
        "redeliveries": metrics.consumer_redelivered.get(),
        "dead_letters": state.dead_letters(),
        "paused": state.paused(),
        "ready": state.ready(),
        "last_error": state.last_error(),
    })
}

/// Registers the room with the NATS micro protocol, so `nats micro ls` and
/// `$SRV.PING` list it with its label, domain, stream and consumer.
async fn announce(engine: &Engine) -> Result<async_nats::service::Service, async_nats::Error> {
    use async_nats::service::ServiceExt;
    let settings = &engine.settings;
    let metadata = [
        ("room", settings.name.as_str()),
        ("factory.room", settings.label.as_str()),
        ("domain", settings.domain.as_str()),
        ("subject_prefix", settings.subject_prefix.as_str()),
        ("stream", settings.stream.as_str()),
        ("consumer", settings.durable_name.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (state, metrics) = (engine.state.clone(), engine.metrics.clone());
    let service = engine
        .js
        .client()
        .service_builder()
        .description(format!("{} ({})", settings.service, settings.label))
        .metadata(metadata)
        .stats_handler(move |_endpoint, _stats| discovery_data(&state, &metrics))
        .start(settings.service.clone(), env!("CARGO_PKG_VERSION"))
        .await?;
    // `$SRV.STATS` reports custom data per endpoint, so the room has one:
    // `choco.factory.<room>.status` answers with the same data on request.
    let mut status = service
        .endpoint_builder()
        .name("status")
        .add(format!("choco.factory.{}.status", settings.name))
        .await?;
    let (state, metrics) = (engine.state.clone(), engine.metrics.clone());
    tokio::spawn(
        async move {
            while let Some(request) = status.next().await {
                let body = discovery_data(&state, &metrics).to_string();
                if let Err(err) = request.respond(Ok(body.into())).await {
                    tracing::debug!(error = %err, "cannot answer a status request");
                }
            }
        }
        .instrument(tracing::Span::current()),
    );
    Ok(service)
}

/// Serves one listener until `stop`; if the server fails, reports the room
/// not ready and binds the same address again after a backoff.
async fn keep_serving<F, Fut>(
    what: &'static str,
    state: Arc<RoomState>,
    addr: SocketAddr,
    first: TcpListener,
    stop: CancellationToken,
    mut serve: F,
) where
    F: FnMut(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), ServerError>>,
{
    let mut listener = Some(first);
    let mut backoff = Backoff::default();
    let mut down = false;
    loop {
        let current = match listener.take() {
            Some(current) => current,
            None => match TcpListener::bind(addr).await {
                Ok(current) => {
                    if down {
                        state.set_server_down(false);
                        down = false;
                    }
                    current
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::error!(server = what, %addr, error = %err, retry_in = ?delay, "cannot bind again");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        match serve(current, stop.clone()).await {
            Ok(()) if stop.is_cancelled() => return,
            Ok(()) => tracing::error!(server = what, %addr, "server returned; restarting"),
            Err(err) => {
                tracing::error!(server = what, %addr, error = %err, "server failed; restarting")
            }
        }
        if !down {
            state.set_server_down(true);
            down = true;
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Exponential backoff from 250 ms to 30 s, with jitter.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let base =
            Duration::from_millis(250).saturating_mul(2u32.saturating_pow(self.attempt.min(7)));
        self.attempt = self.attempt.saturating_add(1);
        base.min(Duration::from_secs(30))
            .mul_f64(0.75 + fastrand::f64() * 0.5)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
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
