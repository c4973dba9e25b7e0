//! W3C trace context (`traceparent`, `tracestate`) across every hop: NATS
//! message headers on consume and publish, HTTP headers and gRPC metadata
//! on requests.
//!
//! With tracing on, an incoming context becomes the parent of the span that
//! handles it and every publish writes the context of its own span. With
//! tracing off, the headers that came in are what goes out: the hop is
//! invisible in the trace but does not break it. Either way the incoming
//! headers of the work at hand sit in a task-local, so the publisher finds
//! them without every room passing them along.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::tracing_enabled;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The trace headers of one message or request, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

tokio::task_local! {
    static INCOMING: TraceHeaders;
}

impl TraceHeaders {
    pub fn from_nats(headers: Option<&async_nats::HeaderMap>) -> Self {
        let get = |name: &str| {
            headers
                .and_then(|map| map.get(name))
                .map(|value| value.as_str().to_string())
        };
        TraceHeaders {
            traceparent: get(TRACEPARENT),
            tracestate: get(TRACESTATE),
        }
    }

    pub fn from_http(headers: &axum::http::HeaderMap) -> Self {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        TraceHeaders {
            traceparent: get(TRACEPARENT),
            tracestate: get(TRACESTATE),
        }
    }

    /// Writes the headers that are set onto a NATS message's headers.
    pub fn write_nats(&self, headers: &mut async_nats::HeaderMap) {
        if let Some(traceparent) = &self.traceparent {
            headers.insert(TRACEPARENT, traceparent.as_str());
        }
        if let Some(tracestate) = &self.tracestate {
            headers.insert(TRACESTATE, tracestate.as_str());
        }
    }

    /// The trace id of a well-formed `traceparent`
    /// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`).
    pub fn trace_id(&self) -> Option<&str> {
        let mut parts = self.traceparent.as_deref()?.split('-');
        let (_version, trace_id) = (parts.next()?, parts.next()?);
        (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(trace_id)
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE => self.tracestate = Some(value).filter(|v| !v.is_empty()),
            _ => {}
        }
    }
}

/// Makes `span` continue the trace `incoming` belongs to; without one, the
/// span starts a trace of its own. Nothing to do with tracing off.
pub fn continue_trace(span: &tracing::Span, incoming: &TraceHeaders) {
    if !tracing_enabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(incoming);
    // Always set, even to an empty context: the span must not inherit the
    // context of whatever span happens to enclose it.
    let _ = span.set_parent(parent);
}

/// Runs `work` with `incoming` as the trace headers of the work at hand.
pub async fn with_incoming<F: Future>(incoming: TraceHeaders, work: F) -> F::Output {
    INCOMING.scope(incoming, work).await
}

/// The trace headers an output of the current work carries.
pub fn outgoing() -> TraceHeaders {
    if tracing_enabled() {
        let mut headers = TraceHeaders::default();
        TraceContextPropagator::new()
            .inject_context(&tracing::Span::current().context(), &mut headers);
        if headers.traceparent.is_some() {
            return headers;
        }
    }
    INCOMING.try_with(Clone::clone).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_trace_id_of_a_well_formed_traceparent_only() {
        let good = TraceHeaders {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: None,
        };
        assert_eq!(good.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let bad = TraceHeaders {
            traceparent: Some("00-not-hex-01".into()),
            tracestate: None,
        };
        assert_eq!(bad.trace_id(), None);
    }

    #[tokio::test]
    async fn with_tracing_off_the_incoming_headers_go_out_unchanged() {
        let incoming = TraceHeaders {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: Some("vendor=1".into()),
        };
        let out = with_incoming(incoming.clone(), async { outgoing() }).await;
        assert_eq!(out, incoming);
        assert_eq!(outgoing(), TraceHeaders::default());
    }
}
