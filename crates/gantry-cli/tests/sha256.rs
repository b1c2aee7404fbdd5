//! `gantry load --verify-sha256` says per file whether its SHA-256 was checked and against
//! what, in text and JSON, on every mode (a plain load, `--shard`, `--ranks`), with digests
//! compared with `sha256sum`'s; `--require-sha256` makes a file with no known digest an error
//! naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

#[path = "../../gantry/tests/common/cpuinfo.rs"]
mod cpuinfo;
use cpuinfo::implementation_from_cpuinfo;

fn gantry(args: &[&str]) -> Output {
    let bin = std::env::var_os("GANTRY_TEST_BIN").unwrap_or(env!("CARGO_BIN_EXE_gantry").into());
    Command::new(bin).args(args).output().unwrap()
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum (coreutils)");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// A two-shard checkpoint with a `SHA256SUMS` that lists the first shard only; its shards.
fn checkpoint(dir: &Path) -> Vec<PathBuf> {
    let spec = gantry::synth::SynthSpec {
        vocab: 512,
        hidden: 128,
        intermediate: 256,
        kv: 32,
        layers: 2,
        shards: 2,
    };
    gantry::synth::write_checkpoint(dir, &spec, 3).unwrap();
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    assert_eq!(shards.len(), 2);
    let name = shards[0].file_name().unwrap().to_str().unwrap();
    let out = Command::new("sha256sum").arg(name).current_dir(dir).output().unwrap();
    std::fs::write(dir.join("SHA256SUMS"), out.stdout).unwrap();
    shards
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "gantry failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn text_of(out: &Output) -> (String, String) {
    assert!(out.status.success(), "gantry failed: {}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The per-file JSON of a load: shard 0 verified against SHA256SUMS, shard 1 computed only.
fn assert_files(files: &Value, shards: &[PathBuf]) {
    let files = files.as_array().expect("files");
    assert_eq!(files.len(), 2);
    for (f, shard) in files.iter().zip(shards) {
        assert_eq!(f["path"], shard.to_str().unwrap());
        assert_eq!(f["sha256"], sha256sum(shard), "{f}");
    }
    assert_eq!(files[0]["sha256_verified"], true, "{}", files[0]);
    assert!(files[0]["sha256_check"].as_str().unwrap().starts_with("matches "), "{}", files[0]);
    assert!(files[0]["sha256_check"].as_str().unwrap().ends_with("SHA256SUMS"));
    assert_eq!(files[1]["sha256_verified"], false, "{}", files[1]);
    assert!(files[1]["sha256_check"].as_str().unwrap().starts_with("not verified"));
}

/// The text of a load: one line per shard naming it, with its digest and verdict.
fn assert_lines(stdout: &str, shards: &[PathBuf]) {
    for (s, verdict) in shards.iter().zip(["matches", "not verified"]) {
        let name = shards_name(s);
        let line = stdout.lines().find(|l| l.contains(&name)).unwrap_or_else(|| {
            panic!("no line names {name}: {stdout}");
        });
        assert!(line.contains(&sha256sum(s)) && line.contains(verdict), "{line}");
    }
}

fn shards_name(p: &Path) -> String {
    p.file_name().unwrap().to_str().unwrap().to_owned()
}

#[test]
fn every_mode_says_per_file_whether_sha256_was_checked() {
    let dir = tempfile::tempdir().unwrap();
    let shards = checkpoint(dir.path());
    let path = dir.path().to_str().unwrap();
    let modes: &[&[&str]] = &[
        &["--device", "cpu"],
        &["--device", "cpu", "--shard", "replicate:2"],
        &["--device", "cpu", "--ranks", "2"],
    ];
    for mode in modes {
        let args = |json: bool| {
            let mut a = vec!["load", path, "--verify-sha256"];
            a.extend_from_slice(mode);
            a.extend(json.then_some("--json"));
            a
        };
        let v = json_of(&gantry(&args(true)));
        match v.get("per_rank") {
            Some(ranks) => {
                for r in ranks.as_array().unwrap() {
                    assert_files(&r["files"], &shards);
                }
            }
            None => assert_files(&v["files"], &shards),
        }
        let (stdout, stderr) = text_of(&gantry(&args(false)));
        assert_lines(&stdout, &shards);
        if mode.len() == 2 {
            // The library's own warning names the file it could not verify.
            assert!(stderr.contains(&shards_name(&shards[1])), "{stderr}");
            assert!(stderr.contains("not verified"), "{stderr}");
        }
    }
    // Without --verify-sha256, every file says it was not checked, and no hashing code is named.
    let v = json_of(&gantry(&["load", path, "--device", "cpu", "--json"]));
    assert!(v.get("sha256").is_none(), "{v}");
    for f in v["files"].as_array().unwrap() {
        assert_eq!(f["sha256_verified"], false);
        assert!(f["sha256_check"].as_str().unwrap().starts_with("not checked"), "{f}");
        assert!(f.get("sha256").is_none(), "{f}");
    }
}

#[test]
fn require_sha256_fails_on_a_file_with_no_known_digest_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let shards = checkpoint(dir.path());
    let path = dir.path().to_str().unwrap();
    for mode in [&["--device", "cpu"][..], &["--device", "cpu", "--shard", "replicate:2"]] {
        let mut args = vec!["load", path, "--require-sha256"];
        args.extend_from_slice(mode);
        let out = gantry(&args);
        assert!(!out.status.success(), "{mode:?}: a file with no digest loaded");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(&shards_name(&shards[1])), "{stderr}");
        assert!(errors[0].contains("require_sha256"), "{stderr}");
    }
    // Every file listed: the load passes, every file verified.
    let names: Vec<String> = shards.iter().map(|s| shards_name(s)).collect();
    let out = Command::new("sha256sum").args(&names).current_dir(dir.path()).output().unwrap();
    std::fs::write(dir.path().join("SHA256SUMS"), out.stdout).unwrap();
    let v = json_of(&gantry(&["load", path, "--require-sha256", "--device", "cpu", "--json"]));
    for (f, shard) in v["files"].as_array().unwrap().iter().zip(&shards) {
        assert_eq!(
            (&f["sha256_verified"], &f["sha256"]),
            (&Value::Bool(true), &sha256sum(shard).into())
        );
    }
}

#[test]
fn explain_and_json_name_the_sha256_implementation() {
    let Some(expected) = implementation_from_cpuinfo() else {
        println!("skipped: /proc/cpuinfo names no x86 flags or AArch64 features");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    checkpoint(dir.path());
    let path = dir.path().to_str().unwrap();
    let load = ["load", path, "--device", "cpu", "--verify-sha256"];
    let v = json_of(&gantry(&[&load[..], &["--json"]].concat()));
    assert_eq!(v["sha256"]["implementation"], expected, "{v}");
    assert!(v["sha256"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    let (stdout, _) = text_of(&gantry(&[&load[..], &["--explain"]].concat()));
    let line = stdout.lines().find(|l| l.starts_with("sha256: ")).unwrap_or_else(|| {
        panic!("--explain names no SHA-256 code: {stdout}");
    });
    assert!(line.starts_with(&format!("sha256: {expected} (")), "{line}");
    // Without --verify-sha256, --explain names none.
    let (stdout, _) = text_of(&gantry(&["load", path, "--device", "cpu", "--explain"]));
    assert!(!stdout.lines().any(|l| l.starts_with("sha256: ")), "{stdout}");
}

/// `gantry bench --verify-sha256` measures the SHA-256 ceiling beside a verified load whose
/// segment states were recorded (by a verified load before the runs), and a plain load: the
/// files' digests are `sha256sum`'s, every file was hashed from recorded states (a record for
/// each in the states directory), and the ratios are the rates' quotients.
#[test]
fn bench_verify_sha256_measures_the_hashing_ceiling_beside_a_states_recorded_load() {
    let dir = tempfile::tempdir().unwrap();
    let states = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    // Shards of a little over 16 MiB: two segments each, so their states are recorded.
    let bin = std::env::var_os("GANTRY_TEST_BIN").unwrap_or(env!("CARGO_BIN_EXE_gantry").into());
    let synth = |size: &str| {
        Command::new(&bin)
            .args(["synth", ck.to_str().unwrap(), "--size-gib", size])
            .output()
            .unwrap()
    };
    assert!(synth("0.04").status.success());
    let mut shards: Vec<PathBuf> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    assert!(shards.iter().all(|s| s.metadata().unwrap().len() > 16 << 20), "{shards:?}");
    let names: Vec<String> = shards.iter().map(|s| shards_name(s)).collect();
    let sums = Command::new("sha256sum").args(&names).current_dir(&ck).output().unwrap();
    std::fs::write(ck.join("SHA256SUMS"), sums.stdout).unwrap();
    let bench = |verify: bool| {
        let mut args = vec!["bench", ck.to_str().unwrap(), "--device", "cpu", "--repeat", "1"];
        args.extend(verify.then_some("--verify-sha256"));
        args.push("--json");
        let out = Command::new(&bin)
            .args(&args)
            .env("GANTRY_SHA256_STATES_DIR", states.path())
            .output()
            .unwrap();
        json_of(&out)
    };
    let v = bench(true);
    if let Some(expected) = implementation_from_cpuinfo() {
        assert_eq!(v["sha256"]["implementation"], expected, "{v}");
    }
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(v["sha256"]["ceiling_threads"], cores.min(16), "{v}");
    for (f, shard) in v["files"].as_array().unwrap().iter().zip(&shards) {
        assert_eq!(f["sha256"], sha256sum(shard), "{f}");
        assert_eq!(f["sha256_verified"], true, "{f}");
        assert!(f["sha256_hashing"].as_str().unwrap().contains("recorded states"), "{f}");
    }
    let records = std::fs::read_dir(states.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "states"))
        .count();
    assert_eq!(records, shards.len(), "one states record per shard");
    let run = &v["runs"][0];
    let sha = &run["sha256"];
    assert_eq!((&sha["files_from_states"], &sha["files_hashed"]), (&2.into(), &2.into()), "{v}");
    let rate = |x: &Value| x.as_f64().unwrap();
    let (ceiling, verified, plain) = (
        rate(&sha["ceiling_gb_per_s"]),
        rate(&run["gantry_gb_per_s"]),
        rate(&sha["plain_gb_per_s"]),
    );
    assert!(ceiling > 0.0 && verified > 0.0 && plain > 0.0, "{v}");
    assert!((rate(&sha["ratio"]) - verified / ceiling).abs() <= 1e-9 * verified / ceiling, "{v}");
    assert!((rate(&sha["verified_to_plain"]) - verified / plain).abs() <= 1e-9 * verified / plain);
    // Without --verify-sha256, no SHA-256 figures.
    let v = bench(false);
    assert!(v.get("sha256").is_none() && v["runs"][0].get("sha256").is_none(), "{v}");
}
