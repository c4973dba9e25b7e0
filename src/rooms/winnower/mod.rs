//! the-winnower, the Winnowing Room (domain `refinement`): separates what
//! is worth keeping from the husk.
//!
//! - The smartblock gate (`refinement.smartblock_created`): the seven
//!   steps of the platform's layer-4 handler. The runtime does step 1
//!   (envelope structure); `gate.rs` does 2–4 and 6 (payload, slug
//!   allowlist, schema version, federation targets from the manifest);
//!   this module does 5 and 7 together with one compare-and-set on the
//!   block's key-value entry, so idempotency holds across replicas.
//! - Slop detection (`refinement.requested`): `slop.rs` scores the content
//!   with the rules file; at or above the threshold the document is
//!   reported as slop, otherwise as passed.

mod api;
pub mod gate;
pub mod slop;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use api::pb;
use gate::{Gate, Manifest, Rejection, SmartblockCreated};
use slop::{RulesFile, SlopRules};

use crate::cocoa_butter::kit::keys::kv_key;
use crate::cocoa_butter::kit::{
    Action, EventContract, FieldError, Payload, Reason, RoomSettings, Written, reason, room_actions,
};
use crate::cocoa_butter::kit::{
    GrpcService, HandleError, InboundEvent, KvBucket, Outbound, Room, RoomContext, RoomError,
    RoomSpec,
};

pub const SPEC: RoomSpec = RoomSpec {
    name: "winnower",
    check: |settings| Loaded::load(settings).map(|_| ()),
    build: |ctx| Ok(Arc::new(Winnower::new(ctx)?)),
    defaults: || serde_json::to_value(WinnowerSettings::default()).unwrap_or_default(),
    contracts: || {
        vec![
            EventContract::input::<SmartblockCreated>(
                Input::SmartblockCreated,
                "an editor created a smartblock; the gate checks it against the federation manifest",
            )
            .about("the smartblock (`blockId`)"),
            EventContract::input::<SlopRequest>(
                Input::Requested,
                "score a document's content for slop",
            ),
            EventContract::output::<gate::SmartblockAccepted>(
                Output::SmartblockAccepted,
                "the smartblock passed the gate, with its federation targets",
            )
            .about("the smartblock (`block_id`)"),
            EventContract::output::<SlopDetected>(
                Output::SlopDetected,
                "the content scored at or above the threshold",
            ),
            EventContract::output::<SlopPassed>(
                Output::Passed,
                "the content scored below the threshold",
            ),
        ]
    },
};

/// Documents up to this size are scored on the async worker (~70 µs).
const INLINE_SCORE_BYTES: usize = 4 * 1024;

room_actions! {
    /// What the Winnowing Room consumes.
    enum Input: inputs {
        SmartblockCreated = "smartblock_created",
        Requested = "requested",
    }
}

room_actions! {
    /// What the Winnowing Room publishes.
    enum Output: outputs {
        SmartblockAccepted = "smartblock_accepted",
        SlopDetected = "slop_detected",
        Passed = "passed",
    }
}

/// `rooms.winnower.settings`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
struct WinnowerSettings {
    /// The federation manifest (slug → targets); relative to the working directory.
    manifest_file: PathBuf,
    /// The slop rules and their weights.
    rules_file: PathBuf,
    /// Smartblocks with a newer `schemaVersion` are refused.
    catalog_schema_version: u32,
    /// A block id accepted within this window is not accepted again.
    #[serde(with = "humantime_serde")]
    idempotency_window: Duration,
    /// Key-value bucket recording accepted blocks.
    blocks_bucket: String,
    /// Slop score at or above which a document is reported as slop.
    threshold: f64,
    /// Content larger than this is refused (`content_too_large`).
    max_content_bytes: usize,
}

impl Default for WinnowerSettings {
    fn default() -> Self {
        WinnowerSettings {
            manifest_file: "config/federation-manifest.toml".into(),
            rules_file: "config/slop-rules.toml".into(),
            catalog_schema_version: 1,
            idempotency_window: Duration::from_secs(120),
            blocks_bucket: "choco_winnower_blocks".into(),
            threshold: 10.0,
            max_content_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Settings with their files read and checked.
struct Loaded {
    settings: WinnowerSettings,
    gate: Gate,
    rules: SlopRules,
}

impl Loaded {
    fn load(room: &RoomSettings) -> Result<Self, RoomError> {
        let invalid = |field: &str, message: String| room.settings_error(field, message);
        let settings: WinnowerSettings = room.room_settings()?;
        if !settings.threshold.is_finite() || settings.threshold <= 0.0 {
            return Err(invalid(
                "threshold",
                "must be a number greater than zero".into(),
            ));
        }
        if settings.max_content_bytes == 0 {
            return Err(invalid(
                "max_content_bytes",
                "must be greater than zero".into(),
            ));
        }
        let read = |field: &str, path: &PathBuf| {
            std::fs::read_to_string(path)
                .map_err(|err| invalid(field, format!("cannot read {}: {err}", path.display())))
        };
        let manifest_path = room.resolve_path(&settings.manifest_file);
        let rules_path = room.resolve_path(&settings.rules_file);
        let manifest_text = read("manifest_file", &manifest_path)?;
        let manifest: Manifest = toml::from_str(&manifest_text).map_err(|err| {
            invalid(
                "manifest_file",
                format!("{}: {err}", manifest_path.display()),
            )
        })?;
        let gate = Gate::new(manifest, settings.catalog_schema_version).map_err(|err| {
            invalid(
                "manifest_file",
                format!("{}: {err}", manifest_path.display()),
            )
        })?;
        let rules_text = read("rules_file", &rules_path)?;
        let rules_file: RulesFile = toml::from_str(&rules_text)
            .map_err(|err| invalid("rules_file", format!("{}: {err}", rules_path.display())))?;
        let rules = SlopRules::compile(rules_file)
            .map_err(|err| invalid("rules_file", format!("{}: {err}", rules_path.display())))?;
        Ok(Loaded {
            settings,
            gate,
            rules,
        })
    }
}

/// The payload of `refinement.requested`, and the body of `Winnow`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct SlopRequest {
    pub document_id: String,
    #[serde(default)]
    pub title: String,
    pub content: String,
    /// `text/markdown` (the default) or `text/plain`.
    #[serde(default)]
    pub content_type: String,
}

impl Payload for SlopRequest {}

/// `refinement.slop_detected`: the content scored at or above the
/// threshold, with what was found.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SlopDetected {
    pub document_id: String,
    pub score: f64,
    pub threshold: f64,
    pub findings: Vec<SlopFinding>,
}

impl Payload for SlopDetected {}

/// One finding of a slop rule.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SlopFinding {
    pub rule: String,
    pub message: String,
    /// Byte offsets into the content: `[start, end)`.
    pub start: usize,
    pub end: usize,
    pub excerpt: String,
}

/// `refinement.passed`: the content scored below the threshold.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SlopPassed {
    pub document_id: String,
    pub score: f64,
}

impl Payload for SlopPassed {}

/// A slop verdict.
#[derive(Debug, Clone, Serialize)]
pub struct SlopReport {
    pub document_id: String,
    pub score: f64,
    pub threshold: f64,
    pub slop: bool,
    pub findings: Vec<slop::Finding>,
}

/// What the blocks bucket keeps per accepted block.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BlockRecord {
    /// The event that got the block accepted: its redelivery re-emits the
    /// acceptance instead of counting as a replay.
    event_id: String,
    accepted_at: DateTime<Utc>,
    accepted: serde_json::Value,
}

pub struct Winnower {
    settings: WinnowerSettings,
    gate: Gate,
    rules: Arc<SlopRules>,
    blocks: KvBucket,
}

impl Winnower {
    fn new(ctx: RoomContext) -> Result<Self, RoomError> {
        let loaded = Loaded::load(&ctx.settings)?;
        let blocks = ctx.kv_bucket(
            &loaded.settings.blocks_bucket,
            "the-winnower: accepted smartblocks",
        );
        Ok(Winnower {
            settings: loaded.settings,
            gate: loaded.gate,
            rules: Arc::new(loaded.rules),
            blocks,
        })
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Scores one document: the same path for the event and the APIs.
    /// Scoring is CPU work (tens of milliseconds for a MiB), so it runs off
    /// the async workers.
    pub async fn winnow(&self, request: SlopRequest) -> Result<SlopReport, FieldError> {
        if request.document_id.trim().is_empty() {
            return Err(FieldError {
                field: "document_id",
                message: "must not be empty".into(),
            });
        }
        let markdown = match request.content_type.as_str() {
            "" | "text/markdown" => true,
            "text/plain" => false,
            other => {
                return Err(FieldError {
                    field: "content_type",
                    message: format!("{other:?} is not supported: use text/markdown or text/plain"),
                });
            }
        };
        if request.content.len() > self.settings.max_content_bytes {
            return Err(FieldError {
                field: "content",
                message: format!(
                    "content_too_large: {} bytes is more than the {} allowed",
                    request.content.len(),
                    self.settings.max_content_bytes
                ),
            });
        }
        // Scoring runs at ~50 MiB/s: a small document costs less than
        // handing it to the blocking pool and back (two thread wake-ups),
        // so only larger ones leave the async worker.
        let scored = if request.content.len() <= INLINE_SCORE_BYTES {
            self.rules.score(&request.content, markdown)
        } else {
            let rules = self.rules.clone();
            let content = request.content;
            tokio::task::spawn_blocking(move || rules.score(&content, markdown))
                .await
                .map_err(|err| FieldError {
                    field: "content",
                    message: format!("scoring failed: {err}"),
                })?
        };
        Ok(SlopReport {
            document_id: request.document_id,
            slop: scored.score >= self.settings.threshold,
            score: scored.score,
            threshold: self.settings.threshold,
            findings: scored.findings,
        })
    }

    /// Step 5 without step 7: was this block accepted within the window?
    pub async fn recently_accepted(&self, block_id: &str) -> Result<bool, HandleError> {
        let entry = self
            .blocks
            .store()?
            .entry(kv_key(block_id))
            .await
            .map_err(HandleError::bus)?;
        Ok(match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                serde_json::from_slice::<BlockRecord>(&entry.value)
                    .is_ok_and(|record| self.within_window(&record))
            }
            _ => false,
        })
    }

    /// Accepted less than the window ago (a record from the future, by
    /// clock skew, counts as recent).
    fn within_window(&self, record: &BlockRecord) -> bool {
        let age = Utc::now().signed_duration_since(record.accepted_at);
        chrono::TimeDelta::from_std(self.settings.idempotency_window)
            .map_or(true, |window| age < window)
    }

    /// Steps 5 and 7 at once: record the acceptance unless the block was
    /// accepted within the window. Returns the acceptance to publish, or
    /// None for a replay.
    async fn accept(
        &self,
        event_id: &str,
        accepted: serde_json::Value,
        block_id: &str,
    ) -> Result<Option<serde_json::Value>, HandleError> {
        let store = self.blocks.store()?;
        let key = kv_key(block_id);
        let record = BlockRecord {
            event_id: event_id.to_string(),
            accepted_at: Utc::now(),
            accepted,
        };
        let bytes = Bytes::from(serde_json::to_vec(&record).map_err(HandleError::transient)?);
        // A lost race is retried once the winner's record is visible; that
        // record then decides.
        for _ in 0..4 {
            let entry = store.entry(key.clone()).await.map_err(HandleError::bus)?;
            let revision = match entry {
                None => None,
                Some(entry) => {
                    if entry.operation == kv::Operation::Put
                        && let Ok(existing) = serde_json::from_slice::<BlockRecord>(&entry.value)
                    {
                        if existing.event_id == event_id {
                            // Our own acceptance, redelivered: emit it again
                            // (same output id, deduplicated downstream).
                            return Ok(Some(existing.accepted));
                        }
                        if self.within_window(&existing) {
                            return Ok(None);
                        }
                    }
                    Some(entry.revision)
                }
            };
            match store.write_if(&key, bytes.clone(), revision).await? {
                Written::Stored(_) => return Ok(Some(record.accepted)),
                Written::Conflict => continue,
            }
        }
        Err(HandleError::transient(format!(
            "block {block_id:?} kept changing while being recorded"
        )))
    }

    async fn handle_smartblock(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        let block: SmartblockCreated = event.payload().map_err(|err| match err {
            HandleError::Permanent { detail, .. } => HandleError::permanent(
                reason::PAYLOAD_INVALID,
                format!("step 2 (payload parses): {detail}"),
            ),
            other => other,
        })?;
        let accepted = self
            .gate
            .check(&block)
            .map_err(Rejection::into_handle_error)?;
        let accepted = serde_json::to_value(&accepted).map_err(HandleError::transient)?;
        match self
            .accept(&event.envelope.event_id, accepted.clone(), &block.block_id)
            .await?
        {
            Some(accepted) => Ok(vec![Outbound::new(
                Output::SmartblockAccepted,
                &block.block_id,
                accepted,
            )]),
            None => {
                tracing::info!(block_id = %block.block_id, event_id = %event.envelope.event_id, "smartblock already accepted within the idempotency window; nothing new");
                Ok(Vec::new())
            }
        }
    }

    async fn handle_requested(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        let request: SlopRequest = event.payload()?;
        let report = self.winnow(request).await.map_err(|err| {
            let reason = if err.field == "content" && err.message.starts_with("content_too_large") {
                CONTENT_TOO_LARGE
            } else {
                reason::PAYLOAD_INVALID
            };
            HandleError::permanent(reason, err.to_string())
        })?;
        let output = if report.slop {
            Outbound::new(
                Output::SlopDetected,
                &report.document_id,
                SlopDetected {
                    document_id: report.document_id.clone(),
                    score: report.score,
                    threshold: report.threshold,
                    findings: report
                        .findings
                        .iter()
                        .map(|f| SlopFinding {
                            rule: f.rule.clone(),
                            message: f.message.clone(),
                            start: f.start,
                            end: f.end,
                            excerpt: f.excerpt.clone(),
                        })
                        .collect(),
                },
            )
        } else {
            Outbound::new(
                Output::Passed,
                &report.document_id,
                SlopPassed {
                    document_id: report.document_id.clone(),
                    score: report.score,
                },
            )
        };
        Ok(vec![output])
    }
}

/// Content over the room's `max_content_bytes`.
const CONTENT_TOO_LARGE: Reason = Reason::new("content_too_large");

#[async_trait]
impl Room for Winnower {
    fn dead_letter_reasons(&self) -> &'static [Reason] {
        &[
            gate::SCHEMA_VERSION_TOO_NEW,
            gate::UNKNOWN_COMMAND_SLUG,
            CONTENT_TOO_LARGE,
        ]
    }

    fn inputs(&self) -> &'static [&'static str] {
        Input::ALL
    }

    fn outputs(&self) -> &'static [&'static str] {
        Output::ALL
    }

    async fn prepare(&self) -> Result<(), RoomError> {
        Ok(self.blocks.open().await?)
    }

    async fn handle(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        match event.input::<Input>()? {
            Input::SmartblockCreated => self.handle_smartblock(event).await,
            Input::Requested => self.handle_requested(event).await,
        }
    }

    fn http_routes(self: Arc<Self>) -> axum::Router {
        api::http_routes(self)
    }

    fn grpc_service(self: Arc<Self>) -> GrpcService {
        api::grpc_service(self)
    }
}
