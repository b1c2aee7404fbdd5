//! `gantry load PATH --device cpu|cuda:N [--json] [--checksum xxh3] [--explain] [...]`.

use std::error::Error;
use std::io::IsTerminal;

use gantry::{Checkpoint, CudaDevice, DeviceModel, HostModel, LoadReport, Loader};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use gantry::placement::{ShardRule, ShardSpec};
use gantry_format::{escape, escape_path};

use crate::check;
use crate::file_report::{bound_by_json, json_files, print_sha256, sha256_json, JsonFile};
use crate::load_args::{placement, warn_unmatched, Args};
use crate::options::Device;
use crate::units;

/// Loads smaller than this show no progress bar.
const PROGRESS_MIN_BYTES: u64 = 256 << 20;

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
    /// What the object reader's GETs measured and chose: `ttfb_ms` (mean), `ttfb_min_ms`
    /// (least, what the choices follow), `connection_mb_s`,
    /// `in_flight`, `streaming` (of those, the connections the model keeps streaming: 16, or
    /// what the staging buffers hold), `climbed` (the GETs the climb added to the model's count),
    /// `climb_settled` (whether it had settled, or the load ended mid-step),
    /// `part_bytes` (bytes per GET, chosen), `extent_bytes` (the plan's parts, configured)
    /// (object loads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<serde_json::Value>,
    /// The settings the load ran with.
    config: serde_json::Value,
    /// With --verify-sha256: the SHA-256 code that hashed the files (`implementation`).
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<serde_json::Value>,
    files: Vec<JsonFile>,
    /// A live source's publication version.
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensors: Option<Vec<JsonTensor<'a>>>,
    /// With --trace: what bound the load (stage, evidence, setting, the verdict line).
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_by: Option<serde_json::Value>,
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
    let live = args.options.path.to_str().is_some_and(gantry::live::is_url);
    if args.verify && live && (args.shard.is_some() || args.ranks.is_some()) {
        return Err(
            "--verify of a live source checks plain loads; it does not take --shard or --ranks yet"
                .into(),
        );
    }
    if args.verify && !live && gantry::is_object_source(&args.options.path) {
        return Err("--verify compares with a plain read of local files; it does not take object sources (s3://, gs://, az://; use --checksum xxh3 against a local copy)".into());
    }
    if !args.tp_rule.is_empty() && args.shard.is_none_or(|s| s.rule != ShardRule::TensorParallel) {
        return Err("--tp-rule goes with --shard tp:N".into());
    }
    if let Some(world) = args.ranks {
        return crate::ranks::run_parent(args, world);
    }
    if args.trace.is_some() && args.shard.is_some() {
        return Err("--trace records plain and --ranks loads; it does not take --shard yet".into());
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
    if args.verify && live {
        // The bytes that landed, hashed, against the digests the server published.
        for &i in &loaded {
            let len = model.checkpoint().tensors[i].len;
            let mut read = |at, buf: &mut [u8]| model.read(i, at, buf);
            let hash = check::xxh3(len, check::CHECK_CHUNK_BYTES, &mut read)?;
            gantry::live::check_digest(model.checkpoint(), i, hash)?;
        }
    } else if args.verify {
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
            object: report.object.map(|o| {
                serde_json::json!({
                    "ttfb_ms": o.ttfb_ms,
                    "ttfb_min_ms": o.ttfb_min_ms,
                    "connection_mb_s": o.connection_mb_s,
                    "in_flight": o.in_flight,
                    "climbed": o.climbed,
                    "streaming": o.streaming,
                    "climb_settled": o.climb_settled,
                    "part_bytes": o.part_bytes,
                    "extent_bytes": o.extent_bytes,
                })
            }),
            config: crate::options::config_json(loader.config()),
            sha256: sha256_json(loader.config().values().verify_sha256),
            files: json_files(&report),
            version: report.version.clone(),
            tensors,
            bound_by: report.bound_by.as_ref().map(bound_by_json),
        };
        serde_json::to_string(&out).map(|line| println!("{line}")).map_err(Into::into)
    } else {
        if args.explain {
            explain(&report, loader.config().values().verify_sha256);
        }
        println!(
            "loaded {} tensors, {} in {:.3} s: {:.2} GB/s into {device} ({} staging){}",
            loaded.len(),
            units::bytes(report.tensor_bytes),
            report.seconds,
            report.gb_per_s(),
            units::bytes(report.staging_bytes),
            match (&report.version, args.verify) {
                (Some(v), true) => format!(", version {v}, verified against its digests"),
                (Some(v), false) => format!(", version {v}"),
                (None, true) => ", verified".to_owned(),
                (None, false) => String::new(),
            }
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

/// `--explain`: the volume and object-storage measurements, with --verify-sha256 the SHA-256
/// code this machine hashes with, then per file its reader and why, and its SHA-256 check.
pub fn explain(report: &LoadReport, verify_sha256: bool) {
    for volume in report.volume.iter().flat_map(|v| v.split("; ")) {
        println!("volume {volume}");
    }
    if let Some(o) = &report.object {
        println!(
            "object storage: measured {:.1} ms to first byte ({:.1} ms at least, which the choices \
             follow), {:.0} MB/s per connection: kept {} \
             GETs in flight (the bandwidth-delay product over {} streaming connections, and {} \
             more {}), each \
             of {} ({} of the plan's {} parts; a part's body should take {}x its wait for the \
             first byte, at most {} a GET)",
            o.ttfb_ms,
            o.ttfb_min_ms,
            o.connection_mb_s,
            o.in_flight,
            o.streaming,
            o.climbed,
            match o.climb_settled {
                true => "that the climb kept",
                false => "of a climb still measuring when the load ended",
            },
            units::bytes(o.part_bytes),
            o.part_bytes / o.extent_bytes.max(1),
            units::bytes(o.extent_bytes),
            gantry::io::object::tune::BODY_PER_WAIT,
            units::bytes(gantry::io::object::tune::PART_BYTES_MAX),
        );
    }
    if verify_sha256 {
        println!("sha256: {}", gantry::integrity::implementation());
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
