//! `streams status|ensure`: the rooms' streams, consumers and buckets as
//! JetStream has them, and creating what is missing.

use std::fmt::Write as _;

use anyhow::Context;
use clap::Subcommand;

use super::JsonFlag;
use super::connect::{load, load_bus_only, with_nats};
use super::output::{emit, emit_json, progress};
use crate::cocoa_butter::config::{ConfigSources, ValidatedConfig};
use crate::cocoa_butter::runtime;
use crate::rooms::REGISTRY;

#[derive(Debug, Subcommand)]
pub(super) enum StreamsCommand {
    /// Each enabled room's stream and consumer: messages, bytes, replicas
    /// and leader, pending, ack-pending, redeliveries, dead letters, last
    /// activity.
    Status(JsonFlag),
    /// Create the missing streams, consumers and buckets from the configuration,
    /// update drifted ones, and report what was found; exit 1 if any fails.
    Ensure(JsonFlag),
}

pub(super) fn run(sources: &ConfigSources, command: &StreamsCommand) -> anyhow::Result<()> {
    match command {
        StreamsCommand::Status(format) => {
            let config = &load_bus_only(sources)?;
            with_nats(config, |client| status(client, config, format.json))
        }
        StreamsCommand::Ensure(format) => {
            // The rooms are built to prepare their buckets: their settings
            // must pass the same checks as for `serve`.
            let config = &load(sources)?;
            with_nats(config, |client| ensure(client, config, format.json))
        }
    }
}

async fn status(
    client: async_nats::Client,
    config: &ValidatedConfig,
    json: bool,
) -> anyhow::Result<()> {
    use crate::cocoa_butter::{dlq, nats};
    let js = async_nats::jetstream::new(client);
    let nats = &config.factory.nats;
    let mut rows = Vec::new();
    for room in config.enabled_rooms() {
        let (stream, consumer) = nats::room_status(&js, room)
            .await
            .with_context(|| format!("reading the stream and consumer of {}", room.name))?;
        let dead_letters = dlq::count_for_room(&js, nats, &room.name)
            .await
            .with_context(|| format!("counting the dead letters of {}", room.name))?;
        rows.push(serde_json::json!({
            "room": room.name,
            "stream": stream,
            "consumer": consumer,
            "dead_letters": dead_letters,
        }));
    }
    if json {
        return emit_json(&rows);
    }
    // Rows are padded to columns; the last column's padding is trimmed.
    let mut out = String::new();
    writeln!(
        out,
        "{:<9} {:<27} {:>8} {:>10} {:>5} {:<8} {:<16} {:>8} {:>8} {:>7} {:>5}  {:<20}  {:<20}",
        "ROOM",
        "STREAM",
        "MESSAGES",
        "BYTES",
        "REPL",
        "LEADER",
        "CONSUMER",
        "PENDING",
        "ACK PEND",
        "REDELIV",
        "DLQ",
        "LAST STORED",
        "LAST DELIVERED"
    )?;
    let number = |value: &serde_json::Value, exists: bool| {
        if exists {
            value.as_u64().map_or("-".to_string(), |n| n.to_string())
        } else {
            "-".to_string()
        }
    };
    for row in &rows {
        let stream = &row["stream"];
        let consumer = &row["consumer"];
        let stream_exists = stream["exists"].as_bool().unwrap_or(false);
        let consumer_exists = consumer["exists"].as_bool().unwrap_or(false);
        let name = |part: &serde_json::Value, exists: bool| {
            let name = part["name"].as_str().unwrap_or_default();
            if exists {
                name.to_string()
            } else {
                format!("{name} (missing)")
            }
        };
        let when =
            |part: &serde_json::Value| part["last_activity"].as_str().unwrap_or("-").to_string();
        // Up-to-date copies of the configured: `2/3` is under-replicated.
        let replication = &stream["replication"];
        let copies = if stream_exists {
            let current = usize::from(replication["leader"].is_string())
                + replication["replicas"].as_array().map_or(0, |replicas| {
                    replicas
                        .iter()
                        .filter(|r| r["current"] == true && r["offline"] != true)
                        .count()
                });
            format!(
                "{current}/{}",
                stream["limits"]["replicas"].as_u64().unwrap_or(1)
            )
        } else {
            "-".into()
        };
        let leader = match replication["leader"].as_str() {
            Some(leader) => leader.to_string(),
            None if stream_exists => "none".into(),
            None => "-".into(),
        };
        writeln!(
            out,
            "{:<9} {:<27} {:>8} {:>10} {:>5} {:<8} {:<16} {:>8} {:>8} {:>7} {:>5}  {:<20}  {:<20}",
            row["room"].as_str().unwrap_or_default(),
            name(stream, stream_exists),
            number(&stream["messages"], stream_exists),
            number(&stream["bytes"], stream_exists),
            copies,
            leader,
            name(consumer, consumer_exists),
            number(&consumer["pending"], consumer_exists),
            number(&consumer["ack_pending"], consumer_exists),
            number(&consumer["redeliveries"], consumer_exists),
            number(&row["dead_letters"], true),
            when(stream),
            when(consumer),
        )?;
    }
    let trimmed: Vec<&str> = out.lines().map(str::trim_end).collect();
    emit(&(trimmed.join("\n") + "\n"))
}

/// One line of `streams ensure`: what was looked at and what was found.
#[derive(Debug, serde::Serialize)]
struct Ensured {
    kind: &'static str,
    name: String,
    /// `ok`, `created`, `drift`, `drift updated`, `prepared` or `error`.
    outcome: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    detail: Vec<String>,
}

impl Ensured {
    fn from_result<E: std::fmt::Display>(
        kind: &'static str,
        name: &str,
        result: Result<crate::cocoa_butter::nats::Provisioned, E>,
    ) -> Self {
        use crate::cocoa_butter::nats::Provisioned;
        let (outcome, detail) = match result {
            Ok(Provisioned::Present) => ("ok", Vec::new()),
            Ok(Provisioned::Created) => ("created", Vec::new()),
            Ok(Provisioned::Drifted { drift, updated }) => {
                (if updated { "drift updated" } else { "drift" }, drift)
            }
            Err(err) => ("error", vec![err.to_string()]),
        };
        Ensured {
            kind,
            name: name.to_string(),
            outcome: outcome.to_string(),
            detail,
        }
    }
}

async fn ensure(
    client: async_nats::Client,
    config: &ValidatedConfig,
    json: bool,
) -> anyhow::Result<()> {
    use crate::cocoa_butter::control::{CONTROL_BUCKET, Control};
    use crate::cocoa_butter::dlq;
    use crate::cocoa_butter::metrics::RoomMetrics;
    use crate::cocoa_butter::nats::{self, Publisher};
    use crate::cocoa_butter::room::RoomContext;
    // The operator asked for it: create and update even where the rooms
    // themselves only check (`nats.provision = false`).
    let mut nats = config.factory.nats.clone();
    nats.provision = true;
    let js = async_nats::jetstream::new(client);
    let rooms: Vec<_> = runtime::check_rooms(config, REGISTRY)?;
    let bar = progress(3 + rooms.len() * 3, "ensuring");
    let mut report = Vec::new();
    let buckets = crate::cocoa_butter::streams::BucketStorage {
        provision: true,
        ..config.bucket_storage.clone()
    };
    let outcome = dlq::ensure_stream(&js, &nats, &config.dlq_storage).await;
    report.push(Ensured::from_result("stream", &nats.dlq_stream, outcome));
    bar.inc(1);
    let outcome = Control::new(js.clone(), buckets.clone()).open().await;
    report.push(Ensured::from_result("bucket", CONTROL_BUCKET, outcome));
    bar.inc(1);
    let replays = dlq::replays_bucket(js.clone(), buckets.clone());
    report.push(Ensured::from_result(
        "bucket",
        replays.name(),
        replays.ensure().await,
    ));
    bar.inc(1);
    for (spec, mut settings) in rooms {
        settings.buckets.provision = true;
        let outcome = nats::ensure_stream(
            &js,
            &nats,
            &settings.stream,
            settings.subject_prefix.clone(),
            &settings.streams,
        )
        .await;
        let stream_ok = outcome.is_ok();
        report.push(Ensured::from_result("stream", &settings.stream, outcome));
        bar.inc(1);
        if stream_ok {
            let outcome =
                nats::ensure_consumer(&js, &nats, &settings, nats::OrderingChange::Apply).await;
            report.push(Ensured::from_result(
                "consumer",
                &settings.durable_name,
                outcome,
            ));
        }
        bar.inc(1);
        // A room's buckets are its own business: its `prepare` opens them,
        // creating the missing ones, exactly as at start-up.
        let metrics = RoomMetrics::new(&settings.name, None);
        let prepared = match (spec.build)(RoomContext {
            settings: settings.clone(),
            jetstream: js.clone(),
            publisher: Publisher::new(js.clone(), &settings, metrics.clone()),
            metrics,
            store_streams: Default::default(),
        }) {
            Ok(room) => room.prepare().await,
            Err(err) => Err(err),
        };
        report.push(Ensured {
            kind: "room",
            name: settings.name.clone(),
            outcome: if prepared.is_ok() {
                "prepared"
            } else {
                "error"
            }
            .to_string(),
            detail: match prepared {
                Ok(()) => vec!["its key-value buckets and object stores exist".to_string()],
                Err(err) => vec![err.to_string()],
            },
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let failed = report.iter().filter(|r| r.outcome == "error").count();
    if json {
        emit_json(&report)?;
    } else {
        let mut out = String::new();
        for line in &report {
            let text = format!(
                "{:<8} {:<27} {:<13} {}",
                line.kind,
                line.name,
                line.outcome,
                line.detail.join("; ")
            );
            writeln!(out, "{}", text.trim_end())?;
        }
        emit(&out)?;
    }
    if failed > 0 {
        anyhow::bail!("{failed} item(s) could not be ensured (see above)");
    }
    Ok(())
}
