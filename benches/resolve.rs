//! Resolution of a document with 1,000 links and 50 tags: the pure
//! extraction pass, and the whole `resolution.requested` handler against a
//! real nats-server (index look-ups in JetStream key-value buckets).
//!
//! Run: `cargo bench --bench resolve` (needs nats-server on PATH or
//! NATS_SERVER_BIN, as the tests do).

use std::hint::black_box;

use choco_factory::cocoa_butter::config::ConfigSources;
use choco_factory::cocoa_butter::metrics::RoomMetrics;
use choco_factory::cocoa_butter::nats::Publisher;
use choco_factory::cocoa_butter::nats_server::{self, ManagedNats};
use choco_factory::cocoa_butter::{EventEnvelope, InboundEvent, RoomContext};
use choco_factory::rooms::wrapper::{self, extract::extract};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

const REPOS: usize = 20;
const PATHS: usize = 10;

fn document() -> String {
    let mut out = String::from("# A long page\n\n");
    for n in 0..1000 {
        let repo = n % REPOS;
        let path = (n / REPOS) % (PATHS + 2); // some paths are not indexed
        let anchor = if n % 7 == 0 { "missing" } else { "section-1" };
        if n % 3 == 0 {
            out.push_str(&format!("- [[repo-{repo}:docs/page-{path}.md#{anchor}]]\n"));
        } else {
            out.push_str(&format!(
                "- see [link {n}](repo://repo-{repo}/docs/page-{path}.md#{anchor})\n"
            ));
        }
        if n % 20 == 0 {
            out.push_str(&format!(
                "\nTagged #golden-ticket and #topic-{}.\n\n",
                n / 20
            ));
        }
    }
    out
}

fn event(action: &str, aggregate: &str, payload: &Value) -> InboundEvent {
    let envelope = EventEnvelope::new(
        uuid::Uuid::now_v7(),
        format!("resolution.{action}"),
        aggregate.to_string(),
        String::new(),
        serde_json::to_vec(payload).expect("json"),
        "bench".into(),
    );
    InboundEvent {
        subject: format!("choco.events.resolution.{action}"),
        action: action.to_string(),
        envelope,
        stream_sequence: 1,
        delivered: 1,
    }
}

fn resolution(c: &mut Criterion) {
    let content = document();
    c.bench_function("extract_1000_links", |b| {
        b.iter(|| extract(black_box(&content), "choco-hq", "docs/page.md"))
    });

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = nats_server::find_binary().expect("nats-server");
    let server = runtime
        .block_on(ManagedNats::start(binary, dir.path(), 0))
        .expect("nats-server starts");
    let config = ConfigSources::default().load().expect("config");
    let settings = config
        .rooms
        .iter()
        .find(|room| room.name == "wrapper")
        .expect("wrapper room")
        .clone();
    let room = runtime.block_on(async {
        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let metrics = RoomMetrics::new("wrapper", None);
        let room = (wrapper::SPEC.build)(RoomContext {
            publisher: Publisher::new(js.clone(), &settings, metrics.clone()),
            jetstream: js,
            settings,
            metrics,
            store_streams: Default::default(),
        })
        .expect("wrapper builds");
        room.prepare().await.expect("prepare");
        for repo in 0..REPOS {
            for path in 0..PATHS {
                let payload = json!({"repo": format!("repo-{repo}"), "path": format!("docs/page-{path}.md"),
                                     "anchors": ["Section 1", "Section 2"], "tags": []});
                room.handle(&event("document_indexed", "x", &payload)).await.expect("indexed");
            }
        }
        room
    });
    let request = event(
        "requested",
        "doc-1",
        &json!({"document_id": "doc-1", "repo": "choco-hq", "path": "docs/page.md", "content": content}),
    );
    c.bench_function("resolve_1000_links_with_jetstream_index", |b| {
        b.iter(|| {
            runtime
                .block_on(room.handle(black_box(&request)))
                .expect("resolved")
        })
    });
    drop(server);
}

criterion_group!(benches, resolution);
criterion_main!(benches);
