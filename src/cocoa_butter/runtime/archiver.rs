//! The archiver: one archived stream's messages, pulled in stream order
//! through its own durable consumer, written segment by segment to the
//! archive (the steps and why they are safe: `archive/mod.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cocoa_butter::archive::segment::{ArchivedEvent, Manifest, SegmentBuilder};
use crate::cocoa_butter::archive::{
    ARCHIVE_BUCKET, ARCHIVE_CONSUMER, ArchiveConfig, ArchiveError, ArchiveStore,
};
use crate::cocoa_butter::metrics::{ArchiveMetrics, DomainLabels, SegmentLabels};
use crate::cocoa_butter::nats::pull::Puller;
use crate::cocoa_butter::nats::{KvBucket, PINNED_GROUP};
use crate::cocoa_butter::streams::BucketStorage;

/// The range of a segment being written, recorded before its object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct OpenRange {
    first: u64,
    last: u64,
}

/// The archive consumer of a stream: every message from the first, acked
/// a segment at a time ("all"), never dead-lettered, one archiver pinned.
pub fn consumer_config(config: &ArchiveConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(ARCHIVE_CONSUMER.to_string()),
        description: Some("choco-factory archive: every message, in stream order".into()),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::All,
        ack_wait: config.ack_wait,
        max_deliver: -1,
        max_ack_pending: i64::try_from(config.segment_max_events.saturating_mul(2))
            .unwrap_or(i64::MAX),
        priority_policy: consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec![PINNED_GROUP.to_string()],
        priority_timeout: config.ack_wait,
        ..Default::default()
    }
}

/// One archived stream.
pub struct Archiver {
    pub domain: String,
    pub stream: String,
    pub js: jetstream::Context,
    pub store: ArchiveStore,
    pub config: ArchiveConfig,
    pub buckets: BucketStorage,
    /// `[consumer]`: the pulls' heartbeat and expiry follow the rooms'.
    pub consumer: crate::cocoa_butter::config::ConsumerConfig,
    pub metrics: ArchiveMetrics,
}

/// A segment being filled, with the messages to ack once it is written.
struct Filling {
    builder: SegmentBuilder,
    started: Instant,
    messages: Vec<jetstream::Message>,
}

impl Archiver {
    /// Archives until `intake` is cancelled; an error (NATS gone, the
    /// consumer deleted) returns for the caller to retry. A segment not
    /// written when it stops is left unacked: the next archiver writes it.
    pub async fn run(&self, intake: &CancellationToken) -> Result<(), ArchiveError> {
        let ranges = KvBucket::new(
            self.js.clone(),
            ARCHIVE_BUCKET,
            "choco-factory archive: the range of each segment being written",
            self.buckets.clone(),
        );
        ranges.ensure().await.map_err(ArchiveError::bus)?;
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(ArchiveError::bus)?;
        let consumer = stream
            .get_or_create_consumer(ARCHIVE_CONSUMER, consumer_config(&self.config))
            .await
            .map_err(ArchiveError::bus)?;
        let (mut last_chunk, mut open) = self.where_the_archive_is(&ranges).await?;
        let batch = self.config.segment_max_events.clamp(1, 256);
        let mut messages = Puller::new(
            &self.js,
            &consumer,
            batch,
            self.consumer.pull_expiry(Some(self.config.ack_wait)),
            self.consumer.heartbeat,
            Some(PINNED_GROUP),
        )
        .await
        .map_err(ArchiveError::bus)?;
        tracing::info!(archived_to = last_chunk.last(), "archiving");
        self.metrics.set_not_ready(&self.domain, None);
        self.sample_lag(&stream).await;

        let mut filling: Option<Filling> = None;
        // The next sequence to archive. Messages can arrive out of order:
        // after a restart the consumer delivers new messages at once and
        // those the dead process held only after their ack wait. Since
        // acking a segment's last message acks everything before it ("all"),
        // a segment must never be closed over a sequence not yet in the
        // archive: later ones wait here until the missing ones come.
        let mut next = last_chunk.last() + 1;
        let mut waiting: BTreeMap<u64, (ArchivedEvent, jetstream::Message)> = BTreeMap::new();
        let mut gap_since: Option<Instant> = None;
        loop {
            let age_limit = filling
                .as_ref()
                .filter(|_| open.is_none())
                .map(|f| f.started + self.config.segment_max_age);
            let gap_check = gap_since.map(|since| since + self.config.ack_wait * 2);
            let message = tokio::select! {
                _ = intake.cancelled() => return Ok(()),
                _ = sleep_until(age_limit) => None,
                _ = sleep_until(gap_check) => {
                    next = self.past_removed(&stream, next).await?;
                    gap_since = Some(Instant::now());
                    None
                }
                message = messages.next() => Some(message.map_err(ArchiveError::bus)?),
            };
            if let Some(message) = message {
                let info = message.info().map_err(ArchiveError::bus)?;
                let seq = info.stream_sequence;
                if filling.is_none() && waiting.is_empty() && seq != next {
                    // Not the message expected, with nothing in hand: another
                    // archiver had the pin (this one stood by) and wrote
                    // meanwhile. The storage says where the archive is.
                    (last_chunk, open) = self.where_the_archive_is(&ranges).await?;
                    next = last_chunk.last() + 1;
                }
                if seq <= last_chunk.last() {
                    // Archived already (the process died before the ack).
                    let _ = message.ack().await;
                    continue;
                }
                if seq < next || waiting.contains_key(&seq) {
                    // A redelivery of one the segment or the queue holds.
                    continue;
                }
                let stored_at = chrono::DateTime::from_timestamp(
                    info.published.unix_timestamp(),
                    info.published.nanosecond(),
                )
                .unwrap_or_default();
                let event = ArchivedEvent::new(
                    seq,
                    message.subject.as_str(),
                    stored_at,
                    headers_of(&message),
                    &message.payload,
                );
                waiting.insert(seq, (event, message));
            }
            // Into the segment in sequence order, closing it when full.
            let mut closed = false;
            loop {
                let Some((event, message)) = waiting.remove(&next) else {
                    break;
                };
                next += 1;
                let segment = filling.get_or_insert_with(|| Filling {
                    builder: SegmentBuilder::new(&event),
                    started: Instant::now(),
                    messages: Vec::new(),
                });
                segment.builder.push(&event).map_err(ArchiveError::io)?;
                segment.messages.push(message);
                let full = match open {
                    // A range recorded before a restart is rebuilt exactly.
                    Some(range) => segment.builder.last >= range.last,
                    None => {
                        segment.builder.events >= self.config.segment_max_events
                            || segment.builder.raw_bytes >= self.config.segment_max_bytes
                    }
                };
                if full && let Some(segment) = filling.take() {
                    if !self
                        .close(&stream, segment, &ranges, &mut last_chunk, intake)
                        .await?
                    {
                        return Ok(());
                    }
                    open = None;
                    closed = true;
                }
            }
            gap_since = match (waiting.is_empty(), gap_since) {
                (true, _) => None,
                (false, None) => Some(Instant::now()),
                (false, since) => since,
            };
            // The age limit passed with nothing new: close what there is.
            let aged = age_limit.is_some_and(|limit| Instant::now() >= limit);
            if !closed
                && aged
                && let Some(segment) = filling.take()
            {
                if !self
                    .close(&stream, segment, &ranges, &mut last_chunk, intake)
                    .await?
                {
                    return Ok(());
                }
                open = None;
            }
        }
    }

    /// `next` if the stream still has it, else the stream's first sequence:
    /// messages the stream's limits removed before they were archived are
    /// skipped (a gap `archive verify` names) rather than waited for.
    async fn past_removed(
        &self,
        stream: &jetstream::stream::Stream,
        next: u64,
    ) -> Result<u64, ArchiveError> {
        let first = stream
            .get_info()
            .await
            .map_err(ArchiveError::bus)?
            .state
            .first_sequence;
        if first > next {
            tracing::warn!(
                missing_from = next,
                missing_to = first - 1,
                "messages left the stream before they were archived; the archive has a gap"
            );
            return Ok(first);
        }
        Ok(next)
    }

    /// The manifest's last chunk as stored, and the range of a segment being written
    /// when the last archiver stopped (none when that segment was written
    /// and listed, and the archiver died before it said so).
    async fn where_the_archive_is(
        &self,
        ranges: &KvBucket,
    ) -> Result<(Manifest, Option<OpenRange>), ArchiveError> {
        let last_chunk = self
            .store
            .last_manifest_chunk(&self.domain, &self.stream)
            .await?;
        let open = self.open_range(ranges).await?;
        if let Some(range) = open
            && last_chunk
                .segments
                .iter()
                .any(|s| s.first == range.first && s.last == range.last)
        {
            self.clear_range(ranges).await?;
            return Ok((last_chunk, None));
        }
        Ok((last_chunk, open))
    }

    async fn open_range(&self, ranges: &KvBucket) -> Result<Option<OpenRange>, ArchiveError> {
        let store = ranges.store().map_err(ArchiveError::bus)?;
        match store
            .get(self.domain.clone())
            .await
            .map_err(ArchiveError::bus)?
        {
            Some(bytes) if !bytes.is_empty() => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|err| ArchiveError::Corrupt {
                        key: format!("{ARCHIVE_BUCKET}/{}", self.domain),
                        reason: err.to_string(),
                    })
            }
            _ => Ok(None),
        }
    }

    async fn clear_range(&self, ranges: &KvBucket) -> Result<(), ArchiveError> {
        let store = ranges.store().map_err(ArchiveError::bus)?;
        store
            .put(&self.domain, Bytes::new())
            .await
            .map_err(ArchiveError::bus)?;
        Ok(())
    }

    /// Writes a full segment (steps 1–5 above), holding while storage
    /// fails: the messages kept alive, nothing acked, retried with backoff.
    /// `false` when the runtime stopped meanwhile.
    async fn close(
        &self,
        stream: &jetstream::stream::Stream,
        segment: Filling,
        ranges: &KvBucket,
        last_chunk: &mut Manifest,
        intake: &CancellationToken,
    ) -> Result<bool, ArchiveError> {
        let range = OpenRange {
            first: segment.builder.first,
            last: segment.builder.last,
        };
        let store = ranges.store().map_err(ArchiveError::bus)?;
        let recorded = serde_json::to_vec(&range).map_err(ArchiveError::io)?;
        store
            .put(&self.domain, Bytes::from(recorded))
            .await
            .map_err(ArchiveError::bus)?;
        let (entry, bytes) = segment
            .builder
            .finish(&self.domain)
            .map_err(ArchiveError::io)?;
        // Only the manifest's last chunk is held and rewritten: a write
        // costs the same on the first day as after years of archive.
        let updated = last_chunk.with_segment(entry.clone());
        let mut delay = Duration::from_millis(200);
        let mut last_keepalive = Instant::now();
        let mut failures: u32 = 0;
        loop {
            let written = async {
                self.store.put(&entry.key, bytes.clone()).await?;
                self.store.put_manifest_chunk(&updated).await
            };
            match written.await {
                Ok(()) => break,
                Err(err) => {
                    failures += 1;
                    self.segment_counter("failed").inc();
                    self.gauge(&self.metrics.holding).set(1);
                    self.metrics.set_not_ready(
                        &self.domain,
                        Some(format!("cannot write the archive: {err}")),
                    );
                    // One line per doubling of the failures: a storage
                    // outage does not flood the log.
                    if failures.is_power_of_two() {
                        tracing::warn!(
                            segment = %entry.key,
                            error = %err,
                            failures,
                            "cannot write the archive; holding (nothing acked, the stream keeps the backlog)"
                        );
                    }
                }
            }
            self.sample_lag(stream).await;
            if last_keepalive.elapsed() >= self.config.ack_wait / 3 {
                for message in &segment.messages {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                last_keepalive = Instant::now();
            }
            tokio::select! {
                _ = intake.cancelled() => return Ok(false),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        if let Some(last) = segment.messages.last() {
            last.double_ack().await.map_err(ArchiveError::bus)?;
        }
        *last_chunk = updated;
        self.clear_range(ranges).await?;
        self.segment_counter("written").inc();
        self.metrics
            .bytes
            .get_or_create(&self.labels())
            .inc_by(entry.bytes as u64);
        self.gauge(&self.metrics.holding).set(0);
        self.metrics.set_not_ready(&self.domain, None);
        self.gauge(&self.metrics.archived)
            .set(i64::try_from(entry.last).unwrap_or(i64::MAX));
        self.sample_lag(stream).await;
        tracing::debug!(segment = %entry.key, events = entry.events, "segment archived");
        Ok(true)
    }
}

impl Archiver {
    /// The lag as the server counts it: the archive consumer's messages not
    /// yet delivered plus those delivered and not acked (a segment is acked
    /// once written). Left as it was when the server does not answer.
    async fn sample_lag(&self, stream: &jetstream::stream::Stream) {
        if let Ok(info) = stream.consumer_info(ARCHIVE_CONSUMER).await {
            let lag = info.num_pending.saturating_add(info.num_ack_pending as u64);
            self.gauge(&self.metrics.lag)
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
    }

    fn labels(&self) -> DomainLabels {
        DomainLabels {
            domain: self.domain.clone(),
        }
    }

    fn gauge(
        &self,
        family: &prometheus_client::metrics::family::Family<
            DomainLabels,
            prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>,
        >,
    ) -> prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64> {
        family.get_or_create(&self.labels()).clone()
    }

    fn segment_counter(
        &self,
        outcome: &'static str,
    ) -> prometheus_client::metrics::counter::Counter {
        self.metrics
            .segments
            .get_or_create(&SegmentLabels {
                domain: self.domain.clone(),
                outcome,
            })
            .clone()
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn headers_of(message: &jetstream::Message) -> BTreeMap<String, String> {
    message
        .headers
        .as_ref()
        .map(|headers| {
            headers
                .iter()
                .filter_map(|(name, values)| {
                    Some((name.to_string(), values.last()?.as_str().to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs an archiver until shutdown, starting it again after each failure
/// (NATS unreachable, the stream not created yet, the consumer deleted),
/// with a growing delay.
pub async fn supervise_archiver(archiver: Archiver, intake: CancellationToken) {
    let mut delay = Duration::from_millis(250);
    loop {
        match archiver.run(&intake).await {
            Ok(()) => return,
            Err(err) => {
                archiver
                    .metrics
                    .set_not_ready(&archiver.domain, Some(format!("stopped: {err}")));
                tracing::warn!(error = %err, retry_in = ?delay, "the archiver stopped; starting it again");
            }
        }
        tokio::select! {
            _ = intake.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Starts an archiver for every domain `[archive]` lists, under `tasks`.
pub fn start_archivers(
    config: &crate::cocoa_butter::config::ValidatedConfig,
    js: &jetstream::Context,
    tasks: &tokio_util::task::TaskTracker,
    intake: &CancellationToken,
    metrics: &ArchiveMetrics,
) -> Result<(), ArchiveError> {
    let archive = &config.factory.archive;
    if !archive.enabled() {
        return Ok(());
    }
    let store = ArchiveStore::open(archive)?;
    for domain in &archive.domains {
        // Validation refused a domain no room has.
        let Some(room) = config.rooms.iter().find(|room| &room.domain == domain) else {
            continue;
        };
        let archiver = Archiver {
            domain: domain.clone(),
            stream: room.stream.clone(),
            js: js.clone(),
            store: store.clone(),
            config: archive.clone(),
            buckets: config.bucket_storage.clone(),
            consumer: config.factory.consumer.clone(),
            metrics: metrics.clone(),
        };
        metrics.init(domain);
        let span = tracing::info_span!("archiver", domain = %domain);
        tasks.spawn(tracing::Instrument::instrument(
            supervise_archiver(archiver, intake.clone()),
            span,
        ));
    }
    tracing::info!(domains = %archive.domains.join(", "), store = ?store, "archive on");
    Ok(())
}
