//! The `gantry` command.
//!
//! Every subcommand prints its result on stdout and, on failure, one `error: ...` line on
//! stderr and a non-zero exit status; nothing is printed on stdout then.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod inspect;
mod units;

#[derive(Debug, Parser)]
#[command(
    name = "gantry",
    version,
    about = "Stream safetensors checkpoints into GPU memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a checkpoint's tensor table, read from its headers alone.
    Inspect(inspect::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
