//! The factory on a real three-node JetStream cluster (`common::cluster`):
//! the shipped production configuration connects to all three servers and
//! creates replicated streams and buckets, and at a steady load nothing is
//! lost, doubled or dead-lettered when a leader dies, steps down, or the
//! cluster loses its quorum for a while. Run one at a time (three servers
//! and the binary on two cores): `scripts/test.sh` does.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use common::cluster::{Cluster, NODES};
use common::steady::{assert_each_write_once, latencies, quantile, steady_writes};
use common::*;
use serde_json::{Value, json};

/// The conch on the cluster, every stream and bucket with three replicas.
fn conch_on(cluster: &Cluster) -> Vec<(String, String)> {
    let mut env = conch_env(&cluster.urls());
    env.push(("CHOCO_STREAMS__REPLICAS".into(), "3".into()));
    env.push(("CHOCO_CONSUMER__HEARTBEAT".into(), "1s".into()));
    env
}

async fn replicas_of(js: &jetstream::Context, name: &str) -> usize {
    js.get_stream(name)
        .await
        .unwrap_or_else(|err| panic!("{name}: {err}"))
        .info()
        .await
        .expect("info")
        .config
        .num_replicas
}

/// The shipped `config/production.toml`, only its addresses changed: the
/// binary connects with all three servers in `nats.url`, and every stream
/// and bucket it creates is replicated three times with the production
/// limits. The CLI connects with the TOML array form of the same list.
#[tokio::test]
async fn the_production_config_runs_on_a_three_node_cluster() {
    let cluster = Cluster::start().await;
    let (client, js) = cluster.client().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let shipped = std::fs::read_to_string("config/production.toml").expect("production.toml");
    let hosts =
        "nats://nats-1.internal:4222,nats://nats-2.internal:4222,nats://nats-3.internal:4222";
    assert!(
        shipped.contains(hosts),
        "the shipped config lists three servers"
    );
    let config = dir.path().join("factory.toml");
    std::fs::write(
        &config,
        shipped
            .replace(hosts, &cluster.urls())
            .replace("bind = \"0.0.0.0\"", "bind = \"127.0.0.1\"")
            // A host's path, like its addresses.
            .replace(
                "/var/lib/choco-factory/archive",
                &dir.path().join("archive").display().to_string(),
            ),
    )
    .expect("write config");
    let mut env: Vec<(String, String)> = ["WINNOWER", "CONCH", "MOULD", "WRAPPER"]
        .iter()
        .flat_map(|room| {
            ["HTTP_PORT", "GRPC_PORT", "METRICS_PORT"]
                .map(|port| (format!("CHOCO_ROOMS__{room}__{port}"), "0".to_string()))
        })
        .collect();
    env.push((
        "CHOCO_AUTH__JWKS_FILE".into(),
        "tests/fixtures/jwt/jwks.json".into(),
    ));
    // The config's collector is a production host: export nothing.
    env.push(("OTEL_SDK_DISABLED".into(), "true".into()));
    let factory =
        Factory::start_with(env, &["--config", config.to_str().expect("utf-8"), "serve"]).await;
    // Every room ready: each has made its stream, consumer and buckets.
    for label in [
        "Winnowing Room",
        "Fudge Room",
        "Moulding Room",
        "Wrapping Room",
    ] {
        let mut http = None;
        wait_until(Duration::from_secs(20), || {
            http = factory.room_addrs(label).map(|(http, _, _)| http);
            std::future::ready(http.is_some())
        })
        .await;
        let url = format!("http://{}/readyz", http.expect("listening"));
        wait_until(Duration::from_secs(60), || async {
            reqwest::get(&url).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    // Every stream the runtime made: the four domains, the DLQ, the
    // rooms' buckets and object store, the control and replay buckets.
    let mut names = Vec::new();
    let mut streams = js.streams();
    while let Some(info) = futures::StreamExt::next(&mut streams).await {
        names.push(info.expect("stream info").config.name);
    }
    for expected in [
        "choco:events:refinement",
        "choco:events:coordination",
        "choco:events:hydration",
        "choco:events:resolution",
        "choco:dlq",
        "KV_choco_control",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    for name in &names {
        assert_eq!(replicas_of(&js, name).await, 3, "{name} is R3");
    }
    let domain = js
        .get_stream("choco:events:coordination")
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .clone();
    assert_eq!(domain.max_age, Duration::from_secs(180 * 86_400));
    assert_eq!(domain.max_bytes, 53_687_091_200);
    assert_eq!(domain.compression, Some(stream::Compression::S2));
    assert_eq!(domain.discard, stream::DiscardPolicy::Old);

    // The rooms work: an input gets its output.
    let doc = "cluster-doc";
    let event = envelope(
        "coordination.property_sync.requested",
        doc,
        &sync_payload(doc, "title", json!("Hi"), 0, "ann", "2026-03-01T10:00:00Z"),
    );
    publish(&js, REQUESTED, &event).await;
    wait_for(&js, COORDINATION, COMPLETED, 1, Duration::from_secs(30)).await;

    // The CLI, with the same file but the servers as a TOML array:
    // everything is as configured already.
    let array = dir.path().join("array.toml");
    let urls: Vec<String> = cluster
        .urls()
        .split(',')
        .map(|u| format!("{u:?}"))
        .collect();
    std::fs::write(
        &array,
        shipped.replace(
            &format!("url = \"{hosts}\""),
            &format!("url = [{}]", urls.join(", ")),
        ),
    )
    .expect("write");
    let output = std::process::Command::new(BIN)
        .args([
            "--config",
            array.to_str().expect("utf-8"),
            "streams",
            "ensure",
            "--json",
        ])
        .env_remove("CHOCO_NATS__URL")
        .env("CHOCO_AUTH__JWKS_FILE", "tests/fixtures/jwt/jwks.json")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).expect("json");
    let rows = report.as_array().expect("rows");
    // Nothing drifted; the replay records' bucket is made on first use.
    assert!(
        rows.iter()
            .filter(|row| row["kind"] != "room")
            .all(|row| row["outcome"] == "ok"
                || (row["name"] == "choco_dlq_replays" && row["outcome"] == "created")),
        "the production streams, buckets and consumers need no change: {report}"
    );
    assert_eq!(replicas_of(&js, "KV_choco_dlq_replays").await, 3);
    drop(client);
}

/// The leader of the coordination stream is SIGKILLed mid-stream and
/// restarted on its store: a new leader takes over, nothing is lost,
/// doubled or dead-lettered, and the room is ready again.
#[tokio::test]
async fn the_stream_leader_killed_mid_stream_loses_nothing() {
    const WRITES: usize = 600;
    let mut cluster = Cluster::start().await;
    let (_, any) = cluster.client().await;
    let factory = Factory::start_with(conch_on(&cluster), &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    assert_eq!(replicas_of(&any, COORDINATION).await, 3);
    // The test's own client (the load and the observer) stays on a server
    // that survives, so its reconnect is not counted as the room's.
    let leader = cluster.stream_leader(&any, COORDINATION).await;
    let client = async_nats::connect(cluster.nodes[(leader + 1) % NODES].url())
        .await
        .expect("connect to a surviving server");
    let js = jetstream::new(client.clone());

    // The failover as a client sees it, measured (never asserted): when
    // the server's leader-elected advisory arrives, when the room's first
    // output after it does, and each input's latency across the kill.
    let mut elected = client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{COORDINATION}"
        ))
        .await
        .expect("advisories");
    // Every leader the servers elect (the room's consumer and its buckets
    // have leaders of their own, on the killed server or not), with when.
    let mut every_election = client
        .subscribe("$JS.EVENT.ADVISORY.*.LEADER_ELECTED.>")
        .await
        .expect("advisories");
    let elections = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Instant)>::new()));
    let election_recorder = {
        let elections = elections.clone();
        tokio::spawn(async move {
            while let Some(advisory) = futures::StreamExt::next(&mut every_election).await {
                let asset = advisory
                    .subject
                    .as_str()
                    .split_once("LEADER_ELECTED.")
                    .map_or(String::new(), |(_, rest)| rest.to_string());
                elections
                    .lock()
                    .expect("elections")
                    .push((asset, Instant::now()));
            }
        })
    };
    let mut outputs = client.subscribe(COMPLETED).await.expect("outputs");
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let recorder = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while futures::StreamExt::next(&mut outputs).await.is_some() {
                arrivals.lock().expect("arrivals").push(Instant::now());
            }
        })
    };

    let load = steady_writes(js.clone(), "leader-kill", WRITES, 100);
    wait_for(&js, COORDINATION, COMPLETED, 100, Duration::from_secs(60)).await;
    assert_eq!(
        cluster.stream_leader(&js, COORDINATION).await,
        leader,
        "the leader did not move before the kill"
    );
    // Where the room's own connection is, to tell a failover the room
    // rides out on a surviving server from one where it reconnects too.
    let mut room_on = None;
    for (index, node) in cluster.nodes.iter().enumerate() {
        let Some(monitoring) = node.monitoring_url() else {
            continue;
        };
        let connz: serde_json::Value = match reqwest::get(format!("{monitoring}/connz")).await {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(_) => continue,
        };
        let named = connz["connections"].as_array().is_some_and(|connections| {
            connections.iter().any(|c| {
                c["name"]
                    .as_str()
                    .is_some_and(|name| name.starts_with("choco-factory"))
            })
        });
        if named {
            room_on = Some(index + 1);
        }
    }
    eprintln!(
        "killing the stream leader n{}; the room's connection is on {}",
        leader + 1,
        room_on.map_or("an unknown server".to_string(), |n| format!("n{n}"))
    );
    let killed = Instant::now();
    cluster.nodes[leader].kill().await;
    let election = tokio::time::timeout(
        Duration::from_secs(30),
        futures::StreamExt::next(&mut elected),
    )
    .await
    .ok()
    .map(|_| killed.elapsed());
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(killed.elapsed())).await;
    cluster.nodes[leader].restart().await.expect("same store");
    load.await.expect("publisher");
    assert_each_write_once(&js, WRITES).await;
    factory.wait_ready().await;
    recorder.abort();
    election_recorder.abort();
    // The elections the kill caused: within 20 s of it.
    let caused: Vec<(String, Duration)> = elections
        .lock()
        .expect("elections")
        .iter()
        .filter(|(_, at)| *at >= killed && *at - killed < Duration::from_secs(20))
        .map(|(asset, at)| (asset.clone(), *at - killed))
        .collect();
    let last_election = caused.iter().map(|(_, after)| *after).max();
    eprintln!("elections after the kill: {caused:?}");
    let arrivals = arrivals.lock().expect("arrivals").clone();
    // The runtime's share of the failover: from the stream's election
    // (the server's advisory) to the room's first output after it.
    let resumed = |elected: Duration| {
        arrivals
            .iter()
            .find(|at| **at >= killed + elected)
            .map(|at| *at - (killed + elected))
    };
    // Messages the dead server had sent and nobody received (in its
    // socket buffers, or its routes') are pending to the new consumer
    // leader until `consumer.ack_wait` passes: they come back late, not
    // lost. Counted apart from the resumption.
    let latency = latencies(&js).await;
    let ack_wait = choco_factory::cocoa_butter::config::ConsumerConfig::default().ack_wait;
    let waited_for_ack_wait = latency.iter().filter(|l| **l >= ack_wait / 2).count();
    eprintln!(
        "failover: stream leader elected {election:?} after the kill (server advisory); first \
         output {:?} after that election and {:?} after the last election the kill caused; \
         latency p50 {:?}, p99 {:?}, max {:?}; {waited_for_ack_wait} input(s) answered only \
         after the ack deadline ({ack_wait:?})",
        election.and_then(resumed),
        last_election.and_then(resumed),
        quantile(&latency, 0.5),
        quantile(&latency, 0.99),
        latency.last().copied().unwrap_or_default(),
    );

    // The room's metrics saw the new leader, and all three copies are
    // current again once the restarted server caught up.
    let series_of = |text: &str, name: &str, stream: &str| -> f64 {
        let label = format!("stream=\"{stream}\"");
        text.lines()
            .filter(|line| line.starts_with(name) && line.contains(&label))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let series = |text: &str, name: &str| series_of(text, name, COORDINATION);
    wait_until(Duration::from_secs(60), || async {
        let text = factory.scrape().await;
        series(&text, "choco_stream_leader_changes_total") >= 1.0
            && series(&text, "choco_stream_current_replicas") == 3.0
            && series(&text, "choco_stream_replicas") == 3.0
            // The dead-letter stream's replication is sampled too.
            && series_of(&text, "choco_stream_replicas", "choco:dlq") == 3.0
            && series_of(&text, "choco_stream_current_replicas", "choco:dlq") == 3.0
    })
    .await;
}

/// The stream's and then the consumer's leader step down through the
/// JetStream API while inputs flow: nothing lost, doubled or dead-lettered.
#[tokio::test]
async fn stream_and_consumer_leaders_step_down_without_loss() {
    const WRITES: usize = 600;
    let cluster = Cluster::start().await;
    let (client, js) = cluster.client().await;
    let factory = Factory::start_with(conch_on(&cluster), &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;

    let load = steady_writes(js.clone(), "step-down", WRITES, 100);
    wait_for(&js, COORDINATION, COMPLETED, 100, Duration::from_secs(60)).await;
    let before = cluster.stream_leader(&js, COORDINATION).await;
    cluster.step_down_stream(&client, COORDINATION).await;
    wait_for(&js, COORDINATION, COMPLETED, 300, Duration::from_secs(60)).await;
    let after = cluster.stream_leader(&js, COORDINATION).await;
    eprintln!("stream leader n{} → n{}", before + 1, after + 1);
    cluster
        .step_down_consumer(&client, COORDINATION, "choco-conch")
        .await;
    load.await.expect("publisher");
    assert_each_write_once(&js, WRITES).await;
    factory.wait_ready().await;
}

/// Two of the three servers down mid-stream: no quorum, no leader for
/// anything. The room says so (not ready), dead-letters nothing and burns
/// no delivery on the inputs it holds; once one server is back the cluster
/// has its majority again and every input is handled once.
#[tokio::test]
async fn quorum_lost_and_regained_loses_nothing() {
    const WRITES: usize = 600;
    let mut cluster = Cluster::start().await;
    let (_client, js) = cluster.client().await;
    let factory = Factory::start_with(conch_on(&cluster), &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    let load = steady_writes(js.clone(), "quorum", WRITES, 100);
    wait_for(&js, COORDINATION, COMPLETED, 150, Duration::from_secs(60)).await;

    // Kill two servers; the third is left without a majority. Inputs the
    // room holds fail their key-value writes; the publisher's wait.
    for index in 1..NODES {
        cluster.nodes[index].kill().await;
    }
    wait_until(Duration::from_secs(60), || async {
        reqwest::get(factory.url("/readyz"))
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    let body = reqwest::get(factory.url("/readyz"))
        .await
        .expect("readyz")
        .text()
        .await
        .expect("body");
    eprintln!("while the quorum is lost: {body}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.nodes[1].restart().await.expect("back on its store");
    load.await.expect("publisher");
    // Two of three: a majority again, and every input gets its output.
    wait_for(
        &js,
        COORDINATION,
        COMPLETED,
        WRITES,
        Duration::from_secs(120),
    )
    .await;
    factory.wait_ready().await;
    // The third back too (an ephemeral consumer of the checks below may
    // be placed on any of the stream's peers), then: once each, no loss.
    cluster.nodes[2].restart().await.expect("back on its store");
    cluster.wait_healthy(Duration::from_secs(90)).await;
    assert_each_write_once(&js, WRITES).await;
    factory.wait_ready().await;
}

/// An R1 deployment moved to R3 while its room runs: `streams ensure` with
/// `streams.replicas = 3` puts the stream, the DLQ and the buckets on three
/// servers in place, and the inputs go on being handled.
#[tokio::test]
async fn an_r1_deployment_moves_to_r3_while_the_room_runs() {
    const WRITES: usize = 300;
    let cluster = Cluster::start().await;
    let (_client, js) = cluster.client().await;
    let mut env = conch_env(&cluster.urls());
    env.push(("CHOCO_CONSUMER__HEARTBEAT".into(), "1s".into()));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    assert_eq!(replicas_of(&js, COORDINATION).await, 1);
    assert!(
        !factory
            .logs_containing("has one replica on a clustered JetStream")
            .is_empty(),
        "an R1 stream on a cluster is warned about"
    );

    let load = steady_writes(js.clone(), "r1-r3", WRITES, 100);
    wait_for(&js, COORDINATION, COMPLETED, 50, Duration::from_secs(60)).await;
    let output = std::process::Command::new(BIN)
        .args(["streams", "ensure", "--json"])
        .env("CHOCO_NATS__URL", cluster.urls())
        .env("CHOCO_STREAMS__REPLICAS", "3")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("json");
    let coordination = report
        .as_array()
        .expect("rows")
        .iter()
        .find(|row| row["name"] == COORDINATION)
        .expect("the coordination stream")
        .clone();
    assert_eq!(coordination["outcome"], "drift updated", "{report}");
    assert!(
        coordination["detail"][0]
            .as_str()
            .is_some_and(|d| d.contains("streams.replicas: 1 → 3")),
        "{coordination}"
    );
    for name in [
        COORDINATION,
        "choco:dlq",
        "KV_choco_control",
        "KV_choco_conch_documents",
    ] {
        assert_eq!(replicas_of(&js, name).await, 3, "{name} moved to R3");
    }
    load.await.expect("publisher");
    assert_each_write_once(&js, WRITES).await;
    factory.wait_ready().await;
}

/// The real upgrade procedure: each server in turn stopped (SIGTERM, as a
/// package upgrade does), started again on its store, and the next one
/// only once every copy of the room's stream is current again. At a steady
/// load, nothing is lost, doubled or dead-lettered.
#[tokio::test]
async fn a_rolling_restart_of_all_three_servers_loses_nothing() {
    const WRITES: usize = 1500;
    let mut cluster = Cluster::start().await;
    let (_client, js) = cluster.client().await;
    let factory = Factory::start_with(conch_on(&cluster), &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    let load = steady_writes(js.clone(), "rolling", WRITES, 100);
    wait_for(&js, COORDINATION, COMPLETED, 100, Duration::from_secs(60)).await;
    for index in 0..NODES {
        eprintln!("restarting n{}", index + 1);
        cluster.nodes[index]
            .restart()
            .await
            .expect("back on its store");
        wait_until(Duration::from_secs(60), || async {
            let Ok(mut stream) = js.get_stream(COORDINATION).await else {
                return false;
            };
            stream.info().await.is_ok_and(|info| {
                let replication = choco_factory::cocoa_butter::nats::Replication::from_info(
                    info.cluster.as_ref(),
                );
                replication.current_copies() == NODES
            })
        })
        .await;
    }
    load.await.expect("publisher");
    assert_each_write_once(&js, WRITES).await;
    factory.wait_ready().await;
}

/// The conch's compare-and-set on a document's key-value entry while the
/// bucket's leader steps down twice: 40 documents each take 15 concurrent
/// property writes, and every applied write raises its property's revision
/// exactly once (each property ends at revision 1, none is lost).
#[tokio::test]
async fn compare_and_set_through_a_key_value_leader_change_applies_each_write_once() {
    const WRITES: usize = 600;
    const BUCKET_STREAM: &str = "KV_choco_conch_documents";
    let cluster = Cluster::start().await;
    let (client, js) = cluster.client().await;
    let factory = Factory::start_with(conch_on(&cluster), &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    assert_eq!(replicas_of(&js, BUCKET_STREAM).await, 3);
    let load = steady_writes(js.clone(), "cas", WRITES, 100);
    for after in [150, 350] {
        wait_for(&js, COORDINATION, COMPLETED, after, Duration::from_secs(60)).await;
        let before = cluster.stream_leader(&js, BUCKET_STREAM).await;
        cluster.step_down_stream(&client, BUCKET_STREAM).await;
        eprintln!("{BUCKET_STREAM} leader n{} stepped down", before + 1);
    }
    load.await.expect("publisher");
    assert_each_write_once(&js, WRITES).await;
    for doc in 0..40 {
        let props: Value =
            reqwest::get(factory.url(&format!("/v1/documents/cas-{doc}/properties")))
                .await
                .expect("properties")
                .json()
                .await
                .expect("json");
        let properties = props["properties"].as_object().expect("properties");
        assert_eq!(properties.len(), 15, "cas-{doc}: {props}");
        for (name, property) in properties {
            assert_eq!(property["revision"], 1, "cas-{doc}.{name}: {property}");
        }
    }
}

/// The third server cut off from the other two without being killed (its
/// routes pass through proxies that stop forwarding), with one publisher
/// attached to it alone, then healed: nothing it acknowledged to that
/// publisher is missing from the stream, nothing is stored twice, and the
/// room, on the majority side, goes on and loses nothing.
#[tokio::test]
async fn a_partitioned_server_loses_nothing_it_acknowledged() {
    const WRITES: usize = 600;
    const LONE: usize = 50;
    let cluster = Cluster::start_partitionable().await;
    let (_client, js) = cluster.client().await;
    let factory = Factory::start_with(conch_on(&cluster), &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    let lone = async_nats::ConnectOptions::new()
        .connect(cluster.nodes[2].url())
        .await
        .expect("a client of n3 alone");
    let lone_js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(lone);

    // Before the cut the lone client's publishes are acknowledged: the
    // refusals below are the partition's doing.
    let mut lone_ids = Vec::new();
    let before = envelope(
        "coordination.property_sync.requested",
        "lone-before",
        &sync_payload(
            "lone-before",
            "t",
            json!(1),
            0,
            "bo",
            "2026-03-01T10:00:00Z",
        ),
    );
    lone_ids.push(before.event_id.clone());
    lone_js
        .send_publish(
            REQUESTED.to_string(),
            jetstream::message::PublishMessage::build()
                .payload(before.encode().into())
                .message_id(&before.event_id),
        )
        .await
        .expect("sent")
        .await
        .expect("n3 acknowledges while it is part of the cluster");

    let load = steady_writes(js.clone(), "partition", WRITES, 100);
    wait_for(&js, COORDINATION, COMPLETED, 100, Duration::from_secs(60)).await;
    cluster.cut_off_third();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut acknowledged = Vec::new();
    for i in 0..LONE {
        let doc = format!("lone-{}", i % 10);
        let payload = sync_payload(
            &doc,
            &format!("q{i}"),
            json!(i),
            0,
            "bo",
            "2026-03-01T10:00:00Z",
        );
        let event = envelope("coordination.property_sync.requested", &doc, &payload);
        lone_ids.push(event.event_id.clone());
        let message = jetstream::message::PublishMessage::build()
            .payload(event.encode().into())
            .message_id(&event.event_id);
        if let Ok(ack) = lone_js.send_publish(REQUESTED.to_string(), message).await
            && ack.await.is_ok()
        {
            acknowledged.push(event.event_id.clone());
        }
    }
    eprintln!(
        "the cut-off server acknowledged {} of {LONE}",
        acknowledged.len()
    );
    cluster.heal_third();
    cluster.wait_healthy(Duration::from_secs(60)).await;
    load.await.expect("publisher");

    // Inputs in the stream, each once; every acknowledged lone one there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let inputs = read_all(&js, COORDINATION, REQUESTED).await;
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for input in &inputs {
        *by_id.entry(input.envelope().event_id).or_default() += 1;
    }
    assert!(by_id.values().all(|&n| n == 1), "nothing stored twice");
    for id in &acknowledged {
        assert!(by_id.contains_key(id), "acknowledged {id} is in the stream");
    }
    let stored_lone = lone_ids.iter().filter(|id| by_id.contains_key(*id)).count();
    eprintln!("lone inputs stored after the heal: {stored_lone}");
    assert_each_write_once(&js, WRITES + stored_lone).await;
    factory.wait_ready().await;
}
