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
//! `span_id`; with it off, lines about an event that came with a
//! `traceparent` carry that trace's `trace_id`.
//!
//! Tracing off costs nothing measurable: no OpenTelemetry layer is
//! installed, the child spans (handler, store operations, publishes) are not
//! created, and trace headers that came in are passed through to the outputs
//! unchanged so a trace begun elsewhere is not broken by this hop.

pub mod config;
mod otel;
pub mod propagation;

use std::io::IsTerminal;
use std::sync::OnceLock;

use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use config::{LogConfig, LogFormat, TracingConfig};

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

/// The live log filter, changeable at run time.
static LOG_FILTER: OnceLock<LogFilter> = OnceLock::new();

struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Mutex<String>,
}

/// A layer that does nothing but mark a subscriber as exporting spans, so
/// hot paths can ask the subscriber in force rather than a global.
struct Exporting;

impl<S: tracing::Subscriber> Layer<S> for Exporting {}

/// Whether the subscriber in force exports spans; read on hot paths to skip
/// the work of spans nobody will see.
pub fn tracing_enabled() -> bool {
    tracing::dispatcher::get_default(|dispatch| dispatch.is::<Exporting>())
}

/// What `init` installed; `shutdown` flushes the spans still buffered.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
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

/// The OTLP tracer provider `config` and the `OTEL_*` variables ask for;
/// `None` when tracing is off. Must run inside the Tokio runtime: the span
/// exporter runs on it.
pub fn tracer_provider(
    config: &TracingConfig,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    otel::tracer_provider(config)
}

/// Installs the process's subscriber. Must run inside the Tokio runtime.
pub fn init(log: &LogConfig, tracing: &TracingConfig) -> Result<Telemetry, TelemetryError> {
    let directives = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => directives,
        _ => log.filter.clone(),
    };
    let filter =
        EnvFilter::try_new(&directives).map_err(|err| TelemetryError::Filter(err.to_string()))?;
    let (filter, handle) = reload::Layer::new(filter);
    let provider = tracer_provider(tracing)?;
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    subscriber(filter, json, std::io::stdout, provider.as_ref())
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    let _ = LOG_FILTER.set(LogFilter {
        handle,
        current: std::sync::Mutex::new(directives),
    });
    Ok(Telemetry { tracer: provider })
}

/// The subscriber: `filter`, then spans to `provider` when there is one,
/// then log lines (JSON or human) to `writer`. [`init`] installs it for the
/// process; a benchmark can run code under it with `with_default`.
pub fn subscriber<F, W>(
    filter: F,
    json: bool,
    writer: W,
    provider: Option<&SdkTracerProvider>,
) -> impl tracing::Subscriber + Send + Sync + for<'a> tracing_subscriber::registry::LookupSpan<'a>
where
    F: Layer<Registry> + Send + Sync + 'static,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let otel_layer = provider.map(|provider| {
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
    let exporting = provider.is_some();
    let fmt_layer = if json {
        let mut layer = json_subscriber::fmt::layer()
            .with_writer(writer)
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
        tracing_subscriber::fmt::layer()
            .with_ansi(colours_wanted())
            .with_writer(writer)
            .boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(exporting.then_some(Exporting))
        .with(fmt_layer)
}

/// Colour in human log lines only for a terminal that can show it: not
/// when stdout is a pipe or a file, not for `TERM=dumb`, not with
/// `NO_COLOR` set (no-color.org).
fn colours_wanted() -> bool {
    std::io::stdout().is_terminal()
        && std::env::var("TERM").map_or(true, |term| term != "dumb")
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
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
pub fn room_span(label: &str) -> tracing::Span {
    // At ERROR level so that no log filter disables it: an info span would
    // vanish under `warn`, and with it the room's name on every warning.
    tracing::error_span!("room", factory.room = %label)
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

// The spans of the runtime, in one place so their attributes follow one
// set of conventions (OpenTelemetry's messaging and database semantic
// conventions). The child spans are created only when exporting: with
// tracing off nobody would see them.

/// What the span of one delivery says about it.
pub struct MessageSpan<'a> {
    pub subject: &'a str,
    pub consumer: &'a str,
    pub delivered: i64,
    pub sequence: u64,
    /// The `Nats-Msg-Id` header, when the message has one.
    pub message_id: Option<&'a str>,
    /// The event's ids, when its envelope decoded.
    pub event: Option<EventIds<'a>>,
}

/// The ids of a decoded event, on every log line about it.
pub struct EventIds<'a> {
    pub event_id: &'a str,
    pub correlation_id: &'a str,
    pub aggregate_id: &'a str,
}

/// The span of one delivery, in the messaging conventions, with every
/// field known when it is opened: the JSON log layer serializes a span's
/// fields anew on each `record`, and recording the ids after opening it
/// was four or five serializations per message instead of one.
/// Continues the trace of the message's `traceparent`.
pub fn message_span(
    message: &MessageSpan<'_>,
    incoming: &propagation::TraceHeaders,
) -> tracing::Span {
    let event = message.event.as_ref();
    let exporting = tracing_enabled();
    // Exporting, the JSON layer writes the span's own trace id; not
    // exporting, the one that came in still links these lines to the
    // trace the publisher began, as the correlation id links them to the
    // request.
    let incoming_trace_id = if exporting { None } else { incoming.trace_id() };
    let span = tracing::info_span!(
        "nats.process",
        otel.name = tracing::field::Empty,
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = message.subject,
        messaging.consumer.group.name = message.consumer,
        messaging.message.id = message.message_id,
        messaging.nats.delivery_count = message.delivered,
        // As i64: tracing-opentelemetry exports a u64 as its text.
        messaging.nats.stream_sequence = i64::try_from(message.sequence).unwrap_or(i64::MAX),
        event_id = event.map(|ids| ids.event_id),
        correlation_id = event.map(|ids| ids.correlation_id),
        aggregate_id = event.map(|ids| ids.aggregate_id),
        trace_id = incoming_trace_id,
    );
    if span.is_disabled() {
        // A log filter above `info` turns this span off; the message's work
        // then runs in the room's span, so its warnings still name the room.
        return tracing::Span::current();
    }
    if exporting {
        span.record("otel.name", format!("process {}", message.subject));
        propagation::continue_trace(&span, incoming);
    }
    span
}

/// The room's handler at work on one event.
pub fn handler_span(service: &str, event_type: &str) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "handle",
        otel.name = %format!("{service} handle {event_type}"),
        otel.status_code = tracing::field::Empty,
    )
}

/// One publish of an output envelope.
pub fn publish_span(subject: &str, event_id: &str, aggregate_id: &str) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "nats.publish",
        otel.name = %format!("send {subject}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.destination.name = %subject,
        messaging.message.id = %event_id,
        event_id = %event_id,
        aggregate_id = %aggregate_id,
    )
}

/// One key-value or object store operation (`store` is `kv` or `object`).
pub fn store_span(store: &str, operation: &'static str, bucket: &str) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "store",
        otel.name = %format!("{store} {operation} {bucket}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        db.system.name = "nats",
        db.collection.name = %bucket,
        db.operation.name = operation,
    )
}
