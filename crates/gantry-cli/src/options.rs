//! Options shared by `load` and `bench`.
//!
//! [`LoadSettings`] is everything that makes a [`Config`]; it is also what a `--ranks` parent
//! hands each rank process (serialized, see `rank_spec.rs`), so a setting added here reaches
//! the ranks without another line.

use std::path::PathBuf;

use gantry::{Config, PathChoice};
use serde::{Deserialize, Serialize};

use crate::units;

/// Where tensors go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// GPU `n`.
    Cuda(u32),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" {
            return Ok(Device::Cuda(0));
        }
        s.strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("'{s}' is not a device (cpu, cuda, cuda:N)"))
    }
}

/// `device` as `--device` spells it.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
    }
}

/// `--device`: `cpu`, `cuda:N`, or several GPUs `cuda:0,cuda:1` (placed loads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices(pub Vec<Device>);

impl std::str::FromStr for Devices {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let list = s.split(',').map(str::parse).collect::<Result<Vec<Device>, String>>()?;
        if list.len() > 1 && list.contains(&Device::Cpu) {
            return Err(format!("'{s}': a device list names GPUs only (cuda:0,cuda:1)"));
        }
        Ok(Devices(list))
    }
}

impl Devices {
    /// The one device of a plain load.
    pub fn one(&self) -> Result<Device, String> {
        match self.0.as_slice() {
            [d] => Ok(*d),
            _ => Err("--device names several GPUs: that needs --shard".to_owned()),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct LoadOptions {
    /// A .safetensors file, a directory, or a model.safetensors.index.json.
    pub path: PathBuf,
    /// Where tensors go: cpu, or cuda:N (with --shard: cuda:0,cuda:1,...).
    #[arg(long, default_value = "cpu")]
    pub device: Devices,
    #[command(flatten)]
    pub settings: LoadSettings,
}

impl LoadOptions {
    pub fn config(&self) -> Result<Config, Box<dyn std::error::Error>> {
        self.settings.config()
    }
}

/// The options that make a load's [`Config`].
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSettings {
    /// Reader: auto (per file, from the probed facts), direct (io_uring O_DIRECT), buffered
    /// (threads of pread) or gds (cuFile into GPU memory).
    #[arg(long = "path", value_name = "auto|direct|buffered|gds")]
    pub path_choice: Option<String>,
    /// Volume profile: request size and queue depth for auto, gp3, io2 or nvme (explicit
    /// --chunk-mib / --queue-depth override it).
    #[arg(long, value_name = "auto|gp3|io2|nvme")]
    pub profile: Option<String>,
    /// Reads in flight per volume (every volume under the checkpoint is read at once), 1 to
    /// 4096.
    #[arg(long, value_parser = units::one_to::<usize>(gantry::config::QUEUE_DEPTH_MAX as u64))]
    pub queue_depth: Option<usize>,
    /// Bytes per read and staging buffer, in MiB (1 to 1024).
    #[arg(long, value_parser = units::one_to::<usize>(units::READ_MIB_MAX))]
    pub chunk_mib: Option<usize>,
    /// Bytes per read of the buffered (page-cache) reader, in MiB (1 to 1024).
    #[arg(long, value_parser = units::one_to::<usize>(units::READ_MIB_MAX))]
    pub buffered_chunk_mib: Option<usize>,
    /// Staging ring size, in MiB (1 to 65536).
    #[arg(long, value_parser = units::one_to::<usize>(units::STAGING_MIB_MAX))]
    pub staging_mib: Option<usize>,
    /// Threads of the buffered reader (1 to 256).
    #[arg(long, value_parser = units::one_to::<usize>(gantry::config::THREADS_MAX as u64))]
    pub threads: Option<usize>,
    /// Object storage (s3://, gs://, az:// sources): bytes per ranged GET, in MiB (1 to 1024).
    #[arg(long, value_parser = units::one_to::<usize>(units::READ_MIB_MAX))]
    pub object_part_mib: Option<usize>,
    /// Object storage: most ranged GETs in flight (1 to 4096, default 64; the load keeps as
    /// many as the measured time to first byte and per-connection rate ask, and more while
    /// more move more, up to this).
    #[arg(long, value_parser = units::one_to::<usize>(gantry::config::QUEUE_DEPTH_MAX as u64))]
    pub object_concurrency: Option<usize>,
    /// Hash every file read (SHA-256, while it streams) and check it against the digest known
    /// for it (Hugging Face blob name, SHA256SUMS beside it, object metadata sha256); a
    /// mismatch fails the load. Files are then read whole.
    #[arg(long)]
    pub verify_sha256: bool,
    /// --verify-sha256, and every file must have a known digest: a file with none fails the
    /// load (before anything is read) instead of loading with a warning.
    #[arg(long)]
    pub require_sha256: bool,
    /// Object storage: keep a local copy of every object read in DIR (written while it
    /// streams), and read that copy on later loads while the object's ETag is unchanged.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<std::path::PathBuf>,
    /// Object storage: share --cache-dir with its group (directories 2770, copies 0640; copies
    /// written by any member of the directory's group are trusted). Default: private to the
    /// user (0700, 0600; only the user's and root's copies are read).
    #[arg(long, requires = "cache_dir")]
    pub cache_shared: bool,
    /// From a live source served on a GPU of this host (`gantry serve --device cuda:N`):
    /// alias the server's device memory instead of copying it (read-only by contract).
    #[arg(long)]
    #[serde(default)]
    pub share_live: bool,
    #[command(flatten)]
    pub store: StoreOptions,
}

/// Where s3://, gs:// and az:// sources live, over each provider's environment.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreOptions {
    /// Object storage: the S3 endpoint (overrides AWS_ENDPOINT_URL); http:// allows plain HTTP.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Object storage: the region (overrides AWS_REGION).
    #[arg(long)]
    pub s3_region: Option<String>,
    /// Object storage: the Google Cloud Storage endpoint (google_base_url); http:// allows
    /// plain HTTP.
    #[arg(long, value_name = "URL")]
    pub gcs_endpoint: Option<String>,
    /// Object storage: the Azure Blob Storage account endpoint (azure_storage_endpoint, e.g.
    /// http://127.0.0.1:10000/devstoreaccount1 for Azurite); http:// allows plain HTTP.
    #[arg(long, value_name = "URL")]
    pub azure_endpoint: Option<String>,
    /// Object storage: any object_store client key (aws_*, google_*, azure_*, or a client key
    /// such as allow_http or timeout) and its value; repeatable.
    #[arg(long = "object-option", value_name = "KEY=VALUE", value_parser = key_value)]
    pub object_options: Vec<(String, String)>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

impl StoreOptions {
    /// `c` with these options set; an error naming the flag whose value is no endpoint.
    pub fn apply(&self, mut c: Config) -> Result<Config, gantry::Error> {
        use gantry::io::object::{endpoint_options, Provider};
        let endpoints = [
            (&self.s3_endpoint, Provider::S3, "--s3-endpoint"),
            (&self.gcs_endpoint, Provider::Gcs, "--gcs-endpoint"),
            (&self.azure_endpoint, Provider::Azure, "--azure-endpoint"),
        ];
        for (url, provider, flag) in endpoints {
            if let Some(url) = url {
                let options = endpoint_options(provider, url)
                    .map_err(|e| gantry::Error::Config(format!("{flag}: {e}")))?;
                for (key, value) in options {
                    c = c.object_option(key, value);
                }
            }
        }
        if let Some(region) = &self.s3_region {
            gantry::io::object::settings::check_option("aws_region", region)
                .map_err(|e| gantry::Error::Config(format!("--s3-region: {e}")))?;
            c = c.object_option("aws_region", region);
        }
        for (key, value) in &self.object_options {
            c = c.object_option(key, value);
        }
        Ok(c)
    }
}

impl LoadSettings {
    pub fn config(&self) -> Result<Config, Box<dyn std::error::Error>> {
        let mut c = Config::default();
        if let Some(p) = &self.path_choice {
            c = c.path(p.parse::<PathChoice>()?);
        }
        if let Some(p) = &self.profile {
            c = c.profile(p.parse()?);
        }
        c = c.share_live(self.share_live);
        if let Some(n) = self.queue_depth {
            c = c.queue_depth(n);
        }
        if let Some(n) = self.chunk_mib {
            c = c.chunk_bytes(units::mib_usize("--chunk-mib", n)?);
        }
        if let Some(n) = self.buffered_chunk_mib {
            c = c.buffered_chunk_bytes(units::mib_usize("--buffered-chunk-mib", n)?);
        }
        if let Some(n) = self.staging_mib {
            c = c.staging_bytes(units::mib_usize("--staging-mib", n)?);
        }
        if let Some(n) = self.threads {
            c = c.threads(n);
        }
        if let Some(n) = self.object_part_mib {
            c = c.object_part_bytes(units::mib_usize("--object-part-mib", n)?);
        }
        if let Some(n) = self.object_concurrency {
            c = c.object_concurrency(n);
        }
        let mut c = self.store.apply(c)?.verify_sha256(self.verify_sha256);
        c = c.require_sha256(self.require_sha256);
        if let Some(dir) = &self.cache_dir {
            if dir.as_os_str().is_empty() {
                return Err("--cache-dir is empty: name a directory (or leave it out)".into());
            }
            c = c.cache_dir(dir).cache_shared(self.cache_shared);
        }
        c.validate()?;
        Ok(c)
    }
}

/// The settings `config` loads with ("auto" decided for one process on this machine) and
/// the object-storage and cache choices, for `--json` (a `--ranks` load's ranks print theirs,
/// to be compared with a plain load's). Option values are left out: they may be secrets.
pub fn config_json(config: &Config) -> serde_json::Value {
    let v = config.values();
    let keys: Vec<&str> = config.object.options.iter().map(|(k, _)| k.as_str()).collect();
    serde_json::json!({
        "path": format!("{:?}", v.path).to_lowercase(),
        "queue_depth": v.queue_depth,
        "chunk_bytes": v.chunk_bytes,
        "buffered_chunk_bytes": v.buffered_chunk_bytes,
        "staging_bytes": v.staging_bytes,
        "threads": v.threads,
        "object_part_bytes": v.object_part_bytes,
        "object_concurrency": v.object_concurrency,
        "object_option_keys": keys,
        "verify_sha256": v.verify_sha256,
        "require_sha256": config.integrity.require_sha256,
        "cache_dir": config.object.cache_dir.as_ref().map(|d| d.display().to_string()),
        "cache_shared": config.object.cache_shared,
    })
}
