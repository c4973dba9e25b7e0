//! The archive's own section, `[archive]`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[archive]`: which domains' streams are archived, where, and how
/// segments close. Off while `domains` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// The domains whose stream `choco:events:<domain>` is archived
    /// (`["coordination", "refinement"]`); none by default.
    pub domains: Vec<String>,
    /// Where segments go: `local` (the directory `dir`, the default) or
    /// `s3` (the bucket of `[archive.s3]`).
    pub backend: Backend,
    /// The local directory the archive lives in (the embedded backend).
    pub dir: PathBuf,
    /// S3-compatible storage, with `backend = "s3"`.
    pub s3: S3Config,
    /// A segment closes at this many messages. It is also the archive
    /// consumer's `max_ack_pending`, since nothing of a segment is acked
    /// before it is written.
    pub segment_max_events: usize,
    /// ... or at this many bytes of uncompressed lines ...
    pub segment_max_bytes: usize,
    /// ... or this long after its first message, whichever comes first.
    /// Below `ack_wait`, so a segment's messages are never redelivered
    /// while it fills.
    #[serde(with = "humantime_serde")]
    pub segment_max_age: Duration,
    /// The archive consumer's ack wait: how long a message delivered to an
    /// archiver that died waits before another gets it.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
}

/// Where the archive's objects are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Local,
    S3,
}

/// `[archive.s3]`: an S3 bucket, on AWS or any S3-compatible server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// The server (`http://seaweedfs:8333`, `https://minio.internal`);
    /// unset: AWS's endpoint for `region`.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Path-style requests (`<endpoint>/<bucket>/<key>`), as most
    /// S3-compatible servers want; AWS takes virtual-hosted ones.
    pub path_style: bool,
    /// Files holding the access key id and the secret access key (a
    /// mounted secret). Without them the standard AWS variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// ...) are used.
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key_file: Option<PathBuf>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            bucket: String::new(),
            region: "us-east-1".into(),
            path_style: false,
            access_key_id_file: None,
            secret_access_key_file: None,
        }
    }
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            domains: Vec::new(),
            backend: Backend::Local,
            s3: S3Config::default(),
            dir: PathBuf::from("archive"),
            segment_max_events: 1000,
            segment_max_bytes: 8 * 1024 * 1024,
            segment_max_age: Duration::from_secs(10),
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// An `[archive]` setting that cannot be used, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("archive.{key}: {reason}")]
// Converted into the configuration's own error, which names the key.
pub struct ArchiveSettingError {
    pub key: &'static str,
    pub reason: String,
}

impl ArchiveConfig {
    /// Whether anything is archived.
    pub fn enabled(&self) -> bool {
        !self.domains.is_empty()
    }

    /// Checks the settings against each other (and the domains against
    /// those the rooms have: `known`).
    pub fn validate(&self, known: &[&str]) -> Result<(), ArchiveSettingError> {
        let refuse = |key, reason: String| Err(ArchiveSettingError { key, reason });
        for domain in &self.domains {
            if !known.contains(&domain.as_str()) {
                return refuse(
                    "domains",
                    format!(
                        "{domain:?} is the domain of no room (domains: {})",
                        known.join(", ")
                    ),
                );
            }
        }
        if self.segment_max_events == 0 || self.segment_max_bytes == 0 {
            return refuse(
                "segment_max_events",
                "segment_max_events and segment_max_bytes must be above zero".into(),
            );
        }
        if self.segment_max_age.is_zero() || self.segment_max_age >= self.ack_wait {
            return refuse(
                "segment_max_age",
                format!(
                    "must be above zero and below archive.ack_wait ({}): a segment's messages \
                     must not be redelivered while it fills",
                    humantime::format_duration(self.ack_wait)
                ),
            );
        }
        if self.enabled() && self.backend == Backend::Local && self.dir.as_os_str().is_empty() {
            return refuse("dir", "is required when domains are archived".into());
        }
        if self.backend == Backend::S3 {
            if self.s3.bucket.trim().is_empty() {
                return refuse("s3.bucket", "is required with backend = \"s3\"".into());
            }
            if let Some(endpoint) = &self.s3.endpoint
                && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            {
                return refuse(
                    "s3.endpoint",
                    format!("{endpoint:?} is not an http:// or https:// URL"),
                );
            }
            if self.s3.access_key_id_file.is_some() != self.s3.secret_access_key_file.is_some() {
                return refuse(
                    "s3.access_key_id_file",
                    "set both access_key_id_file and secret_access_key_file, or neither".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_against_each_other() {
        let known = ["coordination", "refinement"];
        assert!(ArchiveConfig::default().validate(&known).is_ok());
        let unknown = ArchiveConfig {
            domains: vec!["chocolate".into()],
            ..ArchiveConfig::default()
        };
        assert_eq!(
            unknown.validate(&known).expect_err("unknown").key,
            "domains"
        );
        let slow = ArchiveConfig {
            segment_max_age: Duration::from_secs(30),
            ..ArchiveConfig::default()
        };
        assert_eq!(
            slow.validate(&known).expect_err("age").key,
            "segment_max_age"
        );
    }
}
