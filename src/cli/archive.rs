//! `archive ls` and `archive verify`: the archive as the manifests list
//! it, and whether what is stored is what they say.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use sha2::{Digest, Sha256};

use anyhow::Context as _;

use super::connect::{publish_stored, with_nats};
use super::output::{emit, emit_json, progress};
use super::{JsonFlag, Refused};
use crate::cocoa_butter::EventEnvelope;
use crate::cocoa_butter::archive::segment::{ArchivedEvent, SegmentEntry, read_segment};
use crate::cocoa_butter::archive::{ArchiveStore, segment::Manifest};
use crate::cocoa_butter::config::{ConfigSources, ValidatedConfig};
use crate::cocoa_butter::contract::Direction;

#[derive(Debug, Subcommand)]
pub(super) enum ArchiveCommand {
    /// The archived segments of every archived domain (or one), oldest
    /// first: sequence range, events, bytes, when their messages were
    /// stored.
    Ls(LsArgs),
    /// Check the archive: every segment's hash against its manifest, the
    /// sequences continuous (no gap, no overlap), every envelope's content
    /// hash. Exit 0 when all hold, 1 naming each problem.
    Verify(DomainArgs),
    /// Publish archived INPUTS again to their subjects, each with its
    /// original event id as `Nats-Msg-Id` (so a replay overlapping the
    /// stream's duplicate window doubles nothing), for the rooms to handle
    /// them again on purpose; outputs are the rooms' to make again.
    Replay(ReplayArgs),
    /// Rebuild a lost stream from the archive, inputs and outputs as they
    /// were, into a new stream STREAM capturing `choco.restored.<domain>.>`,
    /// which no room consumes until the operator switches
    /// (docs/OPERATIONS.md, "Restoring from the archive").
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub(super) struct Window {
    /// The archived domain (`coordination`).
    #[arg(long, value_name = "DOMAIN")]
    domain: String,
    /// Only messages stored at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    from: Option<DateTime<Utc>>,
    /// Only messages stored at or before this time.
    #[arg(long, value_name = "TIME")]
    to: Option<DateTime<Utc>>,
}

#[derive(Debug, Args)]
pub(super) struct ReplayArgs {
    #[command(flatten)]
    window: Window,
    /// Only this subject (a NATS subject; `*` and `>` as NATS matches them).
    #[arg(long, value_name = "SUBJECT")]
    subject: Option<String>,
    /// Say what would be published, publish nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    format: JsonFlag,
}

#[derive(Debug, Args)]
pub(super) struct RestoreArgs {
    #[command(flatten)]
    window: Window,
    /// The stream to rebuild into; created, and refused if it exists.
    #[arg(long, value_name = "STREAM")]
    into: String,
    #[command(flatten)]
    format: JsonFlag,
}

#[derive(Debug, Args)]
pub(super) struct DomainArgs {
    /// Only this domain (`coordination`); every archived one otherwise.
    #[arg(long, value_name = "DOMAIN")]
    domain: Option<String>,
    #[command(flatten)]
    format: JsonFlag,
}

#[derive(Debug, Args)]
pub(super) struct LsArgs {
    #[command(flatten)]
    domain: DomainArgs,
    /// Only segments with messages stored at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    from: Option<DateTime<Utc>>,
    /// Only segments with messages stored at or before this time.
    #[arg(long, value_name = "TIME")]
    to: Option<DateTime<Utc>>,
}

pub(super) fn run(sources: &ConfigSources, command: &ArchiveCommand) -> anyhow::Result<()> {
    let config = sources.load().map_err(Refused::new)?;
    match command {
        ArchiveCommand::Replay(args) => {
            return with_nats(&config, |client| replay(&config, client, args));
        }
        ArchiveCommand::Restore(args) => {
            return with_nats(&config, |client| restore(&config, client, args));
        }
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            ArchiveCommand::Ls(args) => ls(&config, args).await,
            ArchiveCommand::Verify(args) => verify(&config, args).await,
            ArchiveCommand::Replay(_) | ArchiveCommand::Restore(_) => Ok(()),
        }
    })
}

/// The archived events of `window`, in stream order.
async fn events_in(
    config: &ValidatedConfig,
    window: &Window,
) -> anyhow::Result<Vec<ArchivedEvent>> {
    let (store, domains) = selected(config, Some(&window.domain))?;
    let (domain, stream) = &domains[0];
    let manifest = store.manifest(domain, stream).await?;
    let mut events = Vec::new();
    for segment in &manifest.segments {
        if window
            .from
            .is_some_and(|from| segment.last_stored_at < from)
            || window.to.is_some_and(|to| segment.first_stored_at > to)
        {
            continue;
        }
        let bytes = store
            .get(&segment.key)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{}: missing (run `archive verify`)", segment.key))?;
        events.extend(
            read_segment(&bytes)?
                .into_iter()
                .filter(|e| window.from.is_none_or(|from| e.stored_at >= from))
                .filter(|e| window.to.is_none_or(|to| e.stored_at <= to)),
        );
    }
    Ok(events)
}

/// Whether `subject` is matched by the NATS `filter` (`*` one token, `>`
/// the rest).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for wanted in filter.split('.') {
        match (wanted, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (wanted, Some(token)) if wanted == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[derive(Debug, Default, Serialize)]
struct Republished {
    domain: String,
    /// Archived messages in the window (and subject).
    matched: usize,
    /// Stored anew by the stream.
    published: usize,
    /// Dropped by the stream's duplicate window (the same event id).
    duplicates: usize,
    /// Outputs left out: the rooms make them again.
    outputs_skipped: usize,
    dry_run: bool,
}

async fn republish(
    js: &async_nats::jetstream::Context,
    subject: String,
    event: &ArchivedEvent,
    report: &mut Republished,
) -> anyhow::Result<()> {
    // The headers as they were, but the server's own (`Nats-*`): the
    // message id is set below, the rest the server sets again.
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in &event.headers {
        if !name.starts_with("Nats-") {
            headers.insert(name.as_str(), value.as_str());
        }
    }
    let mut message = async_nats::jetstream::message::PublishMessage::build()
        .payload(event.body_bytes()?.into())
        .headers(headers);
    if !event.event_id.is_empty() {
        message = message.message_id(event.event_id.clone());
    }
    let ack = publish_stored(js, subject, message).await?;
    if ack.duplicate {
        report.duplicates += 1;
    } else {
        report.published += 1;
    }
    Ok(())
}

fn summary(report: &Republished, what: &str, format: JsonFlag) -> anyhow::Result<()> {
    if format.json {
        return emit_json(report);
    }
    emit(&format!(
        "{}: {} archived in the window; {} {what}, {} already in the stream (duplicate window){}{}\n",
        report.domain,
        report.matched,
        report.published,
        report.duplicates,
        if report.outputs_skipped > 0 {
            format!("; {} outputs left to the rooms", report.outputs_skipped)
        } else {
            String::new()
        },
        if report.dry_run {
            " (dry run: nothing published)"
        } else {
            ""
        }
    ))
}

async fn replay(
    config: &ValidatedConfig,
    client: async_nats::Client,
    args: &ReplayArgs,
) -> anyhow::Result<()> {
    let inputs: Vec<String> = super::contracts::catalogue(config)
        .events
        .into_iter()
        .filter(|event| event.direction == Direction::Input)
        .map(|event| event.subject)
        .collect();
    let events: Vec<ArchivedEvent> = events_in(config, &args.window)
        .await?
        .into_iter()
        .filter(|e| {
            args.subject
                .as_deref()
                .is_none_or(|filter| subject_matches(filter, &e.subject))
        })
        .collect();
    let mut report = Republished {
        domain: args.window.domain.clone(),
        matched: events.len(),
        dry_run: args.dry_run,
        ..Default::default()
    };
    let js = async_nats::jetstream::new(client);
    let bar = progress(events.len(), "replaying");
    for event in &events {
        bar.inc(1);
        if !inputs.contains(&event.subject) {
            report.outputs_skipped += 1;
            continue;
        }
        if args.dry_run {
            report.published += 1;
            continue;
        }
        republish(&js, event.subject.clone(), event, &mut report).await?;
    }
    bar.finish_and_clear();
    summary(&report, "replayed", args.format)
}

async fn restore(
    config: &ValidatedConfig,
    client: async_nats::Client,
    args: &RestoreArgs,
) -> anyhow::Result<()> {
    let domain = &args.window.domain;
    let events = events_in(config, &args.window).await?;
    let js = async_nats::jetstream::new(client);
    if js.get_stream(&args.into).await.is_ok() {
        return Err(Refused::new(format!(
            "stream {} exists: restore builds a new stream",
            args.into
        ))
        .into());
    }
    let from = format!("choco.events.{domain}.");
    let to = format!("choco.restored.{domain}.");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: args.into.clone(),
        subjects: vec![format!("{to}>")],
        description: Some(format!(
            "choco-factory archive restore of {domain}: no room consumes it"
        )),
        duplicate_window: config.factory.nats.duplicate_window,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating the stream {}", args.into))?;
    let mut report = Republished {
        domain: domain.clone(),
        matched: events.len(),
        ..Default::default()
    };
    let bar = progress(events.len(), "restoring");
    for event in &events {
        bar.inc(1);
        let subject = match event.subject.strip_prefix(&from) {
            Some(rest) => format!("{to}{rest}"),
            None => format!("{to}{}", event.subject),
        };
        republish(&js, subject, event, &mut report).await?;
    }
    bar.finish_and_clear();
    summary(
        &report,
        &format!("restored into {}", args.into),
        args.format,
    )
}

/// The archive and the domains asked for, with their streams.
fn selected(
    config: &ValidatedConfig,
    domain: Option<&str>,
) -> anyhow::Result<(ArchiveStore, Vec<(String, String)>)> {
    let archive = &config.factory.archive;
    if !archive.enabled() {
        return Err(Refused::new("no domain is archived (archive.domains is empty)").into());
    }
    if let Some(domain) = domain
        && !archive.domains.iter().any(|d| d == domain)
    {
        return Err(Refused::new(format!(
            "{domain:?} is not archived (archive.domains: {})",
            archive.domains.join(", ")
        ))
        .into());
    }
    let store = ArchiveStore::open(archive)?;
    let domains = archive
        .domains
        .iter()
        .filter(|d| domain.is_none_or(|wanted| wanted == d.as_str()))
        .map(|d| {
            let stream = config
                .rooms
                .iter()
                .find(|room| &room.domain == d)
                .map(|room| room.stream.clone())
                .unwrap_or_default();
            (d.clone(), stream)
        })
        .collect();
    Ok((store, domains))
}

#[derive(Debug, Serialize)]
struct Row<'a> {
    domain: &'a str,
    #[serde(flatten)]
    segment: &'a SegmentEntry,
}

async fn ls(config: &ValidatedConfig, args: &LsArgs) -> anyhow::Result<()> {
    let (store, domains) = selected(config, args.domain.domain.as_deref())?;
    let mut manifests: Vec<Manifest> = Vec::new();
    for (domain, stream) in &domains {
        manifests.push(store.manifest(domain, stream).await?);
    }
    let rows: Vec<Row> = manifests
        .iter()
        .flat_map(|m| m.segments.iter().map(move |s| (m.domain.as_str(), s)))
        .filter(|(_, s)| args.from.is_none_or(|from| s.last_stored_at >= from))
        .filter(|(_, s)| args.to.is_none_or(|to| s.first_stored_at <= to))
        .map(|(domain, segment)| Row { domain, segment })
        .collect();
    if args.domain.format.json {
        return emit_json(&rows);
    }
    let mut out = String::new();
    writeln!(
        out,
        "{:<13} {:>10} {:>10} {:>7} {:>9}  {:<20} {:<20} KEY",
        "DOMAIN", "FIRST", "LAST", "EVENTS", "BYTES", "FROM", "TO"
    )?;
    for row in &rows {
        let s = row.segment;
        writeln!(
            out,
            "{:<13} {:>10} {:>10} {:>7} {:>9}  {:<20} {:<20} {}",
            row.domain,
            s.first,
            s.last,
            s.events,
            s.bytes,
            s.first_stored_at.format("%Y-%m-%dT%H:%M:%SZ"),
            s.last_stored_at.format("%Y-%m-%dT%H:%M:%SZ"),
            s.key
        )?;
    }
    emit(&out)
}

#[derive(Debug, Serialize)]
struct Verified {
    domain: String,
    segments: usize,
    events: usize,
    problems: Vec<String>,
}

async fn verify(config: &ValidatedConfig, args: &DomainArgs) -> anyhow::Result<()> {
    let (store, domains) = selected(config, args.domain.as_deref())?;
    let mut report = Vec::new();
    for (domain, stream) in &domains {
        let manifest = store.manifest(domain, stream).await?;
        let mut problems = manifest.discontinuities();
        let mut events = 0;
        for segment in &manifest.segments {
            let Some(bytes) = store.get(&segment.key).await? else {
                problems.push(format!("{}: missing (the manifest lists it)", segment.key));
                continue;
            };
            let actual = hex::encode(Sha256::digest(&bytes));
            if actual != segment.sha256 {
                problems.push(format!(
                    "{}: its SHA-256 is {actual}, the manifest says {}",
                    segment.key, segment.sha256
                ));
                continue;
            }
            let archived = match read_segment(&bytes) {
                Ok(archived) => archived,
                Err(err) => {
                    problems.push(format!("{}: does not read: {err}", segment.key));
                    continue;
                }
            };
            let sequences: Vec<u64> = archived.iter().map(|e| e.seq).collect();
            let expected: Vec<u64> = (segment.first..=segment.last).collect();
            if sequences != expected {
                problems.push(format!(
                    "{}: holds {} messages, not every sequence of {}..={} once",
                    segment.key,
                    sequences.len(),
                    segment.first,
                    segment.last
                ));
            }
            for event in &archived {
                let Ok(body) = event.body_bytes() else {
                    problems.push(format!(
                        "{}: seq {} body is not base64",
                        segment.key, event.seq
                    ));
                    continue;
                };
                if !event.event_id.is_empty()
                    && let Err(err) = EventEnvelope::decode(&body)
                {
                    problems.push(format!("{}: seq {}: {err}", segment.key, event.seq));
                }
            }
            events += archived.len();
        }
        report.push(Verified {
            domain: domain.clone(),
            segments: manifest.segments.len(),
            events,
            problems,
        });
    }
    let bad: usize = report.iter().map(|r| r.problems.len()).sum();
    if args.format.json {
        emit_json(&report)?;
    } else {
        let mut out = String::new();
        for r in &report {
            writeln!(
                out,
                "{}: {} segments, {} events, {}",
                r.domain,
                r.segments,
                r.events,
                if r.problems.is_empty() {
                    "ok".to_string()
                } else {
                    format!("{} problem(s)", r.problems.len())
                }
            )?;
            for problem in &r.problems {
                writeln!(out, "  {problem}")?;
            }
        }
        emit(&out)?;
    }
    if bad > 0 {
        anyhow::bail!("the archive has {bad} problem(s)");
    }
    Ok(())
}
