//! A room's stream and consumer as the server has them, for `streams
//! status`, `/info` and the replication gauges.

use async_nats::jetstream::{self, stream};

use crate::cocoa_butter::config::RoomSettings;

use super::{BusError, unavailable};

/// A room's stream as the server has it, for `streams status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub exists: bool,
    pub messages: u64,
    pub bytes: u64,
    /// When the last message was stored (RFC 3339).
    pub last_activity: Option<String>,
    /// Its leader and how each replica keeps up.
    pub replication: Replication,
    /// What the server keeps it to.
    pub limits: Option<StreamLimits>,
}

/// A stream's limits as the server has them (-1: none).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamLimits {
    pub replicas: usize,
    /// Seconds; 0: no age limit.
    pub max_age_seconds: u64,
    pub max_bytes: i64,
    pub max_msg_size: i32,
    pub discard: String,
    pub compression: String,
}

/// Where a stream or consumer lives on a cluster and how its copies keep
/// up; on a single server only `leader` is set (the server's name).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Replication {
    pub cluster: Option<String>,
    /// `None` while it has no leader: a lost quorum, an election under way.
    pub leader: Option<String>,
    /// The copies other than the leader's.
    pub replicas: Vec<Replica>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Replica {
    pub name: String,
    /// Up to date with the leader.
    pub current: bool,
    pub offline: bool,
    /// Operations it is behind the leader.
    pub lag: u64,
    /// Milliseconds since the leader last heard from it.
    pub active_ms: u64,
}

impl Replication {
    pub fn from_info(cluster: Option<&stream::ClusterInfo>) -> Self {
        let Some(cluster) = cluster else {
            return Replication::default();
        };
        Replication {
            cluster: cluster.name.clone(),
            leader: cluster.leader.clone().filter(|leader| !leader.is_empty()),
            replicas: cluster
                .replicas
                .iter()
                .map(|peer| Replica {
                    name: peer.name.clone(),
                    current: peer.current,
                    offline: peer.offline,
                    lag: peer.lag.unwrap_or(0),
                    active_ms: u64::try_from(peer.active.as_millis()).unwrap_or(u64::MAX),
                })
                .collect(),
        }
    }

    /// Copies that are up to date: the leader's and every current replica.
    pub fn current_copies(&self) -> usize {
        usize::from(self.leader.is_some())
            + self
                .replicas
                .iter()
                .filter(|r| r.current && !r.offline)
                .count()
    }

    /// How far the most-lagging replica is behind, in operations.
    pub fn max_lag(&self) -> u64 {
        self.replicas.iter().map(|r| r.lag).max().unwrap_or(0)
    }
}

/// A room's durable consumer as the server has it, for `streams status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub exists: bool,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Delivered more than once, not yet acknowledged.
    pub redeliveries: u64,
    /// When the consumer last delivered (RFC 3339).
    pub last_activity: Option<String>,
    /// Its leader and how each replica keeps up (consumers follow their
    /// stream's replicas).
    pub replication: Replication,
}

fn rfc3339(time: async_nats::datetime::DateTime) -> Option<String> {
    chrono::DateTime::from_timestamp(time.unix_timestamp(), time.nanosecond())
        .map(|t| crate::cocoa_butter::envelope::rfc3339(&t))
}

/// Reads the room's stream and consumer without changing either; a missing
/// one is reported as such, not as an error.
pub async fn room_status(
    js: &jetstream::Context,
    room: &RoomSettings,
) -> Result<(StreamStatus, ConsumerStatus), BusError> {
    let mut stream_status = StreamStatus {
        name: room.stream.clone(),
        exists: false,
        messages: 0,
        bytes: 0,
        last_activity: None,
        replication: Replication::default(),
        limits: None,
    };
    let mut consumer_status = ConsumerStatus {
        name: room.durable_name.clone(),
        exists: false,
        pending: 0,
        ack_pending: 0,
        redeliveries: 0,
        last_activity: None,
        replication: Replication::default(),
    };
    let stream = match js.get_stream(&room.stream).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok((stream_status, consumer_status));
        }
        Err(err) => return Err(unavailable(err)),
    };
    // `get_stream` has just fetched the stream's info.
    let info = stream.cached_info().clone();
    stream_status.exists = true;
    stream_status.messages = info.state.messages;
    stream_status.bytes = info.state.bytes;
    if info.state.last_sequence > 0 {
        stream_status.last_activity = rfc3339(info.state.last_timestamp);
    }
    stream_status.replication = Replication::from_info(info.cluster.as_ref());
    let config = &info.config;
    stream_status.limits = Some(StreamLimits {
        replicas: config.num_replicas.max(1),
        max_age_seconds: config.max_age.as_secs(),
        max_bytes: if config.max_bytes <= 0 {
            -1
        } else {
            config.max_bytes
        },
        max_msg_size: if config.max_message_size <= 0 {
            -1
        } else {
            config.max_message_size
        },
        discard: format!("{:?}", config.discard).to_lowercase(),
        compression: match config.compression {
            Some(stream::Compression::S2) => "s2".into(),
            _ => "none".into(),
        },
    });
    match stream.consumer_info(&room.durable_name).await {
        Ok(info) => {
            consumer_status.exists = true;
            consumer_status.pending = info.num_pending;
            consumer_status.ack_pending = info.num_ack_pending as u64;
            consumer_status.redeliveries = info.num_redelivered as u64;
            consumer_status.last_activity = info.delivered.last_active.and_then(rfc3339);
            consumer_status.replication = Replication::from_info(info.cluster.as_ref());
        }
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::ConsumerInfoErrorKind::NotFound
            ) || matches!(err.kind(), jetstream::context::ConsumerInfoErrorKind::JetStream(ref js_err)
                    if js_err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) => {}
        Err(err) => return Err(unavailable(err)),
    }
    Ok((stream_status, consumer_status))
}
