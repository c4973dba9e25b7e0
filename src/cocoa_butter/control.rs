//! The desired run state of each room: paused or running.
//!
//! It lives in the JetStream key-value bucket `choco_control`, one key per
//! room (`conch`), not in any process: every replica of a room watches its
//! key, so one write pauses all of them, and a restarted process reads it
//! before it pulls, so a pause survives restarts. The operator's CLI
//! (`room pause|resume`) and each room's `POST /admin/pause|resume` both
//! write it; no one else does. A missing key means running.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::nats::{KvBucket, Provisioned};
use crate::cocoa_butter::streams::BucketStorage;

pub const CONTROL_BUCKET: &str = "choco_control";

/// What an operator asked of a room.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub paused: bool,
    /// Why, in the operator's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who asked: `cli` or `http`, with the host when known.
    #[serde(default)]
    pub by: String,
    /// When (RFC 3339).
    #[serde(default)]
    pub at: String,
}

impl Desired {
    pub fn new(paused: bool, reason: Option<String>, by: impl Into<String>) -> Self {
        Desired {
            paused,
            reason,
            by: by.into(),
            at: crate::cocoa_butter::envelope::rfc3339(&chrono::Utc::now()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("key-value bucket {CONTROL_BUCKET}: {0}")]
    Unavailable(#[source] super::nats::BoxError),
    #[error("{CONTROL_BUCKET}/{room} holds no valid desired state: {reason}")]
    Invalid { room: String, reason: String },
}

fn unavailable(err: impl Into<super::nats::BoxError>) -> ControlError {
    ControlError::Unavailable(err.into())
}

/// The `choco_control` bucket.
pub struct Control {
    bucket: KvBucket,
}

impl Control {
    pub fn new(js: jetstream::Context, storage: BucketStorage) -> Self {
        Control {
            bucket: KvBucket::new(
                js,
                CONTROL_BUCKET,
                "desired run state of each room",
                storage,
            ),
        }
    }

    /// Opens the bucket, creating it when missing.
    pub async fn open(&self) -> Result<Provisioned, ControlError> {
        self.bucket.ensure().await.map_err(unavailable)
    }

    /// The room's desired state; running when it has none.
    pub async fn get(&self, room: &str) -> Result<Desired, ControlError> {
        let store = self.bucket.store().map_err(unavailable)?;
        match store.entry(room).await.map_err(unavailable)? {
            Some(entry) => decode(room, &entry),
            None => Ok(Desired::default()),
        }
    }

    /// Writes the room's desired state; every watching replica follows.
    pub async fn set(&self, room: &str, desired: &Desired) -> Result<(), ControlError> {
        let body = serde_json::to_vec(desired).map_err(|err| ControlError::Invalid {
            room: room.to_string(),
            reason: err.to_string(),
        })?;
        self.bucket
            .store()
            .map_err(unavailable)?
            .put(room, Bytes::from(body))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The room's latest entry (if any), then every change to it.
    pub async fn watch(&self, room: &str) -> Result<kv::Watch, ControlError> {
        self.bucket
            .store()
            .map_err(unavailable)?
            .watch_with_history(room)
            .await
            .map_err(unavailable)
    }
}

/// The desired state an entry says; a deleted or purged key means running.
pub fn decode(room: &str, entry: &kv::Entry) -> Result<Desired, ControlError> {
    match entry.operation {
        kv::Operation::Delete | kv::Operation::Purge => Ok(Desired::default()),
        kv::Operation::Put => {
            serde_json::from_slice(&entry.value).map_err(|err| ControlError::Invalid {
                room: room.to_string(),
                reason: err.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_desired_state_without_optional_fields_is_read() {
        let desired: Desired = serde_json::from_str(r#"{"paused":true}"#).expect("parses");
        assert!(desired.paused);
        assert_eq!(desired.reason, None);
        let written = serde_json::to_value(Desired::new(false, None, "cli")).expect("json");
        assert_eq!(written["paused"], false);
        assert!(written.get("reason").is_none());
    }
}
