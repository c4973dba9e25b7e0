//! `dlq list|show|replay|purge`: the dead-letter stream, worked by hand.

use std::fmt::Write as _;

use clap::{Args, Subcommand};

use super::JsonFlag;
use super::connect::{configured_room, load_bus_only, with_nats};
use super::output::{emit, emit_json, progress};
use crate::cocoa_butter::config::{ConfigSources, ValidatedConfig};
use crate::cocoa_butter::dlq::{DeadLetterRecord, DeadLetters, DlqFilter};

#[derive(Debug, Args, Clone, Default)]
pub(super) struct DlqFilterArgs {
    /// Only this room's dead letters (a room of the port table).
    #[arg(long, value_name = "ROOM")]
    room: Option<String>,
    /// Only this reason (e.g. unknown_command_slug).
    #[arg(long, value_name = "REASON")]
    reason: Option<String>,
    /// Only those dead-lettered within this long (e.g. 1h, 30m).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    since: Option<std::time::Duration>,
}

impl DlqFilterArgs {
    /// The filter, once its room is known to the configuration: a
    /// misspelt room is a usage error, not "0 dead letter(s)".
    fn resolve(&self, config: &ValidatedConfig) -> anyhow::Result<DlqFilter> {
        if let Some(room) = &self.room {
            configured_room(config, room)?;
        }
        Ok(DlqFilter {
            room: self.room.clone(),
            reason: self.reason.clone(),
            since: self.since,
        })
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum DlqCommand {
    /// A table of dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        #[command(flatten)]
        format: JsonFlag,
    },
    /// One dead letter as JSON: its headers, its envelope and payload decoded.
    Show {
        /// The dead letter's sequence in the DLQ stream (`dlq list` shows it).
        sequence: u64,
    },
    /// Publish dead letters again to their original subjects.
    Replay {
        /// Sequences to replay; without them, every dead letter the filter matches.
        sequences: Vec<u64>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Say what would be replayed, replay nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        format: JsonFlag,
    },
    /// Delete dead letters.
    Purge {
        /// Sequences to delete; without them, every dead letter the filter matches.
        sequences: Vec<u64>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        format: JsonFlag,
    },
}

pub(super) fn run(sources: &ConfigSources, command: &DlqCommand) -> anyhow::Result<()> {
    let config = &load_bus_only(sources)?;
    // Check the filter before connecting: a usage error needs no NATS.
    let filter = match command {
        DlqCommand::List { filter, .. }
        | DlqCommand::Replay { filter, .. }
        | DlqCommand::Purge { filter, .. } => filter.resolve(config)?,
        DlqCommand::Show { .. } => DlqFilter::default(),
    };
    with_nats(config, |client| async move {
        let letters = DeadLetters::open(
            async_nats::jetstream::new(client),
            config.factory.nats.clone(),
            config.bucket_storage.clone(),
        )
        .await?;
        match command {
            DlqCommand::List { format, .. } => list(&letters, &filter, *format).await,
            DlqCommand::Show { sequence } => {
                let record = letters.get(*sequence).await?;
                emit_json(&serde_json::json!({ "dead_letter": record, "body": record.decoded() }))
            }
            DlqCommand::Replay {
                sequences,
                dry_run,
                format,
                ..
            } => {
                let records = letters.select(sequences, &filter).await?;
                replay(&letters, &records, *dry_run, *format).await
            }
            DlqCommand::Purge {
                sequences,
                yes,
                format,
                ..
            } => {
                let records = letters.select(sequences, &filter).await?;
                purge(&letters, &records, *yes, *format).await
            }
        }
    })
}

async fn list(letters: &DeadLetters, filter: &DlqFilter, format: JsonFlag) -> anyhow::Result<()> {
    let records = letters.list(filter).await?;
    if format.json {
        return emit_json(&records);
    }
    let mut out = String::new();
    writeln!(
        out,
        "{:>6}  {:<25}  {:<9} {:<40} {:<26} {:>4}  {:<8} AGGREGATE",
        "SEQ", "TIME", "ROOM", "EVENT TYPE", "REASON", "DLV", "REPLAYED"
    )?;
    for r in &records {
        writeln!(
            out,
            "{:>6}  {:<25}  {:<9} {:<40} {:<26} {:>4}  {:<8} {}",
            r.sequence,
            r.time,
            r.room,
            r.event_type,
            r.reason,
            r.deliveries.map_or("-".to_string(), |n| n.to_string()),
            if r.replayed { "yes" } else { "no" },
            r.aggregate_id.as_deref().unwrap_or("-"),
        )?;
    }
    writeln!(out, "{} dead letter(s)", records.len())?;
    emit(&out)
}

async fn replay(
    letters: &DeadLetters,
    records: &[DeadLetterRecord],
    dry_run: bool,
    format: JsonFlag,
) -> anyhow::Result<()> {
    if dry_run {
        if format.json {
            let planned: Vec<_> = records
                .iter()
                .map(|r| serde_json::json!({ "sequence": r.sequence, "subject": r.original_subject }))
                .collect();
            return emit_json(&serde_json::json!({ "dry_run": true, "would_replay": planned }));
        }
        let mut out = String::new();
        for record in records {
            writeln!(
                out,
                "would replay {} to {}",
                record.sequence, record.original_subject
            )?;
        }
        writeln!(out, "{} dead letter(s) would be replayed", records.len())?;
        return emit(&out);
    }
    let bar = progress(records.len(), "replaying");
    let replayed = letters.replay_all(records, |_| bar.inc(1)).await;
    bar.finish_and_clear();
    let replayed = replayed?;
    if format.json {
        return emit_json(&serde_json::json!({ "dry_run": false, "replayed": replayed }));
    }
    let mut out = String::new();
    for r in &replayed {
        writeln!(
            out,
            "replayed {} to {} (stream sequence {})",
            r.sequence, r.subject, r.new_sequence
        )?;
    }
    writeln!(out, "{} dead letter(s) replayed", records.len())?;
    emit(&out)
}

async fn purge(
    letters: &DeadLetters,
    records: &[DeadLetterRecord],
    yes: bool,
    format: JsonFlag,
) -> anyhow::Result<()> {
    if !yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "refusing to purge {} dead letter(s) without --yes (no terminal to ask)",
                records.len()
            );
        }
        print!("purge {} dead letter(s)? [y/N] ", records.len());
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return emit("nothing purged\n");
        }
    }
    let bar = progress(records.len(), "purging");
    let purged = letters.purge_all(records, |_| bar.inc(1)).await;
    bar.finish_and_clear();
    let purged = purged?;
    if format.json {
        let sequences: Vec<u64> = records.iter().map(|r| r.sequence).collect();
        return emit_json(&serde_json::json!({ "purged": purged, "sequences": sequences }));
    }
    emit(&format!("{purged} dead letter(s) purged\n"))
}
