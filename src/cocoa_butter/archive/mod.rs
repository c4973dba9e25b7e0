//! The archive: every message of an archived domain's stream, kept in
//! object storage past the stream's retention, in stream order.
//!
//! This part is what the archive *is* — its settings (`config.rs`), its
//! segments and manifest (`segment.rs`), its storage (`store.rs`) — and
//! stands below `config`; the archiver that fills it from NATS is
//! `runtime/archiver.rs`. A core module, not a room: each archived stream has its own durable
//! consumer (`choco-archive`, apart from the rooms', so archiving never
//! slows or reorders a room), pulled by one archiver at a time (a pinned
//! priority group, as the rooms' `pinned` ordering: a standby replica of
//! the binary takes over when the pinned one stops pulling).
//!
//! ```text
//! pull (stream order) ─▶ segment (NDJSON lines, gzip) ─ closes on count, size or age ─▶
//!   1. its range recorded in KV `choco_archive` (before anything is written)
//!   2. the object `<domain>/<yyyy>/<mm>/<dd>/<first>-<last>.ndjson.gz` written
//!   3. the manifest's last chunk rewritten (`<domain>/manifest/<first>.json`)
//!   4. the segment's last message acked (ack policy "all": the whole segment)
//!   5. the range record removed
//! ```
//!
//! Nothing is acked before its segment is written, so the stream holds
//! the backlog while storage is down. A process killed anywhere in this
//! leaves either nothing acked (the consumer redelivers the messages, and
//! a recorded range is rebuilt exactly, to the same key: the object is
//! overwritten, never duplicated) or everything done but step 5 (the
//! range is found in the manifest and dropped).

pub mod config;
pub mod segment;
pub mod store;

pub use config::ArchiveConfig;
pub use store::{ArchiveError, ArchiveStore};

/// The durable consumer of every archived stream.
pub const ARCHIVE_CONSUMER: &str = "choco-archive";
/// Where an archiver records the range of the segment it is writing.
pub const ARCHIVE_BUCKET: &str = "choco_archive";
