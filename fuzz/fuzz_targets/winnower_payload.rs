//! the-winnower's payload paths without the store. The first byte picks
//! the input: `smartblock_created` (decoded as `handle` decodes it, then
//! the gate's pure steps against the shipped manifest) or `requested`
//! (decoded, then scored by the shipped slop rules as Markdown or text).

#![no_main]

use std::sync::LazyLock;

use choco_factory::cocoa_butter::decode_json;
use choco_factory::rooms::winnower::SlopRequest;
use choco_factory::rooms::winnower::gate::{Gate, Manifest, SmartblockCreated};
use choco_factory::rooms::winnower::slop::{RulesFile, SlopRules};
use libfuzzer_sys::fuzz_target;

static GATE: LazyLock<Gate> = LazyLock::new(|| {
    let manifest: Manifest =
        toml::from_str(include_str!("../../config/federation-manifest.toml")).expect("manifest");
    Gate::new(manifest, 1).expect("the shipped manifest is valid")
});

static RULES: LazyLock<SlopRules> = LazyLock::new(|| {
    let file: RulesFile =
        toml::from_str(include_str!("../../config/slop-rules.toml")).expect("rules");
    SlopRules::compile(file).expect("the shipped rules are valid")
});

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        let Ok(block) = decode_json::<SmartblockCreated>(payload) else {
            return;
        };
        if let Ok(accepted) = GATE.check(&block) {
            assert_eq!(accepted["block_id"], block.block_id.as_str());
            assert!(accepted["federation_targets"].is_array());
        }
    } else {
        let Ok(request) = decode_json::<SlopRequest>(payload) else {
            return;
        };
        let scored = RULES.score(&request.content, selector & 2 == 0);
        assert!(
            scored.score.is_finite() && scored.score >= 0.0,
            "{}",
            scored.score
        );
        for finding in &scored.findings {
            assert!(finding.start <= finding.end && finding.end <= request.content.len());
            assert!(request.content.is_char_boundary(finding.start));
            assert!(request.content.is_char_boundary(finding.end));
        }
    }
});
