//! Streams, consumers and the storage under buckets: created when missing,
//! checked for drift when present.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::cocoa_butter::config::{ConsumerConfig, NatsConfig, ReplicaOrdering, RoomSettings};
use crate::cocoa_butter::streams::{BucketStorage, StreamStorage};

use super::{BusError, Provisioned, unavailable};

/// The stream configuration the runtime creates for a domain or the DLQ.
fn stream_config(
    name: &str,
    subject: String,
    duplicate_window: Duration,
    storage: &StreamStorage,
) -> stream::Config {
    let mut config = stream::Config {
        name: name.to_string(),
        subjects: vec![subject],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        duplicate_window,
        ..Default::default()
    };
    storage.apply(&mut config);
    config
}

/// Makes sure `name` exists, captures `subject` and is kept as `storage`
/// says. What JetStream cannot change in place — storage type, retention
/// policy — is a conflict the runtime refuses to paper over, and so is a
/// subject change: the factory owns the subject layout, and silently
/// re-pointing a stream would strand whatever consumes the old subjects.
/// What it can change (replicas, limits, compression, placement, the
/// duplicate window) is drift: updated when `nats.provision` is on,
/// reported either way.
pub async fn ensure_stream(
    js: &jetstream::Context,
    nats: &NatsConfig,
    name: &str,
    subject: String,
    storage: &StreamStorage,
) -> Result<Provisioned, BusError> {
    match js.get_stream(name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(unavailable)?;
            let config = &info.config;
            if config.storage != stream::StorageType::File {
                return Err(BusError::StreamConflict {
                    stream: name.into(),
                    reason: format!(
                        "uses {:?} storage, the factory expects file storage (JetStream cannot \
                         change a stream's storage in place: move its messages to a new stream)",
                        config.storage
                    ),
                });
            }
            if config.retention != stream::RetentionPolicy::Limits {
                return Err(BusError::StreamConflict {
                    stream: name.into(),
                    reason: format!(
                        "has the {:?} retention policy, the factory expects Limits (JetStream \
                         cannot change a stream's retention policy in place)",
                        config.retention
                    ),
                });
            }
            if !config.subjects.iter().any(|s| s == &subject) {
                return Err(BusError::StreamConflict {
                    stream: name.into(),
                    reason: format!(
                        "captures {:?}, the factory expects it to capture {subject:?}",
                        config.subjects
                    ),
                });
            }
            if storage.replicas <= 1 {
                warn_if_unreplicated(name, info, storage);
            }
            let mut drift: Vec<String> = storage
                .drift(config)
                .iter()
                .map(ToString::to_string)
                .collect();
            if config.duplicate_window != nats.duplicate_window {
                drift.push(format!(
                    "nats.duplicate_window: {} → {}",
                    humantime::format_duration(config.duplicate_window),
                    humantime::format_duration(nats.duplicate_window)
                ));
            }
            if drift.is_empty() {
                return Ok(Provisioned::Present);
            }
            if !nats.provision {
                tracing::warn!(
                    stream = name,
                    drift = %drift.join("; "),
                    "stream settings differ from the configuration; nats.provision is false, \
                     keeping the server's"
                );
                return Ok(Provisioned::Drifted {
                    drift,
                    updated: false,
                });
            }
            let mut wanted = config.clone();
            storage.apply(&mut wanted);
            wanted.duplicate_window = nats.duplicate_window;
            resent_on_timeout(|| js.update_stream(&wanted))
                .await
                .map_err(|err| BusError::StreamSettings {
                    stream: name.into(),
                    key: storage.key.clone(),
                    reason: format!("updating {}: {err}", drift.join("; ")),
                })?;
            tracing::info!(stream = name, drift = %drift.join("; "), "stream settings updated");
            Ok(Provisioned::Drifted {
                drift,
                updated: true,
            })
        }
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            if !nats.provision {
                return Err(BusError::StreamMissing {
                    stream: name.into(),
                });
            }
            let config = stream_config(name, subject, nats.duplicate_window, storage);
            let created = resent_on_timeout(|| js.create_stream(config.clone()))
                .await
                .map_err(|err| BusError::StreamSettings {
                    stream: name.into(),
                    key: storage.key.clone(),
                    reason: format!("creating it with {} replica(s): {err}", storage.replicas),
                })?;
            tracing::info!(stream = name, replicas = storage.replicas, "created stream");
            warn_if_unreplicated(name, created.cached_info(), storage);
            Ok(Provisioned::Created)
        }
        Err(err) => Err(BusError::StreamUnavailable {
            stream: name.to_string(),
            source: err.into(),
        }),
    }
}

/// Sends a stream create or update again when it timed out, up to three
/// times in all. On a loaded cluster the meta leader can take longer than
/// `nats.request_timeout` to place a stream's replicas (seen creating an R3
/// stream while another moved from R1 to R3), and both requests are
/// idempotent: the same configuration sent again succeeds, created or not.
async fn resent_on_timeout<T, Request, Answer>(
    mut request: Request,
) -> Result<T, jetstream::context::CreateStreamError>
where
    Request: FnMut() -> Answer,
    Answer: std::future::Future<Output = Result<T, jetstream::context::CreateStreamError>>,
{
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        match request().await {
            Err(err)
                if attempt < ATTEMPTS
                    && matches!(
                        err.kind(),
                        jetstream::context::CreateStreamErrorKind::TimedOut
                    ) =>
            {
                tracing::debug!(attempt, "a stream request timed out; sending it again");
                attempt += 1;
            }
            answer => return answer,
        }
    }
}

/// A stream of one replica on a clustered JetStream (its info names the
/// cluster) lives on one server only: say what losing it would do.
fn warn_if_unreplicated(name: &str, info: &stream::Info, storage: &StreamStorage) {
    let Some(cluster) = &info.cluster else { return };
    if cluster.name.is_none() || info.config.num_replicas > 1 {
        return;
    }
    tracing::warn!(
        stream = name,
        cluster = cluster.name.as_deref().unwrap_or_default(),
        server = cluster.leader.as_deref().unwrap_or_default(),
        "stream has one replica on a clustered JetStream: while its server is down the rooms \
         on it stop, and losing that server's disk loses the stream; set {}.replicas = 3",
        storage.key
    );
}

/// [`ensure_bucket_storage`], where a failure to check or put right the
/// bucket's settings does not keep a working bucket from opening: it is
/// logged and reported as drift left in place.
pub(crate) async fn bucket_storage_or_report(
    js: &jetstream::Context,
    stream_name: &str,
    storage: &BucketStorage,
) -> Provisioned {
    match ensure_bucket_storage(js, stream_name, storage).await {
        Ok(found) => found,
        Err(reason) => {
            tracing::warn!(
                stream = stream_name,
                error = %reason,
                "cannot check or update the bucket's replicas and placement; using it as it is"
            );
            Provisioned::Drifted {
                drift: vec![reason],
                updated: false,
            }
        }
    }
}

/// Puts a bucket's stream (`KV_<bucket>`, `OBJ_<bucket>`) to the
/// configured replicas and placement, when provisioning; reports either way.
pub(crate) async fn ensure_bucket_storage(
    js: &jetstream::Context,
    stream_name: &str,
    storage: &BucketStorage,
) -> Result<Provisioned, String> {
    let mut stream = js
        .get_stream(stream_name)
        .await
        .map_err(|err| format!("{stream_name}: {err}"))?;
    let info = stream
        .info()
        .await
        .map_err(|err| format!("{stream_name}: {err}"))?;
    let drift: Vec<String> = storage
        .drift(&info.config)
        .iter()
        .map(ToString::to_string)
        .collect();
    if drift.is_empty() {
        return Ok(Provisioned::Present);
    }
    if !storage.provision {
        tracing::warn!(
            stream = stream_name,
            drift = %drift.join("; "),
            "bucket settings differ from the configuration; nats.provision is false, keeping the server's"
        );
        return Ok(Provisioned::Drifted {
            drift,
            updated: false,
        });
    }
    let mut wanted = info.config.clone();
    storage.apply(&mut wanted);
    js.update_stream(&wanted).await.map_err(|err| {
        format!(
            "{stream_name}: updating {} (streams.buckets): {err}",
            drift.join("; ")
        )
    })?;
    tracing::info!(stream = stream_name, drift = %drift.join("; "), "bucket settings updated");
    Ok(Provisioned::Drifted {
        drift,
        updated: true,
    })
}

/// The durable pull consumer a room reads its prefix through.
pub fn consumer_config(room: &RoomSettings) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(room.durable_name.clone()),
        description: Some(format!("{} ({})", room.service, room.label)),
        filter_subject: room.subject_prefix.clone(),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: room.consumer.ack_wait,
        max_deliver: room.consumer.max_deliver,
        max_ack_pending: match room.consumer.ordering {
            ReplicaOrdering::PerProcess => room.consumer.max_ack_pending,
            // One replica receives at a time, so the server-side bound can
            // be the replica's own: then a delivered message always finds a
            // slot soon, and the replica never stops polling its pulls
            // (which would let its pin lapse) for want of one.
            ReplicaOrdering::Pinned => room
                .consumer
                .max_ack_pending
                .min(i64::try_from(room.consumer.max_in_flight).unwrap_or(i64::MAX)),
        },
        ..pinning(&room.consumer)
    }
}

/// The priority group pinned consumers are pulled through; one per consumer.
pub const PINNED_GROUP: &str = "replicas";

/// The priority-group part of a consumer's configuration.
fn pinning(consumer: &ConsumerConfig) -> consumer::pull::Config {
    match consumer.ordering {
        ReplicaOrdering::PerProcess => consumer::pull::Config::default(),
        ReplicaOrdering::Pinned => consumer::pull::Config {
            priority_policy: consumer::PriorityPolicy::PinnedClient,
            priority_groups: vec![PINNED_GROUP.to_string()],
            priority_timeout: consumer.pinned_ttl,
            ..Default::default()
        },
    }
}

/// Differences between the consumer on the server and the configured one,
/// as `field: server → configured`.
fn consumer_drift(actual: &consumer::Config, wanted: &consumer::pull::Config) -> Vec<String> {
    let mut drift = Vec::new();
    if actual.filter_subject != wanted.filter_subject {
        drift.push(format!(
            "filter_subject: {:?} → {:?}",
            actual.filter_subject, wanted.filter_subject
        ));
    }
    if actual.ack_wait != wanted.ack_wait {
        drift.push(format!(
            "ack_wait: {:?} → {:?}",
            actual.ack_wait, wanted.ack_wait
        ));
    }
    if actual.max_deliver != wanted.max_deliver {
        drift.push(format!(
            "max_deliver: {} → {}",
            actual.max_deliver, wanted.max_deliver
        ));
    }
    if actual.max_ack_pending != wanted.max_ack_pending {
        drift.push(format!(
            "max_ack_pending: {} → {}",
            actual.max_ack_pending, wanted.max_ack_pending
        ));
    }
    if actual.priority_policy != wanted.priority_policy
        || actual.priority_groups != wanted.priority_groups
    {
        drift.push(format!(
            "priority: {:?} {:?} → {:?} {:?}",
            actual.priority_policy,
            actual.priority_groups,
            wanted.priority_policy,
            wanted.priority_groups
        ));
    }
    if actual.priority_timeout != wanted.priority_timeout {
        drift.push(format!(
            "priority_timeout: {:?} → {:?}",
            actual.priority_timeout, wanted.priority_timeout
        ));
    }
    drift
}

/// Whether [`ensure_consumer`] may switch a consumer between the two
/// orderings. Only an operator's `streams ensure` does: a runtime switching
/// it at start would fight the replicas still running the other ordering
/// (their pulls fail against the new policy, they rebind and switch back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderingChange {
    Apply,
    /// Keep the server's ordering and follow it; warn that it differs.
    Follow,
}

/// A server before 2.11 accepts a consumer with a priority policy and
/// silently drops it: pinned ordering would then hold nothing.
fn kept_priority(
    consumer: &consumer::Consumer<consumer::pull::Config>,
    wanted: &consumer::pull::Config,
) -> Result<(), String> {
    if consumer.cached_info().config.priority_policy == wanted.priority_policy {
        Ok(())
    } else {
        Err(format!(
            "the server did not keep the priority policy {:?} (consumer.ordering = \"pinned\" needs nats-server 2.11 or later)",
            wanted.priority_policy
        ))
    }
}

/// Binds the room's durable consumer, made sure of by [`ensure_consumer`].
/// The consumer keeps the ordering it has on the server.
pub async fn bind_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    room: &RoomSettings,
) -> Result<consumer::PullConsumer, BusError> {
    let (_, stream) = provision_consumer(js, nats, room, OrderingChange::Follow).await?;
    stream
        .get_consumer(&room.durable_name)
        .await
        .map_err(unavailable)
}

/// Makes sure of the room's durable consumer: created when missing (with
/// `provision`), compared with the configuration when present. Drift is
/// updated on the server with `provision`, and reported either way.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    room: &RoomSettings,
    ordering: OrderingChange,
) -> Result<Provisioned, BusError> {
    Ok(provision_consumer(js, nats, room, ordering).await?.0)
}

/// [`ensure_consumer`], also handing back the stream it looked up, so that
/// binding does not ask the server for it again.
async fn provision_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    room: &RoomSettings,
    ordering: OrderingChange,
) -> Result<(Provisioned, jetstream::stream::Stream), BusError> {
    let stream = js.get_stream(&room.stream).await.map_err(unavailable)?;
    let mut wanted = consumer_config(room);
    let conflict = |reason: String| BusError::ConsumerConflict {
        stream: room.stream.clone(),
        consumer: room.durable_name.clone(),
        reason,
    };
    match stream.consumer_info(&room.durable_name).await {
        Ok(info) => {
            if info.config.ack_policy != consumer::AckPolicy::Explicit {
                return Err(conflict("is not an explicit-ack consumer".into()));
            }
            if info.config.deliver_subject.is_some() {
                return Err(conflict(
                    "is a push consumer; the room needs a pull consumer".into(),
                ));
            }
            let server_pinned =
                info.config.priority_policy == consumer::PriorityPolicy::PinnedClient;
            let configured_pinned = room.consumer.ordering == ReplicaOrdering::Pinned;
            if ordering == OrderingChange::Follow && server_pinned != configured_pinned {
                tracing::warn!(
                    consumer = %room.durable_name,
                    server = if server_pinned { "pinned" } else { "per_process" },
                    configured = ?room.consumer.ordering,
                    "the consumer's ordering on the server differs from the configuration; \
                     following the server's until `choco-factory streams ensure` switches it"
                );
                let mut effective = room.clone();
                effective.consumer.ordering = if server_pinned {
                    ReplicaOrdering::Pinned
                } else {
                    ReplicaOrdering::PerProcess
                };
                effective.consumer.pinned_ttl = info.config.priority_timeout;
                wanted = consumer_config(&effective);
            }
            let drift = consumer_drift(&info.config, &wanted);
            if drift.is_empty() {
                return Ok((Provisioned::Present, stream));
            }
            if nats.provision {
                stream
                    .update_consumer(wanted.clone())
                    .await
                    .map_err(|err| conflict(format!("cannot update drifted settings: {err}")))
                    .and_then(|updated| kept_priority(&updated, &wanted).map_err(conflict))?;
                tracing::warn!(drift = ?drift, consumer = %room.durable_name, "consumer settings drifted; updated them on the server");
            } else {
                tracing::error!(drift = ?drift, consumer = %room.durable_name, "consumer settings differ from the configuration and nats.provision is false; running with the server's");
            }
            Ok((
                Provisioned::Drifted {
                    drift,
                    updated: nats.provision,
                },
                stream,
            ))
        }
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::ConsumerInfoErrorKind::NotFound
            ) || matches!(err.kind(), jetstream::context::ConsumerInfoErrorKind::JetStream(ref js_err)
                    if js_err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
        {
            if !nats.provision {
                return Err(BusError::ConsumerMissing {
                    stream: room.stream.clone(),
                    consumer: room.durable_name.clone(),
                });
            }
            stream
                .create_consumer(wanted.clone())
                .await
                .map_err(|err| conflict(err.to_string()))
                .and_then(|created| kept_priority(&created, &wanted).map_err(conflict))?;
            tracing::info!(consumer = %room.durable_name, stream = %room.stream, "created consumer");
            Ok((Provisioned::Created, stream))
        }
        Err(err) => Err(unavailable(err)),
    }
}
