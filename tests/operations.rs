//! The operations kit under `config/`: the Prometheus alerting rules and
//! the Grafana dashboard must parse, and must name only metrics the runtime
//! exports. When promtool is installed (scripts/setup.sh puts it in
//! `.tools/bin`), the rules also pass `promtool check rules` and their unit
//! tests (`promtool test rules`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use choco_factory::cocoa_butter::metrics::{
    ArchiveMetrics, ConnectionMetrics, GrpcLabels, HttpLabels, Outcome, ProcessMetrics,
    RoomMetrics, StoreLabels,
};
use serde::Deserialize;

const RULES: &str = "config/prometheus/choco-factory.rules.yml";
const RULE_TESTS: &str = "config/prometheus/choco-factory.rules.test.yml";
const DASHBOARD: &str = "config/grafana/choco-factory-rooms.json";

/// Every series name the runtime can expose. A family shows only once it
/// has a series, so every kind of observation is made once.
fn exported_series() -> BTreeSet<String> {
    let archive = ArchiveMetrics::default();
    archive.init("coordination");
    let process = ProcessMetrics::new(&ConnectionMetrics::default(), &archive);
    let metrics = RoomMetrics::new("conch", Some(&process));
    metrics.received("x.y");
    metrics.finished("x.y", Outcome::Ok, 0.001);
    metrics.dead_lettered("x.y", "payload_invalid");
    metrics.http_request(
        HttpLabels {
            route: "/r".into(),
            method: "GET".into(),
            status: 200,
        },
        0.001,
    );
    metrics.grpc_request(
        GrpcLabels {
            method: "/s/M".into(),
            code: "OK".into(),
        },
        0.001,
    );
    metrics.published("x.z", true, 0.001);
    metrics.init_stream("choco:events:coordination");
    metrics.store_operation(
        StoreLabels {
            store: "kv",
            bucket: "b".into(),
            operation: "get",
            outcome: "ok",
        },
        0.001,
    );
    let text = metrics.encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("TYPE line");
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// The `choco_*` metric names an expression refers to.
fn referenced(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("choco_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    found
}

fn check_expr(expr: &str, exported: &BTreeSet<String>, context: &str) {
    promql_parser::parser::parse(expr)
        .unwrap_or_else(|err| panic!("{context}: not PromQL: {err}\n{expr}"));
    let names = referenced(expr);
    assert!(
        !names.is_empty() || expr.contains("up{"),
        "{context}: names no choco metric"
    );
    for name in names {
        assert!(
            exported.contains(&name),
            "{context}: {name} is not exported by the runtime (exported: {exported:?})"
        );
    }
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: String,
    labels: std::collections::BTreeMap<String, String>,
    annotations: std::collections::BTreeMap<String, String>,
}

#[test]
fn alert_rules_parse_and_name_only_exported_metrics() {
    let text = std::fs::read_to_string(RULES).expect("rules file");
    let file: RuleFile = serde_yaml_ng::from_str(&text).expect("rules are YAML of the rule format");
    let exported = exported_series();
    let mut alerts = BTreeSet::new();
    for group in &file.groups {
        assert!(!group.name.is_empty());
        for rule in &group.rules {
            assert!(alerts.insert(rule.alert.clone()), "{} twice", rule.alert);
            check_expr(&rule.expr, &exported, &rule.alert);
            humantime::parse_duration(&rule.for_)
                .unwrap_or_else(|err| panic!("{}: for {:?}: {err}", rule.alert, rule.for_));
            let severity = rule.labels.get("severity").map(String::as_str);
            assert!(
                matches!(severity, Some("page" | "warning")),
                "{}: severity {severity:?}",
                rule.alert
            );
            for key in ["summary", "description"] {
                assert!(
                    rule.annotations.get(key).is_some_and(|v| !v.is_empty()),
                    "{}: no {key}",
                    rule.alert
                );
            }
        }
    }
    // The pages the issue of on-call asks for, at least.
    for wanted in [
        "ChocoRoomNotReady",
        "ChocoDeadLettersRising",
        "ChocoConsumerLagGrowing",
        "ChocoProcessingP99High",
    ] {
        assert!(alerts.contains(wanted), "no {wanted} alert");
    }
}

#[test]
fn the_dashboard_queries_parse_and_name_only_exported_metrics() {
    let text = std::fs::read_to_string(DASHBOARD).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let exported = exported_series();
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("untitled");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            // Grafana's variables, as Grafana would fill them in.
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$room", ".*");
            check_expr(&expr, &exported, title);
            queries += 1;
        }
    }
    assert!(queries >= 15, "only {queries} queries");
    let room = &dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .find(|v| v["name"] == "room")
        .expect("a room variable")["query"]["query"];
    assert_eq!(room, "label_values(choco_room_ready, room)");
}

/// promtool from `PROMTOOL_BIN`, `.tools/bin` (scripts/setup.sh) or PATH.
fn promtool() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("PROMTOOL_BIN").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/promtool")),
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("promtool"))
                .find(|p| p.is_file())
        }),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    let Some(promtool) = promtool() else {
        // The parsing test above still holds the rules to the format.
        eprintln!("promtool not installed (scripts/setup.sh installs it); skipping");
        return;
    };
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let output = std::process::Command::new(&promtool)
            .args(args)
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The container's HEALTHCHECK runs a command the binary has.
#[test]
fn the_container_health_check_names_a_real_command() {
    let dockerfile = std::fs::read_to_string("Dockerfile").expect("Dockerfile");
    let check = dockerfile
        .lines()
        .skip_while(|line| !line.starts_with("HEALTHCHECK"))
        .find_map(|line| line.trim().strip_prefix("CMD "))
        .expect("a HEALTHCHECK with CMD");
    let argv: Vec<String> = serde_json::from_str(check).expect("exec form");
    assert_eq!(argv[0], "/usr/local/bin/choco-factory");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_choco-factory"))
        .args(&argv[1..])
        .arg("--help")
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
