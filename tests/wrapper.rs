//! the-wrapper end to end: tags, links, the index, the APIs, restarts.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use choco_factory::rooms::wrapper::pb;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const RESOLUTION: &str = "choco:events:resolution";
const REQUESTED_R: &str = "choco.events.resolution.requested";
const INDEXED: &str = "choco.events.resolution.document_indexed";
const TAG_REGISTERED: &str = "choco.events.resolution.tag_registered";
const TAG_RESOLVED: &str = "choco.events.resolution.tag_resolved";
const LINK_VERIFIED: &str = "choco.events.resolution.cross_repo_link_verified";
const COMPLETED_R: &str = "choco.events.resolution.completed";

async fn start(nats: &Nats) -> Factory {
    let mut env = room_env(&nats.url(), "WRAPPER");
    env.push((
        "CHOCO_ROOMS__WRAPPER__SETTINGS__KNOWN_REPOS".into(),
        "[\"choco-edge\"]".into(),
    ));
    let factory = Factory::start_room(env, &["serve", "--rooms", "wrapper"], "Wrapping Room").await;
    factory.wait_ready().await;
    factory
}

async fn send(
    js: &async_nats::jetstream::Context,
    subject: &str,
    event_type: &str,
    aggregate: &str,
    payload: Value,
) {
    publish(js, subject, &envelope(event_type, aggregate, &payload)).await;
}

async fn index(js: &async_nats::jetstream::Context, repo: &str, path: &str, anchors: &[&str]) {
    send(
        js,
        INDEXED,
        "resolution.document_indexed",
        &format!("{repo}/{path}"),
        json!({"repo": repo, "path": path, "anchors": anchors, "tags": []}),
    )
    .await;
}

/// The outputs for one document, once its summary is there.
async fn outputs_for(
    js: &async_nats::jetstream::Context,
    doc: &str,
    summaries: usize,
) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let of_doc = |messages: Vec<Stored>| -> Vec<Value> {
        messages
            .into_iter()
            .map(|m| m.payload())
            .filter(|p| p["document_id"] == doc)
            .collect()
    };
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let completed = of_doc(read_all(js, RESOLUTION, COMPLETED_R).await);
        if completed.len() >= summaries {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return (
                of_doc(read_all(js, RESOLUTION, TAG_RESOLVED).await),
                of_doc(read_all(js, RESOLUTION, LINK_VERIFIED).await),
                of_doc(read_all(js, RESOLUTION, COMPLETED_R).await),
            );
        }
        assert!(std::time::Instant::now() < deadline, "no summary for {doc}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks for the resolution of the launch notes (CONTENT).
async fn request_launch(js: &async_nats::jetstream::Context) {
    let payload = json!({"document_id": "doc-launch", "repo": "choco-hq",
                         "path": "docs/notes/launch.md", "content": CONTENT});
    send(
        js,
        REQUESTED_R,
        "resolution.requested",
        "doc-launch",
        payload,
    )
    .await;
}

const CONTENT: &str = "# Launch notes\n\nShipping the #Golden_Ticket flow with the #fudge-room team; see #goldn-ticket too.\n\n\
`#in-code` is not a tag.\n\n```\n#not-a-tag\n```\n\n\
- [setup](repo://choco-vault/docs/setup.md#install)\n\
- [[choco-sync:docs/api.md#authentication]]\n\
- [guide](../guide.md#getting-started)\n\
- [missing](repo://choco-vault/docs/setpu.md)\n\
- [anchor](repo://choco-vault/docs/setup.md#instal)\n\
- [repo](repo://choco-vualt/docs/setup.md)\n\
- [edge](repo://choco-edge/README.md)\n\
- [web](https://example.com/page#section)\n";

#[tokio::test]
async fn tags_and_links_resolve_against_the_index() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = start(&nats).await;
    index(
        &js,
        "choco-vault",
        "docs/setup.md",
        &["Install", "configure"],
    )
    .await;
    index(&js, "choco-sync", "docs/api.md", &["authentication"]).await;
    index(&js, "choco-hq", "docs/guide.md", &["getting-started"]).await;
    // Index events are handled in order per document; wait until they are in.
    let index_url = factory.url("/v1/resolve");
    wait_until(WAIT, || async {
        let body = json!({"document_id": "probe", "repo": "choco-hq", "path": "docs/x.md",
                          "content": "[g](guide.md) [s](repo://choco-sync/docs/api.md) [v](repo://choco-vault/docs/setup.md)"});
        let response = reqwest::Client::new().post(&index_url).body(body.to_string()).send().await.expect("post");
        let resolution: Value = response.json().await.expect("json");
        resolution["broken"] == 0
    })
    .await;

    request_launch(&js).await;
    let (tags, links, summary) = outputs_for(&js, "doc-launch", 1).await;

    let by_tag: HashMap<String, &Value> = tags
        .iter()
        .map(|t| (t["tag"].as_str().expect("tag").to_string(), t))
        .collect();
    assert_eq!(by_tag.len(), 3, "code is not prose: {tags:?}");
    assert_eq!(by_tag["Golden_Ticket"]["status"], "resolved");
    assert_eq!(by_tag["Golden_Ticket"]["canonical"], "golden-ticket");
    assert_eq!(
        by_tag["fudge-room"]["canonical"], "fudge",
        "an alias resolves to its tag"
    );
    assert_eq!(by_tag["goldn-ticket"]["status"], "unknown");
    assert_eq!(by_tag["goldn-ticket"]["suggestion"], "golden-ticket");

    let by_link: HashMap<String, &Value> = links
        .iter()
        .map(|l| (l["link"].as_str().expect("link").to_string(), l))
        .collect();
    let status = |link: &str| {
        by_link[link]["status"]
            .as_str()
            .expect("status")
            .to_string()
    };
    assert_eq!(status("repo://choco-vault/docs/setup.md#install"), "ok");
    assert_eq!(status("choco-sync:docs/api.md#authentication"), "ok");
    assert_eq!(status("../guide.md#getting-started"), "ok");
    assert_eq!(
        by_link["../guide.md#getting-started"]["path"],
        "docs/guide.md"
    );
    assert_eq!(status("repo://choco-vault/docs/setpu.md"), "missing_path");
    assert_eq!(
        by_link["repo://choco-vault/docs/setpu.md"]["suggestion"],
        "docs/setup.md"
    );
    assert_eq!(
        status("repo://choco-vault/docs/setup.md#instal"),
        "missing_anchor"
    );
    assert_eq!(
        by_link["repo://choco-vault/docs/setup.md#instal"]["suggestion"],
        "install"
    );
    assert_eq!(status("repo://choco-vualt/docs/setup.md"), "unknown_repo");
    assert_eq!(
        by_link["repo://choco-vualt/docs/setup.md"]["suggestion"],
        "choco-vault"
    );
    assert_eq!(
        status("repo://choco-edge/README.md"),
        "missing_path",
        "a configured repo is known"
    );
    assert!(
        !by_link.contains_key("https://example.com/page#section"),
        "web links are not checked"
    );

    assert_eq!(
        summary[0],
        json!({"document_id": "doc-launch", "tags": 3, "links": 7, "unresolved": 1, "broken": 4})
    );

    // The same request again publishes nothing new.
    request_launch(&js).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (tags_again, links_again, summary_again) = outputs_for(&js, "doc-launch", 1).await;
    assert_eq!(
        (tags_again.len(), links_again.len(), summary_again.len()),
        (3, 7, 1)
    );

    // An index update changes a later verification.
    index(&js, "choco-vault", "docs/setpu.md", &[]).await;
    send(
        &js,
        TAG_REGISTERED,
        "resolution.tag_registered",
        "goldn",
        json!({"tag": "golden-ticket", "aliases": ["goldn-ticket"]}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    request_launch(&js).await;
    let (tags, links, summary) = outputs_for(&js, "doc-launch", 2).await;
    let latest = summary.last().expect("summary");
    assert_eq!(latest["unresolved"], 0, "{summary:?}");
    assert_eq!(latest["broken"], 3, "{summary:?}");
    assert!(
        links
            .iter()
            .any(|l| l["link"] == "repo://choco-vault/docs/setpu.md" && l["status"] == "ok")
    );
    assert!(
        tags.iter()
            .any(|t| t["tag"] == "goldn-ticket" && t["status"] == "resolved")
    );
}

#[tokio::test]
async fn grpc_and_http_agree_and_the_index_survives_a_restart() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let factory = start(&nats).await;
    let http = reqwest::Client::new();

    // Register through HTTP and gRPC.
    let response = http
        .put(factory.url("/v1/index/choco-vault/docs/setup.md"))
        .body(json!({"anchors": ["Install", "Configure the vault"]}).to_string())
        .send()
        .await
        .expect("put");
    assert_eq!(response.status(), 200);
    let stored: Value = response.json().await.expect("json");
    assert_eq!(
        stored["anchors"],
        json!(["install", "configure-the-vault"]),
        "headings become GitHub slugs"
    );
    let mut grpc = pb::wrapper_client::WrapperClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc");
    grpc.register_tag(pb::Tag {
        tag: "cocoa-nib".into(),
        aliases: vec!["nib".into()],
    })
    .await
    .expect("tag");
    let response = http
        .post(factory.url("/v1/tags"))
        .body(json!({"tag": "tempering", "aliases": ["temper"]}).to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);

    let content = "Made with #nib and #temper, see [install](repo://choco-vault/docs/setup.md#configure-the-vault).";
    let request =
        json!({"document_id": "doc-api", "repo": "choco-hq", "path": "a.md", "content": content});
    let over_http: Value = http
        .post(factory.url("/v1/resolve"))
        .body(request.to_string())
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let over_grpc = grpc
        .resolve(pb::Document {
            document_id: "doc-api".into(),
            repo: "choco-hq".into(),
            path: "a.md".into(),
            content: content.into(),
        })
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(over_http["unresolved"], 0, "{over_http}");
    assert_eq!(over_http["broken"], 0, "{over_http}");
    assert_eq!(over_grpc.unresolved, 0);
    assert_eq!(over_grpc.broken, 0);
    assert_eq!(
        over_grpc
            .tags
            .iter()
            .map(|t| t.canonical.as_str())
            .collect::<Vec<_>>(),
        ["cocoa-nib", "tempering"]
    );
    assert_eq!(over_http["tags"][1]["canonical"], "tempering");

    // The event path says the same.
    send(
        &js,
        REQUESTED_R,
        "resolution.requested",
        "doc-api",
        request.clone(),
    )
    .await;
    let (tags, links, _) = outputs_for(&js, "doc-api", 1).await;
    assert!(tags.iter().all(|t| t["status"] == "resolved"), "{tags:?}");
    assert_eq!(links[0]["status"], "ok");

    // Bad requests name the field.
    let response = http
        .post(factory.url("/v1/resolve"))
        .body(json!({"document_id": "d", "repo": "", "path": "p", "content": ""}).to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.expect("json")["error"]["field"],
        "repo"
    );
    let status = grpc
        .register_tag(pb::Tag {
            tag: "--".into(),
            aliases: vec![],
        })
        .await
        .expect_err("empty");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Restart the binary: the registries are in JetStream, not in memory.
    drop(factory);
    let factory = start(&nats).await;
    let mut grpc = pb::wrapper_client::WrapperClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc");
    let tags = grpc
        .list_tags(pb::ListTagsRequest {})
        .await
        .expect("list")
        .into_inner()
        .tags;
    let names: Vec<&str> = tags.iter().map(|t| t.tag.as_str()).collect();
    assert!(
        names.contains(&"cocoa-nib")
            && names.contains(&"tempering")
            && names.contains(&"golden-ticket"),
        "{names:?}"
    );
    let again: Value = reqwest::Client::new()
        .post(factory.url("/v1/resolve"))
        .body(request.to_string())
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(again["broken"], 0, "the index survived: {again}");
    assert_eq!(again["unresolved"], 0);
}
