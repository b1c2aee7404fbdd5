//! `gantry load --ranks N`: one process per rank, started by the CLI. On any machine: the
//! argument errors, ranks reading on their own (host memory, or NCCL missing) with the reason
//! in the report, every rank's tensors checked against an independent read (`--verify`), and
//! a rank that dies failing the load. With two or more GPUs and NCCL (`GANTRY_REQUIRE_GPU=1`
//! makes their absence a failure): cooperative loads of 2 and 4 ranks, bit-exact on every
//! rank (whole tensors, and tensor-parallel shares through many windows), every byte read from
//! storage once across the ranks, and a rank killed mid-load.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn gantry(args: &[&str], env: &[(&str, &str)]) -> Output {
    // GANTRY_TEST_BIN: the CLI where the test binary runs away from its build (a GPU machine).
    let bin = std::env::var_os("GANTRY_TEST_BIN").unwrap_or(env!("CARGO_BIN_EXE_gantry").into());
    let mut c = Command::new(bin);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A small sharded Llama-shaped checkpoint (two files, a few MiB).
fn checkpoint(dir: &Path) -> (String, u64) {
    let spec = gantry::synth::SynthSpec {
        vocab: 1024,
        hidden: 256,
        intermediate: 768,
        kv: 64,
        layers: 4,
        shards: 2,
    };
    gantry::synth::write_checkpoint(dir, &spec, 7).unwrap();
    let total = gantry::open(dir).unwrap().total_bytes();
    (dir.display().to_string(), total)
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "gantry failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn error_of(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ranks_argument_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = checkpoint(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (&["--ranks", "0"], "--ranks must be at least 1"),
        (&["--ranks", "3", "--device", "cuda:0,cuda:1"], "it needs 3"),
        (&["--ranks", "2", "--device", "cuda:0,cuda:1", "--shard", "tp:3"], "--ranks is 2"),
        (&["--ranks", "2", "--device", "cpu", "--shard", "tp:2"], "name one GPU per rank"),
        (&["--ranks", "2", "--window-mib", "0"], "--window-mib <N>': 0 is not in 1..="),
        (&["--ranks", "2", "--piece-mib", "0"], "--piece-mib <N>': 0 is not in 1..="),
        (&["--ranks", "x"], "invalid value 'x'"),
    ];
    for (args, message) in cases {
        let mut all = vec!["load", &path];
        all.extend_from_slice(args);
        let err = error_of(&gantry(&all, &[]));
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

/// The hidden `gantry rank` subcommand refuses a spec that is not one, naming it, with one
/// error line and nothing on stdout.
#[test]
fn a_rank_refuses_a_bad_spec_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = checkpoint(dir.path());
    let spec = dir.path().join("spec.json");
    let spec_text = spec.to_str().unwrap();
    for (text, message) in [
        ("", "EOF while parsing"),
        ("{\"device\": \"cpu\"}", "missing field"),
        ("{\"devices\": 1}", "unknown field `devices`"),
    ] {
        std::fs::write(&spec, text).unwrap();
        let args = ["rank", &path, "--rank", "0", "--world", "1", "--spec", spec_text];
        let err = error_of(&gantry(&args, &[]));
        assert!(err.contains(spec_text) && err.contains(message), "{text:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    let err = error_of(&gantry(&["rank", &path, "--rank", "0", "--spec", "-"], &[]));
    assert!(err.contains("--world"), "{err}");
}

/// Every load setting given to `--ranks` reaches each rank: each rank reports the settings
/// the options ask for and reads each file as a single-process load with the same options
/// does (reader, bytes, SHA-256 and what it was checked against).
#[test]
fn every_load_option_reaches_the_ranks() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = checkpoint(dir.path());
    let mut sums = String::new();
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let name = entry.file_name().into_string().unwrap();
        if name.ends_with(".safetensors") {
            let digest = sha2::Sha256::digest(std::fs::read(entry.path()).unwrap());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            sums += &format!("{hex}  {name}\n");
        }
    }
    std::fs::write(dir.path().join("SHA256SUMS"), sums).unwrap();
    let cache = dir.path().join("cache").display().to_string();
    let options = [
        "--path",
        "buffered",
        "--profile",
        "nvme",
        "--queue-depth",
        "3",
        "--chunk-mib",
        "2",
        "--buffered-chunk-mib",
        "1",
        "--staging-mib",
        "24",
        "--threads",
        "3",
        "--object-part-mib",
        "8",
        "--object-concurrency",
        "5",
        "--require-sha256",
        "--cache-dir",
        &cache,
        "--cache-shared",
        "--s3-region",
        "eu-west-3",
        "--object-option",
        "timeout=7s",
        "--json",
    ];
    let single = json_of(&gantry(&[&["load", &path][..], &options].concat(), &[]));
    let expected = serde_json::json!({
        "path": "buffered", "queue_depth": 3, "chunk_bytes": 2 << 20,
        "buffered_chunk_bytes": 1 << 20, "staging_bytes": 24 << 20, "threads": 3,
        "object_part_bytes": 8 << 20, "object_concurrency": 5,
        "object_option_keys": ["aws_region", "timeout"], "verify_sha256": true,
        "require_sha256": true, "cache_dir": cache, "cache_shared": true,
    });
    assert_eq!(single["config"], expected);
    let files = |v: &Value| -> Vec<Value> {
        let keys = ["path", "reader", "bytes", "sha256", "sha256_check"];
        let files = v["files"].as_array().unwrap().iter();
        files.map(|f| keys.iter().map(|&k| (k.to_owned(), f[k].clone())).collect()).collect()
    };
    let single_files = files(&single);
    assert!(single_files.iter().all(|f| f["reader"] == "buffered"), "{single_files:?}");
    let matched = |f: &Value| f["sha256_check"].as_str().is_some_and(|c| c.contains("SHA256SUMS"));
    assert!(single_files.iter().all(matched), "{single_files:?}");
    let ranked = [&["load", &path, "--ranks", "2", "--device", "cpu"][..], &options].concat();
    let v = json_of(&gantry(&ranked, &[]));
    for rank in v["per_rank"].as_array().unwrap() {
        assert_eq!(rank["config"], expected, "rank {}", rank["rank"]);
        assert_eq!(files(rank), single_files, "rank {}", rank["rank"]);
    }
}

#[test]
fn host_ranks_each_read_on_their_own_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let (path, total) = checkpoint(dir.path());
    let missing = dir.path().join("no-such-libnccl.so.2");
    let missing = missing.to_str().unwrap();
    let out = gantry(
        &["load", &path, "--ranks", "3", "--device", "cpu", "--verify", "--json"],
        &[("GANTRY_NCCL_LIB", missing)],
    );
    let v = json_of(&out);
    assert_eq!(v["ranks"], 3);
    assert_eq!(v["cooperative"], false);
    // Host memory is the reason, whether NCCL is there or not.
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("cooperative loads need GPUs"), "{reason}");
    assert_eq!(v["checkpoint_bytes"], total);
    let ranks = v["per_rank"].as_array().unwrap();
    for (r, rank) in ranks.iter().enumerate() {
        assert_eq!(rank["rank"], r);
        assert_eq!(rank["reason"], v["reason"]);
        assert_eq!(rank["verified"], true);
        assert_eq!(rank["bytes"], total, "every rank has every tensor");
    }
    // Each rank read everything itself.
    assert!(v["read_bytes"].as_u64().unwrap() >= 3 * total);
}

/// The tensor names of the checkpoint in `dir`, read from its files' headers (8 bytes of
/// little-endian length, then the JSON header), not through gantry.
fn tensor_names(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        let keys = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__");
        names.extend(keys.cloned());
    }
    names.sort();
    names
}

/// A merged `--ranks` trace checked against the ranks' own figures and the checkpoint's
/// headers: valid trace-event JSON with one named process per rank (pids from 1), each
/// rank's read spans adding up to the bytes it reports reading, every tensor landing once on
/// every rank, and all ranks on one time line (within the parent's wall time of each other).
/// Returns each rank's events by pid.
fn check_merged(trace: &Path, v: &Value, names: &[String]) -> Vec<Vec<Value>> {
    let text = std::fs::read_to_string(trace).unwrap();
    let file: Value = serde_json::from_str(&text).expect("the merged trace is JSON");
    let events = file["traceEvents"].as_array().expect("a traceEvents array");
    for e in events {
        let ph = e["ph"].as_str().expect("every event has a phase");
        assert!(["M", "X", "i", "C"].contains(&ph), "{e}");
        assert!(e["pid"].is_u64() && e["tid"].is_u64(), "{e}");
        if ph != "M" {
            assert!(e["ts"].as_f64().is_some_and(|t| t >= 0.0), "{e}");
        }
        if ph == "X" {
            assert!(e["dur"].as_f64().is_some_and(|d| d >= 0.0), "{e}");
        }
    }
    let ranks = v["per_rank"].as_array().unwrap();
    let (mut first, mut last) = (f64::MAX, 0f64);
    let mut per_rank = Vec::new();
    for (r, rank) in ranks.iter().enumerate() {
        let pid = r as u64 + 1;
        let mine: Vec<Value> = events.iter().filter(|e| e["pid"] == pid).cloned().collect();
        let name = mine.iter().find(|e| e["ph"] == "M" && e["name"] == "process_name");
        let name = name.map(|e| e["args"]["name"].as_str().unwrap().to_owned());
        assert_eq!(name, Some(format!("rank {r} ({})", rank["device"].as_str().unwrap())));
        let read: u64 = mine
            .iter()
            .filter(|e| e["cat"] == "read" && e["ph"] == "X")
            .map(|e| e["args"]["bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(read, rank["read_bytes"].as_u64().unwrap(), "rank {r}: bytes read");
        let mut landed: Vec<String> = mine
            .iter()
            .filter(|e| e["cat"] == "tensor" && e["name"] == "landed")
            .map(|e| e["args"]["name"].as_str().unwrap().to_owned())
            .collect();
        landed.sort();
        assert_eq!(landed, names, "rank {r}: every tensor lands once");
        for e in mine.iter().filter(|e| e["ph"] == "X" || e["ph"] == "i") {
            let t = e["ts"].as_f64().unwrap();
            first = first.min(t);
            last = last.max(t + e["dur"].as_f64().unwrap_or(0.0));
        }
        per_rank.push(mine);
    }
    let wall_us = v["wall_seconds"].as_f64().unwrap() * 1e6;
    assert!(last - first <= wall_us, "ranks {first}..{last} us apart, the parent ran {wall_us} us");
    per_rank
}

/// `--ranks N --trace FILE`: one file, a process per rank, checked by [`check_merged`];
/// `--explain` prints each rank's verdict under its line.
#[test]
fn host_ranks_write_one_merged_trace_and_explain_each_rank() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = checkpoint(dir.path());
    let trace = dir.path().join("ranks.trace.json");
    let trace_text = trace.to_str().unwrap();
    let args = ["load", &path, "--ranks", "2", "--device", "cpu", "--trace", trace_text];
    let v = json_of(&gantry(&[&args[..], &["--json"]].concat(), &[]));
    let per_rank = check_merged(&trace, &v, &tensor_names(dir.path()));
    assert_eq!(per_rank.len(), 2);
    // `gantry trace summarize` reads the merged file rank by rank, to the same verdicts.
    let summary = gantry(&["trace", "summarize", trace_text], &[]);
    assert!(summary.status.success(), "{}", String::from_utf8_lossy(&summary.stderr));
    let summary = String::from_utf8_lossy(&summary.stdout);
    let lines: Vec<&str> = summary.lines().collect();
    for (r, rank) in v["per_rank"].as_array().unwrap().iter().enumerate() {
        let line = rank["bound_by"]["line"].as_str().expect("a verdict per rank");
        assert!(line.starts_with("bound by "), "{line}");
        let at = lines.iter().position(|l| *l == format!("rank {r} (cpu):")).unwrap();
        assert_eq!(lines[at + 1], line, "rank {r}: {summary}");
    }
    // The parent's private copies are gone with its temporary directory; only FILE is left.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(left.iter().filter(|p| p.to_str().unwrap().contains("trace")).count(), 1);
    let out = gantry(&["load", &path, "--ranks", "2", "--device", "cpu", "--explain"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    for r in 0..2 {
        let at = lines.iter().position(|l| l.starts_with(&format!("  rank {r} "))).unwrap();
        assert!(lines[at + 1].starts_with("    bound by "), "rank {r}: {text}");
    }
}

#[test]
fn each_ranks_output_is_kept_where_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = checkpoint(dir.path());
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let out = gantry(
        &["load", &path, "--ranks", "2", "--device", "cpu", "--json"],
        &[("GANTRY_RANK_LOG_DIR", logs.to_str().unwrap()), ("RUST_LOG", "gantry=debug")],
    );
    json_of(&out);
    for r in 0..2 {
        let log = std::fs::read_to_string(logs.join(format!("rank-{r}.log"))).unwrap();
        // The rank's log (its figures go to the parent through a file of their own).
        assert!(log.contains("DEBUG gantry"), "rank {r}: {log}");
    }
}

#[test]
fn a_rank_that_dies_fails_the_load_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = checkpoint(dir.path());
    let out = gantry(
        &["load", &path, "--ranks", "2", "--device", "cpu"],
        &[("GANTRY_COOP_ABORT_RANK", "1")],
    );
    let err = error_of(&out);
    assert!(err.contains("1 of 2 ranks failed") && err.contains("rank 1"), "{err}");
    assert!(err.contains("SIGABRT"), "{err}");
}

/// The number of GPUs, when there are at least two and NCCL loads; else `None` after saying
/// why (a failure with `GANTRY_REQUIRE_GPU=1`).
fn gpus_with_nccl() -> Option<usize> {
    let why = match gantry::coop::load_nccl() {
        Err(e) => format!("NCCL is not available: {e}"),
        Ok(_) => {
            let count = (0..8).take_while(|&n| gantry::CudaDevice::open(n).is_ok()).count();
            if count >= 2 {
                return Some(count);
            }
            format!("{count} GPU(s); a cooperative load needs at least 2")
        }
    };
    assert!(
        std::env::var("GANTRY_REQUIRE_GPU").as_deref() != Ok("1"),
        "GANTRY_REQUIRE_GPU=1 but: {why}"
    );
    eprintln!("skipped: {why}");
    None
}

fn devices(n: usize) -> String {
    (0..n).map(|g| format!("cuda:{g}")).collect::<Vec<_>>().join(",")
}

/// `gantry load PATH --ranks WORLD` on GPUs 0.., 1 MiB pieces, `extra`, `--verify`: the ranks
/// cooperated; each rank's figures.
fn cooperative_verified(path: &str, world: usize, extra: &[&str]) -> Vec<Value> {
    let (devices, w) = (devices(world), world.to_string());
    let mut args = vec!["load", path, "--ranks", &w, "--device", &devices, "--piece-mib", "1"];
    args.extend_from_slice(extra);
    args.extend(["--verify", "--json"]);
    let v = json_of(&gantry(&args, &[]));
    assert_eq!(v["cooperative"], true, "{v}");
    let ranks = v["per_rank"].as_array().unwrap().clone();
    assert_eq!(ranks.len(), world);
    ranks
}

#[test]
fn cooperative_ranks_are_bit_exact_and_read_each_byte_once() {
    let Some(gpus) = gpus_with_nccl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, total) = checkpoint(dir.path());
    for world in [2, 4].into_iter().filter(|&w| w <= gpus) {
        let ranks = cooperative_verified(&path, world, &[]);
        let (mut owned, mut read) = (0, 0);
        for rank in &ranks {
            assert_eq!(rank["verified"], true);
            assert_eq!(rank["bytes"], total);
            let mine = rank["owned_bytes"].as_u64().unwrap();
            assert_eq!(mine + rank["received_bytes"].as_u64().unwrap(), total, "{rank}");
            owned += mine;
            read += rank["read_bytes"].as_u64().unwrap();
        }
        assert_eq!(owned, total, "every byte owned by exactly one rank");
        // Reads are aligned to 4 KiB at both ends of each run: within 1% of the checkpoint.
        assert!(read >= total && read as f64 <= total as f64 * 1.01, "{read} for {total}");
    }
}

/// Cooperative ranks traced: the merged file as for host ranks (every tensor lands on every
/// rank, those read and those received), and each rank's exchanger is a track of its process
/// whose broadcasts carry the whole checkpoint once.
#[test]
fn cooperative_ranks_write_one_merged_trace_with_their_exchanges() {
    let Some(_) = gpus_with_nccl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, total) = checkpoint(dir.path());
    let trace = dir.path().join("coop.trace.json");
    let t = trace.to_str().unwrap();
    let args = ["load", &path, "--ranks", "2", "--device", "cuda:0,cuda:1", "--trace", t];
    let v = json_of(&gantry(&[&args[..], &["--piece-mib", "1", "--json"]].concat(), &[]));
    assert_eq!(v["cooperative"], true, "{v}");
    for (r, events) in check_merged(&trace, &v, &tensor_names(dir.path())).iter().enumerate() {
        let broadcast: u64 = events
            .iter()
            .filter(|e| e["cat"] == "exchange" && e["name"] == "broadcast")
            .map(|e| e["args"]["bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(broadcast, total, "rank {r}: every byte broadcast once");
    }
}

#[test]
fn cooperative_ranks_keep_their_tensor_parallel_shares_bit_exact() {
    let Some(gpus) = gpus_with_nccl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, total) = checkpoint(dir.path());
    for world in [2, 4].into_iter().filter(|&w| w <= gpus) {
        let shard = format!("tp:{world}");
        let ranks = cooperative_verified(&path, world, &["--shard", &shard, "--window-mib", "2"]);
        let mut owned = 0;
        for rank in &ranks {
            // --verify compared every share with the file (check::verify_placed).
            assert_eq!(rank["verified"], true);
            assert!(rank["windows"].as_u64().unwrap() > 2, "{rank}");
            // A rank holds its shares: less than the whole checkpoint.
            assert!(rank["bytes"].as_u64().unwrap() < total, "{rank}");
            owned += rank["owned_bytes"].as_u64().unwrap();
        }
        assert_eq!(owned, total, "every byte read by exactly one rank");
    }
}

#[test]
fn without_nccl_gpu_ranks_read_on_their_own() {
    let Some(_) = gpus_with_nccl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, total) = checkpoint(dir.path());
    let missing = dir.path().join("no-such-libnccl.so.2");
    let args = ["load", &path, "--ranks", "2", "--device", "cuda:0,cuda:1", "--verify", "--json"];
    let v = json_of(&gantry(&args, &[("GANTRY_NCCL_LIB", missing.to_str().unwrap())]));
    assert_eq!(v["cooperative"], false);
    assert!(v["reason"].as_str().unwrap().contains("no-such-libnccl"), "{v}");
    for rank in v["per_rank"].as_array().unwrap() {
        assert_eq!(rank["verified"], true);
        assert_eq!(rank["bytes"], total);
    }
}

#[test]
fn a_rank_killed_mid_load_fails_the_others_without_a_hang() {
    let Some(_) = gpus_with_nccl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = checkpoint(dir.path());
    let args = [
        "load",
        &path,
        "--ranks",
        "2",
        "--device",
        "cuda:0,cuda:1",
        "--piece-mib",
        "1",
        "--rank-timeout-s",
        "10",
    ];
    let err = error_of(&gantry(&args, &[("GANTRY_COOP_ABORT_RANK", "1")]));
    // Rank 1 died; rank 0 gave up on it by its own timeout, with an error that says so.
    assert!(err.contains("2 of 2 ranks failed"), "{err}");
    assert!(err.contains("rank 1") && err.contains("SIGABRT"), "{err}");
    assert!(err.contains("rank 0") && err.contains("did not answer"), "{err}");
}
