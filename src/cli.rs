//! The command line: `serve`, `dev`, `config check|show`, `rooms`, and the
//! operator's commands: `room pause|resume`, `streams status|ensure`,
//! `dlq`, `publish`, `tail`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::cocoa_butter::config::{self, CliOverrides, ConfigSources, LogFormat, ValidatedConfig};
use crate::cocoa_butter::nats_server::{self, ManagedNats};
use crate::cocoa_butter::servers::Probe;
use crate::cocoa_butter::{bus, runtime, telemetry};
use crate::rooms::REGISTRY;

#[derive(Debug, Parser)]
#[command(
    name = "choco-factory",
    version,
    about = "The choco factory rooms (the-winnower, the-conch, the-mould, the-wrapper) in one binary"
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Config file layered over the port table.
    #[arg(long, global = true, env = "CHOCO_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The port table; default: ./rooms.toml if present, else the built-in one.
    #[arg(long, global = true, env = "CHOCO_ROOMS_FILE", value_name = "FILE")]
    rooms_file: Option<PathBuf>,
    /// NATS server URL (overrides nats.url).
    #[arg(long, global = true, value_name = "URL")]
    nats_url: Option<String>,
    /// Address every room binds (overrides bind).
    #[arg(long, global = true, value_name = "IP")]
    bind: Option<IpAddr>,
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the enabled rooms.
    Serve(ServeArgs),
    /// Start a local nats-server with JetStream, then serve all rooms on it.
    Dev(DevArgs),
    /// Inspect the effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the port table as configured.
    Rooms,
    /// Work the dead-letter stream.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Pause or resume a room on every replica.
    #[command(subcommand)]
    Room(RoomCommand),
    /// The rooms' streams and consumers: their state, or create what is missing.
    #[command(subcommand)]
    Streams(StreamsCommand),
    /// Publish one event as a correct envelope.
    Publish(PublishArgs),
    /// Follow a subject and print each envelope, payload decoded, one per line.
    Tail(TailArgs),
    /// Ask every enabled room's /readyz (or /healthz with --live) on its
    /// metrics port; exit 0 when all answer 200, 1 naming those that do not.
    Health(HealthArgs),
}

#[derive(Debug, Args)]
struct HealthArgs {
    /// How long each room may take to answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Ask whether the process lives (/healthz) rather than whether the
    /// rooms are ready: what a container HEALTHCHECK should ask, since a
    /// room waiting for NATS is not broken and must not be restarted.
    #[arg(long)]
    live: bool,
}

#[derive(Debug, Args, Clone, Default)]
struct DlqFilterArgs {
    /// Only this room's dead letters.
    #[arg(long)]
    room: Option<String>,
    /// Only this reason (e.g. unknown_command_slug).
    #[arg(long)]
    reason: Option<String>,
    /// Only those dead-lettered within this long (e.g. 1h, 30m).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// A table of dead letters.
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// One dead letter: its headers, its envelope and payload decoded.
    Show { sequence: u64 },
    /// Publish dead letters again to their original subjects.
    Replay {
        /// Sequences to replay; without them, every dead letter the filter matches.
        sequences: Vec<u64>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Say what would be replayed, replay nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters.
    Purge {
        sequences: Vec<u64>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RoomCommand {
    /// Stop the room pulling on every replica, now and after restarts: in-flight
    /// work finishes, the consumer stays, the room reports not ready.
    Pause {
        room: String,
        /// Why, shown in /readyz and /info.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let the room pull again on every replica.
    Resume { room: String },
}

#[derive(Debug, Subcommand)]
enum StreamsCommand {
    /// Each enabled room's stream and consumer: messages, bytes, pending,
    /// ack-pending, redeliveries, dead letters, last activity.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Create the missing streams, consumers and buckets from the configuration,
    /// update drifted consumers, and report what was found.
    Ensure {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// `<domain>.<action>`, e.g. coordination.property_sync.requested.
    #[arg(long = "type")]
    event_type: String,
    #[arg(long)]
    aggregate: String,
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    #[arg(long)]
    payload_file: Option<PathBuf>,
    #[arg(long)]
    correlation: Option<String>,
}

#[derive(Debug, Args)]
struct TailArgs {
    /// A subject or wildcard, e.g. choco.events.coordination.>
    subject: String,
    /// Pretty-print each envelope over several lines.
    #[arg(long)]
    pretty: bool,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Run exactly these rooms (comma-separated), whatever their enable flags say.
    #[arg(long, value_delimiter = ',', value_name = "ROOMS")]
    rooms: Option<Vec<String>>,
}

#[derive(Debug, Args)]
struct DevArgs {
    #[arg(long, value_delimiter = ',', value_name = "ROOMS")]
    rooms: Option<Vec<String>>,
    /// Where the local nats-server keeps its JetStream store and log.
    #[arg(long, default_value = ".choco-dev", value_name = "DIR")]
    data_dir: PathBuf,
    /// Client port of the local nats-server.
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and the enabled rooms' settings; exit 2 if invalid.
    Check,
    /// Print every effective value and the layer it came from.
    Show {
        #[arg(long)]
        json: bool,
    },
}

/// A failure that exits with status 2: the configuration was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigRefused(String);

impl Cli {
    fn sources(&self, only_rooms: Option<Vec<String>>) -> ConfigSources {
        ConfigSources {
            rooms_file: self.global.rooms_file.clone(),
            config_file: self.global.config.clone(),
            cli: CliOverrides {
                nats_url: self.global.nats_url.clone(),
                bind: self.global.bind,
                log_format: self.global.log_format.map(|format| match format {
                    LogFormatArg::Auto => LogFormat::Auto,
                    LogFormatArg::Json => LogFormat::Json,
                    LogFormatArg::Pretty => LogFormat::Pretty,
                }),
                only_rooms,
            },
        }
    }
}

fn load(sources: &ConfigSources) -> anyhow::Result<ValidatedConfig> {
    let config = sources
        .load()
        .map_err(|err| ConfigRefused(err.to_string()))?;
    runtime::check_rooms(&config, REGISTRY).map_err(|err| ConfigRefused(err.to_string()))?;
    Ok(config)
}

/// The configuration an operator command needs: NATS, not the rooms' files.
fn load_bus_only(sources: &ConfigSources) -> anyhow::Result<ValidatedConfig> {
    sources
        .load()
        .map_err(|err| ConfigRefused(err.to_string()).into())
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve(args) => {
            let config = load(&cli.sources(args.rooms.clone()))?;
            serve(config, None)
        }
        Command::Dev(args) => {
            let mut sources = cli.sources(args.rooms.clone());
            sources.cli.nats_url = Some(format!("nats://127.0.0.1:{}", args.nats_port));
            let config = load(&sources)?;
            serve(config, Some(args))
        }
        Command::Config(ConfigCommand::Check) => {
            let config = load(&cli.sources(None))?;
            let enabled: Vec<&str> = config.enabled_rooms().map(|r| r.name.as_str()).collect();
            emit(&format!(
                "configuration is valid; enabled rooms: {}\n",
                enabled.join(", ")
            ))
        }
        Command::Config(ConfigCommand::Show { json }) => {
            let sources = cli.sources(None);
            let figment = sources
                .figment()
                .map_err(|err| ConfigRefused(err.to_string()))?;
            let values =
                config::provenance(&figment).map_err(|err| ConfigRefused(err.to_string()))?;
            let mut out = String::new();
            if *json {
                out = serde_json::to_string_pretty(&values)? + "\n";
            } else {
                let width = values.iter().map(|v| v.key.len()).max().unwrap_or(0);
                for value in &values {
                    let shown = value.value.to_string();
                    writeln!(
                        out,
                        "{:width$}  = {shown:<28}  # {}",
                        value.key, value.source
                    )?;
                }
            }
            emit(&out)?;
            // Show, then say whether it would be accepted.
            load(&sources).map(|_| ())
        }
        Command::Dlq(command) => {
            let config = load_bus_only(&cli.sources(None))?;
            with_nats(&config, |client| {
                dlq(
                    client,
                    config.factory.nats.clone(),
                    config.bucket_storage.clone(),
                    command,
                )
            })
        }
        Command::Room(command) => {
            let config = load_bus_only(&cli.sources(None))?;
            with_nats(&config, |client| room(client, &config, command))
        }
        Command::Streams(StreamsCommand::Status { json }) => {
            let config = load_bus_only(&cli.sources(None))?;
            with_nats(&config, |client| streams_status(client, &config, *json))
        }
        Command::Streams(StreamsCommand::Ensure { json }) => {
            // The rooms are built to prepare their buckets: their settings
            // must pass the same checks as for `serve`.
            let config = load(&cli.sources(None))?;
            with_nats(&config, |client| streams_ensure(client, &config, *json))
        }
        Command::Publish(args) => {
            let config = load_bus_only(&cli.sources(None))?;
            with_nats(&config, |client| publish(client, args))
        }
        Command::Tail(args) => {
            let config = load_bus_only(&cli.sources(None))?;
            with_nats(&config, |client| tail(client, args))
        }
        Command::Health(args) => {
            let config = load_bus_only(&cli.sources(None))?;
            let probe = if args.live { Probe::Live } else { Probe::Ready };
            health(&config, probe, args.timeout)
        }
        Command::Rooms => {
            let config = cli
                .sources(None)
                .load()
                .map_err(|err| ConfigRefused(err.to_string()))?;
            let mut out = String::new();
            writeln!(
                out,
                "{:<10} {:<16} {:<13} {:<30} {:>6} {:>6} {:>7}  {:<8} BUILT",
                "ROOM", "LABEL", "DOMAIN", "SUBJECT PREFIX", "HTTP", "GRPC", "METRICS", "ENABLED"
            )?;
            for room in &config.rooms {
                let built = REGISTRY.iter().any(|spec| spec.name == room.name);
                writeln!(
                    out,
                    "{:<10} {:<16} {:<13} {:<30} {:>6} {:>6} {:>7}  {:<8} {}",
                    room.name,
                    room.label,
                    room.domain,
                    room.subject_prefix,
                    room.http_addr.port(),
                    room.grpc_addr.port(),
                    room.metrics_addr.port(),
                    if room.enabled { "yes" } else { "no" },
                    if built { "yes" } else { "no" },
                )?;
            }
            emit(&out)
        }
    }
}

fn health(
    config: &ValidatedConfig,
    probe: Probe,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let rooms: Vec<_> = config.enabled_rooms().collect();
    let results =
        runtime.block_on(futures::future::join_all(rooms.iter().map(|room| {
            crate::cocoa_butter::servers::probe(room.metrics_addr, probe, timeout)
        })));
    let mut out = String::new();
    let mut failed = Vec::new();
    for (room, result) in rooms.iter().zip(results) {
        match result {
            Ok(()) => writeln!(out, "{}: {probe}", room.name)?,
            Err(err) => {
                writeln!(out, "{}: {err}", room.name)?;
                failed.push(room.name.as_str());
            }
        }
    }
    emit(&out)?;
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("not {probe}: {}", failed.join(", "))
    }
}

/// Runs an operator command against NATS: connects once, fails fast.
fn with_nats<F, Fut>(config: &ValidatedConfig, command: F) -> anyhow::Result<()>
where
    F: FnOnce(async_nats::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let nats = &config.factory.nats;
    let shown_url = nats.url.redacted();
    runtime.block_on(async move {
        let options = bus::connect_options(nats, &config.nats_auth, &config.nats_tls)
            .await
            .map_err(|err| ConfigRefused(err.to_string()))?;
        let client = match options
            .name("choco-factory-cli")
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(nats.url.as_slice())
            .await
        {
            Ok(client) => client,
            // Without retries a refused login fails here, at once; say
            // which keys to look at rather than only the server's words.
            Err(err) => {
                let reason = err.to_string();
                return Err(
                    match bus::explain_connect_failure(&reason, &config.nats_auth) {
                        Some(hint) => {
                            anyhow::anyhow!(
                                "cannot connect to NATS at {shown_url}: {hint}: {reason}"
                            )
                        }
                        None => anyhow::anyhow!("cannot connect to NATS at {shown_url}: {reason}"),
                    },
                );
            }
        };
        let result = command(client.clone()).await;
        let _ = client.flush().await;
        result
    })
}

async fn dlq(
    client: async_nats::Client,
    nats: config::NatsConfig,
    buckets: crate::cocoa_butter::streams::BucketStorage,
    command: &DlqCommand,
) -> anyhow::Result<()> {
    use crate::cocoa_butter::dlq::{DeadLetters, DlqFilter};
    let letters = DeadLetters::open(async_nats::jetstream::new(client), nats, buckets).await?;
    let to_filter = |args: &DlqFilterArgs| DlqFilter {
        room: args.room.clone(),
        reason: args.reason.clone(),
        since: args.since,
    };
    match command {
        DlqCommand::List { filter, json } => {
            let records = letters.list(&to_filter(filter)).await?;
            if *json {
                return emit(&(serde_json::to_string_pretty(&records)? + "\n"));
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
                    r.deliveries,
                    if r.replayed { "yes" } else { "no" },
                    r.aggregate_id.as_deref().unwrap_or("-"),
                )?;
            }
            writeln!(out, "{} dead letter(s)", records.len())?;
            emit(&out)
        }
        DlqCommand::Show { sequence } => {
            let record = letters.get(*sequence).await?;
            let shown = serde_json::json!({ "dead_letter": record, "body": record.decoded() });
            emit(&(serde_json::to_string_pretty(&shown)? + "\n"))
        }
        DlqCommand::Replay {
            sequences,
            filter,
            dry_run,
        } => {
            let records = letters.select(sequences, &to_filter(filter)).await?;
            let mut out = String::new();
            if *dry_run {
                for record in &records {
                    writeln!(
                        out,
                        "would replay {} to {}",
                        record.sequence, record.original_subject
                    )?;
                }
            } else {
                let bar = progress(records.len(), "replaying");
                let replayed = letters.replay_all(&records, |_| bar.inc(1)).await;
                bar.finish_and_clear();
                for r in replayed? {
                    writeln!(
                        out,
                        "replayed {} to {} (stream sequence {})",
                        r.sequence, r.subject, r.new_sequence
                    )?;
                }
            }
            writeln!(
                out,
                "{} dead letter(s) {}",
                records.len(),
                if *dry_run {
                    "would be replayed"
                } else {
                    "replayed"
                }
            )?;
            emit(&out)
        }
        DlqCommand::Purge {
            sequences,
            filter,
            yes,
        } => {
            let records = letters.select(sequences, &to_filter(filter)).await?;
            if !*yes {
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
            let purged = letters.purge_all(&records, |_| bar.inc(1)).await;
            bar.finish_and_clear();
            emit(&format!("{} dead letter(s) purged\n", purged?))
        }
    }
}

/// A progress bar for a long operation, drawn on stderr only when stderr
/// is a terminal: piped or logged output gets the command's lines alone.
fn progress(len: usize, what: &'static str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len as u64), target);
    if let Ok(style) = ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

/// The configured room called `name`, or an error listing the rooms.
fn configured_room<'a>(
    config: &'a ValidatedConfig,
    name: &str,
) -> anyhow::Result<&'a config::RoomSettings> {
    config
        .rooms
        .iter()
        .find(|room| room.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = config.rooms.iter().map(|r| r.name.as_str()).collect();
            anyhow::anyhow!("unknown room {name:?} (rooms: {})", known.join(", "))
        })
}

async fn room(
    client: async_nats::Client,
    config: &ValidatedConfig,
    command: &RoomCommand,
) -> anyhow::Result<()> {
    use crate::cocoa_butter::control::{Control, Desired};
    let (name, desired) = match command {
        RoomCommand::Pause { room, reason } => {
            (room, Desired::new(true, reason.clone(), cli_actor()))
        }
        RoomCommand::Resume { room } => (room, Desired::new(false, None, cli_actor())),
    };
    let room = configured_room(config, name)?;
    let control = Control::new(
        async_nats::jetstream::new(client),
        config.bucket_storage.clone(),
    );
    control.open().await?;
    control.set(&room.name, &desired).await?;
    emit(&if desired.paused {
        format!(
            "paused {}: every replica stops pulling, finishes its in-flight work and reports not ready until `room resume {}`\n",
            room.name, room.name
        )
    } else {
        format!("resumed {}: every replica pulls again\n", room.name)
    })
}

/// Who wrote a desired state from the CLI: `cli@<host>`.
fn cli_actor() -> String {
    match nix::unistd::gethostname() {
        Ok(host) => format!("cli@{}", host.to_string_lossy()),
        Err(_) => "cli".to_string(),
    }
}

async fn streams_status(
    client: async_nats::Client,
    config: &ValidatedConfig,
    json: bool,
) -> anyhow::Result<()> {
    use crate::cocoa_butter::{bus, dlq};
    let js = async_nats::jetstream::new(client);
    let nats = &config.factory.nats;
    let mut rows = Vec::new();
    for room in config.enabled_rooms() {
        let (stream, consumer) = bus::room_status(&js, room)
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
        return emit(&(serde_json::to_string_pretty(&rows)? + "\n"));
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
        result: Result<crate::cocoa_butter::bus::Provisioned, E>,
    ) -> Self {
        use crate::cocoa_butter::bus::Provisioned;
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

async fn streams_ensure(
    client: async_nats::Client,
    config: &ValidatedConfig,
    json: bool,
) -> anyhow::Result<()> {
    use crate::cocoa_butter::bus::{self, Publisher};
    use crate::cocoa_butter::control::{CONTROL_BUCKET, Control};
    use crate::cocoa_butter::dlq;
    use crate::cocoa_butter::metrics::{ConnectionMetrics, RoomMetrics};
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
    let connection = ConnectionMetrics::default();
    for (spec, mut settings) in rooms {
        settings.buckets.provision = true;
        let outcome = bus::ensure_stream(
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
                bus::ensure_consumer(&js, &nats, &settings, bus::OrderingChange::Apply).await;
            report.push(Ensured::from_result(
                "consumer",
                &settings.durable_name,
                outcome,
            ));
        }
        bar.inc(1);
        // A room's buckets are its own business: its `prepare` opens them,
        // creating the missing ones, exactly as at start-up.
        let metrics = RoomMetrics::new(&settings.name, &connection);
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
        emit(&(serde_json::to_string_pretty(&report)? + "\n"))?;
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

async fn publish(client: async_nats::Client, args: &PublishArgs) -> anyhow::Result<()> {
    use crate::cocoa_butter::EventEnvelope;
    let payload = match (&args.payload, &args.payload_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("--payload-file {}", path.display()))?
        }
        (None, None) => anyhow::bail!("--payload or --payload-file is required"),
    };
    serde_json::from_slice::<serde_json::Value>(&payload).context("the payload is not JSON")?;
    let Some((domain, action)) = args.event_type.split_once('.') else {
        anyhow::bail!(
            "--type must be <domain>.<action>, like coordination.property_sync.requested"
        );
    };
    let envelope = EventEnvelope::new(
        uuid::Uuid::now_v7(),
        args.event_type.clone(),
        args.aggregate.clone(),
        args.correlation.clone().unwrap_or_default(),
        payload,
        "choco-factory-cli".into(),
    );
    let subject = format!("choco.events.{domain}.{action}");
    let js = async_nats::jetstream::new(client);
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(envelope.encode().into())
        .message_id(envelope.event_id.clone());
    let ack = js
        .send_publish(subject.clone(), message)
        .await
        .with_context(|| format!("publishing to {subject}"))?
        .await
        .with_context(|| format!("no stream stored {subject}"))?;
    emit(&format!(
        "published {} to {subject} (stream {}, sequence {})\n",
        envelope.event_id, ack.stream, ack.sequence
    ))
}

async fn tail(client: async_nats::Client, args: &TailArgs) -> anyhow::Result<()> {
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

/// Writes command output; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(()),
    }
}

fn serve(config: ValidatedConfig, dev: Option<&DevArgs>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Inside the runtime: the span exporter runs on it.
        let telemetry = telemetry::init(&config.factory.log, &config.factory.tracing)
            .map_err(|err| ConfigRefused(err.to_string()))?;
        if telemetry.exporting() {
            tracing::info!("exporting traces over OTLP");
        }
        let mut managed = match dev {
            Some(args) => Some(start_dev_nats(args).await?),
            None => None,
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(shutdown.clone()));
        let result = runtime::run(config, REGISTRY, shutdown).await;
        if let Some(nats) = managed.as_mut() {
            nats.stop().await;
        }
        telemetry.shutdown().await;
        result.map_err(|err| match err {
            runtime::RuntimeError::Refused(_) | runtime::RuntimeError::Bind(_) => {
                anyhow::Error::new(ConfigRefused(err.to_string()))
            }
            other => anyhow::Error::new(other),
        })
    })
}

async fn start_dev_nats(args: &DevArgs) -> anyhow::Result<ManagedNats> {
    let binary = nats_server::find_binary()?;
    let data_dir = std::path::absolute(&args.data_dir)
        .with_context(|| format!("--data-dir {}", args.data_dir.display()))?;
    tracing::info!(binary = %binary.display(), data_dir = %data_dir.display(), port = args.nats_port, "starting a local nats-server");
    let nats = ManagedNats::start(binary, &data_dir, args.nats_port).await?;
    tracing::info!(url = %nats.url(), "local nats-server is ready");
    Ok(nats)
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn shutdown_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
