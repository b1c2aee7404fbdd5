//! `gantry demo [--size GiB] [--dir DIR]`: writes a synthetic Llama-3-shaped checkpoint once,
//! loads it cold and warm onto the first GPU (host memory when there is none), and prints
//! GB/s against the ceilings measured in the same run, pinned staging and peak RSS.

use std::error::Error;
use std::path::{Path, PathBuf};

use gantry::baseline::{self, Prefaulted};
use gantry::synth::{write_checkpoint, SynthSpec};
use gantry::{Checkpoint, Config, CudaDevice, LoadReport, Loader};

use crate::load::{load_device, load_host};
use crate::units;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the synthetic checkpoint in GiB.
    #[arg(long, default_value_t = 1.0)]
    pub size: f64,
    /// Where to keep it (default: `$GANTRY_DEMO_DIR`, else `~/.cache/gantry/demo-<size>g`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn default_dir(size: f64) -> PathBuf {
    if let Some(d) = std::env::var_os("GANTRY_DEMO_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("gantry").join(format!("demo-{size}g"))
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}

struct Row {
    name: &'static str,
    report: LoadReport,
    rss: u64,
}

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    if !(args.size > 0.0 && args.size <= 1024.0) {
        return Err(format!("--size {} must be above 0 and at most 1024 (GiB)", args.size).into());
    }
    let dir = args.dir.clone().unwrap_or_else(|| default_dir(args.size));
    let spec = SynthSpec::for_bytes((args.size * (1u64 << 30) as f64) as u64);
    eprintln!(
        "checkpoint: {} ({} in {} shards)",
        dir.display(),
        units::bytes(spec.total_bytes()),
        spec.shards
    );
    let index = write_checkpoint(&dir, &spec, 0)?;
    let checkpoint = Checkpoint::open(&index)?;
    let paths: Vec<&Path> = checkpoint.files.iter().map(|f| f.path.as_path()).collect();
    let gpu = match CudaDevice::open(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            eprintln!("no GPU ({e}): loading into host memory");
            None
        }
    };
    let loader = Loader::new(Config::default())?;
    let target =
        gpu.as_ref().map_or("host memory".to_owned(), |g| format!("cuda:0 ({})", g.name()));
    let load = |cold: bool| -> Result<LoadReport, Box<dyn Error>> {
        if cold {
            baseline::evict(&paths)?;
        }
        Ok(match &gpu {
            Some(g) => load_device(&loader, checkpoint.clone(), g, true)?.report().clone(),
            None => load_host(&loader, checkpoint.clone(), true)?.report().clone(),
        })
    };
    // gantry first, so the ceilings' own buffers do not count in its peak RSS.
    let cold = load(true)?;
    let cold_rss = peak_rss_bytes();
    baseline::warm(&paths)?;
    let warm = load(false)?;
    let rows = [
        Row { name: "cold", report: cold, rss: cold_rss },
        Row { name: "warm", report: warm, rss: peak_rss_bytes() },
    ];

    baseline::evict(&paths)?;
    let disk = baseline::read_direct(&paths, 64 << 20, 8).map(|m| m.gb_per_s()).ok();
    baseline::warm(&paths)?;
    let cache = Prefaulted::new(&paths)?.read(16, 16 << 20)?.gb_per_s();
    let h2d = match &gpu {
        Some(g) => Some(
            baseline::pinned_h2d(g, (checkpoint.total_bytes() as usize).clamp(1 << 30, 8 << 30))?
                .gb_per_s(),
        ),
        None => None,
    };
    println!(
        "gantry demo: {} bf16 checkpoint, {} shards -> {target}",
        units::bytes(checkpoint.total_bytes()),
        spec.shards
    );
    println!(
        "{:<5}  {:>8}  {:>12}  {:>6}  {:>14}  {:>10}  reader",
        "load", "GB/s", "ceiling GB/s", "ratio", "pinned staging", "peak RSS"
    );
    for row in rows {
        let storage = if row.name == "cold" { disk } else { Some(cache) };
        let ceiling = match (storage, h2d) {
            (Some(s), Some(h)) => Some(s.min(h)),
            (s, h) => s.or(h),
        };
        let readers: Vec<&str> =
            row.report.files.iter().filter_map(|f| f.reader.map(|r| r.name())).collect();
        let reader = if readers.iter().all(|r| *r == readers[0]) {
            readers[0].to_owned()
        } else {
            readers.join(",")
        };
        println!(
            "{:<5}  {:>8.2}  {:>12}  {:>6}  {:>14}  {:>10}  {reader}",
            row.name,
            row.report.gb_per_s(),
            ceiling.map_or("-".into(), |c| format!("{c:.2}")),
            ceiling.map_or("-".into(), |c| format!("{:.3}", row.report.gb_per_s() / c)),
            units::bytes(row.report.staging_bytes),
            units::bytes(row.rss),
        );
    }
    let storage = disk.map_or("unmeasured (no O_DIRECT)".into(), |d| format!("{d:.2} GB/s"));
    println!(
        "ceilings: disk {storage} (O_DIRECT 64 MiB x 8), page cache {cache:.2} GB/s (16 threads){}",
        h2d.map_or(String::new(), |h| format!(", pinned host-to-device {h:.2} GB/s"))
    );
    Ok(())
}
