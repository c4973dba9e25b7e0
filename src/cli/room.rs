//! `room pause|resume`: the operator's desired state of a room, kept in
//! the control bucket so every replica follows it, across restarts too.

use clap::Subcommand;

use super::JsonFlag;
use super::connect::{configured_room, load_bus_only, with_nats};
use super::output::{emit, emit_json};
use crate::cocoa_butter::config::ConfigSources;
use crate::cocoa_butter::control::{Control, Desired};

#[derive(Debug, Subcommand)]
pub(super) enum RoomCommand {
    /// Stop the room pulling on every replica, now and after restarts: in-flight
    /// work finishes, the consumer stays, the room reports not ready.
    Pause {
        /// The room (conch, mould, winnower, wrapper).
        room: String,
        /// Why, shown in /readyz and /info.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        format: JsonFlag,
    },
    /// Let the room pull again on every replica.
    Resume {
        /// The room (conch, mould, winnower, wrapper).
        room: String,
        #[command(flatten)]
        format: JsonFlag,
    },
}

pub(super) fn run(sources: &ConfigSources, command: &RoomCommand) -> anyhow::Result<()> {
    let config = &load_bus_only(sources)?;
    let (name, desired, format) = match command {
        RoomCommand::Pause {
            room,
            reason,
            format,
        } => (
            room,
            Desired::new(true, reason.clone(), cli_actor()),
            format,
        ),
        RoomCommand::Resume { room, format } => {
            (room, Desired::new(false, None, cli_actor()), format)
        }
    };
    // An unknown room is a usage error, found before connecting.
    let room = configured_room(config, name)?;
    with_nats(config, |client| async move {
        let control = Control::new(
            async_nats::jetstream::new(client),
            config.bucket_storage.clone(),
        );
        control.open().await?;
        control.set(&room.name, &desired).await?;
        if format.json {
            return emit_json(&serde_json::json!({ "room": room.name, "desired": desired }));
        }
        emit(&if desired.paused {
            format!(
                "paused {}: every replica stops pulling, finishes its in-flight work and reports not ready until `room resume {}`\n",
                room.name, room.name
            )
        } else {
            format!("resumed {}: every replica pulls again\n", room.name)
        })
    })
}

/// Who wrote a desired state from the CLI: `cli@<host>`.
fn cli_actor() -> String {
    match nix::unistd::gethostname() {
        Ok(host) => format!("cli@{}", host.to_string_lossy()),
        Err(_) => "cli".to_string(),
    }
}
