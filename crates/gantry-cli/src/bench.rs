//! `gantry bench PATH --device cpu [--cold] [--repeat N] [--json]`: the ceiling and gantry's
//! load, measured in the same run, interleaved, and their ratio.
//!
//! Cold (`--cold`): every file is evicted from the page cache before each measurement, and the
//! ceiling is the storage's: `O_DIRECT` `pread` of 64 MiB, 8 in flight or four per file (up to
//! 32), handed out round robin across the files so that every file is in flight. Warm: the files are read
//! once first so they are in the page cache, and the ceiling is the best of half, three
//! quarters and all of the cores (up to 16) reading with buffered `pread` into a pre-faulted
//! buffer.

use std::error::Error;
use std::path::Path;

use gantry::baseline::{self, Measured, Prefaulted};
use gantry::{CudaDevice, Loader};
use serde::Serialize;

use crate::file_report::{json_files, JsonFile};
use crate::load::{load_device, load_host};
use crate::options::{Device, LoadOptions};
use crate::units;

const CEILING_REQUEST_BYTES: usize = 64 << 20;
const CEILING_DIRECT_THREADS: usize = 8;
const CEILING_DIRECT_THREADS_MAX: usize = 32;
const CEILING_BUFFERED_THREADS: usize = 16;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub options: LoadOptions,
    /// Evict the files from the page cache before each measurement.
    #[arg(long)]
    pub cold: bool,
    /// Measurements of each kind, interleaved (1 to 100).
    #[arg(long, default_value_t = 3, value_parser = crate::units::one_to::<usize>(crate::units::REPEAT_MAX))]
    pub repeat: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Clone, Copy)]
struct Run {
    /// The lower of the storage ceiling and (on a GPU) the pinned host-to-device ceiling.
    ceiling_gb_per_s: f64,
    storage_gb_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    h2d_gb_per_s: Option<f64>,
    gantry_gb_per_s: f64,
    ratio: f64,
    /// gantry re-reading into memory it already holds, like the ceiling's pre-faulted buffer.
    gantry_reload_gb_per_s: f64,
    reload_ratio: f64,
}

#[derive(Serialize)]
struct JsonBench {
    cold: bool,
    device: String,
    bytes: u64,
    ceiling: String,
    runs: Vec<Run>,
    median_ceiling_gb_per_s: f64,
    median_gantry_gb_per_s: f64,
    median_ratio: f64,
    median_gantry_reload_gb_per_s: f64,
    median_reload_ratio: f64,
    files: Vec<JsonFile>,
}

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    let loader = Loader::new(args.options.config()?)?;
    let checkpoint = gantry::open_with(&args.options.path, loader.config())?;
    let remote = gantry::is_object_source(&args.options.path);
    let gpu = match args.options.device.one()? {
        Device::Cpu => None,
        Device::Cuda(n) => Some(CudaDevice::open(n)?),
    };
    let paths: Vec<&Path> = checkpoint.files.iter().map(|f| f.path.as_path()).collect();
    let ceiling_name = if remote {
        let config = loader.config();
        format!(
            "ranged GETs of {}, {} in flight, drained",
            units::bytes(config.object_part() as u64),
            config.values().object_concurrency
        )
    } else if args.cold {
        format!(
            "O_DIRECT pread, {} MiB requests, {CEILING_DIRECT_THREADS} in flight",
            CEILING_REQUEST_BYTES >> 20
        )
    } else {
        format!("buffered pread, {CEILING_BUFFERED_THREADS} threads, pre-faulted buffer")
    };
    if !args.cold && !remote {
        baseline::warm(&paths)?;
    }
    let mut runs = Vec::with_capacity(args.repeat);
    let mut files = Vec::new();
    for r in 0..args.repeat {
        // Alternate which goes first, so drift within the run does not favour either.
        let (mut ceiling, mut gantry, mut reload) = (None, None, None);
        for step in 0..2 {
            if (step == 0) == (r % 2 == 0) {
                let storage = measure_ceiling(&paths, args.cold, loader.config())?.gb_per_s();
                let h2d = match &gpu {
                    Some(gpu) => {
                        let bytes = (checkpoint.total_bytes() as usize).clamp(1 << 30, 16 << 30);
                        Some(baseline::pinned_h2d(gpu, bytes)?.gb_per_s())
                    }
                    None => None,
                };
                ceiling = Some((storage, h2d));
            } else {
                let evict = || if args.cold && !remote { baseline::evict(&paths) } else { Ok(()) };
                evict()?;
                let (g, r) = match &gpu {
                    None => {
                        let mut model = load_host(&loader, checkpoint.clone(), false)?;
                        files = json_files(model.report());
                        let g = model.report().gb_per_s();
                        evict()?;
                        loader.reload(&mut model)?;
                        (g, model.report().gb_per_s())
                    }
                    Some(gpu) => {
                        let mut model = load_device(&loader, checkpoint.clone(), gpu, false)?;
                        files = json_files(model.report());
                        let g = model.report().gb_per_s();
                        evict()?;
                        loader.reload_device(&mut model)?;
                        (g, model.report().gb_per_s())
                    }
                };
                gantry = Some(g);
                reload = Some(r);
            }
        }
        let (storage, h2d) = ceiling.expect("measured");
        let c = h2d.map_or(storage, |h| h.min(storage));
        let (g, r) = (gantry.expect("measured"), reload.expect("measured"));
        runs.push(Run {
            ceiling_gb_per_s: c,
            storage_gb_per_s: storage,
            h2d_gb_per_s: h2d,
            gantry_gb_per_s: g,
            ratio: g / c,
            gantry_reload_gb_per_s: r,
            reload_ratio: r / c,
        });
    }
    let median = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let out = JsonBench {
        cold: args.cold,
        device: gpu.as_ref().map_or("cpu".to_owned(), |g| format!("cuda:{}", g.ordinal())),
        bytes: checkpoint.total_bytes(),
        ceiling: ceiling_name,
        median_ceiling_gb_per_s: median(|r| r.ceiling_gb_per_s),
        median_gantry_gb_per_s: median(|r| r.gantry_gb_per_s),
        median_ratio: median(|r| r.ratio),
        median_gantry_reload_gb_per_s: median(|r| r.gantry_reload_gb_per_s),
        median_reload_ratio: median(|r| r.reload_ratio),
        runs,
        files,
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let target =
        if gpu.is_some() { format!("{} memory", out.device) } else { "host memory".into() };
    println!(
        "{} load of {} bytes into {target}; storage ceiling: {}{}",
        if remote {
            "object-storage"
        } else if args.cold {
            "cold"
        } else {
            "warm"
        },
        out.bytes,
        out.ceiling,
        if gpu.is_some() { "; ceiling = lower of storage and pinned host-to-device" } else { "" }
    );
    if gpu.is_some() {
        for (i, r) in out.runs.iter().enumerate() {
            println!(
                "run {}: storage {:.2} GB/s, pinned host-to-device {:.2} GB/s",
                i + 1,
                r.storage_gb_per_s,
                r.h2d_gb_per_s.unwrap_or(0.0)
            );
        }
    }
    println!("gantry: into new memory; reload: into memory the model already holds");
    println!(
        "{:>6}  {:>12}  {:>11}  {:>6}  {:>11}  {:>6}",
        "run", "ceiling GB/s", "gantry GB/s", "ratio", "reload GB/s", "ratio"
    );
    let row = |name: String, c: f64, g: f64, r: f64| {
        println!("{name:>6}  {c:>12.2}  {g:>11.2}  {:>6.3}  {r:>11.2}  {:>6.3}", g / c, r / c);
    };
    for (i, r) in out.runs.iter().enumerate() {
        row((i + 1).to_string(), r.ceiling_gb_per_s, r.gantry_gb_per_s, r.gantry_reload_gb_per_s);
    }
    row(
        "median".into(),
        out.median_ceiling_gb_per_s,
        out.median_gantry_gb_per_s,
        out.median_gantry_reload_gb_per_s,
    );
    Ok(())
}

fn measure_ceiling(
    paths: &[&Path],
    cold: bool,
    config: &gantry::Config,
) -> Result<Measured, Box<dyn Error>> {
    if paths.first().is_some_and(gantry::is_object_source) {
        return Ok(gantry::baseline::object_ceiling(paths, config)?);
    }
    if cold {
        baseline::evict(paths)?;
        // At least four requests in flight per file, so that files on separate volumes are
        // all read at once.
        let threads = CEILING_DIRECT_THREADS.max(4 * paths.len()).min(CEILING_DIRECT_THREADS_MAX);
        return Ok(baseline::read_direct(paths, CEILING_REQUEST_BYTES, threads)?);
    }
    // The best of a few thread counts: on a machine whose cores are all busy, fewer threads
    // can copy faster than one per core.
    let mut target = Prefaulted::new(paths)?;
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    let mut best: Option<Measured> = None;
    for threads in [cores / 2, cores * 3 / 4, cores] {
        let m = target.read(threads.clamp(2, CEILING_BUFFERED_THREADS), 16 << 20)?;
        if best.is_none_or(|b| m.gb_per_s() > b.gb_per_s()) {
            best = Some(m);
        }
    }
    Ok(best.expect("measured"))
}
