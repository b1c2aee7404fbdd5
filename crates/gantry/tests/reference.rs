//! The engine against the reference reader: random layouts, file sizes, chunk sizes, queue
//! depths, both readers, subsets and caller-supplied destinations. Bytes must be identical.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use gantry::{Checkpoint, Config, Dtype, Loader, PathChoice};
use proptest::prelude::*;

const DTYPES: &[Dtype] =
    &[Dtype::U8, Dtype::BF16, Dtype::F32, Dtype::F64, Dtype::I16, Dtype::F8_E4M3];

fn layout() -> impl Strategy<Value = Vec<(Dtype, Vec<usize>)>> {
    let dims = prop_oneof![
        3 => proptest::collection::vec(1usize..40, 0..3),
        1 => proptest::collection::vec(100usize..3000, 1..3),
        1 => Just(vec![0usize, 7]),
    ];
    proptest::collection::vec((proptest::sample::select(DTYPES), dims), 0..30)
}

fn config(
    path: PathChoice,
    chunk_blocks: usize,
    staging_chunks: usize,
    queue_depth: usize,
) -> Config {
    Config::default()
        .path(path)
        .chunk_bytes(chunk_blocks * 4096)
        .staging_bytes(staging_chunks * chunk_blocks * 4096)
        .queue_depth(queue_depth)
        .threads(3)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn whole_checkpoint(
        tensors in layout(),
        chunk_blocks in 1usize..12,
        staging_chunks in 1usize..6,
        queue_depth in 1usize..9,
        direct in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dir = scratch();
        let path = path_of(&dir, "m.safetensors");
        write_file(&path, &tensors, seed);
        let choice = if direct { PathChoice::Direct } else { PathChoice::Buffered };
        let loader = Loader::new(config(choice, chunk_blocks, staging_chunks, queue_depth)).unwrap();
        let ready = AtomicUsize::new(0);
        let model = loader
            .load_with(Checkpoint::open(&path).unwrap(), |_| true, |r| {
                assert_eq!(r.bytes, reference(&Checkpoint::open(&path).unwrap(), r.entry).as_slice());
                ready.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        assert_matches_reference(&model, tensors.len());
        prop_assert_eq!(ready.load(Ordering::Relaxed), tensors.len(), "every tensor reported ready once");
        let reader = model.report().files[0].reader.map(|r| r.name());
        if !tensors.iter().all(|(d, s)| s.iter().product::<usize>() * d.bitsize() == 0) {
            prop_assert_eq!(reader, Some(if direct { "direct" } else { "buffered" }));
        }
    }

    #[test]
    fn subsets_and_caller_destinations(
        tensors in layout(),
        keep in proptest::collection::vec(any::<bool>(), 30),
        chunk_blocks in 1usize..6,
        direct in any::<bool>(),
        gap in 0u64..20_000,
        seed in any::<u64>(),
    ) {
        let dir = scratch();
        let path = path_of(&dir, "m.safetensors");
        write_file(&path, &tensors, seed);
        let checkpoint = Checkpoint::open(&path).unwrap();
        let choice = if direct { PathChoice::Direct } else { PathChoice::Buffered };
        let loader = Loader::new(config(choice, chunk_blocks, 3, 4).gap_bytes(gap)).unwrap();

        // A subset, into gantry's own buffers.
        let wanted = |t: &gantry::TensorEntry| keep[t.name[1..].parse::<usize>().unwrap()];
        let model = loader.load_with(checkpoint.clone(), wanted, |_| {}).unwrap();
        let expected = checkpoint.tensors.iter().filter(|t| wanted(t)).count();
        assert_matches_reference(&model, expected);

        // The same subset, into caller-supplied slices, poisoned first.
        let mut slots: Vec<Vec<u8>> = checkpoint.tensors.iter().map(|t| vec![0xA5; t.len as usize]).collect();
        let mut slices = slots.iter_mut();
        let mut ready = 0;
        loader
            .load_into(&checkpoint, |t| {
                let s = slices.next().unwrap();
                wanted(t).then_some(s.as_mut_slice())
            }, |_| ready += 1)
            .unwrap();
        prop_assert_eq!(ready, expected);
        for (t, got) in checkpoint.tensors.iter().zip(&slots) {
            if wanted(t) {
                prop_assert!(got == &reference(&checkpoint, t), "tensor {} differs", t.name);
            } else {
                prop_assert!(got.iter().all(|&b| b == 0xA5), "skipped tensor {} was written", t.name);
            }
        }
    }
}

#[test]
fn sharded_synthetic_checkpoint_both_readers() {
    let dir = scratch();
    let spec = gantry::synth::SynthSpec {
        vocab: 1000,
        hidden: 64,
        intermediate: 224,
        kv: 16,
        layers: 3,
        shards: 3,
    };
    let index = gantry::synth::write_checkpoint(dir.path(), &spec, 42).unwrap();
    for path in [PathChoice::Direct, PathChoice::Buffered, PathChoice::Auto] {
        let loader = Loader::new(
            Config::default().path(path).chunk_bytes(64 << 10).staging_bytes(256 << 10),
        )
        .unwrap();
        let model = loader.load(&index).unwrap();
        assert_eq!(model.checkpoint().files.len(), 3);
        assert_matches_reference(&model, spec.tensors().len());
        assert!(model.report().staging_bytes <= 256 << 10);
    }
}

#[test]
fn files_with_nothing_wanted_are_not_read() {
    let dir = scratch();
    let spec = gantry::synth::SynthSpec {
        vocab: 100,
        hidden: 64,
        intermediate: 224,
        kv: 16,
        layers: 2,
        shards: 2,
    };
    let index = gantry::synth::write_checkpoint(dir.path(), &spec, 1).unwrap();
    let checkpoint = Checkpoint::open(&index).unwrap();
    let loader = Loader::new(Config::default()).unwrap();
    let model = loader.load_with(checkpoint, |t| t.file.0 == 0, |_| {}).unwrap();
    let files = &model.report().files;
    assert!(files[0].reader.is_some() && files[0].read_bytes > 0);
    assert!(files[1].reader.is_none() && files[1].read_bytes == 0);
    assert_matches_reference(
        &model,
        model.checkpoint().tensors.iter().filter(|t| t.file.0 == 0).count(),
    );
}
