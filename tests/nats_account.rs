//! How the factory presents itself to NATS: the name its connection
//! carries, the inbox prefix it subscribes under, what it says when no
//! server answers, and the least-privilege account it needs
//! (deploy/nats/choco-factory.conf, read from the repository and run as
//! shipped: all four rooms and the operator commands under it, no
//! permission violation; and what it refuses).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choco_factory::cocoa_butter::nats_server::{self, ManagedNats};
use futures::StreamExt;
use serde_json::{Value, json};

use common::*;

/// `serve --rooms conch` is told apart from a process serving every room
/// on the server (`nats server report connections`), and with
/// `nats.inbox_prefix` every reply subject it subscribes to is under it.
#[tokio::test]
async fn a_process_serving_one_room_names_its_connection_after_it_and_keeps_its_inbox() {
    let nats = Nats::start().await;
    let mut env = conch_env(&nats.url());
    env.push(("CHOCO_NATS__INBOX_PREFIX".into(), "_INBOX_choco".into()));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;

    let connections = connections(&nats.server).await;
    let ours = connections
        .iter()
        .find(|c| c["name"] == "choco-factory:conch")
        .unwrap_or_else(|| panic!("no connection named choco-factory:conch: {connections:#?}"));
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

// ---------------------------------------------------------------------------
// deploy/nats/choco-factory.conf, the least-privilege account, as shipped.
// ---------------------------------------------------------------------------

/// The shipped account file, read at test time: what is tested is the file.
const ACCOUNT_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/nats/choco-factory.conf"
);
const ROOMS_USER: &str = "choco-factory";
const ROOMS_PASSWORD: &str = "rooms-password-of-the-test";
const ROOMS_INBOX: &str = "_INBOX_choco";
const OPERATOR_USER: &str = "choco-operator";
const OPERATOR_PASSWORD: &str = "operator-password-of-the-test";
const OPERATOR_INBOX: &str = "_INBOX_choco_operator";

/// How long any one step may take before the test fails naming the
/// permission violations the server logged meanwhile.
const STEP: Duration = Duration::from_secs(10);

/// A nats-server running the shipped account file, its passwords given as
/// the file expects them: variables the file refers to (here defined ahead
/// of it; in a deployment, the server's environment).
struct AccountServer {
    server: ManagedNats,
    dir: tempfile::TempDir,
}

impl AccountServer {
    async fn start() -> AccountServer {
        let account =
            std::fs::read_to_string(ACCOUNT_FILE).expect("deploy/nats/choco-factory.conf");
        let config = format!(
            "CHOCO_FACTORY_NATS_PASSWORD: \"{ROOMS_PASSWORD}\"\n\
             CHOCO_OPERATOR_NATS_PASSWORD: \"{OPERATOR_PASSWORD}\"\n\
             {account}"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = nats_server::find_binary().expect("nats-server (run scripts/setup.sh)");
        // The client port, address and JetStream store come from the command
        // line; the file brings only the account.
        let server = ManagedNats::start_configured(binary, dir.path(), 0, false, &config)
            .await
            .expect("nats-server starts with deploy/nats/choco-factory.conf");
        AccountServer { server, dir }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    /// Every permission violation the server logged so far ("Publish
    /// Violation", "Subscription Violation"; the clients are told
    /// "Permissions Violation").
    fn violations(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("nats-server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("Violation"))
            .map(str::to_string)
            .collect()
    }

    /// Waits for `check`, failing with `what` and the violations logged.
    async fn within<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = std::time::Instant::now() + STEP;
        while !check().await {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within {STEP:?}; permission violations logged by nats-server:\n{}",
                self.violations().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client logged in as `user`, replies under `inbox`.
    async fn client(&self, user: &str, password: &str, inbox: &str) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .name(format!("{user}-test"))
            .user_and_password(user.into(), password.into())
            .custom_inbox_prefix(inbox)
            .connect(self.url())
            .await
            .unwrap_or_else(|err| panic!("{user} logs in: {err}"))
    }

    /// The operator's CLI, as `choco-operator`, with `env` added.
    fn operator_command(&self, env: &[(&str, &str)], args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(args)
            .envs(env.iter().copied())
            .env("CHOCO_NATS__URL", self.url())
            .env("CHOCO_NATS__USER", OPERATOR_USER)
            .env("CHOCO_NATS__PASSWORD", OPERATOR_PASSWORD)
            .env("CHOCO_NATS__INBOX_PREFIX", OPERATOR_INBOX)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs an operator command; it must succeed. Its stdout.
    async fn operator(&self, args: &[&str]) -> String {
        self.operator_with(&[], args).await
    }

    /// [`AccountServer::operator`] with `env` added.
    async fn operator_with(&self, env: &[(&str, &str)], args: &[&str]) -> String {
        let output = self
            .operator_command(env, args)
            .output()
            .await
            .expect("run choco-factory");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert!(
            output.status.success(),
            "`choco-factory {}` as {OPERATOR_USER} failed ({}):\n{stdout}\n{stderr}\n\
             permission violations logged by nats-server:\n{}",
            args.join(" "),
            output.status,
            self.violations().join("\n")
        );
        assert!(
            !stderr.to_lowercase().contains("permissions violation"),
            "`choco-factory {}`: {stderr}",
            args.join(" ")
        );
        stdout
    }

    /// The server's client connections with their subscriptions (`/connz`).
    async fn connections(&self) -> Vec<Value> {
        connections(&self.server).await
    }
}

/// `server`'s client connections with their subscriptions (`/connz`).
async fn connections(server: &ManagedNats) -> Vec<Value> {
    let monitoring = server.monitoring_url().expect("monitoring port");
    let connz: Value = reqwest::get(format!("{monitoring}/connz?subs=1"))
        .await
        .expect("connz")
        .json()
        .await
        .expect("connz JSON");
    connz["connections"].as_array().cloned().unwrap_or_default()
}

/// Every message published on `subjects` from now on, by subject, as a
/// `tail` would see them (the operator's subscribe grant).
fn collect(
    mut subscriptions: Vec<async_nats::Subscriber>,
) -> Arc<Mutex<Vec<(String, bytes::Bytes)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    for mut subscription in subscriptions.drain(..) {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                seen.lock()
                    .expect("seen")
                    .push((message.subject.to_string(), message.payload));
            }
        });
    }
    seen
}

fn count(seen: &Mutex<Vec<(String, bytes::Bytes)>>, subject: &str) -> usize {
    seen.lock()
        .expect("seen")
        .iter()
        .filter(|(s, _)| s == subject)
        .count()
}

async fn get(url: String) -> (u16, Value) {
    let response = reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    let body = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn post(url: String, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(&url)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

async fn ready(addr: SocketAddr) -> bool {
    reqwest::get(format!("http://{addr}/readyz"))
        .await
        .is_ok_and(|r| r.status() == 200)
}

const LABELS: [(&str, &str); 4] = [
    ("winnower", "Winnowing Room"),
    ("conch", "Fudge Room"),
    ("mould", "Moulding Room"),
    ("wrapper", "Wrapping Room"),
];
const DOMAINS: [&str; 4] = ["refinement", "coordination", "hydration", "resolution"];

/// The rooms' HTTP addresses, once every room listens.
async fn room_http(
    account: &AccountServer,
    factory: &Factory,
) -> HashMap<&'static str, SocketAddr> {
    let mut http = HashMap::new();
    for (room, label) in LABELS {
        let mut addr = None;
        account
            .within(&format!("{label} listening"), || {
                addr = factory.room_addrs(label).map(|(http, _, _)| http);
                std::future::ready(addr.is_some())
            })
            .await;
        http.insert(room, addr.expect("address"));
    }
    http
}

async fn all_ready(account: &AccountServer, http: &HashMap<&'static str, SocketAddr>, what: &str) {
    let addrs: Vec<SocketAddr> = http.values().copied().collect();
    account
        .within(what, || {
            let addrs = addrs.clone();
            async move {
                for addr in addrs {
                    if !ready(addr).await {
                        return false;
                    }
                }
                true
            }
        })
        .await;
}

/// The shipped account is enough for everything the factory does: the four
/// rooms run under its rooms' user (start-up, provisioning and putting
/// drifted streams right, consuming, outputs, dead letters, their buckets
/// and object store, service discovery, their HTTP admin routes, a NATS
/// restart), and the operator commands under its operator's user, each with
/// replies only under its own inbox prefix; the server logs no permission
/// violation throughout.
#[tokio::test]
async fn the_shipped_account_is_enough_for_the_rooms_and_the_operator() {
    let started = std::time::Instant::now();
    let mut account = AccountServer::start().await;
    let url = account.url();

    // The operator provisions first, for two rooms only and with another
    // max_age: so the operator creates streams, consumers and buckets (and
    // seeds the wrapper's tags), and the rooms create the others and put
    // the ones that differ from their configuration right.
    let ensured = account
        .operator_with(
            &[
                ("CHOCO_ROOMS__CONCH__ENABLED", "false"),
                ("CHOCO_ROOMS__MOULD__ENABLED", "false"),
                ("CHOCO_STREAMS__MAX_AGE", "90d"),
            ],
            &["streams", "ensure"],
        )
        .await;
    assert!(ensured.contains("created"), "{ensured}");

    // The operator's client: what `publish` and `tail` do, in-process.
    let operator = account
        .client(OPERATOR_USER, OPERATOR_PASSWORD, OPERATOR_INBOX)
        .await;
    let mut subscriptions = Vec::new();
    for subject in DOMAINS
        .iter()
        .map(|domain| format!("choco.events.{domain}.>"))
        .chain(["choco.dlq.>".to_string()])
    {
        subscriptions.push(operator.subscribe(subject).await.expect("subscribe"));
    }
    operator.flush().await.expect("flush");
    let seen = collect(subscriptions);
    let js = async_nats::jetstream::new(operator.clone());

    // All four rooms in one process as the rooms' user, on ephemeral ports.
    let mut env: Vec<(String, String)> = LABELS
        .iter()
        .flat_map(|(room, _)| room_env(&url, &room.to_uppercase()))
        .collect();
    for (key, value) in [
        ("CHOCO_NATS__USER", ROOMS_USER),
        ("CHOCO_NATS__PASSWORD", ROOMS_PASSWORD),
        ("CHOCO_NATS__INBOX_PREFIX", ROOMS_INBOX),
    ] {
        env.push((key.into(), value.into()));
    }
    let factory = Factory::start_room(env, &["serve"], "Wrapping Room").await;
    let http = room_http(&account, &factory).await;
    all_ready(&account, &http, "every room ready").await;
    let url_of = |room: &str, path: &str| format!("http://{}{path}", http[room]);
    eprintln!("rooms ready after {:?}", started.elapsed());

    // A valid input for each room (the conch's through `publish`), a
    // second artifact for the same document (the mould replaces the first),
    // a smartblock (the winnower's block bucket), an indexed document (the
    // wrapper's document bucket), and an invalid input for each room.
    let input = |room: &str| {
        workload::ROOMS
            .iter()
            .find(|case| case.name == room)
            .expect("room case")
    };
    let conch = input("conch");
    account
        .operator(&[
            "publish",
            "--type",
            &format!("{}.{}", conch.domain, conch.action),
            "--aggregate",
            "doc-conch",
            "--payload",
            &(conch.payload)("doc-conch").to_string(),
        ])
        .await;
    let mut events = Vec::new();
    for room in ["winnower", "mould", "wrapper"] {
        let case = input(room);
        let doc = format!("doc-{room}");
        events.push((
            format!("{}.{}", case.domain, case.action),
            doc.clone(),
            (case.payload)(&doc),
        ));
    }
    events.push((
        "hydration.requested".into(),
        "doc-mould".into(),
        json!({"document_id": "doc-mould", "format": "html",
               "source": "# {{ title }}\n\nSecond edition.\n", "data": {"title": "Again"}}),
    ));
    events.push((
        "refinement.smartblock_created".into(),
        "blk-1".into(),
        json!({"type": "smartblock_created", "blockId": "blk-1", "commandSlug": "invention",
               "schemaVersion": 1, "federationTargets": [], "semanticLayers": {},
               "documentId": "doc-winnower", "authorId": "ann", "blockType": "callout"}),
    ));
    events.push((
        "resolution.document_indexed".into(),
        "hq/readme.md".into(),
        json!({"repo": "hq", "path": "readme.md", "anchors": ["intro"], "tags": []}),
    ));
    for case in workload::ROOMS {
        let doc = format!("bad-{}", case.name);
        events.push((
            format!("{}.{}", case.domain, case.action),
            doc.clone(),
            json!({"document_id": doc}),
        ));
    }
    for (event_type, aggregate, payload) in &events {
        let event = envelope(event_type, aggregate, payload);
        publish(&js, &format!("choco.events.{event_type}"), &event).await;
    }

    // Each output on its subject, and each room's dead letter on its own.
    for (subject, wanted) in [
        ("choco.events.refinement.passed", 1),
        ("choco.events.refinement.smartblock_accepted", 1),
        ("choco.events.coordination.property_sync.completed", 1),
        ("choco.events.hydration.completed", 2),
        ("choco.events.resolution.tag_resolved", 1),
        ("choco.events.resolution.cross_repo_link_verified", 1),
        ("choco.events.resolution.completed", 1),
        ("choco.dlq.winnower.refinement.requested", 1),
        ("choco.dlq.conch.coordination.property_sync.requested", 1),
        ("choco.dlq.mould.hydration.requested", 1),
        ("choco.dlq.wrapper.resolution.requested", 1),
    ] {
        account
            .within(&format!("{wanted} on {subject}"), || {
                std::future::ready(count(&seen, subject) >= wanted)
            })
            .await;
    }
    eprintln!(
        "outputs and dead letters seen after {:?}",
        started.elapsed()
    );

    // `streams status`: each stream holds its inputs and outputs, each room
    // one dead letter, and the rooms put the streams the operator made with
    // another max_age back to theirs (180 days).
    let status: Value =
        serde_json::from_str(&account.operator(&["streams", "status", "--json"]).await)
            .expect("streams status JSON");
    let rows = status.as_array().expect("rows");
    for (room, messages) in [("winnower", 5), ("conch", 3), ("mould", 5), ("wrapper", 6)] {
        let row = rows
            .iter()
            .find(|row| row["room"] == room)
            .unwrap_or_else(|| panic!("{room} in {status:#}"));
        assert_eq!(row["stream"]["messages"], messages, "{room}: {row:#}");
        assert_eq!(
            row["stream"]["limits"]["max_age_seconds"],
            180 * 24 * 3600,
            "{room}: {row:#}"
        );
        assert_eq!(row["consumer"]["exists"], true, "{room}: {row:#}");
        assert_eq!(row["dead_letters"], 1, "{room}: {row:#}");
    }

    // The rooms' own reads, over HTTP: the artifact back from the object
    // store, the wrapper's tags (a key listing), the conch's document, the
    // room's dead-letter count.
    let (status, _) = get(url_of("mould", "/v1/artifacts/doc-mould")).await;
    assert_eq!(status, 200, "the mould's artifact");
    let (status, tags) = get(url_of("wrapper", "/v1/tags")).await;
    assert_eq!(status, 200, "{tags}");
    let (status, document) = get(url_of("conch", "/v1/documents/doc-conch/properties")).await;
    assert_eq!(status, 200, "{document}");
    let (status, info) = get(url_of("conch", "/info")).await;
    assert_eq!(
        (status, info["dead_letters"].clone()),
        (200, json!(1)),
        "{info}"
    );

    // Service discovery and a room's status endpoint, asked by the operator.
    let inbox = operator.new_inbox();
    let mut answers = operator.subscribe(inbox.clone()).await.expect("inbox");
    operator
        .publish_with_reply("$SRV.PING", inbox, "".into())
        .await
        .expect("ping");
    let mut services = std::collections::BTreeSet::new();
    while services.len() < 4 {
        let answer = tokio::time::timeout(STEP, answers.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "$SRV.PING answered by {services:?} only; violations:\n{}",
                    account.violations().join("\n")
                )
            })
            .expect("answer");
        let ping: Value = serde_json::from_slice(&answer.payload).expect("ping JSON");
        services.insert(ping["name"].as_str().expect("name").to_string());
    }
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["the-conch", "the-mould", "the-winnower", "the-wrapper"]
    );
    let stats = operator
        .request("$SRV.STATS.the-mould", "".into())
        .await
        .expect("stats reply");
    let stats: Value = serde_json::from_slice(&stats.payload).expect("stats JSON");
    assert_eq!(stats["name"], "the-mould", "{stats}");
    let reply = operator
        .request("choco.factory.conch.status", "".into())
        .await
        .expect("status reply");
    let room_status: Value = serde_json::from_slice(&reply.payload).expect("status JSON");
    assert_eq!(room_status["ready"], true, "{room_status}");

    // The operator's dead-letter commands.
    let listed: Value = serde_json::from_str(&account.operator(&["dlq", "list", "--json"]).await)
        .expect("dlq list JSON");
    let listed = listed.as_array().expect("records");
    assert_eq!(listed.len(), 4, "one per room: {listed:#?}");
    assert!(
        listed.iter().all(|r| r["reason"] == "payload_invalid"),
        "{listed:#?}"
    );
    let listed: Value = serde_json::from_str(
        &account
            .operator(&["dlq", "list", "--room", "conch", "--json"])
            .await,
    )
    .expect("dlq list JSON");
    let sequence = listed[0]["sequence"]
        .as_u64()
        .expect("sequence")
        .to_string();
    let shown = account.operator(&["dlq", "show", &sequence]).await;
    assert!(shown.contains("bad-conch"), "{shown}");

    // Pause and resume the conch: it stops being ready, and is again.
    account.operator(&["room", "pause", "conch"]).await;
    account
        .within("the conch paused", || async { !ready(http["conch"]).await })
        .await;
    account.operator(&["room", "resume", "conch"]).await;
    account
        .within("the conch resumed", || ready(http["conch"]))
        .await;

    // `tail` of the dead letters, then a replay as the operator: the
    // replayed input fails again and its new dead letter reaches the tail.
    let dead_letter = "choco.dlq.conch.coordination.property_sync.requested";
    let tail = account
        .operator_command(&[], &["tail", "choco.dlq.>", "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tail");
    account
        .within("tail subscribed", || async {
            account.connections().await.iter().any(|c| {
                c["name"] == "choco-factory-cli"
                    && c["subscriptions_list"]
                        .as_array()
                        .is_some_and(|subs| subs.iter().any(|s| s == "choco.dlq.>"))
            })
        })
        .await;
    account.operator(&["dlq", "replay", &sequence]).await;
    let tailed = tokio::time::timeout(STEP, tail.wait_with_output())
        .await
        .expect("tail ends after one message")
        .expect("tail output");
    let tailed_out = String::from_utf8_lossy(&tailed.stdout);
    assert!(
        tailed.status.success(),
        "{tailed_out} {}",
        String::from_utf8_lossy(&tailed.stderr)
    );
    assert!(tailed_out.contains(dead_letter), "{tailed_out}");
    account
        .within("the replay's dead letter", || {
            std::future::ready(count(&seen, dead_letter) >= 2)
        })
        .await;

    // The same through the conch's admin routes, as the rooms' user: list,
    // show, replay (a third dead letter), purge; and pause and resume.
    let (status, listed) = get(url_of("conch", "/admin/dlq")).await;
    assert_eq!(
        (status, listed["count"].clone()),
        (200, json!(2)),
        "{listed}"
    );
    let (status, shown) = get(url_of("conch", &format!("/admin/dlq/{sequence}"))).await;
    assert_eq!(status, 200, "{shown}");
    let (status, replayed) = post(
        url_of("conch", "/admin/dlq/replay"),
        json!({"sequences": [sequence.parse::<u64>().expect("number")]}),
    )
    .await;
    assert_eq!(
        (status, replayed["count"].clone()),
        (200, json!(1)),
        "{replayed}"
    );
    account
        .within("the admin replay's dead letter", || {
            std::future::ready(count(&seen, dead_letter) >= 3)
        })
        .await;
    let newest = listed["dead_letters"]
        .as_array()
        .and_then(|all| all.iter().filter_map(|d| d["sequence"].as_u64()).max())
        .expect("a sequence");
    let (status, purged) = post(
        url_of("conch", "/admin/dlq/purge"),
        json!({"sequences": [newest], "confirm": true}),
    )
    .await;
    assert_eq!(
        (status, purged["count"].clone()),
        (200, json!(1)),
        "{purged}"
    );
    for action in ["pause", "resume"] {
        let (status, done) = post(url_of("winnower", &format!("/admin/{action}")), json!({})).await;
        assert_eq!(
            (status, done["applied"].clone()),
            (200, json!(true)),
            "{action}: {done}"
        );
    }

    // The operator purges the first, and puts every stream to another
    // max_age (updates the rooms may not make).
    account
        .operator(&["dlq", "purge", &sequence, "--yes"])
        .await;
    let ensured = account
        .operator_with(
            &[("CHOCO_STREAMS__MAX_AGE", "100d")],
            &["streams", "ensure"],
        )
        .await;
    assert!(!ensured.contains("error"), "{ensured}");
    assert!(ensured.contains("updated"), "{ensured}");

    // NATS restarts: the rooms reconnect, recreate the consumers they read
    // the control bucket with, and go on: the conch pauses and resumes, and
    // handles an input.
    account
        .server
        .restart()
        .await
        .expect("nats-server restarts");
    account
        .within("the rooms reconnected", || {
            std::future::ready(!factory.logs_containing("reconnected to NATS").is_empty())
        })
        .await;
    all_ready(&account, &http, "every room ready after the restart").await;
    account.operator(&["room", "pause", "conch"]).await;
    account
        .within("the conch paused after the restart", || async {
            !ready(http["conch"]).await
        })
        .await;
    account.operator(&["room", "resume", "conch"]).await;
    account
        .within("the conch resumed after the restart", || {
            ready(http["conch"])
        })
        .await;
    let again = envelope(
        "coordination.property_sync.requested",
        "doc-again",
        &(conch.payload)("doc-again"),
    );
    publish(
        &js,
        "choco.events.coordination.property_sync.requested",
        &again,
    )
    .await;
    account
        .within("the conch's output after the restart", || {
            std::future::ready(
                count(&seen, "choco.events.coordination.property_sync.completed") >= 2,
            )
        })
        .await;

    // Replies only under each user's own prefix.
    for connection in account.connections().await {
        let name = connection["name"].as_str().unwrap_or_default();
        let inboxes: Vec<&str> = connection["subscriptions_list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|s| s.starts_with("_INBOX"))
            .collect();
        let prefix = if name == "choco-factory" || name.starts_with("choco-factory:") {
            ROOMS_INBOX
        } else {
            OPERATOR_INBOX
        };
        assert!(
            inboxes.iter().all(|s| s.starts_with(&format!("{prefix}."))),
            "{name}: {inboxes:?}"
        );
    }

    let violations = account.violations();
    assert!(
        violations.is_empty(),
        "nats-server logged permission violations:\n{}",
        violations.join("\n")
    );
    for needle in ["Permissions Violation", "permissions violation"] {
        let logged = factory.logs_containing(needle);
        assert!(logged.is_empty(), "{logged:?}");
    }
    eprintln!("done after {:?}", started.elapsed());
}

/// The account grants no more than that: the operator cannot take a room's
/// messages, write dead letters or delete streams, the rooms cannot read
/// events off a subject or delete what they keep, neither can read the
/// other's replies, and a client without the inbox prefix gets no replies.
#[tokio::test]
async fn the_shipped_account_refuses_what_neither_user_needs() {
    let account = AccountServer::start().await;
    let operator = account
        .client(OPERATOR_USER, OPERATOR_PASSWORD, OPERATOR_INBOX)
        .await;
    let rooms = account
        .client(ROOMS_USER, ROOMS_PASSWORD, ROOMS_INBOX)
        .await;
    let default_inbox = async_nats::ConnectOptions::new()
        .user_and_password(ROOMS_USER.into(), ROOMS_PASSWORD.into())
        .connect(account.url())
        .await
        .expect("rooms' user without the inbox prefix");
    // ("pub" or "sub", subject)
    let operator_refused = [
        (
            "pub",
            "$JS.API.CONSUMER.MSG.NEXT.choco:events:coordination.choco-conch",
        ),
        (
            "pub",
            "$JS.ACK.choco:events:coordination.choco-conch.1.1.1.1.0",
        ),
        (
            "pub",
            "choco.dlq.conch.coordination.property_sync.requested",
        ),
        ("pub", "$JS.API.STREAM.DELETE.choco:events:coordination"),
        ("pub", "$KV.choco_conch_documents.doc-1"),
        ("sub", "_INBOX_choco.>"),
        ("sub", "choco.events.>"),
    ];
    let rooms_refused = [
        ("sub", "choco.events.coordination.>"),
        ("sub", "_INBOX_choco_operator.>"),
        ("pub", "choco.events.vault.document_saved"),
        ("pub", "$JS.API.STREAM.PURGE.choco:dlq"),
        (
            "pub",
            "$JS.API.CONSUMER.DELETE.choco:events:coordination.choco-conch",
        ),
        ("pub", "_INBOX.somebody-else"),
    ];
    let default_refused = [("sub", "_INBOX.>")];
    let refused = [
        (&operator, OPERATOR_USER, &operator_refused[..]),
        (&rooms, ROOMS_USER, &rooms_refused[..]),
        (&default_inbox, ROOMS_USER, &default_refused[..]),
    ];
    let mut kept = Vec::new();
    for (client, _, attempts) in refused {
        for &(kind, subject) in attempts {
            if kind == "pub" {
                client
                    .publish(subject.to_string(), "".into())
                    .await
                    .expect("publish");
            } else {
                kept.push(
                    client
                        .subscribe(subject.to_string())
                        .await
                        .expect("subscribe"),
                );
            }
        }
        client.flush().await.expect("flush");
    }
    for (_, user, attempts) in refused {
        for &(kind, subject) in attempts {
            let violation = match kind {
                "pub" => "Publish Violation",
                _ => "Subscription Violation",
            };
            account
                .within(&format!("{user} refused {kind} {subject}"), || {
                    let found = account.violations().iter().any(|line| {
                        line.contains(&format!("/user:{user}\""))
                            && line.contains(violation)
                            && line.contains(&format!("Subject \"{subject}\""))
                    });
                    std::future::ready(found)
                })
                .await;
        }
    }
}
