//! Fault tests: processes die mid-stream, and nothing is lost or doubled.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const EVENTS: usize = 600;

/// Short ack wait so the messages a dead process held come back quickly.
fn fast_env(nats_url: &str) -> Vec<(String, String)> {
    let mut env = conch_env(nats_url);
    env.push(("CHOCO_CONSUMER__ACK_WAIT".into(), "2s".into()));
    env.push(("CHOCO_CONSUMER__HEARTBEAT".into(), "500ms".into()));
    env
}

/// Every input produced exactly one `completed`, applied exactly once.
async fn assert_exactly_once(js: &async_nats::jetstream::Context) {
    wait_for(js, COORDINATION, COMPLETED, EVENTS, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let completed = read_all(js, COORDINATION, COMPLETED).await;
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    for message in &completed {
        let payload = message.payload();
        let key = (
            payload["document_id"].as_str().expect("doc").to_string(),
            payload["property"].as_str().expect("property").to_string(),
        );
        assert_eq!(payload["revision"], 1, "each write applied once: {payload}");
        *seen.entry(key).or_default() += 1;
    }
    assert_eq!(seen.len(), EVENTS, "no input lost");
    assert!(seen.values().all(|&n| n == 1), "no output doubled");
    assert_eq!(completed.len(), EVENTS);
    assert!(
        read_all(js, COORDINATION, DETECTED).await.is_empty(),
        "no write saw itself as a conflict"
    );
    assert!(read_all(js, "choco:dlq", "choco.dlq.>").await.is_empty());
}

#[tokio::test]
async fn the_runtime_killed_mid_batch_loses_and_doubles_nothing() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    publish_independent_writes(&js, "kill", EVENTS, 40).await;

    let env = fast_env(&nats.url());
    let mut first = Factory::start_with(env.clone(), &["serve", "--rooms", "conch"]).await;
    wait_for(&js, COORDINATION, COMPLETED, 50, Duration::from_secs(30)).await;
    first.signal(nix::sys::signal::Signal::SIGKILL);
    let done_before = read_all(&js, COORDINATION, COMPLETED).await.len();
    eprintln!("outputs when the runtime was killed: {done_before} of {EVENTS}");
    first.wait_exit(Duration::from_secs(10)).await;

    let _second = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    assert_exactly_once(&js).await;
}

#[tokio::test]
async fn nats_killed_mid_stream_comes_back_and_nothing_is_lost_or_doubled() {
    let port = free_port();
    let mut nats = Nats::start_durable(port, true).await;
    let (_client, js) = nats.client().await;
    publish_independent_writes(&js, "nats", EVENTS, 40).await;
    drop(js);

    let factory = Factory::start_with(fast_env(&nats.url()), &["serve", "--rooms", "conch"]).await;
    {
        let (_client, js) = nats.client().await;
        wait_for(&js, COORDINATION, COMPLETED, 50, Duration::from_secs(30)).await;
    }
    nats.server.kill().await;
    factory.wait_not_ready().await;
    nats.server.restart().await.expect("same port, same store");
    factory.wait_ready().await;

    let (_client, js) = nats.client().await;
    let consumer = js
        .get_stream(COORDINATION)
        .await
        .expect("stream")
        .consumer_info("choco-conch")
        .await
        .expect("consumer");
    eprintln!(
        "after restart: ack floor {} of {EVENTS} inputs",
        consumer.ack_floor.stream_sequence
    );
    assert_exactly_once(&js).await;
}

/// How many inputs a replica handled, from its own metrics.
async fn handled_by(factory: &Factory) -> f64 {
    let text = factory.scrape().await;
    text.lines()
        .filter(|line| {
            line.starts_with("choco_consumer_messages_processed_total")
                && line.contains("property_sync.requested")
                && line.contains("outcome=\"ok\"")
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Two replicas share the conch's durable consumer: the work is split
/// between them, every input is handled once in effect, and concurrent
/// writers to the same documents (15 writes per document, in both
/// processes at once) lose no update: compare-and-set applies each once.
#[tokio::test]
async fn two_replicas_split_the_work_and_lose_no_update() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let env = fast_env(&nats.url());
    let first = Factory::start_with(env.clone(), &["serve", "--rooms", "conch"]).await;
    let second = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    first.wait_ready().await;
    second.wait_ready().await;

    publish_independent_writes(&js, "replica", EVENTS, 40).await;
    assert_exactly_once(&js).await;

    let (a, b) = (handled_by(&first).await, handled_by(&second).await);
    eprintln!("replica split: {a} + {b}");
    assert!(a > 0.0 && b > 0.0, "both replicas handled work: {a} + {b}");
    // Redelivered duplicates are answered from receipts, never re-applied,
    // so the handled count can exceed the inputs but the outputs cannot.
    assert!(a + b >= EVENTS as f64);

    // Every property of every document is there, each at revision 1.
    for doc in 0..40 {
        let props: serde_json::Value =
            reqwest::get(first.url(&format!("/v1/documents/replica-{doc}/properties")))
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
        let properties = props["properties"].as_object().expect("properties");
        assert_eq!(properties.len(), EVENTS / 40, "replica-{doc}: {props}");
        assert!(properties.values().all(|p| p["revision"] == 1), "{props}");
    }
}

/// Writes `from..to` of a chain on each of `documents` documents: write `i`
/// has base revision `i`, so it applies cleanly only if every earlier write
/// of its document was applied before it — in stream order. Documents are
/// interleaved, as concurrent editors' events are.
async fn publish_chained_writes(
    js: &async_nats::jetstream::Context,
    documents: usize,
    from: u64,
    to: u64,
) {
    ensure_coordination_stream(js).await;
    for i in from..to {
        for doc in 0..documents {
            let doc = format!("chain-{doc}");
            let payload = sync_payload(
                &doc,
                "title",
                serde_json::json!(format!("draft {i}")),
                i,
                "ann",
                "2026-03-01T10:00:00Z",
            );
            let event = envelope("coordination.property_sync.requested", &doc, &payload);
            publish(js, REQUESTED, &event).await;
        }
    }
}

/// `consumer.ordering = "pinned"`: two replicas, and the server delivers
/// to one of them at a time, so per-document order holds across replicas
/// (every chained write applies without a conflict). Killed, the pinned
/// replica's pin lapses after `pinned_ttl` and the standby carries on the
/// chains where they stood.
#[tokio::test]
async fn pinned_replicas_keep_per_aggregate_order_and_fail_over() {
    const DOCUMENTS: usize = 8;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let mut env = fast_env(&nats.url());
    env.push(("CHOCO_CONSUMER__ORDERING".into(), "pinned".into()));
    env.push(("CHOCO_CONSUMER__PINNED_TTL".into(), "2s".into()));
    let first = Factory::start_with(env.clone(), &["serve", "--rooms", "conch"]).await;
    let second = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    first.wait_ready().await;
    second.wait_ready().await;

    publish_chained_writes(&js, DOCUMENTS, 0, 25).await;
    let handled = 25 * DOCUMENTS;
    wait_for(
        &js,
        COORDINATION,
        COMPLETED,
        handled,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        read_all(&js, COORDINATION, DETECTED).await.is_empty(),
        "a chained write arrived out of order"
    );
    let (a, b) = (handled_by(&first).await, handled_by(&second).await);
    eprintln!("pinned split: {a} + {b}");
    assert!(
        (a == 0.0) != (b == 0.0),
        "one replica holds the pin and handles everything: {a} + {b}"
    );

    // The standby waited with its pulls open: idle heartbeats kept coming
    // to it, so it never took its wait for a stalled stream.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let standby_logs = if a > 0.0 { &second } else { &first };
    assert!(
        standby_logs
            .logs_containing("room consumer stopped")
            .is_empty(),
        "the standby rebinds: {:?}",
        standby_logs.logs_containing("room consumer stopped")
    );

    // Kill the pinned replica. The server drops its pin once it has not
    // pulled for the ttl (its last pull has expired by then: pulls of a
    // pinned consumer expire within half the ttl), and pins the standby's
    // waiting pull with the next message. (Inputs published before the pin
    // is dropped would go to the dead replica's last pull and come back
    // only after ack_wait, behind later ones: the fail-over exception
    // docs/ARCHITECTURE.md states.)
    let (pinned, standby) = if a > 0.0 {
        (first, second)
    } else {
        (second, first)
    };
    let pin_before = pinned_client(&js).await;
    assert!(pin_before.is_some(), "the consumer has a pinned client");
    pinned.signal(nix::sys::signal::Signal::SIGKILL);
    drop(pinned);
    let (js_ref, before) = (&js, &pin_before);
    wait_until(Duration::from_secs(30), move || async move {
        pinned_client(js_ref).await != *before
    })
    .await;
    publish_chained_writes(&js, DOCUMENTS, 25, 40).await;
    wait_for(
        &js,
        COORDINATION,
        COMPLETED,
        40 * DOCUMENTS,
        Duration::from_secs(60),
    )
    .await;
    assert!(read_all(&js, COORDINATION, DETECTED).await.is_empty());
    assert_eq!(handled_by(&standby).await, (15 * DOCUMENTS) as f64);
    for doc in 0..DOCUMENTS {
        let props: serde_json::Value =
            reqwest::get(standby.url(&format!("/v1/documents/chain-{doc}/properties")))
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
        assert_eq!(props["properties"]["title"]["revision"], 40, "{props}");
        assert_eq!(props["properties"]["title"]["value"], "draft 39", "{props}");
    }
}

/// The client id the server has pinned in the conch consumer's group.
async fn pinned_client(js: &async_nats::jetstream::Context) -> Option<String> {
    let info = js
        .get_stream(COORDINATION)
        .await
        .expect("stream")
        .consumer_info("choco-conch")
        .await
        .expect("consumer info");
    info.priority_groups
        .first()
        .and_then(|group| group.pinned_client_id.clone())
}
