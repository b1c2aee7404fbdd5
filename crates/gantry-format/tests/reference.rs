//! Random tensor sets serialized by the `safetensors` crate's own serializer, parsed by ours:
//! names, dtypes, shapes and offsets must match what the reference reports.

use std::collections::HashMap;
use std::path::Path;

use gantry_format::{parse_file_bytes, Dtype, PREFIX_BYTES};
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

const DTYPES: &[Dtype] = &[
    Dtype::BOOL,
    Dtype::U8,
    Dtype::I8,
    Dtype::F8_E4M3,
    Dtype::F8_E5M2,
    Dtype::I16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::F32,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
    Dtype::C64,
];

fn tensor_set() -> impl Strategy<Value = Vec<(String, Dtype, Vec<usize>)>> {
    let one = (
        "[a-z_.]{1,12}[0-9]{0,3}",
        proptest::sample::select(DTYPES),
        proptest::collection::vec(0usize..7, 0..4),
    );
    proptest::collection::vec(one, 0..24).prop_map(|v| {
        let mut seen = std::collections::HashSet::new();
        v.into_iter().filter(|(n, _, _)| seen.insert(n.clone())).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn matches_reference(set in tensor_set(), with_meta in any::<bool>()) {
        let data: Vec<Vec<u8>> = set
            .iter()
            .map(|(_, dtype, shape)| {
                let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
                (0..bytes).map(|i| (i * 31 + 7) as u8).collect()
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = set
            .iter()
            .zip(&data)
            .map(|((name, dtype, shape), d)| {
                (name.clone(), TensorView::new(*dtype, shape.clone(), d).unwrap())
            })
            .collect();
        let meta = with_meta.then(|| HashMap::from([("format".to_owned(), "pt".to_owned())]));
        let bytes = safetensors::serialize(views, meta.clone()).unwrap();

        let ours = parse_file_bytes(Path::new("random.safetensors"), &bytes).unwrap();
        let (n, reference) = SafeTensors::read_metadata(&bytes).unwrap();
        prop_assert_eq!(ours.header_len, n as u64);
        prop_assert_eq!(ours.data_offset, PREFIX_BYTES + n as u64);
        prop_assert_eq!(ours.data_len, reference.data_len() as u64);
        prop_assert_eq!(&ours.metadata, reference.metadata());
        // Zero-size tensors share offsets, and the reference orders those ties by hash order:
        // compare by name, and check our order separately.
        prop_assert_eq!(ours.tensors.len(), reference.offset_keys().len());
        prop_assert!(ours.tensors.windows(2).all(|w| w[0].offset <= w[1].offset));
        for t in &ours.tensors {
            let info = reference.info(&t.name).unwrap();
            prop_assert_eq!(t.dtype, info.dtype);
            prop_assert_eq!(t.shape.iter().map(|&d| d as usize).collect::<Vec<_>>(), info.shape.clone());
            prop_assert_eq!(t.offset, ours.data_offset + info.data_offsets.0 as u64);
            prop_assert_eq!(t.len, (info.data_offsets.1 - info.data_offsets.0) as u64);
        }
        // The tensor bytes at the offsets we report are the ones the reference hands out.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for t in &ours.tensors {
            let begin = t.offset as usize;
            prop_assert_eq!(&bytes[begin..begin + t.len as usize], st.tensor(&t.name).unwrap().data());
        }
    }
}
