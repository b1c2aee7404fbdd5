//! Typed values that must never crash or exhaust the `gantry` binary: destination and rank
//! counts bounded before anything is allocated or started, sizes and durations checked when
//! the command line is parsed, messages that name the option, and a reader that closes the
//! pipe early. Every run has a deadline and an address-space limit, so a value that makes
//! gantry hang or allocate without bound fails the test instead of the machine. Bytes loaded
//! are compared with the `safetensors` crate's read of the file. A property test feeds random
//! values to every option of every command (256 command lines, each with its deadline).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

#[path = "common/deadline.rs"]
mod deadline;
use deadline::run_with_deadline;

/// Address space each run may use: plenty for a tiny checkpoint, far below what an unbounded
/// destination count asks for.
const ADDRESS_SPACE_BYTES: u64 = 8 << 30;

/// Runs `cmd` within 60 s under [`ADDRESS_SPACE_BYTES`]; kills it and fails past the deadline.
pub fn run_bounded(mut cmd: Command) -> Output {
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let limit =
                libc::rlimit { rlim_cur: ADDRESS_SPACE_BYTES, rlim_max: ADDRESS_SPACE_BYTES };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    run_with_deadline(cmd)
}

fn gantry(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
    cmd.args(args).env("RUST_BACKTRACE", "1");
    run_bounded(cmd)
}

/// A clean failure: exit 1 or 2, nothing on stdout, exactly one `error:` line, no panic.
fn clean_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(matches!(out.status.code(), Some(1 | 2)), "{:?}: {err}", out.status);
    assert!(out.stdout.is_empty(), "stdout on failure: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    err
}

/// A tiny checkpoint: a 4x6 F32 matrix `w` and a 1-D norm; returns its path and the matrix's
/// bytes as the safetensors crate reads them back.
fn tiny(dir: &Path) -> (String, Vec<u8>) {
    use safetensors::tensor::TensorView;
    let path = dir.join("tiny.safetensors");
    let w: Vec<u8> = (0..96u8).collect();
    let norm = vec![7u8; 16];
    let tensors = [
        ("w", TensorView::new(safetensors::Dtype::F32, vec![4, 6], &w).unwrap()),
        ("norm", TensorView::new(safetensors::Dtype::F32, vec![4], &norm).unwrap()),
    ];
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let read = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = read.tensor("w").unwrap().data().to_vec();
    (path.to_str().unwrap().to_owned(), w)
}

/// A small Llama-shaped checkpoint (2-D weights and 1-D norms) in `dir`.
fn checkpoint(dir: &Path) -> String {
    let out = gantry(&["synth", dir.to_str().unwrap(), "--size-gib", "0.002"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.to_str().unwrap().to_owned()
}

#[test]
fn destination_counts_are_bounded_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint(dir.path());
    for shard in [
        "replicate:1000000000",
        "tp:18446744073709551615",
        "dim0:18446744073709551615",
        "dim1:18446744073709551616",
        "replicate:1025",
    ] {
        let err = clean_error(&gantry(&["load", &path, "--shard", shard]));
        assert!(err.contains("--shard") && err.contains("1 to 1024"), "{shard}: {err}");
    }
    // The largest count allowed loads (host destinations share one read), bit-exact: each
    // destination's copy of `w` hashes as the file's bytes do.
    let (tiny, w) = tiny(dir.path());
    let args = ["load", &tiny, "--shard", "replicate:1024", "--verify", "--checksum", "xxh3"];
    let out = gantry(&[&args[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let destinations = v["destinations"].as_array().unwrap();
    assert_eq!(destinations.len(), 1024);
    let want = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&w));
    for d in destinations {
        let sums = d["checksums"].as_array().unwrap();
        assert!(sums.iter().any(|c| c["name"] == "w" && c["xxh3"] == want.as_str()), "{d}");
    }
}

#[test]
fn a_dimension_the_tensors_lack_is_an_error_naming_one() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny(dir.path());
    for shard in ["dim5:2", "dim2:2", "dim18446744073709551615:2"] {
        let err = clean_error(&gantry(&["load", &path, "--shard", shard]));
        assert!(
            err.contains("tensor 'w' of shape [4, 6]") && err.contains("no dimension"),
            "{err}"
        );
    }
    // dim1:2 splits the matrix's columns: each half is 3 of each row's 6 floats.
    let out = gantry(&["load", &path, "--shard", "dim1:2", "--verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tp_rules_need_shard_tp() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint(dir.path());
    for extra in [&[][..], &["--shard", "dim0:2"], &["--shard", "replicate:2"]] {
        let mut args = vec!["load", &path, "--tp-rule", "*.mine=row"];
        args.extend_from_slice(extra);
        let err = clean_error(&gantry(&args));
        assert!(err.contains("--tp-rule goes with --shard tp:N"), "{extra:?}: {err}");
    }
}

#[test]
fn sizes_and_durations_are_checked_when_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint(dir.path());
    // 2^44 + 1 MiB is 16 Ti + 1 MiB, which wrapped to 1 MiB once shifted into bytes.
    let wraps = "17592186044417";
    let max = "18446744073709551615";
    for (option, value, limit) in [
        ("--chunk-mib", max, "1..=1024"),
        ("--chunk-mib", wraps, "1..=1024"),
        ("--object-part-mib", wraps, "1..=1024"),
        ("--buffered-chunk-mib", wraps, "1..=1024"),
        ("--staging-mib", wraps, "1..=65536"),
        ("--chunk-mib", "0", "1..=1024"),
        ("--queue-depth", max, "1..=4096"),
        ("--threads", "100000", "1..=256"),
        ("--object-concurrency", max, "1..=4096"),
        ("--piece-mib", wraps, "1..=1024"),
        ("--window-mib", wraps, "1..=1048576"),
        ("--rank-timeout-s", max, "1..=86400"),
    ] {
        let err = clean_error(&gantry(&["load", &path, option, value]));
        assert!(err.contains(option) && err.contains(limit), "{option} {value}: {err}");
        assert_eq!(gantry(&["load", &path, option, value]).status.code(), Some(2));
    }
    let err = clean_error(&gantry(&["bench", &path, "--repeat", max]));
    assert!(err.contains("--repeat") && err.contains("1..=100"), "{err}");
}

#[test]
fn ranks_are_bounded_before_any_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint(dir.path());
    let err = clean_error(&gantry(&["load", &path, "--ranks", "100000"]));
    assert!(err.contains("--ranks 100000") && err.contains("at most 64"), "{err}");
    // GPUs this machine does not have are refused before any rank starts.
    let err = clean_error(&gantry(&["load", &path, "--ranks", "2", "--device", "cuda:98,cuda:99"]));
    assert!(err.contains("--ranks 2"), "{err}");
}

#[test]
fn host_ranks_say_cooperative_loads_need_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint(dir.path());
    // Whether or not NCCL is there, the reason is the host memory.
    for env in [None, Some("/nonexistent/libnccl.so.2")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
        cmd.args(["load", &path, "--ranks", "2", "--device", "cpu", "--json"]);
        if let Some(lib) = env {
            cmd.env("GANTRY_NCCL_LIB", lib);
        }
        let out = run_bounded(cmd);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let reason = v["reason"].as_str().unwrap();
        assert!(reason.contains("cooperative loads need GPUs"), "{reason}");
        assert!(!reason.contains("NCCL"), "{reason}");
    }
}

#[test]
fn a_reader_that_closes_the_pipe_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint(dir.path());
    for args in [vec!["inspect", path.as_str()], vec!["load", path.as_str(), "--checksum", "xxh3"]]
    {
        // stdout is a pipe whose reader is gone before gantry writes.
        let writer = closed_pipe();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
        cmd.args(&args).stdout(writer).stderr(Stdio::piped());
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// The writing end of a pipe whose reading end is already closed.
fn closed_pipe() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just made and are owned here alone.
    let (reader, writer) = unsafe {
        (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    };
    drop(reader);
    writer
}

/// Rank processes of a load whose checkpoint is `path` that are still alive.
fn ranks_alive(path: &str) -> Vec<u32> {
    let mut alive = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let status = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = status.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
        if cmdline.contains(path) && cmdline.contains("--rank\0") && !zombie {
            alive.push(pid);
        }
    }
    alive
}

#[test]
fn ranks_that_cannot_be_started_end_the_others_cleanly() {
    if std::env::var_os("GANTRY_SKIP_ROOT_TESTS").is_some() {
        eprintln!(
            "skipped: GANTRY_SKIP_ROOT_TESTS is set (this test limits another user's processes)"
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root (setpriv needs root to run as another user)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint(dir.path());
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    // As user 65534 with few processes allowed, starting 16 ranks (and the threads that read
    // their output) fails part way, at a different rank for each limit.
    for nproc in 2..10 {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "prlimit"])
            .arg(format!("--nproc={nproc}"))
            .args([env!("CARGO_BIN_EXE_gantry"), "load", &path, "--ranks", "16"])
            .env("RUST_BACKTRACE", "1");
        let out = run_bounded(cmd);
        if !out.status.success() {
            let err = clean_error(&out);
            assert!(err.contains("rank") || err.contains("thread"), "nproc {nproc}: {err}");
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ranks_alive(&path), Vec::<u32>::new(), "nproc {nproc}: ranks left running");
    }
}

/// Options of `load` and `bench` and the kind of value each takes.
const LOAD_OPTIONS: &[(&str, Kind)] = &[
    ("--device", Kind::Device),
    ("--path", Kind::Word(&["auto", "direct", "buffered", "gds"])),
    ("--profile", Kind::Word(&["auto", "gp3", "io2", "nvme"])),
    ("--queue-depth", Kind::Number),
    ("--chunk-mib", Kind::Number),
    ("--buffered-chunk-mib", Kind::Number),
    ("--staging-mib", Kind::Number),
    ("--threads", Kind::Number),
    ("--object-part-mib", Kind::Number),
    ("--object-concurrency", Kind::Number),
    ("--verify-sha256", Kind::Flag),
    ("--cache-dir", Kind::Dir),
    ("--s3-endpoint", Kind::Text),
    ("--s3-region", Kind::Text),
    ("--gcs-endpoint", Kind::Text),
    ("--azure-endpoint", Kind::Text),
    ("--object-option", Kind::Text),
];

/// Options of `load` alone.
const LOAD_ONLY: &[(&str, Kind)] = &[
    ("--json", Kind::Flag),
    ("--checksum", Kind::Word(&["xxh3", "md5"])),
    ("--explain", Kind::Flag),
    ("--verify", Kind::Flag),
    ("--shard", Kind::Shard),
    ("--tp-rule", Kind::Word(&["*=row", "*.w=dim1", "x=column", "=", "*=dim99", "a=b=c"])),
    ("--replicate-via", Kind::Word(&["host", "peer"])),
    ("--ranks", Kind::Number),
    ("--window-mib", Kind::Number),
    ("--rank-timeout-s", Kind::Number),
    ("--piece-mib", Kind::Number),
];

/// What an option takes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Flag,
    Number,
    Text,
    Dir,
    Device,
    Shard,
    Word(&'static [&'static str]),
}

/// A value of `kind`: mostly near or past its limits, sometimes valid, sometimes nonsense.
fn value_of(kind: Kind) -> proptest::strategy::BoxedStrategy<String> {
    use proptest::prelude::*;
    let number = prop_oneof![
        3 => (1u64..5).prop_map(|n| n.to_string()),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![
            "18446744073709551616",
            "-1",
            "17592186044417",
            "1e9",
            "0x10",
            "+3",
            " 2",
            "",
            "4096",
            "65536",
            "1025",
        ])
        .prop_map(str::to_owned),
    ];
    let text = prop_oneof![
        "[a-z0-9]{1,8}",
        "[ -~]{0,24}",
        prop::sample::select(vec![
            "not a url",
            "http://127.0.0.1:1",
            "ftp://x",
            "a=b",
            "=",
            "\u{1b}[31m\n",
            "é~[1] +",
        ])
        .prop_map(str::to_owned),
    ];
    match kind {
        Kind::Flag => Just(String::new()).boxed(),
        Kind::Number => number.boxed(),
        Kind::Text => text.boxed(),
        Kind::Dir => prop::sample::select(vec!["out", "dir", "dir", "", "/", "/proc/self/mem"])
            .prop_map(str::to_owned)
            .boxed(),
        Kind::Device => prop_oneof![
            3 => Just("cpu".to_owned()),
            1 => prop::sample::select(vec![
                "cpu",
                "cuda",
                "cuda:0",
                "cuda:0,cuda:1",
                "cpu,cuda:0",
                "tpu"
            ])
            .prop_map(str::to_owned),
            1 => number.clone().prop_map(|n| format!("cuda:{n}")),
        ]
        .boxed(),
        Kind::Shard => (
            prop::sample::select(vec!["replicate", "replicate", "tp", "dim0", "dim1", "dim5", "x"]),
            number,
        )
            .prop_map(|(k, n)| format!("{k}:{n}"))
            .boxed(),
        Kind::Word(words) => {
            prop_oneof![prop::sample::select(words.to_vec()).prop_map(str::to_owned), text,].boxed()
        }
    }
}

/// A command line: a command, the tiny checkpoint, and a few options with random values.
fn command_line() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
    use proptest::prelude::*;
    let option = |table: &'static [(&'static str, Kind)]| {
        prop::sample::select(table.to_vec())
            .prop_flat_map(|(name, kind)| value_of(kind).prop_map(move |v| (name, kind, v)))
    };
    let load_option = prop_oneof![1 => option(LOAD_OPTIONS), 2 => option(LOAD_ONLY)];
    let size =
        prop::sample::select(vec!["0", "-1", "nan", "inf", "1e400", "5000", "0.001", "x", ""]);
    prop_oneof![
        4 => prop::collection::vec(load_option, 1..4).prop_map(|o| line("load", o)),
        1 => prop::collection::vec(option(LOAD_OPTIONS), 0..4).prop_map(|o| line("bench", o)),
        1 => prop::collection::vec(
            prop_oneof![
                option(&[("--json", Kind::Flag), ("--all", Kind::Flag)]),
                option(&LOAD_OPTIONS[12..]),
            ],
            0..4
        )
        .prop_map(|o| line("inspect", o)),
        1 => size.clone().prop_map(|s| vec![
            "synth".into(),
            "synth-out".into(),
            "--size-gib".into(),
            s.into()
        ]),
        1 => size.prop_map(|s| vec![
            "demo".into(),
            "--dir".into(),
            "demo-out".into(),
            "--size".into(),
            s.into()
        ]),
    ]
}

fn line(command: &str, options: Vec<(&str, Kind, String)>) -> Vec<String> {
    let mut out = vec![command.to_owned(), "tiny.safetensors".to_owned()];
    for (name, kind, value) in options {
        out.push(name.to_owned());
        if !matches!(kind, Kind::Flag) {
            out.push(value);
        }
    }
    out
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

    /// Random values for every option of every command: a result, or exit 1 or 2 with one
    /// `error:` line; never a panic (exit 101), a signal, a backtrace or a hang.
    #[test]
    fn random_options_end_in_a_result_or_one_error_line(args in command_line()) {
        let dir = tempfile::tempdir().unwrap();
        tiny(dir.path());
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
        cmd.args(&args).current_dir(dir.path()).env("RUST_BACKTRACE", "1");
        let out = run_bounded(cmd);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        proptest::prop_assert!(out.status.code().is_some(), "{args:?}: {:?}: {err}", out.status);
        if !out.status.success() {
            proptest::prop_assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?}: {err}");
            let errors = err.lines().filter(|l| l.starts_with("error:")).count();
            proptest::prop_assert_eq!(errors, 1, "{:?}: {}", args, err);
        }
        proptest::prop_assert!(!err.contains("panicked") && !err.contains("stack backtrace"), "{args:?}: {err}");
    }
}
