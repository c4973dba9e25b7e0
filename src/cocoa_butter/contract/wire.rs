//! The gRPC contracts' wire shape, from the compiled descriptor set of
//! `proto/`: every message's fields by number (name, type, label) with its
//! reserved numbers, and every service's methods. `contracts/proto/wire.json`
//! is the baseline that `tests/contracts.rs` holds `proto/` to: a field
//! removed without reserving its number, renumbered or retyped, or a method
//! removed or retyped, is a wire-breaking change. Additions are not.

use std::collections::BTreeMap;

use prost::Message as _;
use prost_types::{DescriptorProto, FileDescriptorSet};
use serde::{Deserialize, Serialize};

/// One field as the wire sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireField {
    pub name: String,
    /// `TYPE_STRING`, `TYPE_MESSAGE`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The message or enum of a `TYPE_MESSAGE`/`TYPE_ENUM` field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub type_name: String,
    /// `LABEL_OPTIONAL`, `LABEL_REPEATED`.
    pub label: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    /// By field number.
    pub fields: BTreeMap<i32, WireField>,
    /// Numbers no field may take again (`reserved`): each `[start, end)`.
    #[serde(default)]
    pub reserved: Vec<(i32, i32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMethod {
    pub input: String,
    pub output: String,
    pub client_streaming: bool,
    pub server_streaming: bool,
}

/// The wire shape of every message and service, by full name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire {
    pub messages: BTreeMap<String, WireMessage>,
    pub methods: BTreeMap<String, WireMethod>,
}

/// Why a descriptor set cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("the descriptor set does not decode: {0}")]
pub struct WireError(#[from] prost::DecodeError);

impl Wire {
    /// The wire shape of an encoded `FileDescriptorSet`.
    pub fn of(descriptor_set: &[u8]) -> Result<Wire, WireError> {
        let set = FileDescriptorSet::decode(descriptor_set)?;
        let mut wire = Wire::default();
        for file in &set.file {
            let package = file.package();
            for message in &file.message_type {
                add_message(&mut wire, package, message);
            }
            for service in &file.service {
                for method in &service.method {
                    wire.methods.insert(
                        format!("{package}.{}/{}", service.name(), method.name()),
                        WireMethod {
                            input: method.input_type().trim_start_matches('.').to_string(),
                            output: method.output_type().trim_start_matches('.').to_string(),
                            client_streaming: method.client_streaming(),
                            server_streaming: method.server_streaming(),
                        },
                    );
                }
            }
        }
        Ok(wire)
    }

    /// How `self` (the current protos) breaks the wire of `baseline`, one
    /// line per break; empty when every old client and server still
    /// understands the new ones.
    pub fn breaks(&self, baseline: &Wire) -> Vec<String> {
        let mut breaks = Vec::new();
        for (name, old) in &baseline.messages {
            let Some(new) = self.messages.get(name) else {
                breaks.push(format!("message {name} was removed"));
                continue;
            };
            for (number, old_field) in &old.fields {
                match new.fields.get(number) {
                    None => {
                        let reserved = new
                            .reserved
                            .iter()
                            .any(|(start, end)| number >= start && number < end);
                        if !reserved {
                            breaks.push(format!(
                                "{name}: field {number} ({}) was removed without reserving its number",
                                old_field.name
                            ));
                        }
                    }
                    Some(new_field)
                        if new_field.kind != old_field.kind
                            || new_field.type_name != old_field.type_name
                            || new_field.label != old_field.label =>
                    {
                        breaks.push(format!(
                            "{name}: field {number} ({}) changed from {} {} {} to {} {} {}",
                            old_field.name,
                            old_field.label,
                            old_field.kind,
                            old_field.type_name,
                            new_field.label,
                            new_field.kind,
                            new_field.type_name
                        ));
                    }
                    Some(_) => {}
                }
            }
            // A field that kept its name under another number was renumbered.
            for (number, old_field) in &old.fields {
                if let Some((new_number, _)) = new
                    .fields
                    .iter()
                    .find(|(n, f)| f.name == old_field.name && *n != number)
                {
                    breaks.push(format!(
                        "{name}: field {} was renumbered from {number} to {new_number}",
                        old_field.name
                    ));
                }
            }
        }
        for (name, old) in &baseline.methods {
            match self.methods.get(name) {
                None => breaks.push(format!("method {name} was removed")),
                Some(new) if new != old => {
                    breaks.push(format!("method {name} changed from {old:?} to {new:?}"))
                }
                Some(_) => {}
            }
        }
        breaks
    }
}

fn add_message(wire: &mut Wire, scope: &str, message: &DescriptorProto) {
    let name = format!("{scope}.{}", message.name());
    let entry = WireMessage {
        fields: message
            .field
            .iter()
            .map(|field| {
                (
                    field.number(),
                    WireField {
                        name: field.name().to_string(),
                        kind: field.r#type().as_str_name().to_string(),
                        type_name: field.type_name().trim_start_matches('.').to_string(),
                        label: field.label().as_str_name().to_string(),
                    },
                )
            })
            .collect(),
        reserved: message
            .reserved_range
            .iter()
            .map(|range| (range.start(), range.end()))
            .collect(),
    };
    for nested in &message.nested_type {
        add_message(wire, &name, nested);
    }
    wire.messages.insert(name, entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, kind: &str) -> WireField {
        WireField {
            name: name.into(),
            kind: kind.into(),
            type_name: String::new(),
            label: "LABEL_OPTIONAL".into(),
        }
    }

    fn wire(fields: &[(i32, WireField)], reserved: &[(i32, i32)]) -> Wire {
        let mut wire = Wire::default();
        wire.messages.insert(
            "p.M".into(),
            WireMessage {
                fields: fields.iter().cloned().collect(),
                reserved: reserved.to_vec(),
            },
        );
        wire
    }

    #[test]
    fn additions_pass_and_removals_renumberings_retypings_break() {
        let base = wire(
            &[
                (1, field("a", "TYPE_STRING")),
                (2, field("b", "TYPE_INT64")),
            ],
            &[],
        );
        let added = wire(
            &[
                (1, field("a", "TYPE_STRING")),
                (2, field("b", "TYPE_INT64")),
                (3, field("c", "TYPE_BOOL")),
            ],
            &[],
        );
        assert!(added.breaks(&base).is_empty());
        let reserved = wire(&[(1, field("a", "TYPE_STRING"))], &[(2, 3)]);
        assert!(reserved.breaks(&base).is_empty(), "a reserved number");
        let removed = wire(&[(1, field("a", "TYPE_STRING"))], &[]);
        assert_eq!(removed.breaks(&base).len(), 1);
        let retyped = wire(
            &[(1, field("a", "TYPE_BYTES")), (2, field("b", "TYPE_INT64"))],
            &[],
        );
        assert!(retyped.breaks(&base)[0].contains("changed"));
        let renumbered = wire(
            &[
                (1, field("a", "TYPE_STRING")),
                (5, field("b", "TYPE_INT64")),
            ],
            &[],
        );
        assert!(
            renumbered
                .breaks(&base)
                .iter()
                .any(|b| b.contains("renumbered from 2 to 5")),
            "{:?}",
            renumbered.breaks(&base)
        );
    }
}
