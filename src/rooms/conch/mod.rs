//! the-conch, the Fudge Room (domain `coordination`): keeps document
//! properties consistent while several editors change them concurrently.
//!
//! Each property has a revision (0 = does not exist; every applied write
//! adds 1). A write whose `base_revision` matches is applied; any other is a
//! conflict, resolved by the policy configured for the property's name.
//! State lives in a JetStream key-value bucket, one entry per document,
//! written with compare-and-set, so replicas of the binary stay correct
//! together. Each entry also keeps receipts of the latest causes it
//! handled, so a redelivered event changes nothing and republishes the
//! same outputs (which JetStream then deduplicates).

mod api;
pub use api::pb;
pub mod sync;

use std::sync::Arc;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::cocoa_butter::kit::keys::kv_key;
use crate::cocoa_butter::kit::{
    Action, EventContract, Reason, RoomSettings, Written, reason, room_actions,
};
use crate::cocoa_butter::kit::{
    Cause, GrpcService, HandleError, InboundEvent, KvBucket, Outbound, Publisher, Room,
    RoomContext, RoomError, RoomSpec,
};
use sync::{DocumentRecord, Policy, Receipt, SyncRequest};

pub const SPEC: RoomSpec = RoomSpec {
    name: "conch",
    check: |settings| ConchSettings::parse(settings).map(|_| ()),
    build: |ctx| Ok(Arc::new(Conch::new(ctx)?)),
    defaults: || serde_json::to_value(ConchSettings::default()).unwrap_or_default(),
    contracts: || {
        vec![
            EventContract::input::<SyncRequest>(
                Input::PropertySyncRequested,
                "set one property of a document, based on the revision the writer saw",
            ),
            EventContract::output::<sync::SyncCompleted>(
                sync::Output::Completed,
                "the write was applied: the property's value and its new revision",
            ),
            EventContract::output::<sync::ConflictDetected>(
                sync::Output::ConflictDetected,
                "the write's base revision was not the property's",
            ),
            EventContract::output::<sync::ConflictResolved>(
                sync::Output::ConflictResolved,
                "what the property's policy kept after a conflict",
            ),
        ]
    },
};

room_actions! {
    /// What the Fudge Room consumes.
    enum Input: inputs {
        PropertySyncRequested = "property_sync.requested",
    }
}

/// `rooms.conch.settings`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
struct ConchSettings {
    /// Key-value bucket holding one entry per document.
    bucket: String,
    /// Policy for properties no rule matches.
    default_policy: Policy,
    /// First matching rule wins; patterns are globs over property names.
    policies: Vec<PolicyRule>,
    /// Receipts kept per document for idempotency.
    receipts_kept: usize,
    /// Compare-and-set attempts before contention counts as a transient failure.
    max_cas_attempts: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PolicyRule {
    pattern: String,
    policy: Policy,
}

impl Default for ConchSettings {
    fn default() -> Self {
        ConchSettings {
            bucket: "choco_conch_documents".into(),
            default_policy: Policy::LastWriterWins,
            policies: Vec::new(),
            receipts_kept: 32,
            max_cas_attempts: 32,
        }
    }
}

impl ConchSettings {
    fn parse(room: &RoomSettings) -> Result<(Self, Vec<(GlobMatcher, Policy)>), RoomError> {
        let settings: ConchSettings = room.room_settings()?;
        if settings.bucket.is_empty()
            || !settings
                .bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(room.settings_error(
                "bucket",
                format!(
                    "{:?} is not a valid bucket name (letters, digits, '_', '-')",
                    settings.bucket
                ),
            ));
        }
        if settings.receipts_kept == 0 || settings.max_cas_attempts == 0 {
            let field = if settings.receipts_kept == 0 {
                "receipts_kept"
            } else {
                "max_cas_attempts"
            };
            return Err(room.settings_error(field, "must be greater than zero"));
        }
        let mut rules = Vec::with_capacity(settings.policies.len());
        for (index, rule) in settings.policies.iter().enumerate() {
            let glob = Glob::new(&rule.pattern).map_err(|err| {
                room.settings_error(&format!("policies[{index}].pattern"), err.to_string())
            })?;
            rules.push((glob.compile_matcher(), rule.policy));
        }
        Ok((settings, rules))
    }
}

/// What a synchronous sync returns to API callers.
pub struct SyncResult {
    pub outcome: sync::Outcome,
    pub receipt: Receipt,
    pub property: Option<sync::PropertyState>,
    pub event_ids: Vec<uuid::Uuid>,
}

pub struct Conch {
    settings: ConchSettings,
    rules: Vec<(GlobMatcher, Policy)>,
    publisher: Publisher,
    documents: KvBucket,
}

impl Conch {
    fn new(ctx: RoomContext) -> Result<Self, RoomError> {
        let (settings, rules) = ConchSettings::parse(&ctx.settings)?;
        let documents = ctx.kv_bucket(
            &settings.bucket,
            "the-conch: document properties and their revisions",
        );
        Ok(Conch {
            settings,
            rules,
            publisher: ctx.publisher,
            documents,
        })
    }

    fn policy_for(&self, property: &str) -> Policy {
        self.rules
            .iter()
            .find(|(matcher, _)| matcher.is_match(property))
            .map_or(self.settings.default_policy, |(_, policy)| *policy)
    }

    /// A document's record and the bucket revision to compare-and-set against.
    async fn load(&self, document_id: &str) -> Result<(DocumentRecord, Option<u64>), HandleError> {
        let entry = self
            .documents
            .store()?
            .entry(kv_key(document_id))
            .await
            .map_err(HandleError::bus)?;
        match entry {
            None => Ok((DocumentRecord::default(), None)),
            Some(entry) if entry.operation != kv::Operation::Put => {
                Ok((DocumentRecord::default(), Some(entry.revision)))
            }
            Some(entry) => {
                let record = serde_json::from_slice(&entry.value).map_err(|err| {
                    HandleError::permanent(
                        CORRUPT_DOCUMENT_RECORD,
                        format!("stored record of {document_id:?} does not parse: {err}"),
                    )
                })?;
                Ok((record, Some(entry.revision)))
            }
        }
    }

    /// Applies `request` under `cause` with compare-and-set, retrying when
    /// another writer got there first. A cause already in the record's
    /// receipts changes nothing and returns its receipt.
    async fn sync(
        &self,
        cause: &str,
        request: &SyncRequest,
    ) -> Result<(sync::Outcome, Receipt, DocumentRecord), HandleError> {
        let store = self.documents.store()?;
        let key = kv_key(&request.document_id);
        let policy = self.policy_for(&request.property);
        for _ in 0..self.settings.max_cas_attempts {
            let (mut record, revision) = self.load(&request.document_id).await?;
            if let Some(receipt) = record.receipt(cause) {
                return Ok((sync::Outcome::Duplicate, receipt.clone(), record));
            }
            let receipt = record.apply(cause, request, policy, self.settings.receipts_kept);
            let bytes = Bytes::from(serde_json::to_vec(&record).map_err(HandleError::transient)?);
            match store.write_if(&key, bytes, revision).await? {
                Written::Stored(_) => return Ok((receipt.outcome, receipt, record)),
                Written::Conflict => continue,
            }
        }
        Err(HandleError::transient(format!(
            "document {:?} changed under {} consecutive compare-and-set attempts",
            request.document_id, self.settings.max_cas_attempts
        )))
    }

    /// The synchronous path of the APIs: same rules, same events.
    pub async fn sync_now(
        &self,
        request: SyncRequest,
        correlation_id: Option<String>,
    ) -> Result<SyncResult, HandleError> {
        let id = request
            .request_id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let cause = Cause {
            correlation_id: correlation_id.unwrap_or_else(|| id.clone()),
            id,
            at: request.updated_at,
        };
        let (outcome, receipt, record) = self.sync(&cause.id, &request).await?;
        let event_ids = self
            .publisher
            .publish(&cause, &receipt.outputs)
            .await
            .map_err(HandleError::from)?;
        Ok(SyncResult {
            outcome,
            property: record.properties.get(&request.property).cloned(),
            receipt,
            event_ids,
        })
    }

    pub async fn properties(&self, document_id: &str) -> Result<DocumentRecord, HandleError> {
        Ok(self.load(document_id).await?.0)
    }
}

/// A stored document record that no longer parses.
const CORRUPT_DOCUMENT_RECORD: Reason = Reason::new("corrupt_document_record");

#[async_trait]
impl Room for Conch {
    fn dead_letter_reasons(&self) -> &'static [Reason] {
        &[CORRUPT_DOCUMENT_RECORD]
    }

    fn inputs(&self) -> &'static [&'static str] {
        Input::ALL
    }

    fn outputs(&self) -> &'static [&'static str] {
        sync::Output::ALL
    }

    async fn prepare(&self) -> Result<(), RoomError> {
        Ok(self.documents.open().await?)
    }

    async fn handle(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        match event.input::<Input>()? {
            Input::PropertySyncRequested => self.handle_requested(event).await,
        }
    }

    fn http_routes(self: Arc<Self>) -> axum::Router {
        api::http_routes(self)
    }

    fn grpc_service(self: Arc<Self>) -> GrpcService {
        api::grpc_service(self)
    }
}

impl Conch {
    async fn handle_requested(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        let request: SyncRequest = event.payload()?;
        request
            .validate()
            .map_err(|err| HandleError::permanent(reason::PAYLOAD_INVALID, err.to_string()))?;
        if request.document_id != event.envelope.aggregate_id {
            return Err(HandleError::permanent(
                reason::PAYLOAD_INVALID,
                format!(
                    "document_id {:?} differs from the envelope's aggregate_id {:?}",
                    request.document_id, event.envelope.aggregate_id
                ),
            ));
        }
        let (_, receipt, _) = self.sync(&event.envelope.event_id, &request).await?;
        Ok(receipt.outputs)
    }
}
