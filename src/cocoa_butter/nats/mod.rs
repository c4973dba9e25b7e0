//! Everything the runtime does on NATS JetStream, one file per job:
//!
//! - `connect`: the connection and its options (credentials, TLS, pings),
//!   and the warnings while NATS cannot be reached;
//! - `provision`: streams, consumers and bucket storage, created when
//!   missing and checked for drift when present (one sequence, used by the
//!   runtime and `streams ensure` alike);
//! - `status`: a room's stream and consumer as the server has them;
//! - `publish`: a room's outputs as envelopes, with derived ids and headers;
//! - `pull`: the puller the consumer engine reads deliveries from;
//! - `store`: key-value buckets and object stores, timed and traced.
//!
//! The streams' settings (replicas, retention, placement) are the
//! `[streams]` section's, in `streams.rs`.
//!
//! Dead letters are written by `dlq.rs`, which owns their whole format.

mod connect;
mod provision;
mod publish;
pub mod pull;
mod status;
mod store;

pub use connect::{connect, connect_options, explain_connect_failure};
pub(crate) use provision::bucket_storage_or_report;
pub use provision::{
    OrderingChange, PINNED_GROUP, bind_consumer, consumer_config, ensure_consumer, ensure_stream,
};
pub(crate) use publish::header_safe;
pub use publish::{EncodedOutput, OutputEncoder, PublishError, Publisher, event_headers};
pub use status::{ConsumerStatus, Replica, Replication, StreamLimits, StreamStatus, room_status};
pub use store::{Kv, KvBucket, ObjectBucket, Objects, StoreError, Written};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{key}: {reason}")]
    Credentials { key: &'static str, reason: String },
    #[error("stream {stream}: {reason}")]
    StreamConflict { stream: String, reason: String },
    /// The server refused the configured replicas, limits or placement
    /// (too few servers for the replicas: "insufficient resources").
    #[error("stream {stream}: {key}: {reason}")]
    StreamSettings {
        stream: String,
        key: String,
        reason: String,
    },
    #[error("stream {stream} does not exist and nats.provision is false")]
    StreamMissing { stream: String },
    #[error("consumer {consumer} on {stream}: {reason}")]
    ConsumerConflict {
        stream: String,
        consumer: String,
        reason: String,
    },
    #[error("consumer {consumer} on {stream} does not exist and nats.provision is false")]
    ConsumerMissing { stream: String, consumer: String },
    /// The server could not be asked; worth retrying.
    #[error("JetStream request failed: {0}")]
    Unavailable(#[source] BoxError),
    /// A stream the server did not answer for.
    #[error(
        "stream {stream}: {source} (on a cluster: the stream or the cluster has no leader, a \
         lost quorum or an election under way)"
    )]
    StreamUnavailable {
        stream: String,
        #[source]
        source: BoxError,
    },
}

/// An error kept with its own type and chain (`Error::source`), not as
/// its text.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn unavailable(err: impl Into<BoxError>) -> BusError {
    BusError::Unavailable(err.into())
}

/// What making sure of a stream, consumer or bucket found, so the runtime
/// can log it and `streams ensure` can report it from the same code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisioned {
    /// It was there and matches the configuration.
    Present,
    /// It was missing and has been created.
    Created,
    /// It was there with other settings, each `setting: server → configured`;
    /// `updated` says whether the server now has the configured ones.
    Drifted { drift: Vec<String>, updated: bool },
}
