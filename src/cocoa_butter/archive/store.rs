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
use super::segment::{Manifest, manifest_key};

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

    /// The domain's manifest, empty when it has none yet.
    pub async fn manifest(&self, domain: &str, stream: &str) -> Result<Manifest, ArchiveError> {
        let key = manifest_key(domain);
        match self.get(&key).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|err| ArchiveError::Corrupt {
                key,
                reason: err.to_string(),
            }),
            None => Ok(Manifest {
                domain: domain.to_string(),
                stream: stream.to_string(),
                segments: Vec::new(),
            }),
        }
    }

    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<(), ArchiveError> {
        let mut text = serde_json::to_vec_pretty(manifest).map_err(ArchiveError::io)?;
        text.push(b'\n');
        self.put(&manifest_key(&manifest.domain), text).await
    }
}
