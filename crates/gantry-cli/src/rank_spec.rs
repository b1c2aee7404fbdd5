//! `gantry rank`: the hidden subcommand a `gantry load --ranks N` parent starts once per rank,
//! and the spec the parent hands it.
//!
//! A rank's own arguments are who it is and what it loads (`gantry rank PATH --rank R --world
//! N --spec -`), so `ps` shows them; everything else it needs (its device, how it reaches the
//! other ranks, the load settings, the placement, the exchange's sizes and timeout, where its
//! figures and its trace go) is one JSON [`Spec`] the parent writes to the rank's stdin and closes. The parent
//! builds the spec from its parsed arguments, field by field: nothing is rebuilt from the
//! parent's command line, and a load setting reaches the ranks because [`LoadSettings`] is
//! serialized whole. The spec travels on a pipe rather than the command line, so object-storage
//! credentials given as options are not shown to other users by `ps`. `--spec FILE` reads a
//! spec from a file instead (to rerun one rank by hand). Specs are read with a size cap and
//! parsed strictly (an unknown field is an error), like any input.

use std::error::Error;
use std::io::Read;
use std::path::PathBuf;

use gantry::placement::{parse_tp_rule, ShardSpec, Split};
use serde::{Deserialize, Serialize};

use crate::load_args::Args;
use crate::options::{Device, LoadSettings};

/// The largest spec read (object options included, a spec is a few KiB).
const SPEC_BYTES_MAX: u64 = 1 << 20;

/// `gantry rank`: one rank of a `--ranks` load (started by the parent).
#[derive(Debug, clap::Args)]
pub struct RankCommand {
    /// The checkpoint.
    pub path: PathBuf,
    /// This process's rank.
    #[arg(long)]
    pub rank: usize,
    /// Ranks in the load.
    #[arg(long)]
    pub world: usize,
    /// Where the spec is read from: `-` for stdin (as the parent hands it), or a file.
    #[arg(long, value_name = "-|FILE")]
    pub spec: PathBuf,
}

/// How a rank reaches the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Link {
    /// Rank 0 publishes the NCCL unique id at this path; the others wait for it there.
    NcclIdFile(PathBuf),
    /// Each rank reads on its own, for this reason.
    Alone(String),
}

/// What the parent hands a rank besides its arguments.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub link: Link,
    /// Where the rank writes its JSON figures.
    pub result_file: PathBuf,
    /// With `--trace`: where the rank writes its own trace (a private file of the parent's,
    /// which merges the ranks' traces into the one asked for).
    pub trace_file: Option<PathBuf>,
    /// With `--explain`: the rank records its timeline in memory for its verdict.
    pub explain: bool,
    pub settings: LoadSettings,
    /// `--shard`, as written (`tp:2`).
    pub shard: Option<String>,
    /// `--tp-rule`s, as `PATTERN=SPLIT`.
    pub tp_rules: Vec<String>,
    pub verify: bool,
    pub rank_timeout_s: u64,
    pub piece_mib: u64,
    pub window_mib: u64,
}

/// A rank's arguments and spec, checked.
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    pub path: PathBuf,
    pub device: Device,
    pub link: Link,
    pub result_file: PathBuf,
    pub trace_file: Option<PathBuf>,
    pub explain: bool,
    pub settings: LoadSettings,
    pub shard: Option<ShardSpec>,
    pub tp_rules: Vec<(String, Split)>,
    pub verify: bool,
    pub rank_timeout_s: u64,
    pub piece_mib: u64,
    pub window_mib: u64,
}

/// `split` as `--tp-rule` spells it.
fn split_name(split: Split) -> String {
    match split {
        Split::Column => "column".into(),
        Split::Row => "row".into(),
        Split::Replicate => "replicate".into(),
        Split::Dim(k) => format!("dim{k}"),
    }
}

impl Spec {
    /// The spec of the rank on `device` of the load `args` asks for; with `trace_file`, the
    /// rank writes its trace there.
    pub fn new(
        args: &Args,
        device: Device,
        link: Link,
        result_file: PathBuf,
        trace_file: Option<PathBuf>,
    ) -> Spec {
        Spec {
            device: crate::options::device_name(device),
            link,
            result_file,
            trace_file,
            explain: args.explain,
            settings: args.options.settings.clone(),
            shard: args.shard.map(|s| s.to_string()),
            tp_rules: args.tp_rule.iter().map(|(p, s)| format!("{p}={}", split_name(*s))).collect(),
            verify: args.verify,
            rank_timeout_s: args.rank_timeout_s,
            piece_mib: args.piece_mib,
            window_mib: args.window_mib,
        }
    }
}

impl RankCommand {
    /// The arguments and the spec they name, checked: an error naming the spec and what is
    /// wrong with it.
    pub fn read(&self) -> Result<Rank, Box<dyn Error>> {
        let name = self.spec.display();
        let text = read_capped(&self.spec).map_err(|e| format!("rank spec {name}: {e}"))?;
        let spec: Spec =
            serde_json::from_str(&text).map_err(|e| format!("rank spec {name}: {e}"))?;
        if self.world == 0 || self.rank >= self.world {
            return Err(format!("rank {} of {}: no such rank", self.rank, self.world).into());
        }
        let bad = |what: &str, e: &dyn std::fmt::Display| format!("rank spec {name}: {what}: {e}");
        let device = spec.device.parse::<Device>().map_err(|e| bad("device", &e))?;
        let shard = spec.shard.as_deref().map(str::parse::<ShardSpec>).transpose();
        let tp_rules: Result<Vec<_>, _> = spec.tp_rules.iter().map(|r| parse_tp_rule(r)).collect();
        Ok(Rank {
            rank: self.rank,
            world: self.world,
            path: self.path.clone(),
            device,
            link: spec.link,
            result_file: spec.result_file,
            trace_file: spec.trace_file,
            explain: spec.explain,
            settings: spec.settings,
            shard: shard.map_err(|e| bad("shard", &e))?,
            tp_rules: tp_rules.map_err(|e| bad("tp rule", &e))?,
            verify: spec.verify,
            rank_timeout_s: spec.rank_timeout_s,
            piece_mib: spec.piece_mib,
            window_mib: spec.window_mib,
        })
    }
}

/// The text at `source` (`-`: stdin), at most [`SPEC_BYTES_MAX`] bytes.
fn read_capped(source: &std::path::Path) -> Result<String, Box<dyn Error>> {
    let reader: Box<dyn Read> = match source.as_os_str() == "-" {
        true => Box::new(std::io::stdin()),
        false => Box::new(std::fs::File::open(source)?),
    };
    let mut text = String::new();
    reader.take(SPEC_BYTES_MAX + 1).read_to_string(&mut text)?;
    if text.len() as u64 > SPEC_BYTES_MAX {
        return Err(format!("longer than {SPEC_BYTES_MAX} bytes").into());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Load {
        #[command(flatten)]
        args: Args,
    }

    /// What a rank reads back from its spec is what the parent's command line said: the
    /// placement, its patterns, the exchange's sizes and timeout, and the load settings.
    #[test]
    fn a_spec_carries_the_parents_arguments() {
        let line = [
            "load",
            "ck",
            "--ranks",
            "2",
            "--device",
            "cuda:0,cuda:1",
            "--shard",
            "tp:2",
            "--tp-rule",
            "*.w=dim1",
            "--tp-rule",
            "x=column",
            "--verify",
            "--explain",
            "--window-mib",
            "9",
            "--piece-mib",
            "3",
            "--rank-timeout-s",
            "7",
            "--threads",
            "5",
            "--cache-dir",
            "c",
        ];
        let args = Load::parse_from(line).args;
        let dir = tempfile::tempdir().unwrap();
        let link = Link::NcclIdFile(dir.path().join("id"));
        let (out, trace) = (dir.path().join("out.json"), Some(dir.path().join("trace.json")));
        let spec = Spec::new(&args, Device::Cuda(1), link, out, trace.clone());
        let file = dir.path().join("spec.json");
        std::fs::write(&file, serde_json::to_vec(&spec).unwrap()).unwrap();
        let command = RankCommand { path: "ck".into(), rank: 1, world: 2, spec: file };
        let me = command.read().unwrap();
        assert_eq!((me.rank, me.world, me.device), (1, 2, Device::Cuda(1)));
        assert_eq!(me.shard.map(|s| s.to_string()).as_deref(), Some("tp:2"));
        assert_eq!(me.tp_rules, [("*.w".to_owned(), Split::Dim(1)), ("x".into(), Split::Column)]);
        assert!(me.verify && matches!(me.link, Link::NcclIdFile(p) if p == dir.path().join("id")));
        assert_eq!((me.window_mib, me.piece_mib, me.rank_timeout_s), (9, 3, 7));
        assert!(me.explain && me.trace_file == trace);
        let (given, read) = (args.options.config().unwrap(), me.settings.config().unwrap());
        assert_eq!(crate::options::config_json(&read), crate::options::config_json(&given));
        assert_eq!(read.values().threads, 5);
    }

    /// A rank outside its world is refused before anything is loaded.
    #[test]
    fn a_rank_outside_its_world_is_refused() {
        let args = Load::parse_from(["load", "ck", "--ranks", "2"]).args;
        let dir = tempfile::tempdir().unwrap();
        let link = Link::Alone("x".into());
        let spec = Spec::new(&args, Device::Cpu, link, dir.path().join("o"), None);
        let file = dir.path().join("spec.json");
        std::fs::write(&file, serde_json::to_vec(&spec).unwrap()).unwrap();
        let command = RankCommand { path: "ck".into(), rank: 2, world: 2, spec: file };
        let err = command.read().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("rank 2 of 2: no such rank"), "{err}");
    }
}
