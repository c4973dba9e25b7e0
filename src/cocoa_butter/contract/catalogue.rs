//! The catalogue of every event the rooms consume and publish, generated
//! from their contracts: what `choco-factory events` lists and what
//! `choco-factory events write` puts under `contracts/` (the catalogue,
//! one JSON Schema per event and major, and the AsyncAPI document).
//! `tests/contracts.rs` fails when the checked-in files and the code
//! disagree.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::{Contracts, Direction, EventContract, asyncapi};
use crate::cocoa_butter::config::RoomSettings;

/// Events of one aggregate keep their order; across aggregates there is
/// none (seed 001's `causally_ordered`, per aggregate).
pub const ORDERING: &str = "causally_ordered";

/// One event of the catalogue.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogueEvent {
    /// `coordination.property_sync.requested`
    pub event_type: String,
    pub subject: String,
    pub stream: String,
    /// The room that consumes it (an input) or publishes it (an output).
    pub room: String,
    pub service: String,
    pub direction: Direction,
    pub summary: String,
    /// What the envelope's `aggregate_id` is.
    pub aggregate: String,
    pub ordering: &'static str,
    /// The major an output is published at, and an input read as.
    pub current_major: u64,
    /// Every major with the file of its payload's schema, oldest first.
    pub majors: Vec<CatalogueMajor>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CatalogueMajor {
    pub major: u64,
    /// Relative to `contracts/`.
    pub schema: String,
}

/// The catalogue and the schemas it names.
#[derive(Debug, Clone)]
pub struct Catalogue {
    pub events: Vec<CatalogueEvent>,
    /// File (relative to `contracts/`) → the payload's JSON Schema.
    pub schemas: BTreeMap<String, Value>,
}

impl Catalogue {
    /// The catalogue of `rooms`, each with its contracts, in the rooms'
    /// order and each room's contracts' order.
    pub fn of(rooms: &[(&RoomSettings, &Contracts)]) -> Catalogue {
        let mut events = Vec::new();
        let mut schemas = BTreeMap::new();
        for (room, contracts) in rooms {
            for contract in contracts.iter() {
                let event = entry(room, contract);
                for ((_, schema), major) in contract.majors().iter().zip(&event.majors) {
                    schemas.insert(
                        major.schema.clone(),
                        serde_json::to_value(schema()).unwrap_or_default(),
                    );
                }
                events.push(event);
            }
        }
        Catalogue { events, schemas }
    }

    /// The event of type `event_type`.
    pub fn event(&self, event_type: &str) -> Option<&CatalogueEvent> {
        self.events.iter().find(|e| e.event_type == event_type)
    }

    /// Every file of `contracts/`, by its path there, as written: the
    /// catalogue (`events.json`), the schemas, the AsyncAPI document.
    pub fn files(&self) -> BTreeMap<String, String> {
        let pretty = |value: &Value| {
            let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
            text.push('\n');
            text
        };
        let mut files: BTreeMap<String, String> = self
            .schemas
            .iter()
            .map(|(path, schema)| (path.clone(), pretty(schema)))
            .collect();
        files.insert(
            "events.json".into(),
            pretty(&serde_json::json!({ "events": self.events })),
        );
        files.insert("asyncapi.json".into(), pretty(&asyncapi::document(self)));
        files
    }
}

fn entry(room: &RoomSettings, contract: &EventContract) -> CatalogueEvent {
    let event_type = room.event_type(contract.action);
    let majors = contract
        .majors()
        .iter()
        .map(|(major, _)| CatalogueMajor {
            major: *major,
            schema: format!("schemas/{event_type}.v{major}.json"),
        })
        .collect();
    CatalogueEvent {
        subject: format!("{}{}", room.subject_base, contract.action),
        event_type,
        stream: room.stream.clone(),
        room: room.name.clone(),
        service: room.service.clone(),
        direction: contract.direction,
        summary: contract.summary.to_string(),
        aggregate: contract.aggregate.to_string(),
        ordering: ORDERING,
        current_major: contract.current,
        majors,
    }
}
