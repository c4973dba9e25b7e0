use std::process::ExitCode;

use clap::Parser;

use choco_factory::cli::{self, Cli, ConfigRefused};

/// Exit status for a configuration or start-up refusal, so a supervisor
/// can tell "fix the config" (2) from "crashed" (1).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let parsed = Cli::parse();
    match cli::run(parsed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("choco-factory: {err:#}");
            if err.downcast_ref::<ConfigRefused>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
