//! The C ABI's entry points fed values a careless or hostile caller passes: destination counts
//! of millions, ranks outside their world, sizes at their type's limit, empty paths and
//! options, random integers for every parameter. Each call must return a status (never
//! `GANTRY_E_PANIC`, never an abort) and leave a one-line message. The library is loaded with
//! `dlopen`, as a C program links it; bytes loaded are compared with the file's bytes.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;

mod ffi;

const OK: i32 = 0;
const INVALID: i32 = 101;
const PANIC: i32 = 900;
const HOST: i32 = -1;

#[repr(C)]
#[derive(Clone, Copy)]
struct Config {
    queue_depth: u32,
    threads: u32,
    chunk_bytes: u64,
    buffered_chunk_bytes: u64,
    staging_bytes: u64,
    path: i32,
    reserved: u32,
}

type Opaque = *mut c_void;

/// The entry points under test, from `libgantry.so`.
struct Lib {
    config_init: unsafe extern "C" fn(*mut Config) -> i32,
    new_with_options:
        unsafe extern "C" fn(*const Config, *const *const c_char, usize, *mut Opaque) -> i32,
    loader_free: unsafe extern "C" fn(Opaque),
    load: unsafe extern "C" fn(Opaque, *const c_char, i32, *mut Opaque) -> i32,
    model_free: unsafe extern "C" fn(Opaque),
    load_split:
        unsafe extern "C" fn(Opaque, *const c_char, *const i32, usize, i32, *mut Opaque) -> i32,
    placed_tensor: unsafe extern "C" fn(Opaque, usize, usize, *mut [u8; 256]) -> i32,
    placed_free: unsafe extern "C" fn(Opaque),
    cooperative: unsafe extern "C" fn(
        Opaque,
        *const c_char,
        i32,
        *mut c_void,
        i32,
        i32,
        Option<unsafe extern "C" fn(*mut c_void, *const c_void)>,
        *mut c_void,
        *mut Opaque,
        *mut c_void,
    ) -> i32,
    cooperative_split: unsafe extern "C" fn(
        Opaque,
        *const c_char,
        i32,
        *mut c_void,
        i32,
        i32,
        i32,
        *mut Opaque,
        *mut c_void,
    ) -> i32,
    last_error: unsafe extern "C" fn(*mut c_char, usize) -> usize,
    status_name: unsafe extern "C" fn(i32) -> *const c_char,
}

fn symbol<T: Copy>(handle: *mut c_void, name: &str) -> T {
    let c = CString::new(name).unwrap();
    // SAFETY: `handle` is a live dlopen handle; the name is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    assert!(!p.is_null(), "{name} is not exported");
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: `T` is the function pointer type of `name` as the header declares it.
    unsafe { std::mem::transmute_copy(&p) }
}

fn lib() -> &'static Lib {
    static LIB: std::sync::OnceLock<Lib> = std::sync::OnceLock::new();
    LIB.get_or_init(|| {
        let path = CString::new(ffi::lib_dir().join("libgantry.so").to_str().unwrap()).unwrap();
        // SAFETY: loading a library built from this source; it stays loaded for the process.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        assert!(!h.is_null(), "dlopen {path:?}");
        Lib {
            config_init: symbol(h, "gantry_config_init"),
            new_with_options: symbol(h, "gantry_loader_new_with_options"),
            loader_free: symbol(h, "gantry_loader_free"),
            load: symbol(h, "gantry_loader_load"),
            model_free: symbol(h, "gantry_model_free"),
            load_split: symbol(h, "gantry_loader_load_split"),
            placed_tensor: symbol(h, "gantry_placed_tensor"),
            placed_free: symbol(h, "gantry_placed_free"),
            cooperative: symbol(h, "gantry_loader_load_cooperative"),
            cooperative_split: symbol(h, "gantry_loader_load_cooperative_split"),
            last_error: symbol(h, "gantry_last_error_message"),
            status_name: symbol(h, "gantry_status_name"),
        }
    })
}

/// The last error's message; one line.
fn message() -> String {
    let mut buf = [0 as c_char; 1024];
    // SAFETY: the buffer is as long as said.
    unsafe { (lib().last_error)(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: snprintf semantics: NUL-terminated within the buffer.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    assert!(!text.contains('\n'), "{text:?}");
    text
}

/// A status that is not a panic, with a message when it is a failure.
fn checked(status: i32, what: &str) -> i32 {
    assert_ne!(status, PANIC, "{what}: {}", message());
    if status != OK {
        assert!(!message().is_empty(), "{what}: status {status} without a message");
    }
    status
}

fn loader(options: &[&str]) -> Result<Opaque, i32> {
    let owned: Vec<CString> = options.iter().map(|o| CString::new(*o).unwrap()).collect();
    let ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    let mut out: Opaque = std::ptr::null_mut();
    // SAFETY: NULL config, `ptrs.len()` valid strings, a writable out pointer.
    let rc =
        unsafe { (lib().new_with_options)(std::ptr::null(), ptrs.as_ptr(), ptrs.len(), &mut out) };
    if checked(rc, "loader") == OK {
        Ok(out)
    } else {
        Err(rc)
    }
}

/// A 4x6 F32 matrix `w`; returns the path and `w`'s bytes as written.
fn tiny(dir: &Path) -> (CString, Vec<u8>) {
    let w: Vec<u8> = (0..96u8).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 6], &w);
    let path = dir.join("tiny.safetensors");
    safetensors::serialize_to_file([("w", view.unwrap())], None, &path).unwrap();
    (CString::new(path.to_str().unwrap()).unwrap(), w)
}

#[test]
fn ten_million_destinations_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let (path, w) = tiny(dir.path());
    let l = loader(&[]).unwrap();
    let devices = vec![HOST; 10_000_000];
    for split in 0..4 {
        let mut out: Opaque = std::ptr::null_mut();
        // SAFETY: live loader, valid path, `devices.len()` values, writable out.
        let rc = unsafe {
            (lib().load_split)(l, path.as_ptr(), devices.as_ptr(), devices.len(), split, &mut out)
        };
        assert_eq!(checked(rc, "load_split"), INVALID);
        assert!(message().contains("10000000") && message().contains("1 to 1024"), "{}", message());
        assert!(out.is_null(), "no output on failure");
    }
    // 1024 host destinations load, each with `w` as written.
    let mut placed: Opaque = std::ptr::null_mut();
    // SAFETY: as above, with 1024 values.
    let rc =
        unsafe { (lib().load_split)(l, path.as_ptr(), devices.as_ptr(), 1024, 0, &mut placed) };
    assert_eq!(checked(rc, "load_split 1024"), OK);
    for d in [0, 511, 1023] {
        let mut t = [0u8; 256];
        // SAFETY: live placed handle; `t` is larger than gantry_tensor.
        assert_eq!(unsafe { (lib().placed_tensor)(placed, d, 0, &mut t) }, OK);
        // gantry_tensor: name, dtype, file, shape (pointers), ndim, reserved (u32), then data.
        let data = u64::from_ne_bytes(t[40..48].try_into().unwrap());
        // SAFETY: the share's host bytes, alive until placed_free.
        let got = unsafe { std::slice::from_raw_parts(data as usize as *const u8, w.len()) };
        assert_eq!(got, &w[..], "destination {d}");
    }
    // SAFETY: live handles, freed once.
    unsafe {
        (lib().placed_free)(placed);
        (lib().loader_free)(l);
    }
}

/// `gantry_config_init` writes 0 ("auto") where the engine decides and the default where it
/// does not; a loader takes every other value as given: a staging ring given smaller than the
/// automatic chunk is refused naming it, and loads once a chunk that fits is given too.
#[test]
fn config_init_leaves_auto_at_zero_and_given_values_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny(dir.path());
    let mut config = std::mem::MaybeUninit::<Config>::uninit();
    // SAFETY: writable memory for one config.
    assert_eq!(unsafe { (lib().config_init)(config.as_mut_ptr()) }, OK);
    // SAFETY: written by config_init.
    let mut config = unsafe { config.assume_init() };
    let auto = (config.queue_depth, config.threads, config.chunk_bytes, config.staging_bytes);
    assert_eq!(auto, (0, 0, 0, 0));
    assert_eq!((config.buffered_chunk_bytes, config.path), (2 << 20, 0));
    let new = |config: &Config| {
        let mut l: Opaque = std::ptr::null_mut();
        // SAFETY: a valid config, no options, a writable out pointer.
        let rc = unsafe { (lib().new_with_options)(config, std::ptr::null(), 0, &mut l) };
        (checked(rc, "new"), l)
    };
    config.staging_bytes = 1 << 20;
    assert_eq!(new(&config).0, INVALID);
    assert!(message().contains("staging_bytes 1048576 must hold at least one chunk of 67108864"));
    config.chunk_bytes = 4096;
    config.buffered_chunk_bytes = 4096;
    let (rc, l) = new(&config);
    assert_eq!(rc, OK, "{}", message());
    let mut out: Opaque = std::ptr::null_mut();
    // SAFETY: live loader, valid path, writable out.
    assert_eq!(checked(unsafe { (lib().load)(l, path.as_ptr(), HOST, &mut out) }, "load"), OK);
    // SAFETY: live handles, freed once.
    unsafe {
        (lib().model_free)(out);
        (lib().loader_free)(l);
    }
}

/// A tensor the split cannot place is `GANTRY_E_PLACEMENT` (104, by name) naming the tensor
/// and its shape: 4 rows of a column-parallel weight do not split over 3 destinations.
#[test]
fn a_split_that_does_not_divide_is_a_placement_status() {
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<u8> = (0..96u8).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 6], &w);
    let path = dir.path().join("q.safetensors");
    safetensors::serialize_to_file([("layer.q_proj.weight", view.unwrap())], None, &path).unwrap();
    let path = CString::new(path.to_str().unwrap()).unwrap();
    let l = loader(&[]).unwrap();
    let devices = [HOST; 3];
    let mut placed: Opaque = std::ptr::null_mut();
    // SAFETY: live loader, valid path, 3 destinations, writable out.
    let rc = unsafe { (lib().load_split)(l, path.as_ptr(), devices.as_ptr(), 3, 3, &mut placed) };
    assert_eq!(checked(rc, "load_split"), 104);
    assert!(placed.is_null(), "no output on failure");
    let text = message();
    assert!(text.contains("tensor 'layer.q_proj.weight' of shape [4, 6]"), "{text}");
    // SAFETY: `gantry_status_name` returns a static string.
    let name = unsafe { CStr::from_ptr((lib().status_name)(104)) };
    assert_eq!(name.to_str().unwrap(), "GANTRY_E_PLACEMENT");
    // SAFETY: a live loader, freed once.
    unsafe { (lib().loader_free)(l) };
}

#[test]
fn ranks_outside_the_world_and_empty_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny(dir.path());
    let l = loader(&[]).unwrap();
    for (rank, world) in [(5, 2), (0, 0), (-1, 2), (0, i32::MAX), (0, 1025)] {
        let mut out: Opaque = std::ptr::null_mut();
        // SAFETY: live loader, valid path, NULL communicator and report, writable out.
        let rc = unsafe {
            (lib().cooperative)(
                l,
                path.as_ptr(),
                0,
                std::ptr::null_mut(),
                rank,
                world,
                None,
                std::ptr::null_mut(),
                &mut out,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(checked(rc, "cooperative"), INVALID, "rank {rank} of {world}");
        // SAFETY: as above.
        let rc = unsafe {
            (lib().cooperative_split)(
                l,
                path.as_ptr(),
                0,
                std::ptr::null_mut(),
                rank,
                world,
                3,
                &mut out,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(checked(rc, "cooperative_split"), INVALID, "rank {rank} of {world}");
    }
    // SAFETY: live loader, freed once.
    unsafe { (lib().loader_free)(l) };
    assert_eq!(loader(&["cache_dir="]).unwrap_err(), INVALID);
    assert!(message().contains("cache_dir"), "{}", message());
    assert_eq!(loader(&["trace="]).unwrap_err(), INVALID);
    assert!(message().contains("trace"), "{}", message());
    assert_eq!(loader(&["cache_shared=maybe"]).unwrap_err(), INVALID);
    assert!(message().contains("cache_shared"), "{}", message());
}

/// `trace=FILE` writes the load's timeline: every tensor lands in it.
#[test]
fn a_trace_option_writes_the_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny(dir.path());
    let trace = dir.path().join("load.trace.json");
    let option = format!("trace={}", trace.display());
    let l = loader(&[option.as_str(), "cache_shared=1"]).unwrap();
    let mut out: Opaque = std::ptr::null_mut();
    // SAFETY: live loader, valid path, writable out.
    assert_eq!(checked(unsafe { (lib().load)(l, path.as_ptr(), -1, &mut out) }, "load"), OK);
    // SAFETY: a model from load and the live loader, each freed once.
    unsafe {
        (lib().model_free)(out);
        (lib().loader_free)(l);
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let landed: Vec<&str> = json["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "tensor" && e["name"] == "landed")
        .filter_map(|e| e["args"]["name"].as_str())
        .collect();
    assert_eq!(landed, ["w"]);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]

    /// Random values for every parameter of the loader's constructor and of the load calls:
    /// a status every time, never a panic.
    #[test]
    fn random_values_get_a_status(
        queue_depth in proptest::prelude::any::<u32>(),
        threads in proptest::prelude::any::<u32>(),
        chunk in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..(1 << 31)],
        buffered in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..(1 << 31)],
        staging in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..(1 << 33)],
        path_choice in -2i32..5,
        option in proptest::prop_oneof![
            proptest::strategy::Just(String::new()),
            "(verify_sha256|cache_dir|aws_endpoint_url|allow_http|timeout|x)=[ -~]{0,12}",
        ],
        device in proptest::prop_oneof![-3i32..3, proptest::prelude::any::<i32>()],
        destinations in proptest::prop_oneof![0usize..3000, proptest::prelude::any::<usize>()],
        split in -2i32..6,
        rank in proptest::prelude::any::<i32>(),
        world in proptest::prop_oneof![-2i32..5, proptest::prelude::any::<i32>()],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = tiny(dir.path());
        let mut config = std::mem::MaybeUninit::<Config>::uninit();
        // SAFETY: writable memory for one config.
        assert_eq!(unsafe { (lib().config_init)(config.as_mut_ptr()) }, OK);
        // SAFETY: written by config_init.
        let mut config = unsafe { config.assume_init() };
        if queue_depth % 2 == 0 {
            config = Config {
                queue_depth, threads, chunk_bytes: chunk, buffered_chunk_bytes: buffered,
                staging_bytes: staging, path: path_choice, reserved: 0,
            };
        }
        let option = CString::new(option).unwrap();
        let options = [option.as_ptr()];
        let mut l: Opaque = std::ptr::null_mut();
        let count = usize::from(!option.as_bytes().is_empty());
        // SAFETY: a valid config, `count` valid strings, a writable out pointer.
        let rc = unsafe { (lib().new_with_options)(&config, options.as_ptr(), count, &mut l) };
        if checked(rc, "new") != OK {
            return Ok(());
        }
        let mut out: Opaque = std::ptr::null_mut();
        // SAFETY: live loader, valid path, writable out.
        if checked(unsafe { (lib().load)(l, path.as_ptr(), device, &mut out) }, "load") == OK {
            // SAFETY: a model from load, freed once.
            unsafe { (lib().model_free)(out) };
        }
        // Only counts up to what the test can back with memory point at real values; larger
        // ones must be refused before the list is read.
        let devices = vec![device; destinations.min(3000)];
        let mut placed: Opaque = std::ptr::null_mut();
        // SAFETY: live loader, valid path, `devices` holds `destinations` values when that is
        // at most 3000 (larger counts are over 1024, refused before any is read), writable out.
        let rc = unsafe {
            (lib().load_split)(l, path.as_ptr(), devices.as_ptr(), destinations, split, &mut placed)
        };
        if checked(rc, "load_split") == OK && !placed.is_null() {
            // SAFETY: a placed handle from load_split, freed once.
            unsafe { (lib().placed_free)(placed) };
        }
        // SAFETY: live loader, valid path, NULL communicator and report, writable out.
        let rc = unsafe {
            (lib().cooperative)(
                l, path.as_ptr(), device, std::ptr::null_mut(), rank, world, None,
                std::ptr::null_mut(), &mut out, std::ptr::null_mut(),
            )
        };
        if checked(rc, "cooperative") == OK {
            // SAFETY: a model, freed once.
            unsafe { (lib().model_free)(out) };
        }
        // SAFETY: the loader, freed once.
        unsafe { (lib().loader_free)(l) };
    }
}
