//! The rooms built into this binary.
//!
//! Each room lives in its own folder and depends only on `cocoa_butter`,
//! never on another room. Adding a room: create `rooms/<name>/` with a
//! `pub const SPEC: RoomSpec`, give it a row in `rooms.toml`, and add its
//! name to the `rooms!` line below (which declares the module and registers
//! the spec).

use crate::cocoa_butter::RoomSpec;

macro_rules! rooms {
    ($($room:ident),* $(,)?) => {
        $(pub mod $room;)*
        /// Every room this binary can run, by its key in the port table.
        pub const REGISTRY: &[RoomSpec] = &[$($room::SPEC),*];
    };
}

rooms!(conch, mould, winnower, wrapper);
