//! A steady load of conch writes that cannot conflict, published by the
//! test's own client, and the check that follows a fault: every input
//! handled exactly once, nothing dead-lettered, and how long each took.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::json;
use tokio::task::JoinHandle;

use super::*;

/// Publishes until JetStream stored it: through a leader election the
/// publish times out or finds no responder, and the same `Nats-Msg-Id`
/// makes the retry safe.
pub async fn publish_until_stored(js: &jetstream::Context, subject: &str, id: &str, body: Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let message = jetstream::message::PublishMessage::build()
            .payload(body.clone().into())
            .message_id(id);
        if let Ok(ack) = js.send_publish(subject.to_string(), message).await
            && ack.await.is_ok()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{id} was never stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `count` writes that cannot conflict, at `per_second`, in the background.
pub fn steady_writes(
    js: jetstream::Context,
    prefix: &'static str,
    count: usize,
    per_second: u64,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..count {
            tick.tick().await;
            let event = write(prefix, i);
            publish_until_stored(&js, REQUESTED, &event.event_id, event.encode()).await;
        }
    })
}

/// Write `i` of a load: property `p<i>` of one of 40 documents
/// `<prefix>-<n>`, never conflicting with another write of the load.
pub fn write(prefix: &str, i: usize) -> choco_factory::cocoa_butter::EventEnvelope {
    let doc = format!("{prefix}-{}", i % 40);
    let payload = sync_payload(
        &doc,
        &format!("p{i}"),
        json!(i),
        0,
        "ann",
        "2026-03-01T10:00:00Z",
    );
    envelope("coordination.property_sync.requested", &doc, &payload)
}

/// Every input produced exactly one `completed` at revision 1, nothing saw
/// itself as a conflict, and nothing was dead-lettered.
pub async fn assert_each_write_once(js: &jetstream::Context, count: usize) {
    // Wait for an output of every input: counted by input, not by
    // message, since an output stored twice must not stand in for one
    // that is still held for a lost quorum.
    let deadline = Instant::now() + Duration::from_secs(120);
    let distinct = |messages: &[Stored]| {
        messages
            .iter()
            .map(|m| {
                let p = m.payload();
                (p["document_id"].to_string(), p["property"].to_string())
            })
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let mut completed = loop {
        let found = read_all(js, COORDINATION, COMPLETED).await;
        if distinct(&found) >= count || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A last read, for outputs stored twice a moment late. Kept only if it
    // sees at least every input the first did: right after a server came
    // back, the ephemeral consumer of a read may be placed on a replica
    // still catching up, whose view is shorter. What was read once is in
    // the stream; a shorter view is not a loss.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = read_all(js, COORDINATION, COMPLETED).await;
    if distinct(&again) >= distinct(&completed) {
        completed = again;
    }
    // Every output of each input, by its event id: one id per input, or the
    // input was handled into two different outputs.
    let mut seen: HashMap<(String, String), Vec<String>> = HashMap::new();
    for message in &completed {
        let payload = message.payload();
        assert_eq!(payload["revision"], 1, "each write applied once: {payload}");
        let key = (
            payload["document_id"].as_str().expect("doc").to_string(),
            payload["property"].as_str().expect("property").to_string(),
        );
        seen.entry(key)
            .or_default()
            .push(message.envelope().event_id);
    }
    assert_eq!(seen.len(), count, "no input lost");
    for (key, ids) in &seen {
        assert!(
            ids.iter().all(|id| id == &ids[0]),
            "no input handled into two outputs: {key:?} {ids:?}"
        );
    }
    // The same output (one event id) stored twice: JetStream's duplicate
    // window did not drop a publish retried across a lost quorum. Counted
    // and shown, not hidden: docs/ARCHITECTURE.md states it as measured.
    let stored_twice: Vec<_> = seen.iter().filter(|(_, ids)| ids.len() > 1).collect();
    if !stored_twice.is_empty() {
        eprintln!("the same output stored more than once: {stored_twice:?}");
    }
    assert!(
        stored_twice.len() <= 2,
        "at most a couple of outputs stored twice by the bus: {stored_twice:?}"
    );
    assert!(read_all(js, COORDINATION, DETECTED).await.is_empty());
    let dead = read_all(js, "choco:dlq", "choco.dlq.>").await;
    assert!(
        dead.is_empty(),
        "nothing dead-lettered because of the fault: {:?}",
        dead.iter()
            .map(|d| d.header("Choco-Dlq-Reason"))
            .collect::<Vec<_>>()
    );
}

/// Time from each input's envelope to its output's, for the inputs that
/// have one: what a caller waits, fault included.
pub async fn latencies(js: &jetstream::Context) -> Vec<Duration> {
    let key = |m: &Stored| {
        let p = m.payload();
        (p["document_id"].to_string(), p["property"].to_string())
    };
    let inputs: HashMap<_, _> = read_all(js, COORDINATION, REQUESTED)
        .await
        .iter()
        .map(|m| (key(m), m.envelope().created_at))
        .collect();
    let mut out: Vec<Duration> = read_all(js, COORDINATION, COMPLETED)
        .await
        .iter()
        .filter_map(|m| {
            let sent = inputs.get(&key(m))?;
            (m.envelope().created_at - *sent).to_std().ok()
        })
        .collect();
    out.sort();
    out
}

/// The `q` quantile (0..=1) of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
