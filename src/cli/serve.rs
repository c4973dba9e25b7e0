//! `serve` and `dev`: run the rooms until a signal stops them.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;

use super::Refused;
use super::connect::load;
use crate::cocoa_butter::config::{CliOverrides, ConfigSources, LogFormat};
use crate::cocoa_butter::nats_server::{self, ManagedNats};
use crate::cocoa_butter::{runtime, telemetry};
use crate::rooms::REGISTRY;

/// Flags of the commands that run rooms.
#[derive(Debug, Args, Clone, Default)]
pub(super) struct RunArgs {
    /// Address every room binds (overrides bind), e.g. 0.0.0.0 in a container.
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,
    /// Log lines as JSON, for people (pretty), or JSON unless stdout is a
    /// terminal (auto; overrides log.format).
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormatArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Auto,
    Json,
    Pretty,
}

impl RunArgs {
    fn overrides(&self, only_rooms: Option<Vec<String>>) -> CliOverrides {
        CliOverrides {
            nats_url: None,
            bind: self.bind,
            log_format: self.log_format.map(|format| match format {
                LogFormatArg::Auto => LogFormat::Auto,
                LogFormatArg::Json => LogFormat::Json,
                LogFormatArg::Pretty => LogFormat::Pretty,
            }),
            only_rooms,
        }
    }
}

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// Run exactly these rooms (comma-separated), whatever their enable flags say.
    #[arg(long, value_delimiter = ',', value_name = "ROOMS")]
    rooms: Option<Vec<String>>,
    #[command(flatten)]
    run: RunArgs,
}

impl ServeArgs {
    pub(super) fn overrides(&self) -> CliOverrides {
        self.run.overrides(self.rooms.clone())
    }
}

#[derive(Debug, Args)]
pub(super) struct DevArgs {
    /// Run only these rooms (comma-separated); default: every room.
    #[arg(long, value_delimiter = ',', value_name = "ROOMS")]
    rooms: Option<Vec<String>>,
    /// Where the local nats-server keeps its JetStream store and log.
    #[arg(long, default_value = ".choco-dev", value_name = "DIR")]
    data_dir: PathBuf,
    /// Client port of the local nats-server.
    #[arg(long, default_value_t = 4222, value_name = "PORT")]
    nats_port: u16,
    #[command(flatten)]
    run: RunArgs,
}

impl DevArgs {
    /// The rooms run on the local server, whatever `--nats-url` says.
    pub(super) fn overrides(&self) -> CliOverrides {
        CliOverrides {
            nats_url: Some(format!("nats://127.0.0.1:{}", self.nats_port)),
            ..self.run.overrides(self.rooms.clone())
        }
    }
}

/// Runs the rooms until SIGTERM or SIGINT; with `dev`, on a local
/// nats-server started first and stopped last.
pub(super) fn serve(sources: ConfigSources, dev: Option<&DevArgs>) -> anyhow::Result<()> {
    let config = load(&sources)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Inside the runtime: the span exporter runs on it.
        let telemetry =
            telemetry::init(&config.factory.log, &config.factory.tracing).map_err(Refused::new)?;
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
                anyhow::Error::new(Refused::new(err))
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
