//! The runtime's puller (`nats/pull.rs`) against a real nats-server, seen
//! on the wire: the pull requests it sends, read by a second subscriber of
//! the consumer's pull subject.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use choco_factory::cocoa_butter::nats::pull::Puller;
use common::*;
use futures::StreamExt;

/// While a backlog lasts the batch doubles up to its bound (2,000
/// messages in far fewer pulls than the configured batch would take);
/// once a pull expires with nothing left to deliver, it is back to the
/// configured batch.
#[tokio::test]
async fn the_batch_grows_with_a_backlog_and_shrinks_when_it_is_gone() {
    let nats = Nats::start().await;
    let (client, js) = nats.client().await;
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "PULL".into(),
            subjects: vec!["pull.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    let backlog = 2_000;
    for i in 0..backlog {
        js.publish("pull.one", format!("{i}").into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("reader".into()),
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut requests = client
        .subscribe("$JS.API.CONSUMER.MSG.NEXT.PULL.reader")
        .await
        .expect("snoop");
    client.flush().await.expect("flush");

    let mut puller = Puller::new(
        &js,
        &consumer,
        10,
        Duration::from_secs(1),
        Duration::from_millis(200),
        None,
    )
    .await
    .expect("puller")
    .with_max_batch(128);
    for _ in 0..backlog {
        puller.next().await.expect("a message");
    }
    let batches = pulled_batches(&mut requests).await;
    eprintln!(
        "{} pulls for {backlog} messages: {batches:?}",
        batches.len()
    );
    assert_eq!(
        batches.first(),
        Some(&10),
        "it starts at the configured batch"
    );
    assert_eq!(batches.iter().max(), Some(&128), "it grows to its bound");
    assert!(
        batches.len() < 60,
        "{} pulls: a fixed batch of 10, pulled again at half, takes ~400",
        batches.len()
    );

    // The backlog is gone: the outstanding pulls expire with messages
    // undelivered, and the next pull asks for the configured batch again.
    let next = tokio::spawn(async move { puller.next().await.map(|m| m.payload.clone()) });
    tokio::time::sleep(Duration::from_secs(3)).await;
    js.publish("pull.one", "late".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let late = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("delivered")
        .expect("joined")
        .expect("a message");
    assert_eq!(&late[..], b"late");
    let after = pulled_batches(&mut requests).await;
    assert_eq!(
        after.last(),
        Some(&10),
        "back to the configured batch: {after:?}"
    );
}

/// The batch of every pull request seen so far.
async fn pulled_batches(requests: &mut async_nats::Subscriber) -> Vec<u64> {
    let mut batches = Vec::new();
    while let Ok(Some(request)) =
        tokio::time::timeout(Duration::from_millis(300), requests.next()).await
    {
        let body: serde_json::Value = serde_json::from_slice(&request.payload).expect("json");
        batches.push(body["batch"].as_u64().expect("batch"));
    }
    batches
}
