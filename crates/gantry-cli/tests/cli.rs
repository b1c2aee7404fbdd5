//! The `gantry` binary end to end: `inspect` against the `safetensors` crate's own view of the
//! same files, and bad input giving one `error:` line, a non-zero status and no stdout.

use std::path::Path;
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn gantry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry")).args(args).output().unwrap()
}

fn write_checkpoint(path: &Path) -> Vec<u8> {
    let a: Vec<u8> = (0..24u8).collect();
    let b: Vec<u8> = (0..6u8).collect();
    let views = vec![
        ("layers.0.weight", TensorView::new(Dtype::BF16, vec![3, 4], &a).unwrap()),
        ("layers.0.bias", TensorView::new(Dtype::U8, vec![6], &b).unwrap()),
        ("empty", TensorView::new(Dtype::F32, vec![0, 5], &[]).unwrap()),
    ];
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn inspect_json_matches_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = write_checkpoint(&path);
    let out = gantry(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(v["total_bytes"], 30);
    assert_eq!(v["files"][0]["path"], path.to_str().unwrap());
    assert_eq!(v["files"][0]["tensors"], 3);
    assert_eq!(v["files"][0]["bytes"], 30);
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 3);
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let reference = st.tensor(name).unwrap();
        assert_eq!(t["dtype"], reference.dtype().to_string());
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(shape, reference.shape());
        let (offset, len) =
            (t["offset"].as_u64().unwrap() as usize, t["bytes"].as_u64().unwrap() as usize);
        assert_eq!(&bytes[offset..offset + len], reference.data());
        assert_eq!(t["file"], path.to_str().unwrap());
    }
}

#[test]
fn inspect_table_has_totals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_checkpoint(&path);
    let out = gantry(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("layers.0.weight") && text.contains("BF16") && text.contains("[3, 4]"),
        "{text}"
    );
    assert!(text.contains("3 tensors in 1 files, 30 B (30 bytes)"), "{text}");
}

#[test]
fn bad_input_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, 1000u64.to_le_bytes()).unwrap();
    let missing = dir.path().join("missing.safetensors");
    for (args, needle) in [
        (vec!["inspect", path.to_str().unwrap()], "header length prefix is 1000 bytes"),
        (vec!["inspect", "--json", path.to_str().unwrap()], "bad.safetensors"),
        (vec!["inspect", missing.to_str().unwrap()], "missing.safetensors"),
    ] {
        let out = gantry(&args);
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    }
}

#[test]
fn load_json_checksums_match_reference() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = write_checkpoint(&path);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for reader in ["auto", "direct", "buffered"] {
        let out = gantry(&[
            "load",
            path.to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
            "--checksum",
            "xxh3",
            "--path",
            reader,
            "--chunk-mib",
            "1",
            "--staging-mib",
            "4",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["bytes"], 30);
        assert!(v["seconds"].as_f64().unwrap() >= 0.0 && v["gb_per_s"].is_number());
        assert_eq!(v["files"][0]["path"], path.to_str().unwrap());
        if reader != "auto" {
            assert_eq!(v["files"][0]["reader"], reader);
        }
        let tensors = v["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), 3);
        for t in tensors {
            let data = st.tensor(t["name"].as_str().unwrap()).unwrap().data().to_vec();
            assert_eq!(t["xxh3"], format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&data)));
        }
    }
}

#[test]
fn load_verify_and_sharded_index() {
    let index = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/tiny-llama/model.safetensors.index.json"
    );
    for reader in ["direct", "buffered"] {
        let out = gantry(&["load", index, "--verify", "--path", reader]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("loaded 12 tensors") && text.contains("verified"), "{text}");
    }
}

#[test]
fn load_explain_names_reader_and_reason() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("model.safetensors");
    write_checkpoint(&path);
    let out = gantry(&["load", path.to_str().unwrap(), "--explain", "--path", "buffered"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("model.safetensors: buffered") && text.contains("forced by config"),
        "{text}"
    );
}

#[test]
fn bench_json_has_ceiling_and_ratio() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = gantry(&["synth", dir.path().to_str().unwrap(), "--size-gib", "0.01"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for cold in [false, true] {
        let mut args = vec!["bench", dir.path().to_str().unwrap(), "--repeat", "2", "--json"];
        if cold {
            args.push("--cold");
        }
        let out = gantry(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["cold"], cold);
        assert_eq!(v["runs"].as_array().unwrap().len(), 2);
        for key in [
            "median_ceiling_gb_per_s",
            "median_gantry_gb_per_s",
            "median_ratio",
            "median_reload_ratio",
        ] {
            assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
        }
        let read: u64 =
            v["files"].as_array().unwrap().iter().map(|f| f["bytes"].as_u64().unwrap()).sum();
        assert!(read >= v["bytes"].as_u64().unwrap(), "files read at least every tensor byte: {v}");
    }
}

#[test]
fn load_bad_input_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let good = dir.path().join("good.safetensors");
    write_checkpoint(&good);
    for (args, needle) in [
        (vec!["load", missing.to_str().unwrap()], "missing.safetensors"),
        (vec!["load", good.to_str().unwrap(), "--chunk-mib", "0"], "--chunk-mib"),
        (vec!["load", good.to_str().unwrap(), "--checksum", "md5"], "unknown checksum"),
        (vec!["bench", missing.to_str().unwrap(), "--json"], "missing.safetensors"),
    ] {
        let out = gantry(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    }
}

#[test]
fn load_shard_places_across_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_checkpoint(&path);
    let p = path.to_str().unwrap();
    // dim0:3 splits the 3x4 weight in rows of 8 bytes; the 1-D and empty tensors go whole.
    let out = gantry(&["load", p, "--shard", "dim0:3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["read_bytes"], 30, "read once");
    for d in 0..3 {
        assert_eq!(v["destinations"][d]["tensors"], 3);
        assert_eq!(v["destinations"][d]["bytes"], 8 + 6);
    }
    let out = gantry(&["load", p, "--shard", "replicate:2", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["destinations"][1]["bytes"], 30);
    for bad in [["--shard", "dimx:2"], ["--shard", "dim0:0"], ["--shard", "tp:0"]] {
        let out = gantry(&["load", p, bad[0], bad[1]]);
        assert!(!out.status.success() && out.stdout.is_empty());
    }
    // One destination per GPU named; several GPUs only with --shard; no host in a GPU list.
    let out = gantry(&["load", p, "--shard", "dim0:2", "--device", "cuda:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("names 1 GPU"));
    let out = gantry(&["load", p, "--device", "cuda:0,cuda:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --shard"));
    let out = gantry(&["load", p, "--shard", "dim0:2", "--device", "cpu,cuda:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GPUs only"));
}

#[test]
fn load_shard_tp_follows_the_tensor_parallel_rule() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = gantry(&["synth", dir.path().to_str().unwrap(), "--size-gib", "0.01"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = dir.path().to_str().unwrap();
    let inspect: Value = serde_json::from_slice(&gantry(&["inspect", p, "--json"]).stdout).unwrap();
    let total = inspect["total_bytes"].as_u64().unwrap();
    // Norms are replicated, everything else split in two: each rank holds half the split
    // bytes and every norm.
    let norms: u64 = inspect["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"].as_str().unwrap().contains("norm"))
        .map(|t| t["bytes"].as_u64().unwrap())
        .sum();
    for shard in ["tp:2", "dim1:2"] {
        let out = gantry(&["load", p, "--shard", shard, "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["plan_seconds"].as_f64().unwrap() >= 0.0);
        assert!(v["read_bytes"].as_u64().unwrap() <= total + (1 << 20), "read once");
        for d in 0..2 {
            assert_eq!(
                v["destinations"][d]["bytes"].as_u64().unwrap(),
                (total - norms) / 2 + norms
            );
        }
    }
    // The synthetic Llama's names are all known: no warning.
    let out = gantry(&["load", p, "--shard", "tp:2"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"), "{out:?}");
    // The caller's pattern first: a split the tensor cannot take is an error naming it.
    let out = gantry(&["load", p, "--shard", "tp:2", "--tp-rule", "lm_head.weight=dim5"]);
    assert!(!out.status.success() && out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("lm_head.weight"), "{err}");
    for bad in [
        vec!["--shard", "tp:2", "--tp-rule", "no-equals"],
        vec!["--shard", "tp:2", "--tp-rule", "*=sideways"],
        vec!["--shard", "dim0:2", "--tp-rule", "*=row"],
        vec!["--shard", "tp:3"], // hidden sizes are multiples of 64: 3 does not divide them
        vec!["--shard", "tp:2", "--replicate-via", "carrier-pigeon"],
    ] {
        let out = gantry(&[&["load", p][..], &bad].concat());
        assert!(!out.status.success() && out.stdout.is_empty(), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "), "{bad:?}");
    }
}

#[test]
fn load_shard_tp_warns_of_matrices_no_pattern_names() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("model.safetensors");
    let data = vec![7u8; 64 * 32 * 2];
    let views = [
        ("transformer.h.0.attn.c_attn.weight", vec![64, 32]),
        ("transformer.h.0.ln_1.weight", vec![32]),
        ("model.layers.0.self_attn.q_proj.weight", vec![64, 16]),
    ];
    let tensors: Vec<(&str, safetensors::tensor::TensorView<'_>)> = views
        .iter()
        .map(|(name, shape)| {
            let len = shape.iter().product::<usize>() * 2;
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                &data[..len],
            );
            (*name, view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    let p = path.to_str().unwrap();
    let out = gantry(&["load", p, "--shard", "tp:2", "--device", "cpu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 tensor(s) of two or more dimensions"), "{err}");
    assert!(err.contains("transformer.h.0.attn.c_attn.weight"), "{err}");
    assert!(!err.contains("ln_1") && !err.contains("q_proj"), "{err}");
    // Named by the caller: no warning.
    let out = gantry(&["load", p, "--shard", "tp:2", "--tp-rule", "*.c_attn.weight=column"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"), "{out:?}");
}

#[path = "../../gantry/tests/common/emulators.rs"]
mod emulators;

/// `inspect`, `load` and `bench` of `gs://` and `az://` sources from the emulators, reached
/// through the endpoint flags and `--object-option` alone: the same tensors and bytes as the
/// local file; an unknown option is one error line.
#[test]
fn object_sources_from_emulators() {
    let (Some(gcs_bin), Some(azurite_bin)) = (emulators::fake_gcs(), emulators::azurite()) else {
        return;
    };
    let (gcs, azurite) =
        (emulators::start_fake_gcs(&gcs_bin), emulators::start_azurite(&azurite_bin));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = write_checkpoint(&path);
    emulators::gcs_put(&gcs, "m/model.safetensors", &bytes);
    emulators::azure_put(&azurite, "m/model.safetensors", &bytes);
    let gcs_flags =
        ["--gcs-endpoint", &gcs.endpoint(), "--object-option", "google_skip_signature=true"];
    let azure_endpoint = format!("{}/{}", azurite.endpoint(), emulators::AZURE_ACCOUNT);
    let account = format!("azure_storage_account_name={}", emulators::AZURE_ACCOUNT);
    let key = format!("azure_storage_account_key={}", emulators::AZURE_KEY);
    let azure_flags =
        ["--azure-endpoint", &azure_endpoint, "--object-option", &account, "--object-option", &key];
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (url, flags) in [
        ("gs://weights/m/model.safetensors", &gcs_flags[..]),
        ("az://weights/m/model.safetensors", &azure_flags[..]),
    ] {
        let out = gantry(&[&["inspect", "--json", url], flags].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (v["total_bytes"].as_u64(), v["files"][0]["path"].as_str()),
            (Some(30), Some(url))
        );
        let load = ["load", url, "--device", "cpu", "--json", "--checksum", "xxh3"];
        let out = gantry(&[&load[..], flags].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["files"][0]["reader"], "object");
        let net = &v["object"];
        let (ttfb, rate) =
            (net["ttfb_ms"].as_f64().unwrap(), net["connection_mb_s"].as_f64().unwrap());
        assert!(ttfb > 0.0 && ttfb < 10_000.0 && rate > 0.0, "{url}: {net}");
        let in_flight = net["in_flight"].as_u64().unwrap();
        let cap = gantry::config::OBJECT_CONCURRENCY as u64;
        assert!((1..=cap).contains(&in_flight), "{url}: {net} (cap {cap}, the default)");
        assert_eq!(v["config"]["object_concurrency"].as_u64(), Some(cap), "{url}");
        assert!(net["climbed"].is_u64() && net["climb_settled"].is_boolean(), "{url}: {net}");
        // Parts that land in place (a host load): no staging buffers bound the streams.
        let streams = gantry::io::object::tune::STREAMING as u64;
        assert_eq!(net["streaming"].as_u64(), Some(streams), "{url}: {net}");
        // The plan's parts are the configured ones; a GET covers a whole number of them.
        assert_eq!(net["extent_bytes"], v["config"]["object_part_bytes"], "{url}: {net}");
        let (part, extent) =
            (net["part_bytes"].as_u64().unwrap(), net["extent_bytes"].as_u64().unwrap());
        assert!(
            part >= extent && part % extent == 0 && part <= extent.max(64 << 20),
            "{url}: {net}"
        );
        for t in v["tensors"].as_array().unwrap() {
            let data = st.tensor(t["name"].as_str().unwrap()).unwrap().data().to_vec();
            assert_eq!(t["xxh3"], format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&data)), "{url}");
        }
        let out = gantry(&[&["bench", url, "--device", "cpu", "--json"], flags].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = gantry(&["inspect", "gs://weights/m/", "--object-option", "google_nonsense=1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("google_nonsense"), "{stderr}");
}
