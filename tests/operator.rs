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
    // One set of types: counts are numbers, times RFC 3339 in UTC ("Z").
    assert!(listed[0]["deliveries"].is_u64(), "{}", listed[0]);
    assert!(listed[0]["original_sequence"].is_u64(), "{}", listed[0]);
    let time = listed[0]["time"].as_str().expect("time");
    assert!(
        time.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(time).is_ok(),
        "{time}"
    );
    // A misspelt room is a usage error naming the rooms, not "0 dead letters".
    let (code, out, err) = cli_status(&nats.url(), &["dlq", "list", "--room", "chocolate"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("unknown room \"chocolate\"") && err.contains("winnower"),
        "{err}"
    );
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
    let published_again = {
        let (ok, out, err) = cli(
            &nats.url(),
            &[
                "publish",
                "--type",
                "coordination.property_sync.requested",
                "--aggregate",
                "doc-cli-json",
                "--payload",
                &payload.to_string(),
                "--json",
            ],
        );
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out).expect("JSON")
    };
    assert_eq!(published_again["sequence"], 2, "{published_again}");
    assert_eq!(published_again["stream"], COORDINATION);

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
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].payload(), payload);
    // A malformed --type is a usage error (2), like any bad flag.
    let (code, _, err) = cli_status(
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
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--type"), "{err}");
}

/// The command line itself, without a server: completions, the man page,
/// flags only where they apply, `config show`'s room defaults, and the
/// exit status of a validator.
#[test]
fn the_command_line_describes_itself_and_exits_by_the_table() {
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .output()
            .expect("run")
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(
        script.contains("choco-factory") && script.contains("--dry-run"),
        "a bash completion script that knows the subcommands' flags"
    );
    let man = run(&["man"]);
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH"), "roff");
    assert!(
        page.contains(r#".SS "dlq list""#) && page.contains("Exit status"),
        "every command, and the exit status table"
    );

    // --bind is for the commands that run rooms: elsewhere clap refuses it.
    let bind = run(&["dlq", "list", "--bind", "0.0.0.0"]);
    assert_eq!(bind.status.code(), Some(2));

    // Every room setting, with its default, even when nothing sets it.
    let show = run(&["config", "show"]);
    let shown = String::from_utf8_lossy(&show.stdout);
    let line = shown
        .lines()
        .find(|l| l.starts_with("rooms.conch.settings.receipts_kept "))
        .unwrap_or_else(|| panic!("no conch default in\n{shown}"));
    assert!(line.contains("= 32") && line.contains("default"), "{line}");
    let json = run(&["config", "show", "--json"]);
    let values: Vec<Value> = serde_json::from_slice(&json.stdout).expect("JSON");
    assert!(
        values
            .iter()
            .any(|v| v["key"] == "rooms.mould.settings.render_timeout" && v["value"] == "2s"),
        "mould defaults in JSON"
    );

    // A validator's bad input is its answer (1), not a refusal (2).
    let invalid = std::process::Command::new(BIN)
        .args(["config", "check"])
        .env("CHOCO_CONSUMER__MAX_DELIVER", "0")
        .output()
        .expect("run");
    assert_eq!(invalid.status.code(), Some(1), "{invalid:?}");
    let checked = std::process::Command::new(BIN)
        .args(["config", "check", "--json"])
        .env("CHOCO_CONSUMER__MAX_DELIVER", "0")
        .output()
        .expect("run");
    let verdict: Value = serde_json::from_slice(&checked.stdout).expect("JSON");
    assert_eq!(verdict["valid"], false);
    assert!(
        verdict["error"]
            .as_str()
            .is_some_and(|e| e.contains("consumer.max_deliver")),
        "{verdict}"
    );
}

/// Human log lines are coloured only where colour can be shown: a
/// terminal (a pseudo-terminal from `script` here), not `TERM=dumb`.
#[test]
fn pretty_logs_honour_term_dumb() {
    let logs_under = |term: &str| {
        let output = std::process::Command::new("script")
            .args([
                "-qec",
                &format!(
                    "timeout -s KILL 1.5 {BIN} serve --rooms conch --log-format pretty \
                     --nats-url nats://127.0.0.1:1"
                ),
                "/dev/null",
            ])
            .env("TERM", term)
            .env_remove("NO_COLOR")
            .env("CHOCO_ROOMS__CONCH__HTTP_PORT", "0")
            .env("CHOCO_ROOMS__CONCH__GRPC_PORT", "0")
            .env("CHOCO_ROOMS__CONCH__METRICS_PORT", "0")
            .stdin(Stdio::null())
            .output()
            .expect("script");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let coloured = logs_under("xterm-256color");
    assert!(
        coloured.contains("room listening") && coloured.contains('\u{1b}'),
        "a colour terminal gets colour: {coloured:?}"
    );
    let dumb = logs_under("dumb");
    assert!(dumb.contains("room listening"), "{dumb:?}");
    assert!(!dumb.contains('\u{1b}'), "TERM=dumb gets none: {dumb:?}");
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
