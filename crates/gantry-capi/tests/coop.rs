//! `gantry_loader_load_cooperative` and `gantry_loader_load_cooperative_split` from C
//! (`tests/capi/coop.c`, C11, `-Wall -Wextra -Werror`): their argument errors, which need no GPU; a
//! rank without a communicator, and one with a communicator of one rank, reading everything
//! alone; and two ranks on two GPUs (two threads of the client) that share an NCCL unique id,
//! split the reads and are bit-exact against the client's own read of the file, with whole
//! tensors and then each keeping its rows. The client opens the CUDA driver and NCCL itself, as a
//! server does. What needs a GPU, two GPUs or NCCL is skipped with the reason when the
//! machine lacks it, and fails under `GANTRY_REQUIRE_GPU=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

#[path = "../../gantry/tests/common/tools.rs"]
mod tools;

mod ffi;

/// The client, compiled once per test binary; `None` when C tests are skipped.
fn client() -> Option<&'static Path> {
    static EXE: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    EXE.get_or_init(|| {
        let cc = tools::require_compiler("cc")?;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("coop");
        let source = ffi::manifest().join("../../tests/capi/coop.c");
        ffi::compile_with(&cc, "-std=c11", &source, &exe, &["-lpthread", "-ldl"]);
        Some((dir, exe))
    })
    .as_ref()
    .map(|(_, exe)| exe.as_path())
}

/// A checkpoint of tensors of several sizes and shapes (one of them empty; matrices with even
/// rows, which `GANTRY_SPLIT_DIM0` halves, one with odd rows and vectors, which it keeps
/// whole), written by the safetensors crate, in a fresh directory.
fn checkpoint() -> (tempfile::TempDir, PathBuf) {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let shapes: [&[usize]; 6] =
        [&[1024, 1024], &[75, 4096], &[2048, 1024], &[20], &[0], &[700, 1024]];
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .enumerate()
        .map(|(t, s)| {
            (0..s.iter().product()).map(|i: usize| ((i * 131 + t * 17) % 251) as u8).collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .zip(shapes)
        .enumerate()
        .map(|(t, (d, s))| (format!("layer.{t}.weight"), TensorView::new(Dtype::U8, s.to_vec(), d)))
        .map(|(name, view)| (name, view.unwrap()))
        .collect();
    let path = dir.path().join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    (dir, path)
}

/// Says why a test did not run; a failure under `GANTRY_REQUIRE_GPU=1`.
fn skip(why: &str) {
    assert!(
        std::env::var("GANTRY_REQUIRE_GPU").as_deref() != Ok("1"),
        "GANTRY_REQUIRE_GPU=1 but: {why}"
    );
    println!("skipped: {why}");
}

/// NCCL as gantry finds it (where it was loaded from), or `None` after saying why not.
fn nccl() -> Option<String> {
    match engine::coop::load_nccl() {
        Ok(nccl) => Some(nccl.loaded_from.clone()),
        Err(e) => {
            skip(&format!("NCCL is not available: {e}"));
            None
        }
    }
}

/// Runs the client in `mode` on a fresh checkpoint (with NCCL from `libnccl`, which gantry is
/// told to load too, so both use one library); asserts that it passed or skipped with a reason.
fn run(mode: &str, libnccl: Option<&str>) {
    let Some(exe) = client() else { return };
    let (_dir, path) = checkpoint();
    let mut command = Command::new(exe);
    command.arg(mode).arg(&path).env("LD_LIBRARY_PATH", ffi::lib_dir());
    if let Some(lib) = libnccl {
        command.arg(lib).env("GANTRY_NCCL_LIB", lib);
    }
    let out = command.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "coop.c {mode}:\n{text}");
    match text.lines().find_map(|l| l.strip_prefix("skipped: ")) {
        Some(why) => skip(why),
        None => assert!(text.contains(&format!("coop {mode}: ok")), "coop.c {mode}:\n{text}"),
    }
}

/// NULL pointers, a rank outside the world, a world of 0 and a host destination are refused
/// with their status before any GPU is touched, and `model_out` is left alone.
#[test]
fn c_client_cooperative_argument_errors() {
    run("args", None);
}

/// Rank 1 of 2 with no communicator reads every tensor itself: bit-exact, every tensor ready
/// once, the report saying it read alone and owned every byte.
#[test]
fn c_client_cooperative_load_without_a_communicator_reads_alone() {
    run("alone", None);
}

/// A communicator of one rank has nothing to share: the load reads alone, bit-exact.
#[test]
fn c_client_cooperative_load_with_a_world_of_one_reads_alone() {
    let Some(lib) = nccl() else { return };
    run("world1", Some(&lib));
}

/// Two ranks on GPUs 0 and 1 join one communicator from a shared unique id (blocking
/// `ncclCommInitRank`, as most servers make theirs), then load cooperatively over it: both
/// bit-exact, every byte read by exactly one of them.
#[test]
fn c_client_two_ranks_share_a_unique_id_and_are_bit_exact() {
    let Some(lib) = nccl() else { return };
    run("pair", Some(&lib));
}
