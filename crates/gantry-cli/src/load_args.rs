//! The arguments of `gantry load`, and the placement they describe (`--shard`, `--tp-rule`):
//! what the command (`load.rs`) and its ranks (`ranks.rs`) both read. Neither of those is
//! imported here, so the command may start its ranks without the ranks reaching back into it.

use std::error::Error;

use gantry::placement::{parse_tp_rule, tensor_parallel, ShardRule, ShardSpec, Split};
use gantry::Checkpoint;
use gantry_format::escape;

use crate::options::LoadOptions;
use crate::units;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub options: LoadOptions,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Hash every tensor's bytes after loading (xxh3: XXH3-64).
    #[arg(long, value_name = "xxh3")]
    pub checksum: Option<String>,
    /// Print, per file, the facts, the reader chosen and why.
    #[arg(long)]
    pub explain: bool,
    /// Copy every tensor back and compare it with an independent buffered read of the file.
    #[arg(long)]
    pub verify: bool,
    /// Record the load's timeline and write it to FILE as Chrome trace-event JSON (open it in
    /// Perfetto; `gantry trace summarize FILE` reads it back). --json then has `bound_by`.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<std::path::PathBuf>,
    /// Place the checkpoint across N destinations, read once: in host memory, or on the N
    /// GPUs --device names (cuda:0,cuda:1): `replicate:N` (every tensor to each), `dimK:N`
    /// (tensors of two or more dimensions split evenly along dimension K where it divides, the
    /// rest replicated), or `tp:N`, the tensor-parallel rule of vLLM and Megatron by tensor
    /// name (column-parallel weights along dimension 0, row-parallel along dimension 1, norms
    /// and routers replicated; a split that does not divide is an error).
    /// N is 1 to 1024; a tensor of two or more dimensions without dimension K is an error.
    #[arg(long, value_name = "replicate:N|dimK:N|tp:N")]
    pub shard: Option<ShardSpec>,
    /// With --shard tp:N, a pattern of your own ahead of the built-in ones:
    /// `PATTERN=column|row|replicate|dimK` (`*` matches any characters), repeatable.
    #[arg(long, value_name = "PATTERN=SPLIT", value_parser = tp_rule)]
    pub tp_rule: Vec<(String, Split)>,
    /// How bytes several GPUs want whole reach them: `host` (one host-to-device copy per GPU)
    /// or `peer` (one host-to-device copy, then device-to-device copies over NVLink); default
    /// GANTRY_REPLICATE_VIA, else peer (faster on NVLink: 162 against 151 GB/s on 4 H100s).
    #[arg(long, value_name = "host|peer")]
    pub replicate_via: Option<String>,
    /// Load with N processes (at most 64), one per GPU that --device names (cuda:0,cuda:1,...), the way
    /// tensor-parallel servers run: the ranks split the reads and exchange with NCCL (each
    /// reads on its own without NCCL, or with --device cpu); per-rank and total figures.
    /// Every rank gets every tensor whole, or with --shard (tp:N, dimK:N with N ranks) only
    /// its shares, the checkpoint exchanged a window at a time (--window-mib).
    #[arg(long, value_name = "N")]
    pub ranks: Option<usize>,
    /// With --ranks and --shard: the bytes of checkpoint exchanged at a time, in MiB (each
    /// rank holds one window beside its shares), 1 to 1048576.
    #[arg(long, value_name = "N", default_value_t = 2048,
        value_parser = units::one_to::<u64>(units::WINDOW_MIB_MAX))]
    pub window_mib: u64,
    /// With --ranks: seconds a rank waits for the others before it gives up, 1 to 86400.
    #[arg(long, value_name = "S", default_value_t = 120,
        value_parser = units::one_to::<u64>(units::RANK_TIMEOUT_S_MAX))]
    pub rank_timeout_s: u64,
    /// With --ranks: the largest piece one rank reads and broadcasts, in MiB (1 to 1024).
    #[arg(long, value_name = "N", default_value_t = 64,
        value_parser = units::one_to::<u64>(units::PIECE_MIB_MAX))]
    pub piece_mib: u64,
}

/// `--tp-rule PATTERN=SPLIT`.
fn tp_rule(text: &str) -> Result<(String, Split), gantry::Error> {
    parse_tp_rule(text)
}

/// A placement rule: which destinations get what of a tensor.
pub(crate) type PlaceFn =
    dyn Fn(&gantry::TensorEntry) -> gantry::Result<Vec<(usize, gantry::placement::Share)>>;

/// `--shard` (with `--tp-rule`) as a placement over its destinations, and their number.
pub(crate) fn placement(
    args: &Args,
    shard: &ShardSpec,
) -> Result<(Box<PlaceFn>, usize), Box<dyn Error>> {
    let place = shard.placement(&args.tp_rule)?;
    Ok((place, shard.parts))
}

/// Under `--shard tp:N`, a warning naming the matrices no pattern names: they go whole to
/// every destination, usually because the rule does not know the model's names.
pub(crate) fn warn_unmatched(args: &Args, shard: &ShardSpec, checkpoint: &Checkpoint) {
    if shard.rule != ShardRule::TensorParallel {
        return;
    }
    let tp = (args.tp_rule.iter().rev())
        .fold(tensor_parallel(shard.parts), |tp, (p, s)| tp.with_rule(p, *s));
    let unmatched = tp.unmatched(&checkpoint.tensors);
    if unmatched.is_empty() {
        return;
    }
    let bytes: u64 = unmatched.iter().map(|t| t.len).sum();
    let names: Vec<String> =
        unmatched.iter().take(3).map(|t| escape(&t.name).to_string()).collect();
    let more = unmatched.len().saturating_sub(3);
    eprintln!(
        "warning: --shard {shard}: {} tensor(s) of two or more dimensions ({}) match no tensor-parallel pattern and go whole to every destination: {}{}; name them with --tp-rule PATTERN=column|row|replicate",
        unmatched.len(),
        units::bytes(bytes),
        names.join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() }
    );
}
