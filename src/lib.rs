//! choco-factory: the four factory rooms of the choco platform in one binary.
//!
//! - [`cocoa_butter`]: the shared core (configuration, NATS, the consumer
//!   engine, servers, metrics, logging, the runtime).
//! - [`rooms`]: one module per room, each depending only on the core.
//! - [`cli`]: the command line, the only place `anyhow` is used.
//!
//! See docs/ARCHITECTURE.md for the map.

pub mod cli;
pub mod cocoa_butter;
pub mod rooms;
