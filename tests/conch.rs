//! the-conch end to end: events in, events out, dead letters, APIs.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use choco_factory::rooms::conch::pb;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_matching_write_applies_and_a_stale_one_is_resolved() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;

    let first = envelope(
        "coordination.property_sync.requested",
        "doc-1",
        &sync_payload(
            "doc-1",
            "title",
            json!("Golden ticket"),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    publish(&js, REQUESTED, &first).await;
    let completed = exactly(&js, COORDINATION, COMPLETED, 1).await;
    let done = &completed[0];
    // The input is major 1 (a bare value); the output is published at its
    // current major, 2, whose value carries its type.
    assert_eq!(
        done.payload(),
        json!({"document_id": "doc-1", "property": "title",
               "value": {"type": "string", "value": "Golden ticket"}, "revision": 1, "author_id": "ann"})
    );
    let envelope_out = done.envelope();
    assert_eq!(envelope_out.schema_version, "2.0.0");
    assert_eq!(
        envelope_out.event_type,
        "coordination.property_sync.completed"
    );
    assert_eq!(envelope_out.aggregate_id, "doc-1");
    assert_eq!(envelope_out.source_service, "the-conch");
    assert_eq!(
        envelope_out.correlation_id, first.event_id,
        "a new chain correlates on the input's id"
    );
    assert_eq!(
        uuid::Uuid::parse_str(&envelope_out.event_id)
            .expect("uuid")
            .get_version_num(),
        7
    );

    // Bob edited revision 0 too, later: a conflict, and last writer wins.
    let stale = envelope(
        "coordination.property_sync.requested",
        "doc-1",
        &sync_payload(
            "doc-1",
            "title",
            json!("Fudge"),
            0,
            "bob",
            "2026-03-01T10:05:00Z",
        ),
    );
    publish(&js, REQUESTED, &stale).await;
    let detected = exactly(&js, COORDINATION, DETECTED, 1).await;
    assert_eq!(
        detected[0].payload(),
        json!({
            "document_id": "doc-1", "property": "title", "base_revision": 0, "current_revision": 1,
            "current_value": "Golden ticket", "incoming_value": "Fudge", "incoming_author_id": "bob"
        })
    );
    let resolved = exactly(&js, COORDINATION, RESOLVED, 1).await;
    assert_eq!(
        resolved[0].payload(),
        json!({"document_id": "doc-1", "property": "title", "policy": "last_writer_wins", "winner": "incoming", "value": "Fudge", "revision": 2})
    );

    let props: Value = reqwest::get(factory.url("/v1/documents/doc-1/properties"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(props["properties"]["title"]["value"], "Fudge");
    assert_eq!(props["properties"]["title"]["revision"], 2);
    assert_eq!(props["properties"]["title"]["author_id"], "bob");
    // The conch's own outputs came back on its prefix and were skipped, not handled.
    assert!(read_all(&js, "choco:dlq", "choco.dlq.>").await.is_empty());
}

/// 1,000 chained updates over 10 documents, published all at once: per
/// document they are handled in stream order, so none conflicts.
#[tokio::test]
async fn a_thousand_chained_updates_keep_order_per_document() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    ensure_coordination_stream(&js).await;
    let docs = 10;
    let per_doc = 100u64;
    for revision in 0..per_doc {
        for d in 0..docs {
            let doc = format!("chain-{d}");
            let event = envelope(
                "coordination.property_sync.requested",
                &doc,
                &sync_payload(
                    &doc,
                    "body",
                    json!(format!("v{}", revision + 1)),
                    revision,
                    "ann",
                    "2026-03-01T10:00:00Z",
                ),
            );
            publish(&js, REQUESTED, &event).await;
        }
    }
    let factory = Factory::start(&nats.url()).await;
    let completed = exactly(&js, COORDINATION, COMPLETED, docs * per_doc as usize).await;
    assert!(
        read_all(&js, COORDINATION, DETECTED).await.is_empty(),
        "no conflicts"
    );

    let mut last: HashMap<String, u64> = HashMap::new();
    for message in &completed {
        let payload = message.payload();
        let doc = payload["document_id"].as_str().expect("doc").to_string();
        let revision = payload["revision"].as_u64().expect("revision");
        let previous = last.insert(doc, revision).unwrap_or(0);
        assert_eq!(
            revision,
            previous + 1,
            "revisions of a document are published in order"
        );
    }
    for d in 0..docs {
        let props: Value =
            reqwest::get(factory.url(&format!("/v1/documents/chain-{d}/properties")))
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
        assert_eq!(props["properties"]["body"]["revision"], per_doc);
        assert_eq!(props["properties"]["body"]["value"], format!("v{per_doc}"));
    }
}

/// Bad bodies go straight to choco:dlq, unchanged, with the reason, after
/// one delivery.
#[tokio::test]
async fn bad_messages_are_dead_lettered_with_a_reason() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;

    let mut tampered = envelope(
        "coordination.property_sync.requested",
        "doc-bad",
        &sync_payload(
            "doc-bad",
            "title",
            json!("x"),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    tampered.payload = serde_json::to_vec(&sync_payload(
        "doc-bad",
        "title",
        json!("evil"),
        0,
        "eve",
        "2026-03-01T10:00:00Z",
    ))
    .expect("json");
    publish(&js, REQUESTED, &tampered).await;
    publish_raw(&js, REQUESTED, "malformed-1", b"{not an envelope".to_vec()).await;
    let missing_field = envelope(
        "coordination.property_sync.requested",
        "doc-bad",
        &json!({"document_id": "doc-bad", "value": 1, "base_revision": 0, "author_id": "a", "updated_at": "2026-03-01T10:00:00Z"}),
    );
    publish(&js, REQUESTED, &missing_field).await;
    let unknown = envelope(
        "coordination.property_sync.cancelled",
        "doc-bad",
        &json!({}),
    );
    publish(
        &js,
        "choco.events.coordination.property_sync.cancelled",
        &unknown,
    )
    .await;

    let letters = exactly(&js, "choco:dlq", "choco.dlq.>", 4).await;
    let by_reason: HashMap<String, &Stored> = letters
        .iter()
        .map(|l| (l.header("Choco-Dlq-Reason").expect("reason"), l))
        .collect();
    let hash = by_reason["content_hash_mismatch"];
    assert_eq!(
        hash.subject,
        "choco.dlq.conch.coordination.property_sync.requested"
    );
    assert_eq!(hash.body, tampered.encode(), "the body is kept unchanged");
    assert_eq!(hash.header("Choco-Dlq-Room").as_deref(), Some("conch"));
    assert_eq!(
        hash.header("Choco-Dlq-Deliveries").as_deref(),
        Some("1"),
        "no retries for a permanent failure"
    );
    assert_eq!(
        hash.header("Choco-Dlq-Original-Subject").as_deref(),
        Some(REQUESTED)
    );
    assert_eq!(
        hash.header("Choco-Dlq-Original-Stream").as_deref(),
        Some(COORDINATION)
    );
    assert!(hash.header("Choco-Dlq-Original-Sequence").is_some());

    let malformed = by_reason["malformed_envelope"];
    assert_eq!(malformed.body.as_ref(), b"{not an envelope");

    let invalid = by_reason["payload_invalid"];
    assert!(
        invalid
            .header("Choco-Dlq-Detail")
            .expect("detail")
            .contains("property"),
        "names the field"
    );
    let unknown = by_reason["unknown_event_type"];
    assert_eq!(
        unknown.subject,
        "choco.dlq.conch.coordination.property_sync.cancelled"
    );

    // Nothing was applied and nothing is pending.
    assert!(read_all(&js, COORDINATION, COMPLETED).await.is_empty());
    let stream = js.get_stream(COORDINATION).await.expect("stream");
    wait_until(WAIT, || async {
        let info = stream.consumer_info("choco-conch").await.expect("consumer");
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
}

/// The same event handled twice (a redelivery after a crash between publish
/// and ack looks exactly like this) leaves one output and one revision.
#[tokio::test]
async fn a_redelivered_event_leaves_exactly_one_output() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;

    let event = envelope(
        "coordination.property_sync.requested",
        "doc-twice",
        &sync_payload(
            "doc-twice",
            "tags",
            json!(["a"]),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    publish(&js, REQUESTED, &event).await;
    exactly(&js, COORDINATION, COMPLETED, 1).await;
    // Same body, new stream message: the stream's dedup does not stop it,
    // the conch's receipts and the outputs' derived ids must.
    publish_raw(&js, REQUESTED, "again-1", event.encode()).await;
    publish_raw(&js, REQUESTED, "again-2", event.encode()).await;
    // Both copies are handled (nothing pending) ...
    let stream = js.get_stream(COORDINATION).await.expect("stream");
    wait_until(WAIT, || async {
        let info = stream.consumer_info("choco-conch").await.expect("consumer");
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    // ... as the same event: a re-applied write would have met revision 1
    // with base 0 and shown up as a conflict.
    exactly(&js, COORDINATION, COMPLETED, 1).await;
    assert!(
        read_all(&js, COORDINATION, DETECTED).await.is_empty(),
        "re-handled, not re-applied"
    );
    assert!(read_all(&js, COORDINATION, RESOLVED).await.is_empty());
    let props: Value = reqwest::get(factory.url("/v1/documents/doc-twice/properties"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(props["properties"]["tags"]["revision"], 1);
}

#[tokio::test]
async fn http_and_grpc_apis_follow_the_same_rules() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start_with(
        {
            let mut env = conch_env(&nats.url());
            env.push((
                "CHOCO_ROOMS__CONCH__SETTINGS__POLICIES".into(),
                r#"[{pattern="tags*", policy="union"}]"#.into(),
            ));
            env
        },
        &["serve", "--rooms", "conch"],
    )
    .await;
    factory.wait_ready().await;
    let http = reqwest::Client::new();

    let sync = |body: Value| {
        let http = http.clone();
        let url = factory.url("/v1/properties/sync");
        async move {
            let response = http
                .post(url)
                .header("x-correlation-id", "corr-42")
                .body(body.to_string())
                .send()
                .await
                .expect("post");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    let (status, applied) = sync(sync_payload(
        "doc-api",
        "tags",
        json!(["a", "b"]),
        0,
        "ann",
        "2026-03-01T10:00:00Z",
    ))
    .await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["outcome"], "applied");
    assert_eq!(applied["property"]["revision"], 1);

    let (status, merged) = sync(sync_payload(
        "doc-api",
        "tags",
        json!(["b", "c"]),
        0,
        "bob",
        "2026-03-01T09:00:00Z",
    ))
    .await;
    assert_eq!(status, 200, "{merged}");
    assert_eq!(merged["outcome"], "conflict_resolved");
    assert_eq!(merged["policy"], "union");
    assert_eq!(merged["winner"], "merged");
    assert_eq!(merged["property"]["value"], json!(["a", "b", "c"]));
    assert_eq!(merged["property"]["revision"], 2);

    // The API published the same events, carrying the caller's correlation id.
    let resolved = exactly(&js, COORDINATION, RESOLVED, 1).await;
    assert_eq!(resolved[0].envelope().correlation_id, "corr-42");
    assert_eq!(resolved[0].payload()["winner"], "merged");

    // Bad requests name the field.
    let (status, err) = sync(json!({"document_id": "d", "property": "p", "value": 1, "base_revision": "one", "author_id": "a", "updated_at": "2026-03-01T10:00:00Z"})).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["field"], "base_revision", "{err}");
    let (status, err) = sync(json!({"document_id": "d", "value": 1, "base_revision": 0, "author_id": "a", "updated_at": "2026-03-01T10:00:00Z"})).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["field"], "property", "{err}");
    let (status, err) = sync(json!({"document_id": "", "property": "p", "value": 1, "base_revision": 0, "author_id": "a", "updated_at": "2026-03-01T10:00:00Z"})).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["field"], "document_id", "{err}");
    // Every bad field at once, so a caller fixes them in one round.
    let (status, err) = sync(json!({"document_id": "", "property": "p", "value": 1, "base_revision": 0, "author_id": " ", "updated_at": "2026-03-01T10:00:00Z"})).await;
    assert_eq!(status, 400);
    let fields: Vec<&str> = err["error"]["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .filter_map(|v| v["field"].as_str())
        .collect();
    assert_eq!(fields, ["document_id", "author_id"], "{err}");

    // gRPC: same store, same rules.
    let mut grpc = pb::conch_client::ConchClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc");
    let got = grpc
        .get_properties(pb::GetPropertiesRequest {
            document_id: "doc-api".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.properties.len(), 1);
    assert_eq!(got.properties[0].revision, 2);

    let request = pb::SyncPropertyRequest {
        document_id: "doc-grpc".into(),
        property: "title".into(),
        value: Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(3.0)),
        }),
        base_revision: 0,
        author_id: "ann".into(),
        updated_at: Some(prost_types::Timestamp {
            seconds: 1_770_000_000,
            nanos: 0,
        }),
        request_id: "req-1".into(),
    };
    let first = grpc
        .sync_property(request.clone())
        .await
        .expect("sync")
        .into_inner();
    assert_eq!(first.outcome, pb::SyncOutcome::Applied as i32);
    assert_eq!(first.property.as_ref().map(|p| p.revision), Some(1));
    // The same request id again changes nothing.
    let again = grpc
        .sync_property(request.clone())
        .await
        .expect("sync")
        .into_inner();
    assert_eq!(again.outcome, pb::SyncOutcome::Duplicate as i32);
    assert_eq!(again.property.as_ref().map(|p| p.revision), Some(1));
    assert_eq!(again.event_ids, first.event_ids);

    let mut missing_time = request.clone();
    missing_time.updated_at = None;
    let status = grpc.sync_property(missing_time).await.expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("updated_at"),
        "{}",
        status.message()
    );
    let mut no_author = request.clone();
    no_author.author_id = String::new();
    let status = grpc.sync_property(no_author).await.expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("author_id"),
        "{}",
        status.message()
    );
    // Every bad field, as google.rpc.BadRequest field violations in the
    // status details: what grpcurl and gRPC client libraries decode.
    use tonic_types::StatusExt;
    let mut all_wrong = request;
    all_wrong.updated_at = None;
    all_wrong.author_id = String::new();
    all_wrong.document_id = String::new();
    let status = grpc.sync_property(all_wrong).await.expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let bad_request = status
        .get_details_bad_request()
        .expect("BadRequest details");
    let fields: Vec<&str> = bad_request
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["updated_at", "document_id", "author_id"]);
    assert!(
        bad_request
            .field_violations
            .iter()
            .all(|v| !v.description.is_empty())
    );
}

/// A transient failure (the room's key-value bucket is gone) is retried
/// with backoff and dead-lettered after the last delivery, with the count.
#[tokio::test]
async fn transient_failures_are_retried_then_dead_lettered() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;
    js.delete_key_value("choco_conch_documents")
        .await
        .expect("delete bucket");

    let event = envelope(
        "coordination.property_sync.requested",
        "doc-retry",
        &sync_payload(
            "doc-retry",
            "title",
            json!("x"),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    publish(&js, REQUESTED, &event).await;
    let letters = exactly(&js, "choco:dlq", "choco.dlq.>", 1).await;
    assert_eq!(
        letters[0].header("Choco-Dlq-Reason").as_deref(),
        Some("max_deliveries_exceeded")
    );
    assert_eq!(
        letters[0].header("Choco-Dlq-Deliveries").as_deref(),
        Some("3")
    );
    assert_eq!(letters[0].body, event.encode());
    assert!(read_all(&js, COORDINATION, COMPLETED).await.is_empty());

    let metrics = factory.scrape().await;
    assert!(
        metrics.contains(r#"outcome="retried"} 2"#),
        "two retries before the dead letter:\n{metrics}"
    );
    assert!(
        metrics.contains(r#"reason="max_deliveries_exceeded"} 1"#),
        "{metrics}"
    );
}

/// While an event waits for its retry, later events of the same document
/// wait behind it: order survives a transient failure.
#[tokio::test]
async fn order_per_document_survives_a_transient_failure() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let mut env = conch_env(&nats.url());
    env.push(("CHOCO_CONSUMER__RETRY_BASE".into(), "1s".into()));
    env.push(("CHOCO_CONSUMER__RETRY_MAX".into(), "2s".into()));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    js.delete_key_value("choco_conch_documents")
        .await
        .expect("delete bucket");

    let event = |base: u64, value: &str| {
        envelope(
            "coordination.property_sync.requested",
            "doc-order",
            &sync_payload(
                "doc-order",
                "title",
                json!(value),
                base,
                "ann",
                "2026-03-01T10:00:00Z",
            ),
        )
    };
    // The first write fails (no bucket) and waits about a second for its retry...
    publish(&js, REQUESTED, &event(0, "first")).await;
    let metrics_url = format!("http://{}/metrics", factory.metrics);
    wait_until(WAIT, || async {
        reqwest::get(&metrics_url)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
            .contains(r#"outcome="retried"} 1"#)
    })
    .await;
    // ...while the bucket comes back and the next writes arrive. They must
    // not overtake it, or the second would conflict with revision 0.
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: "choco_conch_documents".into(),
        history: 1,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("bucket back");
    publish(&js, REQUESTED, &event(1, "second")).await;
    publish(&js, REQUESTED, &event(2, "third")).await;

    let completed = exactly(&js, COORDINATION, COMPLETED, 3).await;
    let revisions: Vec<u64> = completed
        .iter()
        .map(|m| m.payload()["revision"].as_u64().expect("revision"))
        .collect();
    assert_eq!(revisions, vec![1, 2, 3]);
    assert!(
        read_all(&js, COORDINATION, DETECTED).await.is_empty(),
        "no conflict"
    );
    assert!(read_all(&js, "choco:dlq", "choco.dlq.>").await.is_empty());
}

/// `property_sync.requested` at major 2 carries its value's type; major 1
/// (a bare value) is still read, upcast before the handler sees it. Events
/// of both majors already in the stream when the (upgraded) binary starts
/// are handled; a newer major is dead-lettered `unsupported_schema_version`,
/// and a major 2 value that is not its declared type `payload_invalid`,
/// naming `value.type`. A minor difference is accepted as it is.
#[tokio::test]
async fn inputs_of_every_major_the_conch_reads_are_handled_and_newer_ones_refused() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let (ok, out, err) = cli(&nats.url(), &["streams", "ensure"]);
    assert!(ok, "{out}{err}");
    let at = "2026-03-01T10:00:00Z";
    let at_version = |doc: &str, version: &str, value: Value| {
        let mut event = envelope(
            "coordination.property_sync.requested",
            doc,
            &sync_payload(doc, "title", value, 0, "ann", at),
        );
        event.schema_version = version.into();
        event
    };
    for event in [
        at_version("doc-v1", "1.0.0", json!("one")),
        at_version("doc-v2", "2.0.0", json!({"type": "number", "value": 2})),
        at_version("doc-v1-minor", "1.4.2", json!(["a"])),
        at_version(
            "doc-v2-lies",
            "2.0.0",
            json!({"type": "number", "value": "three"}),
        ),
        at_version("doc-v3", "3.0.0", json!({"type": "string", "value": "x"})),
    ] {
        publish(&js, REQUESTED, &event).await;
    }

    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;
    let completed = exactly(&js, COORDINATION, COMPLETED, 3).await;
    let by_doc: HashMap<String, (String, Value)> = completed
        .iter()
        .map(|m| {
            let envelope = m.envelope();
            (
                envelope.aggregate_id.clone(),
                (envelope.schema_version, m.payload()["value"].clone()),
            )
        })
        .collect();
    assert_eq!(
        by_doc["doc-v1"],
        ("2.0.0".into(), json!({"type": "string", "value": "one"}))
    );
    assert_eq!(
        by_doc["doc-v2"],
        ("2.0.0".into(), json!({"type": "number", "value": 2}))
    );
    assert_eq!(
        by_doc["doc-v1-minor"],
        ("2.0.0".into(), json!({"type": "array", "value": ["a"]}))
    );

    let letters = exactly(&js, "choco:dlq", "choco.dlq.>", 2).await;
    let reasons: HashMap<String, (String, String)> = letters
        .iter()
        .map(|l| {
            (
                l.envelope().aggregate_id,
                (
                    l.header("Choco-Dlq-Reason").unwrap_or_default(),
                    l.header("Choco-Dlq-Detail").unwrap_or_default(),
                ),
            )
        })
        .collect();
    let (reason, detail) = &reasons["doc-v2-lies"];
    assert_eq!(reason, "payload_invalid");
    assert!(detail.contains("value.type"), "{detail}");
    let (reason, detail) = &reasons["doc-v3"];
    assert_eq!(reason, "unsupported_schema_version");
    assert!(detail.contains("majors 1, 2"), "{detail}");
}

/// During a migration window (`rooms.conch.publish_previous_major`), the
/// conch publishes `property_sync.completed` at major 1 (the bare value),
/// one output per input as always, while it reads inputs of both majors.
#[tokio::test]
async fn a_room_in_a_migration_window_publishes_the_previous_major() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let mut env = conch_env(&nats.url());
    env.push((
        "CHOCO_ROOMS__CONCH__PUBLISH_PREVIOUS_MAJOR".into(),
        "true".into(),
    ));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    let mut event = envelope(
        "coordination.property_sync.requested",
        "doc-window",
        &sync_payload(
            "doc-window",
            "title",
            json!({"type": "string", "value": "Fudge"}),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    event.schema_version = "2.0.0".into();
    publish(&js, REQUESTED, &event).await;
    let completed = exactly(&js, COORDINATION, COMPLETED, 1).await;
    assert_eq!(completed[0].envelope().schema_version, "1.0.0");
    assert_eq!(
        completed[0].payload(),
        json!({"document_id": "doc-window", "property": "title", "value": "Fudge",
               "revision": 1, "author_id": "ann"})
    );
}
