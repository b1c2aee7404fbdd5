//! GPU trials. Without a GPU they print one line with the reason and pass, unless
//! `GANTRY_REQUIRE_GPU=1`, which turns a skip into a failure (set it on GPU machines).

mod common;

use common::*;
use gantry::memory::cuda::driver_available;
use gantry::{Checkpoint, Config, CudaDevice, Dtype, Error, Loader, PathChoice};
use proptest::prelude::*;

fn assert_device_matches(model: &gantry::DeviceModel, expected: usize) {
    let mut n = 0;
    for t in model.tensors() {
        let got = model.copy_to_host(&t).unwrap();
        assert!(got == reference(model.checkpoint(), t.entry), "tensor {} differs", t.entry.name);
        n += 1;
    }
    assert_eq!(n, expected);
}

#[test]
fn missing_driver_is_an_error_not_a_panic() {
    match driver_available() {
        Err(reason) => {
            let err = CudaDevice::open(0).expect_err("no driver, no device");
            assert!(matches!(err, Error::Unavailable { what: "CUDA", .. }), "{err}");
            assert!(err.to_string().contains("libcuda"), "{err} / {reason}");
        }
        Ok(()) => {
            let err = CudaDevice::open(9999).expect_err("no such device");
            assert!(
                matches!(err, Error::Cuda { .. }) && err.to_string().contains("no such device"),
                "{err}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_layouts_bit_exact(
        tensors in proptest::collection::vec(
            (proptest::sample::select(&[Dtype::BF16, Dtype::F32, Dtype::U8][..]), proptest::collection::vec(1usize..300, 1..3)),
            1..20,
        ),
        chunk_blocks in 1usize..64,
        queue_depth in 1usize..9,
        direct in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(dev) = gpu() else { return Ok(()) };
        let dir = scratch();
        let path = path_of(&dir, "m.safetensors");
        write_file(&path, &tensors, seed);
        let reader = if direct { PathChoice::Direct } else { PathChoice::Buffered };
        let config = Config::default()
            .path(reader)
            .chunk_bytes(chunk_blocks * 4096)
            .buffered_chunk_bytes(chunk_blocks * 4096)
            .staging_bytes(4 * chunk_blocks * 4096)
            .queue_depth(queue_depth);
        let loader = Loader::new(config).unwrap();
        let mut ready = 0;
        let model = loader.load_to_device_with(Checkpoint::open(&path).unwrap(), &dev, |_| true, |_| ready += 1).unwrap();
        assert_device_matches(&model, tensors.len());
        prop_assert_eq!(ready, tensors.len());
    }
}

#[test]
fn synthetic_sharded_checkpoint_subset_and_reload() {
    let Some(dev) = gpu() else { return };
    let dir = scratch();
    let spec = gantry::synth::SynthSpec {
        vocab: 4000,
        hidden: 256,
        intermediate: 896,
        kv: 64,
        layers: 4,
        shards: 3,
    };
    let index = gantry::synth::write_checkpoint(dir.path(), &spec, 11).unwrap();
    let loader =
        Loader::new(Config::default().chunk_bytes(1 << 20).staging_bytes(8 << 20)).unwrap();
    let mut model = loader.load_to_device(&index, &dev).unwrap();
    assert_device_matches(&model, spec.tensors().len());
    // `auto` opens the cuFile driver (hundreds of milliseconds) only for files on NVMe.
    let on_nvme = gantry::io::gds::file_on_nvme(&std::fs::File::open(&index).unwrap());
    for f in &model.report().files {
        assert_ne!(f.reader, Some(gantry::ReaderKind::Gds), "{}", f.reason);
        assert_eq!(f.facts.contains("driver not opened"), !on_nvme, "{}", f.facts);
    }
    loader.reload_device(&mut model).unwrap();
    assert_device_matches(&model, spec.tensors().len());
    let subset = loader
        .load_to_device_with(
            Checkpoint::open(&index).unwrap(),
            &dev,
            |t| t.name.contains("mlp"),
            |_| {},
        )
        .unwrap();
    assert_device_matches(&subset, 3 * spec.layers as usize);
}

/// A device load that fails with copies in flight (cancelled from the ready callback, as a
/// CUDA error would end it) returns only after the sink waited for them: the same loader's
/// next load, over the same staging ring, is bit-exact.
#[test]
fn failed_device_load_waits_for_its_copies_before_the_next_load() {
    let Some(dev) = gpu() else { return };
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    let tensors: Vec<(Dtype, Vec<usize>)> = (0..64).map(|_| (Dtype::F32, vec![64 << 10])).collect();
    write_file(&path, &tensors, 9);
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = Config::default()
        .path(PathChoice::Buffered)
        .chunk_bytes(1 << 20)
        .buffered_chunk_bytes(256 << 10)
        .staging_bytes(2 << 20)
        .cancel_flag(std::sync::Arc::clone(&flag));
    let loader = Loader::new(config).unwrap();
    for _ in 0..3 {
        flag.store(false, std::sync::atomic::Ordering::Relaxed);
        let cancel = |_: gantry::ReadyOnDevice<'_>| {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        };
        let err = loader
            .load_to_device_with(Checkpoint::open(&path).unwrap(), &dev, |_| true, cancel)
            .expect_err("cancelled");
        assert!(matches!(err, Error::Cancelled), "{err}");
        flag.store(false, std::sync::atomic::Ordering::Relaxed);
        let model = loader.load_to_device(&path, &dev).unwrap();
        assert_device_matches(&model, tensors.len());
    }
}

#[test]
fn caller_destinations() {
    let Some(dev) = gpu() else { return };
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    write_file(
        &path,
        &[(Dtype::F32, vec![1000, 3]), (Dtype::BF16, vec![77]), (Dtype::U8, vec![5000])],
        5,
    );
    let checkpoint = Checkpoint::open(&path).unwrap();
    let buffers: Vec<_> =
        checkpoint.tensors.iter().map(|t| dev.alloc(t.len as usize, &t.name).unwrap()).collect();
    let loader = Loader::new(Config::default()).unwrap();
    let mut ready = Vec::new();
    loader
        .load_into_device(
            &checkpoint,
            &dev,
            |t| (t.name != "t00001").then(|| buffers[t.name[1..].parse::<usize>().unwrap()].ptr()),
            |r| ready.push(r.index),
        )
        .unwrap();
    ready.sort();
    assert_eq!(ready, [0, 2]);
    for i in [0, 2] {
        let t = &checkpoint.tensors[i];
        assert_eq!(
            dev.copy_to_host(buffers[i].ptr(), t.len as usize).unwrap(),
            reference(&checkpoint, t)
        );
    }
    // A destination smaller than its tensor is refused before anything is read.
    let err = loader
        .load_into_device(
            &checkpoint,
            &dev,
            |t| Some(buffers[1].ptr()).filter(|_| t.name == "t00000"),
            |_| {},
        )
        .expect_err("too small");
    assert!(matches!(err, Error::Destination { .. }), "{err}");
}

#[test]
fn out_of_memory_is_an_error_and_frees_what_was_allocated() {
    let Some(dev) = gpu() else { return };
    let dir = scratch();
    let spec = gantry::synth::SynthSpec {
        vocab: 8192,
        hidden: 2048,
        intermediate: 7168,
        kv: 512,
        layers: 1,
        shards: 2,
    };
    let index = gantry::synth::write_checkpoint(dir.path(), &spec, 3).unwrap();
    let checkpoint = Checkpoint::open(&index).unwrap();
    let first = checkpoint.files[0].header.data_len as usize;
    let (free, _) = dev.memory().unwrap();
    // Leave room for the first file but not the second.
    let filler = dev.alloc(free - first - (48 << 20), "filler").unwrap();
    let (before, _) = dev.memory().unwrap();
    let loader = Loader::new(Config::default()).unwrap();
    let err = loader
        .load_to_device_with(checkpoint, &dev, |_| true, |_| {})
        .expect_err("must run out of memory");
    assert!(matches!(err, Error::Cuda { .. }) && err.to_string().contains("allocating"), "{err}");
    let (after, _) = dev.memory().unwrap();
    assert!(
        after + (4 << 20) >= before,
        "device memory leaked: {before} free before, {after} after"
    );
    drop(filler);
}

#[test]
fn cufile_path_bit_exact_and_reports_its_mode() {
    let Some(dev) = gpu() else { return };
    let facts = gantry::io::gds::facts();
    if let Err(reason) = &facts.available {
        assert!(
            std::env::var("GANTRY_REQUIRE_GDS").as_deref() != Ok("1"),
            "GANTRY_REQUIRE_GDS=1 but: {reason}"
        );
        println!("skipped: cuFile unavailable ({reason})");
        return;
    }
    let dir = scratch();
    let spec = gantry::synth::SynthSpec {
        vocab: 3000,
        hidden: 256,
        intermediate: 896,
        kv: 64,
        layers: 2,
        shards: 2,
    };
    let index = gantry::synth::write_checkpoint(dir.path(), &spec, 21).unwrap();
    let loader =
        Loader::new(Config::default().path(PathChoice::Gds).chunk_bytes(1 << 20).queue_depth(4))
            .unwrap();
    let model = match loader.load_to_device(&index, &dev) {
        Err(e @ gantry::Error::Unavailable { .. })
            if e.to_string().contains("udev")
                && std::env::var("GANTRY_REQUIRE_GDS").as_deref() != Ok("1") =>
        {
            println!("skipped: {e}");
            return;
        }
        other => other.unwrap(),
    };
    assert_device_matches(&model, spec.tensors().len());
    for f in &model.report().files {
        assert_eq!(f.reader, Some(gantry::ReaderKind::Gds));
        let mode = if facts.real() { "real GPUDirect" } else { "compatibility mode" };
        assert!(f.reason.contains(mode) || f.reason.contains("real GPUDirect"), "{f:?}");
        println!("{}: {} | {}", f.path.display(), f.reason, f.facts);
    }
    // A subset through cuFile too (steps of partial extents).
    let subset = loader
        .load_to_device_with(
            Checkpoint::open(&index).unwrap(),
            &dev,
            |t| t.name.contains("k_proj"),
            |_| {},
        )
        .unwrap();
    assert_device_matches(&subset, spec.layers as usize);
}

/// `verify_sha256` on a GPU load: staged extents are hashed before their copies are queued and
/// their leases held until then; digests equal `sha256sum`'s; a flipped byte fails the load;
/// a forced cuFile path is refused (cuFile reads past host memory).
#[test]
fn sha256_check_on_device_loads() {
    let Some(dev) = gpu() else { return };
    let dir = scratch();
    let spec = gantry::synth::SynthSpec {
        vocab: 4000,
        hidden: 256,
        intermediate: 896,
        kv: 64,
        layers: 2,
        shards: 2,
    };
    let index = gantry::synth::write_checkpoint(dir.path(), &spec, 5).unwrap();
    let out = std::process::Command::new("sh")
        .args(["-c", "sha256sum *.safetensors > SHA256SUMS"])
        .current_dir(dir.path())
        .status()
        .expect("sha256sum (coreutils) must be installed");
    assert!(out.success());
    let sums = std::fs::read_to_string(dir.path().join("SHA256SUMS")).unwrap();
    // Segment states kept here, in segments of about 65 KiB (another size per path, so that
    // the first load of each records its own): the second load of each path hashes every file
    // in segments in parallel from the states the first recorded.
    let states = scratch();
    let segment_bytes = |path: PathChoice| 66_624 + 64 * path as u64;
    let with_states =
        |c: Config, path| c.cache_dir(states.path()).sha256_segment_bytes(segment_bytes(path));
    for path in [PathChoice::Auto, PathChoice::Direct, PathChoice::Buffered] {
        let config = Config::default()
            .verify_sha256(true)
            .path(path)
            .chunk_bytes(1 << 20)
            .staging_bytes(4 << 20);
        let config = with_states(config, path);
        for round in ["sequential, states recorded", "segments in parallel"] {
            let loader = Loader::new(config.clone()).unwrap();
            let model = loader.load_to_device(&index, &dev).unwrap();
            assert_device_matches(&model, spec.tensors().len());
            for f in &model.report().files {
                let check = f.integrity.as_ref().unwrap();
                let hex = gantry::integrity::to_hex(&check.sha256.unwrap());
                let name = f.path.file_name().unwrap().to_str().unwrap();
                assert!(sums.contains(&format!("{hex}  {name}")), "{path:?} {name}: {hex}\n{sums}");
                assert!(check.explain().contains(round), "{path:?}: {}", check.explain());
            }
        }
    }
    let forced = Loader::new(Config::default().verify_sha256(true).path(PathChoice::Gds)).unwrap();
    assert!(forced.load_to_device(&index, &dev).is_err());
    let shard = Checkpoint::open(&index).unwrap().files[1].path.clone();
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let loader = Loader::new(Config::default().verify_sha256(true)).unwrap();
    let e = loader.load_to_device(&index, &dev).unwrap_err();
    assert!(matches!(&e, Error::Integrity { path, .. } if *path == shard), "{e}");
    // With valid recorded states for the file as it was: the segments do not link up, the
    // file is hashed again, and the load fails all the same.
    let config = with_states(Config::default().verify_sha256(true), PathChoice::Buffered);
    let loader = Loader::new(config).unwrap();
    let e = loader.load_to_device(&index, &dev).unwrap_err();
    assert!(matches!(&e, Error::Integrity { path, .. } if *path == shard), "{e}");
}

/// The CUDA context current on the calling thread.
fn current_context() -> cudarc::driver::sys::CUcontext {
    let current = cudarc::driver::result::ctx::get_current().expect("cuCtxGetCurrent");
    current.unwrap_or(std::ptr::null_mut())
}

/// gantry binds its GPU's primary context for its own work and leaves the caller's thread as
/// it found it: a context of the caller's own (one it created, as a server bound to another
/// device would have one current), or none, is current again after every call that touches
/// the device, whether it allocates, copies, loads, reloads, places or frees.
#[test]
fn the_callers_context_is_current_again_after_every_call() {
    use cudarc::driver::{result, sys};
    let Some(dev) = gpu() else { return };
    let device = std::sync::Arc::clone(&*dev);
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    write_file(&path, &[(Dtype::F32, vec![300, 7]), (Dtype::U8, vec![4097])], 9);
    std::thread::spawn(move || {
        let mut mine: sys::CUcontext = std::ptr::null_mut();
        let ordinal = result::device::get(0).expect("cuDeviceGet");
        // SAFETY: a valid out pointer; the new context becomes current on this thread and is
        // destroyed below.
        let rc = unsafe { sys::cuCtxCreate_v2(&mut mine, 0, ordinal) };
        assert_eq!(rc, sys::cudaError_enum::CUDA_SUCCESS, "cuCtxCreate");
        let check =
            |what: &str| assert!(current_context() == mine, "{what} left gantry's context current");
        assert!(current_context() == mine);
        device.memory().unwrap();
        check("memory");
        let checkpoint = Checkpoint::open(&path).unwrap();
        let total: u64 = checkpoint.tensors.iter().map(|t| t.len).sum();
        let own = device.alloc(total as usize, "the caller's parameters").unwrap();
        check("alloc");
        let loader = Loader::new(Config::default()).unwrap();
        let mut next = own.ptr();
        let mut placed_at = Vec::new();
        let target = |t: &gantry::TensorEntry| {
            placed_at.push(next);
            next += t.len;
            placed_at.last().copied()
        };
        loader.load_into_device(&checkpoint, &device, target, |_| {}).unwrap();
        check("load_into_device");
        let t = &checkpoint.tensors[1];
        let got = device.copy_to_host(placed_at[1], t.len as usize).unwrap();
        check("copy_to_host");
        assert!(got == reference(&checkpoint, t), "bytes of {}", t.name);
        let mut model = loader.load_to_device(&path, &device).unwrap();
        check("load_to_device");
        loader.reload_device(&mut model).unwrap();
        check("reload_device");
        assert_device_matches(&model, 2);
        check("DeviceModel::copy_to_host");
        let whole = |_: &gantry::TensorEntry| Ok(vec![(0, gantry::placement::Share::Whole)]);
        let placed = loader
            .load_placed_to_devices(
                Checkpoint::open(&path).unwrap(),
                std::slice::from_ref(&device),
                whole,
                |_, _| {},
            )
            .unwrap();
        check("load_placed_to_devices");
        drop((placed, model, own));
        check("freeing device memory");
        drop(loader);
        check("unpinning the staging");
        // SAFETY: no context current; gantry must leave it so.
        unsafe { result::ctx::set_current(std::ptr::null_mut()) }.unwrap();
        let buffer = device.alloc(4096, "with no context current").unwrap();
        drop(buffer);
        assert!(current_context().is_null(), "a thread with no context was left bound");
        // SAFETY: the context created above, no longer current nor used.
        let rc = unsafe { sys::cuCtxDestroy_v2(mine) };
        assert_eq!(rc, sys::cudaError_enum::CUDA_SUCCESS, "cuCtxDestroy");
    })
    .join()
    .expect("the caller's thread");
}
