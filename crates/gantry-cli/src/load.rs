//! `gantry load PATH --device cpu|cuda:N [--json] [--checksum xxh3] [--explain] [...]`.

use std::error::Error;
use std::io::IsTerminal;

use gantry::{Checkpoint, CudaDevice, DeviceModel, HostModel, LoadReport, Loader};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

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
    /// Place the checkpoint across N destinations, read once: in host memory, or on the N
    /// GPUs --device names (cuda:0,cuda:1): `replicate:N` (every tensor to each), `dim0:N` or
    /// `dim1:N` (tensors of two or more dimensions split evenly along that dimension where it
    /// divides, the rest replicated).
    #[arg(long, value_name = "replicate:N|dim0:N|dim1:N")]
    pub shard: Option<String>,
    /// Load with N processes, one per GPU that --device names (cuda:0,cuda:1,...), the way
    /// tensor-parallel servers run: the ranks split the reads and exchange with NCCL (each
    /// reads on its own without NCCL, or with --device cpu); per-rank and total figures.
    #[arg(long, value_name = "N")]
    pub ranks: Option<usize>,
    /// With --ranks: seconds a rank waits for the others before it gives up.
    #[arg(long, value_name = "S", default_value_t = 120)]
    pub rank_timeout_s: u64,
    /// With --ranks: the largest piece one rank reads and broadcasts, in MiB.
    #[arg(long, value_name = "N", default_value_t = 64)]
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
    /// Why the ranks read on their own (set by the parent).
    #[arg(long, hide = true)]
    pub alone: Option<String>,
}

/// `--shard`: the dimension to split (`None`: replicate) and the number of destinations.
fn parse_shard(text: &str) -> Result<(Option<usize>, usize), Box<dyn Error>> {
    let bad = || format!("--shard '{text}': expected replicate:N, dim0:N or dim1:N");
    let (kind, n) = text.split_once(':').ok_or_else(bad)?;
    let n: usize = n.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?;
    let dim = match kind {
        "replicate" => None,
        "dim0" => Some(0),
        "dim1" => Some(1),
        _ => return Err(bad().into()),
    };
    Ok((dim, n))
}

/// `gantry load --shard`: a placed load into host memory (`--device cpu`) or across GPUs
/// (`--device cuda:0,cuda:1,...`, one destination per GPU named), one line per destination.
fn run_placed(args: &Args, shard: &str) -> Result<(), Box<dyn Error>> {
    let (dim, n) = parse_shard(shard)?;
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
    let loader = Loader::new(args.options.config()?)?;
    let devices = gpus.iter().map(|&g| CudaDevice::open(g)).collect::<Result<Vec<_>, _>>()?;
    let place = |t: &gantry::TensorEntry| gantry::placement::split(t, dim, n);
    let start = std::time::Instant::now();
    let checkpoint = gantry::open_with(&args.options.path, loader.config())?;
    // Per destination: where, tensors, bytes.
    // Per destination: where, shares, bytes.
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
    let (report, per) = if devices.is_empty() {
        let model = loader.load_placed(checkpoint, n, place, |_, _| {})?;
        (model.report().clone(), per_destination(&model, |_| "cpu".to_owned()))
    } else {
        let model = loader.load_placed_to_devices(checkpoint, &devices, place, |_, _| {})?;
        (model.report().clone(), per_destination(&model, |d| format!("cuda:{}", gpus[d])))
    };
    let total_seconds = start.elapsed().as_secs_f64();
    let delivered: u64 = per.iter().map(|p| p.2).sum();
    if args.json {
        let out = serde_json::json!({
            "shard": shard,
            "read_bytes": report.read_bytes,
            "delivered_bytes": delivered,
            "seconds": report.seconds,
            "total_seconds": total_seconds,
            "read_gb_per_s": report.read_bytes as f64 / report.seconds / 1e9,
            "delivered_gb_per_s": delivered as f64 / report.seconds / 1e9,
            "destinations": per.iter().map(|(at, t, b)| serde_json::json!({
                "device": at, "tensors": t, "bytes": b,
                "gb_per_s": *b as f64 / report.seconds / 1e9,
            })).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "placed {} ({shard}) in {:.3} s: read {} once at {:.2} GB/s, delivered {} ({:.2} GB/s)",
        args.options.path.display(),
        report.seconds,
        units::bytes(report.read_bytes),
        report.read_bytes as f64 / report.seconds / 1e9,
        units::bytes(delivered),
        delivered as f64 / report.seconds / 1e9
    );
    for (d, (at, tensors, bytes)) in per.iter().enumerate() {
        println!(
            "  destination {d} ({at}): {tensors} tensors, {} ({:.2} GB/s)",
            units::bytes(*bytes),
            *bytes as f64 / report.seconds / 1e9
        );
    }
    Ok(())
}

#[derive(Serialize)]
pub struct JsonFile {
    pub path: String,
    pub reader: &'static str,
    pub reason: String,
    pub facts: String,
    pub bytes: u64,
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
    gb_per_s: f64,
    /// Headers, allocation, staging set-up and the load, end to end.
    total_seconds: f64,
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
        })
        .collect()
}

/// Fetches the bytes of the i-th loaded tensor (from host or device memory).
pub type TensorBytes = Box<dyn Fn(usize) -> Result<Vec<u8>, gantry::Error>>;

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    if let Some(c) = &args.checksum {
        if c != "xxh3" {
            return Err(format!("unknown checksum '{c}' (xxh3)").into());
        }
    }
    if let (Some(rank), Some(world)) = (args.rank, args.world) {
        let me = crate::ranks::RankArgs {
            rank,
            world,
            nccl_id: args.nccl_id.as_deref(),
            alone: args.alone.as_deref(),
        };
        return crate::ranks::run_rank(args, me);
    }
    if let Some(world) = args.ranks {
        return crate::ranks::run_parent(args, world);
    }
    if let Some(shard) = &args.shard {
        return run_placed(args, shard);
    }
    if args.verify && gantry::io::object::is_url(&args.options.path) {
        return Err("--verify compares with a plain read of local files; it does not take s3:// sources (use --checksum xxh3 against a local copy)".into());
    }
    let loader = Loader::new(args.options.config()?)?;
    let device = args.options.device.one()?;
    // CUDA starts (driver, primary context) while the headers are read; `total_seconds`
    // counts from here: headers, allocation, pinning and the load.
    let start = std::time::Instant::now();
    let (gpu, checkpoint) = std::thread::scope(|s| {
        let gpu = s.spawn(|| match device {
            Device::Cpu => Ok(None),
            Device::Cuda(n) => CudaDevice::open(n).map(Some),
        });
        let checkpoint = gantry::open_with(&args.options.path, loader.config());
        (gpu.join().expect("CUDA start-up thread"), checkpoint)
    });
    let (gpu, checkpoint) = (gpu?, checkpoint?);
    log::debug!("headers read and CUDA started: {:.3} s", start.elapsed().as_secs_f64());
    // The loaded tensors' table positions and names; their bytes are fetched (from host or
    // device memory) only when a checksum or a check needs them.
    let (report, device, loaded, bytes_of): (
        LoadReport,
        String,
        Vec<(usize, String)>,
        TensorBytes,
    );
    let table = |c: &Checkpoint, wanted: &dyn Fn(usize) -> bool| -> Vec<(usize, String)> {
        c.tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| wanted(*i))
            .map(|(i, t)| (i, t.name.clone()))
            .collect()
    };
    match &gpu {
        None => {
            let model = load_host(&loader, checkpoint, !args.json)?;
            (report, device) = (model.report().clone(), "cpu".to_owned());
            loaded = table(model.checkpoint(), &|i| model.get(i).is_some());
            bytes_of = Box::new(move |i| Ok(model.get(i).expect("loaded").bytes.to_vec()));
        }
        Some(gpu) => {
            let model = load_device(&loader, checkpoint, gpu, !args.json)?;
            (report, device) = (model.report().clone(), format!("cuda:{}", gpu.ordinal()));
            loaded = table(model.checkpoint(), &|i| model.get(i).is_some());
            bytes_of = Box::new(move |i| model.copy_to_host(&model.get(i).expect("loaded")));
        }
    }
    let total_seconds = start.elapsed().as_secs_f64();
    if args.verify {
        verify(&args.options.path, &loaded, &bytes_of)?;
    }
    let tensors = match &args.checksum {
        Some(_) => Some(
            loaded
                .iter()
                .map(|(i, name)| {
                    let bytes = bytes_of(*i)?;
                    Ok(JsonTensor {
                        name,
                        xxh3: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)),
                    })
                })
                .collect::<Result<Vec<_>, gantry::Error>>()?,
        ),
        None => None,
    };
    if args.json {
        let out = JsonLoad {
            device,
            bytes: report.tensor_bytes,
            read_bytes: report.read_bytes,
            seconds: report.seconds,
            gb_per_s: report.gb_per_s(),
            total_seconds,
            first_tensor_seconds: report.first_tensor_seconds,
            staging_bytes: report.staging_bytes,
            registered_buffers: report.registered_buffers,
            volume: report.volume.clone(),
            files: json_files(&report),
            tensors,
        };
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
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
    if let Some(tensors) = tensors {
        for t in tensors {
            println!("{}  {}", t.xxh3, t.name);
        }
    }
    Ok(())
}

/// Compares every loaded tensor with an independent buffered read of its file; the first
/// mismatch is an error naming the tensor, the byte and the file offset.
pub fn verify(
    path: &std::path::Path,
    loaded: &[(usize, String)],
    bytes_of: &dyn Fn(usize) -> Result<Vec<u8>, gantry::Error>,
) -> Result<(), Box<dyn Error>> {
    use std::os::unix::fs::FileExt;
    // The table again, from the files, independent of the load.
    let checkpoint = gantry::open(path)?;
    for &(i, ref name) in loaded {
        let t = &checkpoint.tensors[i];
        assert_eq!(&t.name, name, "the same checkpoint gives the same table");
        let mut expected = vec![0u8; t.len as usize];
        std::fs::File::open(&checkpoint.file(t.file).path)?
            .read_exact_at(&mut expected, t.offset)?;
        let got = bytes_of(i)?;
        if let Some(at) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            return Err(format!(
                "verify: tensor '{name}' differs at byte {at} (file offset {}): loaded {:#04x}, file has {:#04x}",
                t.offset + at as u64,
                got[at],
                expected[at]
            )
            .into());
        }
        if got.len() != expected.len() {
            return Err(format!(
                "verify: tensor '{name}' has {} bytes, expected {}",
                got.len(),
                expected.len()
            )
            .into());
        }
    }
    Ok(())
}

pub fn explain(report: &LoadReport) {
    for volume in report.volume.iter().flat_map(|v| v.split("; ")) {
        println!("volume {volume}");
    }
    for f in &report.files {
        let reader = f.reader.map_or("none", |r| r.name());
        println!(
            "{}: {reader}, {} read: {}",
            f.path.display(),
            units::bytes(f.read_bytes),
            f.reason
        );
        if !f.facts.is_empty() {
            println!("    facts: {}", f.facts);
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
