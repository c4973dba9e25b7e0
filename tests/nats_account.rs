//! How the factory presents itself to NATS: the name its connection
//! carries, the inbox prefix it subscribes under, and what it says when
//! no server answers.

mod common;

use std::time::Duration;

use serde_json::Value;

use common::*;

/// `serve --rooms conch` is told apart from a process serving every room
/// on the server (`nats server report connections`), and with
/// `nats.inbox_prefix` every reply subject it subscribes to is under it.
#[tokio::test]
async fn a_process_serving_one_room_names_its_connection_after_it_and_keeps_its_inbox() {
    let nats = Nats::start().await;
    let monitoring = nats.server.monitoring_url().expect("monitoring port");
    let mut env = conch_env(&nats.url());
    env.push(("CHOCO_NATS__INBOX_PREFIX".into(), "_INBOX_choco".into()));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;

    let connz: Value = reqwest::get(format!("{monitoring}/connz?subs=1"))
        .await
        .expect("connz")
        .json()
        .await
        .expect("connz JSON");
    let connections = connz["connections"].as_array().expect("connections");
    let ours = connections
        .iter()
        .find(|c| c["name"] == "choco-factory:conch")
        .unwrap_or_else(|| panic!("no connection named choco-factory:conch: {connz:#}"));
    let subjects: Vec<&str> = ours["subscriptions_list"]
        .as_array()
        .expect("subscriptions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        subjects.iter().any(|s| s.starts_with("_INBOX_choco.")),
        "{subjects:?}"
    );
    assert!(
        !subjects.iter().any(|s| s.starts_with("_INBOX.")),
        "a reply subject outside the configured prefix: {subjects:?}"
    );
}

/// No server answers at start: a warning (not an INFO line per attempt)
/// naming the servers, redacted, and why each refuses.
#[tokio::test]
async fn an_unreachable_nats_is_a_warning_naming_each_server_and_why() {
    let closed = free_port();
    let url = format!("nats://choco:hunter2@127.0.0.1:{closed}");
    let factory = Factory::start_with(conch_env(&url), &["serve", "--rooms", "conch"]).await;
    let mut warning = None;
    wait_until(Duration::from_secs(10), || {
        warning = factory
            .logs_containing("cannot connect to NATS")
            .into_iter()
            .next();
        let found = warning.is_some();
        async move { found }
    })
    .await;
    let line: Value = serde_json::from_str(&warning.expect("warning")).expect("JSON line");
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(
        line["url"],
        format!("nats://<redacted>@127.0.0.1:{closed}"),
        "{line}"
    );
    let servers = line["servers"].as_str().expect("servers");
    assert!(
        servers.contains(&format!("127.0.0.1:{closed}")) && servers.contains("refused"),
        "{line}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        factory.logs_containing("cannot connect to NATS").len(),
        1,
        "one warning per run of failures, not one per attempt"
    );
    assert!(factory.logs_containing("hunter2").is_empty());
}
