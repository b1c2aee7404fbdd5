//! Edge cases: sizes not a multiple of 4096, many small tensors, zero-size tensors, tmpfs
//! (no O_DIRECT), io_uring turned off by config, bad configuration.

mod common;

use common::*;
use gantry::{Config, Dtype, Error, Loader, PathChoice};

#[test]
fn odd_file_sizes() {
    let dir = scratch();
    for (i, n) in [1usize, 4095, 4097, 8191, 12289, 100_003].into_iter().enumerate() {
        let path = path_of(&dir, &format!("odd{i}.safetensors"));
        write_file(&path, &[(Dtype::U8, vec![n]), (Dtype::U8, vec![3])], i as u64);
        assert_ne!(std::fs::metadata(&path).unwrap().len() % 4096, 0);
        for reader in [PathChoice::Direct, PathChoice::Buffered] {
            let loader =
                Loader::new(Config::default().path(reader).chunk_bytes(8192).staging_bytes(32768))
                    .unwrap();
            assert_matches_reference(&loader.load(&path).unwrap(), 2);
        }
    }
}

#[test]
fn ten_thousand_small_tensors() {
    let dir = scratch();
    let path = path_of(&dir, "many.safetensors");
    let tensors: Vec<(Dtype, Vec<usize>)> =
        (0..10_000).map(|i| (Dtype::BF16, vec![1 + i % 17])).collect();
    write_file(&path, &tensors, 3);
    for reader in [PathChoice::Direct, PathChoice::Buffered] {
        let loader = Loader::new(Config::default().path(reader).chunk_bytes(64 << 10)).unwrap();
        let mut ready = 0;
        let model = loader
            .load_with(gantry::Checkpoint::open(&path).unwrap(), |_| true, |_| ready += 1)
            .unwrap();
        assert_matches_reference(&model, 10_000);
        assert_eq!(ready, 10_000);
    }
}

#[test]
fn zero_size_tensors_and_empty_checkpoint() {
    let dir = scratch();
    let path = path_of(&dir, "zero.safetensors");
    write_file(&path, &[(Dtype::F32, vec![0]), (Dtype::U8, vec![5]), (Dtype::F16, vec![3, 0])], 1);
    let loader = Loader::new(Config::default().path(PathChoice::Direct)).unwrap();
    let mut ready = 0;
    let model = loader
        .load_with(gantry::Checkpoint::open(&path).unwrap(), |_| true, |_| ready += 1)
        .unwrap();
    assert_matches_reference(&model, 3);
    assert_eq!(ready, 3);

    let empty = path_of(&dir, "empty.safetensors");
    write_file(&empty, &[], 0);
    let model = loader.load(&empty).unwrap();
    assert_eq!(model.tensors().count(), 0);
    assert_eq!(model.report().read_bytes, 0);
    assert_eq!(model.report().files[0].reader, None);
}

#[test]
fn tmpfs_is_read_buffered_and_forced_direct_never_falls_back() {
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        println!("skipped: no /dev/shm on this machine");
        return;
    };
    let path = dir.path().join("shm.safetensors");
    write_file(&path, &[(Dtype::F32, vec![5000])], 2);
    std::fs::File::open(&path).map(|f| gantry::io::probe::evict(&f)).unwrap().ok();
    let auto = Loader::new(Config::default()).unwrap().load(&path).unwrap();
    assert_matches_reference(&auto, 1);
    let file = &auto.report().files[0];
    assert_eq!(file.reader, Some(gantry::ReaderKind::Buffered));
    // tmpfs accepts O_DIRECT since Linux 6.6; before, forcing it is an error, not a fallback.
    match Loader::new(Config::default().path(PathChoice::Direct)).unwrap().load(&path) {
        Ok(model) => {
            assert!(gantry::io::probe::open_direct(&path).is_ok());
            assert_matches_reference(&model, 1);
        }
        Err(err) => {
            assert!(gantry::io::probe::open_direct(&path).is_err());
            assert!(matches!(err, Error::Unavailable { what: "O_DIRECT", .. }), "{err}");
        }
    }
}

#[test]
fn io_uring_off_by_config_uses_threads() {
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    write_file(&path, &[(Dtype::F32, vec![70_000])], 5);
    let model =
        Loader::new(Config::default().path(PathChoice::Buffered)).unwrap().load(&path).unwrap();
    assert_eq!(model.report().files[0].reader, Some(gantry::ReaderKind::Buffered));
    assert!(!model.report().registered_buffers);
    assert_matches_reference(&model, 1);
}

#[test]
fn cold_file_takes_the_direct_path_under_auto() {
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    write_file(&path, &[(Dtype::F32, vec![1 << 20])], 6);
    let f = std::fs::File::open(&path).unwrap();
    f.sync_all().unwrap();
    gantry::io::probe::evict(&f).unwrap();
    let resident = gantry::io::probe::resident_fraction(&f, 0, f.metadata().unwrap().len());
    if resident.is_some_and(|r| r > 0.1) {
        println!("skipped: the page cache kept the file after eviction ({resident:?})");
        return;
    }
    let model = Loader::new(Config::default()).unwrap().load(&path).unwrap();
    assert_eq!(
        model.report().files[0].reader,
        Some(gantry::ReaderKind::Direct),
        "{:?}",
        model.report().files[0]
    );
    assert_matches_reference(&model, 1);
}

#[test]
fn auto_volume_profile_measures_the_disk_and_explicit_settings_turn_it_off() {
    let dir = scratch();
    let path = path_of(&dir, "v.safetensors");
    write_file(&path, &[(Dtype::F32, vec![3 << 20]), (Dtype::U8, vec![5])], 7);
    if let Err(reason) = gantry::io::probe::open_direct(&path) {
        println!("skipped: {reason}");
        return;
    }
    let load = |config: Config| {
        let model = Loader::new(config.path(PathChoice::Direct)).unwrap().load(&path).unwrap();
        assert_matches_reference(&model, 2);
        model.report().volume.clone()
    };
    let line = load(Config::default()).expect("auto measured the volume");
    // "<device> (<kind>, 4 KiB read <ms> ms) -> <why>: <profile>, <MiB> MiB x <depth>"
    assert!(line.contains("4 KiB read") && line.contains(" ms) -> "), "{line}");
    assert!(line.contains(" MiB x "), "{line}");
    let device = line.split(' ').next().unwrap();
    assert!(std::path::Path::new("/sys/class/block").join(device).exists(), "{line}");
    assert_eq!(load(Config::default().chunk_bytes(8 << 20)), None);
    assert_eq!(load(Config::default().profile(gantry::profile::VolumeProfile::Gp3)), None);
    // A chunk size given stays given when the `auto` profile is named after it: not measured.
    let auto = Config::default().chunk_bytes(8 << 20).profile(gantry::profile::VolumeProfile::Auto);
    assert_eq!(load(auto), None);
    assert!(load(Config::default().profile(gantry::profile::VolumeProfile::Auto)).is_some());
}

#[test]
fn bad_configuration_is_an_error() {
    for config in [
        Config::default().chunk_bytes(1000),
        Config::default().chunk_bytes(0),
        Config::default().chunk_bytes(2 << 30),
        Config::default().chunk_bytes(1 << 20).staging_bytes(4096),
        Config::default().queue_depth(0),
        Config::default().threads(0),
        Config::default().hot_fraction(1.5),
    ] {
        let err = Loader::new(config).expect_err("must be rejected");
        assert!(matches!(err, Error::Config(_)), "{err}");
    }
    assert!("sideways".parse::<PathChoice>().is_err());
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Loader>();
    send_sync::<gantry::HostModel>();
    send_sync::<gantry::DeviceModel>();
    send_sync::<gantry::CudaDevice>();
    send_sync::<Config>();
    send_sync::<Error>();
}

#[test]
fn gds_on_a_host_load_is_unavailable_not_a_fallback() {
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    write_file(&path, &[(Dtype::F32, vec![100])], 8);
    let err = Loader::new(Config::default().path(PathChoice::Gds))
        .unwrap()
        .load(&path)
        .expect_err("host");
    assert!(matches!(err, Error::Unavailable { what: "cuFile", .. }), "{err}");
    let model = Loader::new(Config::default()).unwrap().load(&path).unwrap();
    assert!(
        model.report().files[0].facts.contains("cuFile unavailable (host load)"),
        "{:?}",
        model.report().files[0]
    );
}

#[test]
fn report_says_when_the_first_tensor_landed() {
    let dir = scratch();
    let path = path_of(&dir, "f.safetensors");
    write_file(
        &path,
        &[(Dtype::F32, vec![0]), (Dtype::F32, vec![1 << 16]), (Dtype::U8, vec![9])],
        4,
    );
    for reader in [PathChoice::Direct, PathChoice::Buffered] {
        let model = Loader::new(Config::default().path(reader)).unwrap().load(&path).unwrap();
        let r = model.report();
        let first = r.first_tensor_seconds.expect("tensors with bytes landed");
        assert!(first > 0.0 && first <= r.seconds, "{first} vs {}", r.seconds);
    }
    let empty = path_of(&dir, "e.safetensors");
    write_file(&empty, &[(Dtype::F32, vec![0])], 5);
    let model = Loader::new(Config::default()).unwrap().load(&empty).unwrap();
    assert_eq!(model.report().first_tensor_seconds, None);
}

/// A file replaced (or rewritten) after its header was read is an error when it is opened for
/// its data, on every reader and on `reload`, never a load of the other file's bytes.
#[test]
fn a_file_replaced_after_its_header_was_read_is_an_error() {
    let dir = scratch();
    let path = path_of(&dir, "replaced.safetensors");
    let other = path_of(&dir, "other.safetensors");
    for reader in [PathChoice::Direct, PathChoice::Buffered] {
        write_file(&path, &[(Dtype::F32, vec![1000])], 1);
        let loader = Loader::new(Config::default().path(reader)).unwrap();
        let checkpoint = gantry::Checkpoint::open(&path).unwrap();
        let mut model = loader.load_with(checkpoint.clone(), |_| true, |_| {}).unwrap();
        // Same layout, other bytes, another inode: what a trainer's atomic save leaves.
        write_file(&other, &[(Dtype::F32, vec![1000])], 2);
        std::fs::rename(&other, &path).unwrap();
        for result in [
            loader.load_with(checkpoint.clone(), |_| true, |_| {}).map(drop),
            loader.reload(&mut model),
        ] {
            let e = result.expect_err("a replaced file must not be loaded");
            let message = e.to_string();
            assert!(message.contains("file changed since its header was read"), "{message}");
            assert!(message.contains("replaced.safetensors"), "{message}");
        }
    }
}
