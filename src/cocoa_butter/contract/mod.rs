//! Event contracts: what each room consumes and publishes, as payload types
//! with a major version each, and the steps between majors.
//!
//! A room lists one [`EventContract`] per input and per output in its
//! `RoomSpec::contracts`. Each names the Rust type its handler decodes (or
//! builds), so the JSON Schemas of the catalogue (`catalogue.rs`, checked
//! in under `contracts/`) are generated from what the code really reads.
//!
//! The envelope's `schema_version` is the version of its payload's schema.
//! An input of an older major passes through a chain of upcasters before
//! the room's handler sees it — pure functions, one per step (v1 → v2 →
//! v3), registered beside the payload type — so a handler only ever sees
//! the current shape. A major newer than the room knows, or older than the
//! oldest it still upcasts, is dead-lettered `unsupported_schema_version`;
//! a minor or patch difference is accepted as is. An output is published at
//! its current major, or at the previous one while a room's
//! `publish_previous_major` is on (a migration window for its consumers).
//!
//! Adding a version of an event: the new type, one upcaster from the old
//! one, and one line in the type's [`Payload::older`]; then
//! `choco-factory events write` regenerates `contracts/`.

pub mod asyncapi;
pub mod catalogue;
pub mod example;
pub mod wire;

use schemars::{JsonSchema, Schema};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::cocoa_butter::api::{FieldError, decode_json, snake_case};
use crate::cocoa_butter::envelope::OutputAction;
pub use crate::cocoa_butter::envelope::major_of;

/// A payload type at its current major.
pub trait Payload: JsonSchema {
    /// The major of this shape: what the envelope's `schema_version` starts
    /// with.
    const MAJOR: u64 = 1;

    /// The room's rules for the payload beyond its shape, each naming its
    /// field; `events check` runs them as the room does.
    fn violations(&self) -> Vec<FieldError> {
        Vec::new()
    }

    /// The older majors still accepted, oldest first, each with its schema
    /// and its step to the next major.
    fn older() -> Vec<Older> {
        Vec::new()
    }
}

/// Any JSON: for an event whose payload the room does not read.
impl Payload for Value {}

/// A schemars transform for a type that also accepts the snake_case
/// spelling of each of its camelCase fields (`#[serde(alias)]`, which
/// schemars does not read): each such property is listed under both names,
/// and a required one is satisfied by either.
pub fn snake_case_aliases(schema: &mut Schema) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let camel: Vec<(String, String)> = object
        .get("properties")
        .and_then(Value::as_object)
        .map(|properties| {
            properties
                .keys()
                .filter(|name| name.chars().any(|c| c.is_ascii_uppercase()))
                .map(|name| (name.clone(), snake_case(name)))
                .collect()
        })
        .unwrap_or_default();
    if let Some(properties) = object.get_mut("properties").and_then(Value::as_object_mut) {
        for (name, snake) in &camel {
            if let Some(property) = properties.get(name).cloned() {
                properties.insert(snake.clone(), property);
            }
        }
    }
    let required: Vec<String> = object
        .get("required")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let (either, plain): (Vec<_>, Vec<_>) = required
        .into_iter()
        .partition(|name| camel.iter().any(|(camel, _)| camel == name));
    object.insert("required".into(), Value::from(plain));
    let alternatives: Vec<Value> = either
        .iter()
        .filter_map(|name| camel.iter().find(|(camel, _)| camel == name))
        .map(|(camel, snake)| {
            serde_json::json!({"anyOf": [{"required": [camel]}, {"required": [snake]}]})
        })
        .collect();
    if !alternatives.is_empty() {
        object.insert("allOf".into(), Value::from(alternatives));
    }
}

/// Decodes a payload's bytes as its type and applies the room's rules: the
/// first problem, naming its field.
pub type PayloadCheck = fn(&[u8]) -> Result<(), String>;

/// A pure step between two majors of one payload, on its JSON.
pub type Step = fn(Value) -> Result<Value, StepError>;

/// A step could not read the payload it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StepError(pub String);

/// One older major of a payload.
#[derive(Clone, Copy)]
pub struct Older {
    pub major: u64,
    pub schema: fn() -> Schema,
    /// This major's payload as the next major's.
    pub upcast: Step,
    /// The next major's payload as this one's, for an output published at
    /// the previous major during a migration window; `None` for an input.
    pub downcast: Option<Step>,
}

impl Older {
    /// Major `major`, read as `From` and turned into `To` (the next major)
    /// by `From`'s `Into`.
    pub fn upcast<From, To>(major: u64) -> Older
    where
        From: DeserializeOwned + JsonSchema + Into<To>,
        To: Serialize,
    {
        Older {
            major,
            schema: schema_of::<From>,
            upcast: step::<From, To>,
            downcast: None,
        }
    }

    /// With the step back from the next major (`To` read, `From` written).
    pub fn with_downcast<To, From>(mut self) -> Older
    where
        To: DeserializeOwned + Into<From>,
        From: Serialize,
    {
        self.downcast = Some(step::<To, From>);
        self
    }
}

/// The JSON Schema of `T`: draft-07 (what AsyncAPI 3's schema format and
/// most validators read), every subschema inlined so that it can be
/// embedded in the AsyncAPI document without references to resolve.
pub fn schema_of<T: JsonSchema>() -> Schema {
    let mut settings = schemars::generate::SchemaSettings::draft07();
    settings.inline_subschemas = true;
    settings.into_generator().into_root_schema_for::<T>()
}

/// A step through the types: the JSON read as `From`, converted, written.
fn step<From, To>(value: Value) -> Result<Value, StepError>
where
    From: DeserializeOwned + Into<To>,
    To: Serialize,
{
    let from: From = serde_json::from_value(value).map_err(|err| StepError(err.to_string()))?;
    serde_json::to_value(from.into()).map_err(|err| StepError(err.to_string()))
}

/// Which way an event goes, seen from the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The room consumes it.
    Input,
    /// The room publishes it.
    Output,
}

/// One event a room consumes or publishes.
#[derive(Clone)]
pub struct EventContract {
    /// The action after the room's prefix (`property_sync.requested`).
    pub action: &'static str,
    pub direction: Direction,
    /// What the event means, in one line.
    pub summary: &'static str,
    /// What the envelope's `aggregate_id` is for this event.
    pub aggregate: &'static str,
    pub current: u64,
    pub schema: fn() -> Schema,
    /// Oldest first.
    pub older: Vec<Older>,
    /// An input's decoder and rules, on its current major's payload: what
    /// the room's handler applies, for `events check`.
    pub check: Option<PayloadCheck>,
}

/// Decodes `P` as a handler does and applies its rules: the first problem,
/// naming its field.
fn check_payload<P: Payload + DeserializeOwned>(payload: &[u8]) -> Result<(), String> {
    let decoded: P = decode_json(payload).map_err(|err| err.to_string())?;
    match decoded.violations().into_iter().next() {
        Some(violation) => Err(violation.to_string()),
        None => Ok(()),
    }
}

/// Why an input's payload cannot be brought to its current major.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// Newer than the room knows, or older than the oldest it upcasts.
    #[error("schema_version {version:?} of {action}: this room reads majors {majors}")]
    UnsupportedMajor {
        action: String,
        version: String,
        majors: String,
    },
    /// The payload does not hold its own major's shape.
    #[error("{action} at major {major} cannot be upcast: {source}")]
    Upcast {
        action: String,
        major: u64,
        #[source]
        source: StepError,
    },
}

impl EventContract {
    /// An input the room's handler decodes as `P`.
    pub fn input<P: Payload + DeserializeOwned>(
        action: impl crate::cocoa_butter::envelope::Action,
        summary: &'static str,
    ) -> Self {
        EventContract {
            check: Some(check_payload::<P>),
            ..Self::of::<P>(action.as_str(), Direction::Input, summary)
        }
    }

    /// An output the room builds as `P`.
    pub fn output<P: Payload>(
        action: impl crate::cocoa_butter::envelope::OutputAction,
        summary: &'static str,
    ) -> Self {
        Self::of::<P>(action.as_str(), Direction::Output, summary)
    }

    fn of<P: Payload>(action: &'static str, direction: Direction, summary: &'static str) -> Self {
        EventContract {
            action,
            direction,
            summary,
            aggregate: "the document (`document_id`)",
            current: P::MAJOR,
            schema: schema_of::<P>,
            older: P::older(),
            check: None,
        }
    }

    /// What the envelope's `aggregate_id` names, when not the document.
    pub fn about(mut self, aggregate: &'static str) -> Self {
        self.aggregate = aggregate;
        self
    }

    /// Every major, oldest first, with its schema.
    pub fn majors(&self) -> Vec<(u64, fn() -> Schema)> {
        self.older
            .iter()
            .map(|older| (older.major, older.schema))
            .chain([(self.current, self.schema)])
            .collect()
    }

    fn majors_text(&self) -> String {
        let majors: Vec<String> = self
            .majors()
            .iter()
            .map(|(major, _)| major.to_string())
            .collect();
        majors.join(", ")
    }

    /// The payload at the current major: `None` when it already is, the
    /// upcast JSON when it was older.
    pub fn to_current(
        &self,
        version: &str,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, ContractError> {
        let unsupported = || ContractError::UnsupportedMajor {
            action: self.action.to_string(),
            version: version.to_string(),
            majors: self.majors_text(),
        };
        let major = major_of(version).ok_or_else(unsupported)?;
        if major == self.current {
            return Ok(None);
        }
        let first = self
            .older
            .iter()
            .position(|older| older.major == major)
            .ok_or_else(unsupported)?;
        let invalid = |major: u64, source: StepError| ContractError::Upcast {
            action: self.action.to_string(),
            major,
            source,
        };
        let mut value: Value = serde_json::from_slice(payload)
            .map_err(|err| invalid(major, StepError(err.to_string())))?;
        for older in &self.older[first..] {
            value = (older.upcast)(value).map_err(|err| invalid(older.major, err))?;
        }
        serde_json::to_vec(&value)
            .map(Some)
            .map_err(|err| invalid(major, StepError(err.to_string())))
    }

    /// The output's payload at the previous major (with that major), when
    /// it has one that can be written back to.
    pub fn to_previous(&self, payload: &Value) -> Option<Result<(u64, Value), StepError>> {
        let previous = self.older.last()?;
        let downcast = previous.downcast?;
        Some(downcast(payload.clone()).map(|value| (previous.major, value)))
    }
}

/// The `schema_version` an event of major `major` carries.
pub fn version_of(major: u64) -> String {
    format!("{major}.0.0")
}

impl std::fmt::Debug for EventContract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventContract")
            .field("action", &self.action)
            .field("direction", &self.direction)
            .field("majors", &self.majors_text())
            .finish()
    }
}

/// A room's contracts, looked up by action.
#[derive(Debug, Clone, Default)]
pub struct Contracts {
    events: Vec<EventContract>,
}

impl Contracts {
    pub fn new(events: Vec<EventContract>) -> Self {
        Contracts { events }
    }

    pub fn get(&self, action: &str) -> Option<&EventContract> {
        self.events.iter().find(|event| event.action == action)
    }

    pub fn iter(&self) -> impl Iterator<Item = &EventContract> {
        self.events.iter()
    }

    /// Where the contracts and the room's declared actions disagree: an
    /// input or output without a contract, a contract of neither, or one
    /// in the wrong direction. Empty when they agree.
    pub fn mismatches(&self, inputs: &[&str], outputs: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        for (actions, direction) in [(inputs, Direction::Input), (outputs, Direction::Output)] {
            for action in actions {
                match self.get(action) {
                    None => problems.push(format!("{action} has no contract")),
                    Some(event) if event.direction != direction => {
                        problems.push(format!("{action} is declared as the other direction"))
                    }
                    Some(_) => {}
                }
            }
        }
        for event in &self.events {
            if !inputs.contains(&event.action) && !outputs.contains(&event.action) {
                problems.push(format!(
                    "{} has a contract but is neither an input nor an output",
                    event.action
                ));
            }
        }
        problems
    }
}

/// An event a room wants published on its prefix.
///
/// It knows the major of its payload's shape: an output built by this
/// binary has its type's [`Payload::MAJOR`]; one read back from before
/// majors were recorded (a receipt the conch kept) is major 1, so
/// republishing it labels it as what it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Outbound {
    /// `conflict.detected`; the subject is the room's prefix plus this.
    pub action: String,
    pub aggregate_id: String,
    pub payload: serde_json::Value,
    /// Deduplicates by what the output says rather than by what caused it:
    /// when set, the `Nats-Msg-Id` is derived from this key and the
    /// payload's content hash, so two inputs producing the same output
    /// (same key, same payload) inside the duplicate window store it once.
    /// The key need not repeat the payload: it says what the output is
    /// about, the hash what it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The major of `payload`'s shape.
    #[serde(default = "first_major")]
    pub major: u64,
}

fn first_major() -> u64 {
    1
}

impl Outbound {
    /// The output `action` (one the room declares) about `aggregate_id`,
    /// its payload the action's contract type (or JSON).
    pub fn new<P: Payload + Serialize>(
        action: impl OutputAction,
        aggregate_id: &str,
        payload: P,
    ) -> Self {
        Outbound {
            action: action.as_str().to_string(),
            aggregate_id: aggregate_id.to_string(),
            // The payload types are plain structs of strings, numbers and
            // JSON values, whose serializing cannot fail; a null would be
            // refused by every consumer's schema rather than pass unseen.
            payload: serde_json::to_value(payload).unwrap_or_default(),
            idempotency_key: None,
            major: P::MAJOR,
        }
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

#[cfg(test)]
mod tests;
