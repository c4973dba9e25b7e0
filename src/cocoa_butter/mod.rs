//! cocoa-butter: the shared core every room stands on.
//!
//! The platform's rooms each imported a library called cocoa-butter for the
//! NATS publisher, telemetry and log scaffolding. Here it is one module of
//! the binary, and it owns more: configuration, the consumer engine, the
//! servers and the runtime that starts and supervises rooms. Rooms implement
//! [`room::Room`] and never reach past this module's public items.

pub mod api;
pub mod archive;
pub mod config;
pub mod consumer;
pub mod contract;
pub mod control;
pub mod dlq;
pub mod envelope;
pub mod guard;
pub mod keys;
pub mod kit;
pub mod metrics;
pub mod nats;
pub mod nats_server;
pub mod room;
pub mod runtime;
pub mod serve;
pub mod status;
pub mod streams;
pub mod telemetry;
pub mod tls;

pub use api::{JsonError, decode_json};
pub use envelope::{Cause, EventEnvelope};
pub use room::{
    GrpcService, HandleError, InboundEvent, Outbound, Room, RoomContext, RoomError, RoomSpec,
};
