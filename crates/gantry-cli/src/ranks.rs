//! `gantry load PATH --ranks N --device cuda:0,cuda:1,...`: N processes, one per GPU, loading
//! one checkpoint cooperatively (each byte read from storage once across the ranks, exchanged
//! with NCCL), the way tensor-parallel inference servers run.
//!
//! The parent starts itself again once per rank as the hidden `gantry rank` subcommand, handing
//! it a spec (`rank_spec.rs`): its device, the load settings, and how it reaches the others (a
//! file where rank 0 publishes the NCCL unique id it creates, so NCCL's bootstrap root lives in
//! a rank, as under torchrun; or why each reads on its own, when NCCL is not available or the
//! ranks load into host memory). It collects each rank's JSON and prints the
//! per-rank and total figures, including the bytes each process fetched from storage as the
//! kernel counts them (`read_bytes` of `/proc/self/io`), and with `--explain` each rank's
//! verdict. With `--trace FILE`, each rank records its own timeline into a file of the
//! parent's private temporary directory, named in its spec, and reports where its trace
//! started on the host's monotonic clock; the parent merges them into FILE, one process per
//! rank (pid rank + 1, named `rank R (device)`), each shifted by its start's distance from the
//! earliest, so all ranks lie on one time line (the monotonic clock is one for every process
//! of a host, and never steps). Merging after the ranks end costs the parent a parse of each
//! trace, but keeps recording what it is in every rank: a buffer per thread, no cross-process
//! traffic while loading. When a rank fails, the parent waits
//! for the others to notice (they fail on their own within their timeout), stops any that are
//! still running after that, and reports every rank's outcome.

use std::error::Error;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gantry::coop::{Communicator, CoopReport, Cooperation, UniqueId};
use gantry::placement::Share;
use gantry::trace::Process;
use gantry::{CudaDevice, Loader};
use serde_json::{json, Value};

use crate::file_report::json_files;
use crate::load_args::{placement, warn_unmatched, Args};
use crate::options::{device_name, Device};
use crate::rank_spec::{Link, Rank as Me, RankCommand, Spec};
use crate::units;

/// A rank aborts after its first tensor has landed when this variable names it (trials of a
/// rank dying mid-load).
pub const ABORT_RANK_VARIABLE: &str = "GANTRY_COOP_ABORT_RANK";

/// Where the parent writes each rank's output (`rank-R.log`: its stdout, then its stderr, with
/// `RUST_LOG` or `NCCL_DEBUG` messages) when this variable names a directory.
pub const RANK_LOG_DIR_VARIABLE: &str = "GANTRY_RANK_LOG_DIR";

/// Extra time the parent gives the other ranks to notice a failed rank, past their timeout.
const GRACE: Duration = Duration::from_secs(10);

/// The most processes `--ranks` starts: one per GPU (GPU ranks are also bounded by the GPUs
/// present), or host-memory ranks that each load the whole checkpoint.
pub const RANKS_MAX: usize = 64;

/// Bytes this process has fetched from storage so far (`read_bytes` of `/proc/self/io`).
fn storage_read_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("read_bytes:")).and_then(|v| v.trim().parse().ok())
}

/// Each rank's device: one GPU per rank from `--device`, or host memory for all; at most
/// [`RANKS_MAX`] ranks, checked before anything starts.
fn rank_devices(args: &Args, ranks: usize) -> Result<Vec<Device>, Box<dyn Error>> {
    if ranks > RANKS_MAX {
        return Err(
            format!("--ranks {ranks}: at most {RANKS_MAX} ranks (one process per GPU)").into()
        );
    }
    let list = &args.options.device.0;
    match list.as_slice() {
        [Device::Cpu] => Ok(vec![Device::Cpu; ranks]),
        gpus if gpus.len() == ranks => Ok(gpus.to_vec()),
        gpus => Err(format!(
            "--ranks {ranks} starts one process per GPU: --device names {} GPU(s), it needs {ranks} (cuda:0,cuda:1,...) or cpu",
            gpus.len()
        )
        .into()),
    }
}

/// An error unless every GPU of `devices` is present on this machine (checked before any rank
/// starts).
fn gpus_present(devices: &[Device]) -> Result<(), Box<dyn Error>> {
    if devices.contains(&Device::Cpu) {
        return Ok(());
    }
    let ranks = devices.len();
    let present = CudaDevice::count()
        .map_err(|e| format!("--ranks {ranks} on GPUs: cannot count the GPUs: {e}"))?;
    if let Some(missing) =
        devices.iter().find(|d| matches!(d, Device::Cuda(n) if *n as usize >= present))
    {
        return Err(format!(
            "--ranks {ranks}: --device names {}, but this machine has {present} GPU(s)",
            device_name(*missing)
        )
        .into());
    }
    Ok(())
}

/// How the ranks will reach each other: the file where rank 0 publishes the NCCL unique id
/// (NCCL's bootstrap root then lives in rank 0, as under torchrun, not in this parent), or
/// why each reads on its own.
fn link(devices: &[Device]) -> Link {
    if devices.contains(&Device::Cpu) {
        return Link::Alone(
            "host memory: cooperative loads need GPUs (the ranks exchange GPU memory)".into(),
        );
    }
    if devices.len() == 1 {
        return Link::Alone("world size 1: nothing to share".into());
    }
    if let Err(e) = gantry::coop::load_nccl() {
        return Link::Alone(format!("NCCL is not available: {e}"));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("gantry-nccl-id-{}-{nanos}", std::process::id());
    Link::NcclIdFile(std::env::temp_dir().join(name))
}

/// Rank 0: a new unique id, published at `path` (written beside it, then renamed, so the
/// others never read half of it).
fn publish_unique_id(
    nccl: &std::sync::Arc<gantry::coop::Nccl>,
    path: &Path,
) -> Result<UniqueId, Box<dyn Error>> {
    let id = UniqueId::new(nccl)?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, id.to_hex())?;
    std::fs::rename(&partial, path)?;
    Ok(id)
}

/// The other ranks: the unique id rank 0 publishes at `path`, waited for up to `timeout`.
fn await_unique_id(path: &Path, timeout: Duration) -> Result<UniqueId, Box<dyn Error>> {
    let start = Instant::now();
    loop {
        if let Ok(hex) = std::fs::read_to_string(path) {
            return Ok(UniqueId::from_hex(hex.trim())?);
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "rank 0 did not publish the NCCL unique id at {} within {timeout:?}",
                path.display()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One started rank and what it printed.
struct Rank {
    child: Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
    status: Option<ExitStatus>,
}

/// Starts `gantry rank PATH --rank R --world N --spec -` and hands it `spec` on its stdin.
fn spawn(path: &Path, rank: usize, world: usize, spec: &Spec) -> Result<Rank, Box<dyn Error>> {
    let spec = serde_json::to_vec(spec)?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("rank")
        .arg(path)
        .args(["--rank", &rank.to_string(), "--world", &world.to_string(), "--spec", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting a rank process: {e}"))?;
    // Dropping stdin once written closes it: the rank reads its spec to the end.
    let handed: Result<(), Box<dyn Error>> = match child.stdin.take() {
        Some(mut stdin) => {
            stdin.write_all(&spec).map_err(|e| format!("handing the rank its spec: {e}").into())
        }
        None => Err("a rank's stdin is not piped".into()),
    };
    let drained = handed
        .and_then(|()| drain(child.stdout.take()))
        .and_then(|out| Ok((out, drain(child.stderr.take())?)));
    match drained {
        Ok((stdout, stderr)) => Ok(Rank { child, stdout, stderr, status: None }),
        Err(e) => {
            end(&mut [&mut child]);
            Err(e)
        }
    }
}

/// A thread that reads `pipe` to its end.
fn drain(
    pipe: Option<impl Read + Send + 'static>,
) -> Result<std::thread::JoinHandle<String>, Box<dyn Error>> {
    let mut pipe = pipe.ok_or("a rank's output is not piped")?;
    let thread = std::thread::Builder::new().name("gantry-rank-output".into()).spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    });
    Ok(thread.map_err(|e| format!("starting a thread to read a rank's output: {e}"))?)
}

/// Kills and reaps `children` (those that already ended are only reaped).
fn end(children: &mut [&mut Child]) {
    for child in children.iter_mut() {
        let _ = child.kill();
    }
    for child in children.iter_mut() {
        let _ = child.wait();
    }
}

/// Starts one process per rank; when one cannot be started, ends (kills and reaps) those
/// already started and says which rank failed.
fn spawn_all(path: &Path, specs: &[Spec]) -> Result<Vec<Rank>, Box<dyn Error>> {
    let world = specs.len();
    let mut ranks: Vec<Rank> = Vec::with_capacity(world);
    for (r, spec) in specs.iter().enumerate() {
        match spawn(path, r, world, spec) {
            Ok(rank) => ranks.push(rank),
            Err(e) => {
                end(&mut ranks.iter_mut().map(|r| &mut r.child).collect::<Vec<_>>());
                return Err(format!(
                    "rank {r} of {world} could not be started ({e}); the {r} started were stopped"
                )
                .into());
            }
        }
    }
    Ok(ranks)
}

/// Waits for every rank; once one has failed, the others get their timeout plus a grace
/// period to notice, then are killed.
fn wait_all(ranks: &mut [Rank], timeout: Duration) {
    let mut failed_at: Option<Instant> = None;
    while ranks.iter().any(|r| r.status.is_none()) {
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            if let Ok(Some(status)) = r.child.try_wait() {
                r.status = Some(status);
                if !status.success() {
                    failed_at.get_or_insert_with(Instant::now);
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > timeout + GRACE) {
            for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
                let _ = r.child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `gantry load --ranks N`: starts the ranks, collects and prints their figures.
pub fn run_parent(args: &Args, world: usize) -> Result<(), Box<dyn Error>> {
    if world == 0 {
        return Err("--ranks must be at least 1".into());
    }
    let devices = rank_devices(args, world)?;
    if let Some(shard) = &args.shard {
        let (_, n) = placement(args, shard)?;
        if n != world {
            return Err(
                format!("--shard {shard} places across {n} ranks but --ranks is {world}").into()
            );
        }
        if devices.contains(&Device::Cpu) {
            return Err("--ranks with --shard keeps shares on GPUs: name one GPU per rank".into());
        }
    }
    gpus_present(&devices)?;
    let checkpoint = gantry::open_with(&args.options.path, &args.options.config()?)?;
    if let Some(shard) = &args.shard {
        warn_unmatched(args, shard, &checkpoint);
    }
    let link = link(&devices);
    let start = Instant::now();
    let results = tempfile::tempdir()?;
    let result_of = |r: usize| results.path().join(format!("rank-{r}.json"));
    let trace_of = |r: usize| results.path().join(format!("rank-{r}.trace.json"));
    let traced = |r: usize| args.trace.as_ref().map(|_| trace_of(r));
    let specs: Vec<Spec> = (devices.iter().enumerate())
        .map(|(r, &device)| Spec::new(args, device, link.clone(), result_of(r), traced(r)))
        .collect();
    let mut ranks = spawn_all(&args.options.path, &specs)?;
    wait_all(&mut ranks, Duration::from_secs(args.rank_timeout_s));
    if let Link::NcclIdFile(path) = &link {
        let _ = std::fs::remove_file(path);
    }
    let wall = start.elapsed().as_secs_f64();
    let mut outputs = Vec::with_capacity(world);
    let mut failures = Vec::new();
    let logs = std::env::var_os(RANK_LOG_DIR_VARIABLE).map(std::path::PathBuf::from);
    for (r, rank) in ranks.into_iter().enumerate() {
        let out = rank.stdout.join().unwrap_or_default();
        let err = rank.stderr.join().unwrap_or_default();
        if let Some(dir) = &logs {
            let path = dir.join(format!("rank-{r}.log"));
            if let Err(e) = std::fs::write(&path, format!("{out}{err}")) {
                eprintln!("warning: writing {}: {e}", path.display());
            }
        }
        let Some(status) = rank.status else { continue };
        if status.success() {
            let path = result_of(r);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("rank {r}: its figures at {}: {e}", path.display()))?;
            outputs.push(serde_json::from_str::<Value>(&text)?);
        } else {
            let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
            failures.push(format!("rank {r} ({status}): {last}"));
        }
    }
    if !failures.is_empty() {
        return Err(
            format!("{} of {world} ranks failed: {}", failures.len(), failures.join("; ")).into()
        );
    }
    if let Some(path) = &args.trace {
        let files: Vec<_> = (0..world).map(trace_of).collect();
        merge_traces(&outputs, &files, path)?;
    }
    print_ranks(args, &outputs, checkpoint.total_bytes(), wall);
    Ok(())
}

/// Writes the ranks' traces (`files[r]`, rank `r`'s figures at `ranks[r]`) to `out` as one
/// trace, a process per rank, on the time line of the earliest rank's start.
fn merge_traces(ranks: &[Value], files: &[PathBuf], out: &Path) -> Result<(), Box<dyn Error>> {
    let mut loaded = Vec::with_capacity(ranks.len());
    for (r, (figures, file)) in ranks.iter().zip(files).enumerate() {
        let text = crate::trace::read_capped(file).map_err(|e| format!("rank {r}: {e}"))?;
        let parsed = gantry::trace::parse(&text)
            .map_err(|e| format!("rank {r}: its trace {}: {e}", file.display()))?;
        let start = figures["trace_clock"]["monotonic_ns"].as_u64();
        let start =
            start.ok_or(format!("rank {r}: its figures say nothing of its trace's start"))?;
        let name = format!("rank {r} ({})", figures["device"].as_str().unwrap_or("?"));
        loaded.push((start, name, parsed));
    }
    let origin = loaded.iter().map(|l| l.0).min().unwrap_or(0);
    for (start, _, parsed) in &mut loaded {
        let shift = *start - origin;
        for e in &mut parsed.events {
            e.ts_ns = e.ts_ns.saturating_add(shift);
        }
    }
    let processes: Vec<Process<'_>> = (loaded.iter().enumerate())
        .map(|(r, (_, name, parsed))| Process {
            pid: u32::try_from(r + 1).unwrap_or(u32::MAX),
            name: name.clone(),
            events: &parsed.events,
            tracks: &parsed.tracks,
        })
        .collect();
    std::fs::write(out, gantry::trace::to_json_processes(&processes))
        .map_err(|e| format!("writing the trace {}: {e}", out.display()).into())
}

/// Per-rank lines and the totals (or one JSON object).
fn print_ranks(args: &Args, ranks: &[Value], checkpoint_bytes: u64, wall: f64) {
    let sum = |key: &str| ranks.iter().filter_map(|r| r[key].as_u64()).sum::<u64>();
    let storage = ranks.iter().map(|r| r["storage_read_bytes"].as_u64()).sum::<Option<u64>>();
    let seconds = ranks.iter().filter_map(|r| r["seconds"].as_f64()).fold(0.0, f64::max);
    let total = ranks.iter().filter_map(|r| r["total_seconds"].as_f64()).fold(0.0, f64::max);
    let cooperative = ranks.iter().all(|r| r["cooperative"] == json!(true));
    let reason = ranks.first().map_or(Value::Null, |r| r["reason"].clone());
    if args.json {
        let out = json!({
            "ranks": ranks.len(), "cooperative": cooperative, "reason": reason,
            "checkpoint_bytes": checkpoint_bytes, "read_bytes": sum("read_bytes"),
            "storage_read_bytes": storage, "seconds": seconds, "total_seconds": total,
            "wall_seconds": wall, "per_rank": ranks,
        });
        println!("{out}");
        return;
    }
    println!(
        "{} ranks ({}): {}",
        ranks.len(),
        if cooperative { "cooperative" } else { "each on its own" },
        reason.as_str().unwrap_or("")
    );
    for r in ranks {
        println!(
            "  rank {} ({}): {} in {:.3} s, read {} from storage (planned {}), received {}",
            r["rank"],
            r["device"].as_str().unwrap_or("?"),
            units::bytes(r["bytes"].as_u64().unwrap_or(0)),
            r["seconds"].as_f64().unwrap_or(0.0),
            r["storage_read_bytes"].as_u64().map_or("?".to_owned(), units::bytes),
            units::bytes(r["read_bytes"].as_u64().unwrap_or(0)),
            units::bytes(r["received_bytes"].as_u64().unwrap_or(0)),
        );
        if let Some(line) = r["bound_by"]["line"].as_str().filter(|_| args.explain) {
            println!("    {line}");
        }
        print_sha256(r);
    }
    println!(
        "total: checkpoint {}, read {} (planned {}) across ranks, slowest rank {seconds:.3} s, {total:.3} s end to end per process, {wall:.3} s for all processes",
        units::bytes(checkpoint_bytes),
        storage.map_or("?".to_owned(), units::bytes),
        units::bytes(sum("read_bytes"))
    );
}

/// Under a rank's line, with --verify-sha256, one line per file it read: its SHA-256 and what
/// it was checked against (or that nothing was known to check it against).
fn print_sha256(rank: &Value) {
    let files = rank["files"].as_array().map(Vec::as_slice).unwrap_or_default();
    for f in files.iter().filter(|f| f["sha256"].is_string()) {
        println!(
            "    {}: sha256 {}: {}",
            f["path"].as_str().unwrap_or("?").escape_debug(),
            f["sha256"].as_str().unwrap_or("?"),
            f["sha256_check"].as_str().unwrap_or("?")
        );
    }
}

/// Compares what a rank loaded with the files (`--verify`).
type Verify = Box<dyn FnOnce() -> Result<(), Box<dyn Error>>>;

/// A rank's load: its report, what it did, and how to check it against the files.
type RankLoad = (gantry::LoadReport, CoopReport, Verify);

/// The positions of the tensors `loaded` says were loaded.
fn loaded_table(c: &gantry::Checkpoint, loaded: impl Fn(usize) -> bool) -> Vec<usize> {
    (0..c.tensors.len()).filter(|&i| loaded(i)).collect()
}

/// Calls `std::process::abort` when [`ABORT_RANK_VARIABLE`] names `rank`.
fn abort_hook(rank: usize) -> impl Fn() {
    let abort_here = std::env::var(ABORT_RANK_VARIABLE).ok() == Some(rank.to_string());
    move || {
        if abort_here {
            std::process::abort(); // a trial of a rank dying mid-load
        }
    }
}

/// A rank loading into host memory: always on its own.
fn load_rank_host(
    loader: &Loader,
    checkpoint: gantry::Checkpoint,
    me: &Me,
) -> Result<RankLoad, gantry::Error> {
    let hook = abort_hook(me.rank);
    let model = loader.load_with(checkpoint, |_| true, |_| hook())?;
    let report = model.report().clone();
    let coop = CoopReport {
        rank: me.rank,
        world: me.world,
        reason: match &me.link {
            Link::Alone(reason) => reason.clone(),
            Link::NcclIdFile(_) => "host memory".to_owned(),
        },
        read_bytes: report.read_bytes,
        owned_bytes: report.tensor_bytes,
        ..Default::default()
    };
    let verify: Verify = Box::new(move || {
        let loaded = loaded_table(model.checkpoint(), |i| model.get(i).is_some());
        crate::check::verify(model.checkpoint(), &loaded, &mut |i, at, buf| {
            let bytes = model.get(i).expect("loaded").bytes;
            buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
            Ok(())
        })
    });
    Ok((report, coop, verify))
}

/// A rank loading onto GPU `ordinal`: over NCCL when the parent gave a unique id.
fn load_rank_device(
    me: &Me,
    loader: &Loader,
    checkpoint: gantry::Checkpoint,
    ordinal: u32,
) -> Result<RankLoad, Box<dyn Error>> {
    let gpu = {
        let _span = gantry::trace::span("phase", "cuda start-up");
        CudaDevice::open(ordinal)?
    };
    let timeout = Duration::from_secs(me.rank_timeout_s);
    let nccl = || {
        gantry::coop::load_nccl()
            .map_err(|e| format!("rank {}: NCCL is not available: {e}", me.rank))
    };
    let comm = match &me.link {
        Link::NcclIdFile(path) => {
            let nccl = nccl()?;
            let id = if me.rank == 0 {
                publish_unique_id(&nccl, path)?
            } else {
                await_unique_id(path, timeout)?
            };
            Some(Communicator::init(nccl, &id, me.rank, me.world, &gpu, timeout)?)
        }
        Link::Alone(_) => None,
    };
    let coop = match (&comm, &me.link) {
        (Some(c), _) => Cooperation::nccl(c)
            .timeout(timeout)
            .piece_bytes(crate::units::mib_bytes("--piece-mib", me.piece_mib)?)
            .window_bytes(crate::units::mib_bytes("--window-mib", me.window_mib)?),
        (None, Link::Alone(reason)) => Cooperation::alone(me.rank, me.world, reason),
        (None, Link::NcclIdFile(_)) => Cooperation::alone(me.rank, me.world, "no NCCL unique id"),
    };
    let hook = abort_hook(me.rank);
    let progress = Watchdog::start(me.rank, timeout)?;
    let beat = || {
        progress.beat();
        hook()
    };
    let loaded = match &me.shard {
        Some(shard) => shares_on_device(me, loader, checkpoint, &gpu, coop, shard, beat),
        None => whole_on_device(loader, checkpoint, &gpu, coop, me.world, beat),
    };
    progress.stop();
    loaded
}

/// Every tensor whole on this rank's GPU.
fn whole_on_device(
    loader: &Loader,
    checkpoint: gantry::Checkpoint,
    gpu: &std::sync::Arc<CudaDevice>,
    coop: Cooperation<'_>,
    world: usize,
    mut beat: impl FnMut(),
) -> Result<RankLoad, Box<dyn Error>> {
    let whole = |_: &gantry::TensorEntry| Ok((0..world).map(|r| (r, Share::Whole)).collect());
    let done = loader.load_cooperative(checkpoint, gpu, coop, whole, |_| beat())?;
    let model = done.model;
    let report = model.report().clone();
    let verify: Verify = Box::new(move || {
        let loaded = loaded_table(model.checkpoint(), |i| model.get(i).is_some());
        crate::check::verify(model.checkpoint(), &loaded, &mut |i, at, buf| {
            let ptr = model.get(i).expect("loaded").ptr;
            buf.copy_from_slice(&model.device().copy_to_host(ptr + at, buf.len())?);
            Ok(())
        })
    });
    Ok((report, done.coop, verify))
}

/// This rank's shares under `--shard` on its GPU.
fn shares_on_device(
    me: &Me,
    loader: &Loader,
    checkpoint: gantry::Checkpoint,
    gpu: &std::sync::Arc<CudaDevice>,
    coop: Cooperation<'_>,
    shard: &gantry::placement::ShardSpec,
    mut beat: impl FnMut(),
) -> Result<RankLoad, Box<dyn Error>> {
    let place = shard.placement(&me.tp_rules)?;
    let done = loader.load_cooperative_placed(checkpoint, gpu, coop, &place, |_| beat())?;
    let model = done.model;
    let report = model.report().clone();
    let verify: Verify = Box::new(move || {
        let shares: Vec<(usize, Share)> =
            model.share_entries(0).iter().map(|s| (s.tensor, s.share)).collect();
        let ptrs: Vec<u64> = model.tensors(0).map(|t| t.ptr).collect();
        crate::check::verify_placed(model.checkpoint(), &[shares], &mut |_, s, at, buf| {
            buf.copy_from_slice(&model.device(0).copy_to_host(ptrs[s] + at, buf.len())?);
            Ok(())
        })
    });
    Ok((report, done.coop, verify))
}

/// Ends a rank process that has stopped making progress: NCCL's host calls (connection set-up
/// inside a group, say) can block on a peer that died, beyond the reach of the load's own
/// timeouts. When no tensor has landed for the rank timeout, the rank prints one error line
/// naming itself and exits, so the parent and the other ranks see it fail instead of waiting.
struct Watchdog {
    last_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    start: Instant,
}

impl Watchdog {
    fn start(rank: usize, timeout: Duration) -> Result<Watchdog, Box<dyn Error>> {
        use std::sync::atomic::Ordering::Relaxed;
        let last_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Instant::now();
        let (last, stop) = (std::sync::Arc::clone(&last_ms), std::sync::Arc::clone(&done));
        let watch = std::thread::Builder::new().name("gantry-rank-watchdog".into()).spawn(move || {
            while !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let idle =
                    start.elapsed().saturating_sub(Duration::from_millis(last.load(Relaxed)));
                if idle > timeout && !stop.load(Relaxed) {
                    eprintln!(
                        "error: rank {rank}: no tensor landed for {} s: another rank did not answer (the NCCL exchange is stuck)",
                        timeout.as_secs()
                    );
                    std::process::exit(1);
                }
            }
        });
        watch.map_err(|e| format!("rank {rank}: starting its watchdog thread: {e}"))?;
        Ok(Watchdog { last_ms, done, start })
    }

    fn beat(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    fn stop(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `gantry rank`: one rank (a process started by [`run_parent`]): loads, optionally
/// verifies, writes its figures as JSON.
pub fn run_rank(command: &RankCommand) -> Result<(), Box<dyn Error>> {
    let storage_before = storage_read_bytes();
    let start = Instant::now();
    let me = command.read()?;
    // This rank's timeline from its loader's start on, written where the parent said, or
    // kept in memory for the verdict.
    let recording = (me.trace_file.is_some() || me.explain).then(gantry::trace::Trace::new);
    let _in = gantry::trace::enter(recording.as_ref(), "main");
    let loader = Loader::new(me.settings.config()?)?;
    let checkpoint = gantry::open_with(&me.path, loader.config())?;
    let device = me.device;
    let (report, coop, verify) = match device {
        Device::Cpu => load_rank_host(&loader, checkpoint, &me)?,
        Device::Cuda(n) => load_rank_device(&me, &loader, checkpoint, n)?,
    };
    let total_seconds = start.elapsed().as_secs_f64();
    if let (Some(trace), Some(path)) = (&recording, &me.trace_file) {
        trace.write(path)?;
    }
    if me.verify {
        verify()?;
    }
    let trace_clock = recording.as_ref().map(|t| {
        let c = t.clock();
        json!({"monotonic_ns": c.monotonic_ns, "realtime_ns": c.realtime_ns})
    });
    let storage = storage_read_bytes().zip(storage_before).map(|(a, b)| a.saturating_sub(b));
    let out = json!({
        "rank": me.rank, "world": me.world, "device": device_name(device),
        "cooperative": coop.cooperative, "reason": coop.reason,
        "bytes": report.tensor_bytes, "read_bytes": report.read_bytes,
        "storage_read_bytes": storage, "owned_bytes": coop.owned_bytes,
        "received_bytes": coop.received_bytes, "pieces": coop.pieces, "rounds": coop.rounds, "windows": coop.windows,
        "shard": me.shard.map(|s| s.to_string()),
        "seconds": report.seconds, "gb_per_s": report.gb_per_s(),
        "total_seconds": total_seconds, "exchange_tail_seconds": coop.exchange_tail_seconds,
        "read_seconds": coop.read_seconds, "share_copy_seconds": coop.share_copy_seconds,
        "verified": me.verify, "files": json_files(&report),
        "bound_by": report.bound_by.as_ref().map(crate::file_report::bound_by_json),
        "trace_clock": trace_clock,
        "config": crate::options::config_json(loader.config()),
    });
    // A file of its own: libraries (NCCL with NCCL_DEBUG set) print on stdout too, even in the
    // middle of a line.
    std::fs::write(&me.result_file, out.to_string())?;
    Ok(())
}
