//! `gantry synth DIR [--size-gib G | --llama3-8b]`: a synthetic checkpoint to load.

use std::error::Error;
use std::path::PathBuf;

use gantry::synth::{write_checkpoint, SynthSpec};

use crate::units;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write into (created; left alone if it already holds the same checkpoint).
    pub dir: PathBuf,
    /// Approximate size in GiB, Llama-3 proportions.
    #[arg(long, default_value_t = 1.0, conflicts_with = "llama3_8b")]
    pub size_gib: f64,
    /// Exactly Llama-3-8B's tensor shapes (16.06 GB, 4 shards).
    #[arg(long)]
    pub llama3_8b: bool,
}

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    if !(args.size_gib > 0.0 && args.size_gib <= 4096.0) {
        return Err(format!("--size-gib {} must be above 0 and at most 4096", args.size_gib).into());
    }
    let spec = if args.llama3_8b {
        SynthSpec::LLAMA3_8B
    } else {
        SynthSpec::for_bytes((args.size_gib * (1u64 << 30) as f64) as u64)
    };
    let index = write_checkpoint(&args.dir, &spec, 0)?;
    println!(
        "{} ({} in {} shards, {} tensors)",
        index.display(),
        units::bytes(spec.total_bytes()),
        spec.shards,
        spec.tensors().len()
    );
    Ok(())
}
