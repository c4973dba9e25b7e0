//! the-conch's payload path without the store: `property_sync.requested`
//! decoded as `handle` decodes it (`InboundEvent::payload` is
//! `decode_json`), validated, then the sync rules applied twice to a
//! document under every policy; the record as stored must read back, since
//! the room reads it before every later write to the document.

#![no_main]

use choco_factory::cocoa_butter::decode_json;
use choco_factory::rooms::conch::sync::{DocumentRecord, Policy, SyncRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let Ok(request) = decode_json::<SyncRequest>(payload) else {
        return;
    };
    if request.validate().is_err() {
        return;
    }
    for policy in [
        Policy::LastWriterWins,
        Policy::FirstWriterWins,
        Policy::Union,
    ] {
        let mut record = DocumentRecord::default();
        let first = record.apply("cause-1", &request, policy, 4);
        let second = record.apply("cause-2", &request, policy, 4);
        assert!(!first.outputs.is_empty() && !second.outputs.is_empty());
        let state = &record.properties[&request.property];
        assert!((1..=2).contains(&state.revision), "{}", state.revision);
        assert_eq!(record.receipt("cause-1"), Some(&first));

        let stored = serde_json::to_vec(&record).expect("a record serializes");
        let back: DocumentRecord = serde_json::from_slice(&stored)
            .unwrap_or_else(|err| panic!("the stored record does not read back: {err}"));
        assert_eq!(back, record);
    }
});
