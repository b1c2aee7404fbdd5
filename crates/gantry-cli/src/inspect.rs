//! `gantry inspect PATH [--json] [--all]`: the tensor table, from the headers alone.

use std::error::Error;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use gantry_format::{escape, escape_path, Checkpoint};
use serde::Serialize;

use crate::options::StoreOptions;
use crate::units;

/// Rows shown on a terminal before the listing is cut short (`--all` shows every row).
const TERMINAL_ROWS: usize = 40;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .safetensors file, a directory, or a model.safetensors.index.json.
    path: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// List every tensor, also on a terminal.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    store: StoreOptions,
}

#[derive(Serialize)]
struct JsonFile {
    path: String,
    tensors: usize,
    bytes: u64,
}

#[derive(Serialize)]
struct JsonTensor<'a> {
    name: &'a str,
    dtype: String,
    shape: &'a [u64],
    file: String,
    offset: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct JsonInspect<'a> {
    total_bytes: u64,
    /// A live source's publication version.
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    files: Vec<JsonFile>,
    tensors: Vec<JsonTensor<'a>>,
}

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    let config = args.store.apply(gantry::Config::default())?;
    config.validate()?;
    let checkpoint = gantry::open_with(&args.path, &config)?;
    let out = std::io::stdout();
    let mut out = out.lock();
    if args.json {
        serde_json::to_writer(&mut out, &json(&checkpoint))?;
        writeln!(out)?;
    } else {
        let rows = if args.all || !out.is_terminal() { usize::MAX } else { TERMINAL_ROWS };
        table(&mut out, &checkpoint, rows)?;
    }
    Ok(())
}

fn json(checkpoint: &Checkpoint) -> JsonInspect<'_> {
    let files = checkpoint
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| JsonFile {
            path: f.path.display().to_string(),
            tensors: checkpoint.tensors.iter().filter(|t| t.file.0 == i).count(),
            bytes: f.header.data_len,
        })
        .collect();
    let tensors = checkpoint
        .tensors
        .iter()
        .map(|t| JsonTensor {
            name: &t.name,
            dtype: t.dtype.to_string(),
            shape: &t.shape,
            file: checkpoint.file(t.file).path.display().to_string(),
            offset: t.offset,
            bytes: t.len,
        })
        .collect();
    let version = gantry::live::version_of(checkpoint);
    JsonInspect { total_bytes: checkpoint.total_bytes(), version, files, tensors }
}

fn table(out: &mut impl Write, checkpoint: &Checkpoint, rows: usize) -> std::io::Result<()> {
    // Names come from the file: escaped, so a name cannot break a row or drive the terminal.
    let file_name = |t: &gantry_format::TensorEntry| {
        let path = &checkpoint.file(t.file).path;
        let name = path.file_name().unwrap_or_else(|| path.as_os_str());
        escape_path(Path::new(name))
    };
    let shown = &checkpoint.tensors[..checkpoint.tensors.len().min(rows)];
    let names: Vec<String> = shown.iter().map(|t| escape(&t.name).to_string()).collect();
    let name_w = names.iter().map(|n| n.chars().count()).max().unwrap_or(4).max(4);
    let shape_w = shown.iter().map(|t| format!("{:?}", t.shape).len()).max().unwrap_or(5).max(5);
    writeln!(
        out,
        "{:<name_w$}  {:<8}  {:<shape_w$}  {:>12}  FILE",
        "NAME", "DTYPE", "SHAPE", "SIZE"
    )?;
    for (t, name) in shown.iter().zip(&names) {
        let shape = format!("{:?}", t.shape);
        let size = units::bytes(t.len);
        writeln!(
            out,
            "{:<name_w$}  {:<8}  {shape:<shape_w$}  {size:>12}  {}",
            name,
            t.dtype.to_string(),
            file_name(t)
        )?;
    }
    let hidden = checkpoint.tensors.len() - shown.len();
    if hidden > 0 {
        writeln!(
            out,
            "... {hidden} more tensors (--all lists every tensor, --json prints them all)"
        )?;
    }
    write!(
        out,
        "{} tensors in {} files, {} ({} bytes)",
        checkpoint.tensors.len(),
        checkpoint.files.len(),
        units::bytes(checkpoint.total_bytes()),
        checkpoint.total_bytes()
    )?;
    match gantry::live::version_of(checkpoint) {
        Some(version) => writeln!(out, ", version {version}"),
        None => writeln!(out),
    }
}
