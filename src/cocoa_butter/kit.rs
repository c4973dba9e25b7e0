//! The room kit: everything a room may use of the core, and nothing else.
//!
//! Rooms import from here only (`tests/layering.rs` holds them to it), so
//! the core can be rearranged without touching a room, and what a room can
//! reach is written down in one place: the contract (`room.rs`), its
//! settings, the envelope helpers, its stores and publisher, the key
//! encoding, and the API helpers its HTTP and gRPC handlers share.

pub use super::api::{self, FieldError, JsonError, decode_json};
pub use super::config::RoomSettings;
pub use super::contract::{EventContract, Older, Payload, snake_case_aliases};
pub use super::dlq::{Reason, reason};
pub use super::envelope::{Action, Cause, EventEnvelope, OutputAction, content_hash, rfc3339};
pub use super::keys;
pub use super::nats::{Kv, KvBucket, ObjectBucket, Objects, Publisher, Written};
pub use super::room::{
    ApiError, GrpcService, HandleError, InboundEvent, JsonBody, Outbound, Room, RoomContext,
    RoomError, RoomSpec,
};
pub use crate::room_actions;
