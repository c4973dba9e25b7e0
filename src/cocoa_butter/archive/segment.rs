//! What the archive stores, as pure functions: a segment (the messages of
//! one sequence range of a stream, one JSON line each, gzip-compressed),
//! its key, and the manifest that lists a domain's segments.
//!
//! Why gzip-compressed NDJSON rather than Parquet: every tool reads it
//! (DuckDB's `read_json` in place, `zcat | jq`, Spark, Athena), it builds
//! in seconds where arrow-rs and parquet add minutes to every build on two
//! cores, and an envelope's nested payload stays one JSON value instead of
//! a schema to keep in step. DuckDB still queries it in place (README,
//! "The archive").

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One archived message: where it was in the stream, when, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchivedEvent {
    /// The stream sequence.
    pub seq: u64,
    pub subject: String,
    /// When the stream stored it.
    pub stored_at: DateTime<Utc>,
    /// The envelope's fields, for queries without decoding (empty when the
    /// body was not an envelope).
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub event_type: String,
    #[serde(default)]
    pub aggregate_id: String,
    #[serde(default)]
    pub correlation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// The payload decoded (the envelope's is base64 of JSON), when JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Every header, by name (the last value of each).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// The message body exactly as stored, base64: what a restore
    /// republishes, byte for byte.
    pub body: String,
}

impl ArchivedEvent {
    /// The archived form of a stored message.
    pub fn new(
        seq: u64,
        subject: &str,
        stored_at: DateTime<Utc>,
        headers: std::collections::BTreeMap<String, String>,
        body: &[u8],
    ) -> Self {
        let envelope: Option<crate::cocoa_butter::envelope::EventEnvelope> =
            serde_json::from_slice(body).ok();
        let payload = envelope
            .as_ref()
            .and_then(|e| serde_json::from_slice(&e.payload).ok());
        ArchivedEvent {
            seq,
            subject: subject.to_string(),
            stored_at,
            event_id: envelope
                .as_ref()
                .map(|e| e.event_id.clone())
                .unwrap_or_default(),
            event_type: envelope
                .as_ref()
                .map(|e| e.event_type.clone())
                .unwrap_or_default(),
            aggregate_id: envelope
                .as_ref()
                .map(|e| e.aggregate_id.clone())
                .unwrap_or_default(),
            correlation_id: envelope
                .as_ref()
                .map(|e| e.correlation_id.clone())
                .unwrap_or_default(),
            created_at: envelope.as_ref().map(|e| e.created_at),
            payload,
            headers,
            body: BASE64.encode(body),
        }
    }

    /// The body as stored.
    pub fn body_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        BASE64.decode(self.body.as_bytes())
    }
}

/// The object key of the segment holding `first..=last` of `domain`, dated
/// by its first message: `<domain>/<yyyy>/<mm>/<dd>/<first>-<last>.ndjson.gz`.
/// A function of the range alone, so writing a range again overwrites the
/// same object.
pub fn segment_key(domain: &str, first_stored_at: DateTime<Utc>, first: u64, last: u64) -> String {
    format!(
        "{domain}/{}/{first:020}-{last:020}.ndjson.gz",
        first_stored_at.format("%Y/%m/%d")
    )
}

/// Segments listed by one chunk of a domain's manifest. The manifest is
/// kept in chunks because each segment written rewrites the chunk it goes
/// into: one object for the whole archive would make every write cost as
/// much as the archive's history (a segment every 10 s is 8,640 a day).
pub const MANIFEST_CHUNK_SEGMENTS: usize = 100;

/// Where a domain's manifest chunks are.
pub fn manifest_prefix(domain: &str) -> String {
    format!("{domain}/manifest/")
}

/// The key of the manifest chunk whose first segment starts at `first`
/// (zero-padded, so keys sort in sequence order).
pub fn manifest_chunk_key(domain: &str, first: u64) -> String {
    format!("{}{first:020}.json", manifest_prefix(domain))
}

/// A segment being filled: its lines, compressed as they come.
#[derive(Debug)]
pub struct SegmentBuilder {
    pub first: u64,
    pub last: u64,
    pub first_stored_at: DateTime<Utc>,
    pub last_stored_at: DateTime<Utc>,
    pub events: usize,
    /// Uncompressed bytes so far.
    pub raw_bytes: usize,
    encoder: flate2::write::GzEncoder<Vec<u8>>,
}

impl SegmentBuilder {
    pub fn new(first: &ArchivedEvent) -> Self {
        SegmentBuilder {
            first: first.seq,
            last: first.seq,
            first_stored_at: first.stored_at,
            last_stored_at: first.stored_at,
            events: 0,
            raw_bytes: 0,
            encoder: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()),
        }
    }

    /// Adds the next message; `false` (and nothing added) when it is not
    /// after the last one (a redelivery of one already in the segment).
    pub fn push(&mut self, event: &ArchivedEvent) -> std::io::Result<bool> {
        if self.events > 0 && event.seq <= self.last {
            return Ok(false);
        }
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        self.encoder.write_all(&line)?;
        self.raw_bytes += line.len();
        self.last = event.seq;
        self.last_stored_at = event.stored_at;
        self.events += 1;
        Ok(true)
    }

    /// The finished segment: its key, bytes and manifest entry.
    pub fn finish(self, domain: &str) -> std::io::Result<(SegmentEntry, Vec<u8>)> {
        let bytes = self.encoder.finish()?;
        let entry = SegmentEntry {
            key: segment_key(domain, self.first_stored_at, self.first, self.last),
            first: self.first,
            last: self.last,
            events: self.events,
            bytes: bytes.len(),
            sha256: hex::encode(Sha256::digest(&bytes)),
            first_stored_at: self.first_stored_at,
            last_stored_at: self.last_stored_at,
        };
        Ok((entry, bytes))
    }
}

/// A segment as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub key: String,
    pub first: u64,
    pub last: u64,
    pub events: usize,
    /// Compressed.
    pub bytes: usize,
    /// Of the compressed object.
    pub sha256: String,
    pub first_stored_at: DateTime<Utc>,
    pub last_stored_at: DateTime<Utc>,
}

/// Every segment of one domain, in sequence order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub domain: String,
    pub stream: String,
    pub segments: Vec<SegmentEntry>,
}

impl Manifest {
    /// Records `entry`, replacing one of the same range (a range written
    /// again after a restart), keeping sequence order.
    pub fn record(&mut self, entry: SegmentEntry) {
        self.segments
            .retain(|s| !(s.first == entry.first && s.last == entry.last));
        let at = self
            .segments
            .iter()
            .position(|s| s.first > entry.first)
            .unwrap_or(self.segments.len());
        self.segments.insert(at, entry);
    }

    /// The chunk that lists `entry` once it is written, `self` being the
    /// domain's last chunk: a copy of `self` with it, or a new chunk when
    /// `self` is full.
    pub fn with_segment(&self, entry: SegmentEntry) -> Manifest {
        let replaces = self
            .segments
            .iter()
            .any(|s| s.first == entry.first && s.last == entry.last);
        let mut chunk = if self.segments.len() >= MANIFEST_CHUNK_SEGMENTS && !replaces {
            Manifest {
                domain: self.domain.clone(),
                stream: self.stream.clone(),
                segments: Vec::new(),
            }
        } else {
            self.clone()
        };
        chunk.record(entry);
        chunk
    }

    /// The key of this chunk of the manifest (that of its first segment).
    pub fn chunk_key(&self) -> String {
        manifest_chunk_key(&self.domain, self.segments.first().map_or(0, |s| s.first))
    }

    /// The last sequence archived, 0 when none.
    pub fn last(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.last)
    }

    /// Gaps and overlaps between consecutive segments, one line each.
    pub fn discontinuities(&self) -> Vec<String> {
        self.segments
            .windows(2)
            .filter_map(|pair| {
                let (a, b) = (&pair[0], &pair[1]);
                if b.first == a.last + 1 {
                    None
                } else if b.first > a.last + 1 {
                    Some(format!(
                        "gap: {}..={} is in no segment (between {} and {})",
                        a.last + 1,
                        b.first - 1,
                        a.key,
                        b.key
                    ))
                } else {
                    Some(format!("overlap: {} and {} share sequences", a.key, b.key))
                }
            })
            .collect()
    }
}

/// The events of a segment's bytes.
pub fn read_segment(bytes: &[u8]) -> std::io::Result<Vec<ArchivedEvent>> {
    use std::io::BufRead;
    let decoder = flate2::read::GzDecoder::new(bytes);
    let mut events = Vec::new();
    for line in std::io::BufReader::new(decoder).lines() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        events.push(serde_json::from_str(&line)?);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> ArchivedEvent {
        let envelope = crate::cocoa_butter::envelope::EventEnvelope::new(
            uuid::Uuid::now_v7(),
            "coordination.property_sync.requested".into(),
            "doc-1".into(),
            "c-1".into(),
            br#"{"a":1}"#.to_vec(),
            "test".into(),
        );
        ArchivedEvent::new(
            seq,
            "choco.events.coordination.property_sync.requested",
            "2026-03-01T10:00:00Z".parse().expect("time"),
            Default::default(),
            &envelope.encode(),
        )
    }

    #[test]
    fn a_segment_round_trips_and_skips_what_it_already_holds() {
        let mut segment = SegmentBuilder::new(&event(5));
        assert!(segment.push(&event(5)).expect("push"));
        assert!(segment.push(&event(6)).expect("push"));
        assert!(!segment.push(&event(6)).expect("a redelivery"));
        let (entry, bytes) = segment.finish("coordination").expect("finish");
        assert_eq!(
            entry.key,
            "coordination/2026/03/01/00000000000000000005-00000000000000000006.ndjson.gz"
        );
        assert_eq!((entry.first, entry.last, entry.events), (5, 6, 2));
        let events = read_segment(&bytes).expect("read");
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(events[0].payload, Some(serde_json::json!({"a": 1})));
        assert_eq!(events[0].event_type, "coordination.property_sync.requested");
    }

    #[test]
    fn the_manifest_keeps_order_replaces_a_range_and_names_gaps() {
        let entry = |first: u64, last: u64| SegmentEntry {
            key: format!("d/{first}-{last}"),
            first,
            last,
            events: (last - first + 1) as usize,
            bytes: 1,
            sha256: String::new(),
            first_stored_at: Utc::now(),
            last_stored_at: Utc::now(),
        };
        let mut manifest = Manifest::default();
        manifest.record(entry(11, 20));
        manifest.record(entry(1, 10));
        manifest.record(entry(11, 20));
        assert_eq!(manifest.segments.len(), 2);
        assert!(manifest.discontinuities().is_empty());
        manifest.record(entry(25, 30));
        manifest.record(entry(28, 40));
        let found = manifest.discontinuities();
        assert!(found[0].starts_with("gap: 21..=24"), "{found:?}");
        assert!(found[1].starts_with("overlap"), "{found:?}");
        assert_eq!(manifest.last(), 40);
    }
}
