//! The dead-letter stream, the whole of its format: writing a dead letter
//! (the consumer engine's last resort), then working the stream: list,
//! show, replay, purge.
//!
//! Dead letters keep the original body and say where it came from in
//! `Choco-Dlq-*` headers ([`dlq_headers`]). A replay publishes the
//! body again to its original subject with a fresh `Nats-Msg-Id`, so the
//! room sees it as new, and records the replay in the key-value bucket
//! `choco_dlq_replays` (dead letters themselves are immutable).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use super::config::NatsConfig;
use super::envelope::EventEnvelope;
use super::nats::{BusError, KvBucket, PublishError, header_safe};
use crate::cocoa_butter::streams::{BucketStorage, StreamStorage};

/// Header on a replayed message naming the dead letter it came from.
pub const REPLAYED_FROM: &str = "Choco-Replayed-From";
const REPLAYS_BUCKET: &str = "choco_dlq_replays";

/// Why a message was dead-lettered: its `Choco-Dlq-Reason` header and the
/// `reason` label of `choco_consumer_dlq_messages_total`. A closed set per
/// room, the runtime's ([`reason::RUNTIME`]) and those the room declares
/// (`Room::dead_letter_reasons`), so that the metric's series are known
/// (and exist at 0) from the start, and a reason is a name a dashboard can
/// rely on rather than any string a handler made up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(&'static str);

impl Reason {
    /// A reason named `name`: stable, snake_case.
    pub const fn new(name: &'static str) -> Self {
        Reason(name)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The reasons the runtime itself dead-letters with, whatever the room.
pub mod reason {
    use super::Reason;

    /// Larger than `limits.max_envelope_bytes`; refused unread.
    pub const ENVELOPE_TOO_LARGE: Reason = Reason::new("envelope_too_large");
    /// Not an input of the room (nor one of its outputs coming back).
    pub const UNKNOWN_EVENT_TYPE: Reason = Reason::new("unknown_event_type");
    /// The envelope's `event_type` is not the one its subject says.
    pub const EVENT_TYPE_MISMATCH: Reason = Reason::new("event_type_mismatch");
    /// Not an envelope at all.
    pub const MALFORMED_ENVELOPE: Reason = Reason::new("malformed_envelope");
    /// The payload does not hash to the envelope's `content_hash`.
    pub const CONTENT_HASH_MISMATCH: Reason = Reason::new("content_hash_mismatch");
    /// A `schema_version` of another major version.
    pub const UNSUPPORTED_SCHEMA_VERSION: Reason = Reason::new("unsupported_schema_version");
    /// The payload is not JSON, or not what the room's input type says.
    pub const PAYLOAD_INVALID: Reason = Reason::new("payload_invalid");
    /// The handler panicked.
    pub const HANDLER_PANIC: Reason = Reason::new("handler_panic");
    /// The handler outlived `consumer.handler_timeout` on the last delivery.
    pub const HANDLER_TIMEOUT: Reason = Reason::new("handler_timeout");
    /// A transient failure on the last delivery (`consumer.max_deliver`).
    pub const MAX_DELIVERIES_EXCEEDED: Reason = Reason::new("max_deliveries_exceeded");
    /// The handler returned an output its room does not declare (a bug of
    /// the room): nothing is published, so nobody downstream receives an
    /// event no contract names.
    pub const UNDECLARED_OUTPUT: Reason = Reason::new("undeclared_output");

    /// Every reason above.
    pub const RUNTIME: &[Reason] = &[
        ENVELOPE_TOO_LARGE,
        UNKNOWN_EVENT_TYPE,
        EVENT_TYPE_MISMATCH,
        MALFORMED_ENVELOPE,
        CONTENT_HASH_MISMATCH,
        UNSUPPORTED_SCHEMA_VERSION,
        PAYLOAD_INVALID,
        HANDLER_PANIC,
        HANDLER_TIMEOUT,
        MAX_DELIVERIES_EXCEEDED,
        UNDECLARED_OUTPUT,
    ];
}

/// Headers the runtime writes on every dead letter.
pub mod dlq_headers {
    pub const REASON: &str = "Choco-Dlq-Reason";
    pub const DETAIL: &str = "Choco-Dlq-Detail";
    pub const ROOM: &str = "Choco-Dlq-Room";
    pub const DELIVERIES: &str = "Choco-Dlq-Deliveries";
    pub const ORIGINAL_SUBJECT: &str = "Choco-Dlq-Original-Subject";
    pub const ORIGINAL_STREAM: &str = "Choco-Dlq-Original-Stream";
    pub const ORIGINAL_SEQUENCE: &str = "Choco-Dlq-Original-Sequence";
}

/// Where a dead letter came from and why it is dead.
pub struct DeadLetter<'a> {
    pub room: &'a str,
    pub event_type: &'a str,
    pub reason: &'a str,
    pub detail: &'a str,
    pub deliveries: i64,
    pub original_subject: &'a str,
    pub original_stream: &'a str,
    pub original_sequence: u64,
    pub body: Bytes,
}

/// Moves a message to the dead-letter stream with its body unchanged. The
/// message id is the original's stream position, so dead-lettering the same
/// delivery twice stores it once.
pub async fn publish_dead_letter(
    js: &jetstream::Context,
    nats: &NatsConfig,
    letter: DeadLetter<'_>,
) -> Result<(), PublishError> {
    let subject = format!(
        "{}.{}.{}",
        nats.dlq_subject_prefix, letter.room, letter.event_type
    );
    let mut headers = HeaderMap::new();
    headers.insert(dlq_headers::REASON, letter.reason);
    headers.insert(dlq_headers::DETAIL, header_safe(letter.detail));
    headers.insert(dlq_headers::ROOM, letter.room);
    headers.insert(
        dlq_headers::DELIVERIES,
        letter.deliveries.to_string().as_str(),
    );
    headers.insert(dlq_headers::ORIGINAL_SUBJECT, letter.original_subject);
    headers.insert(dlq_headers::ORIGINAL_STREAM, letter.original_stream);
    headers.insert(
        dlq_headers::ORIGINAL_SEQUENCE,
        letter.original_sequence.to_string().as_str(),
    );
    let message = jetstream::message::PublishMessage::build()
        .payload(letter.body)
        .headers(headers)
        .message_id(format!(
            "dlq:{}:{}",
            letter.original_stream, letter.original_sequence
        ));
    js.send_publish(subject.clone(), message)
        .await
        .map_err(|err| PublishError::from_kind(subject.clone(), &err))?
        .await
        .map_err(|err| PublishError::from_kind(subject.clone(), &err))?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("no dead letter at sequence {0}")]
    NotFound(u64),
    #[error("dead letter {sequence} has no {header} header; it cannot be replayed")]
    NotReplayable { sequence: u64, header: &'static str },
    /// A sequence asked for within one room that is another room's.
    #[error("no dead letter of {room} at sequence {sequence}")]
    OtherRoom { sequence: u64, room: String },
}

fn unavailable(err: impl Into<super::nats::BoxError>) -> DlqError {
    DlqError::Bus(BusError::Unavailable(err.into()))
}

/// One dead letter, decoded for people.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterRecord {
    pub sequence: u64,
    /// When it was dead-lettered (RFC 3339).
    pub time: String,
    #[serde(skip)]
    pub unix_time: i64,
    pub subject: String,
    pub room: String,
    pub event_type: String,
    pub reason: String,
    pub detail: String,
    /// Deliveries the room made before giving up (absent on a dead letter
    /// written before the header existed).
    pub deliveries: Option<u64>,
    pub original_subject: String,
    pub original_sequence: Option<u64>,
    /// From the envelope, when the body is one.
    pub aggregate_id: Option<String>,
    pub replayed: bool,
    #[serde(skip)]
    pub body: Bytes,
}

impl DeadLetterRecord {
    fn new(
        sequence: u64,
        subject: &str,
        headers: Option<&HeaderMap>,
        body: Bytes,
        unix_time: i64,
        prefix: &str,
    ) -> Self {
        let header = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        // choco.dlq.<room>.<event_type>
        let rest = subject
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('.'))
            .unwrap_or(subject);
        let (room, event_type) = rest.split_once('.').unwrap_or((rest, ""));
        DeadLetterRecord {
            sequence,
            time: chrono::DateTime::from_timestamp(unix_time, 0)
                .map(|t| crate::cocoa_butter::envelope::rfc3339(&t))
                .unwrap_or_default(),
            unix_time,
            subject: subject.to_string(),
            room: room.to_string(),
            event_type: event_type.to_string(),
            reason: header(dlq_headers::REASON),
            detail: header(dlq_headers::DETAIL),
            deliveries: header(dlq_headers::DELIVERIES).parse().ok(),
            original_subject: header(dlq_headers::ORIGINAL_SUBJECT),
            original_sequence: header(dlq_headers::ORIGINAL_SEQUENCE).parse().ok(),
            aggregate_id: EventEnvelope::decode(&body).ok().map(|e| e.aggregate_id),
            replayed: false,
            body,
        }
    }

    /// The body as an envelope with its payload as JSON, or why not.
    pub fn decoded(&self) -> serde_json::Value {
        match serde_json::from_slice::<serde_json::Value>(&self.body) {
            Ok(mut json) => {
                if let Ok(envelope) = EventEnvelope::decode(&self.body)
                    && let Ok(payload) =
                        serde_json::from_slice::<serde_json::Value>(&envelope.payload)
                {
                    json["payload"] = payload;
                }
                json
            }
            Err(_) => serde_json::Value::String(String::from_utf8_lossy(&self.body).into_owned()),
        }
    }
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    pub room: Option<String>,
    pub reason: Option<String>,
    /// Only those dead-lettered within this long ago.
    pub since: Option<Duration>,
}

impl DlqFilter {
    fn matches(&self, record: &DeadLetterRecord) -> bool {
        let since_ok = self.since.is_none_or(|since| {
            let cutoff = chrono::Utc::now().timestamp() - since.as_secs() as i64;
            record.unix_time >= cutoff
        });
        self.reason.as_ref().is_none_or(|r| *r == record.reason) && since_ok
    }
}

/// One dead letter sent again.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub sequence: u64,
    pub subject: String,
    /// Its stream sequence as a new message.
    pub new_sequence: u64,
}

/// How many dead letters `room` has in the DLQ stream, from the stream's
/// per-subject counts (`<prefix>.<room>.>`): one JetStream request per page
/// of event types, without reading any message.
pub async fn count_for_room(
    js: &jetstream::Context,
    nats: &NatsConfig,
    room: &str,
) -> Result<u64, DlqError> {
    let stream = match js.get_stream(&nats.dlq_stream).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            // No stream yet: nothing was ever dead-lettered.
            return Ok(0);
        }
        Err(err) => return Err(unavailable(err)),
    };
    let mut subjects = stream
        .info_with_subjects(format!("{}.{room}.>", nats.dlq_subject_prefix))
        .await
        .map_err(unavailable)?;
    let mut total = 0u64;
    while let Some(counted) = subjects.next().await {
        let (_, count) = counted.map_err(unavailable)?;
        total = total.saturating_add(count as u64);
    }
    Ok(total)
}

/// Makes sure of the dead-letter stream (`nats.dlq_stream`, subjects
/// `<dlq_subject_prefix>.>`), as every room and `streams ensure` need it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    nats: &NatsConfig,
    storage: &StreamStorage,
) -> Result<super::nats::Provisioned, super::nats::BusError> {
    let subjects = format!("{}.>", nats.dlq_subject_prefix);
    super::nats::ensure_stream(js, nats, &nats.dlq_stream, subjects, storage).await
}

/// The key-value bucket of replay records (which dead letters were
/// replayed, by sequence).
pub fn replays_bucket(js: jetstream::Context, storage: BucketStorage) -> KvBucket {
    KvBucket::new(
        js,
        REPLAYS_BUCKET,
        "dead letters replayed, by sequence",
        storage,
    )
}

/// The dead-letter stream and the replay records.
pub struct DeadLetters {
    js: jetstream::Context,
    nats: NatsConfig,
    replays: KvBucket,
}

impl DeadLetters {
    pub async fn open(
        js: jetstream::Context,
        nats: NatsConfig,
        buckets: BucketStorage,
    ) -> Result<Self, DlqError> {
        let replays = replays_bucket(js.clone(), buckets);
        replays.open().await.map_err(unavailable)?;
        Ok(DeadLetters { js, nats, replays })
    }

    async fn stream(&self) -> Result<jetstream::stream::Stream, DlqError> {
        self.js
            .get_stream(&self.nats.dlq_stream)
            .await
            .map_err(unavailable)
    }

    async fn replayed(&self, sequence: u64) -> bool {
        match self.replays.store() {
            Ok(store) => store
                .get(sequence.to_string())
                .await
                .ok()
                .flatten()
                .is_some(),
            Err(_) => false,
        }
    }

    /// Every dead letter matching `filter`, oldest first.
    pub async fn list(&self, filter: &DlqFilter) -> Result<Vec<DeadLetterRecord>, DlqError> {
        let mut stream = self.stream().await?;
        let info = stream.info().await.map_err(unavailable)?;
        if info.state.messages == 0 {
            return Ok(Vec::new());
        }
        let prefix = &self.nats.dlq_subject_prefix;
        let subject = match &filter.room {
            Some(room) => format!("{prefix}.{room}.>"),
            None => format!("{prefix}.>"),
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_millis(500), messages.next()).await
        {
            let Ok(meta) = message.info() else { continue };
            let (sequence, pending) = (meta.stream_sequence, meta.pending);
            let unix_time = meta.published.unix_timestamp();
            let mut record = DeadLetterRecord::new(
                sequence,
                &message.subject,
                message.headers.as_ref(),
                message.payload.clone(),
                unix_time,
                prefix,
            );
            if filter.matches(&record) {
                record.replayed = self.replayed(sequence).await;
                out.push(record);
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    pub async fn get(&self, sequence: u64) -> Result<DeadLetterRecord, DlqError> {
        let stream = self.stream().await?;
        let message = stream
            .get_raw_message(sequence)
            .await
            .map_err(|_| DlqError::NotFound(sequence))?;
        let mut record = DeadLetterRecord::new(
            sequence,
            &message.subject,
            Some(&message.headers),
            message.payload,
            message.time.unix_timestamp(),
            &self.nats.dlq_subject_prefix,
        );
        record.replayed = self.replayed(sequence).await;
        Ok(record)
    }

    /// Publishes the original body to its original subject as a new message
    /// and records the replay. Returns the new message's stream sequence.
    pub async fn replay(&self, record: &DeadLetterRecord) -> Result<u64, DlqError> {
        if record.original_subject.is_empty() {
            return Err(DlqError::NotReplayable {
                sequence: record.sequence,
                header: dlq_headers::ORIGINAL_SUBJECT,
            });
        }
        let message_id = format!("replay:{}:{}", record.sequence, uuid::Uuid::now_v7());
        let message = jetstream::message::PublishMessage::build()
            .payload(record.body.clone())
            .message_id(message_id)
            .header(REPLAYED_FROM, record.sequence.to_string().as_str());
        let ack = self
            .js
            .send_publish(record.original_subject.clone(), message)
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        let note = serde_json::json!({
            "replayed_at": crate::cocoa_butter::envelope::rfc3339(&chrono::Utc::now()),
            "subject": record.original_subject,
            "new_sequence": ack.sequence,
        });
        self.replays
            .store()
            .map_err(unavailable)?
            .put(record.sequence.to_string(), Bytes::from(note.to_string()))
            .await
            .map_err(unavailable)?;
        Ok(ack.sequence)
    }

    /// The dead letters an operation names: these sequences (each must be
    /// of `filter.room` when the filter names one), or, with none, every
    /// dead letter the filter matches.
    pub async fn select(
        &self,
        sequences: &[u64],
        filter: &DlqFilter,
    ) -> Result<Vec<DeadLetterRecord>, DlqError> {
        if sequences.is_empty() {
            return self.list(filter).await;
        }
        let mut out = Vec::with_capacity(sequences.len());
        for &sequence in sequences {
            let record = self.get(sequence).await?;
            if let Some(room) = &filter.room
                && record.room != *room
            {
                return Err(DlqError::OtherRoom {
                    sequence,
                    room: room.clone(),
                });
            }
            out.push(record);
        }
        Ok(out)
    }

    /// Replays each record in order, calling `done` after each one (for
    /// progress); stops at the first failure, the ones before it replayed
    /// and recorded.
    pub async fn replay_all(
        &self,
        records: &[DeadLetterRecord],
        mut done: impl FnMut(&Replayed),
    ) -> Result<Vec<Replayed>, DlqError> {
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            let new_sequence = self.replay(record).await?;
            let replayed = Replayed {
                sequence: record.sequence,
                subject: record.original_subject.clone(),
                new_sequence,
            };
            done(&replayed);
            out.push(replayed);
        }
        Ok(out)
    }

    /// Deletes each record, calling `done` after each one; stops at the
    /// first failure.
    pub async fn purge_all(
        &self,
        records: &[DeadLetterRecord],
        mut done: impl FnMut(u64),
    ) -> Result<usize, DlqError> {
        for record in records {
            self.purge(record.sequence).await?;
            done(record.sequence);
        }
        Ok(records.len())
    }

    pub async fn purge(&self, sequence: u64) -> Result<(), DlqError> {
        let stream = self.stream().await?;
        stream
            .delete_message(sequence)
            .await
            .map_err(|_| DlqError::NotFound(sequence))?;
        Ok(())
    }
}
