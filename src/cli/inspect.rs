//! Commands that read the configuration or ask the running rooms, without
//! NATS: `config check`, `config show`, `rooms`, `health`.

use std::fmt::Write as _;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::JsonFlag;
use super::connect::load;
use super::output::{emit, emit_json};
use crate::cocoa_butter::config::{self, ConfigSources, Provenance};
use crate::cocoa_butter::serve::Probe;
use crate::rooms::REGISTRY;

#[derive(Debug, Subcommand)]
pub(super) enum ConfigCommand {
    /// Validate the configuration and the enabled rooms' settings: exit 0
    /// when `serve` would start with it, 1 naming the first bad key.
    Check(JsonFlag),
    /// Print every effective value, the rooms' setting defaults included,
    /// and the layer it came from; exit 1 when the result is invalid.
    Show(JsonFlag),
}

#[derive(Debug, Args)]
pub(super) struct HealthArgs {
    /// How long each room may take to answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Ask whether the process lives (/healthz) rather than whether the
    /// rooms are ready: what a container HEALTHCHECK should ask, since a
    /// room waiting for NATS is not broken and must not be restarted.
    #[arg(long)]
    live: bool,
    #[command(flatten)]
    format: JsonFlag,
}

/// `config check` and `config show` validate what they are given: a bad
/// configuration is their answer (exit 1), not a refusal to run (exit 2).
pub(super) fn config(sources: &ConfigSources, command: &ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Check(format) => {
            let checked = validate(sources);
            if format.json {
                emit_json(&serde_json::json!({
                    "valid": checked.is_ok(),
                    "enabled_rooms": checked.as_ref().ok(),
                    "error": checked.as_ref().err().map(ToString::to_string),
                }))?;
            }
            let enabled = checked?;
            if format.json {
                return Ok(());
            }
            emit(&format!(
                "configuration is valid; enabled rooms: {}\n",
                enabled.join(", ")
            ))
        }
        ConfigCommand::Show(format) => {
            let figment = sources.figment().map_err(anyhow::Error::new)?;
            let mut values = config::provenance(&figment)?;
            add_room_defaults(&mut values);
            if format.json {
                emit_json(&values)?;
            } else {
                let width = values.iter().map(|v| v.key.len()).max().unwrap_or(0);
                let mut out = String::new();
                for value in &values {
                    let shown = value.value.to_string();
                    writeln!(
                        out,
                        "{:width$}  = {shown:<28}  # {}",
                        value.key, value.source
                    )?;
                }
                emit(&out)?;
            }
            // Show, then say whether it would be accepted.
            validate(sources).map(|_| ())
        }
    }
}

/// The enabled rooms when the configuration is valid, or why it is not.
fn validate(sources: &ConfigSources) -> anyhow::Result<Vec<String>> {
    // The same checks `serve` runs; here a failure is the answer (exit 1).
    let config = load(sources).map_err(|err| anyhow::anyhow!("{err}"))?;
    Ok(config.enabled_rooms().map(|r| r.name.clone()).collect())
}

/// Adds `rooms.<room>.settings.<key>` for every setting of a built room
/// that no layer sets, with its default, so `config show` lists them all.
fn add_room_defaults(values: &mut Vec<Provenance>) {
    let mut defaults = Vec::new();
    for spec in REGISTRY {
        let prefix = format!("rooms.{}.settings", spec.name);
        flatten(&prefix, &(spec.defaults)(), &mut defaults);
    }
    for (key, value) in defaults {
        // A layer that sets a table or list whole covers its items.
        let covered = values
            .iter()
            .any(|v| v.key == key || key.starts_with(&format!("{}.", v.key)));
        if !covered {
            values.push(Provenance {
                key,
                value,
                source: "default (the room's)".into(),
            });
        }
    }
    values.sort_by(|a, b| a.key.cmp(&b.key));
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (key, item) in map {
                flatten(&format!("{prefix}.{key}"), item, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// One row of `rooms`.
#[derive(Debug, Serialize)]
struct RoomRow<'a> {
    room: &'a str,
    label: &'a str,
    domain: &'a str,
    subject_prefix: &'a str,
    http_port: u16,
    grpc_port: u16,
    metrics_port: u16,
    enabled: bool,
    /// Whether this binary has the room's code (a port table may name more).
    built: bool,
}

pub(super) fn rooms(sources: &ConfigSources, format: JsonFlag) -> anyhow::Result<()> {
    let config = sources.load().map_err(super::Refused::new)?;
    let rows: Vec<RoomRow> = config
        .rooms
        .iter()
        .map(|room| RoomRow {
            room: &room.name,
            label: &room.label,
            domain: &room.domain,
            subject_prefix: &room.subject_prefix,
            http_port: room.http_addr.port(),
            grpc_port: room.grpc_addr.port(),
            metrics_port: room.metrics_addr.port(),
            enabled: room.enabled,
            built: REGISTRY.iter().any(|spec| spec.name == room.name),
        })
        .collect();
    if format.json {
        return emit_json(&rows);
    }
    let mut out = String::new();
    writeln!(
        out,
        "{:<10} {:<16} {:<13} {:<30} {:>6} {:>6} {:>7}  {:<8} BUILT",
        "ROOM", "LABEL", "DOMAIN", "SUBJECT PREFIX", "HTTP", "GRPC", "METRICS", "ENABLED"
    )?;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    for row in &rows {
        writeln!(
            out,
            "{:<10} {:<16} {:<13} {:<30} {:>6} {:>6} {:>7}  {:<8} {}",
            row.room,
            row.label,
            row.domain,
            row.subject_prefix,
            row.http_port,
            row.grpc_port,
            row.metrics_port,
            yes_no(row.enabled),
            yes_no(row.built),
        )?;
    }
    emit(&out)
}

/// One room's answer to `health`.
#[derive(Debug, Serialize)]
struct HealthRow {
    room: String,
    probe: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub(super) fn health(sources: &ConfigSources, args: &HealthArgs) -> anyhow::Result<()> {
    let config = super::connect::load_bus_only(sources)?;
    let probe = if args.live { Probe::Live } else { Probe::Ready };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let rooms: Vec<_> = config.enabled_rooms().collect();
    let results =
        runtime.block_on(futures::future::join_all(rooms.iter().map(|room| {
            crate::cocoa_butter::serve::probe(room.metrics_addr, probe, args.timeout)
        })));
    let rows: Vec<HealthRow> = rooms
        .iter()
        .zip(results)
        .map(|(room, result)| HealthRow {
            room: room.name.clone(),
            probe: probe.to_string(),
            ok: result.is_ok(),
            error: result.err().map(|err| err.to_string()),
        })
        .collect();
    if args.format.json {
        emit_json(&rows)?;
    } else {
        let mut out = String::new();
        for row in &rows {
            match &row.error {
                None => writeln!(out, "{}: {probe}", row.room)?,
                Some(err) => writeln!(out, "{}: {err}", row.room)?,
            }
        }
        emit(&out)?;
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.room.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("not {probe}: {}", failed.join(", "))
    }
}
