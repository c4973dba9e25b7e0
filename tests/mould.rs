//! the-mould end to end: rendering, sanitizing, storing, serving, failing.

mod common;

use std::time::Duration;

use choco_factory::cocoa_butter::envelope::content_hash;
use choco_factory::rooms::mould::pb;
use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(30);
const HYDRATION: &str = "choco:events:hydration";
const REQUESTED_H: &str = "choco.events.hydration.requested";
const COMPLETED_H: &str = "choco.events.hydration.completed";
const FAILED_H: &str = "choco.events.hydration.failed";

async fn start(nats: &Nats, extra: &[(&str, &str)]) -> Factory {
    let mut env = room_env(&nats.url(), "MOULD");
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let factory = Factory::start_room(env, &["serve", "--rooms", "mould"], "Moulding Room").await;
    factory.wait_ready().await;
    factory
}

async fn request(
    js: &async_nats::jetstream::Context,
    doc: &str,
    source: &str,
    data: Value,
    format: &str,
) {
    let event = envelope(
        "hydration.requested",
        doc,
        &json!({"document_id": doc, "source": source, "data": data, "format": format}),
    );
    publish(js, REQUESTED_H, &event).await;
}

async fn output_for(js: &async_nats::jetstream::Context, subject: &str, doc: &str) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let found = read_all(js, HYDRATION, subject)
            .await
            .into_iter()
            .map(|m| m.payload())
            .find(|p| p["document_id"] == doc);
        if let Some(found) = found {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {subject} for {doc}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stored(js: &async_nats::jetstream::Context, key: &str) -> Vec<u8> {
    let store = js.get_object_store("choco_hydrated").await.expect("bucket");
    let mut object = store.get(key).await.expect("object");
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.expect("read");
    bytes
}

const SOURCE: &str =
    "# {{ title }}\n\nWritten by {{ author }}.\n\n/invention blk-1\n\n/protocol blk-2\n";

fn data() -> Value {
    json!({
        "title": "The chocolate printer",
        "author": "Ann",
        "blocks": {
            "blk-1": {"title": "Cocoa jet", "inventor": "Ann", "prior_art": ["inkjet", "3D printing"]},
            "blk-2": {"name": "Tempering", "steps": ["Melt to 45°C", "Cool to 27°C", "Warm to 31°C"]}
        }
    })
}

#[tokio::test]
async fn placeholders_and_smartblocks_render_and_the_artifact_is_served() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = start(&nats, &[]).await;
    request(&js, "doc-print", SOURCE, data(), "html").await;

    let completed = output_for(&js, COMPLETED_H, "doc-print").await;
    assert_eq!(completed["format"], "html");
    assert_eq!(completed["artifact"]["bucket"], "choco_hydrated");
    assert_eq!(completed["artifact"]["key"], "doc-print");

    // The artifact is in the object store, and the event describes it exactly.
    let bytes = stored(&js, "doc-print").await;
    assert_eq!(completed["artifact"]["size"], bytes.len());
    assert_eq!(completed["artifact"]["content_hash"], content_hash(&bytes));
    let html = String::from_utf8(bytes.clone()).expect("utf-8");
    for expected in [
        "<h1>The chocolate printer</h1>",
        "Written by Ann.",
        "Invention: Cocoa jet",
        "Prior art: inkjet, 3D printing",
        "<li>Cool to 27°C</li>",
    ] {
        assert!(html.contains(expected), "{expected} in {html}");
    }

    // Served over HTTP with its type and an ETag from its hash.
    let response = reqwest::get(factory.url("/v1/artifacts/doc-print"))
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
    let etag = format!("\"{}\"", content_hash(&bytes));
    assert_eq!(response.headers()["etag"].to_str().expect("etag"), etag);
    assert_eq!(
        response.headers()["content-type"].to_str().expect("type"),
        "text/html; charset=utf-8"
    );
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        bytes.as_slice()
    );
    let cached = reqwest::Client::new()
        .get(factory.url("/v1/artifacts/doc-print"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("get");
    assert_eq!(cached.status(), 304);
    let missing = reqwest::get(factory.url("/v1/artifacts/nothing-here"))
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn xss_in_source_and_data_comes_out_inert() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let _factory = start(&nats, &[]).await;
    let source = "# {{ title }}\n\n<script>alert('source')</script>\n\n<a href=\"javascript:alert(1)\">x</a> [y](javascript:alert(2))\n\n<img src=\"a.png\" onerror=\"alert(3)\">\n\n<div onclick=\"alert(4)\">{{ bio }}</div>\n";
    let data = json!({
        "title": "<script>alert('data')</script>",
        "bio": "<img src=x onerror=alert(5)><a href='javascript:alert(6)'>me</a>",
    });
    request(&js, "doc-xss", source, data, "html").await;
    output_for(&js, COMPLETED_H, "doc-xss").await;
    let html = String::from_utf8(stored(&js, "doc-xss").await).expect("utf-8");
    // Every real tag (text is escaped, so a raw `<` opens a tag) is clean.
    let lower = html.to_lowercase();
    for tag in lower
        .split('<')
        .skip(1)
        .filter_map(|rest| rest.split('>').next())
    {
        assert!(!tag.starts_with("script"), "a script tag survived: {html}");
        assert!(
            !tag.contains("javascript:"),
            "a javascript: URL survived in <{tag}>: {html}"
        );
        assert!(
            !tag.split_whitespace()
                .skip(1)
                .any(|attr| attr.starts_with("on")),
            "an event handler survived in <{tag}>: {html}"
        );
    }
    assert!(
        html.contains("&lt;script&gt;alert"),
        "data is shown as text: {html}"
    );
}

#[tokio::test]
async fn template_errors_and_limits_fail_cleanly_with_a_kind() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let _factory = start(
        &nats,
        &[("CHOCO_ROOMS__MOULD__SETTINGS__MAX_SOURCE_BYTES", "4096")],
    )
    .await;

    request(
        &js,
        "doc-undefined",
        "# Title\n\nHello {{ nobody }}.\n",
        json!({}),
        "markdown",
    )
    .await;
    request(
        &js,
        "doc-syntax",
        "line one\nline two\n{% for x in %}\n",
        json!({}),
        "html",
    )
    .await;
    request(
        &js,
        "doc-block",
        "intro\n\n/teleport blk-9\n",
        json!({}),
        "html",
    )
    .await;
    request(
        &js,
        "doc-loop",
        "{% for i in range(5000) %}{% for j in range(5000) %}x{% endfor %}{% endfor %}",
        json!({}),
        "markdown",
    )
    .await;
    request(&js, "doc-big", &"a".repeat(5000), json!({}), "markdown").await;

    let expect = |kind: &'static str, line: Option<u64>| (kind, line);
    for (doc, (kind, line)) in [
        ("doc-undefined", expect("undefined_variable", Some(3))),
        ("doc-syntax", expect("syntax_error", Some(3))),
        ("doc-block", expect("unknown_smartblock", Some(3))),
        ("doc-loop", expect("fuel_exhausted", None)),
        ("doc-big", expect("source_too_large", None)),
    ] {
        let failed = output_for(&js, FAILED_H, doc).await;
        assert_eq!(failed["error"]["kind"], kind, "{doc}: {failed}");
        if let Some(line) = line {
            assert_eq!(failed["error"]["line"], line, "{doc}: {failed}");
        }
        assert!(
            !failed["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        );
    }
    // The author's errors are not poison messages: nothing dead-lettered,
    // nothing left pending.
    assert!(read_all(&js, "choco:dlq", "choco.dlq.>").await.is_empty());
    let stream = js.get_stream(HYDRATION).await.expect("stream");
    wait_until(WAIT, || async {
        let info = stream.consumer_info("choco-mould").await.expect("consumer");
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
}

#[tokio::test]
async fn grpc_and_http_agree_with_the_events() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = start(&nats, &[]).await;
    request(&js, "doc-same", SOURCE, data(), "html").await;
    let completed = output_for(&js, COMPLETED_H, "doc-same").await;
    let hash = completed["artifact"]["content_hash"]
        .as_str()
        .expect("hash")
        .to_string();

    let mut grpc = pb::mould_client::MouldClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc");
    let data_struct = match choco_factory::cocoa_butter::api::json_to_pb(&data()).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => panic!("data is an object"),
    };
    let hydrated = grpc
        .hydrate(pb::HydrationRequest {
            document_id: "doc-same".into(),
            source: SOURCE.into(),
            data: Some(data_struct.clone()),
            format: "html".into(),
        })
        .await
        .expect("hydrate")
        .into_inner();
    assert_eq!(
        hydrated.artifact.as_ref().expect("artifact").content_hash,
        hash,
        "same request, same bytes"
    );
    assert_eq!(content_hash(&hydrated.content), hash);

    let (status, body) = {
        let response = reqwest::Client::new()
            .post(factory.url("/v1/hydrate"))
            .body(json!({"document_id": "doc-same", "source": SOURCE, "data": data(), "format": "html"}).to_string())
            .send()
            .await
            .expect("post");
        (
            response.status().as_u16(),
            response.json::<Value>().await.expect("json"),
        )
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["artifact"]["content_hash"], hash);

    let artifact = grpc
        .get_artifact(pb::GetArtifactRequest {
            document_id: "doc-same".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(content_hash(&artifact.content), hash);
    assert_eq!(artifact.format, "html");
    let missing = grpc
        .get_artifact(pb::GetArtifactRequest {
            document_id: "nope".into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Errors: the same kind and line as the event path, as 400 / INVALID_ARGUMENT.
    let response = reqwest::Client::new()
        .post(factory.url("/v1/hydrate"))
        .body(json!({"document_id": "d", "source": "a\n{% if %}", "format": "html"}).to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["kind"], "syntax_error");
    assert_eq!(err["error"]["line"], 2);
    assert_eq!(err["error"]["field"], "source");
    let status = grpc
        .hydrate(pb::HydrationRequest {
            document_id: "d".into(),
            source: "{{ nobody }}".into(),
            data: None,
            format: "markdown".into(),
        })
        .await
        .expect_err("undefined");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status
            .metadata()
            .get("x-choco-error-kind")
            .and_then(|v| v.to_str().ok()),
        Some("undefined_variable")
    );
    let status = grpc
        .hydrate(pb::HydrationRequest {
            document_id: "d".into(),
            source: "x".into(),
            data: None,
            format: "pdf".into(),
        })
        .await
        .expect_err("format");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("format"),
        "{}",
        status.message()
    );

    let templates: Value = reqwest::get(factory.url("/v1/templates"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = templates["templates"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|t| t["smartblock"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "assistant",
            "forge",
            "invention",
            "protocol",
            "torrent",
            "weave"
        ]
    );
}
