//! The smartblock gate's pure steps: payload fields, the slug allowlist,
//! the schema version bound and federation resolution. Steps 5 and 7
//! (idempotency, recording) need the key-value store and live in `mod.rs`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cocoa_butter::kit::{Payload, snake_case_aliases};

use crate::cocoa_butter::kit::{HandleError, Reason, reason};

/// A smartblock naming a command the gate does not know.
pub const UNKNOWN_COMMAND_SLUG: Reason = Reason::new("unknown_command_slug");
/// A smartblock of a newer schema than the gate reads.
pub const SCHEMA_VERSION_TOO_NEW: Reason = Reason::new("schema_version_too_new");
use crate::cocoa_butter::kit::keys::id_too_long;

/// The federation manifest file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub commands: BTreeMap<String, Command>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    #[serde(default)]
    pub description: String,
    pub federation_targets: Vec<String>,
}

/// What the editor sends (seed 004), in camelCase; the snake_case
/// spellings of the same fields are accepted too (and the catalogue's
/// schema says so: `snake_case_aliases`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[schemars(transform = snake_case_aliases)]
pub struct SmartblockCreated {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(rename = "blockId", alias = "block_id")]
    pub block_id: String,
    #[serde(rename = "commandSlug", alias = "command_slug")]
    pub command_slug: String,
    #[serde(rename = "schemaVersion", alias = "schema_version")]
    pub schema_version: u32,
    #[serde(rename = "federationTargets", alias = "federation_targets", default)]
    pub federation_targets: Vec<String>,
    #[serde(rename = "semanticLayers", alias = "semantic_layers", default)]
    pub semantic_layers: Value,
    #[serde(rename = "documentId", alias = "document_id")]
    pub document_id: String,
    #[serde(rename = "authorId", alias = "author_id")]
    pub author_id: String,
    #[serde(rename = "blockType", alias = "block_type", default)]
    pub block_type: String,
}

impl Payload for SmartblockCreated {}

/// `refinement.smartblock_accepted`: a block that passed the gate, with the
/// federation targets its command has in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SmartblockAccepted {
    pub block_id: String,
    pub document_id: String,
    pub command_slug: String,
    /// The command catalog's version the block was written against.
    pub schema_version: u32,
    pub federation_targets: Vec<String>,
    pub author_id: String,
    pub block_type: String,
}

impl Payload for SmartblockAccepted {}

/// A gate step said no. Permanent: the same block can never pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `payload_parses`, `command_slug`, `schema_version`.
    pub step: &'static str,
    /// The dead-letter reason.
    pub reason: Reason,
    /// The payload field at fault.
    pub field: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn into_handle_error(self) -> HandleError {
        HandleError::permanent(self.reason, format!("step {}: {}", self.step, self.message))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("commands.{slug}: {message}")]
pub struct ManifestError {
    slug: String,
    message: String,
}

/// The loaded manifest and the catalog's schema version.
#[derive(Debug, Clone)]
pub struct Gate {
    manifest: Manifest,
    catalog_schema_version: u32,
}

impl Gate {
    pub fn new(manifest: Manifest, catalog_schema_version: u32) -> Result<Self, ManifestError> {
        for (slug, command) in &manifest.commands {
            let bad = |message: &str| ManifestError {
                slug: slug.clone(),
                message: message.to_string(),
            };
            if slug.is_empty()
                || !slug
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(bad("a slug is lower-case letters, digits and '-'"));
            }
            if command
                .federation_targets
                .iter()
                .any(|t| t.trim().is_empty())
            {
                return Err(bad("federation targets must not be empty strings"));
            }
        }
        Ok(Gate {
            manifest,
            catalog_schema_version,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn catalog_schema_version(&self) -> u32 {
        self.catalog_schema_version
    }

    /// Steps 2 (required fields), 3, 4 and 6 in order. On success, the
    /// `smartblock_accepted` payload with targets from the manifest.
    pub fn check(&self, block: &SmartblockCreated) -> Result<SmartblockAccepted, Rejection> {
        for (field, value) in [
            ("blockId", &block.block_id),
            ("commandSlug", &block.command_slug),
            ("documentId", &block.document_id),
            ("authorId", &block.author_id),
        ] {
            if value.trim().is_empty() {
                return Err(Rejection {
                    step: "2 (payload parses)",
                    reason: reason::PAYLOAD_INVALID,
                    field,
                    message: format!("{field} must not be empty"),
                });
            }
            // The block id becomes a key of the blocks bucket.
            if let Some(message) = id_too_long(value) {
                return Err(Rejection {
                    step: "2 (payload parses)",
                    reason: reason::PAYLOAD_INVALID,
                    field,
                    message: format!("{field} {message}"),
                });
            }
        }
        let Some(command) = self.manifest.commands.get(&block.command_slug) else {
            return Err(Rejection {
                step: "3 (command slug allowlist)",
                reason: UNKNOWN_COMMAND_SLUG,
                field: "commandSlug",
                message: format!(
                    "commandSlug {:?} is not in the federation manifest",
                    block.command_slug
                ),
            });
        };
        if block.schema_version > self.catalog_schema_version {
            return Err(Rejection {
                step: "4 (schema version)",
                reason: SCHEMA_VERSION_TOO_NEW,
                field: "schemaVersion",
                message: format!(
                    "schemaVersion {} is newer than the catalog's {}",
                    block.schema_version, self.catalog_schema_version
                ),
            });
        }
        Ok(SmartblockAccepted {
            block_id: block.block_id.clone(),
            document_id: block.document_id.clone(),
            command_slug: block.command_slug.clone(),
            schema_version: block.schema_version,
            federation_targets: command.federation_targets.clone(),
            author_id: block.author_id.clone(),
            block_type: block.block_type.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cocoa_butter::kit::keys::MAX_ID_BYTES;
    use serde_json::json;

    fn gate() -> Gate {
        let manifest: Manifest =
            toml::from_str(include_str!("../../../config/federation-manifest.toml"))
                .expect("manifest");
        Gate::new(manifest, 1).expect("valid")
    }

    fn block(slug: &str, version: u32) -> SmartblockCreated {
        serde_json::from_value(json!({
            "type": "smartblock_created", "blockId": "blk-1", "commandSlug": slug,
            "schemaVersion": version, "federationTargets": ["somewhere"], "semanticLayers": {},
            "documentId": "doc-1", "authorId": "ann", "blockType": "callout"
        }))
        .expect("parses")
    }

    #[test]
    fn ships_the_seed_commands() {
        for slug in [
            "invention",
            "weave",
            "torrent",
            "protocol",
            "forge",
            "assistant",
        ] {
            assert!(gate().check(&block(slug, 1)).is_ok(), "{slug}");
        }
    }

    #[test]
    fn resolves_targets_from_the_manifest() {
        let accepted = gate().check(&block("invention", 1)).expect("accepted");
        assert_eq!(accepted.federation_targets, vec!["traceo".to_string()]);
    }

    #[test]
    fn rejects_in_step_order() {
        assert_eq!(
            gate().check(&block("nope", 9)).expect_err("slug").reason,
            "unknown_command_slug"
        );
        assert_eq!(
            gate().check(&block("weave", 2)).expect_err("ver").reason,
            "schema_version_too_new"
        );
    }

    #[test]
    fn refuses_ids_too_long_to_be_keys() {
        let mut long = block("weave", 1);
        long.block_id = "b".repeat(MAX_ID_BYTES + 1);
        let rejection = gate().check(&long).expect_err("too long");
        assert_eq!(
            (rejection.reason, rejection.field),
            (reason::PAYLOAD_INVALID, "blockId")
        );
        long.block_id = "b".repeat(MAX_ID_BYTES);
        assert!(gate().check(&long).is_ok());
    }

    #[test]
    fn accepts_snake_case() {
        let snake: SmartblockCreated = serde_json::from_value(json!({
            "block_id": "b", "command_slug": "weave", "schema_version": 1,
            "document_id": "d", "author_id": "a"
        }))
        .expect("snake_case parses");
        assert!(gate().check(&snake).is_ok());
    }
}
