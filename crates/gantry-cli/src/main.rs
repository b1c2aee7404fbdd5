//! The `gantry` command.
//!
//! Every subcommand prints its result on stdout and, on failure, one `error: ...` line on
//! stderr and a non-zero exit status; nothing is printed on stdout then. A reader that stops
//! reading (`gantry inspect ... | head`) ends the command quietly with status 0: what it read
//! was printed, and nothing else went wrong.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check;
mod demo;
mod file_report;
mod inspect;
mod load;
mod load_args;
mod options;
mod rank_spec;
mod ranks;
mod serve;
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
    Load(load_args::Args),
    /// Measure the disk (or page-cache) ceiling and gantry's load in the same run.
    Bench(bench::Args),
    /// Load a checkpoint once and serve it from shared memory on a Unix socket (a live
    /// source, `unix:///path`) until SIGTERM or SIGINT.
    Serve(serve::Args),
    /// Write a synthetic Llama-3-shaped bf16 checkpoint (sharded, with an index).
    Synth(synth::Args),
    /// Read a trace written by `gantry load --trace`.
    Trace(trace::Args),
    /// One rank of `gantry load --ranks N`, started by it with a spec on stdin.
    #[command(hide = true)]
    Rank(rank_spec::RankCommand),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    quiet_on_closed_stdout();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("{}", usage_error(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Load(args) => load::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Synth(args) => synth::run(&args),
        Command::Trace(args) => trace::run(&args),
        Command::Rank(command) => ranks::run_rank(&command),
    };
    // Cache copies being completed behind a load (parts the cache's disk could not take in
    // time, fetched again): waited for, at most CACHE_BEHIND_WAIT, each outcome said.
    let (notes, running) = gantry::io::cache::wait_behind(CACHE_BEHIND_WAIT);
    for note in notes {
        eprintln!("cache: {note}");
    }
    if running > 0 {
        eprintln!(
            "cache: {running} copies still being completed after {} s; exiting without them \
             (the next load writes them again)",
            CACHE_BEHIND_WAIT.as_secs()
        );
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long the process waits, before it exits, for cache copies completed behind its loads.
const CACHE_BEHIND_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// clap's message for a command line it refuses, as one `error: ...` line: its first paragraph
/// with the lines joined (the usage and the hint that follow are left out).
fn usage_error(rendered: &str) -> String {
    let first: Vec<&str> = rendered.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
    first.join(" ")
}

/// Whether `e` is a write to a pipe whose reader has gone (EPIPE).
fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// `println!` panics when stdout's reader has gone (SIGPIPE is ignored in Rust programs, so the
/// write fails with EPIPE): that one panic ends the process quietly with status 0, as a reader
/// that stops early expects; every other panic is reported as before.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info);
    }));
}
