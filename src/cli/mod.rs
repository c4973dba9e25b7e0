//! The command line. One file per group of commands:
//!
//! | file | commands |
//! |---|---|
//! | `serve.rs` | `serve`, `dev`: run the rooms |
//! | `inspect.rs` | `config check`, `config show`, `rooms`, `health` |
//! | `dlq.rs` | `dlq list`, `show`, `replay`, `purge` |
//! | `room.rs` | `room pause`, `room resume` |
//! | `streams.rs` | `streams status`, `streams ensure` |
//! | `events.rs` | `publish`, `tail` |
//! | `docs.rs` | `completions`, `man` |
//!
//! `connect.rs` loads the configuration and connects operator commands to
//! NATS; `output.rs` writes text, JSON and progress the same way for all.
//!
//! # Exit status
//!
//! One table for every command (docs/OPERATIONS.md repeats it):
//!
//! | status | meaning |
//! |---|---|
//! | 0 | done; for a validator (`config check`, `health`): the input is good |
//! | 1 | an operational failure (NATS unreachable, a dead letter not found, a stream that cannot be created); for a validator: the input is bad (an invalid configuration, a room not ready) |
//! | 2 | usage or configuration refused: a bad flag or argument, an unknown room, or a configuration `serve` will not start with |
//!
//! [`Refused`] carries status 2 through `anyhow`; everything else is 1.

mod archive;
mod connect;
mod contracts;
mod dlq;
mod docs;
mod events;
mod inspect;
mod output;
mod room;
mod serve;
mod streams;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cocoa_butter::config::{CliOverrides, ConfigSources};

/// Exit status of a usage error or a refused configuration (see the table
/// in the module's documentation).
pub const EXIT_REFUSED: u8 = 2;

/// A failure that exits with status 2: usage or configuration refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Refused {
    pub fn new(message: impl std::fmt::Display) -> Self {
        Refused(message.to_string())
    }
}

/// The exit status for a command's error: 2 when it was refused, else 1.
pub fn exit_status(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<Refused>().is_some() {
        EXIT_REFUSED
    } else {
        1
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "choco-factory",
    version,
    about = "The choco factory rooms (the-winnower, the-conch, the-mould, the-wrapper) in one binary",
    after_help = "Exit status: 0 done; 1 an operational failure, or for a validator (config \
                  check, health) a bad input; 2 usage or configuration refused."
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// What every command reads: where the configuration is and which NATS.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// Config file layered over the port table.
    #[arg(long, global = true, env = "CHOCO_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The port table; default: ./rooms.toml if present, else the built-in one.
    #[arg(long, global = true, env = "CHOCO_ROOMS_FILE", value_name = "FILE")]
    rooms_file: Option<PathBuf>,
    /// NATS server URL, or several comma-separated (overrides nats.url).
    #[arg(long, global = true, value_name = "URL")]
    nats_url: Option<String>,
}

/// `--json` of every command that lists or reports.
#[derive(Debug, Args, Clone, Copy, Default)]
struct JsonFlag {
    /// Print one JSON document instead of text: numbers as numbers, times
    /// as RFC 3339 UTC.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the enabled rooms.
    Serve(serve::ServeArgs),
    /// Start a local nats-server with JetStream, then serve all rooms on it.
    Dev(serve::DevArgs),
    /// Inspect the effective configuration.
    #[command(subcommand)]
    Config(inspect::ConfigCommand),
    /// Print the port table as configured.
    Rooms(JsonFlag),
    /// Work the dead-letter stream.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Pause or resume a room on every replica.
    #[command(subcommand)]
    Room(room::RoomCommand),
    /// The rooms' streams and consumers: their state, or create what is missing.
    #[command(subcommand)]
    Streams(streams::StreamsCommand),
    /// The archive of the archived domains' streams: list its segments or
    /// verify it.
    #[command(subcommand)]
    Archive(archive::ArchiveCommand),
    /// The catalogue of every event the rooms consume and publish; check
    /// envelopes against it (`events check FILE`) or write it out
    /// (`events write`).
    Events(contracts::EventsArgs),
    /// Publish one event as a correct envelope.
    Publish(events::PublishArgs),
    /// Follow a subject and print each envelope, payload decoded, one JSON
    /// document per line.
    Tail(events::TailArgs),
    /// Ask every enabled room's /readyz (or /healthz with --live) on its
    /// metrics port; exit 0 when all answer 200, 1 naming those that do not.
    Health(inspect::HealthArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Print the man page (roff), e.g. into /usr/share/man/man1/choco-factory.1.
    Man,
}

impl Cli {
    /// Where the configuration comes from, with the command line's
    /// overrides (`serve` and `dev` add theirs; `dev`'s local server wins
    /// over `--nats-url`).
    fn sources(&self, cli: CliOverrides) -> ConfigSources {
        ConfigSources {
            rooms_file: self.global.rooms_file.clone(),
            config_file: self.global.config.clone(),
            cli: CliOverrides {
                nats_url: cli.nats_url.or_else(|| self.global.nats_url.clone()),
                ..cli
            },
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let plain = || cli.sources(CliOverrides::default());
    match &cli.command {
        Command::Serve(args) => serve::serve(cli.sources(args.overrides()), None),
        Command::Dev(args) => serve::serve(cli.sources(args.overrides()), Some(args)),
        Command::Config(command) => inspect::config(&plain(), command),
        Command::Rooms(format) => inspect::rooms(&plain(), *format),
        Command::Health(args) => inspect::health(&plain(), args),
        Command::Dlq(command) => dlq::run(&plain(), command),
        Command::Room(command) => room::run(&plain(), command),
        Command::Streams(command) => streams::run(&plain(), command),
        Command::Events(args) => contracts::run(&plain(), args),
        Command::Archive(command) => archive::run(&plain(), command),
        Command::Publish(args) => events::publish(&plain(), args),
        Command::Tail(args) => events::tail(&plain(), args),
        Command::Completions(args) => docs::completions(args),
        Command::Man => docs::man(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every argument and every command says what it is for, in `--help`,
    /// the man page and the completions alike.
    #[test]
    fn every_flag_and_command_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "choco-factory", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    /// `--bind` and `--log-format` are for the commands that run rooms, so
    /// the operator's commands do not offer them.
    #[test]
    fn run_only_flags_belong_to_the_commands_that_run_rooms() {
        let command = Cli::command();
        for name in ["dlq", "publish", "tail", "room", "streams", "health"] {
            let sub = command.find_subcommand(name).expect(name);
            let mut all: Vec<&clap::Command> = vec![sub];
            all.extend(sub.get_subcommands());
            for cmd in all {
                for flag in ["bind", "log_format"] {
                    assert!(
                        !cmd.get_arguments().any(|a| a.get_id() == flag),
                        "{name} {} offers --{flag}",
                        cmd.get_name()
                    );
                }
            }
        }
        for name in ["serve", "dev"] {
            let sub = command.find_subcommand(name).expect(name);
            assert!(sub.get_arguments().any(|a| a.get_id() == "bind"));
        }
    }
}
