//! Operating rooms at run time against a real server and the real binary:
//! pause and resume (CLI and HTTP, across a restart), the room's run state
//! in `$SRV.STATS` and `/info`, the `/admin/dlq` routes, and
//! `streams status|ensure`.

mod common;

use std::time::Duration;

use choco_factory::cocoa_butter::EventEnvelope;
use common::*;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

async fn get_json(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

async fn post_json(url: &str, body: Option<Value>) -> (u16, Value) {
    let request = reqwest::Client::new().post(url);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

/// Waits until `/readyz` answers `status`, and returns its body.
async fn readyz_becomes(factory: &Factory, status: u16) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (now, body) = get_json(&factory.url("/readyz")).await;
        if now == status {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz stayed {now}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn grpc_health(factory: &Factory) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", factory.grpc))
        .expect("endpoint")
        .connect()
        .await
        .expect("grpc");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner()
        .status
}

fn write(doc: &str, property: &str) -> EventEnvelope {
    envelope(
        "coordination.property_sync.requested",
        doc,
        &sync_payload(doc, property, json!(1), 0, "ann", "2026-03-01T10:00:00Z"),
    )
}

/// A pause from the CLI stops the room pulling on every start of the
/// binary until a resume from HTTP; what was published meanwhile waits
/// in the stream and is handled once after the resume.
#[tokio::test]
async fn a_paused_room_pulls_nothing_across_a_restart_until_resumed() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let mut factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;
    publish(&js, REQUESTED, &write("doc-before", "title")).await;
    exactly(&js, COORDINATION, COMPLETED, 1).await;

    let (ok, out, err) = cli(
        &nats.url(),
        &["room", "pause", "conch", "--reason", "vault migration"],
    );
    assert!(ok && out.contains("paused conch"), "{out}{err}");
    let body = readyz_becomes(&factory, 503).await;
    assert_eq!(body["paused"], true, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("paused") && r.contains("vault migration")),
        "{body}"
    );
    wait_until(Duration::from_secs(5), || async {
        grpc_health(&factory).await == ServingStatus::NotServing as i32
    })
    .await;
    let (_, info) = get_json(&factory.url("/info")).await;
    assert_eq!(info["paused"], true, "{info}");
    assert_eq!(info["desired"]["reason"], "vault migration", "{info}");

    publish(&js, REQUESTED, &write("doc-paused", "title")).await;
    exactly(&js, COORDINATION, COMPLETED, 1).await;

    // The pause is the bucket's, not the process's: a restart keeps it.
    factory.signal(nix::sys::signal::Signal::SIGTERM);
    factory.wait_exit(Duration::from_secs(20)).await;
    let factory = Factory::start(&nats.url()).await;
    wait_until(Duration::from_secs(20), || async {
        !factory
            .logs_containing("not pulling until resumed")
            .is_empty()
    })
    .await;
    let body = readyz_becomes(&factory, 503).await;
    assert_eq!(body["consumer_bound"], true, "the consumer stays: {body}");
    assert_eq!(body["paused"], true, "{body}");
    publish(&js, REQUESTED, &write("doc-paused", "summary")).await;
    exactly(&js, COORDINATION, COMPLETED, 1).await;
    // Not merely slow: the server still holds both inputs, none delivered.
    let consumer = js
        .get_stream(COORDINATION)
        .await
        .expect("stream")
        .consumer_info("choco-conch")
        .await
        .expect("consumer")
        .clone();
    assert_eq!(consumer.num_ack_pending, 0, "nothing in hand while paused");
    assert!(consumer.num_pending >= 2, "both inputs wait: {consumer:?}");

    let (status, resumed) = post_json(&factory.url("/admin/resume"), None).await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["paused"], false);
    assert_eq!(resumed["applied"], true, "{resumed}");
    factory.wait_ready().await;
    let done = exactly(&js, COORDINATION, COMPLETED, 3).await;
    assert_eq!(
        done.iter()
            .filter(|m| m.envelope().aggregate_id == "doc-paused")
            .count(),
        2,
        "both events published while paused are handled once"
    );
    assert_eq!(grpc_health(&factory).await, ServingStatus::Serving as i32);

    // The HTTP route pauses too, and says so; the CLI resumes.
    let (status, paused) = post_json(
        &factory.url("/admin/pause"),
        Some(json!({"reason": "from http"})),
    )
    .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["applied"], true, "{paused}");
    readyz_becomes(&factory, 503).await;
    let (status, bad) = post_json(&factory.url("/admin/pause"), Some(json!({"why": 1}))).await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["field"], "why", "{bad}");
    let (ok, _, err) = cli(&nats.url(), &["room", "resume", "conch"]);
    assert!(ok, "{err}");
    readyz_becomes(&factory, 200).await;
    let (ok, _, err) = cli(&nats.url(), &["room", "pause", "nowhere"]);
    assert!(!ok && err.contains("unknown room"), "{err}");
}

/// Dead letters show in `/info`, in `$SRV.STATS` with the room's lag and
/// last error, and can be worked on the room's own HTTP port.
#[tokio::test]
async fn dead_letters_show_in_stats_and_info_and_are_worked_over_http() {
    let nats = Nats::start().await;
    let (client, js) = nats.client().await;
    let factory = Factory::start(&nats.url()).await;
    factory.wait_ready().await;

    publish_raw(&js, REQUESTED, "malformed-1", b"{not an envelope".to_vec()).await;
    let missing_field = envelope(
        "coordination.property_sync.requested",
        "doc-bad",
        &json!({"document_id": "doc-bad", "value": 1, "base_revision": 0,
                "author_id": "a", "updated_at": "2026-03-01T10:00:00Z"}),
    );
    publish(&js, REQUESTED, &missing_field).await;
    exactly(&js, "choco:dlq", "choco.dlq.>", 2).await;
    // Another room's dead letter: never shown or touched through the conch.
    publish_raw(
        &js,
        "choco.dlq.winnower.refinement.requested",
        "other-room-1",
        b"{}".to_vec(),
    )
    .await;

    let (_, info) = get_json(&factory.url("/info")).await;
    assert_eq!(info["dead_letters"], 2, "{info}");
    assert_eq!(info["paused"], false, "{info}");
    assert!(
        info["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("dead-lettered")),
        "{info}"
    );

    // $SRV.STATS: the room's endpoint carries its run state as data.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let data = loop {
        let reply = client
            .request("$SRV.STATS.the-conch", "".into())
            .await
            .expect("stats reply");
        let stats: Value = serde_json::from_slice(&reply.payload).expect("json");
        assert_eq!(stats["name"], "the-conch");
        let data = stats["endpoints"][0]["data"].clone();
        // The gauges are sampled every 5 s: wait for a sample taken after
        // the dead letters were acknowledged.
        let settled = ["pending", "ack_pending", "redeliveries"]
            .iter()
            .all(|gauge| data[*gauge].as_i64() == Some(0));
        if (data["dead_letters"] == 2 && settled) || std::time::Instant::now() > deadline {
            break data;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(data["dead_letters"], 2, "{data}");
    assert_eq!(data["paused"], false, "{data}");
    assert_eq!(data["ready"], true, "{data}");
    for gauge in ["pending", "ack_pending", "redeliveries"] {
        assert_eq!(data[gauge].as_i64(), Some(0), "{gauge} in {data}");
    }
    assert!(
        data["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("dead-lettered")),
        "{data}"
    );
    assert!(
        data["last_error"]["at"]
            .as_str()
            .is_some_and(|at| chrono::DateTime::parse_from_rfc3339(at).is_ok()),
        "{data}"
    );
    // The endpoint answers with the same data on request.
    let reply = client
        .request("choco.factory.conch.status", "".into())
        .await
        .expect("status reply");
    let status: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(status["dead_letters"], 2, "{status}");

    // List, with filters; bad input names the field.
    let (status, listed) = get_json(&factory.url("/admin/dlq")).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["count"], 2, "only the conch's: {listed}");
    let (_, malformed) = get_json(&factory.url("/admin/dlq?reason=malformed_envelope")).await;
    assert_eq!(malformed["count"], 1, "{malformed}");
    let malformed_seq = malformed["dead_letters"][0]["sequence"]
        .as_u64()
        .expect("sequence");
    let (_, recent) = get_json(&factory.url("/admin/dlq?since=1h")).await;
    assert_eq!(recent["count"], 2, "{recent}");
    for (query, field) in [("since=soon", "since"), ("colour=red", "colour")] {
        let (status, bad) = get_json(&factory.url(&format!("/admin/dlq?{query}"))).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(bad["error"]["field"], field, "{bad}");
    }

    // Show; 400 for a non-number, 404 for unknown or another room's.
    let (status, shown) = get_json(&factory.url(&format!("/admin/dlq/{malformed_seq}"))).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["dead_letter"]["reason"], "malformed_envelope");
    assert_eq!(shown["body"], "{not an envelope");
    let (status, bad) = get_json(&factory.url("/admin/dlq/seven")).await;
    assert_eq!(
        (status, bad["error"]["field"].clone()),
        (400, json!("sequence"))
    );
    let (status, _) = get_json(&factory.url("/admin/dlq/9999")).await;
    assert_eq!(status, 404);
    let (_, everything) = get_json(&format!("{}?reason=", factory.url("/admin/dlq"))).await;
    assert_eq!(everything["error"]["field"], "reason", "{everything}");
    let other_seq = read_all(&js, "choco:dlq", "choco.dlq.>").await.len() as u64;
    let (status, other) = get_json(&factory.url(&format!("/admin/dlq/{other_seq}"))).await;
    assert_eq!(status, 404, "another room's dead letter: {other}");

    // Replay: a dry run publishes nothing; a replay publishes to the
    // original subject and is recorded.
    let requested_before = read_all(&js, COORDINATION, REQUESTED).await.len();
    let (status, dry) = post_json(
        &factory.url("/admin/dlq/replay"),
        Some(json!({"reason": "payload_invalid", "dry_run": true})),
    )
    .await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["count"], 1, "{dry}");
    assert_eq!(dry["dead_letters"][0]["subject"], REQUESTED);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read_all(&js, COORDINATION, REQUESTED).await.len(),
        requested_before
    );
    let (status, bad) = post_json(
        &factory.url("/admin/dlq/replay"),
        Some(json!({"sequences": ["x"]})),
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]["field"]
            .as_str()
            .is_some_and(|f| f.starts_with("sequences")),
        "{bad}"
    );
    let (status, missing) = post_json(
        &factory.url("/admin/dlq/replay"),
        Some(json!({"sequences": [9999]})),
    )
    .await;
    assert_eq!(status, 404, "{missing}");
    let (status, replayed) = post_json(
        &factory.url("/admin/dlq/replay"),
        Some(json!({"reason": "payload_invalid"})),
    )
    .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["count"], 1, "{replayed}");
    assert!(
        replayed["dead_letters"][0]["new_sequence"]
            .as_u64()
            .is_some()
    );
    wait_for(
        &js,
        COORDINATION,
        REQUESTED,
        requested_before + 1,
        Duration::from_secs(10),
    )
    .await;
    // Still invalid, so the room dead-letters it again: now three.
    exactly(&js, "choco:dlq", "choco.dlq.conch.>", 3).await;
    let (_, listed) = get_json(&factory.url("/admin/dlq?reason=payload_invalid")).await;
    let replayed_flags: Vec<&Value> = listed["dead_letters"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| &r["replayed"])
        .collect();
    assert_eq!(replayed_flags, [&json!(true), &json!(false)], "{listed}");

    // Purge: refused without confirm, naming it; then by filter.
    let (status, refused) = post_json(
        &factory.url("/admin/dlq/purge"),
        Some(json!({"reason": "payload_invalid"})),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["field"], "confirm");
    let (status, purged) = post_json(
        &factory.url("/admin/dlq/purge"),
        Some(json!({"reason": "payload_invalid", "confirm": true})),
    )
    .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["count"], 2, "{purged}");
    let (status, purged) = post_json(
        &factory.url("/admin/dlq/purge?confirm=true"),
        Some(json!({"sequences": [malformed_seq]})),
    )
    .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["sequences"], json!([malformed_seq]));
    let (_, info) = get_json(&factory.url("/info")).await;
    assert_eq!(info["dead_letters"], 0, "{info}");
    assert_eq!(
        read_all(&js, "choco:dlq", "choco.dlq.winnower.>")
            .await
            .len(),
        1,
        "the other room's dead letter is untouched"
    );
}

/// `streams ensure` creates everything a fresh server lacks and reports
/// what it found; `streams status` shows each room.
#[tokio::test]
async fn streams_are_ensured_and_shown() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;

    let (ok, out, err) = cli(&nats.url(), &["streams", "ensure"]);
    assert!(ok, "{out}{err}");
    assert!(
        err.is_empty(),
        "no progress bar when stderr is not a terminal: {err:?}"
    );
    for stream in [
        "choco:events:coordination",
        "choco:events:refinement",
        "choco:events:hydration",
        "choco:events:resolution",
        "choco:dlq",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("stream") && l.contains(stream) && l.contains("created")),
            "{stream} in\n{out}"
        );
    }
    assert!(
        out.lines()
            .any(|l| l.contains("choco_control") && l.contains("created")),
        "{out}"
    );

    // A deleted consumer comes back, a drifted one is put right, the rest is ok.
    let coordination = js
        .get_stream("choco:events:coordination")
        .await
        .expect("stream");
    coordination
        .delete_consumer("choco-conch")
        .await
        .expect("delete");
    let refinement = js
        .get_stream("choco:events:refinement")
        .await
        .expect("stream");
    let mut drifted = refinement
        .consumer_info("choco-winnower")
        .await
        .expect("consumer")
        .config
        .clone();
    drifted.max_deliver = 9;
    refinement.update_consumer(drifted).await.expect("update");
    let (ok, out, err) = cli(&nats.url(), &["streams", "ensure", "--json"]);
    assert!(ok, "{out}{err}");
    let report: Vec<Value> = serde_json::from_str(&out).expect("json");
    let outcome = |name: &str| {
        report
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {out}"))
            .clone()
    };
    assert_eq!(outcome("choco-conch")["outcome"], "created");
    assert_eq!(outcome("choco-winnower")["outcome"], "drift updated");
    assert!(
        outcome("choco-winnower")["detail"][0]
            .as_str()
            .is_some_and(|d| d.starts_with("max_deliver: 9")),
        "{out}"
    );
    assert_eq!(outcome("choco-mould")["outcome"], "ok");
    assert_eq!(outcome("choco:dlq")["outcome"], "ok");
    assert_eq!(outcome("conch")["outcome"], "prepared");

    publish(&js, REQUESTED, &write("doc-s", "title")).await;
    let (ok, out, err) = cli(&nats.url(), &["streams", "status", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).expect("json");
    let rooms: Vec<&str> = rows.iter().filter_map(|r| r["room"].as_str()).collect();
    assert_eq!(rooms, ["conch", "mould", "winnower", "wrapper"]);
    let conch = &rows[0];
    assert_eq!(conch["stream"]["messages"], 1, "{conch}");
    assert_eq!(conch["consumer"]["exists"], true, "{conch}");
    assert_eq!(conch["consumer"]["pending"], 1, "{conch}");
    assert_eq!(conch["dead_letters"], 0, "{conch}");
    assert!(conch["stream"]["last_activity"].is_string(), "{conch}");

    let (ok, table, err) = cli(&nats.url(), &["streams", "status"]);
    assert!(ok, "{err}");
    for room in ["winnower", "conch", "mould", "wrapper"] {
        assert!(
            table.lines().any(|l| l.starts_with(room)),
            "{room} in\n{table}"
        );
    }
    assert!(table.contains("choco-conch"), "{table}");
}

/// Switching a room to `consumer.ordering = "pinned"` on a server whose
/// consumer exists is drift that `streams ensure` puts right (the server
/// accepts the new priority policy), and switching back likewise.
#[tokio::test]
async fn a_change_of_ordering_is_drift_put_right_on_the_server() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let (ok, out, err) = cli(&nats.url(), &["streams", "ensure"]);
    assert!(ok, "{out}{err}");

    let ensure = |ordering: &str| {
        let output = std::process::Command::new(BIN)
            .args(["streams", "ensure", "--json"])
            .env("CHOCO_NATS__URL", nats.url())
            .env("CHOCO_ROOMS__CONCH__CONSUMER__ORDERING", ordering)
            .output()
            .expect("run");
        let report: Vec<Value> = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("json: {}", String::from_utf8_lossy(&output.stderr)));
        report
            .into_iter()
            .find(|r| r["name"] == "choco-conch")
            .expect("the conch's consumer in the report")
    };
    let policy = || async {
        js.get_stream("choco:events:coordination")
            .await
            .expect("stream")
            .consumer_info("choco-conch")
            .await
            .expect("consumer")
            .config
            .priority_policy
            .clone()
    };

    let pinned = ensure("pinned");
    assert_eq!(pinned["outcome"], "drift updated", "{pinned}");
    assert!(
        pinned["detail"].as_array().is_some_and(|d| d
            .iter()
            .any(|line| line.as_str().is_some_and(|l| l.starts_with("priority:")))),
        "{pinned}"
    );
    assert_eq!(
        policy().await,
        async_nats::jetstream::consumer::PriorityPolicy::PinnedClient
    );
    assert_eq!(ensure("pinned")["outcome"], "ok");

    assert_eq!(ensure("per_process")["outcome"], "drift updated");
    assert_eq!(
        policy().await,
        async_nats::jetstream::consumer::PriorityPolicy::None
    );

    // A replica started with the other ordering does not switch the
    // consumer under the replicas already running: it follows the server
    // and says so.
    let mut env = conch_env(&nats.url());
    env.push(("CHOCO_CONSUMER__ORDERING".into(), "pinned".into()));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    assert_eq!(
        policy().await,
        async_nats::jetstream::consumer::PriorityPolicy::None
    );
    assert!(
        !factory
            .logs_containing("differs from the configuration")
            .is_empty(),
        "the replica warns that it follows the server's ordering"
    );
    publish(&js, REQUESTED, &write("doc-follow", "title")).await;
    wait_for(&js, COORDINATION, COMPLETED, 1, Duration::from_secs(20)).await;
}
