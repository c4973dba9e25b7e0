//! the-mould's payload path without the store: `hydration.requested`
//! decoded as `handle` decodes it, then rendered with the shipped template
//! library under the room's default limits. Any source is either rendered
//! within the output bound or refused with a render error: never a panic,
//! never unbounded work (fuel and recursion limits; libFuzzer's -timeout
//! catches a runaway).

#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use choco_factory::cocoa_butter::decode_json;
use choco_factory::rooms::mould::HydrationRequest;
use choco_factory::rooms::mould::render::{Format, Limits, Renderer};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const LIMITS: Limits = Limits {
    fuel: 1_000_000,
    recursion: 64,
    max_output_bytes: 8 * 1024 * 1024,
};

static RENDERER: LazyLock<Renderer> = LazyLock::new(|| {
    let library: BTreeMap<String, String> = [
        (
            "assistant",
            include_str!("../../config/templates/assistant.md.j2"),
        ),
        ("forge", include_str!("../../config/templates/forge.md.j2")),
        (
            "invention",
            include_str!("../../config/templates/invention.md.j2"),
        ),
        (
            "protocol",
            include_str!("../../config/templates/protocol.md.j2"),
        ),
        (
            "torrent",
            include_str!("../../config/templates/torrent.md.j2"),
        ),
        ("weave", include_str!("../../config/templates/weave.md.j2")),
    ]
    .into_iter()
    .map(|(slug, source)| (slug.to_string(), source.to_string()))
    .collect();
    Renderer::new(library, LIMITS).expect("the shipped templates compile")
});

fuzz_target!(|payload: &[u8]| {
    let Ok(request) = decode_json::<HydrationRequest>(payload) else {
        return;
    };
    let Some(format) = Format::parse(&request.format) else {
        return;
    };
    let data = match request.data {
        Value::Null => json!({}),
        data @ Value::Object(_) => data,
        _ => return,
    };
    if let Ok(rendered) = RENDERER.render(&request.source, &data, format) {
        assert!(rendered.content.len() <= LIMITS.max_output_bytes);
        assert_eq!(rendered.content_type, format.content_type());
    }
});
