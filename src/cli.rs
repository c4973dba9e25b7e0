//! The command line: `serve`, `dev`, `config check|show`, `rooms`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::cocoa_butter::config::{self, CliOverrides, ConfigSources, LogFormat, ValidatedConfig};
use crate::cocoa_butter::nats_server::{self, ManagedNats};
use crate::cocoa_butter::{runtime, telemetry};
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

/// Writes command output; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(()),
    }
}

fn serve(config: ValidatedConfig, dev: Option<&DevArgs>) -> anyhow::Result<()> {
    telemetry::init_logging(&config.factory.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
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
