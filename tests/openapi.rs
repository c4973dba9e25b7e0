//! The OpenAPI descriptions under docs/openapi/ (what scripts/api-fuzz.sh
//! fuzzes) describe exactly the HTTP routes the code serves: every route
//! registered with `.route(...)` in a room's api.rs or in the core's
//! serve/mod.rs is in its spec with the same methods, and nothing else is.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// `(path, method)` of every `.route("<path>", <method>(..).<method>(..))`
/// call in `source`, on one line or spread over several as rustfmt writes
/// long ones, with axum's `{*rest}` written as OpenAPI's `{rest}`.
fn routes_in_source(source: &str, skip: &[&str]) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let Some(quoted) = rest.trim_start().strip_prefix('"') else {
            continue;
        };
        let (path, after) = quoted.split_once('"').expect("a quoted path");
        // The handlers: up to the parenthesis that closes `.route(`.
        let mut depth = 1;
        let end = after
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map_or(after.len(), |(i, _)| i);
        let handlers = &after[..end];
        if skip.contains(&path) {
            continue;
        }
        let path = path.replace("{*", "{");
        let mut found = false;
        for method in METHODS {
            let called = format!("{method}(");
            let mut search = handlers;
            while let Some(at) = search.find(&called) {
                let before = search[..at].chars().last();
                if before.is_none_or(|c| !c.is_alphanumeric() && c != '_') {
                    routes.insert((path.clone(), method.to_string()));
                    found = true;
                }
                search = &search[at + called.len()..];
            }
        }
        assert!(found, "no method found on the route {path:?}");
    }
    routes
}

fn routes_in_spec(file: &str) -> BTreeSet<(String, String)> {
    let path = format!("{}/docs/openapi/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("the spec exists");
    let spec: Value = serde_yaml_ng::from_str(&text).expect("the spec is YAML");
    assert_eq!(
        spec["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true),
        "{file}: OpenAPI 3"
    );
    let paths = spec["paths"].as_mapping().expect("paths");
    let mut routes = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().expect("a path");
        for (method, operation) in item.as_mapping().expect("path item") {
            let method = method.as_str().expect("a method");
            if METHODS.contains(&method) {
                assert!(
                    operation["responses"]
                        .as_mapping()
                        .is_some_and(|r| !r.is_empty()),
                    "{file}: {method} {path} documents its responses"
                );
                routes.insert((path.to_string(), method.to_string()));
            }
        }
    }
    routes
}

fn source(file: &str) -> String {
    std::fs::read_to_string(format!("{}/src/{file}", env!("CARGO_MANIFEST_DIR")))
        .expect("the source exists")
}

#[test]
fn the_core_spec_describes_the_core_routes() {
    // /metrics and /archive/readyz are served on the metrics port, not the
    // room's HTTP port; the operator routes are merged in from admin.rs.
    let mut code = routes_in_source(
        &source("cocoa_butter/serve/mod.rs"),
        &["/metrics", "/archive/readyz"],
    );
    code.extend(routes_in_source(
        &source("cocoa_butter/serve/admin.rs"),
        &[],
    ));
    assert!(code.len() >= 11, "{code:?}");
    assert_eq!(routes_in_spec("core.yaml"), code);
}

#[test]
fn each_room_spec_describes_the_rooms_routes() {
    for room in ["conch", "winnower", "mould", "wrapper"] {
        let code = routes_in_source(&source(&format!("rooms/{room}/api.rs")), &[]);
        assert!(!code.is_empty(), "{room}");
        assert_eq!(routes_in_spec(&format!("{room}.yaml")), code, "{room}");
    }
}
