use std::process::ExitCode;

use clap::Parser;

use choco_factory::cli::{self, Cli};

fn main() -> ExitCode {
    let parsed = Cli::parse();
    match cli::run(parsed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("choco-factory: {err:#}");
            // 2 for usage or configuration refused, 1 otherwise: the table
            // is in src/cli/mod.rs and docs/OPERATIONS.md.
            ExitCode::from(cli::exit_status(&err))
        }
    }
}
