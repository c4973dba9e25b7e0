//! Hydration (Jinja render → Markdown → sanitized HTML) of a small and a
//! large document, with the shipped smartblock templates.
//!
//! Run: `cargo bench --bench hydrate`. The documents are generated
//! deterministically: sections with placeholders, lists and smartblock
//! lines, with data for every block.

use std::collections::BTreeMap;
use std::hint::black_box;

use choco_factory::rooms::mould::render::{Format, Limits, Renderer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};

fn renderer() -> Renderer {
    let mut library = BTreeMap::new();
    for entry in std::fs::read_dir("config/templates").expect("config/templates") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        if let Some(slug) = name.strip_suffix(".md.j2") {
            library.insert(
                slug.to_string(),
                std::fs::read_to_string(&path).expect("read"),
            );
        }
    }
    Renderer::new(
        library,
        Limits {
            fuel: 50_000_000,
            recursion: 64,
            max_output_bytes: 64 * 1024 * 1024,
        },
    )
    .expect("templates compile")
}

/// `sections` sections, each a heading, prose with placeholders, a list
/// and two smartblocks.
fn document(sections: usize) -> (String, Value) {
    let mut source = String::from("# {{ title }}\n\n");
    let mut blocks = serde_json::Map::new();
    for n in 0..sections {
        source.push_str(&format!(
            "## Section {n}: {{{{ sections[{n}].name }}}}\n\n\
             Written by **{{{{ author }}}}** for {{{{ sections[{n}].audience }}}}; see [the vault](https://vault.example/{n}).\n\n\
             {{% for item in sections[{n}].items %}}- {{{{ item }}}}\n{{% endfor %}}\n\
             /invention inv-{n}\n\n/protocol proto-{n}\n\n"
        ));
        blocks.insert(
            format!("inv-{n}"),
            json!({"title": format!("Idea {n}"), "inventor": "Ann", "prior_art": ["a", "b"]}),
        );
        blocks.insert(
            format!("proto-{n}"),
            json!({"name": format!("Steps {n}"), "steps": ["melt", "cool", "warm"]}),
        );
    }
    let sections_data: Vec<Value> = (0..sections)
        .map(|n| json!({"name": format!("Part {n}"), "audience": "tasters", "items": ["cocoa", "sugar", "milk"]}))
        .collect();
    let data =
        json!({"title": "Benchmark", "author": "Ann", "sections": sections_data, "blocks": blocks});
    (source, data)
}

fn hydration(c: &mut Criterion) {
    let renderer = renderer();
    let mut group = c.benchmark_group("hydrate_html");
    for (name, sections) in [("small_4_sections", 4), ("large_1000_sections", 1000)] {
        let (source, data) = document(sections);
        let output = renderer
            .render(&source, &data, Format::Html)
            .expect("renders");
        group.throughput(Throughput::Bytes(output.content.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| renderer.render(black_box(&source), black_box(&data), Format::Html))
        });
    }
    group.finish();
}

criterion_group!(benches, hydration);
criterion_main!(benches);
