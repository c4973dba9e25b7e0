//! Traces, metrics and logs as on-call sees them: spans exported to a real
//! OTLP receiver (the published OTLP protos, served in the test over gRPC
//! and over HTTP/protobuf), `traceparent` on the outputs in the stream,
//! `/metrics` in both exposition formats, and the log lines.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::{Value, json};

use choco_factory::rooms::conch::pb;
use common::*;

const REQUESTED: &str = "choco.events.coordination.property_sync.requested";
const COMPLETED: &str = "choco.events.coordination.property_sync.completed";
const COORDINATION: &str = "choco:events:coordination";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";
const WAIT: Duration = Duration::from_secs(30);

/// One exported span, flattened with its resource.
#[derive(Debug, Clone)]
struct Exported {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    kind: i32,
    attributes: HashMap<String, String>,
    resource: HashMap<String, String>,
    status_code: i32,
    /// The attributes sent as OTLP integers (the rest only as text above).
    integers: HashMap<String, i64>,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn map(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// What a receiver has been sent so far.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Exported>>>);

impl Received {
    fn record(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().expect("spans");
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| map(&r.attributes))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Exported {
                        name: span.name,
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        kind: span.kind,
                        attributes: map(&span.attributes),
                        integers: span
                            .attributes
                            .iter()
                            .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                any_value::Value::IntValue(i) => Some((kv.key.clone(), *i)),
                                _ => None,
                            })
                            .collect(),
                        resource: resource.clone(),
                        status_code: span.status.map_or(0, |s| s.code),
                    });
                }
            }
        }
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Exported> {
        self.0
            .lock()
            .expect("spans")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until the trace has a span that satisfies `wanted`.
    async fn wait_for(
        &self,
        trace_id: &str,
        what: &str,
        wanted: impl Fn(&Exported) -> bool,
    ) -> Exported {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(span) = self.of_trace(trace_id).into_iter().find(|s| wanted(s)) {
                return span;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {what} span in trace {trace_id}; got {:#?}",
                self.of_trace(trace_id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.record(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC trace receiver on an ephemeral port.
async fn grpc_receiver() -> (Received, SocketAddr) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .expect("receiver serves");
    });
    (received, addr)
}

/// An OTLP/gRPC trace receiver behind TLS: a test CA's certificate for
/// localhost. Returns the receiver, its port and the CA's PEM file.
async fn tls_grpc_receiver(dir: &std::path::Path) -> (Received, SocketAddr, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("sign");
    let ca_file = dir.join("otlp-ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write CA");

    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let identity = tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .expect("server TLS")
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .expect("receiver serves");
    });
    (received, addr, ca_file)
}

/// An OTLP/HTTP (protobuf) trace receiver on an ephemeral port.
async fn http_receiver() -> (Received, SocketAddr) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let request = <ExportTraceServiceRequest as prost::Message>::decode(body)
                    .expect("an OTLP protobuf body");
                sink.record(request);
                (
                    [("content-type", "application/x-protobuf")],
                    prost::Message::encode_to_vec(&ExportTraceServiceResponse {
                        partial_success: None,
                    }),
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.expect("receiver serves") });
    (received, addr)
}

fn traced_env(nats_url: &str, endpoint: String, protocol: &str) -> Vec<(String, String)> {
    let mut env = conch_env(nats_url);
    env.extend(
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_SERVICE_NAME", "choco-factory-under-test"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            // Export often so the test does not wait on the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("CHOCO_LOG__FILTER", "info,choco_factory=debug"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    env
}

async fn publish_traced(js: &jetstream::Context, document: &str, traceparent: &str) -> String {
    let event = envelope(
        "coordination.property_sync.requested",
        document,
        &sync_payload(
            document,
            "tags",
            json!(["a"]),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", traceparent);
    headers.insert("tracestate", "vendor=abc");
    let message = jetstream::message::PublishMessage::build()
        .payload(event.encode().into())
        .headers(headers)
        .message_id(&event.event_id);
    js.send_publish(REQUESTED.to_string(), message)
        .await
        .expect("publish")
        .await
        .expect("stored");
    event.event_id.to_string()
}

#[tokio::test]
async fn an_event_with_a_traceparent_continues_its_trace_through_the_room() {
    let (received, addr) = grpc_receiver().await;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start_with(
        traced_env(&nats.url(), format!("http://{addr}"), "grpc"),
        &["serve", "--rooms", "conch"],
    )
    .await;
    factory.wait_ready().await;

    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    let event_id = publish_traced(&js, "doc-traced", &traceparent).await;

    // The output carries the same trace, with a parent of its own.
    let outputs = wait_for(&js, COORDINATION, COMPLETED, 1, WAIT).await;
    let out_parent = outputs[0]
        .header("traceparent")
        .expect("output traceparent");
    let parts: Vec<&str> = out_parent.split('-').collect();
    assert_eq!(parts.len(), 4, "{out_parent}");
    assert_eq!(parts[1], TRACE_ID, "the output continues the input's trace");
    assert_ne!(
        parts[2], PARENT_SPAN,
        "the output's parent is this hop's span"
    );
    assert_eq!(
        outputs[0].header("tracestate").as_deref(),
        Some("vendor=abc")
    );
    let correlation = outputs[0].envelope().correlation_id;

    // The message span is the child of the publisher's span, in the
    // messaging conventions, with the event's ids.
    let process = received
        .wait_for(TRACE_ID, "consumer", |s| {
            s.kind == SpanKind::Consumer as i32
        })
        .await;
    assert_eq!(process.parent_span_id, PARENT_SPAN);
    assert_eq!(process.name, format!("process {REQUESTED}"));
    for (key, value) in [
        ("messaging.system", "nats"),
        ("messaging.destination.name", REQUESTED),
        ("messaging.message.id", event_id.as_str()),
        ("messaging.nats.delivery_count", "1"),
        ("messaging.nats.stream_sequence", "1"),
        ("event_id", event_id.as_str()),
        ("aggregate_id", "doc-traced"),
        ("correlation_id", correlation.as_str()),
    ] {
        assert_eq!(
            process.attributes.get(key).map(String::as_str),
            Some(value),
            "{key} on {process:#?}"
        );
    }
    for key in [
        "messaging.nats.delivery_count",
        "messaging.nats.stream_sequence",
    ] {
        assert_eq!(process.integers.get(key), Some(&1), "{key} as an integer");
    }
    assert_eq!(process.resource["service.name"], "choco-factory-under-test");
    assert_eq!(
        process.resource["service.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(process.resource.contains_key("service.instance.id"));
    assert_eq!(process.resource["deployment.environment"], "test");

    // Children: the handler, its key-value operations, the publish; and
    // the publish span is the parent written on the output.
    let handler = received
        .wait_for(TRACE_ID, "handler", |s| s.name.contains("handle"))
        .await;
    assert_eq!(handler.parent_span_id, process.span_id);
    let kv = received
        .wait_for(TRACE_ID, "kv", |s| s.name.starts_with("kv "))
        .await;
    assert_eq!(kv.kind, SpanKind::Client as i32);
    assert_eq!(kv.attributes["db.system.name"], "nats");
    let publish = received
        .wait_for(TRACE_ID, "publish", |s| s.kind == SpanKind::Producer as i32)
        .await;
    assert_eq!(
        publish.span_id, parts[2],
        "the output's parent is the publish span"
    );
    assert_eq!(publish.attributes["messaging.destination.name"], COMPLETED);

    // Log lines about the event carry the room, the trace and the event.
    let line = factory
        .logs_containing("\"handled\"")
        .into_iter()
        .next()
        .expect("a debug line for the handled event");
    let line: Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(line["factory.room"], "Fudge Room");
    assert_eq!(line["trace_id"], TRACE_ID);
    assert_eq!(line["span_id"], process.span_id);
    assert_eq!(line["event_id"], event_id);
    assert_eq!(line["correlation_id"], correlation);
    assert!(line["timestamp"].is_string() && line["level"] == "DEBUG");
}

#[tokio::test]
async fn a_failure_is_recorded_on_the_span_and_untraced_events_start_a_trace() {
    let (received, addr) = grpc_receiver().await;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start_with(
        traced_env(&nats.url(), format!("http://{addr}"), "grpc"),
        &["serve", "--rooms", "conch"],
    )
    .await;
    factory.wait_ready().await;

    // Valid envelope, invalid payload: dead-lettered, span in error.
    let bad = envelope(
        "coordination.property_sync.requested",
        "doc-bad",
        &json!({"document_id": 7}),
    );
    let bad_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{bad_trace}-b7ad6b7169203331-01").as_str(),
    );
    js.send_publish(
        REQUESTED.to_string(),
        jetstream::message::PublishMessage::build()
            .payload(bad.encode().into())
            .headers(headers)
            .message_id(&bad.event_id),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    let failed = received
        .wait_for(bad_trace, "consumer", |s| {
            s.kind == SpanKind::Consumer as i32
        })
        .await;
    assert_eq!(failed.status_code, 2, "status ERROR on {failed:#?}");

    // No traceparent: the room starts a trace and the output carries it.
    let plain = envelope(
        "coordination.property_sync.requested",
        "doc-plain",
        &sync_payload(
            "doc-plain",
            "tags",
            json!(["b"]),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    publish(&js, REQUESTED, &plain).await;
    let outputs = wait_for(&js, COORDINATION, COMPLETED, 1, WAIT).await;
    let started = outputs[0].header("traceparent").expect("a new trace");
    let trace_id = started.split('-').nth(1).expect("trace id").to_string();
    let root = received
        .wait_for(&trace_id, "consumer", |s| {
            s.kind == SpanKind::Consumer as i32
        })
        .await;
    assert!(root.parent_span_id.is_empty(), "a root span: {root:#?}");

    // Probes are not traced: a kubelet's or load balancer's every few
    // seconds would bury the requests worth looking at.
    let probe_trace = "55555555555555555555555555555555";
    for path in ["/healthz", "/readyz"] {
        reqwest::Client::new()
            .get(factory.url(path))
            .header(
                "traceparent",
                format!("00-{probe_trace}-6666666666666666-01"),
            )
            .send()
            .await
            .expect("probe");
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", factory.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("health connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut check = tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());
    check.metadata_mut().insert(
        "traceparent",
        format!("00-{probe_trace}-6666666666666666-01")
            .parse()
            .expect("metadata"),
    );
    health.check(check).await.expect("health check");

    // HTTP and gRPC requests continue the caller's trace too.
    let http_trace = "11111111111111111111111111111111";
    let response = reqwest::Client::new()
        .get(factory.url("/v1/documents/doc-plain/properties"))
        .header(
            "traceparent",
            format!("00-{http_trace}-2222222222222222-01"),
        )
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
    let server = received
        .wait_for(http_trace, "HTTP server", |s| {
            s.kind == SpanKind::Server as i32
        })
        .await;
    assert_eq!(server.parent_span_id, "2222222222222222");
    assert_eq!(
        server.attributes["http.route"],
        "/v1/documents/{document_id}/properties"
    );
    assert_eq!(
        server.integers.get("http.response.status_code"),
        Some(&200),
        "an integer, as the HTTP conventions type it: {server:#?}"
    );

    let grpc_trace = "33333333333333333333333333333333";
    let mut client = pb::conch_client::ConchClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc connect");
    let mut request = tonic::Request::new(pb::GetPropertiesRequest {
        document_id: "doc-plain".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{grpc_trace}-4444444444444444-01")
            .parse()
            .expect("metadata"),
    );
    client
        .get_properties(request)
        .await
        .expect("get properties");
    let server = received
        .wait_for(grpc_trace, "gRPC server", |s| {
            s.kind == SpanKind::Server as i32
        })
        .await;
    assert_eq!(server.parent_span_id, "4444444444444444");
    assert_eq!(server.attributes["rpc.system"], "grpc");
    assert_eq!(server.attributes["rpc.method"], "GetProperties");
    // By now the probes' spans, had there been any, were exported with or
    // before the requests that came after them.
    assert!(
        received.of_trace(probe_trace).is_empty(),
        "probe spans: {:#?}",
        received.of_trace(probe_trace)
    );
}

#[tokio::test]
async fn spans_are_exported_over_otlp_http_protobuf_too() {
    let (received, addr) = http_receiver().await;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start_with(
        traced_env(&nats.url(), format!("http://{addr}"), "http/protobuf"),
        &["serve", "--rooms", "conch"],
    )
    .await;
    factory.wait_ready().await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    publish_traced(&js, "doc-http", &traceparent).await;
    let process = received
        .wait_for(TRACE_ID, "consumer", |s| {
            s.kind == SpanKind::Consumer as i32
        })
        .await;
    assert_eq!(process.parent_span_id, PARENT_SPAN);
}

/// OTLP over TLS: an `https://` collector whose certificate chains to the
/// CA of `tracing.ca_file` receives the spans; http/protobuf over https is
/// refused at start, naming the key, rather than failing at every export.
#[tokio::test]
async fn spans_are_exported_to_an_https_collector_trusting_its_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (received, addr, ca_file) = tls_grpc_receiver(dir.path()).await;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let endpoint = format!("https://localhost:{}", addr.port());
    let mut env = traced_env(&nats.url(), endpoint.clone(), "grpc");
    env.push((
        "CHOCO_TRACING__CA_FILE".into(),
        ca_file.display().to_string(),
    ));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    publish_traced(&js, "doc-tls", &format!("00-{TRACE_ID}-{PARENT_SPAN}-01")).await;
    let process = received
        .wait_for(TRACE_ID, "consumer", |s| {
            s.kind == SpanKind::Consumer as i32
        })
        .await;
    assert_eq!(process.parent_span_id, PARENT_SPAN);
    drop(factory);

    let refused = tokio::process::Command::new(BIN)
        .args(["serve", "--rooms", "conch"])
        .envs(traced_env(&nats.url(), endpoint, "http/protobuf"))
        .output()
        .await
        .expect("run serve");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("tracing.protocol") && stderr.contains("https"),
        "{stderr}"
    );
}

#[tokio::test]
async fn without_tracing_the_trace_headers_pass_through_and_link_the_logs() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let mut env = conch_env(&nats.url());
    env.push((
        "CHOCO_LOG__FILTER".into(),
        "info,choco_factory=debug".into(),
    ));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    let event_id = publish_traced(&js, "doc-untraced", &traceparent).await;
    let outputs = wait_for(&js, COORDINATION, COMPLETED, 1, WAIT).await;
    assert_eq!(
        outputs[0].header("traceparent").as_deref(),
        Some(traceparent.as_str()),
        "an untraced hop forwards the trace it was given"
    );
    let correlation = outputs[0].envelope().correlation_id;
    assert!(!correlation.is_empty());
    wait_until(WAIT, || async {
        !factory.logs_containing("\"handled\"").is_empty()
    })
    .await;
    let line: Value =
        serde_json::from_str(&factory.logs_containing("\"handled\"")[0]).expect("JSON line");
    assert_eq!(line["correlation_id"], correlation);
    assert_eq!(line["event_id"], event_id);
    assert_eq!(line["factory.room"], "Fudge Room");
    assert_eq!(
        line["trace_id"], TRACE_ID,
        "not tracing, a line about the event still names the trace it came with"
    );
    assert!(
        line.get("span_id").is_none(),
        "no spans of our own when not tracing"
    );
}

/// With the log filter at `warn` (as production often runs), the room's
/// spans are not recorded, yet a warning still names its room.
#[tokio::test]
async fn warnings_name_their_room_when_the_filter_hides_info_spans() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let mut env = conch_env(&nats.url());
    // The runtime's own info lines stay on: the harness waits for "room
    // listening" (which, too, must name its room).
    env.push((
        "CHOCO_LOG__FILTER".into(),
        "warn,choco_factory::cocoa_butter::runtime=info".into(),
    ));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    publish_raw(
        &js,
        "choco.events.coordination.no_such_action",
        "warn-filter-1",
        b"{}".to_vec(),
    )
    .await;
    wait_until(WAIT, || async {
        !factory.logs_containing("\"dead-lettered\"").is_empty()
    })
    .await;
    let line: Value =
        serde_json::from_str(&factory.logs_containing("\"dead-lettered\"")[0]).expect("JSON line");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["reason"], "unknown_event_type");
    assert_eq!(line["factory.room"], "Fudge Room", "{line}");
}

async fn scrape(factory: &Factory, accept: Option<&str>) -> (String, String) {
    let mut request = reqwest::Client::new().get(format!("http://{}/metrics", factory.metrics));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (content_type, response.text().await.expect("body"))
}

#[tokio::test]
async fn metrics_cover_every_hop_in_both_exposition_formats() {
    let (_received, addr) = grpc_receiver().await;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start_with(
        traced_env(&nats.url(), format!("http://{addr}"), "grpc"),
        &["serve", "--rooms", "conch"],
    )
    .await;
    factory.wait_ready().await;

    // Traffic on every path: a good event (KV, publish), a dead letter,
    // an HTTP request and a gRPC call.
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    publish_traced(&js, "doc-metrics", &traceparent).await;
    let bad = envelope(
        "coordination.property_sync.requested",
        "doc-bad",
        &json!({"document_id": 7}),
    );
    publish(&js, REQUESTED, &bad).await;
    wait_for(&js, COORDINATION, COMPLETED, 1, WAIT).await;
    wait_for(&js, "choco:dlq", "choco.dlq.>", 1, WAIT).await;
    reqwest::get(factory.url("/v1/documents/doc-metrics/properties"))
        .await
        .expect("get");
    let mut client = pb::conch_client::ConchClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc connect");
    let invalid = client
        .get_properties(pb::GetPropertiesRequest {
            document_id: String::new(),
        })
        .await
        .expect_err("an empty document id is refused");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    // OpenMetrics, as Prometheus asks for it.
    let (content_type, text) = scrape(
        &factory,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|err| panic!("not OpenMetrics: {err:?}\n{text}"));
    // A room's families carry its `room` label; the process's own (one
    // home per process, here the only room's port) carry none.
    let expect_labelled = |family: &str, labels: &[&str], room: bool| {
        let found = parsed
            .families
            .get(family)
            .unwrap_or_else(|| panic!("no family {family} in\n{text}"));
        assert_eq!(
            found.get_label_names().iter().any(|l| l == "room"),
            room,
            "{family}: room label {:?}",
            found.get_label_names()
        );
        for label in labels {
            assert!(
                found.get_label_names().iter().any(|l| l == label),
                "{family} lacks label {label}: {:?}",
                found.get_label_names()
            );
        }
    };
    let expect = |family: &str, labels: &[&str]| expect_labelled(family, labels, true);
    let expect_process = |family: &str, labels: &[&str]| expect_labelled(family, labels, false);
    expect("choco_consumer_messages_received", &["event_type"]);
    expect(
        "choco_consumer_messages_processed",
        &["event_type", "outcome"],
    );
    expect("choco_consumer_dlq_messages", &["event_type", "reason"]);
    expect(
        "choco_consumer_processing_duration_seconds",
        &["event_type", "outcome"],
    );
    expect("choco_consumer_in_flight_messages", &[]);
    expect("choco_consumer_pending_messages", &[]);
    expect("choco_consumer_ack_pending_messages", &[]);
    expect("choco_consumer_redelivered_messages", &[]);
    expect("choco_room_ready", &[]);
    expect("choco_http_server_requests", &["route", "method", "status"]);
    expect(
        "choco_http_server_request_duration_seconds",
        &["route", "method", "status"],
    );
    expect("choco_grpc_server_requests", &["method", "code"]);
    expect(
        "choco_grpc_server_request_duration_seconds",
        &["method", "code"],
    );
    expect("choco_publish_messages", &["event_type", "outcome"]);
    expect("choco_publish_duration_seconds", &["event_type"]);
    expect(
        "choco_store_operation_duration_seconds",
        &["store", "bucket", "operation", "outcome"],
    );
    expect_process("choco_nats_connected", &[]);
    expect_process("choco_nats_reconnects", &[]);
    expect_process("choco_build_info", &["version", "git_sha"]);
    // The process's own families, as every client library exports them.
    for family in [
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        expect_process(family, &[]);
    }
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|line| line.starts_with(&format!("{name} ")))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} sample in\n{text}"))
    };
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") > 0.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    for series in [
        r#"choco_consumer_dlq_messages_total{room="conch",event_type="coordination.property_sync.requested",reason="payload_invalid"} 1"#,
        r#"choco_http_server_requests_total{room="conch",route="/v1/documents/{document_id}/properties",method="GET",status="200"} 1"#,
        r#"choco_grpc_server_requests_total{room="conch",method="/choco.factory.conch.v1.Conch/GetProperties",code="INVALID_ARGUMENT"} 1"#,
        r#"choco_publish_messages_total{room="conch",event_type="coordination.property_sync.completed",outcome="ok"} 1"#,
        "choco_nats_connected 1",
        r#"choco_room_ready{room="conch"} 1"#,
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    assert!(
        text.contains(&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))),
        "build info names the version"
    );
    // The traced event left an exemplar with its trace id.
    assert!(
        text.lines().any(|line| line
            .starts_with("choco_consumer_processing_duration_seconds_bucket")
            && line.contains(&format!(r#"# {{trace_id="{TRACE_ID}"}}"#))),
        "no exemplar with the trace id in\n{text}"
    );

    // OpenMetrics named but refused (q=0) is the text format, not a match.
    let (content_type, _) = scrape(
        &factory,
        Some("application/openmetrics-text;q=0, text/plain;version=0.0.4"),
    )
    .await;
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    // The classic text format for scrapers that do not ask.
    let (content_type, text) = scrape(&factory, None).await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|err| panic!("not Prometheus text: {err:?}\n{text}"));
    for family in [
        "choco_consumer_messages_received_total",
        "choco_consumer_processing_duration_seconds",
        "choco_http_server_requests_total",
        "choco_store_operation_duration_seconds",
        "choco_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            parsed.families.contains_key(family),
            "no {family} in\n{text}"
        );
    }
    assert!(!text.contains("# EOF") && !text.contains("trace_id="));
}

#[tokio::test]
async fn the_log_filter_changes_at_run_time() {
    let nats = Nats::start().await;
    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;
    let http = reqwest::Client::new();
    let current: Value = http
        .get(factory.url("/admin/log-filter"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(current["filter"], "info,async_nats=warn");

    // Debug lines appear only after the change.
    let (_client, js) = nats.client().await;
    let before = envelope(
        "coordination.property_sync.requested",
        "doc-a",
        &sync_payload(
            "doc-a",
            "tags",
            json!(["a"]),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    publish(&js, REQUESTED, &before).await;
    wait_for(&js, COORDINATION, COMPLETED, 1, WAIT).await;
    assert!(factory.logs_containing("\"handled\"").is_empty());

    let changed = http
        .put(factory.url("/admin/log-filter"))
        .body("info,choco_factory=debug")
        .send()
        .await
        .expect("put");
    assert_eq!(changed.status(), 200);
    let after = envelope(
        "coordination.property_sync.requested",
        "doc-b",
        &sync_payload(
            "doc-b",
            "tags",
            json!(["b"]),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    publish(&js, REQUESTED, &after).await;
    wait_until(WAIT, || async {
        !factory.logs_containing("\"handled\"").is_empty()
    })
    .await;

    let refused = http
        .put(factory.url("/admin/log-filter"))
        .body("info,[unclosed")
        .send()
        .await
        .expect("put");
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["field"], "body");
    let current: Value = http
        .get(factory.url("/admin/log-filter"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        current["filter"], "info,choco_factory=debug",
        "a refused filter changes nothing"
    );
}

/// The process's own families (`process_*`, `choco_nats_*`,
/// `choco_build_info`) have one home, the first enabled room's metrics port
/// by name (the conch's when all four run), so that adding up what the four ports say does not
/// count the process four times; every port has its room's own families.
#[tokio::test]
async fn the_process_families_are_served_once_per_process() {
    let nats = Nats::start().await;
    let mut env = Vec::new();
    for room in ["WINNOWER", "CONCH", "MOULD", "WRAPPER"] {
        env.extend(room_env(&nats.url(), room));
    }
    let factory = Factory::start_room(env, &["serve"], "Wrapping Room").await;
    let mut homes = Vec::new();
    for (room, label) in [
        ("winnower", "Winnowing Room"),
        ("conch", "Fudge Room"),
        ("mould", "Moulding Room"),
        ("wrapper", "Wrapping Room"),
    ] {
        let (_, _, metrics) = factory.room_addrs(label).expect("the room listens");
        let text = reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(
            text.contains(&format!(r#"choco_room_ready{{room="{room}"}}"#)),
            "{room}'s port serves its own families:\n{text}"
        );
        let process = [
            "process_cpu_seconds_total",
            "choco_build_info",
            "choco_nats_connected",
        ]
        .map(|family| text.lines().any(|line| line.starts_with(family)));
        assert!(
            process.iter().all(|&found| found) || process.iter().all(|&found| !found),
            "{room}: the process families come together or not at all: {process:?}"
        );
        if process[0] {
            homes.push(room);
        }
    }
    assert_eq!(homes, ["conch"], "one home, the first room's port by name");
}
