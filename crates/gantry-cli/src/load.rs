//! `gantry load PATH --device cpu|cuda:N [--json] [--checksum xxh3] [--explain] [...]`.

use std::error::Error;
use std::io::IsTerminal;

use gantry::{Checkpoint, HostModel, LoadReport, Loader};
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
}

#[derive(Serialize)]
pub struct JsonFile {
    pub path: String,
    pub reader: &'static str,
    pub reason: String,
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
    staging_bytes: u64,
    registered_buffers: bool,
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
            bytes: f.read_bytes,
        })
        .collect()
}

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    if let Some(c) = &args.checksum {
        if c != "xxh3" {
            return Err(format!("unknown checksum '{c}' (xxh3)").into());
        }
    }
    let loader = Loader::new(args.options.config()?)?;
    let checkpoint = Checkpoint::open(&args.options.path)?;
    let model = match args.options.device {
        Device::Cpu => load_host(&loader, checkpoint, !args.json)?,
        Device::Cuda(_) => return Err("CUDA devices are not supported by this build yet".into()),
    };
    let report = model.report();
    let tensors = args.checksum.as_ref().map(|_| {
        model
            .tensors()
            .map(|t| JsonTensor {
                name: &t.entry.name,
                xxh3: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(t.bytes)),
            })
            .collect::<Vec<_>>()
    });
    if args.json {
        let out = JsonLoad {
            device: "cpu".to_owned(),
            bytes: report.tensor_bytes,
            read_bytes: report.read_bytes,
            seconds: report.seconds,
            gb_per_s: report.gb_per_s(),
            staging_bytes: report.staging_bytes,
            registered_buffers: report.registered_buffers,
            files: json_files(report),
            tensors,
        };
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if args.explain {
        explain(report);
    }
    println!(
        "loaded {} tensors, {} in {:.3} s: {:.2} GB/s into host memory ({} staging)",
        model.tensors().count(),
        units::bytes(report.tensor_bytes),
        report.seconds,
        report.gb_per_s(),
        units::bytes(report.staging_bytes)
    );
    if let Some(tensors) = tensors {
        for t in tensors {
            println!("{}  {}", t.xxh3, t.name);
        }
    }
    Ok(())
}

pub fn explain(report: &LoadReport) {
    for f in &report.files {
        let reader = f.reader.map_or("none", |r| r.name());
        println!(
            "{}: {reader}, {} read: {}",
            f.path.display(),
            units::bytes(f.read_bytes),
            f.reason
        );
    }
}

/// Loads into host memory with a progress bar on a terminal for long loads.
pub fn load_host(
    loader: &Loader,
    checkpoint: Checkpoint,
    progress: bool,
) -> Result<HostModel, gantry::Error> {
    let total = checkpoint.total_bytes();
    let bar =
        (progress && total >= PROGRESS_MIN_BYTES && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("template"),
            );
            bar
        });
    let model = loader.load_with(
        checkpoint,
        |_| true,
        |ready| {
            if let Some(bar) = &bar {
                bar.inc(ready.entry.len);
            }
        },
    );
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    model
}
