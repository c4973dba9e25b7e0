//! A room's key-value buckets and object stores, opened (created when
//! missing) by `Room::prepare`, timed and traced on every call.

use std::time::Instant;

use async_nats::jetstream::{self, kv, object_store, stream};
use bytes::Bytes;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::cocoa_butter::metrics::{RoomMetrics, StoreLabels};
use crate::cocoa_butter::streams::BucketStorage;
use crate::cocoa_butter::telemetry::{self};

use super::{BoxError, Provisioned, bucket_storage_or_report};

/// A bucket that could not be opened, or was used before it was.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Creating it failed (too few servers for its replicas, say).
    #[error("{kind} {bucket} (streams.buckets.replicas = {replicas}): {source}")]
    Create {
        kind: &'static str,
        bucket: String,
        replicas: usize,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Used before `Room::prepare` opened it: retried like any NATS failure.
    #[error("{kind} {bucket} is not open yet")]
    NotOpen { kind: &'static str, bucket: String },
    /// A write NATS refused or did not answer (not a lost race).
    #[error("writing {key}: {source}")]
    Write { key: String, source: BoxError },
}

/// What a compare-and-set write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored, at this revision.
    Stored(u64),
    /// Someone else wrote the key first: read it again and retry.
    Conflict,
}

/// A room's key-value bucket: named at build time, opened (and created
/// when missing: file storage, one revision per key) by `Room::prepare`
/// once NATS is reachable, then shared by every handler and API call.
/// Every operation is timed into the room's metrics and, with tracing on,
/// gets a client span.
pub struct KvBucket {
    js: jetstream::Context,
    bucket: String,
    description: &'static str,
    storage: BucketStorage,
    metrics: Option<RoomMetrics>,
    store: tokio::sync::OnceCell<kv::Store>,
}

impl KvBucket {
    /// A bucket outside any room (desired state, replays).
    pub fn new(
        js: jetstream::Context,
        bucket: &str,
        description: &'static str,
        storage: BucketStorage,
    ) -> Self {
        KvBucket {
            js,
            bucket: bucket.to_string(),
            description,
            storage,
            metrics: None,
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// Times every operation into a room's metrics.
    pub fn observed(mut self, metrics: RoomMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn name(&self) -> &str {
        &self.bucket
    }

    /// Opens the bucket unless it is open already.
    pub async fn open(&self) -> Result<(), StoreError> {
        self.ensure().await.map(|_| ())
    }

    /// Opens the bucket, saying whether it had to be created or its
    /// replicas and placement put right ([`Provisioned::Present`] when it
    /// was open already).
    pub async fn ensure(&self) -> Result<Provisioned, StoreError> {
        let found = std::sync::Mutex::new(Provisioned::Present);
        let found_ref = &found;
        self.store
            .get_or_try_init(|| async move {
                if let Ok(store) = self.js.get_key_value(&self.bucket).await {
                    let checked = bucket_storage_or_report(
                        &self.js,
                        &format!("KV_{}", self.bucket),
                        &self.storage,
                    )
                    .await;
                    *found_ref.lock().unwrap_or_else(|e| e.into_inner()) = checked;
                    return Ok(store);
                }
                *found_ref.lock().unwrap_or_else(|e| e.into_inner()) = Provisioned::Created;
                self.js
                    .create_key_value(kv::Config {
                        bucket: self.bucket.clone(),
                        description: self.description.to_string(),
                        history: 1,
                        storage: stream::StorageType::File,
                        num_replicas: self.storage.replicas,
                        placement: self.storage.placement(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|err| StoreError::Create {
                        kind: "key-value bucket",
                        bucket: self.bucket.clone(),
                        replicas: self.storage.replicas,
                        source: Box::new(err),
                    })
            })
            .await?;
        Ok(found.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// The open bucket; before `open`, a transient failure (retried).
    pub fn store(&self) -> Result<Kv<'_>, StoreError> {
        let store = self.store.get().ok_or_else(|| StoreError::NotOpen {
            kind: "key-value bucket",
            bucket: self.bucket.clone(),
        })?;
        Ok(Kv {
            store,
            observer: StoreObserver {
                store: "kv",
                bucket: &self.bucket,
                metrics: self.metrics.as_ref(),
            },
        })
    }
}

/// Times one store operation into the metrics and wraps it in a span.
#[derive(Clone, Copy)]
struct StoreObserver<'a> {
    store: &'static str,
    bucket: &'a str,
    metrics: Option<&'a RoomMetrics>,
}

impl StoreObserver<'_> {
    /// `conflict` tells a lost compare-and-set from a failure.
    async fn observe<T, E: std::fmt::Display>(
        self,
        operation: &'static str,
        work: impl Future<Output = Result<T, E>>,
        conflict: impl FnOnce(&E) -> bool,
    ) -> Result<T, E> {
        let span = telemetry::store_span(self.store, operation, self.bucket);
        let started = Instant::now();
        let result = work.instrument(span.clone()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(err) if conflict(err) => "conflict",
            Err(err) => {
                span.set_status(opentelemetry::trace::Status::error(err.to_string()));
                "error"
            }
        };
        if let Some(metrics) = self.metrics {
            metrics.store_operation(
                StoreLabels {
                    store: self.store,
                    bucket: self.bucket.to_string(),
                    operation,
                    outcome,
                },
                started.elapsed().as_secs_f64(),
            );
        }
        result
    }
}

/// An open key-value bucket: the operations rooms use, observed.
#[derive(Clone, Copy)]
pub struct Kv<'a> {
    store: &'a kv::Store,
    observer: StoreObserver<'a>,
}

/// Whether a key (or an object name's subject token) is short enough to
/// put on the wire; see [`crate::cocoa_butter::keys::MAX_KEY_BYTES`].
fn key_fits(token_len: usize) -> bool {
    token_len <= crate::cocoa_butter::keys::MAX_KEY_BYTES
}

fn key_too_long(len: usize) -> String {
    format!(
        "a key of {len} bytes is longer than the {} the stores accept",
        crate::cocoa_butter::keys::MAX_KEY_BYTES
    )
}

/// Refuses a write whose key does not fit, as the store's own error of
/// `kind` (each write has its error type).
fn writable_key<K>(key: &str, kind: K) -> Result<(), async_nats::error::Error<K>>
where
    K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq,
{
    if key_fits(key.len()) {
        Ok(())
    } else {
        Err(async_nats::error::Error::with_source(
            kind,
            key_too_long(key.len()),
        ))
    }
}

/// Keys longer than `MAX_KEY_BYTES` never reach NATS (its server would
/// drop the whole connection): writes are refused as invalid keys, reads
/// find nothing, since no such key can have been written.
impl Kv<'_> {
    pub async fn entry(&self, key: impl Into<String>) -> Result<Option<kv::Entry>, kv::EntryError> {
        let key = key.into();
        if !key_fits(key.len()) {
            return Ok(None);
        }
        self.observer
            .observe("entry", self.store.entry(key), |_| false)
            .await
    }

    pub async fn get(&self, key: impl Into<String>) -> Result<Option<Bytes>, kv::EntryError> {
        let key = key.into();
        if !key_fits(key.len()) {
            return Ok(None);
        }
        self.observer
            .observe("get", self.store.get(key), |_| false)
            .await
    }

    pub async fn put(&self, key: impl AsRef<str>, value: Bytes) -> Result<u64, kv::PutError> {
        writable_key(key.as_ref(), kv::PutErrorKind::InvalidKey)?;
        self.observer
            .observe("put", self.store.put(key, value), |_| false)
            .await
    }

    /// Writes `key` only if it has no value yet.
    pub async fn create(&self, key: impl AsRef<str>, value: Bytes) -> Result<u64, kv::CreateError> {
        writable_key(key.as_ref(), kv::CreateErrorKind::InvalidKey)?;
        self.observer
            .observe("create", self.store.create(key, value), |err| {
                err.kind() == kv::CreateErrorKind::AlreadyExists
            })
            .await
    }

    /// Writes `key` only if its revision is still `revision`.
    pub async fn update(
        &self,
        key: impl AsRef<str>,
        value: Bytes,
        revision: u64,
    ) -> Result<u64, kv::UpdateError> {
        writable_key(key.as_ref(), kv::UpdateErrorKind::InvalidKey)?;
        self.observer
            .observe("update", self.store.update(key, value, revision), |err| {
                err.kind() == kv::UpdateErrorKind::WrongLastRevision
            })
            .await
    }

    /// The one compare-and-set of the rooms: writes `value` at `key` if
    /// the key is still at `revision` (`None`: absent, so it is created). A
    /// lost race is [`Written::Conflict`], for the caller to read again and
    /// retry; anything else NATS answers is an error.
    pub async fn write_if(
        &self,
        key: &str,
        value: Bytes,
        revision: Option<u64>,
    ) -> Result<Written, StoreError> {
        let failed = |err: BoxError| StoreError::Write {
            key: key.to_string(),
            source: err,
        };
        match revision {
            None => match self.create(key, value).await {
                Ok(revision) => Ok(Written::Stored(revision)),
                Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                    Ok(Written::Conflict)
                }
                Err(err) => Err(failed(err.into())),
            },
            Some(revision) => match self.update(key, value, revision).await {
                Ok(revision) => Ok(Written::Stored(revision)),
                Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    Ok(Written::Conflict)
                }
                Err(err) => Err(failed(err.into())),
            },
        }
    }

    pub async fn keys(&self) -> Result<kv::Keys, kv::HistoryError> {
        self.observer
            .observe("keys", self.store.keys(), |_| false)
            .await
    }

    /// The key's latest value (if any), then every change to it. Only
    /// starting the watch is observed: the watch itself lives on.
    pub async fn watch_with_history(
        &self,
        key: impl AsRef<str>,
    ) -> Result<kv::Watch, kv::WatchError> {
        self.observer
            .observe("watch", self.store.watch_with_history(key), |_| false)
            .await
    }
}

/// A room's object store bucket, opened (and created when missing, file
/// storage) by `Room::prepare`, and observed, like [`KvBucket`].
pub struct ObjectBucket {
    js: jetstream::Context,
    bucket: String,
    description: &'static str,
    storage: BucketStorage,
    metrics: RoomMetrics,
    store: tokio::sync::OnceCell<object_store::ObjectStore>,
}

impl ObjectBucket {
    pub fn new(
        js: jetstream::Context,
        bucket: &str,
        description: &'static str,
        storage: BucketStorage,
        metrics: RoomMetrics,
    ) -> Self {
        ObjectBucket {
            js,
            bucket: bucket.to_string(),
            description,
            storage,
            metrics,
            store: tokio::sync::OnceCell::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.bucket
    }

    pub async fn open(&self) -> Result<(), StoreError> {
        self.store
            .get_or_try_init(|| async {
                if let Ok(store) = self.js.get_object_store(&self.bucket).await {
                    bucket_storage_or_report(
                        &self.js,
                        &format!("OBJ_{}", self.bucket),
                        &self.storage,
                    )
                    .await;
                    return Ok(store);
                }
                self.js
                    .create_object_store(object_store::Config {
                        bucket: self.bucket.clone(),
                        description: Some(self.description.to_string()),
                        storage: stream::StorageType::File,
                        num_replicas: self.storage.replicas,
                        placement: self.storage.placement(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|err| StoreError::Create {
                        kind: "object store",
                        bucket: self.bucket.clone(),
                        replicas: self.storage.replicas,
                        source: Box::new(err),
                    })
            })
            .await
            .map(|_| ())
    }

    pub fn store(&self) -> Result<Objects<'_>, StoreError> {
        let store = self.store.get().ok_or_else(|| StoreError::NotOpen {
            kind: "object store",
            bucket: self.bucket.clone(),
        })?;
        Ok(Objects {
            store,
            observer: StoreObserver {
                store: "object",
                bucket: &self.bucket,
                metrics: Some(&self.metrics),
            },
        })
    }
}

/// An open object store: the operations rooms use, observed.
#[derive(Clone, Copy)]
pub struct Objects<'a> {
    store: &'a object_store::ObjectStore,
    observer: StoreObserver<'a>,
}

/// The length of an object name's subject token: the name in base64.
fn object_token_len(name: &str) -> usize {
    name.len().div_ceil(3) * 4
}

/// Names whose token is longer than `MAX_KEY_BYTES` never reach NATS, as
/// with [`Kv`]: writes are refused, reads find nothing.
impl Objects<'_> {
    pub async fn info(
        &self,
        name: &str,
    ) -> Result<object_store::ObjectInfo, object_store::InfoError> {
        if !key_fits(object_token_len(name)) {
            return Err(object_store::InfoError::new(
                object_store::InfoErrorKind::NotFound,
            ));
        }
        self.observer
            .observe("info", self.store.info(name), |_| false)
            .await
    }

    /// Opens an object for reading (the read itself is the caller's).
    pub async fn get(&self, name: &str) -> Result<object_store::Object, object_store::GetError> {
        if !key_fits(object_token_len(name)) {
            return Err(object_store::GetError::new(
                object_store::GetErrorKind::NotFound,
            ));
        }
        self.observer
            .observe("get", self.store.get(name), |_| false)
            .await
    }

    pub async fn put(
        &self,
        metadata: object_store::ObjectMetadata,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<object_store::ObjectInfo, object_store::PutError> {
        let len = object_token_len(&metadata.name);
        if !key_fits(len) {
            return Err(object_store::PutError::with_source(
                object_store::PutErrorKind::InvalidName,
                key_too_long(len),
            ));
        }
        self.observer
            .observe("put", self.store.put(metadata, data), |_| false)
            .await
    }
}
