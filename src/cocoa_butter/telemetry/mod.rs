//! Logs and traces, for every room, written once here.
//!
//! One `tracing` subscriber per process:
//!
//! ```text
//! registry ─┬─ log filter (EnvFilter behind a reload handle: PUT /admin/log-filter)
//!           ├─ OpenTelemetry layer (only when an OTLP endpoint is configured)
//!           └─ JSON lines (not a terminal) or human format (a terminal)
//! ```
//!
//! Every line logged inside a room carries `factory.room` because the
//! runtime runs a room's tasks inside [`room_span`] and the JSON layer lifts
//! span fields to the top level of each line; lines about an event carry its
//! `correlation_id` and `event_id` the same way, from the message span the
//! consumer opens. With tracing on, lines also carry `trace_id` and
//! `span_id`.
//!
//! Tracing off costs nothing measurable: no OpenTelemetry layer is
//! installed, the child spans (handler, store operations, publishes) are not
//! created, and trace headers that came in are passed through to the outputs
//! unchanged so a trace begun elsewhere is not broken by this hop.

mod otel;
pub mod propagation;
pub mod requests;

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use super::config::{LogConfig, LogFormat, RoomSettings, TracingConfig};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log.filter: {0}")]
    Filter(String),
    #[error("a global logger is already installed")]
    AlreadyInstalled,
    #[error("{key}: {message}")]
    Tracing { key: &'static str, message: String },
    #[error("logging is not initialised in this process")]
    NotInitialised,
}

/// Whether spans are exported; read on hot paths to skip work when not.
static TRACING_ENABLED: AtomicBool = AtomicBool::new(false);

/// The live log filter, changeable at run time.
static LOG_FILTER: OnceLock<LogFilter> = OnceLock::new();

struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Mutex<String>,
}

/// Whether an OpenTelemetry exporter is installed in this process.
pub fn tracing_enabled() -> bool {
    TRACING_ENABLED.load(Ordering::Relaxed)
}

/// What `init` installed; `shutdown` flushes the spans still buffered.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Where spans go, for the start-up log line; `None` when off.
    pub fn exporting(&self) -> bool {
        self.tracer.is_some()
    }

    /// Exports what is buffered and stops the exporter. The SDK's shutdown
    /// blocks, so it runs off the async workers.
    pub async fn shutdown(self) {
        let Some(provider) = self.tracer else { return };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "flushing spans at shutdown failed"),
            Err(err) => tracing::warn!(error = %err, "flushing spans at shutdown panicked"),
        }
    }
}

/// Installs the process's subscriber. Must run inside the Tokio runtime:
/// the span exporter runs on it.
pub fn init(log: &LogConfig, tracing: &TracingConfig) -> Result<Telemetry, TelemetryError> {
    let directives = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => directives,
        _ => log.filter.clone(),
    };
    let filter =
        EnvFilter::try_new(&directives).map_err(|err| TelemetryError::Filter(err.to_string()))?;
    let (filter, handle) = reload::Layer::new(filter);

    let provider = otel::tracer_provider(tracing)?;
    let otel_layer = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("choco-factory"))
            .with_level(true)
            // The room span lives as long as the process: as an exported span
            // it would swallow every trace into one. Logs keep it.
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                !(meta.is_span() && meta.name() == ROOM_SPAN)
            }))
    });
    let exporting = otel_layer.is_some();

    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let fmt_layer = if json {
        let mut layer = json_subscriber::fmt::layer()
            .with_current_span(false)
            .with_span_list(false)
            .flatten_event(true)
            .flatten_span_list_on_top_level(true);
        if exporting {
            layer
                .inner_layer_mut()
                .add_multiple_dynamic_fields(|event, ctx, writer| {
                    let Some(span) = ctx.event_span(event) else {
                        return;
                    };
                    let Some(cx) = tracing::dispatcher::get_default(|dispatch| {
                        tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
                    }) else {
                        return;
                    };
                    let otel_span = cx.span();
                    let span_context = otel_span.span_context();
                    if span_context.is_valid() {
                        let _ = writer.write_field("trace_id", span_context.trace_id().to_string());
                        let _ = writer.write_field("span_id", span_context.span_id().to_string());
                    }
                });
        }
        layer.boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(fmt_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    let _ = LOG_FILTER.set(LogFilter {
        handle,
        current: std::sync::Mutex::new(directives),
    });
    TRACING_ENABLED.store(exporting, Ordering::Relaxed);
    Ok(Telemetry { tracer: provider })
}

/// The log filter in force (`info,async_nats=warn`).
pub fn log_filter() -> Result<String, TelemetryError> {
    let filter = LOG_FILTER.get().ok_or(TelemetryError::NotInitialised)?;
    Ok(filter
        .current
        .lock()
        .map(|current| current.clone())
        .unwrap_or_default())
}

/// Replaces the log filter without a restart. Bad directives are refused
/// and leave the filter as it was.
pub fn set_log_filter(directives: &str) -> Result<(), TelemetryError> {
    let filter = LOG_FILTER.get().ok_or(TelemetryError::NotInitialised)?;
    let parsed =
        EnvFilter::try_new(directives).map_err(|err| TelemetryError::Filter(err.to_string()))?;
    filter
        .handle
        .reload(parsed)
        .map_err(|err| TelemetryError::Filter(err.to_string()))?;
    if let Ok(mut current) = filter.current.lock() {
        *current = directives.to_string();
    }
    tracing::info!(filter = directives, "log filter changed");
    Ok(())
}

/// Name of [`room_span`]'s span, kept out of exported traces.
const ROOM_SPAN: &str = "room";

/// The span a room's tasks run in; its field is on every line they log.
pub fn room_span(room: &RoomSettings) -> tracing::Span {
    tracing::info_span!("room", factory.room = %room.label)
}

/// The trace id of the current span, for exemplars; `None` when tracing is
/// off or the span is not part of a valid trace.
pub fn current_trace_id() -> Option<String> {
    if !tracing_enabled() {
        return None;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let otel_span = cx.span();
    let span_context = otel_span.span_context();
    (span_context.is_valid() && span_context.is_sampled())
        .then(|| span_context.trace_id().to_string())
}
