//! The rooms as a load drives them: the input each room is fed and its
//! payload, and what a load run reads off the process. Shared by
//! `benches/pipeline.rs` (through `#[path]`) and the soak test, so both push
//! the same documents through the rooms and measure them the same way.

use choco_factory::cocoa_butter::EventEnvelope;
use serde_json::{Value, json};

/// One room as a load drives it.
pub struct RoomCase {
    pub name: &'static str,
    pub domain: &'static str,
    /// The input it is fed, `<action>` under its domain.
    pub action: &'static str,
    /// The input payload for the document `doc` (the envelope's aggregate).
    pub payload: fn(&str) -> Value,
    /// The payload's schema version: its current major, so the load
    /// measures the rooms' work, not upcasting.
    pub schema_version: &'static str,
    /// Outputs the room publishes for each such input.
    pub outputs: usize,
}

impl RoomCase {
    /// The room's input for document `doc`, at its current major, with
    /// `correlation_id` (which its outputs carry) and `source`.
    pub fn input(&self, doc: &str, correlation_id: String, source: &str) -> EventEnvelope {
        let mut envelope = EventEnvelope::new(
            uuid::Uuid::now_v7(),
            format!("{}.{}", self.domain, self.action),
            doc.to_string(),
            correlation_id,
            serde_json::to_vec(&(self.payload)(doc)).unwrap_or_default(),
            source.to_string(),
        );
        envelope.schema_version = self.schema_version.into();
        envelope
    }
}

pub const ROOMS: &[RoomCase] = &[
    RoomCase {
        name: "winnower",
        domain: "refinement",
        action: "requested",
        payload: |doc| {
            json!({"document_id": doc, "title": "Release notes",
                "content": format!("# Release notes {doc}\n\nThe conch now resolves conflicts per property, and editors see the winning value within a second.\n"),
                "content_type": "text/markdown"})
        },
        schema_version: "1.0.0",
        outputs: 1,
    },
    RoomCase {
        name: "conch",
        domain: "coordination",
        action: "property_sync.requested",
        payload: |doc| {
            json!({"document_id": doc, "property": "title",
                "value": {"type": "string", "value": format!("Golden ticket {doc}")},
                "base_revision": 0, "author_id": "ann", "updated_at": "2026-03-01T10:00:00Z"})
        },
        schema_version: "2.0.0",
        outputs: 1,
    },
    RoomCase {
        name: "mould",
        domain: "hydration",
        action: "requested",
        payload: |doc| {
            json!({"document_id": doc, "format": "html",
                "source": "# {{ title }}\n\nThe factory floor, section by section.\n\n/invention b1\n",
                "data": {"title": format!("Document {doc}"), "blocks": {"b1": {"title": "Cocoa jet"}}}})
        },
        schema_version: "1.0.0",
        outputs: 1,
    },
    RoomCase {
        name: "wrapper",
        domain: "resolution",
        action: "requested",
        payload: |doc| {
            json!({"document_id": doc, "repo": "hq", "path": format!("notes/{doc}.md"),
                "content": "Tagged #golden_ticket, see [setup](repo://vault/setup.md#install).\n"})
        },
        schema_version: "1.0.0",
        outputs: 3,
    },
];

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`: resident set now,
/// `VmHWM`: its peak), in KiB.
pub fn resident_kib(pid: u32, field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|err| format!("/proc/{pid}/status: {err}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// The middle value (the upper one of an even count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}
