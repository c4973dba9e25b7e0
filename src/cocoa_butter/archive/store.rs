//! Where the archive's objects live, through `object_store` (the Apache
//! Arrow project's crate: the same calls for a local directory, the
//! embedded default, and S3-compatible storage).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use object_store::aws::AmazonS3Builder;

use super::config::{ArchiveConfig, Backend, S3Config};
use super::segment::{Manifest, manifest_prefix};

/// A failure's source, whatever its type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why archiving, or reading the archive, failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The object store failed (unreachable, refused, ...).
    #[error("archive storage: {0}")]
    Storage(#[from] object_store::Error),
    /// NATS failed (the stream, the consumer, the range bucket).
    #[error("NATS: {0}")]
    Bus(#[source] BoxError),
    /// Something in the archive does not read as what it should be.
    #[error("{key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("writing a segment: {0}")]
    Io(#[source] BoxError),
}

impl ArchiveError {
    pub fn bus(err: impl Into<BoxError>) -> Self {
        ArchiveError::Bus(err.into())
    }

    pub fn io(err: impl Into<BoxError>) -> Self {
        ArchiveError::Io(err.into())
    }
}

/// The archive's object store.
#[derive(Clone)]
pub struct ArchiveStore {
    inner: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for ArchiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArchiveStore({})", self.inner)
    }
}

impl ArchiveStore {
    /// The archive `config` names: its local directory, or its S3 bucket.
    pub fn open(config: &ArchiveConfig) -> Result<Self, ArchiveError> {
        match config.backend {
            Backend::Local => Self::local(&config.dir),
            Backend::S3 => Self::s3(&config.s3),
        }
    }

    /// The archive in an S3 bucket (AWS or S3-compatible).
    pub fn s3(s3: &S3Config) -> Result<Self, ArchiveError> {
        // reqwest's rustls takes the process's crypto provider: ring.
        crate::cocoa_butter::tls::install_default_provider();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            .with_virtual_hosted_style_request(!s3.path_style);
        if let Some(endpoint) = &s3.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let (Some(id), Some(secret)) = (&s3.access_key_id_file, &s3.secret_access_key_file) {
            let read = |path: &Path| {
                std::fs::read_to_string(path)
                    .map(|text| text.trim().to_string())
                    .map_err(|err| ArchiveError::Corrupt {
                        key: path.display().to_string(),
                        reason: format!("cannot read the S3 credential: {err}"),
                    })
            };
            builder = builder
                .with_access_key_id(read(id)?)
                .with_secret_access_key(read(secret)?);
        }
        Ok(ArchiveStore {
            inner: Arc::new(builder.build()?),
        })
    }

    /// The archive in a local directory, created when missing.
    pub fn local(dir: &Path) -> Result<Self, ArchiveError> {
        std::fs::create_dir_all(dir).map_err(ArchiveError::io)?;
        Ok(ArchiveStore {
            inner: Arc::new(LocalFileSystem::new_with_prefix(dir)?),
        })
    }

    /// Writes (or overwrites) `key`.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        self.inner
            .put(&ObjectPath::from(key), Bytes::from(bytes).into())
            .await?;
        Ok(())
    }

    /// The object at `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        match self.inner.get(&ObjectPath::from(key)).await {
            Ok(found) => Ok(Some(found.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Every key under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        let prefix = ObjectPath::from(prefix);
        let found: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await?;
        let mut keys: Vec<String> = found
            .into_iter()
            .map(|meta| meta.location.to_string())
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The domain's whole manifest, from all its chunks; empty when it has
    /// none yet.
    pub async fn manifest(&self, domain: &str, stream: &str) -> Result<Manifest, ArchiveError> {
        let mut manifest = empty_manifest(domain, stream);
        for key in self.keys(&manifest_prefix(domain)).await? {
            manifest
                .segments
                .extend(self.manifest_chunk(&key).await?.segments);
        }
        Ok(manifest)
    }

    /// The domain's last manifest chunk: the one the archiver extends, and
    /// the last sequence archived. Empty when it has none yet.
    pub async fn last_manifest_chunk(
        &self,
        domain: &str,
        stream: &str,
    ) -> Result<Manifest, ArchiveError> {
        match self.keys(&manifest_prefix(domain)).await?.last() {
            Some(key) => self.manifest_chunk(key).await,
            None => Ok(empty_manifest(domain, stream)),
        }
    }

    async fn manifest_chunk(&self, key: &str) -> Result<Manifest, ArchiveError> {
        let corrupt = |reason: String| ArchiveError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let bytes = self
            .get(key)
            .await?
            .ok_or_else(|| corrupt("listed, then gone".into()))?;
        serde_json::from_slice(&bytes).map_err(|err| corrupt(err.to_string()))
    }

    /// Writes one chunk of a manifest (see [`Manifest::with_segment`]).
    pub async fn put_manifest_chunk(&self, chunk: &Manifest) -> Result<(), ArchiveError> {
        let mut text = serde_json::to_vec_pretty(chunk).map_err(ArchiveError::io)?;
        text.push(b'\n');
        self.put(&chunk.chunk_key(), text).await
    }
}

fn empty_manifest(domain: &str, stream: &str) -> Manifest {
    Manifest {
        domain: domain.to_string(),
        stream: stream.to_string(),
        segments: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cocoa_butter::archive::segment::{MANIFEST_CHUNK_SEGMENTS, SegmentEntry};

    fn entry(n: u64) -> SegmentEntry {
        let at = "2026-03-01T10:00:00Z".parse().expect("time");
        SegmentEntry {
            key: format!("coordination/2026/03/01/{n}.ndjson.gz"),
            first: n * 10 + 1,
            last: n * 10 + 10,
            events: 10,
            bytes: 100,
            sha256: String::new(),
            first_stored_at: at,
            last_stored_at: at,
        }
    }

    /// Written as the archiver writes it, the manifest is chunks of at most
    /// `MANIFEST_CHUNK_SEGMENTS`, and reads back whole and in order.
    #[tokio::test]
    async fn the_manifest_is_written_in_bounded_chunks_and_read_back_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ArchiveStore::local(dir.path()).expect("store");
        let segments = 2 * MANIFEST_CHUNK_SEGMENTS as u64 + 50;
        let mut last = store
            .last_manifest_chunk("coordination", "s")
            .await
            .expect("none yet");
        for n in 0..segments {
            last = last.with_segment(entry(n));
            store.put_manifest_chunk(&last).await.expect("written");
            if n == segments - 1 {
                // The same range written again (after a restart) replaces
                // its entry rather than opening a chunk.
                last = last.with_segment(entry(n));
                store.put_manifest_chunk(&last).await.expect("written");
            }
        }
        let chunks = store
            .keys(&manifest_prefix("coordination"))
            .await
            .expect("keys");
        assert_eq!(chunks.len(), 3, "{chunks:?}");
        for key in &chunks {
            let chunk = store.manifest_chunk(key).await.expect("chunk");
            assert!(chunk.segments.len() <= MANIFEST_CHUNK_SEGMENTS);
            assert_eq!(key, &chunk.chunk_key());
        }
        let whole = store.manifest("coordination", "s").await.expect("whole");
        assert_eq!(whole.segments.len() as u64, segments);
        assert!(whole.discontinuities().is_empty());
        assert_eq!(whole.last(), segments * 10);
        let tail = store
            .last_manifest_chunk("coordination", "s")
            .await
            .expect("tail");
        assert_eq!(tail.segments.len(), 50);
        assert_eq!(tail.last(), whole.last());
    }
}
