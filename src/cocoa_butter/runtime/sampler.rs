//! What the runtime samples of a room's stream and consumer every few
//! seconds: lag, replication, leader changes, removals by the limits, the
//! dead-letter count.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::cocoa_butter::consumer::Engine;
use crate::cocoa_butter::dlq::{self};
use crate::cocoa_butter::nats::{self};

/// How often the consumer's lag and the room's dead letters are read from
/// the server.
pub(super) const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Copies the consumer's pending, ack-pending and redelivered counts from
/// the server into the room's gauges, and the room's dead-letter count into
/// its state, until `stop`. A failed read leaves the last values: the lag
/// of a room that cannot reach NATS is unknown, and `choco_nats_connected`
/// already says so.
pub(super) async fn sample_lag(
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
