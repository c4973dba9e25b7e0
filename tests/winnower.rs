//! the-winnower end to end: the smartblock gate, slop detection, and the
//! APIs answering as the events do.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use choco_factory::rooms::winnower::pb;
use common::*;
use serde_json::{Value, json};

const REFINEMENT: &str = "choco:events:refinement";
const CREATED: &str = "choco.events.refinement.smartblock_created";
const ACCEPTED: &str = "choco.events.refinement.smartblock_accepted";
const REQUESTED_SLOP: &str = "choco.events.refinement.requested";
const SLOP: &str = "choco.events.refinement.slop_detected";
const PASSED: &str = "choco.events.refinement.passed";

async fn start(nats: &Nats, extra: &[(&str, &str)]) -> Factory {
    let mut env = room_env(&nats.url(), "WINNOWER");
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let factory =
        Factory::start_room(env, &["serve", "--rooms", "winnower"], "Winnowing Room").await;
    factory.wait_ready().await;
    factory
}

fn smartblock(block_id: &str, slug: &str, version: u32) -> Value {
    json!({
        "type": "smartblock_created",
        "blockId": block_id,
        "commandSlug": slug,
        "schemaVersion": version,
        "federationTargets": ["whatever-the-editor-thinks"],
        "semanticLayers": {},
        "documentId": "doc-7",
        "authorId": "ann",
        "blockType": "callout",
    })
}

async fn publish_block(
    js: &async_nats::jetstream::Context,
    payload: &Value,
) -> choco_factory::cocoa_butter::EventEnvelope {
    let block_id = payload["blockId"]
        .as_str()
        .or(payload["block_id"].as_str())
        .unwrap_or("none");
    let event = envelope("refinement.smartblock_created", block_id, payload);
    publish(js, CREATED, &event).await;
    event
}

#[tokio::test]
async fn the_smartblock_gate_accepts_and_rejects_step_by_step() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let _factory = start(&nats, &[]).await;

    // Accepted, with targets from the manifest (not the editor's list).
    publish_block(&js, &smartblock("blk-ok", "invention", 1)).await;
    // snake_case spellings are the same block shape.
    publish_block(
        &js,
        &json!({"block_id": "blk-snake", "command_slug": "weave", "schema_version": 1,
                "document_id": "doc-7", "author_id": "bob", "block_type": "quote"}),
    )
    .await;
    // Step 3 and 4 failures, and a payload missing a field (step 2).
    publish_block(&js, &smartblock("blk-slug", "teleport", 1)).await;
    publish_block(&js, &smartblock("blk-new", "weave", 2)).await;
    publish_block(&js, &json!({"blockId": "blk-half", "schemaVersion": 1})).await;

    let accepted = exactly(&js, REFINEMENT, ACCEPTED, 2).await;
    let by_block: HashMap<String, Value> = accepted
        .iter()
        .map(|m| (m.envelope().aggregate_id, m.payload()))
        .collect();
    assert_eq!(
        by_block["blk-ok"],
        json!({"block_id": "blk-ok", "document_id": "doc-7", "command_slug": "invention", "schema_version": 1,
               "federation_targets": ["traceo"], "author_id": "ann", "block_type": "callout"})
    );
    assert_eq!(
        by_block["blk-snake"]["federation_targets"],
        json!(["traceo", "choco-search"])
    );
    assert_eq!(by_block["blk-snake"]["author_id"], "bob");

    // Permanent failures go straight to the DLQ, one delivery each, with the step.
    let letters = exactly(&js, "choco:dlq", "choco.dlq.>", 3).await;
    let reasons: HashMap<String, &Stored> = letters
        .iter()
        .map(|l| (l.header("Choco-Dlq-Reason").expect("reason"), l))
        .collect();
    let slug = reasons["unknown_command_slug"];
    assert_eq!(
        slug.subject,
        "choco.dlq.winnower.refinement.smartblock_created"
    );
    assert_eq!(slug.header("Choco-Dlq-Deliveries").as_deref(), Some("1"));
    assert!(
        slug.header("Choco-Dlq-Detail")
            .expect("detail")
            .contains("teleport")
    );
    let version = reasons["schema_version_too_new"];
    assert!(
        version
            .header("Choco-Dlq-Detail")
            .expect("detail")
            .contains("step 4")
    );
    let invalid = reasons["payload_invalid"];
    assert!(
        invalid
            .header("Choco-Dlq-Detail")
            .expect("detail")
            .contains("commandSlug"),
        "names the field"
    );
}

#[tokio::test]
async fn a_replayed_block_within_the_window_is_accepted_once() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = start(&nats, &[]).await;

    // The editor reconnects and sends the same block three times (new event ids).
    for _ in 0..3 {
        publish_block(&js, &smartblock("blk-replay", "forge", 1)).await;
    }
    // The same event redelivered (same event id, new stream message).
    let again = publish_block(&js, &smartblock("blk-redelivered", "forge", 1)).await;
    publish_raw(&js, CREATED, "redelivery-1", again.encode()).await;

    let accepted = exactly(&js, REFINEMENT, ACCEPTED, 2).await;
    let blocks: Vec<String> = accepted.iter().map(|m| m.envelope().aggregate_id).collect();
    assert!(
        blocks.contains(&"blk-replay".to_string())
            && blocks.contains(&"blk-redelivered".to_string())
    );
    assert!(
        read_all(&js, "choco:dlq", "choco.dlq.>").await.is_empty(),
        "replays are not failures"
    );

    // The acceptance is recorded in JetStream: a restarted binary still knows it.
    drop(factory);
    let _again = start(&nats, &[]).await;
    publish_block(&js, &smartblock("blk-replay", "forge", 1)).await;
    exactly(&js, REFINEMENT, ACCEPTED, 2).await;
}

#[tokio::test]
async fn replays_after_the_window_are_accepted_again() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let _factory = start(
        &nats,
        &[("CHOCO_ROOMS__WINNOWER__SETTINGS__IDEMPOTENCY_WINDOW", "1s")],
    )
    .await;
    publish_block(&js, &smartblock("blk-window", "torrent", 1)).await;
    exactly(&js, REFINEMENT, ACCEPTED, 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    publish_block(&js, &smartblock("blk-window", "torrent", 1)).await;
    exactly(&js, REFINEMENT, ACCEPTED, 2).await;
}

const LOREM_PAGE: &str = "# Product page\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.\n\n## Features\n\n## Pricing\n\nTODO write the pricing. As an AI language model I cannot set prices.\n";

#[tokio::test]
async fn slop_is_flagged_with_offsets_and_clean_prose_passes() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let _factory = start(&nats, &[]).await;

    let lorem = envelope(
        "refinement.requested",
        "doc-lorem",
        &json!({"document_id": "doc-lorem", "title": "Product", "content": LOREM_PAGE, "content_type": "text/markdown"}),
    );
    publish(&js, REQUESTED_SLOP, &lorem).await;
    let clean_text = "# Release notes\n\nThe conch now resolves conflicts per property, and editors see the winning value within a second.\n";
    let clean = envelope(
        "refinement.requested",
        "doc-clean",
        &json!({"document_id": "doc-clean", "title": "Notes", "content": clean_text, "content_type": "text/markdown"}),
    );
    publish(&js, REQUESTED_SLOP, &clean).await;

    let slop = exactly(&js, REFINEMENT, SLOP, 1).await;
    let report = slop[0].payload();
    assert_eq!(report["document_id"], "doc-lorem");
    assert!(
        report["score"].as_f64().expect("score")
            >= report["threshold"].as_f64().expect("threshold")
    );
    let findings = report["findings"].as_array().expect("findings");
    let find = |rule: &str| {
        findings
            .iter()
            .find(|f| f["rule"] == rule)
            .unwrap_or_else(|| panic!("{rule} in {findings:?}"))
    };
    for (rule, text) in [
        ("placeholder_text", "Lorem ipsum dolor sit amet"),
        ("todo_marker", "TODO"),
        ("assistant_disclaimer", "As an AI language model"),
        ("empty_section", "## Features"),
    ] {
        let f = find(rule);
        let (start, end) = (
            f["start"].as_u64().expect("start") as usize,
            f["end"].as_u64().expect("end") as usize,
        );
        assert_eq!(&LOREM_PAGE[start..end], text, "{rule} offsets");
        assert_eq!(f["excerpt"], text);
    }

    let passed = exactly(&js, REFINEMENT, PASSED, 1).await;
    assert_eq!(
        passed[0].payload(),
        json!({"document_id": "doc-clean", "score": 0.0})
    );
}

#[tokio::test]
async fn oversized_content_is_refused_with_a_reason() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = start(
        &nats,
        &[("CHOCO_ROOMS__WINNOWER__SETTINGS__MAX_CONTENT_BYTES", "1024")],
    )
    .await;
    let big = "word ".repeat(400);
    let event = envelope(
        "refinement.requested",
        "doc-big",
        &json!({"document_id": "doc-big", "content": big, "content_type": "text/plain"}),
    );
    publish(&js, REQUESTED_SLOP, &event).await;
    let letters = exactly(&js, "choco:dlq", "choco.dlq.>", 1).await;
    assert_eq!(
        letters[0].header("Choco-Dlq-Reason").as_deref(),
        Some("content_too_large")
    );

    let response = reqwest::Client::new()
        .post(factory.url("/v1/winnow"))
        .body(json!({"document_id": "doc-big", "content": big}).to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["field"], "content");
}

#[tokio::test]
async fn http_and_grpc_answer_as_the_events_do() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = start(&nats, &[]).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        let request = http.post(factory.url(path)).body(body.to_string());
        async move {
            let response = request.send().await.expect("post");
            (
                response.status().as_u16(),
                response.json::<Value>().await.expect("json"),
            )
        }
    };

    // Winnow: the same findings as the event path, nothing published.
    let (status, report) = post(
        "/v1/winnow",
        json!({"document_id": "doc-lorem", "title": "Product", "content": LOREM_PAGE, "content_type": "text/markdown"}),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["slop"], true);
    let todo = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["rule"] == "todo_marker")
        .expect("todo")
        .clone();
    let mut grpc = pb::winnower_client::WinnowerClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc");
    let grpc_report = grpc
        .winnow(pb::Document {
            document_id: "doc-lorem".into(),
            title: "Product".into(),
            content: LOREM_PAGE.into(),
            content_type: "text/markdown".into(),
        })
        .await
        .expect("winnow")
        .into_inner();
    assert!(grpc_report.slop);
    assert_eq!(grpc_report.score, report["score"].as_f64().expect("score"));
    let grpc_todo = grpc_report
        .findings
        .iter()
        .find(|f| f.rule == "todo_marker")
        .expect("todo");
    assert_eq!(
        (grpc_todo.start, grpc_todo.end),
        (
            todo["start"].as_u64().expect("s"),
            todo["end"].as_u64().expect("e")
        )
    );

    // Validate: accepted, rejected by step, and nothing recorded.
    let (status, ok) = post(
        "/v1/smartblocks/validate",
        smartblock("blk-api", "protocol", 1),
    )
    .await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["accepted"], true);
    assert_eq!(ok["federation_targets"], json!(["traceo", "choco-search"]));
    let (_, again) = post(
        "/v1/smartblocks/validate",
        smartblock("blk-api", "protocol", 1),
    )
    .await;
    assert_eq!(again["accepted"], true, "validation records nothing");
    let (_, unknown) = post(
        "/v1/smartblocks/validate",
        smartblock("blk-api", "teleport", 1),
    )
    .await;
    assert_eq!(unknown["reason"], "unknown_command_slug");
    let validation = grpc
        .validate_smartblock(pb::SmartblockCreated {
            block_id: "blk-api".into(),
            command_slug: "weave".into(),
            schema_version: 5,
            document_id: "doc-7".into(),
            author_id: "ann".into(),
            ..Default::default()
        })
        .await
        .expect("validate")
        .into_inner();
    assert!(!validation.accepted);
    assert_eq!(validation.reason, "schema_version_too_new");

    // Once the event path accepts a block, validation reports the replay.
    publish_block(&js, &smartblock("blk-api", "protocol", 1)).await;
    exactly(&js, REFINEMENT, ACCEPTED, 1).await;
    let (_, duplicate) = post(
        "/v1/smartblocks/validate",
        smartblock("blk-api", "protocol", 1),
    )
    .await;
    assert_eq!(duplicate["accepted"], false);
    assert_eq!(duplicate["reason"], "duplicate");
    assert!(
        read_all(&js, REFINEMENT, SLOP).await.is_empty(),
        "the APIs publish nothing"
    );

    // Bad input names the field.
    let (status, err) = post("/v1/winnow", json!({"document_id": "d"})).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["field"], "content");
    let (status, err) = post(
        "/v1/winnow",
        json!({"document_id": "d", "content": "x", "content_type": "text/html"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["field"], "content_type");
    let (status, err) = post("/v1/smartblocks/validate", json!({"blockId": "b", "commandSlug": "weave", "schemaVersion": 1, "documentId": "", "authorId": "a"})).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["field"], "documentId");
    let status = grpc
        .winnow(pb::Document {
            document_id: String::new(),
            content: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("document_id"),
        "{}",
        status.message()
    );
    let status = grpc
        .validate_smartblock(pb::SmartblockCreated {
            command_slug: "weave".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("block_id"),
        "{}",
        status.message()
    );

    let manifest: Value = reqwest::get(factory.url("/v1/manifest"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(manifest["catalog_schema_version"], 1);
    assert_eq!(
        manifest["commands"]["invention"]["federation_targets"],
        json!(["traceo"])
    );
}
