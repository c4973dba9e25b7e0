//! A poison corpus against the real binary running all four rooms: every
//! malformed message lands in `choco:dlq` once, with its exact reason, and
//! the valid events published in between all get their outputs.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use base64::Engine;
use choco_factory::cocoa_butter::EventEnvelope;
use common::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// `limits.max_envelope_bytes` for this test: small, so an envelope over it
/// is still far below the NATS server's own `max_payload`.
const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// `rooms.winnower.settings.max_content_bytes` for this test.
const MAX_CONTENT_BYTES: usize = 4096;
/// Valid events per room, interleaved with the poison.
const VALID_PER_ROOM: usize = 125;
/// Generous bound on handling everything (500 valid events plus the corpus).
const BOUND: Duration = Duration::from_secs(90);

struct RoomUnderTest {
    name: &'static str,
    label: &'static str,
    domain: &'static str,
    inputs: &'static [&'static str],
    /// The output each valid event yields exactly one of.
    output: &'static str,
}

const ROOMS: [RoomUnderTest; 4] = [
    RoomUnderTest {
        name: "conch",
        label: "Fudge Room",
        domain: "coordination",
        inputs: &["property_sync.requested"],
        output: "property_sync.completed",
    },
    RoomUnderTest {
        name: "winnower",
        label: "Winnowing Room",
        domain: "refinement",
        inputs: &["smartblock_created", "requested"],
        output: "passed",
    },
    RoomUnderTest {
        name: "mould",
        label: "Moulding Room",
        domain: "hydration",
        inputs: &["requested"],
        output: "completed",
    },
    RoomUnderTest {
        name: "wrapper",
        label: "Wrapping Room",
        domain: "resolution",
        inputs: &["requested", "document_indexed", "tag_registered"],
        output: "completed",
    },
];

impl RoomUnderTest {
    fn stream(&self) -> String {
        format!("choco:events:{}", self.domain)
    }

    fn subject(&self, action: &str) -> String {
        format!("choco.events.{}.{action}", self.domain)
    }

    fn event_type(&self, action: &str) -> String {
        format!("{}.{action}", self.domain)
    }

    /// The `i`-th valid event: (action, aggregate, payload); its output
    /// carries `document_id` = the aggregate.
    fn valid(&self, i: usize) -> (&'static str, String, Value) {
        let doc = format!("valid-{}-{i}", self.name);
        let payload = match self.name {
            "conch" => sync_payload(&doc, "title", json!(i), 0, "ann", "2026-03-01T10:00:00Z"),
            "winnower" => json!({"document_id": doc, "title": "Note",
                                 "content": format!("Tempered the batch {i} at 31 degrees.")}),
            "mould" => json!({"document_id": doc, "source": format!("# Note {i}\n\nPlain text."),
                              "format": "markdown"}),
            // A 10 KiB tag and a link into a 10 KiB repo name: looked up
            // as keys that cannot exist (never sent to NATS), so unknown.
            _ if i == 1 => json!({"document_id": doc, "repo": "choco-edge", "path": "notes/1.md",
                        "content": format!("See #{} and [x](repo://{}/a.md).", "t".repeat(10 * 1024), "r".repeat(10 * 1024))}),
            _ => json!({"document_id": doc, "repo": "choco-edge", "path": format!("notes/{i}.md"),
                        "content": format!("Plain note {i}.")}),
        };
        let action = match self.name {
            "conch" => "property_sync.requested",
            _ => "requested",
        };
        (action, doc, payload)
    }
}

/// One poison message and what must become of it.
struct Poison {
    case: String,
    room: &'static str,
    subject: String,
    /// The event type its subject names: its dead letter's subject ends in it.
    event_type: String,
    body: Vec<u8>,
    reason: &'static str,
    /// Part of the dead letter's detail, where the path taken matters.
    detail: Option<&'static str>,
}

/// `depth` nested JSON arrays.
fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A valid envelope's JSON with `edit` applied.
fn edited(
    envelope: &EventEnvelope,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Vec<u8> {
    let mut json: Value = serde_json::from_slice(&envelope.encode()).expect("json");
    if let Some(object) = json.as_object_mut() {
        edit(object);
    }
    serde_json::to_vec(&json).expect("json")
}

/// A valid envelope's bytes with `extra` spliced in as one more field.
fn with_raw_field(envelope: &EventEnvelope, extra: &str) -> Vec<u8> {
    let mut body = envelope.encode();
    body.pop(); // the closing brace
    body.extend_from_slice(format!(",{extra}}}").as_bytes());
    body
}

/// An envelope whose payload is exactly these bytes (hash and all valid).
fn with_payload_bytes(event_type: &str, aggregate: &str, payload: Vec<u8>) -> EventEnvelope {
    let mut envelope = envelope(event_type, aggregate, &json!({}));
    envelope.content_hash = choco_factory::cocoa_butter::envelope::content_hash(&payload);
    envelope.payload = payload;
    envelope
}

/// What the runtime refuses before a room sees it, for one input subject.
fn envelope_corpus(room: &RoomUnderTest, action: &str) -> Vec<Poison> {
    let event_type = room.event_type(action);
    let aggregate = format!("poison-{}", room.name);
    let good = envelope(&event_type, &aggregate, &json!({"document_id": aggregate}));
    let encoded = good.encode();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut invalid_utf8 = encoded.clone();
    let at = find(&invalid_utf8, aggregate.as_bytes()).expect("aggregate in the body");
    invalid_utf8.splice(at..at + 2, [0xff, 0xfe]);
    let mut nul = encoded.clone();
    nul.insert(encoded.len() / 2, 0);

    let cases: Vec<(&str, Vec<u8>, &'static str)> = vec![
        ("empty body", Vec::new(), "malformed_envelope"),
        (
            "truncated JSON",
            encoded[..encoded.len() / 2].to_vec(),
            "malformed_envelope",
        ),
        (
            "a JSON array, not an object",
            b"[1,2,3]".to_vec(),
            "malformed_envelope",
        ),
        ("JSON null", b"null".to_vec(), "malformed_envelope"),
        (
            "a byte-order mark first",
            [b"\xef\xbb\xbf".as_slice(), &encoded].concat(),
            "malformed_envelope",
        ),
        ("a NUL byte inside", nul, "malformed_envelope"),
        (
            "event_id a number",
            edited(&good, |o| {
                o.insert("event_id".into(), json!(42));
            }),
            "malformed_envelope",
        ),
        (
            "created_at not a time",
            edited(&good, |o| {
                o.insert("created_at".into(), json!("yesterday"));
            }),
            "malformed_envelope",
        ),
        (
            "payload an object, not base64 text",
            edited(&good, |o| {
                o.insert("payload".into(), json!({"a": 1}));
            }),
            "malformed_envelope",
        ),
        (
            "payload invalid base64",
            edited(&good, |o| {
                o.insert("payload".into(), json!("%%% not base64 %%%"));
            }),
            "malformed_envelope",
        ),
        (
            "payload null",
            edited(&good, |o| {
                o.insert("payload".into(), Value::Null);
            }),
            "malformed_envelope",
        ),
        (
            "aggregate_id missing",
            edited(&good, |o| {
                o.remove("aggregate_id");
            }),
            "malformed_envelope",
        ),
        (
            "invalid UTF-8 in a string",
            invalid_utf8,
            "malformed_envelope",
        ),
        (
            "a field twice",
            with_raw_field(&good, r#""event_id":"again""#),
            "malformed_envelope",
        ),
        (
            "10,000 nested arrays",
            nested_arrays(10_000).into_bytes(),
            "malformed_envelope",
        ),
        (
            "10,000 nested objects",
            format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000)).into_bytes(),
            "malformed_envelope",
        ),
        (
            // Unknown fields are tolerated and skipped without recursion,
            // so this envelope is valid: the room then refuses its payload.
            "10,000 nested arrays in an unknown field (tolerated)",
            with_raw_field(&good, &format!(r#""extra":{}"#, nested_arrays(10_000))),
            "payload_invalid",
        ),
        (
            "a wrong content hash",
            edited(&good, |o| {
                o.insert("content_hash".into(), json!("0".repeat(64)));
            }),
            "content_hash_mismatch",
        ),
        (
            "a tampered payload",
            edited(&good, |o| {
                o.insert("payload".into(), json!(b64(br#"{"document_id":"evil"}"#)));
            }),
            "content_hash_mismatch",
        ),
        (
            "a schema version newer than the room reads",
            edited(&good, |o| {
                o.insert("schema_version".into(), json!("99.0.0"));
            }),
            "unsupported_schema_version",
        ),
        (
            "a schema version older than the room reads",
            edited(&good, |o| {
                o.insert("schema_version".into(), json!("0.9.0"));
            }),
            "unsupported_schema_version",
        ),
        (
            "schema version not a number",
            edited(&good, |o| {
                o.insert("schema_version".into(), json!("one"));
            }),
            "unsupported_schema_version",
        ),
        (
            "another room's event type",
            edited(&good, |o| {
                o.insert("event_type".into(), json!("elsewhere.requested"));
            }),
            "event_type_mismatch",
        ),
        (
            "a 32 KiB event_type",
            edited(&good, |o| {
                o.insert("event_type".into(), json!("x".repeat(32 * 1024)));
            }),
            "event_type_mismatch",
        ),
        (
            "payload not JSON",
            with_payload_bytes(&event_type, &aggregate, b"not json".to_vec()).encode(),
            "payload_invalid",
        ),
        (
            "payload invalid UTF-8",
            with_payload_bytes(&event_type, &aggregate, vec![b'"', 0xff, 0xfe, b'"']).encode(),
            "payload_invalid",
        ),
        (
            "payload 10,000 nested arrays",
            with_payload_bytes(&event_type, &aggregate, nested_arrays(10_000).into_bytes())
                .encode(),
            "payload_invalid",
        ),
        (
            "an envelope over max_envelope_bytes",
            envelope(
                &event_type,
                &aggregate,
                &json!({"document_id": aggregate, "padding": "x".repeat(MAX_ENVELOPE_BYTES)}),
            )
            .encode(),
            "envelope_too_large",
        ),
    ];
    cases
        .into_iter()
        .map(|(case, body, reason)| Poison {
            case: format!("{}/{action}: {case}", room.name),
            room: room.name,
            subject: room.subject(action),
            event_type: room.event_type(action),
            body,
            reason,
            detail: None,
        })
        .collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Valid envelopes whose payload the room refuses, with the room's reason.
fn payload_corpus(room: &RoomUnderTest) -> Vec<Poison> {
    let long = "x".repeat(600);
    let sync = |edit: &dyn Fn(&mut Value)| {
        let mut payload = sync_payload(
            "valid-conch-7",
            "title",
            json!(1),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        );
        edit(&mut payload);
        payload
    };
    let block = |edit: &dyn Fn(&mut Value)| {
        let mut payload = json!({"blockId": "blk-poison", "commandSlug": "invention", "schemaVersion": 1,
                                 "documentId": "doc-7", "authorId": "ann"});
        edit(&mut payload);
        payload
    };
    // (action, aggregate, payload, reason): aggregates shared with valid
    // events, so a refused payload is seen not to hold up its aggregate.
    let cases: Vec<(&str, &str, &str, Value, &'static str)> = match room.name {
        "conch" => vec![
            (
                "property missing",
                "property_sync.requested",
                "valid-conch-7",
                sync(&|p| {
                    p.as_object_mut().map(|o| o.remove("property"));
                }),
                "payload_invalid",
            ),
            (
                "base_revision a string",
                "property_sync.requested",
                "valid-conch-7",
                sync(&|p| p["base_revision"] = json!("one")),
                "payload_invalid",
            ),
            (
                "base_revision negative",
                "property_sync.requested",
                "valid-conch-7",
                sync(&|p| p["base_revision"] = json!(-1)),
                "payload_invalid",
            ),
            (
                "a 600-byte property name",
                "property_sync.requested",
                "valid-conch-7",
                sync(&|p| p["property"] = json!(long)),
                "payload_invalid",
            ),
            (
                "document_id not the aggregate",
                "property_sync.requested",
                "valid-conch-8",
                sync(&|_| {}),
                "payload_invalid",
            ),
            (
                "payload an array",
                "property_sync.requested",
                "valid-conch-7",
                json!([1, 2]),
                "payload_invalid",
            ),
        ],
        "winnower" => vec![
            (
                "content over max_content_bytes",
                "requested",
                "valid-winnower-7",
                json!({"document_id": "valid-winnower-7", "content": "a".repeat(MAX_CONTENT_BYTES + 1)}),
                "content_too_large",
            ),
            (
                "content a number",
                "requested",
                "valid-winnower-7",
                json!({"document_id": "valid-winnower-7", "content": 5}),
                "payload_invalid",
            ),
            (
                "content_type unsupported",
                "requested",
                "valid-winnower-7",
                json!({"document_id": "valid-winnower-7", "content": "x", "content_type": "image/png"}),
                "payload_invalid",
            ),
            (
                "document_id blank",
                "requested",
                "valid-winnower-7",
                json!({"document_id": "  ", "content": "x"}),
                "payload_invalid",
            ),
            (
                "blockId missing",
                "smartblock_created",
                "blk-poison",
                block(&|p| {
                    p.as_object_mut().map(|o| o.remove("blockId"));
                }),
                "payload_invalid",
            ),
            (
                "schemaVersion negative",
                "smartblock_created",
                "blk-poison",
                block(&|p| p["schemaVersion"] = json!(-1)),
                "payload_invalid",
            ),
            (
                "a 10 KiB blockId (a key: refused, not sent to NATS)",
                "smartblock_created",
                "blk-long",
                block(&|p| p["blockId"] = json!("b".repeat(10 * 1024))),
                "payload_invalid",
            ),
            (
                "an unknown command slug",
                "smartblock_created",
                "blk-poison",
                block(&|p| p["commandSlug"] = json!("nope")),
                "unknown_command_slug",
            ),
            (
                "a schema version from the future",
                "smartblock_created",
                "blk-poison",
                block(&|p| p["schemaVersion"] = json!(9)),
                "schema_version_too_new",
            ),
        ],
        "mould" => vec![
            (
                "a 10 KiB document_id (an object name)",
                "requested",
                "valid-mould-7",
                json!({"document_id": "m".repeat(10 * 1024), "source": "x", "format": "html"}),
                "payload_invalid",
            ),
            (
                "format unsupported",
                "requested",
                "valid-mould-7",
                json!({"document_id": "valid-mould-7", "source": "x", "format": "pdf"}),
                "payload_invalid",
            ),
            (
                "data an array",
                "requested",
                "valid-mould-7",
                json!({"document_id": "valid-mould-7", "source": "x", "format": "html", "data": []}),
                "payload_invalid",
            ),
            (
                "source missing",
                "requested",
                "valid-mould-7",
                json!({"document_id": "valid-mould-7", "format": "html"}),
                "payload_invalid",
            ),
            (
                "document_id blank",
                "requested",
                "valid-mould-7",
                json!({"document_id": "", "source": "x", "format": "html"}),
                "payload_invalid",
            ),
        ],
        _ => vec![
            (
                "repo blank",
                "requested",
                "valid-wrapper-7",
                json!({"document_id": "valid-wrapper-7", "repo": " ", "path": "a.md", "content": "x"}),
                "payload_invalid",
            ),
            (
                "content a number",
                "requested",
                "valid-wrapper-7",
                json!({"document_id": "valid-wrapper-7", "repo": "r", "path": "a.md", "content": 7}),
                "payload_invalid",
            ),
            (
                "a 10 KiB repo (a key)",
                "document_indexed",
                "choco-edge/x",
                json!({"repo": "r".repeat(10 * 1024), "path": "x.md"}),
                "payload_invalid",
            ),
            (
                "a 10 KiB alias (a key)",
                "tag_registered",
                "tag-poison",
                json!({"tag": "cocoa", "aliases": ["a".repeat(10 * 1024)]}),
                "payload_invalid",
            ),
            (
                "a 10 KiB document id to resolve",
                "requested",
                "valid-wrapper-7",
                json!({"document_id": "valid-wrapper-7", "repo": "r".repeat(10 * 1024), "path": "a.md", "content": "x"}),
                "payload_invalid",
            ),
            (
                "path blank",
                "document_indexed",
                "choco-edge/x",
                json!({"repo": "choco-edge", "path": ""}),
                "payload_invalid",
            ),
            (
                "anchors not a list",
                "document_indexed",
                "choco-edge/x",
                json!({"repo": "choco-edge", "path": "x.md", "anchors": "a"}),
                "payload_invalid",
            ),
            (
                "tag blank",
                "tag_registered",
                "tag-poison",
                json!({"tag": "  "}),
                "payload_invalid",
            ),
            (
                "an unknown field",
                "tag_registered",
                "tag-poison",
                json!({"tag": "cocoa", "colour": "brown"}),
                "payload_invalid",
            ),
        ],
    };
    let mut poison: Vec<Poison> = cases
        .into_iter()
        .map(|(case, action, aggregate, payload, reason)| Poison {
            case: format!("{}/{action}: {case}", room.name),
            room: room.name,
            subject: room.subject(action),
            event_type: room.event_type(action),
            body: envelope(&room.event_type(action), aggregate, &payload).encode(),
            reason,
            detail: None,
        })
        .collect();
    // 10,000 nested arrays where the payload takes any JSON value: here
    // serde_json's recursion limit (128) is what refuses it.
    let deep = nested_arrays(10_000);
    let (action, aggregate, payload) = match room.name {
        "conch" => (
            "property_sync.requested",
            "valid-conch-7",
            format!(
                r#"{{"document_id":"valid-conch-7","property":"deep","value":{deep},"base_revision":0,"author_id":"ann","updated_at":"2026-03-01T10:00:00Z"}}"#
            ),
        ),
        "winnower" => (
            "smartblock_created",
            "blk-poison",
            format!(
                r#"{{"blockId":"blk-poison","commandSlug":"invention","schemaVersion":1,"documentId":"d","authorId":"ann","semanticLayers":{deep}}}"#
            ),
        ),
        "mould" => (
            "requested",
            "valid-mould-7",
            format!(
                r#"{{"document_id":"valid-mould-7","source":"x","format":"html","data":{{"deep":{deep}}}}}"#
            ),
        ),
        _ => (
            "requested",
            "valid-wrapper-7",
            format!(
                r#"{{"document_id":"valid-wrapper-7","repo":"r","path":"a.md","content":{deep}}}"#
            ),
        ),
    };
    poison.push(Poison {
        case: format!(
            "{}/{action}: 10,000 nested arrays in a payload field",
            room.name
        ),
        room: room.name,
        subject: room.subject(action),
        event_type: room.event_type(action),
        body: with_payload_bytes(&room.event_type(action), aggregate, payload.into_bytes())
            .encode(),
        reason: "payload_invalid",
        // A string field refuses the array at once; an any-JSON field
        // descends until the limit.
        detail: Some(if room.name == "wrapper" {
            "invalid type: sequence"
        } else {
            "recursion limit exceeded"
        }),
    });
    poison
}

/// Not an input of the room: refused before the body is even read.
fn unknown_type_corpus(room: &RoomUnderTest) -> Vec<Poison> {
    let valid = envelope(&room.event_type("bogus_action"), "poison", &json!({}));
    [
        ("an unknown event type", valid.encode()),
        (
            "an unknown event type with a garbage body",
            b"\x00\xff garbage".to_vec(),
        ),
    ]
    .into_iter()
    .map(|(case, body)| Poison {
        case: format!("{}/bogus_action: {case}", room.name),
        room: room.name,
        subject: room.subject("bogus_action"),
        event_type: room.event_type("bogus_action"),
        body,
        reason: "unknown_event_type",
        detail: None,
    })
    .collect()
}

/// Publishes with a fresh message id; returns where the stream stored it.
async fn publish_at(js: &jetstream::Context, subject: &str, body: Vec<u8>) -> (String, u64) {
    let message = jetstream::message::PublishMessage::build()
        .payload(body.into())
        .message_id(uuid::Uuid::now_v7().to_string());
    let ack = js
        .send_publish(subject.to_string(), message)
        .await
        .expect("publish")
        .await
        .expect("stored");
    (ack.stream, ack.sequence)
}

/// The HTTP address a room logged when it started listening.
fn http_addr(factory: &Factory, label: &str) -> Option<SocketAddr> {
    factory.logs.lock().expect("logs").iter().find_map(|line| {
        let json: Value = serde_json::from_str(line).ok()?;
        (json["message"] == "room listening" && json["factory.room"] == label)
            .then(|| json["http"].as_str()?.parse().ok())
            .flatten()
    })
}

async fn all_ready(addrs: &[SocketAddr]) -> bool {
    for addr in addrs {
        let ok = reqwest::get(format!("http://{addr}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200);
        if !ok {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn a_poison_corpus_is_dead_lettered_with_reasons_while_valid_events_flow() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let mut env: Vec<(String, String)> = ROOMS
        .iter()
        .flat_map(|room| room_env(&nats.url(), &room.name.to_uppercase()))
        .collect();
    env.push((
        "CHOCO_LIMITS__MAX_ENVELOPE_BYTES".into(),
        MAX_ENVELOPE_BYTES.to_string(),
    ));
    env.push((
        "CHOCO_ROOMS__WINNOWER__SETTINGS__MAX_CONTENT_BYTES".into(),
        MAX_CONTENT_BYTES.to_string(),
    ));
    let mut factory = Factory::start_room(env, &["serve"], "Wrapping Room").await;
    let mut addrs = Vec::new();
    for room in &ROOMS {
        let mut addr = None;
        wait_until(Duration::from_secs(20), || {
            addr = http_addr(&factory, room.label);
            std::future::ready(addr.is_some())
        })
        .await;
        addrs.extend(addr);
    }
    wait_until(Duration::from_secs(20), || all_ready(&addrs)).await;

    // Readiness of every room, watched for the whole test: a poison message
    // that takes the NATS connection down shows here first.
    let not_ready = Arc::new(AtomicUsize::new(0));
    let watching = CancellationToken::new();
    let watcher = tokio::spawn({
        let (not_ready, watching, addrs) = (not_ready.clone(), watching.clone(), addrs.clone());
        async move {
            while !watching.is_cancelled() {
                if !all_ready(&addrs).await {
                    not_ready.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let mut poison: Vec<Poison> = Vec::new();
    for room in &ROOMS {
        for action in room.inputs {
            poison.extend(envelope_corpus(room, action));
        }
        poison.extend(payload_corpus(room));
        poison.extend(unknown_type_corpus(room));
    }
    eprintln!("corpus: {} poison messages", poison.len());

    // Interleave: the rooms' valid events in turn, a poison message after
    // every few of them, the rest of the corpus at the end.
    let started = Instant::now();
    let mut expected: HashMap<(String, u64), &Poison> = HashMap::new();
    let mut corpus = poison.iter();
    let mut valid_docs: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for i in 0..VALID_PER_ROOM {
        for room in &ROOMS {
            let (action, doc, payload) = room.valid(i);
            let mut event = envelope(&room.event_type(action), &doc, &payload);
            if i % 25 == 0 {
                // Valid, yet it must not reach an output's headers as is:
                // a raw CR or LF in a header value panics the NATS client.
                event.correlation_id = format!("corr-{i}\r\nInjected: yes");
            }
            publish_at(&js, &room.subject(action), event.encode()).await;
            valid_docs.entry(room.name).or_default().insert(doc);
        }
        if let Some(bad) = corpus.next() {
            expected.insert(publish_at(&js, &bad.subject, bad.body.clone()).await, bad);
        }
    }
    for bad in corpus {
        expected.insert(publish_at(&js, &bad.subject, bad.body.clone()).await, bad);
    }
    eprintln!(
        "published {} valid events and the corpus in {:?}",
        4 * VALID_PER_ROOM,
        started.elapsed()
    );

    // Every valid event's output, within the bound.
    for room in &ROOMS {
        let wanted = &valid_docs[room.name];
        wait_for(
            &js,
            &room.stream(),
            &room.subject(room.output),
            wanted.len(),
            BOUND,
        )
        .await;
    }
    eprintln!("all valid outputs after {:?}", started.elapsed());

    // Every poison message dead-lettered once, with its reason.
    let letters = wait_for(&js, "choco:dlq", "choco.dlq.>", poison.len(), BOUND).await;
    eprintln!(
        "all {} dead letters after {:?}",
        poison.len(),
        started.elapsed()
    );
    let mut seen: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut wrong: Vec<String> = Vec::new();
    for letter in &letters {
        let stream = letter
            .header("Choco-Dlq-Original-Stream")
            .expect("original stream");
        let sequence: u64 = letter
            .header("Choco-Dlq-Original-Sequence")
            .and_then(|s| s.parse().ok())
            .expect("original sequence");
        let key = (stream, sequence);
        let Some(bad) = expected.get(&key) else {
            wrong.push(format!(
                "a valid event was dead-lettered: {key:?} {:?}",
                letter.header("Choco-Dlq-Detail")
            ));
            continue;
        };
        assert!(seen.insert(key), "{}: dead-lettered twice", bad.case);
        let reason = letter.header("Choco-Dlq-Reason").unwrap_or_default();
        let detail = letter.header("Choco-Dlq-Detail").unwrap_or_default();
        if let Some(part) = bad.detail
            && !detail.contains(part)
        {
            wrong.push(format!("{}: detail {detail:?} lacks {part:?}", bad.case));
        }
        if reason != bad.reason {
            wrong.push(format!(
                "{}: reason {reason:?}, expected {:?} ({})",
                bad.case,
                bad.reason,
                letter.header("Choco-Dlq-Detail").unwrap_or_default()
            ));
        }
        assert_eq!(
            letter.subject,
            format!("choco.dlq.{}.{}", bad.room, bad.event_type),
            "{}",
            bad.case
        );
        assert_eq!(
            letter.header("Choco-Dlq-Room").as_deref(),
            Some(bad.room),
            "{}",
            bad.case
        );
        assert_eq!(
            letter.header("Choco-Dlq-Deliveries").as_deref(),
            Some("1"),
            "{}: no retries",
            bad.case
        );
        assert_eq!(
            letter.body.as_ref(),
            bad.body.as_slice(),
            "{}: the body is kept unchanged",
            bad.case
        );
    }
    assert!(
        wrong.is_empty(),
        "{} of {} wrong:\n{}",
        wrong.len(),
        poison.len(),
        wrong.join("\n")
    );
    assert_eq!(
        seen.len(),
        poison.len(),
        "every poison message dead-lettered"
    );

    // Nothing more arrives: no valid output lost or doubled, no letter doubled.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for room in &ROOMS {
        let outputs = read_all(&js, &room.stream(), &room.subject(room.output)).await;
        let docs: Vec<String> = outputs
            .iter()
            .map(|m| {
                m.payload()["document_id"]
                    .as_str()
                    .expect("document_id")
                    .to_string()
            })
            .collect();
        let unique: BTreeSet<String> = docs.iter().cloned().collect();
        assert_eq!(docs.len(), unique.len(), "{}: an output doubled", room.name);
        assert_eq!(
            &unique, &valid_docs[room.name],
            "{}: one output per valid event",
            room.name
        );
    }
    assert_eq!(
        read_all(&js, "choco:dlq", "choco.dlq.>").await.len(),
        poison.len()
    );
    for room in &ROOMS {
        let stream = js.get_stream(room.stream()).await.expect("stream");
        let durable = format!("choco-{}", room.name);
        wait_until(Duration::from_secs(20), || async {
            let info = stream.consumer_info(&durable).await.expect("consumer");
            info.num_ack_pending == 0 && info.num_pending == 0
        })
        .await;
    }

    // No stack overflow, no crash: the same process, every room ready
    // throughout.
    watching.cancel();
    watcher.await.expect("watcher");
    assert!(
        factory.child.try_wait().expect("status").is_none(),
        "the binary is still running"
    );
    assert_eq!(
        not_ready.load(Ordering::SeqCst),
        0,
        "every room stayed ready"
    );
    assert!(all_ready(&addrs).await, "every room is still ready");
}
