//! Placed loads into host memory and onto GPUs: replicated and sharded across destinations,
//! every share compared with a slice cut element by element from a plain read of the file.
//! The GPU trials name the one GPU several times when that is all the machine has.

mod common;

use common::*;
use gantry::placement::{even, Share, Slice};
use gantry::{Checkpoint, Config, Dtype, Loader, TensorEntry};

/// Which destinations get what of a tensor.
type Rule = dyn Fn(&TensorEntry) -> Vec<(usize, Share)>;

fn checkpoint(dir: &tempfile::TempDir) -> Checkpoint {
    let tensors = vec![
        (Dtype::F32, vec![8, 12]),
        (Dtype::BF16, vec![4, 6, 10]),
        (Dtype::U8, vec![16]),
        (Dtype::I64, vec![2, 3]),
        (Dtype::F16, vec![0, 4]),
        (Dtype::F32, vec![]),
        (Dtype::BF16, vec![64, 40]),
    ];
    let a = path_of(dir, "a.safetensors");
    write_file(&a, &tensors, 1);
    Checkpoint::open(&a).unwrap()
}

/// Per destination, `(tensor name, share, bytes)` in the order the model lists them.
type Placed = Vec<Vec<(String, Share, Vec<u8>)>>;

fn host_shares(model: &gantry::PlacedModel) -> Placed {
    (0..model.devices())
        .map(|d| {
            model
                .tensors(d)
                .map(|t| (t.entry.name.clone(), t.share.share, t.bytes.to_vec()))
                .collect()
        })
        .collect()
}

fn device_shares(model: &gantry::PlacedDeviceModel) -> Placed {
    (0..model.devices())
        .map(|d| {
            model
                .tensors(d)
                .map(|t| (t.entry.name.clone(), t.share.share, model.copy_to_host(d, &t).unwrap()))
                .collect()
        })
        .collect()
}

/// Every destination holds exactly the shares `want` gives it, each equal to the reference
/// slice, and `ready` named each share exactly once.
fn check(c: &Checkpoint, placed: &Placed, want: &Rule, mut ready: Vec<(usize, String)>) {
    let mut shares: Vec<(usize, String)> = placed
        .iter()
        .enumerate()
        .flat_map(|(d, shares)| shares.iter().map(move |(name, _, _)| (d, name.clone())))
        .collect();
    shares.sort();
    ready.sort();
    assert_eq!(ready, shares, "ready once per share");
    for (device, shares) in placed.iter().enumerate() {
        let mut expected: Vec<(String, Share)> = c
            .tensors
            .iter()
            .flat_map(|t| {
                want(t).into_iter().filter(|(d, _)| *d == device).map(|(_, s)| (t.name.clone(), s))
            })
            .collect();
        for (name, share, bytes) in shares {
            let (want_name, want_share) = expected.remove(0);
            assert_eq!((name, *share), (&want_name, want_share));
            let t = c.tensors.iter().find(|t| &t.name == name).unwrap();
            assert!(
                *bytes == reference_slice(c, t, *share),
                "{name} on {device} ({share:?}) differs"
            );
        }
        assert!(expected.is_empty(), "missing on {device}: {expected:?}");
    }
}

/// The rules the trials place by, with the destinations each uses: replicated x3, rows split
/// in two (whole where rows do not split), columns split in two on four destinations plus a
/// fifth with every tensor whole, odd-sized 1-D tensors skipped.
fn rules() -> Vec<(usize, Box<Rule>)> {
    let replicated = |_: &TensorEntry| (0..3).map(|d| (d, Share::Whole)).collect::<Vec<_>>();
    let rows = |t: &TensorEntry| -> Vec<(usize, Share)> {
        match (0..2).map(|r| even(t, 0, 2, r).map(|s| (r as usize, Share::Slice(s)))).collect() {
            Ok(v) => v,
            Err(_) => vec![(0, Share::Whole), (1, Share::Whole)],
        }
    };
    let columns_and_whole = |t: &TensorEntry| -> Vec<(usize, Share)> {
        if t.shape.len() < 2 {
            return if t.len % 2 == 0 { vec![(4, Share::Whole)] } else { Vec::new() };
        }
        let mut v: Vec<(usize, Share)> = (0..4)
            .filter_map(|r| even(t, 1, 2, r % 2).ok().map(|s| (r as usize, Share::Slice(s))))
            .collect();
        v.push((4, Share::Whole));
        v
    };
    vec![(3, Box::new(replicated)), (2, Box::new(rows)), (5, Box::new(columns_and_whole))]
}

#[test]
fn replicated_and_sharded_shares_match_the_reference() {
    let dir = scratch();
    let ck = checkpoint(&dir);
    let total: u64 = ck.tensors.iter().map(|t| t.len).sum();
    let loader = Loader::new(Config::default().chunk_bytes(8192).staging_bytes(32768)).unwrap();
    for (devices, rule) in rules() {
        let mut ready = Vec::new();
        let model = loader
            .load_placed(
                ck.clone(),
                devices,
                |t| Ok(rule(t)),
                |d, t| ready.push((d, t.name.clone())),
            )
            .unwrap();
        check(&ck, &host_shares(&model), &*rule, ready);
        // Bytes several destinations want are read once.
        assert!(model.report().read_bytes <= total + 4096, "{}", model.report().read_bytes);
    }
}

#[test]
fn gpu_destinations_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let dir = scratch();
    let ck = checkpoint(&dir);
    let total: u64 = ck.tensors.iter().map(|t| t.len).sum();
    let loader = Loader::new(Config::default().chunk_bytes(8192).staging_bytes(32768)).unwrap();
    for (devices, rule) in rules() {
        let gpus = vec![std::sync::Arc::clone(&gpu); devices];
        let mut ready = Vec::new();
        let model = loader
            .load_placed_to_devices(
                ck.clone(),
                &gpus,
                |t| Ok(rule(t)),
                |d, t| ready.push((d, t.name.clone())),
            )
            .unwrap();
        check(&ck, &device_shares(&model), &*rule, ready);
        assert!(model.report().read_bytes <= total + 4096, "{}", model.report().read_bytes);
        for f in &model.report().files {
            assert_ne!(f.reader, Some(gantry::ReaderKind::Gds), "{}", f.reason);
        }
    }
    // A rank's rows alone, on the GPU: only its bytes are read.
    let big = ck.tensors.iter().find(|t| t.shape == [64, 40]).unwrap().clone();
    let rule = |t: &TensorEntry| -> gantry::Result<Vec<(usize, Share)>> {
        Ok(if t.name == big.name { vec![(0, Share::Slice(even(t, 0, 4, 3)?))] } else { Vec::new() })
    };
    let model = loader
        .load_placed_to_devices(ck.clone(), std::slice::from_ref(&*gpu), rule, |_, _| {})
        .unwrap();
    let share = model.tensor(0, &big.name).unwrap();
    let slice = Share::Slice(Slice { dim: 0, start: 48, len: 16 });
    assert!(model.copy_to_host(0, &share).unwrap() == reference_slice(&ck, &big, slice));
    assert_eq!(model.report().read_bytes, big.len / 4);
    // cuFile writes one device address per read: forcing it onto several destinations is an
    // error naming why, not a partial load.
    let gds = Loader::new(Config::default().path(gantry::PathChoice::Gds)).unwrap();
    let e = gds
        .load_placed_to_devices(
            ck.clone(),
            &[gpu.clone(), gpu.clone()],
            |_| Ok(vec![(0, Share::Whole), (1, Share::Whole)]),
            |_, _| {},
        )
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("several destinations"), "{e}");
    let e = loader.load_placed_to_devices(ck, &[], |_| Ok(Vec::new()), |_, _| {});
    assert!(e.map(|_| ()).unwrap_err().to_string().contains("at least one GPU"));
}

#[test]
fn a_rank_reads_only_its_rows() {
    let dir = scratch();
    let ck = checkpoint(&dir);
    let big = ck.tensors.iter().find(|t| t.shape == [64, 40]).unwrap().clone();
    let loader = Loader::new(Config::default().chunk_bytes(4096).staging_bytes(16384)).unwrap();
    // Rank 3 of 4 takes a quarter of the big tensor's rows and nothing else.
    let rule = |t: &TensorEntry| -> gantry::Result<Vec<(usize, Share)>> {
        Ok(if t.name == big.name { vec![(0, Share::Slice(even(t, 0, 4, 3)?))] } else { Vec::new() })
    };
    let model = loader.load_placed(ck.clone(), 1, rule, |_, _| {}).unwrap();
    let share = model.tensor(0, &big.name).unwrap();
    assert_eq!(share.share.shape, vec![16, 40]);
    let slice = Share::Slice(Slice { dim: 0, start: 48, len: 16 });
    assert!(share.bytes == reference_slice(&ck, &big, slice).as_slice());
    assert_eq!(model.report().read_bytes, big.len / 4, "only the rank's rows are read");
}

#[test]
fn bad_placements_are_errors() {
    let dir = scratch();
    let ck = checkpoint(&dir);
    let loader = Loader::new(Config::default()).unwrap();
    let outside = |t: &TensorEntry| -> gantry::Result<Vec<(usize, Share)>> {
        Ok(vec![(
            0,
            Share::Slice(Slice {
                dim: 0,
                start: 0,
                len: t.shape.first().copied().unwrap_or(0) + 1,
            }),
        )])
    };
    let e = loader.load_placed(ck.clone(), 1, outside, |_, _| {}).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    let e = loader.load_placed(ck.clone(), 2, |_| Ok(vec![(2, Share::Whole)]), |_, _| {});
    assert!(e.map(|_| ()).unwrap_err().to_string().contains("destination 2 of 2"));
    let uneven = |t: &TensorEntry| -> gantry::Result<Vec<(usize, Share)>> {
        Ok(vec![(0, Share::Slice(even(t, 0, 3, 0)?))])
    };
    let e = loader.load_placed(ck.clone(), 1, uneven, |_, _| {}).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("does not split into 3"), "{e}");
    // Each failure is a placement error naming the tensor and its shape as its header has them.
    let first = ck.tensors.first().unwrap().clone();
    let named = |t: &str, s: &[u64]| t == first.name && s == first.shape.as_slice();
    match loader.load_placed(ck, 1, uneven, |_, _| {}).map(|_| ()) {
        Err(gantry::Error::Placement { tensor, shape, .. }) if named(&tensor, &shape) => {}
        other => panic!("expected a placement error for {}: {other:?}", first.name),
    }
}
