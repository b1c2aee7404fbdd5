//! `gantry bench PATH --device cpu [--cold] [--verify-sha256] [--repeat N] [--json]`: the
//! ceiling and gantry's load, measured in the same run, interleaved, and their ratio.
//!
//! Cold (`--cold`): every file is evicted from the page cache before each measurement, and the
//! ceiling is the storage's: `O_DIRECT` `pread` of 64 MiB, 8 in flight or four per file (up to
//! 32), handed out round robin across the files so that every file is in flight. Warm: the files are read
//! once first so they are in the page cache, and the ceiling is the best of half, three
//! quarters and all of the cores (up to 16) reading with buffered `pread` into a pre-faulted
//! buffer.
//!
//! With `--verify-sha256` the load is a verified one, and the run adds the SHA-256 ceiling it
//! is held to: every core (up to the load's hashing threads) hashing an in-memory stream of its
//! own, as the lanes hash recorded segments ([`baseline::sha256_all_cores`]). One verified load
//! before the runs records the files' segment states (when a digest is known for them), so the
//! runs measure the states-recorded load; each run also times a plain load (no check), for the
//! cost of the check against it.

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
    /// With --verify-sha256: the SHA-256 ceiling and a plain load of the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<Sha256Run>,
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

/// One run's SHA-256 figures (`gantry_gb_per_s` is the verified load's rate).
#[derive(Serialize, Clone, Copy)]
struct Sha256Run {
    /// All cores hashing in-memory streams of their own: what a verified load can reach.
    ceiling_gb_per_s: f64,
    /// The verified load against that ceiling.
    ratio: f64,
    /// The same load with no check.
    plain_gb_per_s: f64,
    /// The verified load's rate over the plain load's.
    verified_to_plain: f64,
    /// Files of the verified load hashed in segments from recorded states, of those hashed.
    files_from_states: usize,
    files_hashed: usize,
}

/// The SHA-256 side of a `--verify-sha256` bench.
#[derive(Serialize)]
struct JsonSha256 {
    implementation: &'static str,
    reason: &'static str,
    ceiling: String,
    ceiling_threads: usize,
    median_ceiling_gb_per_s: f64,
    median_ratio: f64,
    median_plain_gb_per_s: f64,
    median_verified_to_plain: f64,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<JsonSha256>,
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
    let evict = || if args.cold && !remote { baseline::evict(&paths) } else { Ok(()) };
    // With --verify-sha256: a plain loader beside the verified one, and one verified load
    // before the runs, which records the files' segment states (where a digest is known).
    let plain = match loader.config().values().verify_sha256 {
        true => {
            let config = args.options.config()?.require_sha256(false).verify_sha256(false);
            evict()?;
            measure_load(&loader, &checkpoint, gpu.as_ref(), &evict)?;
            Some(Loader::new(config)?)
        }
        false => None,
    };
    let hashing_threads = sha256_threads();
    let mut runs = Vec::with_capacity(args.repeat);
    let mut files = Vec::new();
    for r in 0..args.repeat {
        // Alternate which goes first, so drift within the run does not favour either.
        let (mut ceiling, mut loads) = (None, None);
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
                let sha256 = plain.is_some().then(|| {
                    baseline::sha256_all_cores(checkpoint.total_bytes(), hashing_threads).gb_per_s()
                });
                ceiling = Some((storage, h2d, sha256));
            } else {
                let mut plain_gb_per_s = None;
                let mut verified = None;
                for turn in 0..2 {
                    match (turn == 0) == (r % 2 == 0) {
                        true => {
                            let Some(plain) = &plain else { continue };
                            let m = measure_load(plain, &checkpoint, gpu.as_ref(), &evict)?;
                            plain_gb_per_s = Some(m.gantry_gb_per_s);
                        }
                        false => {
                            verified =
                                Some(measure_load(&loader, &checkpoint, gpu.as_ref(), &evict)?)
                        }
                    }
                }
                loads = Some((verified.expect("measured"), plain_gb_per_s));
            }
        }
        let (storage, h2d, sha256_ceiling) = ceiling.expect("measured");
        let (load, plain_gb_per_s) = loads.expect("measured");
        let c = h2d.map_or(storage, |h| h.min(storage));
        let (g, r) = (load.gantry_gb_per_s, load.reload_gb_per_s);
        let sha256 = sha256_ceiling.zip(plain_gb_per_s).map(|(ceiling, plain)| Sha256Run {
            ceiling_gb_per_s: ceiling,
            ratio: g / ceiling,
            plain_gb_per_s: plain,
            verified_to_plain: g / plain,
            files_from_states: load.files_from_states,
            files_hashed: load.files_hashed,
        });
        files = load.files;
        runs.push(Run {
            sha256,
            ceiling_gb_per_s: c,
            storage_gb_per_s: storage,
            h2d_gb_per_s: h2d,
            gantry_gb_per_s: g,
            ratio: g / c,
            gantry_reload_gb_per_s: r,
            reload_ratio: r / c,
        });
    }
    let median = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let out = JsonBench {
        cold: args.cold,
        device: gpu.as_ref().map_or("cpu".to_owned(), |g| format!("cuda:{}", g.ordinal())),
        bytes: checkpoint.total_bytes(),
        ceiling: ceiling_name,
        median_ceiling_gb_per_s: median(&|r| r.ceiling_gb_per_s),
        median_gantry_gb_per_s: median(&|r| r.gantry_gb_per_s),
        median_ratio: median(&|r| r.ratio),
        median_gantry_reload_gb_per_s: median(&|r| r.gantry_reload_gb_per_s),
        median_reload_ratio: median(&|r| r.reload_ratio),
        sha256: plain.is_some().then(|| {
            let sha = |f: fn(&Sha256Run) -> f64| median(&|r| r.sha256.as_ref().map_or(0.0, f));
            let implementation = gantry::integrity::implementation();
            JsonSha256 {
                implementation: implementation.name(),
                reason: implementation.reason(),
                ceiling: format!(
                    "{hashing_threads} threads, each hashing an in-memory stream of its own"
                ),
                ceiling_threads: hashing_threads,
                median_ceiling_gb_per_s: sha(|s| s.ceiling_gb_per_s),
                median_ratio: sha(|s| s.ratio),
                median_plain_gb_per_s: sha(|s| s.plain_gb_per_s),
                median_verified_to_plain: sha(|s| s.verified_to_plain),
            }
        }),
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
    println!(
        "gantry: into new memory; reload: into memory the model already holds{}",
        if out.sha256.is_some() { " (both verified)" } else { "" }
    );
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
    if let Some(sha) = &out.sha256 {
        print_sha256(sha, &out.runs);
    }
    Ok(())
}

/// With --verify-sha256: the SHA-256 code, then per run the SHA-256 ceiling, the verified
/// load against it, the plain load and how many files were hashed from recorded states.
fn print_sha256(sha: &JsonSha256, runs: &[Run]) {
    println!(
        "verified (--verify-sha256) with {} ({}); SHA-256 ceiling: {}",
        sha.implementation, sha.reason, sha.ceiling
    );
    println!(
        "{:>6}  {:>14}  {:>13}  {:>6}  {:>10}  {:>14}  {:>11}",
        "run",
        "sha256 ceiling",
        "verified GB/s",
        "ratio",
        "plain GB/s",
        "verified/plain",
        "from states"
    );
    for (i, (r, s)) in runs.iter().filter_map(|r| Some((r, r.sha256?))).enumerate() {
        println!(
            "{:>6}  {:>14.2}  {:>13.2}  {:>6.3}  {:>10.2}  {:>14.3}  {:>11}",
            i + 1,
            s.ceiling_gb_per_s,
            r.gantry_gb_per_s,
            s.ratio,
            s.plain_gb_per_s,
            s.verified_to_plain,
            format!("{}/{}", s.files_from_states, s.files_hashed)
        );
    }
    println!(
        "{:>6}  {:>14.2}  {:>13}  {:>6.3}  {:>10.2}  {:>14.3}",
        "median",
        sha.median_ceiling_gb_per_s,
        "",
        sha.median_ratio,
        sha.median_plain_gb_per_s,
        sha.median_verified_to_plain
    );
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

/// Threads of the SHA-256 ceiling: one per core, up to the most hashing threads a load runs
/// (`gantry::integrity::HASH_THREADS_MAX`), as a verified load's lanes run.
fn sha256_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    cores.clamp(1, gantry::integrity::HASH_THREADS_MAX)
}

/// One measured load and reload of `checkpoint` by `loader`.
struct LoadRun {
    gantry_gb_per_s: f64,
    reload_gb_per_s: f64,
    files: Vec<JsonFile>,
    /// Files hashed in segments from their recorded states, of those whose SHA-256 was
    /// computed (0 of 0 without --verify-sha256).
    files_from_states: usize,
    files_hashed: usize,
}

/// Loads `checkpoint` with `loader` into new memory, then again into the memory it holds,
/// `evict` run before each.
fn measure_load(
    loader: &Loader,
    checkpoint: &gantry::Checkpoint,
    gpu: Option<&std::sync::Arc<CudaDevice>>,
    evict: &dyn Fn() -> std::io::Result<()>,
) -> Result<LoadRun, Box<dyn Error>> {
    evict()?;
    let (report, reload) = match gpu {
        None => {
            let mut model = load_host(loader, checkpoint.clone(), false)?;
            let report = model.report().clone();
            evict()?;
            loader.reload(&mut model)?;
            (report, model.report().gb_per_s())
        }
        Some(gpu) => {
            let mut model = load_device(loader, checkpoint.clone(), gpu, false)?;
            let report = model.report().clone();
            evict()?;
            loader.reload_device(&mut model)?;
            (report, model.report().gb_per_s())
        }
    };
    let hashing: Vec<_> =
        report.files.iter().filter_map(|f| f.integrity.as_ref()?.hashing.as_ref()).collect();
    let parallel =
        |h: &&&gantry::integrity::Hashing| matches!(h, gantry::integrity::Hashing::Parallel { .. });
    Ok(LoadRun {
        gantry_gb_per_s: report.gb_per_s(),
        reload_gb_per_s: reload,
        files: json_files(&report),
        files_from_states: hashing.iter().filter(parallel).count(),
        files_hashed: hashing.len(),
    })
}
