//! `events`: the catalogue of every event the rooms consume and publish,
//! checking envelopes against it as the rooms do, and writing it out
//! (`contracts/`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::output::{emit, emit_json};
use super::{JsonFlag, Refused};
use crate::cocoa_butter::config::{ConfigSources, RoomSettings, ValidatedConfig};
use crate::cocoa_butter::consumer::{at_current_major, verify};
use crate::cocoa_butter::contract::Contracts;
use crate::cocoa_butter::contract::catalogue::Catalogue;
use crate::cocoa_butter::contract::wire::Wire;
use crate::cocoa_butter::room::HandleError;
use crate::cocoa_butter::serve::CHOCO_DESCRIPTOR_SET;
use crate::rooms::REGISTRY;

#[derive(Debug, Args)]
pub(super) struct EventsArgs {
    #[command(subcommand)]
    command: Option<EventsCommand>,
    #[command(flatten)]
    format: JsonFlag,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// List every event: subject, direction, room, majors (the default).
    List(JsonFlag),
    /// Check envelopes as the rooms would: the envelope, its event type in
    /// the catalogue, its major, the payload's shape and the room's rules.
    /// FILE holds one envelope, a JSON array of them, or one per line; `-`
    /// reads stdin. Exit 0 when all are valid, 1 naming each invalid one
    /// (its field and reason), 2 for a usage error.
    Check {
        /// The envelopes: one, a JSON array, or one per line; `-` for stdin.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        format: JsonFlag,
    },
    /// Write the catalogue (`events.json`), each payload's JSON Schema per
    /// major (`schemas/`) and the AsyncAPI document into DIR.
    Write {
        /// Where the files go (the repository's `contracts/` by default).
        #[arg(long, value_name = "DIR", default_value = "contracts")]
        dir: PathBuf,
        /// Also make the current protos the wire baseline
        /// (`proto/wire.json`) that tests hold `proto/` to: only to accept
        /// a wire-breaking change on purpose (docs/OPERATIONS.md,
        /// "Changing an event"). Written anyway when there is none.
        #[arg(long)]
        wire_baseline: bool,
    },
}

/// The catalogue of the rooms this binary has, as `config` sets them.
pub(super) fn catalogue(config: &ValidatedConfig) -> Catalogue {
    let rooms = rooms(config);
    let refs: Vec<(&RoomSettings, &Contracts)> = rooms.iter().map(|(r, c)| (*r, c)).collect();
    Catalogue::of(&refs)
}

/// The rooms this binary has, with their settings and contracts.
fn rooms(config: &ValidatedConfig) -> Vec<(&RoomSettings, Contracts)> {
    config
        .rooms
        .iter()
        .filter_map(|room| {
            let spec = REGISTRY.iter().find(|spec| spec.name == room.name)?;
            Some((room, Contracts::new((spec.contracts)())))
        })
        .collect()
}

pub(super) fn run(sources: &ConfigSources, args: &EventsArgs) -> anyhow::Result<()> {
    let config = sources.load().map_err(Refused::new)?;
    let rooms = rooms(&config);
    let catalogue = catalogue(&config);
    match &args.command {
        None => list(&catalogue, args.format),
        Some(EventsCommand::List(format)) => list(&catalogue, *format),
        Some(EventsCommand::Check { file, format }) => check(&rooms, &catalogue, file, *format),
        Some(EventsCommand::Write { dir, wire_baseline }) => {
            write(&catalogue, dir)?;
            let baseline = dir.join("proto/wire.json");
            if *wire_baseline || !baseline.exists() {
                let wire = Wire::of(CHOCO_DESCRIPTOR_SET)?;
                if let Some(parent) = baseline.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&baseline, serde_json::to_string_pretty(&wire)? + "\n")
                    .with_context(|| format!("writing {}", baseline.display()))?;
                emit(&format!("wrote the wire baseline {}\n", baseline.display()))?;
            }
            Ok(())
        }
    }
}

fn list(catalogue: &Catalogue, format: JsonFlag) -> anyhow::Result<()> {
    if format.json {
        return emit_json(&catalogue.events);
    }
    let mut out = String::new();
    writeln!(
        out,
        "{:<50} {:<9} {:<9} {:<8} SUMMARY",
        "SUBJECT", "DIRECTION", "ROOM", "MAJORS"
    )?;
    for event in &catalogue.events {
        let majors: Vec<String> = event
            .majors
            .iter()
            .map(|m| {
                if m.major == event.current_major {
                    format!("{}*", m.major)
                } else {
                    m.major.to_string()
                }
            })
            .collect();
        writeln!(
            out,
            "{:<50} {:<9} {:<9} {:<8} {}",
            event.subject,
            serde_json::to_value(event.direction)?
                .as_str()
                .unwrap_or_default(),
            event.room,
            majors.join(","),
            event.summary
        )?;
    }
    out.push_str("(* the major outputs are published at and inputs are read as)\n");
    emit(&out)
}

fn write(catalogue: &Catalogue, dir: &Path) -> anyhow::Result<()> {
    let files = catalogue.files();
    // What a previous write left that no longer exists goes too, so the
    // folder is exactly the catalogue.
    let schemas = dir.join("schemas");
    if schemas.is_dir() {
        for entry in std::fs::read_dir(&schemas)? {
            let path = entry?.path();
            let relative = format!(
                "schemas/{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            if !files.contains_key(&relative) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    for (relative, text) in &files {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    emit(&format!(
        "wrote {} files into {}\n",
        files.len(),
        dir.display()
    ))
}

/// One envelope's verdict.
#[derive(Debug, Serialize)]
struct Verdict {
    /// Its place in the file: 1-based.
    index: usize,
    event_id: Option<String>,
    event_type: Option<String>,
    valid: bool,
    /// The dead-letter reason a room would give it.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

fn check(
    rooms: &[(&RoomSettings, Contracts)],
    catalogue: &Catalogue,
    file: &Path,
    format: JsonFlag,
) -> anyhow::Result<()> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(Refused::new)?
    } else {
        std::fs::read_to_string(file)
            .map_err(|err| Refused::new(format!("{}: {err}", file.display())))?
    };
    let bodies = split(&text);
    if bodies.is_empty() {
        return Err(Refused::new(format!("{}: no envelope in it", file.display())).into());
    }
    let verdicts: Vec<Verdict> = bodies
        .iter()
        .enumerate()
        .map(|(index, body)| verdict(rooms, catalogue, index + 1, body))
        .collect();
    let invalid = verdicts.iter().filter(|v| !v.valid).count();
    if format.json {
        emit_json(&verdicts)?;
    } else {
        let mut out = String::new();
        for v in &verdicts {
            let id = v.event_id.as_deref().unwrap_or("-");
            let kind = v.event_type.as_deref().unwrap_or("-");
            if v.valid {
                writeln!(out, "{}:{}: ok {id} {kind}", file.display(), v.index)?;
            } else {
                writeln!(
                    out,
                    "{}:{}: {id} {kind}: {}: {}",
                    file.display(),
                    v.index,
                    v.reason.as_deref().unwrap_or_default(),
                    v.detail.as_deref().unwrap_or_default()
                )?;
            }
        }
        emit(&out)?;
    }
    if invalid > 0 {
        anyhow::bail!("{invalid} of {} envelope(s) invalid", verdicts.len());
    }
    Ok(())
}

/// The envelopes of a file: one JSON array, or one document per line.
fn split(text: &str) -> Vec<Vec<u8>> {
    if let Ok(serde_json::Value::Array(items)) = serde_json::from_str(text) {
        return items
            .iter()
            .map(|item| serde_json::to_vec(item).unwrap_or_default())
            .collect();
    }
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        return vec![text.as_bytes().to_vec()];
    }
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.as_bytes().to_vec())
        .collect()
}

fn verdict(
    rooms: &[(&RoomSettings, Contracts)],
    catalogue: &Catalogue,
    index: usize,
    body: &[u8],
) -> Verdict {
    let loose: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| loose.get(name).and_then(|v| v.as_str()).map(str::to_string);
    let mut verdict = Verdict {
        index,
        event_id: field("event_id"),
        event_type: field("event_type"),
        valid: false,
        reason: None,
        detail: None,
    };
    let refuse = |mut verdict: Verdict, err: HandleError| {
        match err {
            HandleError::Permanent { reason, detail } => {
                verdict.reason = Some(reason.as_str().to_string());
                verdict.detail = Some(detail);
            }
            other => verdict.detail = Some(other.to_string()),
        }
        verdict
    };
    let event_type = verdict.event_type.clone().unwrap_or_default();
    let Some(event) = catalogue.event(&event_type) else {
        verdict.reason = Some("unknown_event_type".into());
        verdict.detail = Some(format!(
            "event_type {event_type:?} is not in the catalogue (`choco-factory events` lists it)"
        ));
        return verdict;
    };
    let Some((room, contracts)) = rooms.iter().find(|(room, _)| room.name == event.room) else {
        verdict.detail = Some(format!("room {} is not built in", event.room));
        return verdict;
    };
    let action = event
        .subject
        .strip_prefix(&room.subject_base)
        .unwrap_or(&event.subject);
    let envelope = match verify(body, &event_type)
        .and_then(|envelope| at_current_major(Some(contracts), action, envelope))
    {
        Ok(envelope) => envelope,
        Err(err) => return refuse(verdict, err),
    };
    if let Some(check) = contracts.get(action).and_then(|contract| contract.check)
        && let Err(problem) = check(&envelope.payload)
    {
        verdict.reason = Some("payload_invalid".into());
        verdict.detail = Some(problem);
        return verdict;
    }
    verdict.valid = true;
    verdict
}
