//! The object-storage scenarios every store runs (Google Cloud Storage and Azure against their
//! emulators): every load compared with a plain read of the local file it was uploaded from.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gantry::{Checkpoint, Config, Dtype, Error, Loader, ReaderKind};
use parking_lot::Mutex;

use crate::common::*;

/// Object names with non-ASCII and reserved characters: each must load as it is written.
pub const ODD_NAMES: [&str; 9] =
    ["caf\u{e9}", "a~b", "layer[1]", "two words", "a+b", "100%", "x#1", "why?", "%41"];

/// A prefix with such characters too.
pub const ODD_PREFIX: &str = "odd \u{e9} ~[1]+%#?/";

/// A store under test: URLs of its keys, uploads, and a crash.
pub trait Store: Send + 'static {
    fn url(&self, key: &str) -> String;
    fn put(&self, key: &str, bytes: &[u8]);
    /// Kills the server.
    fn kill(&mut self);
}

/// Small parts, so that every file is many GETs.
pub fn small_parts(config: Config, part: usize, concurrency: usize) -> Config {
    config
        .object_part_bytes(part)
        .object_concurrency(concurrency)
        .chunk_bytes(part)
        .staging_bytes(part * 8)
}

/// Random layouts and part sizes, one file each: into gantry's buffers (parts land in place)
/// and into the caller's slices (parts spanning tensors go through the staging ring).
pub fn random_layouts(store: &impl Store, dir: &Path, config: &Config) {
    let mut state = 11u64;
    let mut staged_any = false;
    for case in 0..4u64 {
        let dtypes = [Dtype::F32, Dtype::BF16, Dtype::U8, Dtype::I64, Dtype::F16];
        let tensors: Vec<(Dtype, Vec<usize>)> = (0..1 + case as usize * 3)
            .map(|i| {
                gantry::synth::fill_random(&mut [0u8; 1], &mut state);
                (dtypes[(i + case as usize) % dtypes.len()], vec![1 + (state as usize % 70_000)])
            })
            .collect();
        let local = dir.join(format!("case{case}.safetensors"));
        write_file(&local, &tensors, case);
        let key = format!("cases/case{case}.safetensors");
        store.put(&key, &std::fs::read(&local).unwrap());
        let local = Checkpoint::open(&local).unwrap();
        for (part, concurrency) in [(4096, 3), (256 << 10, 16)] {
            let loader = Loader::new(small_parts(config.clone(), part, concurrency)).unwrap();
            let model = loader.load(store.url(&key)).unwrap();
            assert_matches_local(&model, &local);
            assert_eq!(model.report().files[0].reader, Some(ReaderKind::Object));
            let remote = gantry::open_with(store.url(&key), loader.config()).unwrap();
            let mut own: Vec<Vec<u8>> =
                remote.tensors.iter().map(|t| vec![0; t.len as usize]).collect();
            let mut slots = own.iter_mut();
            let report = loader
                .load_into(&remote, |_| slots.next().map(|v| v.as_mut_slice()), |_| {})
                .unwrap();
            staged_any |= report.staging_bytes > 0;
            for (t, bytes) in local.tensors.iter().zip(&own) {
                assert!(*bytes == reference(&local, t), "{} (staged, part {part})", t.name);
            }
        }
    }
    assert!(staged_any, "no load went through the staging ring");
}

/// A sharded checkpoint uploaded under `llama/` (with its index), `plain/` (shards only) and
/// `partial/` (the last shard missing); the local checkpoint.
pub fn upload_sharded(store: &impl Store, dir: &Path) -> Checkpoint {
    let spec = gantry::synth::SynthSpec {
        vocab: 300,
        hidden: 64,
        intermediate: 224,
        kv: 16,
        layers: 2,
        shards: 3,
    };
    let ckpt = dir.join("llama");
    std::fs::create_dir_all(&ckpt).unwrap();
    let index = gantry::synth::write_checkpoint(&ckpt, &spec, 3).unwrap();
    for entry in std::fs::read_dir(&ckpt).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let bytes = std::fs::read(&path).unwrap();
        store.put(&format!("llama/{name}"), &bytes);
        if name.ends_with(".safetensors") {
            store.put(&format!("plain/{name}"), &bytes);
        }
        if !name.starts_with("model-00003") {
            store.put(&format!("partial/{name}"), &bytes);
        }
    }
    Checkpoint::open(&index).unwrap()
}

/// The sharded checkpoint through its prefix, its index key and a prefix of plain shards.
pub fn sharded(store: &impl Store, config: &Config, local: &Checkpoint) {
    let loader = Loader::new(config.clone()).unwrap();
    for key in ["llama/", "llama/model.safetensors.index.json", "plain/"] {
        let source = store.url(key);
        let remote = gantry::open_with(&source, config).unwrap();
        assert_eq!(remote.files.len(), 3, "{source}");
        assert!(remote.files.iter().all(|f| f.path.to_str().unwrap().starts_with(&store.url(""))));
        assert_matches_local(&loader.load(&source).unwrap(), local);
    }
}

/// `source` fails to load, with an error containing every one of `wants` and no `secret`.
pub fn expect_err(config: &Config, source: &str, wants: &[&str], secret: &str) -> Error {
    let e = Loader::new(config.clone()).unwrap().load(source).map(|_| ()).unwrap_err();
    let text = e.to_string();
    for w in wants {
        assert!(text.contains(w), "{source}: {text}");
    }
    assert!(!text.contains(secret), "{text}");
    e
}

/// Missing key, empty prefix, missing shard, a corrupt header, a prefix without its slash:
/// errors naming them.
pub fn missing(store: &impl Store, dir: &Path, config: &Config, secret: &str) {
    let key = store.url("cases/missing.safetensors");
    expect_err(config, &key, &["cases/missing.safetensors"], secret);
    // A checkpoint folder written without its trailing slash: the error names the prefix
    // that was meant (after `upload_sharded`).
    let folder = store.url("llama/");
    expect_err(config, &store.url("llama"), &["no object 'llama'", &folder], secret);
    expect_err(config, &store.url("nothing-here/"), &["nothing-here"], secret);
    let wants = ["partial/model.safetensors.index.json", "model-00003-of-00003"];
    expect_err(config, &store.url("partial/"), &wants, secret);
    let broken = dir.join("broken.safetensors");
    std::fs::write(&broken, 999_999u64.to_le_bytes()).unwrap();
    store.put("broken.safetensors", &std::fs::read(&broken).unwrap());
    expect_err(config, &store.url("broken.safetensors"), &["broken.safetensors", "header"], secret);
}

/// Headers of every length the first GET of a shard may meet: ending exactly where that GET
/// ends (256 KiB with the length prefix), one byte past it, far past it (a second GET each,
/// pinned to the first's version); objects too small for the length prefix (empty: a range no
/// store can answer) are errors naming them.
pub fn header_lengths(store: &impl Store, dir: &Path, config: &Config, secret: &str) {
    let loader = Loader::new(config.clone()).unwrap();
    for (i, header_len) in [(256 << 10) - 8, (256 << 10) - 7, 600 << 10, 80].into_iter().enumerate()
    {
        let n = 70_000 + i;
        let json = format!(r#"{{"t":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#);
        let mut bytes = (header_len as u64).to_le_bytes().to_vec();
        let mut header = json.into_bytes();
        header.resize(header_len, b' '); // padding the format allows
        bytes.extend(header);
        bytes.extend((0..n).map(|k| (k * 7 + i) as u8));
        let (name, local) =
            (format!("headers/len{header_len}.safetensors"), dir.join(format!("h{i}")));
        std::fs::write(&local, &bytes).unwrap();
        store.put(&name, &bytes);
        let local = Checkpoint::open(&local).unwrap();
        assert_eq!(local.files[0].header.header_len, header_len as u64, "{name}");
        assert_matches_local(&loader.load(store.url(&name)).unwrap(), &local);
    }
    for (name, bytes) in
        [("headers/empty.safetensors", &b""[..]), ("headers/five.safetensors", b"12345")]
    {
        store.put(name, bytes);
        let len = format!("file is {} bytes", bytes.len());
        expect_err(config, &store.url(name), &[name, &len], secret);
    }
    // A prefix whose index is malformed (its shards' headers read beside it) and one whose
    // index is empty (no range of it can be answered): errors naming the index.
    for (prefix, index) in [("badindex/", &b"{\"weight_map\": ["[..]), ("emptyindex/", b"")] {
        store.put(&format!("{prefix}model.safetensors.index.json"), index);
        store.put(
            &format!("{prefix}model-00001-of-00001.safetensors"),
            &std::fs::read(dir.join("h3")).unwrap(),
        );
        let name = format!("{prefix}model.safetensors.index.json");
        expect_err(config, &store.url(prefix), &[&name, "malformed index"], secret);
    }
}

/// Two files of the same size and different bytes.
pub fn two_versions(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let (a, b) = (dir.join("big-a.safetensors"), dir.join("big-b.safetensors"));
    write_file(&a, &[(Dtype::F32, vec![1 << 17]), (Dtype::F32, vec![1 << 17])], 9);
    write_file(&b, &[(Dtype::F32, vec![1 << 17]), (Dtype::F32, vec![1 << 17])], 10);
    (std::fs::read(a).unwrap(), std::fs::read(b).unwrap())
}

/// An object rewritten during the load (same size, new bytes): an error, never a mix.
pub fn rewritten_mid_load(store: &impl Store, dir: &Path, config: &Config) {
    let (a, b) = two_versions(dir);
    store.put("big.safetensors", &a);
    let slow = small_parts(config.clone(), 4096, 1);
    let checkpoint = gantry::open_with(store.url("big.safetensors"), &slow).unwrap();
    let mut rewritten = false;
    let result = Loader::new(slow).unwrap().load_with(
        checkpoint,
        |_| true,
        |_| {
            if !rewritten {
                store.put("big.safetensors", &b);
                rewritten = true;
            }
        },
    );
    let e = result.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("changed") && e.contains("big.safetensors"), "{e}");
}

/// An object rewritten between the checkpoint's open and its load (same size and header, new
/// bytes): the load's reads would be of another version than the header it was opened with
/// (and than what a cooperating rank opened), so it is an error naming the object.
pub fn rewritten_after_open(store: &impl Store, dir: &Path, config: &Config) {
    let (a, b) = two_versions(dir);
    store.put("opened.safetensors", &a);
    let checkpoint = gantry::open_with(store.url("opened.safetensors"), config).unwrap();
    store.put("opened.safetensors", &b);
    let result = Loader::new(config.clone()).unwrap().load_with(checkpoint, |_| true, |_| {});
    let e = result.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("changed") && e.contains("opened.safetensors"), "{e}");
    assert!(e.contains("its header was read at"), "{e}");
    // Without a cache no HEAD asks first: the load's first GET, conditioned on the version
    // read, finds the change.
    assert!(e.contains("which no longer matches") || e.contains("which is gone"), "{e}");
    // With a cache, a HEAD before the load does (a copy is trusted as a HEAD shows it now).
    store.put("opened.safetensors", &a);
    let checkpoint = gantry::open_with(store.url("opened.safetensors"), config).unwrap();
    store.put("opened.safetensors", &b);
    let cached = config.clone().cache_dir(dir.join("rewritten-after-open-cache"));
    let result = Loader::new(cached).unwrap().load_with(checkpoint, |_| true, |_| {});
    let e = result.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("changed") && e.contains("opened.safetensors"), "{e}");
    assert!(e.contains("its header was read at") && e.contains("now"), "{e}");
    // A caller's checkpoint whose version pins nothing (empty, `*`) gets its HEAD back, and a
    // wrong length is caught by the first GET's answer: an error, never the new bytes.
    for forged in ["", "*"] {
        store.put("opened.safetensors", &a);
        let mut checkpoint = gantry::open_with(store.url("opened.safetensors"), config).unwrap();
        checkpoint.files[0].version = Some(forged.to_owned());
        store.put("opened.safetensors", &b);
        let result = Loader::new(config.clone()).unwrap().load_with(checkpoint, |_| true, |_| {});
        let e = result.map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("changed") && e.contains("opened.safetensors"), "{forged:?}: {e}");
    }
    // A verified load that must find a digest: the rewrite is its error, not a missing digest.
    store.put("opened.safetensors", &a);
    let checkpoint = gantry::open_with(store.url("opened.safetensors"), config).unwrap();
    store.put("opened.safetensors", &b);
    let required = config.clone().verify_sha256(true).require_sha256(true);
    let result = Loader::new(required).unwrap().load_with(checkpoint, |_| true, |_| {});
    let e = result.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("changed") && !e.contains("SHA256SUMS"), "{e}");
    let mut checkpoint = gantry::open_with(store.url("opened.safetensors"), config).unwrap();
    checkpoint.files[0].file_len += 4096;
    let result = Loader::new(config.clone()).unwrap().load_with(checkpoint, |_| true, |_| {});
    let e = result.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("bytes") && e.contains("opened.safetensors"), "{e}");
    // One load of files some of which get a HEAD (no version known) and some not:
    // each file is opened from its own HEAD or its own header's read (files of different
    // sizes: one paired with another's HEAD would fail, or land other bytes).
    let local = dir.join("mixed");
    std::fs::create_dir_all(&local).unwrap();
    for (i, n) in [(1usize, 1 << 15), (2, 1 << 12), (3, 1 << 16)] {
        let path = local.join(format!("m-{i}.safetensors"));
        write_file_named(
            &path,
            &[(Dtype::F32, vec![n]), (Dtype::U8, vec![n + i])],
            20 + i as u64,
            &format!("f{i}."),
        );
        store.put(&format!("mixed/m-{i}.safetensors"), &std::fs::read(&path).unwrap());
    }
    let reference = Checkpoint::open(&local).unwrap();
    for unpinned in [vec![0], vec![1], vec![0, 2], vec![1, 2]] {
        let mut checkpoint = gantry::open_with(store.url("mixed/"), config).unwrap();
        assert_eq!(checkpoint.files.len(), 3);
        for &f in &unpinned {
            checkpoint.files[f].version = None;
        }
        let model = Loader::new(config.clone()).unwrap().load_with(checkpoint, |_| true, |_| {});
        let model = model.unwrap_or_else(|e| panic!("files {unpinned:?} unpinned: {e}"));
        assert_matches_local(&model, &reference);
    }
}

/// The cache: the first load writes each object through, the next reads the copies locally;
/// with `SHA256SUMS` beside the shards the SHA-256 check passes, and names a shard whose
/// listed digest is wrong.
pub fn cache_and_sha256(store: &impl Store, dir: &Path, config: &Config, local: &Checkpoint) {
    let cache = dir.join("cache");
    let loader = Loader::new(small_parts(config.clone(), 64 << 10, 8).cache_dir(&cache)).unwrap();
    let model = loader.load(store.url("llama/")).unwrap();
    assert_matches_local(&model, local);
    for f in &model.report().files {
        assert!(f.reason.contains("written through to the cache"), "{}", f.reason);
    }
    let model = loader.load(store.url("llama/")).unwrap();
    assert_matches_local(&model, local);
    for f in &model.report().files {
        assert_ne!(f.reader, Some(ReaderKind::Object), "{}", f.reason);
        assert!(f.reason.contains("from the cache"), "{}", f.reason);
    }
    let mut sums = String::new();
    for file in &local.files {
        let digest = gantry::integrity::sha256(&std::fs::read(&file.path).unwrap());
        let name = file.path.file_name().unwrap().to_str().unwrap();
        sums.push_str(&format!("{}  {name}\n", gantry::integrity::to_hex(&digest)));
    }
    store.put("llama/SHA256SUMS", sums.as_bytes());
    let verify = Loader::new(config.clone().verify_sha256(true)).unwrap();
    assert_matches_local(&verify.load(store.url("llama/")).unwrap(), local);
    let first = local.files[0].path.file_name().unwrap().to_str().unwrap();
    let wrong = sums.replacen(&sums[..8], "00000000", 1);
    store.put("llama/SHA256SUMS", wrong.as_bytes());
    let e = verify.load(store.url("llama/")).map(|_| ()).unwrap_err();
    assert!(matches!(&e, Error::Integrity { .. }) && e.to_string().contains(first), "{e}");
    // A malformed list, or one naming a file twice, is an error naming it and the line.
    store.put("llama/SHA256SUMS", format!("{sums}{sums}").as_bytes());
    let e = verify.load(store.url("llama/")).map(|_| ()).unwrap_err();
    assert!(
        matches!(&e, Error::Sha256 { .. }) && e.to_string().contains("SHA256SUMS: line"),
        "{e}"
    );
    store.put("llama/SHA256SUMS", sums.as_bytes());
}

/// The server killed in the middle of a load: an I/O error naming the object within the retry
/// budget, no hang.
pub fn killed_mid_load<S: Store>(store: S, dir: &Path, config: &Config) {
    let (a, _) = two_versions(dir);
    store.put("big.safetensors", &a);
    let slow = small_parts(config.clone(), 4096, 1);
    let checkpoint = gantry::open_with(store.url("big.safetensors"), &slow).unwrap();
    let store = Arc::new(Mutex::new(store));
    let result = with_deadline(Duration::from_secs(180), move || {
        let mut killed = false;
        Loader::new(slow).unwrap().load_with(
            checkpoint,
            |_| true,
            |_| {
                if !killed {
                    store.lock().kill();
                    killed = true;
                }
            },
        )
    });
    match result {
        Err(Error::Io { path, .. }) => assert!(path.to_string_lossy().contains("big.safetensors")),
        other => panic!("{:?}", other.map(|m| m.report().clone())),
    }
}

/// Keys with non-ASCII and reserved characters ([`ODD_NAMES`] under [`ODD_PREFIX`]): each
/// loads by its URL as written, all of them by listing the prefix, and with `--verify-sha256`
/// through a `SHA256SUMS` beside them; every load compared with the local files.
pub fn odd_keys(store: &impl Store, dir: &Path, config: &Config) {
    let local_dir = dir.join("odd");
    std::fs::create_dir_all(&local_dir).unwrap();
    let loader = Loader::new(config.clone()).unwrap();
    let mut sums = String::new();
    for (i, name) in ODD_NAMES.iter().enumerate() {
        let file = format!("{name}.safetensors");
        let local = local_dir.join(&file);
        write_file_named(&local, &[(Dtype::F32, vec![100 + i])], 40 + i as u64, &format!("o{i}."));
        let bytes = std::fs::read(&local).unwrap();
        store.put(&format!("{ODD_PREFIX}{file}"), &bytes);
        let digest = gantry::integrity::to_hex(&gantry::integrity::sha256(&bytes));
        sums.push_str(&format!("{digest}  {file}\n"));
        let url = store.url(&format!("{ODD_PREFIX}{file}"));
        let model = loader.load(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_matches_local(&model, &Checkpoint::open(&local).unwrap());
        assert_eq!(model.checkpoint().files[0].path.to_str(), Some(url.as_str()));
    }
    let local = Checkpoint::open(&local_dir).unwrap();
    let url = store.url(ODD_PREFIX);
    let remote = gantry::open_with(&url, config).unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(remote.files.len(), ODD_NAMES.len(), "{url}");
    assert_matches_local(&loader.load(&url).unwrap(), &local);
    store.put(&format!("{ODD_PREFIX}SHA256SUMS"), sums.as_bytes());
    let verify = Loader::new(config.clone().verify_sha256(true)).unwrap();
    let model = verify.load(&url).unwrap();
    assert_matches_local(&model, &local);
    for f in &model.report().files {
        let known = f.integrity.as_ref().and_then(|check| check.known.as_ref());
        assert!(known.is_some(), "{}: no digest found in its SHA256SUMS", f.path.display());
    }
}
