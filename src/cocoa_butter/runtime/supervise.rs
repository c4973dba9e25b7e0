//! Keeping a room running: its consumer bound again with backoff after
//! each failure, pulling paused and resumed as `choco_control` says, and
//! its servers restarted on the same address if one fails.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cocoa_butter::consumer::{ConsumerError, Engine};
use crate::cocoa_butter::control::{self, Control, ControlError};
use crate::cocoa_butter::dlq::{self};
use crate::cocoa_butter::nats::{self, BusError};
use crate::cocoa_butter::room::RoomError;
use crate::cocoa_butter::serve::ServerError;
use crate::cocoa_butter::status::RoomState;

use super::*;

/// Why one attempt at running a room's consumer ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum AttemptError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Keeps one room's consumer running: provisions, binds, consumes; after a
/// failure, marks the room not ready and tries again with backoff.
pub(super) async fn supervise(engine: Arc<Engine>, intake: CancellationToken) {
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

pub(super) async fn attempt(
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
pub(super) async fn consume(
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
pub(super) async fn until_desired(
    desired: &mut tokio::sync::watch::Receiver<control::Desired>,
    paused: bool,
) {
    if desired.wait_for(|d| d.paused == paused).await.is_err() {
        // The state outlives its engines; without it nothing can change.
        std::future::pending::<()>().await;
    }
}

/// Keeps the room's desired state equal to its `choco_control` entry until
/// `stop`, watching it again (with backoff) when the watch fails. An entry
/// that does not parse is logged and ignored: the room keeps the last
/// state it understood.
pub(super) async fn follow_control(
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

/// Serves one listener until `stop`; if the server fails, reports the room
/// not ready and binds the same address again after a backoff.
pub(super) async fn keep_serving<F, Fut>(
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
pub(super) struct Backoff {
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
