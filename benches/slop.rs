//! Slop scoring throughput on 1 KiB, 64 KiB and 1 MiB Markdown documents,
//! with the shipped rules (config/slop-rules.toml).
//!
//! Run: `cargo bench --bench slop`. The documents are generated
//! deterministically: varied prose with a little slop mixed in, code blocks
//! and headings, so every rule kind does real work.

use std::hint::black_box;

use choco_factory::rooms::winnower::slop::{RulesFile, SlopRules};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const PARAGRAPHS: &[&str] = &[
    "The conch keeps property {n} consistent while editors {n} and {m} change it at once.",
    "Each revision of block {n} is recorded in the stream, so replica {m} can replay it.",
    "In today's fast-paced world, document {n} was moved to the edge in {m} milliseconds.",
    "The mould renders template {n} with data set {m}; TODO check the footer.",
    "Winnowing removes the husk from draft {n} before it reaches reviewer {m}.",
    "```rust\nlet block_{n} = gate.check(&input_{m})?; // TODO lorem ipsum in code is ignored\n```",
    "## Section {n}\n\nAnchors like section-{n} are what cross-repo link {m} points at.",
];

fn document(size: usize) -> String {
    let mut out = String::with_capacity(size + 256);
    out.push_str("# Generated document\n\n");
    let mut n = 0usize;
    while out.len() < size {
        let template = PARAGRAPHS[n % PARAGRAPHS.len()];
        out.push_str(
            &template
                .replace("{n}", &n.to_string())
                .replace("{m}", &(n * 7 % 1000).to_string()),
        );
        out.push_str("\n\n");
        n += 1;
    }
    out.truncate(size);
    out
}

fn rules() -> SlopRules {
    let text = std::fs::read_to_string("config/slop-rules.toml").expect("config/slop-rules.toml");
    let file: RulesFile = toml::from_str(&text).expect("rules parse");
    SlopRules::compile(file).expect("rules compile")
}

fn scoring(c: &mut Criterion) {
    let rules = rules();
    let mut group = c.benchmark_group("slop_score");
    for (name, size) in [("1KiB", 1024), ("64KiB", 64 * 1024), ("1MiB", 1024 * 1024)] {
        let doc = document(size);
        group.throughput(Throughput::Bytes(doc.len() as u64));
        group.bench_function(name, |b| b.iter(|| rules.score(black_box(&doc), true)));
    }
    group.finish();
}

criterion_group!(benches, scoring);
criterion_main!(benches);
