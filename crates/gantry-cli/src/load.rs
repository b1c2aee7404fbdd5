//! `gantry load PATH --device cpu|cuda:N [--json] [--checksum xxh3] [--explain] [...]`.

use std::error::Error;
use std::io::IsTerminal;

use gantry::{Checkpoint, CudaDevice, DeviceModel, HostModel, LoadReport, Loader};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use gantry::placement::{parse_tp_rule, tensor_parallel, ShardRule, ShardSpec, Split};
use gantry_format::{escape, escape_path};

use crate::check;
use crate::options::{Device, LoadOptions};
use crate::units;

/// Loads smaller than this show no progress bar.
const PROGRESS_MIN_BYTES: u64 = 256 << 20;

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
        value_parser = units::one_to::<u64>(crate::ranks::RANK_TIMEOUT_S_MAX))]
    pub rank_timeout_s: u64,
    /// With --ranks: the largest piece one rank reads and broadcasts, in MiB (1 to 1024).
    #[arg(long, value_name = "N", default_value_t = 64,
        value_parser = units::one_to::<u64>(units::PIECE_MIB_MAX))]
    pub piece_mib: u64,
    /// This process is rank R of a --ranks load (set by the parent).
    #[arg(long, hide = true, requires = "world")]
    pub rank: Option<usize>,
    /// Ranks of the load this rank belongs to (set by the parent).
    #[arg(long, hide = true, requires = "rank")]
    pub world: Option<usize>,
    /// The NCCL unique id of the ranks, in hex (set by the parent).
    #[arg(long, hide = true)]
    pub nccl_id: Option<String>,
    /// Where rank 0 publishes the NCCL unique id for the others (set by the parent).
    #[arg(long, hide = true)]
    pub nccl_id_file: Option<String>,
    /// Why the ranks read on their own (set by the parent).
    #[arg(long, hide = true)]
    pub alone: Option<String>,
    /// Where this rank writes its JSON figures (set by the parent; else stdout).
    #[arg(long, hide = true)]
    pub result_file: Option<String>,
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

/// Per destination of a placed model: where, shares, bytes.
fn per_destination<B>(
    m: &gantry::Placed<B>,
    name: impl Fn(usize) -> String,
) -> Vec<(String, usize, u64)> {
    (0..m.devices())
        .map(|d| {
            let shares = m.share_entries(d);
            (name(d), shares.len(), shares.iter().map(|s| s.len).sum())
        })
        .collect()
}

/// Opened GPUs, one per destination.
type Gpus = Vec<std::sync::Arc<CudaDevice>>;

/// The loader of a placed load, the GPU ordinals `--device` names (none for host memory), and
/// those GPUs opened side by side.
fn placed_setup(
    args: &Args,
    shard: &ShardSpec,
    n: usize,
) -> Result<(Loader, Vec<u32>, Gpus), Box<dyn Error>> {
    let gpus: Vec<u32> = args
        .options
        .device
        .0
        .iter()
        .filter_map(|d| match d {
            Device::Cuda(n) => Some(*n),
            Device::Cpu => None,
        })
        .collect();
    if !gpus.is_empty() && gpus.len() != n {
        return Err(format!(
            "--shard {shard} places across {n} destinations but --device names {} GPU(s)",
            gpus.len()
        )
        .into());
    }
    let mut config = args.options.config()?;
    if let Some(via) = &args.replicate_via {
        config = config.replicate_via(via.parse()?);
    }
    let loader = Loader::new(config)?;
    let devices = if gpus.is_empty() { Vec::new() } else { CudaDevice::open_all(&gpus)? };
    Ok((loader, gpus, devices))
}

/// `gantry load --shard`: a placed load into host memory (`--device cpu`) or across GPUs
/// (`--device cuda:0,cuda:1,...`, one destination per GPU named), one line per destination.
fn run_placed(args: &Args, shard: &ShardSpec) -> Result<(), Box<dyn Error>> {
    let (place, n) = placement(args, shard)?;
    let (loader, gpus, devices) = placed_setup(args, shard, n)?;
    let start = std::time::Instant::now();
    let checkpoint = gantry::open_with(&args.options.path, loader.config())?;
    warn_unmatched(args, shard, &checkpoint);
    let (report, per, hashes) = if devices.is_empty() {
        let model = loader.load_placed(checkpoint, n, &place, |_, _| {})?;
        let total_seconds = start.elapsed().as_secs_f64();
        let views: Vec<Vec<&[u8]>> =
            (0..n).map(|d| model.tensors(d).map(|t| t.bytes).collect()).collect();
        let hashes = check_placed(args, &model, &mut |d, s, at, buf| {
            buf.copy_from_slice(&views[d][s][at as usize..at as usize + buf.len()]);
            Ok(())
        })?;
        let per = per_destination(&model, |_| "cpu".to_owned());
        ((model.report().clone(), total_seconds), per, hashes)
    } else {
        let model = loader.load_placed_to_devices(checkpoint, &devices, &place, |_, _| {})?;
        let total_seconds = start.elapsed().as_secs_f64();
        let ptrs: Vec<Vec<u64>> =
            (0..n).map(|d| model.tensors(d).map(|t| t.ptr).collect()).collect();
        let hashes = check_placed(args, &model, &mut |d, s, at, buf| {
            buf.copy_from_slice(&model.device(d).copy_to_host(ptrs[d][s] + at, buf.len())?);
            Ok(())
        })?;
        let per = per_destination(&model, |d| format!("cuda:{}", gpus[d]));
        ((model.report().clone(), total_seconds), per, hashes)
    };
    let (report, total_seconds) = report;
    let delivered: u64 = per.iter().map(|p| p.2).sum();
    if args.json {
        let out = serde_json::json!({
            "shard": shard.to_string(),
            "read_bytes": report.read_bytes,
            "delivered_bytes": delivered,
            "seconds": report.seconds,
            "plan_seconds": report.plan_seconds,
            "total_seconds": total_seconds,
            "read_gb_per_s": report.read_bytes as f64 / report.seconds / 1e9,
            "delivered_gb_per_s": delivered as f64 / report.seconds / 1e9,
            "files": json_files(&report),
            "destinations": per.iter().zip(&hashes).map(|((at, t, b), hashes)| {
                let mut d = serde_json::json!({
                    "device": at, "tensors": t, "bytes": b,
                    "gb_per_s": *b as f64 / report.seconds / 1e9,
                });
                if args.checksum.is_some() {
                    d["checksums"] = hashes.iter().map(|(name, xxh3)| {
                        serde_json::json!({"name": name, "xxh3": xxh3})
                    }).collect();
                }
                d
            }).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "placed {} ({shard}) in {:.3} s (planned in {:.1} ms): read {} once at {:.2} GB/s, delivered {} ({:.2} GB/s)",
        args.options.path.display(),
        report.seconds,
        report.plan_seconds * 1e3,
        units::bytes(report.read_bytes),
        report.read_bytes as f64 / report.seconds / 1e9,
        units::bytes(delivered),
        delivered as f64 / report.seconds / 1e9
    );
    print_sha256(&report, "  ");
    for (d, (at, tensors, bytes)) in per.iter().enumerate() {
        println!(
            "  destination {d} ({at}): {tensors} tensors, {} ({:.2} GB/s){}",
            units::bytes(*bytes),
            *bytes as f64 / report.seconds / 1e9,
            if args.verify { ", verified" } else { "" }
        );
        for (name, xxh3) in &hashes[d] {
            println!("    {xxh3}  {}", escape(name));
        }
    }
    Ok(())
}

/// One destination's checksums: (tensor name, XXH3-64 in hex) per share.
type ShareHashes = Vec<(String, String)>;

/// `--verify` and `--checksum` for a placed load: every share compared with its file, and
/// hashed; `read(destination, share, at, buf)` gives a share's loaded bytes. Returns, per
/// destination, each share's tensor name and XXH3-64 (empty without `--checksum`).
fn check_placed<B>(
    args: &Args,
    model: &gantry::Placed<B>,
    read: &mut check::ReadShare<'_>,
) -> Result<Vec<ShareHashes>, Box<dyn Error>> {
    let checkpoint = model.checkpoint();
    let shares: Vec<Vec<(usize, gantry::placement::Share)>> = (0..model.devices())
        .map(|d| model.share_entries(d).iter().map(|s| (s.tensor, s.share)).collect())
        .collect();
    if args.verify {
        check::verify_placed(checkpoint, &shares, read)?;
    }
    let mut hashes = vec![Vec::new(); model.devices()];
    if args.checksum.is_some() {
        for (d, list) in hashes.iter_mut().enumerate() {
            for (s, share) in model.share_entries(d).iter().enumerate() {
                let mut piece = |at, buf: &mut [u8]| read(d, s, at, buf);
                let hash = check::xxh3(share.len, check::CHECK_CHUNK_BYTES, &mut piece)?;
                list.push((checkpoint.tensors[share.tensor].name.clone(), format!("{hash:016x}")));
            }
        }
    }
    Ok(hashes)
}

#[derive(Serialize)]
pub struct JsonFile {
    pub path: String,
    pub reader: &'static str,
    pub reason: String,
    pub facts: String,
    pub bytes: u64,
    /// With --verify-sha256: the file's SHA-256 (64 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Whether the file's SHA-256 was checked against a known digest (and matched).
    pub sha256_verified: bool,
    /// What the digest was checked against, why nothing was, or that it was not computed.
    pub sha256_check: String,
    /// With --verify-sha256: how the digest was computed (sequentially, or in segments in
    /// parallel from recorded states).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_hashing: Option<String>,
}

#[derive(Serialize)]
struct JsonTensor<'a> {
    name: &'a str,
    xxh3: String,
}

#[derive(Serialize)]
struct JsonLoad<'a> {
    device: String,
    bytes: u64,
    read_bytes: u64,
    seconds: f64,
    /// Planning reads and copies.
    plan_seconds: f64,
    gb_per_s: f64,
    /// CUDA's start-up (driver and context), the headers, allocation, staging set-up and
    /// the load, end to end; CUDA starts while the headers are read.
    total_seconds: f64,
    /// When CUDA was up, from the same start (0 for host loads): `total_seconds` less this is
    /// the time after CUDA's start-up, as loaders that start timing after it count.
    cuda_start_seconds: f64,
    /// From the start of reading until the first tensor had landed.
    first_tensor_seconds: Option<f64>,
    staging_bytes: u64,
    registered_buffers: bool,
    /// What the `auto` volume profile measured and picked.
    #[serde(skip_serializing_if = "Option::is_none")]
    volume: Option<String>,
    files: Vec<JsonFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensors: Option<Vec<JsonTensor<'a>>>,
    /// With --trace: what bound the load (stage, evidence, setting, the verdict line).
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_by: Option<serde_json::Value>,
}

pub fn json_files(report: &LoadReport) -> Vec<JsonFile> {
    report
        .files
        .iter()
        .map(|f| JsonFile {
            path: f.path.display().to_string(),
            reader: f.reader.map_or("none", |r| r.name()),
            reason: f.reason.clone(),
            facts: f.facts.clone(),
            bytes: f.read_bytes,
            sha256: f
                .integrity
                .as_ref()
                .and_then(|c| c.sha256.as_ref())
                .map(gantry::integrity::to_hex),
            sha256_verified: f.integrity.as_ref().is_some_and(|c| c.verified()),
            sha256_check: match &f.integrity {
                Some(c) => match &c.known {
                    Some(k) => format!("matches {}", k.source),
                    None => format!("not verified: no digest known ({})", c.unknown_reason),
                },
                None => NOT_CHECKED.to_owned(),
            },
            sha256_hashing: f
                .integrity
                .as_ref()
                .and_then(|c| c.hashing.as_ref())
                .map(ToString::to_string),
        })
        .collect()
}

/// `sha256_check` of a file whose SHA-256 was not computed.
const NOT_CHECKED: &str = "not checked (--verify-sha256 is off, or nothing of the file was read)";

/// With --verify-sha256, one line per file read: its SHA-256, what it was checked against (or
/// that nothing was known to check it against) and how it was hashed.
pub fn print_sha256(report: &LoadReport, indent: &str) {
    for f in &report.files {
        if let Some(check) = &f.integrity {
            println!("{indent}{}: {}", escape_path(&f.path), check.explain());
        }
    }
}

/// A loaded model, in host or device memory.
enum Loaded {
    Host(HostModel),
    Device(DeviceModel),
}

impl Loaded {
    fn checkpoint(&self) -> &Checkpoint {
        match self {
            Loaded::Host(m) => m.checkpoint(),
            Loaded::Device(m) => m.checkpoint(),
        }
    }

    fn report(&self) -> &LoadReport {
        match self {
            Loaded::Host(m) => m.report(),
            Loaded::Device(m) => m.report(),
        }
    }

    /// Table positions of the loaded tensors.
    fn loaded(&self) -> Vec<usize> {
        let n = self.checkpoint().tensors.len();
        (0..n)
            .filter(|&i| match self {
                Loaded::Host(m) => m.get(i).is_some(),
                Loaded::Device(m) => m.get(i).is_some(),
            })
            .collect()
    }

    /// Fills `buf` with the loaded bytes of tensor `i` from `at` bytes into it (a GPU
    /// tensor is copied back a piece at a time).
    fn read(&self, i: usize, at: u64, buf: &mut [u8]) -> Result<(), gantry::Error> {
        match self {
            Loaded::Host(m) => {
                let bytes = m.get(i).expect("a loaded tensor").bytes;
                buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
            }
            Loaded::Device(m) => {
                let t = m.get(i).expect("a loaded tensor");
                buf.copy_from_slice(&m.device().copy_to_host(t.ptr + at, buf.len())?);
            }
        }
        Ok(())
    }
}

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    if let Some(c) = &args.checksum {
        if c != "xxh3" {
            return Err(format!("unknown checksum '{c}' (xxh3)").into());
        }
    }
    if args.verify && gantry::is_object_source(&args.options.path) {
        return Err("--verify compares with a plain read of local files; it does not take object sources (s3://, gs://, az://; use --checksum xxh3 against a local copy)".into());
    }
    if let (Some(rank), Some(world)) = (args.rank, args.world) {
        let me = crate::ranks::RankArgs {
            rank,
            world,
            nccl_id: args.nccl_id.as_deref(),
            nccl_id_file: args.nccl_id_file.as_deref(),
            alone: args.alone.as_deref(),
            result_file: args.result_file.as_deref(),
        };
        return crate::ranks::run_rank(args, me);
    }
    if !args.tp_rule.is_empty() && args.shard.is_none_or(|s| s.rule != ShardRule::TensorParallel) {
        return Err("--tp-rule goes with --shard tp:N".into());
    }
    if let Some(world) = args.ranks {
        return crate::ranks::run_parent(args, world);
    }
    if args.trace.is_some() && (args.shard.is_some() || args.ranks.is_some()) {
        return Err("--trace records plain loads; it does not take --shard or --ranks yet".into());
    }
    if let Some(shard) = &args.shard {
        return run_placed(args, shard);
    }
    let loader = Loader::new(args.options.config()?)?;
    // One timeline from CUDA's start-up and the headers on; --explain records it in memory
    // for its verdict (a Vec push per event on each thread: see gantry::trace).
    let recording = (args.trace.is_some() || args.explain).then(gantry::trace::Trace::new);
    let _in = gantry::trace::enter(recording.as_ref(), "main");
    let device = args.options.device.one()?;
    // CUDA starts (driver, primary context) while the headers are read; `total_seconds`
    // counts from here: headers, allocation, pinning and the load.
    let start = std::time::Instant::now();
    let (gpu, checkpoint) = std::thread::scope(|s| {
        let gpu = s.spawn(|| match device {
            Device::Cpu => Ok((None, 0.0)),
            Device::Cuda(n) => {
                let _in = gantry::trace::enter(recording.as_ref(), "CUDA start-up");
                let _span = gantry::trace::span("phase", "cuda start-up");
                CudaDevice::open(n).map(|g| (Some(g), start.elapsed().as_secs_f64()))
            }
        });
        let checkpoint = gantry::open_with(&args.options.path, loader.config());
        (gpu.join().expect("CUDA start-up thread"), checkpoint)
    });
    let ((gpu, cuda_start_seconds), checkpoint) = (gpu?, checkpoint?);
    log::debug!(
        "CUDA started in {cuda_start_seconds:.3} s; headers read: {:.3} s",
        start.elapsed().as_secs_f64()
    );
    let (model, device) = match &gpu {
        None => (Loaded::Host(load_host(&loader, checkpoint, !args.json)?), "cpu".to_owned()),
        Some(gpu) => (
            Loaded::Device(load_device(&loader, checkpoint, gpu, !args.json)?),
            format!("cuda:{}", gpu.ordinal()),
        ),
    };
    let total_seconds = start.elapsed().as_secs_f64();
    let report = model.report().clone();
    if let (Some(trace), Some(path)) = (&recording, &args.trace) {
        trace.write(path)?;
    }
    let loaded = model.loaded();
    if args.verify {
        check::verify(model.checkpoint(), &loaded, &mut |i, at, buf| model.read(i, at, buf))?;
    }
    let tensors = match &args.checksum {
        Some(_) => Some(
            loaded
                .iter()
                .map(|&i| {
                    let t = &model.checkpoint().tensors[i];
                    let mut read = |at, buf: &mut [u8]| model.read(i, at, buf);
                    let hash = check::xxh3(t.len, check::CHECK_CHUNK_BYTES, &mut read)?;
                    Ok(JsonTensor { name: &t.name, xxh3: format!("{hash:016x}") })
                })
                .collect::<Result<Vec<_>, gantry::Error>>()?,
        ),
        None => None,
    };
    let printed = if args.json {
        let out = JsonLoad {
            device,
            bytes: report.tensor_bytes,
            read_bytes: report.read_bytes,
            seconds: report.seconds,
            plan_seconds: report.plan_seconds,
            gb_per_s: report.gb_per_s(),
            total_seconds,
            cuda_start_seconds,
            first_tensor_seconds: report.first_tensor_seconds,
            staging_bytes: report.staging_bytes,
            registered_buffers: report.registered_buffers,
            volume: report.volume.clone(),
            files: json_files(&report),
            tensors,
            bound_by: report.bound_by.as_ref().map(|v| {
                serde_json::json!({
                    "stage": v.bound.name(),
                    "evidence": v.evidence,
                    "setting": v.setting,
                    "line": v.to_string(),
                })
            }),
        };
        serde_json::to_string(&out).map(|line| println!("{line}")).map_err(Into::into)
    } else {
        if args.explain {
            explain(&report);
        }
        println!(
            "loaded {} tensors, {} in {:.3} s: {:.2} GB/s into {device} ({} staging){}",
            loaded.len(),
            units::bytes(report.tensor_bytes),
            report.seconds,
            report.gb_per_s(),
            units::bytes(report.staging_bytes),
            if args.verify { ", verified" } else { "" }
        );
        if !args.explain {
            print_sha256(&report, "  ");
        }
        for t in tensors.into_iter().flatten() {
            println!("{}  {}", t.xxh3, escape(t.name));
        }
        if let Some(v) = report.bound_by.as_ref().filter(|_| args.explain) {
            println!("{v}");
        }
        Ok(())
    };
    // The process ends right after this: the driver frees the device memory and the kernel
    // the pinned ring at exit, in bulk, faster than freeing them one by one here.
    std::mem::forget(model);
    std::mem::forget(loader);
    printed
}

pub fn explain(report: &LoadReport) {
    for volume in report.volume.iter().flat_map(|v| v.split("; ")) {
        println!("volume {volume}");
    }
    for f in &report.files {
        let reader = f.reader.map_or("none", |r| r.name());
        println!(
            "{}: {reader}, {} read: {}",
            escape_path(&f.path),
            units::bytes(f.read_bytes),
            f.reason
        );
        if !f.facts.is_empty() {
            println!("    facts: {}", f.facts);
        }
        if let Some(check) = &f.integrity {
            println!("    {}", check.explain());
        }
    }
}

/// Runs `load` with a progress bar on a terminal for long loads; `load` gets the callback
/// to call with each landed tensor's byte count.
fn with_progress<T>(
    total: u64,
    progress: bool,
    load: impl FnOnce(&mut dyn FnMut(u64)) -> Result<T, gantry::Error>,
) -> Result<T, gantry::Error> {
    let bar =
        (progress && total >= PROGRESS_MIN_BYTES && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            let template = "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}";
            bar.set_style(ProgressStyle::with_template(template).expect("template"));
            bar
        });
    let result = load(&mut |bytes| {
        if let Some(bar) = &bar {
            bar.inc(bytes);
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

/// Loads into host memory, with a progress bar on a terminal for long loads.
pub fn load_host(
    loader: &Loader,
    checkpoint: Checkpoint,
    progress: bool,
) -> Result<HostModel, gantry::Error> {
    with_progress(checkpoint.total_bytes(), progress, |tick| {
        loader.load_with(checkpoint, |_| true, |ready| tick(ready.entry.len))
    })
}

/// Loads onto a GPU, with a progress bar on a terminal for long loads.
pub fn load_device(
    loader: &Loader,
    checkpoint: Checkpoint,
    device: &std::sync::Arc<CudaDevice>,
    progress: bool,
) -> Result<DeviceModel, gantry::Error> {
    with_progress(checkpoint.total_bytes(), progress, |tick| {
        loader.load_to_device_with(checkpoint, device, |_| true, |ready| tick(ready.entry.len))
    })
}
