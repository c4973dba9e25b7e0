//! the-wrapper's payload paths without the store. The first byte picks the
//! input: `requested` (decoded as `handle` decodes it, then the one-pass
//! extraction of tags and repo links), `document_indexed` (anchors to
//! GitHub slugs) or `tag_registered` (spelling keys).

#![no_main]

use choco_factory::cocoa_butter::decode_json;
use choco_factory::rooms::wrapper::extract::{extract, github_slug, tag_key};
use choco_factory::rooms::wrapper::{IndexedDocument, ResolveRequest, TagRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            let Ok(request) = decode_json::<ResolveRequest>(payload) else {
                return;
            };
            let found = extract(&request.content, &request.repo, &request.path);
            for (i, tag) in found.tags.iter().enumerate() {
                assert!(!tag.is_empty() && !tag.starts_with('#'), "{tag:?}");
                assert!(!found.tags[..i].contains(tag), "{tag:?} twice");
                let _ = tag_key(tag);
            }
            for (i, link) in found.links.iter().enumerate() {
                assert!(!found.links[..i].contains(link), "{link:?} twice");
                if let Some(anchor) = &link.anchor {
                    let _ = github_slug(anchor);
                }
            }
        }
        1 => {
            let Ok(document) = decode_json::<IndexedDocument>(payload) else {
                return;
            };
            for anchor in &document.anchors {
                let slug = github_slug(anchor);
                assert_eq!(github_slug(&slug), slug, "a slug is its own slug");
            }
        }
        _ => {
            let Ok(tag) = decode_json::<TagRecord>(payload) else {
                return;
            };
            for name in std::iter::once(&tag.tag).chain(&tag.aliases) {
                let key = tag_key(name);
                assert!(
                    !key.contains(['-', '_', ' ', '.']),
                    "{key:?} keeps a separator"
                );
            }
        }
    }
});
