//! A load's timeline: valid Chrome trace-event JSON whose read spans add up to the bytes
//! read (against the file's size from a plain stat and its header's length read by hand),
//! a landing for every tensor, everything inside the load, no overlap on a track where the
//! recorder cannot overlap, a verdict; and an untraced load that records nothing.

mod common;
#[path = "common/store.rs"]
mod store;
#[path = "common/tools.rs"]
mod tools;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use common::*;
use gantry::{Checkpoint, Config, Dtype, Loader, PathChoice};
use parking_lot::Mutex;

/// Tests that read the process-wide count of traces entered run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Where the data section starts: 8 + the header's length, read by hand.
fn data_offset(path: &Path) -> u64 {
    let mut len = [0u8; 8];
    std::fs::File::open(path).unwrap().read_exact(&mut len).unwrap();
    8 + u64::from_le_bytes(len)
}

fn events_of(text: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(text).expect("the trace is JSON");
    assert_eq!(v["displayTimeUnit"], "ms");
    v["traceEvents"].as_array().expect("a traceEvents array").clone()
}

/// Checks every rule of the format on `events` and returns the X events by tid.
fn check_format(events: &[serde_json::Value]) -> BTreeMap<u64, Vec<(f64, f64, String)>> {
    let named: BTreeSet<u64> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .map(|e| e["tid"].as_u64().unwrap())
        .collect();
    let mut tracks: BTreeMap<u64, Vec<(f64, f64, String)>> = BTreeMap::new();
    for e in events {
        let ph = e["ph"].as_str().expect("every event has a phase");
        assert!(["M", "X", "i", "C"].contains(&ph), "{e}");
        assert!(e["pid"].is_u64() && e["tid"].is_u64() && e["name"].is_string(), "{e}");
        if ph == "M" {
            continue;
        }
        let ts = e["ts"].as_f64().expect("ts in microseconds");
        assert!(ts >= 0.0);
        if ph == "X" {
            let dur = e["dur"].as_f64().expect("a span has dur");
            let tid = e["tid"].as_u64().unwrap();
            assert!(named.contains(&tid), "span on an unnamed track: {e}");
            tracks.entry(tid).or_default().push((ts, ts + dur, e["name"].to_string()));
        }
    }
    tracks
}

/// On one track, spans are disjoint or nested (a thread's own spans; one read per slot).
fn assert_no_partial_overlap(tracks: &BTreeMap<u64, Vec<(f64, f64, String)>>) {
    for (tid, spans) in tracks {
        let mut spans = spans.clone();
        spans.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        let mut open: Vec<f64> = Vec::new();
        for (a, b, name) in spans {
            while open.last().is_some_and(|&end| end <= a + 1e-3) {
                open.pop();
            }
            if let Some(&end) = open.last() {
                assert!(
                    b <= end + 1e-3,
                    "track {tid}: {name} [{a}, {b}] overlaps one ending at {end}"
                );
            }
            open.push(b);
        }
    }
}

fn traced_load(path_choice: PathChoice, per_tensor: bool) {
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    let tensors: Vec<(Dtype, Vec<usize>)> = (0..12)
        .map(|i| (Dtype::F32, vec![1000 + 777 * i, 3]))
        .chain([(Dtype::U8, vec![0])])
        .collect();
    write_file(&path, &tensors, 7);
    let trace_path = dir.path().join("load.json");
    let config = Config::default()
        .path(path_choice)
        .chunk_bytes(8 * 4096)
        .buffered_chunk_bytes(8 * 4096)
        .staging_bytes(4 * 8 * 4096)
        .queue_depth(3)
        .threads(3)
        .trace(&trace_path);
    let loader = Loader::new(config).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let report = if per_tensor {
        // One slice per tensor: extents go through staging and the consumer's host copies.
        let mut params: Vec<Vec<u8>> =
            checkpoint.tensors.iter().map(|t| vec![0; t.len as usize]).collect();
        let mut slots = params.iter_mut();
        let r = loader.load_into(&checkpoint, |_| slots.next().map(|p| p.as_mut_slice()), |_| {});
        for (t, p) in checkpoint.tensors.iter().zip(&params) {
            assert_eq!(p, &reference(&checkpoint, t));
        }
        r.unwrap()
    } else {
        let model = loader.load_with(checkpoint.clone(), |_| true, |_| {}).unwrap();
        assert_matches_reference(&model, tensors.len());
        model.report().clone()
    };
    let events = events_of(&std::fs::read_to_string(&trace_path).unwrap());
    let tracks = check_format(&events);
    assert_no_partial_overlap(&tracks);

    // The read spans' bytes: the load's own count, and the data section from a plain stat.
    let reads: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["ph"] == "X" && e["cat"] == "read").collect();
    let read_bytes: u64 = reads.iter().map(|e| e["args"]["bytes"].as_u64().unwrap()).sum();
    assert_eq!(read_bytes, report.read_bytes);
    let data = std::fs::metadata(&path).unwrap().len() - data_offset(&path);
    assert!(read_bytes >= data && read_bytes < data + 2 * 4096, "{read_bytes} for {data}");
    let reader = if path_choice == PathChoice::Direct { "direct" } else { "buffered" };
    assert!(reads.iter().all(|e| e["args"]["reader"] == reader));

    // Every tensor lands once, inside the load, after the reads that carry it began.
    let load = events.iter().find(|e| e["cat"] == "phase" && e["name"] == "load").unwrap();
    let (l0, l1) = (
        load["ts"].as_f64().unwrap(),
        load["ts"].as_f64().unwrap() + load["dur"].as_f64().unwrap(),
    );
    let inside = |e: &serde_json::Value| {
        let t = e["ts"].as_f64().unwrap();
        let end = t + e["dur"].as_f64().unwrap_or(0.0);
        t >= l0 - 1e-3 && end <= l1 + 1e-3
    };
    let landed: Vec<String> = events
        .iter()
        .filter(|e| e["cat"] == "tensor" && e["name"] == "landed")
        .inspect(|e| assert!(inside(e), "landing outside the load: {e}"))
        .map(|e| e["args"]["name"].as_str().unwrap().to_owned())
        .collect();
    let mut expected: Vec<String> = checkpoint.tensors.iter().map(|t| t.name.clone()).collect();
    let mut got = landed.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    for e in &reads {
        assert!(inside(e), "a read outside the load: {e}");
    }
    // Everything else lies within the trace's phases: none starts before the first.
    let first = events.iter().filter(|e| e["cat"] == "phase").map(|e| e["ts"].as_f64().unwrap());
    let first = first.fold(f64::MAX, f64::min);
    assert!(events.iter().filter(|e| e["ph"] != "M").all(|e| e["ts"].as_f64().unwrap() >= first));
    if per_tensor {
        assert!(events.iter().any(|e| e["name"] == "host copy"), "staged extents are copied");
        assert!(events.iter().any(|e| e["name"] == "staging slots in use"));
    }
    // The file reads back to the verdict the load reported.
    let parsed = gantry::trace::parse(&std::fs::read_to_string(&trace_path).unwrap()).unwrap();
    let again = gantry::trace::measure(&parsed.events).map(|u| gantry::trace::verdict(&u));
    let verdict = report.bound_by.expect("a traced load has a verdict");
    assert_eq!(again.as_ref().map(|v| v.bound), Some(verdict.bound));
    assert!(verdict.to_string().starts_with("bound by "));
}

#[test]
fn a_traced_direct_load_into_file_buffers() {
    let _one = ONE_AT_A_TIME.lock();
    traced_load(PathChoice::Direct, false);
}

#[test]
fn a_traced_direct_load_through_staging() {
    let _one = ONE_AT_A_TIME.lock();
    traced_load(PathChoice::Direct, true);
}

#[test]
fn a_traced_buffered_load_through_staging() {
    let _one = ONE_AT_A_TIME.lock();
    traced_load(PathChoice::Buffered, true);
}

#[test]
fn a_traced_buffered_load_into_file_buffers() {
    let _one = ONE_AT_A_TIME.lock();
    traced_load(PathChoice::Buffered, false);
}

#[test]
fn an_untraced_load_enters_no_trace_and_has_no_verdict() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    write_file(&path, &[(Dtype::F32, vec![5000, 3]), (Dtype::BF16, vec![77])], 3);
    let before = gantry::trace::entered_count();
    for choice in [PathChoice::Direct, PathChoice::Buffered] {
        let config = Config::default().path(choice).chunk_bytes(4096).staging_bytes(16 * 4096);
        let loader = Loader::new(config).unwrap();
        let model = loader.load(&path).unwrap();
        assert!(model.report().bound_by.is_none());
    }
    assert_eq!(gantry::trace::entered_count(), before, "an untraced load entered a trace");
}

/// A warm load (every file in the page cache, read by buffered threads into place) is bound
/// by memory copies: a read from the page cache is a copy, and nothing waits on a device.
#[test]
fn a_warm_load_is_bound_by_host_copies_not_storage() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    let tensors: Vec<(Dtype, Vec<usize>)> = (0..16).map(|_| (Dtype::F32, vec![1 << 20])).collect();
    write_file(&path, &tensors, 5);
    std::fs::read(&path).unwrap(); // in the page cache
    let trace_path = dir.path().join("warm.json");
    let config = Config::default().threads(2).trace(&trace_path);
    let model = Loader::new(config).unwrap().load(&path).unwrap();
    let f = &model.report().files[0];
    assert_eq!(f.reader, Some(gantry::ReaderKind::Buffered), "{}", f.reason);
    let verdict = model.report().bound_by.clone().expect("a verdict");
    assert_eq!(verdict.bound, gantry::trace::Bound::HostCopy, "{verdict}");
    assert_eq!(verdict.setting, Some("--threads"), "{verdict}");
    assert!(verdict.to_string().contains("(page cache)"), "{verdict}");
}

/// Spans of one category from a trace file: (bytes, track) each.
fn spans_of(path: &Path, cat: &str) -> Vec<(u64, u64)> {
    let events = events_of(&std::fs::read_to_string(path).unwrap());
    check_format(&events);
    events
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] == cat)
        .map(|e| (e["args"]["bytes"].as_u64().unwrap(), e["tid"].as_u64().unwrap()))
        .collect()
}

/// With SHA-256 checks, every byte of the file is hashed once, on hashing threads' tracks.
#[test]
fn hashing_spans_cover_the_file_once() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    write_file(&path, &[(Dtype::F32, vec![300_000]), (Dtype::U8, vec![5])], 9);
    let trace_path = dir.path().join("hash.json");
    let config = Config::default().verify_sha256(true).chunk_bytes(64 << 10).trace(&trace_path);
    Loader::new(config).unwrap().load(&path).unwrap();
    let hashed: u64 = spans_of(&trace_path, "hash").iter().map(|s| s.0).sum();
    assert_eq!(hashed, std::fs::metadata(&path).unwrap().len());
    let events = events_of(&std::fs::read_to_string(&trace_path).unwrap());
    let lanes: BTreeSet<u64> = events
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .filter(|e| e["args"]["name"].as_str().unwrap().starts_with("sha256 lane"))
        .map(|e| e["tid"].as_u64().unwrap())
        .collect();
    assert!(spans_of(&trace_path, "hash").iter().all(|s| lanes.contains(&s.1)));
}

/// GETs from object storage: one span per part, on lanes that never overlap, adding up to
/// the bytes uploaded (the local file's data section).
#[test]
fn object_gets_are_spans_on_lanes() {
    let Some(weed) = store::weed() else { return };
    let server = store::Server::start(&weed);
    let dir = scratch();
    let local = path_of(&dir, "o.safetensors");
    write_file(&local, &[(Dtype::F32, vec![70_000]), (Dtype::BF16, vec![33_333])], 4);
    server.upload(&local, "trace/o.safetensors");
    let trace_path = dir.path().join("object.json");
    let config = Config::default()
        .object_option("aws_endpoint_url", &server.endpoint)
        .object_option("aws_allow_http", "true")
        .object_option("aws_region", "us-east-1")
        .object_option("aws_access_key_id", store::ACCESS_KEY)
        .object_option("aws_secret_access_key", store::SECRET_KEY)
        .object_part_bytes(64 << 10)
        .object_concurrency(4)
        .trace(&trace_path);
    let url = format!("s3://{}/trace/o.safetensors", store::BUCKET);
    let model = Loader::new(config.clone()).unwrap().load(&url).unwrap();
    assert_matches_local(&model, &Checkpoint::open(&local).unwrap());
    let gets = spans_of(&trace_path, "read");
    let data = std::fs::metadata(&local).unwrap().len() - data_offset(&local);
    assert_eq!(gets.iter().map(|g| g.0).sum::<u64>(), data);
    assert_eq!(gets.len() as u64, data.div_ceil(64 << 10));
    let events = events_of(&std::fs::read_to_string(&trace_path).unwrap());
    assert_no_partial_overlap(&check_format(&events));
    // Each GET's time to first byte and transfer split its span: both there, and together
    // within its length (whole microseconds, each rounded down).
    for e in events.iter().filter(|e| e["cat"] == "read" && e["ph"] == "X") {
        let (ttfb, transfer) = (e["args"]["ttfb_us"].as_u64(), e["args"]["transfer_us"].as_u64());
        let (Some(ttfb), Some(transfer)) = (ttfb, transfer) else { panic!("no split: {e}") };
        assert!((ttfb + transfer) as f64 <= e["dur"].as_f64().unwrap() + 1.0, "{e}");
    }
    let verdict = model.report().bound_by.clone().expect("a verdict");
    assert!(verdict.to_string().contains("GETs in flight"), "{verdict}");
    // With a cache, the copy's writes are a track of their own, bytes and all.
    let cached = Loader::new(config.cache_dir(dir.path().join("cache"))).unwrap();
    assert_matches_local(&cached.load(&url).unwrap(), &Checkpoint::open(&local).unwrap());
    let writes = spans_of(&trace_path, "cache");
    let written: u64 = writes.iter().map(|w| w.0).sum();
    let size = std::fs::metadata(&local).unwrap().len();
    assert!(written >= data && written <= size, "{written} bytes written of {size}");
    let gets = spans_of(&trace_path, "read"); // track ids are per trace file
    assert!(writes.iter().all(|w| !gets.iter().any(|g| g.1 == w.1)), "writes on a GET lane");
}

/// GPU trial: a warm load to a GPU draws its copy streams (a span per copy with bytes and the
/// GPU), the copies' bytes add up to the tensors' lengths in the header, and the verdict is a
/// copy stage, not storage.
#[test]
fn a_warm_device_load_draws_its_copy_streams() {
    let Some(gpu) = gpu() else { return };
    let _one = ONE_AT_A_TIME.lock();
    let dir = scratch();
    let path = path_of(&dir, "m.safetensors");
    let tensors: Vec<(Dtype, Vec<usize>)> = (0..16).map(|_| (Dtype::F32, vec![1 << 20])).collect();
    write_file(&path, &tensors, 9);
    std::fs::read(&path).unwrap(); // in the page cache
    let trace_path = dir.path().join("device.json");
    let loader = Loader::new(Config::default().trace(&trace_path)).unwrap();
    let model = loader.load_to_device(&path, &gpu).unwrap();
    let copies = spans_of(&trace_path, "copy");
    let events = events_of(&std::fs::read_to_string(&trace_path).unwrap());
    let device_copies: u64 = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["name"] == "device copy")
        .inspect(|e| assert_eq!(e["args"]["gpu"].as_u64(), Some(u64::from(gpu.ordinal()))))
        .map(|e| e["args"]["bytes"].as_u64().unwrap())
        .sum();
    let local = Checkpoint::open(&path).unwrap();
    let names: std::collections::BTreeSet<String> =
        events.iter().map(|e| format!("{}/{}", e["cat"], e["name"])).collect();
    assert_eq!(
        device_copies,
        local.tensors.iter().map(|t| t.len).sum::<u64>(),
        "files {:?}; events {names:?}",
        model.report().files
    );
    assert!(!copies.is_empty());
    let verdict = model.report().bound_by.clone().expect("a verdict");
    assert!(
        matches!(verdict.bound, gantry::trace::Bound::HostCopy | gantry::trace::Bound::DeviceCopy),
        "{verdict}"
    );
    assert!(verdict.to_string().contains("copy engine of GPU"), "{verdict}");
}
