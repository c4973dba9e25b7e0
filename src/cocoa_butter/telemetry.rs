//! Logging.
//!
//! JSON lines for machines, a human format for terminals. Every line logged
//! inside a room carries `factory.room` because the runtime runs all of a
//! room's tasks inside [`room_span`], and the JSON layer lifts span fields to
//! the top level of each line: call sites never repeat it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::config::{LogConfig, LogFormat, RoomSettings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log.filter: {0}")]
    Filter(String),
    #[error("a global logger is already installed")]
    AlreadyInstalled,
}

pub fn init_logging(log: &LogConfig) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives),
        _ => EnvFilter::try_new(&log.filter),
    }
    .map_err(|err| TelemetryError::Filter(err.to_string()))?;
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry
            .with(
                json_subscriber::fmt::layer()
                    .with_current_span(false)
                    .with_span_list(false)
                    .flatten_event(true)
                    .flatten_span_list_on_top_level(true),
            )
            .try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer()).try_init()
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)
}

/// The span a room's tasks run in; its field is on every line they log.
pub fn room_span(room: &RoomSettings) -> tracing::Span {
    tracing::info_span!("room", factory.room = %room.label)
}
