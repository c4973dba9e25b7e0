//! Pulling a JetStream consumer without the stall of async-nats' pull
//! stream.
//!
//! async-nats 0.51's `consumer.stream().messages()` sends its pull requests
//! from a background task and counts a pull (adds its batch to the messages
//! still owed) only when that task reports it sent. When the task is
//! preempted between sending and reporting — a busy two-core host does it
//! every few hundred thousand events — the pull's messages are read first,
//! their decrements are lost (`saturating_sub` at zero), and the count ends
//! a batch too high: the client believes more than half a batch is owed and
//! sends no further pull while the server holds none (`num_waiting` 0).
//! Nothing recovers but the stream's failsafe (expiry + 5 s: 35 s in the
//! bare loop) or two missed heartbeats and a rebind (10 s). Reproduced by
//! `examples/pull_stall.rs` (`scripts/pull-stall-instrumented.sh` counts the
//! lost decrements and injects the preemption); README, "The stall".
//!
//! [`Puller`] cannot stall that way: the one task that reads the inbox also
//! sends each pull and counts it before it reads again, so no message of a
//! pull is seen before the pull is counted. Where the server's answer
//! leaves the count unknown (a status without `Nats-Pending-Messages`,
//! silence for two heartbeats) the count is reset to zero: the worst case
//! is asking for more than needed, which the consumer's `max_ack_pending`
//! and `max_waiting` and the engine's slots bound, never for less. Silence
//! is answered by pulling again in place, so a lost pull costs two
//! heartbeats and no rebind.
//!
//! A pull answered by "no responders" (503) found no consumer leader: an
//! election is under way on a cluster (or the consumer is gone). The puller
//! waits a moment and pulls again rather than ending: ending would have the
//! supervisor rebind only after every lane finished, and a lane can be
//! waiting out an ack deadline for a nak the leaderless consumer never
//! got — a 30 s stall of the whole room, measured in the cluster failover
//! test. Only a consumer that has had no leader for [`NO_LEADER_GRACE`]
//! ends the pull (the supervisor then binds again, creating it if gone).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use async_nats::{StatusCode, Subject};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;

/// How long pulls may find no consumer leader before the puller gives up
/// and lets the supervisor bind again: longer than a JetStream election
/// (Raft waits a few seconds before it elects, about 5 s measured).
pub const NO_LEADER_GRACE: Duration = Duration::from_secs(15);

/// The pause before pulling again after a pull found no consumer leader.
const NO_LEADER_RETRY: Duration = Duration::from_millis(250);

/// Why a [`Puller`] stopped: the consumer is gone or cannot be pulled.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot subscribe to the pull inbox: {0}")]
    Subscribe(String),
    #[error("cannot send a pull request: {0}")]
    Request(String),
    #[error("the pull inbox closed (connection closed)")]
    Closed,
    /// A status that ends pulling: the consumer deleted, push based, or a
    /// request the server will never accept.
    #[error("the server ended the pull: {0}")]
    Ended(String),
}

/// Pulls `batch` messages at a time from one consumer, with idle
/// heartbeats, re-pulling when half a batch is left.
pub struct Puller {
    client: async_nats::Client,
    context: jetstream::Context,
    subject: Subject,
    inbox: Subject,
    subscriber: async_nats::Subscriber,
    /// The batch each pull asks for now: between `min_batch` (the
    /// configured one) and `max_batch`, see [`Puller::adapt_batch`].
    batch: usize,
    min_batch: usize,
    max_batch: usize,
    /// A message came since the last pull (a first pull, or one after a
    /// reconnect, has none: it starts at the configured batch).
    delivered_since_pull: bool,
    expires: Duration,
    heartbeat: Duration,
    /// The priority group of a pinned consumer, and the pin the server gave.
    group: Option<String>,
    pin_id: Option<String>,
    /// The pull request's body, rebuilt only when the pin changes.
    request: Bytes,
    /// Messages requested and neither delivered nor released by a status.
    owed: usize,
    last_heard: Instant,
    /// Since when pulls have found no consumer leader (503), if they do.
    leaderless_since: Option<Instant>,
    /// No pull before this instant (set after a 503).
    pull_after: Option<Instant>,
}

impl Puller {
    /// A puller of `consumer`; `group` for a pinned consumer's priority
    /// group. Subscribes its inbox at once; the first pull goes out with
    /// the first [`Puller::next`].
    pub async fn new(
        context: &jetstream::Context,
        consumer: &PullConsumer,
        batch: usize,
        expires: Duration,
        heartbeat: Duration,
        group: Option<&str>,
    ) -> Result<Puller, PullError> {
        let client = context.client();
        let info = consumer.cached_info();
        // The runtime's contexts use the default API prefix (no JetStream
        // domain); async-nats keeps a context's prefix private.
        let subject = Subject::from(format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            info.stream_name, info.name
        ));
        let inbox = Subject::from(client.new_inbox());
        let subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|err| PullError::Subscribe(err.to_string()))?;
        let mut puller = Puller {
            client,
            context: context.clone(),
            subject,
            inbox,
            subscriber,
            batch: batch.max(1),
            min_batch: batch.max(1),
            max_batch: batch.max(1),
            delivered_since_pull: false,
            expires,
            heartbeat,
            group: group.map(str::to_string),
            pin_id: None,
            request: Bytes::new(),
            owed: 0,
            last_heard: Instant::now(),
            leaderless_since: None,
            pull_after: None,
        };
        puller.request = puller.build_request();
        Ok(puller)
    }

    /// Lets the batch grow up to `max_batch` while the consumer has a
    /// backlog (see [`Puller::adapt_batch`]).
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(self.min_batch);
        self
    }

    /// A batch that follows the backlog. Pulls used up by messages mean
    /// more wait on the server: the next pull asks for twice as many, up to
    /// `max_batch` (fewer pull requests per message, for the server and for
    /// us). Pulls that ran out (expired) with no message since the last one
    /// mean the backlog is gone: back to the configured batch. Latency is
    /// the same either way: a pull delivers each message as soon as it is
    /// stored.
    fn adapt_batch(&mut self) {
        let batch = if self.owed == 0 && !self.delivered_since_pull {
            self.min_batch
        } else {
            (self.batch * 2).min(self.max_batch)
        };
        self.delivered_since_pull = false;
        if batch != self.batch {
            self.batch = batch;
            self.request = self.build_request();
        }
    }

    /// The pin the server gave (or `None` when it went to another replica):
    /// later pulls carry it.
    fn set_pin(&mut self, pin_id: Option<String>) {
        if self.pin_id != pin_id {
            self.pin_id = pin_id;
            self.request = self.build_request();
        }
    }

    fn build_request(&self) -> Bytes {
        let mut request = serde_json::json!({
            "batch": self.batch,
            "expires": u64::try_from(self.expires.as_nanos()).unwrap_or(u64::MAX),
        });
        if !self.heartbeat.is_zero() {
            request["idle_heartbeat"] =
                serde_json::json!(u64::try_from(self.heartbeat.as_nanos()).unwrap_or(u64::MAX));
        }
        if let Some(group) = &self.group {
            request["group"] = serde_json::json!(group);
            if let Some(id) = &self.pin_id {
                request["id"] = serde_json::json!(id);
            }
        }
        Bytes::from(request.to_string())
    }

    /// Sends a pull and counts it before anything else is read.
    async fn pull(&mut self) -> Result<(), PullError> {
        self.client
            .publish_with_reply(
                self.subject.clone(),
                self.inbox.clone(),
                self.request.clone(),
            )
            .await
            .map_err(|err| PullError::Request(err.to_string()))?;
        self.owed += self.batch;
        Ok(())
    }

    /// The next message of the consumer, pulling as needed.
    pub async fn next(&mut self) -> Result<jetstream::Message, PullError> {
        loop {
            if self.owed <= self.batch / 2 {
                if let Some(after) = self.pull_after.take() {
                    tokio::time::sleep_until(after).await;
                }
                self.adapt_batch();
                self.pull().await?;
            }
            let silence = if self.heartbeat.is_zero() {
                self.expires
            } else {
                self.heartbeat.saturating_mul(2)
            };
            // A message already received is taken without arming the
            // silence timer: under load that is almost every message, and a
            // timer registered and cancelled for each was a cost the profile
            // showed.
            let ready = self.subscriber.next().now_or_never();
            let message = match ready {
                Some(message) => message,
                None => tokio::select! {
                    message = self.subscriber.next() => message,
                    _ = tokio::time::sleep_until(self.last_heard + silence) => {
                        // Neither a message nor a heartbeat for two
                        // heartbeats: the server holds no pull of ours (a
                        // restart, a new leader). Pull again in place.
                        tracing::debug!(owed = self.owed, "no heartbeat: pulling again");
                        self.owed = 0;
                        self.last_heard = Instant::now();
                        continue;
                    }
                },
            };
            let message = message.ok_or(PullError::Closed)?;
            self.last_heard = Instant::now();
            if let Some(message) = self.take(message)? {
                return Ok(message);
            }
        }
    }

    /// At a stop, for handing back: the messages already received, and
    /// those still on their way for the pulls made, until `grace` passes
    /// without one. A pull of a large batch keeps delivering after the
    /// last message was taken; left unread, those would wait out
    /// `ack_wait` before a replica (or a restart) got them. It waits only
    /// when messages were arriving (some already received): an idle
    /// consumer stops at once, and a message published after the
    /// stop is not taken only to be handed back.
    pub async fn drain(&mut self, grace: Duration) -> Vec<jetstream::Message> {
        let mut drained = Vec::new();
        while self.owed > 0 || drained.is_empty() {
            let message = match self.subscriber.next().now_or_never() {
                Some(message) => message,
                None if drained.is_empty() => break,
                None => match tokio::time::timeout(grace, self.subscriber.next()).await {
                    Ok(message) => message,
                    Err(_) => break,
                },
            };
            let Some(message) = message else { break };
            if let Ok(Some(message)) = self.take(message) {
                drained.push(message);
            }
        }
        drained
    }

    /// A delivery, or `None` for a status that only updates the count.
    fn take(
        &mut self,
        message: async_nats::Message,
    ) -> Result<Option<jetstream::Message>, PullError> {
        if let Some(status) = message.status
            && status != StatusCode::OK
            && status != StatusCode::IDLE_HEARTBEAT
        {
            tracing::debug!(
                %status,
                description = message.description.as_deref().unwrap_or_default(),
                owed = self.owed,
                "pull status"
            );
        }
        if message.status != Some(StatusCode::NO_RESPONDERS) {
            self.leaderless_since = None;
        }
        match message.status {
            None | Some(StatusCode::OK) => {
                self.owed = self.owed.saturating_sub(1);
                self.delivered_since_pull = true;
                if self.group.is_some()
                    && let Some(id) = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get_last(async_nats::header::NATS_PIN_ID))
                    && self.pin_id.as_deref() != Some(id.as_str())
                {
                    self.set_pin(Some(id.as_str().to_string()));
                }
                Ok(Some(jetstream::Message {
                    context: self.context.clone(),
                    message,
                }))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => Ok(None),
            Some(StatusCode::PIN_ID_MISMATCH) => {
                // Another replica holds the pin now: ask without an id.
                self.set_pin(None);
                self.owed = 0;
                Ok(None)
            }
            Some(StatusCode::TIMEOUT) | Some(StatusCode::REQUEST_TERMINATED) => {
                let description = message.description.as_deref().unwrap_or_default();
                if description.starts_with("Exceeded MaxRequest")
                    || description == "Consumer Deleted"
                    || description == "Consumer is push based"
                {
                    return Err(PullError::Ended(description.to_string()));
                }
                self.owed = match message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Pending-Messages"))
                    .and_then(|v| v.as_str().parse::<usize>().ok())
                {
                    Some(released) => self.owed.saturating_sub(released),
                    // Unknown: count the pulls as finished.
                    None => 0,
                };
                Ok(None)
            }
            Some(StatusCode::NOT_FOUND) => {
                self.owed = 0;
                Ok(None)
            }
            Some(StatusCode::NO_RESPONDERS) => {
                // No consumer leader took the pull: nothing is owed.
                self.owed = 0;
                let now = Instant::now();
                let since = *self.leaderless_since.get_or_insert(now);
                if now - since >= NO_LEADER_GRACE {
                    return Err(PullError::Ended(format!(
                        "no consumer leader answered pulls for {NO_LEADER_GRACE:?}"
                    )));
                }
                self.pull_after = Some(now + NO_LEADER_RETRY);
                Ok(None)
            }
            Some(status) => Err(PullError::Ended(format!(
                "status {status}: {}",
                message.description.unwrap_or_default()
            ))),
        }
    }
}
