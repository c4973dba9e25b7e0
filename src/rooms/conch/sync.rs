//! The conch's rules, as pure functions over one document's record: apply a
//! write whose base revision matches, or detect the conflict and resolve it
//! by the property's policy. No I/O here; `store.rs` runs this inside a
//! compare-and-set loop.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cocoa_butter::kit::keys::id_too_long;
use crate::cocoa_butter::kit::rfc3339;
use crate::cocoa_butter::kit::{FieldError, Older, Outbound, Payload, room_actions};

room_actions! {
    /// What the Fudge Room publishes.
    pub enum Output: outputs {
        Completed = "property_sync.completed",
        ConflictDetected = "conflict.detected",
        ConflictResolved = "conflict.resolved",
    }
}

/// How deeply a property's value may nest (arrays and objects). The value
/// is stored six levels down in the document's record (a receipt's output
/// payload), and the record must parse back under serde_json's recursion
/// limit of 128, or every later write to the document would fail.
pub const MAX_VALUE_DEPTH: usize = 64;

/// Levels of arrays and objects in `value` (a scalar is 0).
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The JSON type of a property's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    Null,
    Boolean,
    Number,
    String,
    Array,
    Object,
}

impl ValueType {
    pub fn of(value: &Value) -> Self {
        match value {
            Value::Null => ValueType::Null,
            Value::Bool(_) => ValueType::Boolean,
            Value::Number(_) => ValueType::Number,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::Object(_) => ValueType::Object,
        }
    }
}

/// A property's value with the type its producer declares for it: what
/// major 2 of `property_sync.requested` and `property_sync.completed`
/// carry, so a consumer need not guess the type from the JSON, and the
/// conch refuses a value that is not what its producer said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TypedValue {
    #[serde(rename = "type")]
    pub kind: ValueType,
    #[serde(default)]
    pub value: Value,
}

impl TypedValue {
    /// A value whose type is read from its JSON (a major 1 value).
    pub fn inferred(value: Value) -> Self {
        TypedValue {
            kind: ValueType::of(&value),
            value,
        }
    }
}

/// `coordination.property_sync.requested`, major 1 (its value untyped), and
/// the body of the synchronous APIs, which keep this shape.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
pub struct SyncRequestV1 {
    pub document_id: String,
    pub property: String,
    #[serde(default)]
    pub value: Value,
    pub base_revision: u64,
    pub author_id: String,
    pub updated_at: DateTime<Utc>,
    /// Only for the APIs: an idempotency key.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// `coordination.property_sync.requested`, major 2: the value carries its
/// type. What the conch's rules work on; a major 1 request is upcast to it
/// (its value's type read from its JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncRequest {
    pub document_id: String,
    pub property: String,
    pub value: TypedValue,
    pub base_revision: u64,
    pub author_id: String,
    pub updated_at: DateTime<Utc>,
    /// Only for the APIs: an idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl From<SyncRequestV1> for SyncRequest {
    fn from(v1: SyncRequestV1) -> Self {
        SyncRequest {
            document_id: v1.document_id,
            property: v1.property,
            value: TypedValue::inferred(v1.value),
            base_revision: v1.base_revision,
            author_id: v1.author_id,
            updated_at: v1.updated_at,
            request_id: v1.request_id,
        }
    }
}

impl Payload for SyncRequest {
    const MAJOR: u64 = 2;
    fn violations(&self) -> Vec<FieldError> {
        SyncRequest::violations(self)
    }
    fn older() -> Vec<Older> {
        vec![Older::upcast::<SyncRequestV1, SyncRequest>(1)]
    }
}

/// `coordination.property_sync.completed`, major 2: the applied value with
/// its type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncCompleted {
    pub document_id: String,
    pub property: String,
    pub value: TypedValue,
    pub revision: u64,
    pub author_id: String,
}

/// `coordination.property_sync.completed`, major 1: the bare value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncCompletedV1 {
    pub document_id: String,
    pub property: String,
    #[serde(default)]
    pub value: Value,
    pub revision: u64,
    pub author_id: String,
}

impl From<SyncCompletedV1> for SyncCompleted {
    fn from(v1: SyncCompletedV1) -> Self {
        SyncCompleted {
            document_id: v1.document_id,
            property: v1.property,
            value: TypedValue::inferred(v1.value),
            revision: v1.revision,
            author_id: v1.author_id,
        }
    }
}

impl From<SyncCompleted> for SyncCompletedV1 {
    fn from(v2: SyncCompleted) -> Self {
        SyncCompletedV1 {
            document_id: v2.document_id,
            property: v2.property,
            value: v2.value.value,
            revision: v2.revision,
            author_id: v2.author_id,
        }
    }
}

impl Payload for SyncCompleted {
    const MAJOR: u64 = 2;
    fn older() -> Vec<Older> {
        vec![
            Older::upcast::<SyncCompletedV1, SyncCompleted>(1)
                .with_downcast::<SyncCompleted, SyncCompletedV1>(),
        ]
    }
}

/// `coordination.conflict.detected`: a write whose base revision was not
/// the property's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConflictDetected {
    pub document_id: String,
    pub property: String,
    pub base_revision: u64,
    pub current_revision: u64,
    pub current_value: Value,
    pub incoming_value: Value,
    pub incoming_author_id: String,
}

impl Payload for ConflictDetected {}

/// `coordination.conflict.resolved`: what the property's policy kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConflictResolved {
    pub document_id: String,
    pub property: String,
    pub policy: Policy,
    pub winner: Winner,
    pub value: Value,
    pub revision: u64,
}

impl Payload for ConflictResolved {}

impl SyncRequest {
    /// The first bad field, if any (see [`SyncRequest::violations`]).
    pub fn validate(&self) -> Result<(), FieldError> {
        match self.violations().into_iter().next() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Every bad field, in the request's field order, so a caller fixes
    /// them all in one round.
    pub fn violations(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (field, value) in [
            ("document_id", &self.document_id),
            ("property", &self.property),
            ("author_id", &self.author_id),
        ] {
            if value.trim().is_empty() {
                errors.push(FieldError {
                    field,
                    message: "must not be empty".into(),
                });
            } else if let Some(message) = id_too_long(value) {
                // Both become parts of keys.
                errors.push(FieldError { field, message });
            }
        }
        if depth(&self.value.value) > MAX_VALUE_DEPTH {
            errors.push(FieldError {
                field: "value",
                message: format!("must not nest deeper than {MAX_VALUE_DEPTH} levels"),
            });
        }
        let actual = ValueType::of(&self.value.value);
        if actual != self.value.kind {
            errors.push(FieldError {
                field: "value.type",
                message: format!(
                    "says {} but the value is {}",
                    json!(self.value.kind),
                    json!(actual)
                ),
            });
        }
        errors
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The later `updated_at` wins; `author_id` breaks ties. The default.
    LastWriterWins,
    /// The value already stored wins.
    FirstWriterWins,
    /// JSON arrays merge (stored items, then new incoming ones); other
    /// values fall back to last-writer-wins.
    Union,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::LastWriterWins => "last_writer_wins",
            Policy::FirstWriterWins => "first_writer_wins",
            Policy::Union => "union",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Winner {
    Current,
    Incoming,
    Merged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    ConflictResolved,
    Duplicate,
}

/// One property as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropertyState {
    pub value: Value,
    /// 0 never appears here: a property that exists has revision ≥ 1.
    pub revision: u64,
    pub author_id: String,
    pub updated_at: DateTime<Utc>,
}

/// What was decided for one cause (event or request), kept so that the same
/// cause handled again republishes the same outputs and changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub cause: String,
    pub outcome: Outcome,
    pub property: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner: Option<Winner>,
    pub outputs: Vec<Outbound>,
}

/// A document's properties: one key-value entry per document, so a
/// document's properties are read and compare-and-set together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DocumentRecord {
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyState>,
    /// The latest receipts, oldest first, bounded by `receipts_kept`.
    #[serde(default)]
    pub receipts: VecDeque<Receipt>,
}

impl DocumentRecord {
    pub fn receipt(&self, cause: &str) -> Option<&Receipt> {
        self.receipts.iter().find(|receipt| receipt.cause == cause)
    }

    /// Decides `request` against this record, updates the record (the
    /// property and a new receipt) and returns the receipt.
    pub fn apply(
        &mut self,
        cause: &str,
        request: &SyncRequest,
        policy: Policy,
        receipts_kept: usize,
    ) -> Receipt {
        let (receipt, update) = decide(
            self.properties.get(&request.property),
            request,
            policy,
            cause,
        );
        if let Some(update) = update {
            self.properties.insert(request.property.clone(), update);
        }
        self.receipts.push_back(receipt.clone());
        while self.receipts.len() > receipts_kept.max(1) {
            self.receipts.pop_front();
        }
        receipt
    }
}

/// The receipt for `request`, and the property's new state if it changes.
fn decide(
    current: Option<&PropertyState>,
    request: &SyncRequest,
    policy: Policy,
    cause: &str,
) -> (Receipt, Option<PropertyState>) {
    let doc = &request.document_id;
    let current_revision = current.map_or(0, |c| c.revision);
    if request.base_revision == current_revision {
        let revision = current_revision + 1;
        let update = PropertyState {
            value: request.value.value.clone(),
            revision,
            author_id: request.author_id.clone(),
            updated_at: request.updated_at,
        };
        let receipt = Receipt {
            cause: cause.to_string(),
            outcome: Outcome::Applied,
            property: request.property.clone(),
            policy: None,
            winner: None,
            outputs: vec![Outbound::new(
                Output::Completed,
                doc,
                SyncCompleted {
                    document_id: doc.clone(),
                    property: request.property.clone(),
                    value: request.value.clone(),
                    revision,
                    author_id: request.author_id.clone(),
                },
            )],
        };
        return (receipt, Some(update));
    }

    let detected = Outbound::new(
        Output::ConflictDetected,
        doc,
        ConflictDetected {
            document_id: doc.clone(),
            property: request.property.clone(),
            base_revision: request.base_revision,
            current_revision,
            current_value: current.map_or(Value::Null, |c| c.value.clone()),
            incoming_value: request.value.value.clone(),
            incoming_author_id: request.author_id.clone(),
        },
    );
    let (winner, value) = resolve(current, request, policy);
    let changed = current.is_none_or(|c| c.value != value);
    let revision = if changed {
        current_revision + 1
    } else {
        current_revision
    };
    // A winner that changes nothing is reported as the stored value winning.
    let winner = if changed { winner } else { Winner::Current };
    let update = changed.then(|| PropertyState {
        value: value.clone(),
        revision,
        author_id: request.author_id.clone(),
        updated_at: current.map_or(request.updated_at, |c| c.updated_at.max(request.updated_at)),
    });
    let resolved = Outbound::new(
        Output::ConflictResolved,
        doc,
        ConflictResolved {
            document_id: doc.clone(),
            property: request.property.clone(),
            policy,
            winner,
            value: value.clone(),
            revision,
        },
    );
    let receipt = Receipt {
        cause: cause.to_string(),
        outcome: Outcome::ConflictResolved,
        property: request.property.clone(),
        policy: Some(policy),
        winner: Some(winner),
        outputs: vec![detected, resolved],
    };
    (receipt, update)
}

fn resolve(
    current: Option<&PropertyState>,
    request: &SyncRequest,
    policy: Policy,
) -> (Winner, Value) {
    let Some(current) = current else {
        // Nothing stored (or deleted): the incoming value has nothing to lose to.
        return (Winner::Incoming, request.value.value.clone());
    };
    match policy {
        Policy::FirstWriterWins => (Winner::Current, current.value.clone()),
        Policy::LastWriterWins => last_writer(current, request),
        Policy::Union => match (&current.value, &request.value.value) {
            (Value::Array(stored), Value::Array(incoming)) => {
                let mut merged = stored.clone();
                for item in incoming {
                    if !merged.contains(item) {
                        merged.push(item.clone());
                    }
                }
                (Winner::Merged, Value::Array(merged))
            }
            _ => last_writer(current, request),
        },
    }
}

fn last_writer(current: &PropertyState, request: &SyncRequest) -> (Winner, Value) {
    let incoming_key = (request.updated_at, request.author_id.as_str());
    let current_key = (current.updated_at, current.author_id.as_str());
    if incoming_key > current_key {
        (Winner::Incoming, request.value.value.clone())
    } else {
        (Winner::Current, current.value.clone())
    }
}

/// Formats a stored property for the HTTP API.
pub fn property_json(name: &str, state: &PropertyState) -> Value {
    json!({
        "name": name,
        "value": state.value,
        "revision": state.revision,
        "author_id": state.author_id,
        "updated_at": rfc3339(&state.updated_at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(base: u64, value: Value, author: &str, at: &str) -> SyncRequest {
        SyncRequest {
            document_id: "doc".into(),
            property: "title".into(),
            value: TypedValue::inferred(value),
            base_revision: base,
            author_id: author.into(),
            updated_at: at.parse().expect("time"),
            request_id: None,
        }
    }

    /// Every request that passes `validate` leaves a record the room can
    /// read back before its next write (found by fuzz/conch_payload).
    #[test]
    fn a_valid_request_leaves_a_record_that_reads_back() {
        let deepest = MAX_VALUE_DEPTH;
        let nested = |depth: usize| -> SyncRequest {
            let text = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            let body = format!(
                r#"{{"document_id":"d","property":"p","value":{text},"base_revision":0,"author_id":"a","updated_at":"2026-01-01T00:00:00Z"}}"#
            );
            serde_json::from_str::<SyncRequestV1>(&body)
                .expect("parses")
                .into()
        };
        assert!(nested(deepest).validate().is_ok());
        assert_eq!(
            nested(deepest + 1).validate().expect_err("too deep").field,
            "value"
        );
        // Numbers: what is stored reads back as the same number.
        let big: SyncRequest = serde_json::from_str::<SyncRequestV1>(
            r#"{"document_id":"d","property":"p","value":[22222222222222575150, 0.1, 1e308],"base_revision":0,"author_id":"a","updated_at":"2026-01-01T00:00:00Z"}"#,
        )
        .expect("parses")
        .into();
        for request in [nested(deepest), big] {
            let mut record = DocumentRecord::default();
            record.apply("e1", &request, Policy::Union, 8);
            record.apply("e2", &request, Policy::Union, 8);
            let stored = serde_json::to_vec(&record).expect("serializes");
            let back: DocumentRecord = serde_json::from_slice(&stored).expect("reads back");
            assert_eq!(back, record);
        }
    }

    #[test]
    fn matching_base_applies_and_counts_revisions() {
        let mut record = DocumentRecord::default();
        let r1 = record.apply(
            "e1",
            &request(0, json!("a"), "ann", "2026-01-01T00:00:00Z"),
            Policy::LastWriterWins,
            8,
        );
        assert_eq!(r1.outcome, Outcome::Applied);
        assert_eq!(r1.outputs[0].payload["revision"], 1);
        let r2 = record.apply(
            "e2",
            &request(1, json!("b"), "bob", "2026-01-01T00:00:01Z"),
            Policy::LastWriterWins,
            8,
        );
        assert_eq!(r2.outputs[0].payload["revision"], 2);
        assert_eq!(record.properties["title"].value, json!("b"));
        assert_eq!(record.properties["title"].revision, 2);
    }

    #[test]
    fn stale_write_detects_and_last_writer_wins() {
        let mut record = DocumentRecord::default();
        record.apply(
            "e1",
            &request(0, json!("a"), "ann", "2026-01-01T00:00:05Z"),
            Policy::LastWriterWins,
            8,
        );
        // Older timestamp: the stored value stays, revision unchanged.
        let older = record.apply(
            "e2",
            &request(0, json!("b"), "bob", "2026-01-01T00:00:01Z"),
            Policy::LastWriterWins,
            8,
        );
        assert_eq!(older.outcome, Outcome::ConflictResolved);
        use crate::cocoa_butter::kit::Action;
        assert_eq!(older.outputs[0].action, Output::ConflictDetected.as_str());
        assert_eq!(older.outputs[0].payload["current_value"], "a");
        assert_eq!(older.outputs[1].payload["winner"], "current");
        assert_eq!(older.outputs[1].payload["revision"], 1);
        assert_eq!(record.properties["title"].revision, 1);
        // Newer timestamp: incoming wins and the revision moves.
        let newer = record.apply(
            "e3",
            &request(0, json!("c"), "cat", "2026-01-01T00:00:09Z"),
            Policy::LastWriterWins,
            8,
        );
        assert_eq!(newer.outputs[1].payload["winner"], "incoming");
        assert_eq!(newer.outputs[1].payload["revision"], 2);
        assert_eq!(record.properties["title"].value, json!("c"));
    }

    #[test]
    fn same_time_ties_break_on_author() {
        let mut record = DocumentRecord::default();
        record.apply(
            "e1",
            &request(0, json!("a"), "bob", "2026-01-01T00:00:00Z"),
            Policy::LastWriterWins,
            8,
        );
        let ann = record.apply(
            "e2",
            &request(0, json!("x"), "ann", "2026-01-01T00:00:00Z"),
            Policy::LastWriterWins,
            8,
        );
        assert_eq!(ann.winner, Some(Winner::Current));
        let cat = record.apply(
            "e3",
            &request(0, json!("y"), "cat", "2026-01-01T00:00:00Z"),
            Policy::LastWriterWins,
            8,
        );
        assert_eq!(cat.winner, Some(Winner::Incoming));
    }

    #[test]
    fn first_writer_and_union() {
        let mut record = DocumentRecord::default();
        record.apply(
            "e1",
            &request(0, json!(["a", "b"]), "ann", "2026-01-01T00:00:00Z"),
            Policy::Union,
            8,
        );
        let first = record.apply(
            "e2",
            &request(0, json!(["z"]), "bob", "2026-01-02T00:00:00Z"),
            Policy::FirstWriterWins,
            8,
        );
        assert_eq!(first.winner, Some(Winner::Current));
        let union = record.apply(
            "e3",
            &request(0, json!(["b", "c"]), "bob", "2026-01-02T00:00:00Z"),
            Policy::Union,
            8,
        );
        assert_eq!(union.winner, Some(Winner::Merged));
        assert_eq!(record.properties["title"].value, json!(["a", "b", "c"]));
        assert_eq!(record.properties["title"].revision, 2);
        // Merging what is already there changes nothing.
        let again = record.apply(
            "e4",
            &request(0, json!(["a"]), "bob", "2026-01-03T00:00:00Z"),
            Policy::Union,
            8,
        );
        assert_eq!(again.winner, Some(Winner::Current));
        assert_eq!(record.properties["title"].revision, 2);
    }

    #[test]
    fn receipts_are_bounded_and_found() {
        let mut record = DocumentRecord::default();
        for i in 0..5u64 {
            record.apply(
                &format!("e{i}"),
                &request(i, json!(i), "ann", "2026-01-01T00:00:00Z"),
                Policy::LastWriterWins,
                3,
            );
        }
        assert_eq!(record.receipts.len(), 3);
        assert!(record.receipt("e1").is_none());
        assert!(record.receipt("e4").is_some());
    }

    #[test]
    fn validation_names_the_field() {
        let mut bad = request(0, json!(1), "ann", "2026-01-01T00:00:00Z");
        bad.property = " ".into();
        assert_eq!(bad.validate().expect_err("empty").field, "property");
    }

    mod upcasting {
        use proptest::prelude::*;

        use super::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                (-1.0e9f64..1.0e9).prop_map(Value::from),
                "[a-z]{0,8}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                        .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            })
        }

        fn policy() -> impl Strategy<Value = Policy> {
            prop_oneof![
                Just(Policy::LastWriterWins),
                Just(Policy::FirstWriterWins),
                Just(Policy::Union),
            ]
        }

        /// A request decoded as the room decodes it: its payload brought to
        /// the current major by the contract's upcasters first.
        fn as_handled(version: &str, payload: &Value) -> SyncRequest {
            let contract = (crate::rooms::conch::SPEC.contracts)()
                .into_iter()
                .find(|c| c.action == "property_sync.requested")
                .expect("the input's contract");
            let bytes = serde_json::to_vec(payload).expect("json");
            let current = contract
                .to_current(version, &bytes)
                .expect("a major the conch reads")
                .unwrap_or(bytes);
            serde_json::from_slice(&current).expect("the current shape")
        }

        proptest! {
            /// Upcasting a major 1 request and handling it gives what
            /// handling the same request written at major 2 gives: the same
            /// receipt, outputs and record, whatever was stored before.
            #[test]
            fn a_v1_request_upcast_is_handled_as_its_v2_twin(
                stored in json_value(),
                value in json_value(),
                base in 0u64..3,
                policy in policy(),
                later in any::<bool>(),
            ) {
                let at = if later { "2026-03-02T10:00:00Z" } else { "2026-02-28T10:00:00Z" };
                let fields = |value: Value| json!({
                    "document_id": "doc", "property": "p", "value": value,
                    "base_revision": base, "author_id": "bob", "updated_at": at,
                });
                let v1 = fields(value.clone());
                let v2 = fields(json!({"type": ValueType::of(&value), "value": value}));
                let mut record = DocumentRecord::default();
                let first = request(0, stored, "ann", "2026-03-01T10:00:00Z");
                record.apply("seed", &first, policy, 8);
                let mut via_v1 = record.clone();
                let mut via_v2 = record;
                let from_v1 = via_v1.apply("e", &as_handled("1.0.0", &v1), policy, 8);
                let from_v2 = via_v2.apply("e", &as_handled("2.0.0", &v2), policy, 8);
                prop_assert_eq!(from_v1, from_v2);
                prop_assert_eq!(via_v1, via_v2);
            }
        }
    }
}
