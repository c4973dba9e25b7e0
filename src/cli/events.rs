//! `publish` and `tail`: put one event on the bus, or watch a subject.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::connect::{load_bus_only, publish_stored, with_nats};
use super::output::{emit, emit_json};
use super::{JsonFlag, Refused};
use crate::cocoa_butter::config::ConfigSources;

#[derive(Debug, Args)]
pub(super) struct PublishArgs {
    /// `<domain>.<action>`, e.g. coordination.property_sync.requested.
    #[arg(long = "type", value_name = "TYPE", value_parser = EventType::parse)]
    event_type: EventType,
    /// The aggregate the event is about (a document id); events of one
    /// aggregate are handled in order.
    #[arg(long, value_name = "ID")]
    aggregate: String,
    /// The payload as JSON text.
    #[arg(
        long,
        value_name = "JSON",
        conflicts_with = "payload_file",
        required_unless_present = "payload_file"
    )]
    payload: Option<String>,
    /// A file holding the payload as JSON.
    #[arg(long, value_name = "FILE")]
    payload_file: Option<PathBuf>,
    /// The correlation id the event carries; without it, none is set.
    #[arg(long, value_name = "ID")]
    correlation: Option<String>,
    /// The payload's schema version (`choco-factory events` lists each
    /// event's majors): 1.0.0 unless the payload is of a later major.
    #[arg(long, value_name = "VERSION", default_value = "1.0.0", value_parser = schema_version)]
    schema_version: String,
    #[command(flatten)]
    format: JsonFlag,
}

/// `MAJOR.MINOR.PATCH`, checked by clap (a usage error otherwise).
fn schema_version(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() == 3 && parts.iter().all(|p| p.parse::<u64>().is_ok()) {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not MAJOR.MINOR.PATCH, like 2.0.0"))
    }
}

/// An event type as `--type` takes it: `<domain>.<action>`.
#[derive(Debug, Clone)]
struct EventType {
    domain: String,
    action: String,
}

impl EventType {
    /// Checked by clap, so a bad type is a usage error (exit 2) like any
    /// other bad flag.
    fn parse(text: &str) -> Result<Self, String> {
        let valid_token = |token: &str| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        match text.split_once('.') {
            Some((domain, action)) if valid_token(domain) && action.split('.').all(valid_token) => {
                Ok(EventType {
                    domain: domain.to_string(),
                    action: action.to_string(),
                })
            }
            _ => Err(format!(
                "{text:?} is not <domain>.<action>, like coordination.property_sync.requested"
            )),
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.domain, self.action)
    }
}

#[derive(Debug, Args)]
pub(super) struct TailArgs {
    /// A subject or wildcard, e.g. choco.events.coordination.>
    subject: String,
    /// Pretty-print each envelope over several lines.
    #[arg(long)]
    pretty: bool,
    /// Stop after this many messages.
    #[arg(long, value_name = "N")]
    count: Option<usize>,
}

pub(super) fn publish(sources: &ConfigSources, args: &PublishArgs) -> anyhow::Result<()> {
    let config = &load_bus_only(sources)?;
    with_nats(config, |client| publish_one(client, args))
}

pub(super) fn tail(sources: &ConfigSources, args: &TailArgs) -> anyhow::Result<()> {
    let config = &load_bus_only(sources)?;
    with_nats(config, |client| follow(client, args))
}

async fn publish_one(client: async_nats::Client, args: &PublishArgs) -> anyhow::Result<()> {
    use crate::cocoa_butter::EventEnvelope;
    let payload = match (&args.payload, &args.payload_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path)
            .map_err(|err| Refused(format!("--payload-file {}: {err}", path.display())))?,
        // clap requires one of the two.
        (None, None) => return Err(Refused::new("--payload or --payload-file is required").into()),
    };
    serde_json::from_slice::<serde_json::Value>(&payload)
        .map_err(|err| Refused(format!("the payload is not JSON: {err}")))?;
    let (domain, action) = (&args.event_type.domain, &args.event_type.action);
    let mut envelope = EventEnvelope::new(
        uuid::Uuid::now_v7(),
        args.event_type.to_string(),
        args.aggregate.clone(),
        args.correlation.clone().unwrap_or_default(),
        payload,
        "choco-factory-cli".into(),
    );
    envelope.schema_version = args.schema_version.clone();
    let subject = format!("choco.events.{domain}.{action}");
    let js = async_nats::jetstream::new(client);
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(envelope.encode().into())
        .message_id(envelope.event_id.clone());
    let ack = publish_stored(&js, subject.clone(), message).await?;
    if args.format.json {
        return emit_json(&serde_json::json!({
            "event_id": envelope.event_id,
            "subject": subject,
            "stream": ack.stream,
            "sequence": ack.sequence,
        }));
    }
    emit(&format!(
        "published {} to {subject} (stream {}, sequence {})\n",
        envelope.event_id, ack.stream, ack.sequence
    ))
}

async fn follow(client: async_nats::Client, args: &TailArgs) -> anyhow::Result<()> {
    use crate::cocoa_butter::EventEnvelope;
    use futures::StreamExt;
    let mut subscription = client
        .subscribe(args.subject.clone())
        .await
        .with_context(|| format!("subscribing to {}", args.subject))?;
    let mut seen = 0usize;
    while let Some(message) = subscription.next().await {
        let mut json = serde_json::json!({ "subject": message.subject.as_str() });
        match EventEnvelope::decode(&message.payload) {
            Ok(envelope) => {
                let payload: serde_json::Value = serde_json::from_slice(&envelope.payload)
                    .unwrap_or_else(|_| {
                        serde_json::Value::String(
                            String::from_utf8_lossy(&envelope.payload).into_owned(),
                        )
                    });
                let mut value = serde_json::to_value(&envelope)?;
                value["payload"] = payload;
                json["envelope"] = value;
            }
            Err(err) => {
                json["error"] = serde_json::Value::String(err.to_string());
                json["body"] = serde_json::Value::String(
                    String::from_utf8_lossy(&message.payload).into_owned(),
                );
            }
        }
        let line = if args.pretty {
            serde_json::to_string_pretty(&json)?
        } else {
            json.to_string()
        };
        emit(&(line + "\n"))?;
        seen += 1;
        if args.count.is_some_and(|count| seen >= count) {
            break;
        }
    }
    Ok(())
}
