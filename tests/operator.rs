//! The operator's CLI against a real server: dead letters and events.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A smartblock with an unknown slug is dead-lettered; the operator lists
/// and shows it; once the manifest learns the slug, a replay gets it
/// accepted, once.
#[tokio::test]
async fn a_dead_letter_is_listed_shown_replayed_and_then_handled() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = dir.path().join("manifest.toml");
    let shipped = std::fs::read_to_string("config/federation-manifest.toml").expect("manifest");
    std::fs::write(&manifest, &shipped).expect("write");
    let mut env = room_env(&nats.url(), "WINNOWER");
    env.push((
        "CHOCO_ROOMS__WINNOWER__SETTINGS__MANIFEST_FILE".into(),
        manifest.display().to_string(),
    ));
    let mut factory = Factory::start_room(
        env.clone(),
        &["serve", "--rooms", "winnower"],
        "Winnowing Room",
    )
    .await;
    factory.wait_ready().await;

    let block = json!({"blockId": "blk-tp", "commandSlug": "teleport", "schemaVersion": 1,
                       "documentId": "doc-1", "authorId": "ann", "blockType": "callout"});
    let event = envelope("refinement.smartblock_created", "blk-tp", &block);
    publish(&js, "choco.events.refinement.smartblock_created", &event).await;
    wait_for(&js, "choco:dlq", "choco.dlq.>", 1, Duration::from_secs(30)).await;

    let (ok, listed, err) = cli(
        &nats.url(),
        &["dlq", "list", "--room", "winnower", "--json"],
    );
    assert!(ok, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&listed).expect("json");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["reason"], "unknown_command_slug");
    assert_eq!(listed[0]["event_type"], "refinement.smartblock_created");
    assert_eq!(listed[0]["aggregate_id"], "blk-tp");
    assert_eq!(listed[0]["replayed"], false);
    let sequence = listed[0]["sequence"]
        .as_u64()
        .expect("sequence")
        .to_string();
    let (_, table, _) = cli(&nats.url(), &["dlq", "list"]);
    assert!(
        table.contains("unknown_command_slug") && table.contains("1 dead letter"),
        "{table}"
    );
    let (_, none, _) = cli(
        &nats.url(),
        &["dlq", "list", "--reason", "payload_invalid", "--json"],
    );
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&none)
            .expect("json")
            .len(),
        0
    );

    let (ok, shown, err) = cli(&nats.url(), &["dlq", "show", &sequence]);
    assert!(ok, "{err}");
    let shown: Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(
        shown["body"]["payload"]["commandSlug"], "teleport",
        "the payload is decoded"
    );
    assert_eq!(
        shown["dead_letter"]["original_subject"],
        "choco.events.refinement.smartblock_created"
    );

    let (ok, dry, _) = cli(&nats.url(), &["dlq", "replay", &sequence, "--dry-run"]);
    assert!(ok && dry.contains("would replay"), "{dry}");

    // The manifest learns the slug; the room restarts with it; the replay passes.
    std::fs::write(
        &manifest,
        format!("{shipped}\n[commands.teleport]\nfederation_targets = [\"traceo\"]\n"),
    )
    .expect("write");
    factory.signal(nix::sys::signal::Signal::SIGTERM);
    factory.wait_exit(Duration::from_secs(20)).await;
    let factory =
        Factory::start_room(env, &["serve", "--rooms", "winnower"], "Winnowing Room").await;
    factory.wait_ready().await;
    let (ok, replayed, err) = cli(&nats.url(), &["dlq", "replay", &sequence]);
    assert!(ok, "{err}");
    assert!(
        err.is_empty(),
        "no progress bar when stderr is not a terminal: {err:?}"
    );
    assert!(replayed.contains("1 dead letter(s) replayed"), "{replayed}");
    let accepted = wait_for(
        &js,
        "choco:events:refinement",
        "choco.events.refinement.smartblock_accepted",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(accepted[0].payload()["command_slug"], "teleport");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        read_all(
            &js,
            "choco:events:refinement",
            "choco.events.refinement.smartblock_accepted"
        )
        .await
        .len(),
        1
    );

    let (_, listed, _) = cli(&nats.url(), &["dlq", "list", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&listed).expect("json");
    assert_eq!(listed[0]["replayed"], true, "the replay is recorded");

    let (ok, _, err) = cli(&nats.url(), &["dlq", "purge", &sequence]);
    assert!(!ok && err.contains("--yes"), "purging asks first: {err}");
    let (ok, purged, err) = cli(&nats.url(), &["dlq", "purge", &sequence, "--yes"]);
    assert!(ok && purged.contains("1 dead letter(s) purged"), "{err}");
    let (_, listed, _) = cli(&nats.url(), &["dlq", "list", "--json"]);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&listed)
            .expect("json")
            .len(),
        0
    );
    drop(factory);
}

#[tokio::test]
async fn publish_and_tail_round_trip_an_event() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    ensure_coordination_stream(&js).await;
    let tail = tokio::process::Command::new(BIN)
        .args(["tail", "choco.events.coordination.>", "--count", "1"])
        .env("CHOCO_NATS__URL", nats.url())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("tail");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let payload = json!({"document_id": "doc-cli", "property": "title", "value": "x", "base_revision": 0,
                         "author_id": "ann", "updated_at": "2026-03-01T10:00:00Z"});
    let (ok, out, err) = cli(
        &nats.url(),
        &[
            "publish",
            "--type",
            "coordination.property_sync.requested",
            "--aggregate",
            "doc-cli",
            "--payload",
            &payload.to_string(),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("choco.events.coordination.property_sync.requested"),
        "{out}"
    );

    let output = tokio::time::timeout(Duration::from_secs(10), tail.wait_with_output())
        .await
        .expect("tail ends after one message")
        .expect("tail output");
    let line: Value = serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim())
        .expect("one JSON line");
    assert_eq!(
        line["subject"],
        "choco.events.coordination.property_sync.requested"
    );
    assert_eq!(
        line["envelope"]["event_type"],
        "coordination.property_sync.requested"
    );
    assert_eq!(
        line["envelope"]["payload"], payload,
        "the payload is shown decoded"
    );

    // What was published is a valid envelope in the stream.
    let stored = read_all(&js, COORDINATION, REQUESTED).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].payload(), payload);
    let (ok, _, err) = cli(
        &nats.url(),
        &[
            "publish",
            "--type",
            "nodot",
            "--aggregate",
            "a",
            "--payload",
            "{}",
        ],
    );
    assert!(!ok && err.contains("--type"), "{err}");
}

/// Every room answers the NATS micro protocol, so standard tooling lists them.
#[tokio::test]
async fn srv_ping_finds_the_four_rooms() {
    let nats = Nats::start().await;
    let mut env = vec![
        ("CHOCO_NATS__URL".to_string(), nats.url()),
        ("CHOCO_LOG__FORMAT".to_string(), "json".to_string()),
    ];
    for room in ["WINNOWER", "CONCH", "MOULD", "WRAPPER"] {
        for port in ["HTTP_PORT", "GRPC_PORT", "METRICS_PORT"] {
            env.push((format!("CHOCO_ROOMS__{room}__{port}"), "0".into()));
        }
    }
    let _factory = Factory::start_with(env, &["serve"]).await;
    let (client, _js) = nats.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let names = loop {
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
        client
            .publish_with_reply("$SRV.PING", inbox, "".into())
            .await
            .expect("ping");
        let mut names: Vec<String> = Vec::new();
        while let Ok(Some(reply)) = tokio::time::timeout(
            Duration::from_millis(300),
            futures::StreamExt::next(&mut replies),
        )
        .await
        {
            // An empty reply is the server's "no responders" status.
            if reply.payload.is_empty() {
                continue;
            }
            let pong: Value = serde_json::from_slice(&reply.payload).expect("json");
            names.push(pong["name"].as_str().unwrap_or_default().to_string());
        }
        names.sort();
        if names.len() == 4 || std::time::Instant::now() > deadline {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        names,
        ["the-conch", "the-mould", "the-winnower", "the-wrapper"]
    );
}
