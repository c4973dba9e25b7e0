//! The event contracts as producers and consumers outside the Rust code
//! see them: the checked-in catalogue under `contracts/` is what the code
//! generates; the AsyncAPI document passes the AsyncAPI project's own
//! parser; examples made from every input schema are accepted by the rooms'
//! real decoders, at every major; `events check` names the field and the
//! reason of a bad envelope; and `proto/` keeps the wire of its baseline.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use choco_factory::cocoa_butter::EventEnvelope;
use choco_factory::cocoa_butter::api::snake_case;
use choco_factory::cocoa_butter::consumer::at_current_major;
use choco_factory::cocoa_butter::contract::example::{Fill, example};
use choco_factory::cocoa_butter::contract::wire::Wire;
use choco_factory::cocoa_butter::contract::{Contracts, Direction, version_of};
use choco_factory::cocoa_butter::serve::CHOCO_DESCRIPTOR_SET;
use choco_factory::rooms::REGISTRY;
use common::*;
use serde_json::{Value, json};

const CONTRACTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contracts");

/// Every file under `dir`, by its path relative to it.
fn files_under(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                out.insert(
                    relative,
                    std::fs::read_to_string(&path).expect("a text file"),
                );
            }
        }
    }
    out
}

/// `contracts/` (the wire baseline aside, which only moves on purpose) is
/// exactly what `choco-factory events write` makes from the code.
#[test]
fn the_checked_in_contracts_are_what_the_code_generates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["events", "write", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let mut checked_in = files_under(Path::new(CONTRACTS));
    let mut generated = files_under(dir.path());
    checked_in.remove("proto/wire.json");
    generated.remove("proto/wire.json");
    let fix = "run `cargo run -- events write` and commit contracts/";
    for (path, text) in &generated {
        match checked_in.get(path) {
            None => panic!("contracts/{path} is missing: {fix}"),
            Some(old) => assert!(old == text, "contracts/{path} differs from the code: {fix}"),
        }
    }
    for path in checked_in.keys() {
        assert!(
            generated.contains_key(path),
            "contracts/{path} describes nothing the code has: {fix}"
        );
    }
    // The catalogue says what it must of each event.
    let catalogue: Value = serde_json::from_str(&generated["events.json"]).expect("events.json");
    let requested = catalogue["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["event_type"] == "coordination.property_sync.requested")
        .expect("the conch's input");
    assert_eq!(
        requested["subject"],
        "choco.events.coordination.property_sync.requested"
    );
    assert_eq!(requested["stream"], "choco:events:coordination");
    assert_eq!(requested["room"], "conch");
    assert_eq!(requested["direction"], "input");
    assert_eq!(requested["ordering"], "causally_ordered");
    assert_eq!(requested["current_major"], 2);
    assert_eq!(requested["majors"].as_array().map(Vec::len), Some(2));
}

fn parse_asyncapi(path: &Path) -> (bool, String) {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/node/node_modules");
    assert!(
        modules.join("@asyncapi/parser").is_dir(),
        "@asyncapi/parser is not installed: run scripts/setup.sh (it installs it from npm)"
    );
    let out = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/asyncapi-parse.cjs"))
        .arg(path)
        .env("NODE_PATH", &modules)
        .output()
        .expect("node");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The AsyncAPI document of the four rooms passes the AsyncAPI project's
/// parser with no error and no warning, and one with a dangling reference
/// does not (the parser really checks).
#[test]
fn the_asyncapi_document_passes_the_asyncapi_parser() {
    let document = Path::new(CONTRACTS).join("asyncapi.json");
    let (ok, report) = parse_asyncapi(&document);
    assert!(ok, "{report}");
    assert!(
        !report.contains("\"severity\":0") && !report.contains("\"severity\":1"),
        "{report}"
    );
    let parsed: Value =
        serde_json::from_str(report.lines().last().unwrap_or("{}")).expect("counts");
    assert_eq!(parsed["channels"], 18, "{report}");
    assert_eq!(parsed["operations"], 18, "{report}");

    let mut broken: Value =
        serde_json::from_str(&std::fs::read_to_string(&document).expect("read")).expect("json");
    broken["channels"]
        .as_object_mut()
        .expect("channels")
        .remove("coordination_property_sync_requested");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.json");
    std::fs::write(&path, broken.to_string()).expect("write");
    let (ok, report) = parse_asyncapi(&path);
    assert!(!ok, "a document with a dangling channel passed: {report}");
}

/// `blockId` → `block_id`, over a whole object.
fn snake_keys(value: &Value) -> Value {
    let Some(object) = value.as_object() else {
        return value.clone();
    };
    Value::Object(
        object
            .iter()
            .map(|(key, value)| (snake_case(key), value.clone()))
            .collect(),
    )
}

/// Examples made from each input schema of each major (only what is
/// required, and every property; and with snake_case spellings where the
/// schema allows them) pass the runtime's upcasting and the room's own
/// decoder and rules, as an event on the stream would.
#[test]
fn examples_of_every_input_schema_are_accepted_by_the_real_decoders() {
    let mut checked = 0;
    for spec in REGISTRY {
        let contracts = Contracts::new((spec.contracts)());
        for contract in contracts.iter().filter(|c| c.direction == Direction::Input) {
            for (major, schema) in contract.majors() {
                let schema = serde_json::to_value(schema()).expect("schema");
                let mut examples = vec![
                    example(&schema, Fill::Required),
                    example(&schema, Fill::Every),
                ];
                if schema["allOf"].is_array() {
                    examples.push(snake_keys(&example(&schema, Fill::Required)));
                }
                for payload in examples {
                    let mut envelope =
                        envelope(&format!("any.{}", contract.action), "agg-1", &payload);
                    envelope.schema_version = version_of(major);
                    let current = at_current_major(Some(&contracts), contract.action, envelope)
                        .unwrap_or_else(|err| {
                            panic!("{} v{major} {payload}: {err}", contract.action)
                        });
                    let check = contract.check.expect("an input has a decoder");
                    if let Err(problem) = check(&current.payload) {
                        panic!("{} v{major} {payload}: {problem}", contract.action);
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 16, "only {checked} examples");
}

fn check_file(lines: &[Value]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("events.ndjson");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).expect("write");
    let path = path.to_string_lossy().into_owned();
    cli_status("nats://127.0.0.1:1", &["events", "check", &path])
}

fn as_json(envelope: &EventEnvelope) -> Value {
    serde_json::from_slice(&envelope.encode()).expect("json")
}

/// `events check` validates as the rooms do: good envelopes of either
/// major pass (exit 0); a bad one is named with its field and reason (exit
/// 1); a missing file is a usage error (exit 2).
#[test]
fn events_check_names_the_field_and_the_reason() {
    let sync = |value: Value| {
        json!({"document_id": "doc-1", "property": "title", "value": value,
               "base_revision": 0, "author_id": "ann", "updated_at": "2026-03-01T10:00:00Z"})
    };
    let at = |major: &str, payload: Value| {
        let mut e = envelope("coordination.property_sync.requested", "doc-1", &payload);
        e.schema_version = major.into();
        as_json(&e)
    };
    let good = vec![
        at("1.0.0", sync(json!("Fudge"))),
        at("2.1.0", sync(json!({"type": "string", "value": "Fudge"}))),
        as_json(&envelope(
            "hydration.requested",
            "doc-2",
            &json!({"document_id": "doc-2", "source": "# {{ title }}", "format": "markdown"}),
        )),
    ];
    let (code, out, err) = check_file(&good);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains(": ok ")).count(),
        3,
        "{out}"
    );

    let mut tampered = at("1.0.0", sync(json!("x")));
    tampered["content_hash"] = json!("00".repeat(32));
    let bad = vec![
        good[0].clone(),
        at("2.0.0", sync(json!({"type": "number", "value": "three"}))),
        at("3.0.0", sync(json!({"type": "string", "value": "x"}))),
        at(
            "1.0.0",
            json!({"document_id": "doc-1", "property": "title"}),
        ),
        tampered,
        as_json(&envelope("coordination.nothing.happened", "d", &json!({}))),
    ];
    let (code, out, err) = check_file(&bad);
    assert_eq!(code, Some(1), "{out}{err}");
    let line = |n: usize| {
        out.lines()
            .find(|l| l.contains(&format!(".ndjson:{n}:")))
            .unwrap_or_else(|| panic!("line {n} in {out}"))
            .to_string()
    };
    assert!(line(1).contains(": ok "), "{out}");
    assert!(line(2).contains("payload_invalid: value.type"), "{out}");
    assert!(line(3).contains("unsupported_schema_version"), "{out}");
    assert!(
        line(4).contains("payload_invalid") && line(4).contains("base_revision"),
        "{out}"
    );
    assert!(line(5).contains("content_hash_mismatch"), "{out}");
    assert!(line(6).contains("unknown_event_type"), "{out}");
    assert!(err.contains("5 of 6 envelope(s) invalid"), "{err}");

    let (code, _, err) = cli_status("nats://127.0.0.1:1", &["events", "check", "/no/such/file"]);
    assert_eq!(code, Some(2), "{err}");
}

/// `proto/` keeps the wire of its checked-in baseline: no field removed
/// without reserving its number, renumbered or retyped, no method removed.
/// A baseline holding a field the protos no longer have shows the check
/// bites on the real descriptors.
#[test]
fn the_protos_keep_the_wire_of_their_baseline() {
    let baseline: Wire = serde_json::from_str(
        &std::fs::read_to_string(Path::new(CONTRACTS).join("proto/wire.json"))
            .expect("contracts/proto/wire.json"),
    )
    .expect("a wire baseline");
    let current = Wire::of(CHOCO_DESCRIPTOR_SET).expect("descriptors");
    let breaks = current.breaks(&baseline);
    assert!(
        breaks.is_empty(),
        "wire-breaking changes under proto/ (docs/OPERATIONS.md, \"Changing an event\"): {breaks:#?}"
    );

    let mut stale = baseline.clone();
    let request = stale
        .messages
        .get_mut("choco.factory.conch.v1.SyncPropertyRequest")
        .expect("the conch's sync request");
    let mut gone = request.fields.values().next().expect("a field").clone();
    gone.name = "retired_field".into();
    request.fields.insert(99, gone);
    let breaks = current.breaks(&stale);
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    assert!(
        breaks[0].contains("field 99 (retired_field) was removed"),
        "{breaks:?}"
    );
}
