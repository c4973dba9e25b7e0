//! `archive ls` and `archive verify`: the archive as the manifests list
//! it, and whether what is stored is what they say.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::output::{emit, emit_json};
use super::{JsonFlag, Refused};
use crate::cocoa_butter::EventEnvelope;
use crate::cocoa_butter::archive::segment::{SegmentEntry, read_segment};
use crate::cocoa_butter::archive::{ArchiveStore, segment::Manifest};
use crate::cocoa_butter::config::{ConfigSources, ValidatedConfig};

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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            ArchiveCommand::Ls(args) => ls(&config, args).await,
            ArchiveCommand::Verify(args) => verify(&config, args).await,
        }
    })
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
    let store = ArchiveStore::local(&archive.dir)?;
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
