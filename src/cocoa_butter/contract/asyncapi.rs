//! The AsyncAPI 3 document of the rooms, made from the catalogue: a channel
//! per subject, a message per event and major (the envelope, its payload's
//! schema inside), and an operation per room and direction (`receive` for
//! what a room consumes, `send` for what it publishes). Validated in the
//! tests by the AsyncAPI project's own parser (`tests/contracts.rs`).

use serde_json::{Map, Value, json};

use super::Direction;
use super::catalogue::{Catalogue, CatalogueEvent};

/// A name AsyncAPI accepts as a key (`^[A-Za-z0-9_.\-]+$`).
fn key(event_type: &str) -> String {
    event_type.replace(['.', '-'], "_")
}

fn message_key(event: &CatalogueEvent, major: u64) -> String {
    format!("{}_v{major}", key(&event.event_type))
}

/// The envelope carrying a payload of `schema` at `major`.
fn envelope(schema: &Value, major: u64) -> Value {
    json!({
        "type": "object",
        "required": ["event_id", "event_type", "aggregate_id", "content_hash",
                     "schema_version", "payload", "created_at"],
        "properties": {
            "event_id": {"type": "string", "description": "UUIDv7 of the event"},
            "event_type": {"type": "string", "description": "<domain>.<action>"},
            "aggregate_id": {"type": "string"},
            "correlation_id": {"type": "string"},
            "content_hash": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$",
                             "description": "hex SHA-256 of the payload's bytes"},
            "schema_version": {"type": "string", "pattern": format!("^{major}\\.[0-9]+\\.[0-9]+$"),
                               "description": "the payload schema's version: its major is this message's"},
            "payload": {
                "type": "string",
                "contentEncoding": "base64",
                "contentMediaType": "application/json",
                "description": "the payload's JSON bytes, standard base64 (Go's []byte)",
                "x-decoded-schema": schema,
            },
            "created_at": {"type": "string", "format": "date-time"},
            "source_service": {"type": "string"},
        }
    })
}

/// The document.
pub fn document(catalogue: &Catalogue) -> Value {
    let mut channels = Map::new();
    let mut messages = Map::new();
    let mut operations = Map::new();
    for event in &catalogue.events {
        let channel = key(&event.event_type);
        let mut channel_messages = Map::new();
        for major in &event.majors {
            let name = message_key(event, major.major);
            let schema = catalogue
                .schemas
                .get(&major.schema)
                .cloned()
                .unwrap_or(Value::Bool(true));
            messages.insert(
                name.clone(),
                json!({
                    "name": name,
                    "title": format!("{} v{}", event.event_type, major.major),
                    "summary": event.summary,
                    "contentType": "application/json",
                    "headers": {
                        "type": "object",
                        "properties": {
                            "Nats-Msg-Id": {"type": "string"},
                            "Choco-Event-Type": {"type": "string", "const": event.event_type},
                            "Choco-Correlation-Id": {"type": "string"},
                            "traceparent": {"type": "string"},
                        }
                    },
                    "payload": envelope(&schema, major.major),
                }),
            );
            channel_messages.insert(
                format!("v{}", major.major),
                json!({"$ref": format!("#/components/messages/{name}")}),
            );
        }
        channels.insert(
            channel.clone(),
            json!({
                "address": event.subject,
                "description": format!(
                    "{} Stream {}; ordered per aggregate ({}), {}.",
                    event.summary, event.stream, event.aggregate, event.ordering
                ),
                "messages": channel_messages,
            }),
        );
        let (verb, action) = match event.direction {
            Direction::Input => ("consumes", "receive"),
            Direction::Output => ("publishes", "send"),
        };
        let refs: Vec<Value> = event
            .majors
            .iter()
            .map(|major| json!({"$ref": format!("#/channels/{channel}/messages/v{}", major.major)}))
            .collect();
        operations.insert(
            format!("{}_{verb}_{channel}", event.room),
            json!({
                "action": action,
                "channel": {"$ref": format!("#/channels/{channel}")},
                "summary": format!("{} {verb} {}", event.service, event.event_type),
                "messages": refs,
            }),
        );
    }
    json!({
        "asyncapi": "3.1.0",
        "info": {
            "title": "choco-factory",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The events the factory's rooms consume and publish on NATS JetStream \
                            (choco.events.<domain>.<action>), each an envelope whose payload \
                            has a versioned schema. Generated by `choco-factory events write`.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {"host": "localhost:4222", "protocol": "nats",
                     "description": "any server of the JetStream cluster"}
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    })
}
