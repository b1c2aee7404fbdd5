//! Tensor-parallel placements (`tp:N`, `dimK:N`) into host memory and onto GPUs: every share
//! compared with a slice cut element by element from the `safetensors` crate's view of a plain
//! read of the file, with tiny chunks so that extents cut rows anywhere; planning counted in
//! pieces (linear in tensors, not rows); bad rules are errors.
//!
//! The GPU trials use every visible GPU when there are several (each share checked to be on
//! the GPU it was meant for) and the one GPU named several times when there is one.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use gantry::placement::{self, tensor_parallel, Layout, Share, Split};
use gantry::plan::{FilePlan, Plan, ReadSet};
use gantry::{Checkpoint, Config, CudaDevice, Dtype, Loader, ReplicateVia, TensorEntry};
use safetensors::tensor::TensorView;

/// A small xorshift generator: the shapes and dtypes of a trial from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn dtype(&mut self) -> Dtype {
        let all =
            [Dtype::F32, Dtype::BF16, Dtype::F16, Dtype::F64, Dtype::I8, Dtype::U8, Dtype::I32];
        all[self.below(all.len() as u64) as usize]
    }
}

/// `(name, dtype, shape)` of a checkpoint shaped like one decoder of each family (Llama,
/// Qwen2 biases, Qwen3 q/k norms, Mixtral experts) with random sizes that divide by `parts`,
/// random dtypes, and a 3-D tensor whose dimensions 1 and 2 divide.
fn model(seed: u64, parts: u64) -> Vec<(String, Dtype, Vec<u64>)> {
    let mut r = Rng(seed | 1);
    let n = |r: &mut Rng, most: u64| parts * (1 + r.below(most));
    let (h, i, kv, vocab) = (n(&mut r, 12), n(&mut r, 20), n(&mut r, 4), n(&mut r, 30));
    let mut t = vec![("model.embed_tokens.weight".to_owned(), vec![vocab, h])];
    let p = "model.layers.0";
    for (name, shape) in [
        ("input_layernorm.weight", vec![h]),
        ("self_attn.q_proj.weight", vec![h, h]),
        ("self_attn.q_proj.bias", vec![h]),
        ("self_attn.k_proj.weight", vec![kv, h]),
        ("self_attn.k_proj.bias", vec![kv]),
        ("self_attn.v_proj.weight", vec![kv, h]),
        ("self_attn.o_proj.weight", vec![h, h]),
        ("self_attn.o_proj.bias", vec![h + 1]),
        ("self_attn.q_norm.weight", vec![3 + r.below(9)]),
        ("post_attention_layernorm.weight", vec![h]),
        ("mlp.gate_proj.weight", vec![i, h]),
        ("mlp.up_proj.weight", vec![i, h]),
        ("mlp.down_proj.weight", vec![h, i]),
        ("block_sparse_moe.gate.weight", vec![3, h]),
        ("block_sparse_moe.experts.0.w1.weight", vec![i, h]),
        ("block_sparse_moe.experts.0.w2.weight", vec![h, i]),
        ("block_sparse_moe.experts.1.w3.weight", vec![i, h]),
    ] {
        t.push((format!("{p}.{name}"), shape));
    }
    t.push(("model.extra.cube".to_owned(), vec![1 + r.below(3), n(&mut r, 3), n(&mut r, 5)]));
    t.push(("model.norm.weight".to_owned(), vec![h]));
    t.push(("lm_head.weight".to_owned(), vec![vocab, h]));
    t.into_iter().map(|(name, shape)| (name, r.dtype(), shape)).collect()
}

/// Writes `tensors` with the `safetensors` crate; bytes from `seed`.
fn write(path: &std::path::Path, tensors: &[(String, Dtype, Vec<u64>)], seed: u64) {
    let mut state = seed;
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dtype, shape)| {
            let mut v = vec![0u8; (shape.iter().product::<u64>() as usize) * dtype.bitsize() / 8];
            gantry::synth::fill_random(&mut v, &mut state);
            v
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), d)| {
            let shape = shape.iter().map(|&n| n as usize).collect();
            (name.clone(), TensorView::new(*dtype, shape, d).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Every tensor's bytes and shape as the `safetensors` crate reads them from the file.
fn reference_tensors(path: &std::path::Path) -> HashMap<String, (Vec<usize>, usize, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let elem = v.dtype().bitsize() / 8;
            (name, (v.shape().to_vec(), elem, v.data().to_vec()))
        })
        .collect()
}

/// The share of a tensor, cut element by element from its reference bytes.
fn cut(shape: &[usize], elem: usize, data: &[u8], share: Share) -> Vec<u8> {
    let Share::Slice(s) = share else { return data.to_vec() };
    let mut out = Vec::new();
    for flat in 0..shape.iter().product::<usize>() {
        let (mut rest, mut index_at_dim) = (flat, 0);
        for d in (0..shape.len()).rev() {
            if d == s.dim {
                index_at_dim = rest % shape[d];
            }
            rest /= shape[d];
        }
        if (s.start..s.start + s.len).contains(&(index_at_dim as u64)) {
            out.extend_from_slice(&data[flat * elem..(flat + 1) * elem]);
        }
    }
    out
}

/// A placement rule: which destinations get what of a tensor.
type PlaceFn = dyn Fn(&TensorEntry) -> gantry::Result<Vec<(usize, Share)>>;

/// A rule under test, by its CLI name.
fn rule(mode: &str, parts: usize) -> Box<PlaceFn> {
    match mode {
        "tp" => {
            let tp = tensor_parallel(parts);
            Box::new(move |t| tp.place(t))
        }
        _ => {
            let dim = mode.strip_prefix("dim").unwrap().parse().unwrap();
            Box::new(move |t| placement::split(t, Some(dim), parts))
        }
    }
}

const MODES: [&str; 4] = ["tp", "dim0", "dim1", "dim2"];

/// Checks every destination's shares (as `(name, share, bytes)`) against the reference and
/// the rule, and that `ready` named each share once.
fn check(
    path: &std::path::Path,
    c: &Checkpoint,
    want: &PlaceFn,
    placed: &[Vec<(String, Share, Vec<u8>)>],
    mut ready: Vec<(usize, String)>,
    what: &str,
) {
    let reference = reference_tensors(path);
    let mut expected: Vec<Vec<(String, Share)>> = vec![Vec::new(); placed.len()];
    for t in &c.tensors {
        for (d, share) in want(t).unwrap() {
            expected[d].push((t.name.clone(), share));
        }
    }
    let mut shares: Vec<(usize, String)> = Vec::new();
    for (d, got) in placed.iter().enumerate() {
        let names: Vec<(String, Share)> = got.iter().map(|(n, s, _)| (n.clone(), *s)).collect();
        assert_eq!(names, expected[d], "{what}: shares of destination {d}");
        for (name, share, bytes) in got {
            let (shape, elem, data) = &reference[name];
            assert!(*bytes == cut(shape, *elem, data, *share), "{what}: {name} {share:?} on {d}");
            shares.push((d, name.clone()));
        }
    }
    shares.sort();
    ready.sort();
    assert_eq!(ready, shares, "{what}: ready once per share");
}

fn host_trial(dir: &tempfile::TempDir, seed: u64, parts: usize, chunk: usize) {
    let path = path_of(dir, &format!("m{seed}.safetensors"));
    write(&path, &model(seed, parts as u64), seed);
    let c = Checkpoint::open(&path).unwrap();
    let config = Config::default().chunk_bytes(chunk).buffered_chunk_bytes(chunk);
    let loader = Loader::new(config.staging_bytes(4 * chunk)).unwrap();
    for mode in MODES {
        let want = rule(mode, parts);
        let mut ready = Vec::new();
        let m = loader
            .load_placed(c.clone(), parts, &*want, |d, t| ready.push((d, t.name.clone())))
            .unwrap();
        let placed: Vec<Vec<(String, Share, Vec<u8>)>> = (0..parts)
            .map(|d| {
                m.tensors(d)
                    .map(|t| (t.entry.name.clone(), t.share.share, t.bytes.to_vec()))
                    .collect()
            })
            .collect();
        let what = format!("{mode}:{parts}, seed {seed}, chunk {chunk}");
        check(&path, &c, &*want, &placed, ready, &what);
        assert!(m.report().read_bytes <= c.total_bytes() + 4096, "{what}: read once");
    }
}

#[test]
fn host_shares_of_every_rule_match_the_reference() {
    let dir = scratch();
    for seed in 1..=6 {
        for parts in 1..=4 {
            host_trial(&dir, seed * 7 + parts as u64, parts, 4096);
        }
    }
    host_trial(&dir, 99, 4, 8192);
}

/// GPUs for `parts` destinations: every visible GPU in turn when there are several, GPU 0
/// named `parts` times when there is one. `None` (skipped, with the reason) without a GPU.
fn gpus(parts: usize) -> Option<(Gpu, Vec<Arc<CudaDevice>>)> {
    let first = gpu()?;
    let mut all = vec![Arc::clone(&first)];
    while let Ok(d) = CudaDevice::open(all.len() as u32) {
        all.push(d);
    }
    let list = (0..parts).map(|d| Arc::clone(&all[d % all.len()])).collect();
    Some((first, list))
}

fn gpu_trial(dir: &tempfile::TempDir, seed: u64, parts: usize, via: ReplicateVia) {
    let Some((_held, devices)) = gpus(parts) else { return };
    let path = path_of(dir, &format!("g{seed}.safetensors"));
    write(&path, &model(seed, parts as u64), seed);
    let c = Checkpoint::open(&path).unwrap();
    let config = Config::default().chunk_bytes(4096).buffered_chunk_bytes(4096);
    let loader = Loader::new(config.staging_bytes(16384).replicate_via(via)).unwrap();
    for mode in ["replicate"].into_iter().chain(MODES) {
        let want: Box<PlaceFn> = match mode {
            "replicate" => Box::new(move |t| placement::split(t, None, parts)),
            _ => rule(mode, parts),
        };
        let mut ready = Vec::new();
        let m = loader
            .load_placed_to_devices(c.clone(), &devices, &*want, |d, t| {
                ready.push((d, t.name.clone()))
            })
            .unwrap();
        let mut placed = Vec::new();
        for (d, device) in devices.iter().enumerate() {
            assert_eq!(m.device(d).ordinal(), device.ordinal());
            let mut shares = Vec::new();
            for t in m.tensors(d) {
                if t.share.len > 0 {
                    let on = CudaDevice::pointer_ordinal(t.ptr).unwrap();
                    assert_eq!(on, device.ordinal(), "{} of destination {d}", t.entry.name);
                }
                shares.push((t.entry.name.clone(), t.share.share, m.copy_to_host(d, &t).unwrap()));
            }
            placed.push(shares);
        }
        let what = format!("{mode}:{parts} on GPUs, {via:?}, seed {seed}");
        check(&path, &c, &*want, &placed, ready, &what);
    }
}

#[test]
fn gpu_shares_of_every_rule_match_the_reference() {
    let dir = scratch();
    for (seed, parts) in [(3, 1), (5, 2), (11, 3), (17, 4)] {
        gpu_trial(&dir, seed, parts, ReplicateVia::Host);
    }
}

#[test]
fn gpu_replication_over_peer_copies_matches_the_reference() {
    let dir = scratch();
    for (seed, parts) in [(23, 2), (29, 4)] {
        gpu_trial(&dir, seed, parts, ReplicateVia::Peer);
    }
}

/// A Llama-3-8B-shaped table (no bytes), one file, as the loader would see it.
fn llama_table() -> Checkpoint {
    let spec = gantry::synth::SynthSpec { shards: 1, ..gantry::synth::SynthSpec::LLAMA3_8B };
    let data_offset = 4096;
    let mut offset = data_offset;
    let tensors: Vec<TensorEntry> = spec
        .tensors()
        .into_iter()
        .map(|(name, shape)| {
            let len = 2 * shape.iter().product::<u64>();
            offset += len;
            TensorEntry {
                name,
                dtype: Dtype::BF16,
                shape,
                file: gantry::FileId(0),
                offset: offset - len,
                len,
            }
        })
        .collect();
    let header = gantry_format::Header {
        header_len: data_offset - 8,
        data_offset,
        data_len: offset - data_offset,
        metadata: None,
        tensors: Vec::new(),
    };
    let file = gantry::FileInfo {
        path: "model.safetensors".into(),
        file_len: offset,
        header,
        identity: None,
        version: None,
    };
    Checkpoint { files: vec![file], tensors, index_metadata: Default::default() }
}

/// Splitting by columns used to make one atom (one read step and one copy) per row: 3.27
/// million for this table. Atoms, deliveries and copies are now counted in tensors.
#[test]
fn planning_is_linear_in_tensors_not_rows() {
    let c = llama_table();
    let tensors = c.tensors.len();
    for mode in MODES {
        let want = rule(mode, 4);
        let layout = Layout::new(&c, 4, &*want).unwrap();
        let atoms = layout.atoms.len();
        assert!(atoms <= 4 * tensors, "{mode}: {atoms} atoms for {tensors} tensors");
        let deliveries: usize = layout.copies.iter().map(Vec::len).sum();
        assert!(deliveries <= 4 * tensors, "{mode}: {deliveries} deliveries");
        let wanted = vec![true; atoms];
        let files = [FilePlan { align: 4096, chunk_bytes: 64 << 20, whole: false }];
        let plan = Plan::new(&ReadSet::new(&c.files, &layout.atoms), &wanted, &files, 1 << 20);
        let places = layout.places(&[0; 4]);
        let mut pieces = 0;
        for s in &plan.steps {
            for p in &places[s.tensor] {
                let n = p.rows.pieces(s.target_offset, s.len).count();
                assert!(n <= 3, "{mode}: {n} pieces for one step and destination");
                pieces += n;
            }
        }
        // Each extent cuts at most one row per delivery, so pieces stay near the deliveries.
        let bound = 3 * (deliveries + 4 * plan.extents.len());
        assert!(pieces <= bound, "{mode}: {pieces} pieces (bound {bound})");
    }
}

#[test]
fn bad_rules_are_errors() {
    let dir = scratch();
    let path = path_of(&dir, "bad.safetensors");
    let tensors = vec![
        ("model.layers.0.self_attn.o_proj.weight".to_owned(), Dtype::BF16, vec![8, 6]),
        ("model.layers.0.mlp.down_proj.weight".to_owned(), Dtype::BF16, vec![8, 10]),
    ];
    write(&path, &tensors, 1);
    let c = Checkpoint::open(&path).unwrap();
    let loader = Loader::new(Config::default()).unwrap();
    // 10 columns of down_proj do not split in 4: an error naming the tensor and its shape.
    let tp = tensor_parallel(4);
    let e = loader.load_placed(c.clone(), 4, |t| tp.place(t), |_, _| {}).map(|_| ()).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("down_proj") && e.contains("[8, 10]") && e.contains("tp:4"), "{e}");
    // A caller's pattern that names a dimension the tensor lacks.
    let tp = tensor_parallel(2).with_rule("*.o_proj.weight", Split::Dim(2));
    let e = loader.load_placed(c.clone(), 2, |t| tp.place(t), |_, _| {}).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("o_proj"), "{e}");
    // Zero ranks, and a slice outside the tensor.
    let e = loader.load_placed(c.clone(), 0, |t| tensor_parallel(0).place(t), |_, _| {});
    assert!(e.is_err());
    let outside = |t: &TensorEntry| {
        let s = placement::Slice { dim: 1, start: 4, len: t.shape[1] };
        Ok(vec![(0, Share::Slice(s))])
    };
    let e = loader.load_placed(c, 1, outside, |_, _| {}).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
}
