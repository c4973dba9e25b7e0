//! `[streams]`: how the streams and buckets the factory creates are kept on
//! JetStream — replicas, retention limits, compression, placement — and
//! the drift between that and what a server has.
//!
//! This part owns its configuration section (with the per-room override
//! `rooms.<room>.streams` and the DLQ's `streams.dlq`), its validation and
//! its error. `nats::ensure_stream` and the buckets apply what it resolves.
//!
//! Every stream discards its OLDEST messages at a limit (`discard = old`):
//! a domain stream is a log of what happened, and refusing new events
//! would stop the producers instead. What the limits removed before a room
//! consumed it is counted (see `docs/OPERATIONS.md`).

use std::time::Duration;

use async_nats::jetstream::stream;
use serde::{Deserialize, Serialize};

/// Seed 004 gives the refinement stream 180 days; the other domains and the
/// DLQ had no limit at all ("the infrastructure's default", i.e. forever).
/// One default for every stream keeps the platform's one stated figure.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(180 * 24 * 60 * 60);

/// Room for the headers a dead letter adds to the original body (reason,
/// a detail of at most 512 characters, room, deliveries, the original
/// subject, stream and sequence, and the original's own headers).
pub const DEAD_LETTER_HEADER_BYTES: i64 = 16 * 1024;

/// Room for the headers on an envelope the factory publishes (message id,
/// event type, correlation id, trace context): the server counts them in a
/// message's size against `max_msg_size`.
pub const ENVELOPE_HEADER_BYTES: usize = 8 * 1024;

/// A refused `[streams]` setting, naming its key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidStreamSetting {
    pub key: String,
    pub message: String,
}

fn invalid(key: &str, message: impl Into<String>) -> InvalidStreamSetting {
    InvalidStreamSetting {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    /// S2 on the server's disk: less storage, a little more CPU per message.
    S2,
}

/// Where JetStream places a stream's replicas: a cluster by name and/or
/// servers carrying every one of the tags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Placement {
    pub cluster: Option<String>,
    pub tags: Vec<String>,
}

impl Placement {
    fn to_server(&self) -> Option<stream::Placement> {
        if self.cluster.is_none() && self.tags.is_empty() {
            return None;
        }
        Some(stream::Placement {
            cluster: self.cluster.clone(),
            tags: self.tags.clone(),
        })
    }
}

/// `[streams]`: what every stream the factory creates gets, unless a room
/// (`rooms.<room>.streams`) or the DLQ (`streams.dlq`) says otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// Copies of each stream on distinct servers (1–5; 3 on a cluster).
    pub replicas: usize,
    /// Messages older than this are removed; `0s` keeps them forever.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The stream's size on disk at most; 0 = no limit.
    pub max_bytes: u64,
    /// The largest message the stream stores; 0 = the server's max_payload.
    pub max_msg_size: u32,
    pub compression: Compression,
    pub placement: Placement,
    /// The dead-letter stream's own values.
    pub dlq: StreamOverrides,
    /// Key-value buckets and the object store: replicas and placement of
    /// their own, else those above.
    pub buckets: BucketOverrides,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            replicas: 1,
            max_age: DEFAULT_MAX_AGE,
            max_bytes: 0,
            max_msg_size: 0,
            compression: Compression::None,
            placement: Placement::default(),
            dlq: StreamOverrides::default(),
            buckets: BucketOverrides::default(),
        }
    }
}

/// One stream's values over `[streams]`; unset keys keep the section's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamOverrides {
    pub replicas: Option<usize>,
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub max_msg_size: Option<u32>,
    pub compression: Option<Compression>,
    pub placement: Option<Placement>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BucketOverrides {
    pub replicas: Option<usize>,
    pub placement: Option<Placement>,
}

/// How one stream is kept, every value resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamStorage {
    /// The configuration key these values come from (`streams`,
    /// `rooms.conch.streams`, `streams.dlq`), for messages.
    pub key: String,
    pub replicas: usize,
    pub max_age: Duration,
    /// -1: no limit (JetStream's spelling).
    pub max_bytes: i64,
    /// -1: no limit.
    pub max_msg_size: i32,
    pub compression: Compression,
    pub placement: Placement,
}

/// How a key-value bucket or object store is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BucketStorage {
    pub replicas: usize,
    pub placement: Placement,
    /// Put drifted replicas and placement right in place (`nats.provision`);
    /// `false` only reports them.
    pub provision: bool,
}

impl Default for BucketStorage {
    fn default() -> Self {
        BucketStorage {
            replicas: 1,
            placement: Placement::default(),
            provision: true,
        }
    }
}

impl BucketStorage {
    pub fn placement(&self) -> Option<stream::Placement> {
        self.placement.to_server()
    }
}

fn check_replicas(key: &str, replicas: usize) -> Result<usize, InvalidStreamSetting> {
    if (1..=5).contains(&replicas) {
        Ok(replicas)
    } else {
        Err(invalid(
            &format!("{key}.replicas"),
            format!("{replicas} is not 1–5 (JetStream keeps at most 5 replicas; 3 on a cluster)"),
        ))
    }
}

fn check_placement(key: &str, placement: &Placement) -> Result<(), InvalidStreamSetting> {
    if placement
        .cluster
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err(invalid(
            &format!("{key}.placement.cluster"),
            "is empty; leave it out to place anywhere",
        ));
    }
    if placement.tags.iter().any(|tag| tag.trim().is_empty()) {
        return Err(invalid(
            &format!("{key}.placement.tags"),
            "has an empty tag",
        ));
    }
    Ok(())
}

fn limit_i64(value: u64) -> i64 {
    if value == 0 {
        -1
    } else {
        i64::try_from(value).unwrap_or(i64::MAX)
    }
}

fn size_i32(key: &str, value: u32) -> Result<i32, InvalidStreamSetting> {
    if value == 0 {
        return Ok(-1);
    }
    i32::try_from(value).map_err(|_| {
        invalid(
            &format!("{key}.max_msg_size"),
            format!("{value} is over JetStream's largest ({})", i32::MAX),
        )
    })
}

impl StreamsConfig {
    fn resolve(
        &self,
        key: &str,
        over: &StreamOverrides,
    ) -> Result<StreamStorage, InvalidStreamSetting> {
        let replicas = check_replicas(key, over.replicas.unwrap_or(self.replicas))?;
        let placement = over
            .placement
            .clone()
            .unwrap_or_else(|| self.placement.clone());
        check_placement(key, &placement)?;
        Ok(StreamStorage {
            key: key.to_string(),
            replicas,
            max_age: over.max_age.unwrap_or(self.max_age),
            max_bytes: limit_i64(over.max_bytes.unwrap_or(self.max_bytes)),
            max_msg_size: size_i32(key, over.max_msg_size.unwrap_or(self.max_msg_size))?,
            compression: over.compression.unwrap_or(self.compression),
            placement,
        })
    }

    /// A room's domain stream: `[streams]` under `rooms.<room>.streams`.
    /// Its largest message is never below `limits.max_envelope_bytes`, or
    /// envelopes the rooms accept could not be published at all.
    pub fn for_room(
        &self,
        room: &str,
        over: &StreamOverrides,
        max_envelope_bytes: usize,
    ) -> Result<StreamStorage, InvalidStreamSetting> {
        let key = if over.is_empty() {
            "streams".to_string()
        } else {
            format!("rooms.{room}.streams")
        };
        let storage = self.resolve(&key, over)?;
        let needed = max_envelope_bytes.saturating_add(ENVELOPE_HEADER_BYTES);
        if storage.max_msg_size >= 0 && (storage.max_msg_size as usize) < needed {
            return Err(invalid(
                &format!("{key}.max_msg_size"),
                format!(
                    "{} is below limits.max_envelope_bytes ({max_envelope_bytes}) plus \
                     {ENVELOPE_HEADER_BYTES} bytes of headers: envelopes the room accepts could \
                     not be stored",
                    storage.max_msg_size
                ),
            ));
        }
        Ok(storage)
    }

    /// The DLQ holds dead letters of every domain stream: the original body
    /// plus the dead-letter headers, so its largest message must be above
    /// the largest domain stream's by those headers (or an
    /// `envelope_too_large` dead letter could not be stored).
    pub fn for_dlq(
        &self,
        domain_streams: &[&StreamStorage],
    ) -> Result<StreamStorage, InvalidStreamSetting> {
        let storage = self.resolve("streams.dlq", &self.dlq)?;
        if storage.max_msg_size >= 0 {
            let largest = domain_streams.iter().map(|s| s.max_msg_size).max();
            let unlimited = domain_streams.iter().any(|s| s.max_msg_size < 0);
            if unlimited {
                return Err(invalid(
                    "streams.dlq.max_msg_size",
                    "is set while a domain stream has no max_msg_size: a dead letter of its \
                     largest message could not be stored; set the domain streams' too",
                ));
            }
            if let Some(largest) = largest {
                let needed = i64::from(largest) + DEAD_LETTER_HEADER_BYTES;
                if i64::from(storage.max_msg_size) < needed {
                    return Err(invalid(
                        "streams.dlq.max_msg_size",
                        format!(
                            "{} is below the largest domain stream's max_msg_size ({largest}) \
                             plus {DEAD_LETTER_HEADER_BYTES} bytes of dead-letter headers",
                            storage.max_msg_size
                        ),
                    ));
                }
            }
        }
        Ok(storage)
    }

    pub fn for_buckets(&self) -> Result<BucketStorage, InvalidStreamSetting> {
        let key = "streams.buckets";
        let replicas = check_replicas(key, self.buckets.replicas.unwrap_or(self.replicas))?;
        let placement = self
            .buckets
            .placement
            .clone()
            .unwrap_or_else(|| self.placement.clone());
        check_placement(key, &placement)?;
        Ok(BucketStorage {
            replicas,
            placement,
            provision: true,
        })
    }
}

impl StreamOverrides {
    fn is_empty(&self) -> bool {
        self.replicas.is_none()
            && self.max_age.is_none()
            && self.max_bytes.is_none()
            && self.max_msg_size.is_none()
            && self.compression.is_none()
            && self.placement.is_none()
    }
}

/// The streams a room's key-value buckets and object stores live on
/// (`KV_<bucket>`, `OBJ_<bucket>`), registered as the room builds them, so
/// the engine can ask whether they have a leader when a store call fails.
#[derive(Debug, Clone, Default)]
pub struct StoreStreams(std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>);

impl StoreStreams {
    pub fn register(&self, stream: String) {
        match self.0.lock() {
            Ok(mut names) => names.insert(stream),
            Err(poisoned) => poisoned.into_inner().insert(stream),
        };
    }

    pub fn names(&self) -> Vec<String> {
        match self.0.lock() {
            Ok(names) => names.iter().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
        }
    }
}

/// One setting a server's stream has other than configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The configuration key (`streams.replicas`).
    pub key: String,
    pub actual: String,
    pub configured: String,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} → {}", self.key, self.actual, self.configured)
    }
}

fn show_limit(value: i64) -> String {
    if value < 0 {
        "unlimited".into()
    } else {
        value.to_string()
    }
}

fn show_age(age: Duration) -> String {
    const DAY: u64 = 86_400;
    if age.is_zero() {
        "unlimited".into()
    } else if age.subsec_nanos() == 0 && age.as_secs().is_multiple_of(DAY) {
        // humantime would say "5months 27days 19h 12m" for 180 days.
        format!("{}d", age.as_secs() / DAY)
    } else {
        humantime::format_duration(age).to_string()
    }
}

/// JetStream reports "no limit" as -1, and a configuration that never set
/// one as 0: both are no limit.
fn server_limit(value: i64) -> i64 {
    if value <= 0 { -1 } else { value }
}

fn show_placement(placement: &Option<stream::Placement>) -> String {
    match placement {
        None => "anywhere".into(),
        Some(p) => format!(
            "cluster={} tags=[{}]",
            p.cluster.as_deref().unwrap_or("any"),
            p.tags.join(",")
        ),
    }
}

fn server_compression(compression: Compression) -> Option<stream::Compression> {
    match compression {
        Compression::None => Some(stream::Compression::None),
        Compression::S2 => Some(stream::Compression::S2),
    }
}

fn same_compression(actual: &Option<stream::Compression>, wanted: Compression) -> bool {
    let actual = actual.clone().unwrap_or(stream::Compression::None);
    Some(actual) == server_compression(wanted)
}

fn same_placement(actual: &Option<stream::Placement>, wanted: &Option<stream::Placement>) -> bool {
    let empty = |p: &Option<stream::Placement>| {
        p.as_ref()
            .is_none_or(|p| p.cluster.is_none() && p.tags.is_empty())
    };
    match (actual, wanted) {
        (a, w) if empty(a) && empty(w) => true,
        // The server fills in the cluster it placed the stream in when
        // only tags were asked for: compare what was asked.
        (Some(a), Some(w)) => {
            let mut a_tags = a.tags.clone();
            let mut w_tags = w.tags.clone();
            a_tags.sort();
            w_tags.sort();
            a_tags == w_tags && (w.cluster.is_none() || a.cluster == w.cluster)
        }
        (None, Some(w)) => w.cluster.is_none() && w.tags.is_empty(),
        _ => false,
    }
}

impl StreamStorage {
    /// Writes these values into a stream configuration (a new one, or a
    /// copy of the server's, for an update that keeps everything else).
    pub fn apply(&self, config: &mut stream::Config) {
        config.num_replicas = self.replicas;
        config.max_age = self.max_age;
        config.max_bytes = self.max_bytes;
        config.max_message_size = self.max_msg_size;
        config.discard = stream::DiscardPolicy::Old;
        config.compression = server_compression(self.compression);
        config.placement = self.placement.to_server();
    }

    /// What the server's stream has other than these values; each of them
    /// JetStream can change in place (replicas, limits, compression,
    /// placement).
    pub fn drift(&self, actual: &stream::Config) -> Vec<Drift> {
        let key = |field: &str| format!("{}.{field}", self.key);
        let mut drift = Vec::new();
        let mut differs = |field: &str, a: String, c: String| {
            drift.push(Drift {
                key: key(field),
                actual: a,
                configured: c,
            })
        };
        if actual.num_replicas.max(1) != self.replicas {
            differs(
                "replicas",
                actual.num_replicas.max(1).to_string(),
                self.replicas.to_string(),
            );
        }
        if actual.max_age != self.max_age {
            differs("max_age", show_age(actual.max_age), show_age(self.max_age));
        }
        if server_limit(actual.max_bytes) != self.max_bytes {
            differs(
                "max_bytes",
                show_limit(actual.max_bytes),
                show_limit(self.max_bytes),
            );
        }
        if server_limit(actual.max_message_size.into()) != i64::from(self.max_msg_size) {
            differs(
                "max_msg_size",
                show_limit(actual.max_message_size.into()),
                show_limit(self.max_msg_size.into()),
            );
        }
        if actual.discard != stream::DiscardPolicy::Old {
            differs("discard", format!("{:?}", actual.discard), "Old".into());
        }
        if !same_compression(&actual.compression, self.compression) {
            differs(
                "compression",
                format!("{:?}", actual.compression),
                format!("{:?}", self.compression),
            );
        }
        let wanted = self.placement.to_server();
        if !same_placement(&actual.placement, &wanted) {
            differs(
                "placement",
                show_placement(&actual.placement),
                show_placement(&wanted),
            );
        }
        drift
    }
}

impl BucketStorage {
    /// A bucket's stream (`KV_<bucket>`, `OBJ_<bucket>`) other than these.
    pub fn drift(&self, actual: &stream::Config) -> Vec<Drift> {
        let mut drift = Vec::new();
        if actual.num_replicas.max(1) != self.replicas {
            drift.push(Drift {
                key: "streams.buckets.replicas".into(),
                actual: actual.num_replicas.max(1).to_string(),
                configured: self.replicas.to_string(),
            });
        }
        let wanted = self.placement.to_server();
        if !same_placement(&actual.placement, &wanted) {
            drift.push(Drift {
                key: "streams.buckets.placement".into(),
                actual: show_placement(&actual.placement),
                configured: show_placement(&wanted),
            });
        }
        drift
    }

    pub fn apply(&self, config: &mut stream::Config) {
        config.num_replicas = self.replicas;
        config.placement = self.placement.to_server();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(max_msg_size: i32) -> StreamStorage {
        StreamStorage {
            key: "streams".into(),
            replicas: 3,
            max_age: DEFAULT_MAX_AGE,
            max_bytes: -1,
            max_msg_size,
            compression: Compression::None,
            placement: Placement::default(),
        }
    }

    #[test]
    fn defaults_keep_180_days_on_one_replica_without_size_limits() {
        let config = StreamsConfig::default();
        let room = config
            .for_room("conch", &StreamOverrides::default(), 1 << 20)
            .expect("defaults are valid");
        assert_eq!(room.replicas, 1);
        assert_eq!(room.max_age, Duration::from_secs(180 * 86_400));
        assert_eq!((room.max_bytes, room.max_msg_size), (-1, -1));
        assert_eq!(room.key, "streams");
        let dlq = config.for_dlq(&[&room]).expect("defaults are valid");
        assert_eq!(dlq.key, "streams.dlq");
    }

    #[test]
    fn a_room_override_wins_and_is_named_in_errors() {
        let config = StreamsConfig {
            replicas: 3,
            ..Default::default()
        };
        let over = StreamOverrides {
            replicas: Some(7),
            ..Default::default()
        };
        let err = config.for_room("conch", &over, 1024).unwrap_err();
        assert_eq!(err.key, "rooms.conch.streams.replicas");
        let over = StreamOverrides {
            max_age: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let room = config.for_room("conch", &over, 1024).unwrap();
        assert_eq!((room.replicas, room.max_age), (3, Duration::from_secs(60)));
    }

    #[test]
    fn a_domain_stream_never_refuses_an_envelope_the_room_accepts() {
        let config = StreamsConfig {
            max_msg_size: 1000,
            ..Default::default()
        };
        let err = config
            .for_room("mould", &StreamOverrides::default(), 4096)
            .unwrap_err();
        assert_eq!(err.key, "streams.max_msg_size");
        let config = StreamsConfig {
            max_msg_size: 4096 + ENVELOPE_HEADER_BYTES as u32 - 1,
            ..Default::default()
        };
        let err = config
            .for_room("mould", &StreamOverrides::default(), 4096)
            .unwrap_err();
        assert!(err.message.contains("bytes of headers"), "{err}");
    }

    #[test]
    fn the_dlq_holds_the_largest_domain_message_and_its_headers() {
        let mut config = StreamsConfig::default();
        config.dlq.max_msg_size = Some(70_000);
        let err = config.for_dlq(&[&storage(65_536)]).unwrap_err();
        assert_eq!(err.key, "streams.dlq.max_msg_size");
        assert!(err.message.contains("dead-letter headers"), "{err}");
        let err = config.for_dlq(&[&storage(-1)]).unwrap_err();
        assert!(err.message.contains("no max_msg_size"), "{err}");
        config.dlq.max_msg_size = Some(65_536 + 16 * 1024);
        assert!(config.for_dlq(&[&storage(65_536)]).is_ok());
    }

    #[test]
    fn drift_names_each_key_and_an_applied_config_has_none() {
        let wanted = storage(-1);
        let mut server = stream::Config {
            name: "choco:events:coordination".into(),
            num_replicas: 1,
            ..Default::default()
        };
        let drift = wanted.drift(&server);
        let keys: Vec<&str> = drift.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["streams.replicas", "streams.max_age"], "{drift:?}");
        assert_eq!(drift[0].to_string(), "streams.replicas: 1 → 3");
        assert_eq!(drift[1].to_string(), "streams.max_age: unlimited → 180d");
        wanted.apply(&mut server);
        assert!(wanted.drift(&server).is_empty());
    }

    #[test]
    fn placement_compares_what_was_asked() {
        let asked = Some(stream::Placement {
            cluster: None,
            tags: vec!["ssd".into()],
        });
        let placed = Some(stream::Placement {
            cluster: Some("c1".into()),
            tags: vec!["ssd".into()],
        });
        assert!(same_placement(&placed, &asked));
        assert!(same_placement(&None, &None));
        assert!(!same_placement(&None, &asked));
    }
}
