//! What tracing costs per event: the telemetry work the runtime does for
//! one delivery (the message span with its messaging attributes, the trace
//! context taken from the headers, the handler span, two key-value spans,
//! the publish span with the `traceparent` written for the output, and the
//! latency observation with its exemplar), measured side by side
//!
//! - with tracing off: the JSON log subscriber only, as a default deployment;
//! - with export on: the same plus the OpenTelemetry layer exporting every
//!   span over OTLP/gRPC, through the real batch exporter, to a receiver
//!   running in this process.
//!
//! Run: `cargo bench --bench tracing`. It uses the runtime's own span and
//! propagation functions, so it measures what the consumer does.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use choco_factory::cocoa_butter::config::{OtlpProtocol, TracingConfig};
use choco_factory::cocoa_butter::metrics::{Outcome, RoomMetrics};
use choco_factory::cocoa_butter::telemetry::{self, EventIds, MessageSpan, propagation};
use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tracing_subscriber::EnvFilter;

const SUBJECT: &str = "choco.events.coordination.property_sync.requested";
const OUTPUT: &str = "choco.events.coordination.property_sync.completed";

/// Counts what it is sent and drops it.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The telemetry work of one delivery, as the consumer, the handler's
/// buckets and the publisher do it.
fn one_event(metrics: &RoomMetrics, incoming: &propagation::TraceHeaders, sequence: u64) {
    let span = telemetry::message_span(
        &MessageSpan {
            subject: SUBJECT,
            consumer: "choco-conch",
            delivered: 1,
            sequence,
            message_id: Some("0199a0b1-7c1e-7000-8000-000000000001"),
            event: Some(EventIds {
                event_id: "0199a0b1-7c1e-7000-8000-000000000001",
                correlation_id: "0199a0b1-7c1e-7000-8000-000000000001",
                aggregate_id: "doc-1",
            }),
        },
        incoming,
    );
    let _in_message = span.enter();
    {
        let handler = telemetry::handler_span("the-conch", "coordination.property_sync.requested");
        let _in_handler = handler.enter();
        for operation in ["entry", "update"] {
            let store = telemetry::store_span("kv", operation, "choco_conch_documents");
            let _in_store = store.enter();
        }
    }
    let publish = telemetry::publish_span(OUTPUT, "0199a0b1-7c1e-7000-8000-000000000002", "doc-1");
    black_box(publish.in_scope(propagation::outgoing));
    metrics.finished("coordination.property_sync.requested", Outcome::Ok, 0.0012);
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let receiver = Receiver::default();
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .expect("receiver serves");
        });
        addr
    });
    let provider = {
        let _in_runtime = runtime.enter();
        telemetry::tracer_provider(&TracingConfig {
            endpoint: Some(format!("http://{addr}")),
            protocol: Some(OtlpProtocol::Grpc),
            service_name: None,
            ca_file: None,
        })
        .expect("provider")
        .expect("an endpoint turns export on")
    };
    let metrics = RoomMetrics::new("conch", None);
    let incoming = propagation::TraceHeaders {
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        tracestate: None,
    };

    let mut group = c.benchmark_group("per_event");
    let off = telemetry::subscriber(EnvFilter::new("info"), true, std::io::sink, None);
    tracing::subscriber::with_default(off, || {
        assert!(!telemetry::tracing_enabled());
        let mut sequence = 0;
        group.bench_function("tracing_off", |b| {
            b.iter(|| {
                sequence += 1;
                one_event(&metrics, &incoming, sequence)
            })
        });
    });
    let on = telemetry::subscriber(EnvFilter::new("info"), true, std::io::sink, Some(&provider));
    tracing::subscriber::with_default(on, || {
        assert!(telemetry::tracing_enabled());
        let mut sequence = 0;
        group.bench_function("tracing_on_exporting", |b| {
            b.iter(|| {
                sequence += 1;
                one_event(&metrics, &incoming, sequence)
            })
        });
    });
    group.finish();
    let _in_runtime = runtime.enter();
    let _ = provider.force_flush();
    eprintln!(
        "receiver got {} spans over OTLP/gRPC",
        receiver.spans.load(Ordering::Relaxed)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
