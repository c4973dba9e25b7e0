//! The house rules, read from the source (in the manner of rust-analyzer's
//! tidy tests): rooms reach the core only through its room kit, the core
//! never names a room, and the core's parts import each other without a
//! loop. A failure names the file and line of each offending path.
//!
//! A part is a top-level module of `cocoa_butter` (a file, or a folder and
//! everything in it). Paths are read from the code with comments and the
//! trailing `#[cfg(test)]` module removed: test modules may reach wherever
//! they need to.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const CORE: &str = "src/cocoa_butter";
const ROOMS: &str = "src/rooms";

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The code of a file with comments blanked and the test module cut off;
/// line numbers stay those of the file.
fn code_of(path: &Path) -> String {
    code_lines(path)
        .into_iter()
        .map(|(_, line)| line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code of a file as (line number, text) with comments and the test
/// module cut off.
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let mut lines = Vec::new();
    let mut in_tests = false;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            in_tests = true;
        }
        if in_tests {
            continue;
        }
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        lines.push((index + 1, code.to_string()));
    }
    lines
}

/// The module path of a core file below `cocoa_butter`: `nats/provision.rs`
/// is `["nats", "provision"]`, `nats/mod.rs` is `["nats"]`.
fn module_path(file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(CORE).expect("a file of the core");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    parts
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifiers a path names first in `code`: `a` in `a::b`, or each
/// item's first identifier in `{a, b::c}`.
fn named_after(code: &str) -> Vec<String> {
    let leading = |item: &str| -> Option<String> {
        let name: String = item
            .trim_start()
            .chars()
            .take_while(|&c| is_ident_char(c))
            .collect();
        (!name.is_empty()).then_some(name)
    };
    let Some(group) = code.trim_start().strip_prefix('{') else {
        return leading(code).into_iter().collect();
    };
    // The items of the group: split at its own commas, not nested ones.
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (at, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..at]);
                start = group.len();
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    // A group spanning lines: the rest of this line is items too.
    if start < group.len() {
        items.push(&group[start..]);
    }
    items.into_iter().filter_map(leading).collect()
}

/// Every part of the core that `code` (of the file whose module path is
/// `module`) names, with the byte offset where it does; the file's own
/// part is left out.
fn parts_named(module: &[String], code: &str, parts: &BTreeSet<String>) -> Vec<(String, usize)> {
    let own = module.first().cloned().unwrap_or_default();
    let mut named = Vec::new();
    let mut add = |base: &[String], after: &str, at: usize| {
        let targets = match base.first() {
            Some(part) => vec![part.clone()],
            None => named_after(after),
        };
        for part in targets {
            if parts.contains(&part) && part != own {
                named.push((part, at));
            }
        }
    };
    for (at, _) in code.match_indices("cocoa_butter::") {
        if !code[..at].chars().next_back().is_some_and(is_ident_char) {
            add(&[], &code[at + "cocoa_butter::".len()..], at);
        }
    }
    for (at, _) in code.match_indices("super::") {
        let before = &code[..at];
        if before.chars().next_back().is_some_and(is_ident_char) || before.ends_with("super::") {
            continue; // the tail of a longer chain, counted from its start
        }
        let mut after = &code[at + "super::".len()..];
        let mut levels = 1;
        while let Some(rest) = after.strip_prefix("super::") {
            levels += 1;
            after = rest;
        }
        // `super` of a module is its parent; the base is what remains of
        // the module path.
        let keep = module.len().saturating_sub(levels);
        add(&module[..keep], after, at);
    }
    named
}

fn line_of(code: &str, at: usize) -> usize {
    code[..at].matches('\n').count() + 1
}

#[test]
fn the_core_parts_import_each_other_without_a_loop() {
    let files = rust_files(Path::new(CORE));
    let parts: BTreeSet<String> = files
        .iter()
        .filter_map(|file| module_path(file).first().cloned())
        .collect();
    // part → part it imports → where, for the message.
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in &files {
        let module = module_path(file);
        let Some(own) = module.first().cloned() else {
            continue; // cocoa_butter/mod.rs declares the parts
        };
        let code = code_of(file);
        for (target, at) in parts_named(&module, &code, &parts) {
            let line = line_of(&code, at);
            edges
                .entry(own.clone())
                .or_default()
                .entry(target)
                .or_insert_with(|| format!("{}:{line}", file.display()));
        }
    }
    // A depth-first search that reports the first loop it finds.
    fn visit(
        part: &str,
        edges: &BTreeMap<String, BTreeMap<String, String>>,
        trail: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = trail.iter().position(|p| p == part) {
            let mut cycle = trail[start..].to_vec();
            cycle.push(part.to_string());
            return Some(cycle);
        }
        if done.contains(part) {
            return None;
        }
        trail.push(part.to_string());
        for next in edges
            .get(part)
            .into_iter()
            .flat_map(|targets| targets.keys())
        {
            if let Some(cycle) = visit(next, edges, trail, done) {
                return Some(cycle);
            }
        }
        trail.pop();
        done.insert(part.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for part in &parts {
        if let Some(cycle) = visit(part, &edges, &mut Vec::new(), &mut done) {
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|pair| {
                    format!(
                        "  {} -> {} ({})",
                        pair[0], pair[1], edges[&pair[0]][&pair[1]]
                    )
                })
                .collect();
            panic!(
                "the core's parts import each other in a loop:\n{}\n\
                 move what both need into the lower part (docs/ARCHITECTURE.md, \"Layers\")",
                steps.join("\n")
            );
        }
    }
    // The lowest parts stay at the bottom: what they import is fixed here.
    for (part, allowed) in [
        ("api", &[][..]),
        ("envelope", &[][..]),
        ("keys", &[][..]),
        ("streams", &[][..]),
        ("tls", &[][..]),
        ("telemetry", &[][..]),
    ] {
        let imports: Vec<&String> = edges
            .get(part)
            .into_iter()
            .flat_map(|targets| targets.keys())
            .filter(|target| !allowed.contains(&target.as_str()))
            .collect();
        assert!(
            imports.is_empty(),
            "{part} is a bottom part of the core but imports {imports:?} ({:?})",
            edges.get(part)
        );
    }
}

#[test]
fn rooms_reach_the_core_only_through_the_room_kit() {
    let mut offences = Vec::new();
    for file in rust_files(Path::new(ROOMS)) {
        let registry = file == Path::new(ROOMS).join("mod.rs");
        let room_root = file.file_name().is_some_and(|name| name == "mod.rs");
        for (line, code) in code_lines(&file) {
            let mut search = code.as_str();
            while let Some(at) = search.find("cocoa_butter::") {
                let after = &search[at + "cocoa_butter::".len()..];
                let through_kit = after.starts_with("kit::")
                    || after.starts_with("kit;")
                    || after.starts_with("kit}");
                if !through_kit {
                    offences.push(format!("{}:{line}: {}", file.display(), code.trim()));
                }
                search = after;
            }
            if registry {
                continue;
            }
            // Another room is reachable only through `rooms::` or by
            // climbing out of the room's own folder.
            let climbs_out = if room_root {
                code.contains("super::")
            } else {
                code.contains("super::super::")
            };
            if code.contains("rooms::") || climbs_out || code.contains("choco_factory::") {
                offences.push(format!("{}:{line}: {}", file.display(), code.trim()));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "a room may use only crate::cocoa_butter::kit (and its own folder):\n{}",
        offences.join("\n")
    );
}

#[test]
fn the_core_never_names_a_room() {
    let mut offences = Vec::new();
    for file in rust_files(Path::new(CORE)) {
        for (line, code) in code_lines(&file) {
            if code.contains("crate::rooms") || code.contains("choco_factory::rooms") {
                offences.push(format!("{}:{line}: {}", file.display(), code.trim()));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "the core is given its rooms (the registry in src/rooms/mod.rs), it never names one:\n{}",
        offences.join("\n")
    );
}

#[test]
fn the_path_reader_sees_every_form_of_import() {
    let parts: BTreeSet<String> = ["api", "nats", "room", "config"].map(String::from).into();
    let module = |path: &str| path.split('/').map(String::from).collect::<Vec<_>>();
    let named = |module: &[String], code| -> BTreeSet<String> {
        parts_named(module, code, &parts)
            .into_iter()
            .map(|(part, _)| part)
            .collect()
    };
    assert_eq!(
        named(&module("room"), "use super::api::{self, decode_json};"),
        ["api".to_string()].into()
    );
    assert_eq!(
        named(
            &module("room"),
            "use super::{api, nats::Publisher, config::X};"
        ),
        ["api", "config", "nats"].map(String::from).into()
    );
    // One level up from nats/provision.rs is nats itself: not an import.
    assert!(named(&module("nats/provision"), "use super::BusError;").is_empty());
    assert_eq!(
        named(
            &module("nats/provision"),
            "use super::super::config::NatsConfig;"
        ),
        ["config".to_string()].into()
    );
    assert_eq!(
        named(
            &module("nats/store"),
            "x: &crate::cocoa_butter::room::RoomContext,"
        ),
        ["room".to_string()].into()
    );
}
