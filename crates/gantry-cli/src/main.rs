//! The `gantry` command.
//!
//! Every subcommand prints its result on stdout and, on failure, one `error: ...` line on
//! stderr and a non-zero exit status; nothing is printed on stdout then.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check;
mod demo;
mod inspect;
mod load;
mod options;
mod ranks;
mod synth;
mod trace;
mod units;

#[derive(Debug, Parser)]
#[command(name = "gantry", version, about = "Stream safetensors checkpoints into GPU memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Write a synthetic checkpoint once, load it cold and warm (GPU if there is one), and
    /// print GB/s against the ceilings measured in the same run.
    Demo(demo::Args),
    /// Print a checkpoint's tensor table, read from its headers alone.
    Inspect(inspect::Args),
    /// Load a checkpoint into host or GPU memory and report how fast.
    Load(load::Args),
    /// Measure the disk (or page-cache) ceiling and gantry's load in the same run.
    Bench(bench::Args),
    /// Write a synthetic Llama-3-shaped bf16 checkpoint (sharded, with an index).
    Synth(synth::Args),
    /// Read a trace written by `gantry load --trace`.
    Trace(trace::Args),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Load(args) => load::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Synth(args) => synth::run(&args),
        Command::Trace(args) => trace::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
