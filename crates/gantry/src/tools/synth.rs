//! Synthetic checkpoints shaped like Llama-3 (embeddings, attention and MLP projections,
//! norms; bf16; sharded with an index), for the demo, the benches and the tests. Bytes are
//! pseudo-random, never zeros, so that a loader that skips a write cannot pass a check.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Dimensions of a Llama-like decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthSpec {
    /// Vocabulary size.
    pub vocab: u64,
    /// Hidden size.
    pub hidden: u64,
    /// MLP size.
    pub intermediate: u64,
    /// Width of the key and value projections (kv heads x head dim).
    pub kv: u64,
    /// Decoder layers.
    pub layers: u64,
    /// Number of shard files.
    pub shards: usize,
}

impl SynthSpec {
    /// Llama-3-8B's shapes: 16.06 GB in bf16, 4 shards.
    pub const LLAMA3_8B: SynthSpec = SynthSpec {
        vocab: 128_256,
        hidden: 4096,
        intermediate: 14_336,
        kv: 1024,
        layers: 32,
        shards: 4,
    };

    /// Llama-3 proportions scaled so the checkpoint is close to `bytes`.
    pub fn for_bytes(bytes: u64) -> Self {
        let params = bytes as f64 / 2.0;
        let (layers, vocab) = (32u64, if bytes >= 2 << 30 { 128_256 } else { 32_000 });
        // params = 2 * vocab * h + layers * 13 * h^2 (q, o: h^2; k, v: h^2/4; MLP: 3 x 3.5 h^2).
        let (a, b) = (13.0 * layers as f64, 2.0 * vocab as f64);
        let h = ((-b + (b * b + 4.0 * a * params).sqrt()) / (2.0 * a)).max(64.0);
        let hidden = ((h / 64.0).round() as u64).max(1) * 64;
        let shards = (bytes.div_ceil(5_000_000_000) as usize).max(2);
        SynthSpec { vocab, hidden, intermediate: hidden * 7 / 2, kv: hidden / 4, layers, shards }
    }

    /// Every tensor as (name, shape), in the order Hugging Face writes them.
    pub fn tensors(&self) -> Vec<(String, Vec<u64>)> {
        let (h, i, kv) = (self.hidden, self.intermediate, self.kv);
        let mut t = vec![("model.embed_tokens.weight".to_owned(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        t.push(("model.norm.weight".to_owned(), vec![h]));
        t.push(("lm_head.weight".to_owned(), vec![self.vocab, h]));
        t
    }

    /// Total tensor bytes (bf16).
    pub fn total_bytes(&self) -> u64 {
        self.tensors().iter().map(|(_, s)| 2 * s.iter().product::<u64>()).sum()
    }
}

/// Writes the checkpoint of `spec` into `dir` (shards and `model.safetensors.index.json`),
/// unless a complete one of the same spec is already there. Returns the index path.
pub fn write_checkpoint(dir: &Path, spec: &SynthSpec, seed: u64) -> Result<PathBuf> {
    let io = |what: &'static str| move |source| Error::Resource { what, source };
    let index_path = dir.join(gantry_format::INDEX_FILE_NAME);
    let stamp = dir.join(".gantry-synth");
    let stamp_text = format!("{spec:?} seed={seed}\n");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text) && index_path.is_file() {
        return Ok(index_path);
    }
    fs::create_dir_all(dir).map_err(io("creating the checkpoint directory"))?;
    let _ = fs::remove_file(&stamp);
    let tensors = spec.tensors();
    let total = spec.total_bytes();
    let per_shard = total.div_ceil(spec.shards as u64);
    let mut weight_map = BTreeMap::new();
    let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut start = 0;
    for shard in 0..spec.shards {
        let mut end = start;
        let mut bytes = 0;
        while end < tensors.len() && (bytes < per_shard || shard == spec.shards - 1) {
            bytes += 2 * tensors[end].1.iter().product::<u64>();
            end += 1;
        }
        let name = format!("model-{:05}-of-{:05}.safetensors", shard + 1, spec.shards);
        write_shard(&dir.join(&name), &tensors[start..end], &mut rng)
            .map_err(io("writing a synthetic shard"))?;
        for (t, _) in &tensors[start..end] {
            weight_map.insert(t.clone(), name.clone());
        }
        start = end;
    }
    let index = format!(
        "{{\"metadata\":{{\"total_size\":{total}}},\"weight_map\":{{{}}}}}\n",
        weight_map.iter().map(|(t, s)| format!("\"{t}\":\"{s}\"")).collect::<Vec<_>>().join(",")
    );
    fs::write(&index_path, index).map_err(io("writing the index"))?;
    fs::write(&stamp, stamp_text).map_err(io("writing the checkpoint stamp"))?;
    Ok(index_path)
}

/// Writes one safetensors file of bf16 tensors with pseudo-random bytes.
pub fn write_shard(
    path: &Path,
    tensors: &[(String, Vec<u64>)],
    rng: &mut u64,
) -> std::io::Result<()> {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let len = 2 * shape.iter().product::<u64>();
        let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
        header += &format!(
            ",\"{name}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            shape.join(","),
            offset + len
        );
        offset += len;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let tmp = path.with_extension("partial");
    let mut out = BufWriter::with_capacity(8 << 20, File::create(&tmp)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    let mut block = vec![0u8; 4 << 20];
    let mut left = offset;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        fill_random(&mut block[..n], rng);
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::rename(&tmp, path)
}

/// Fills `buf` from a splitmix64 stream.
pub fn fill_random(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_8b_is_16_gb() {
        assert_eq!(SynthSpec::LLAMA3_8B.total_bytes(), 16_060_522_496);
        assert_eq!(SynthSpec::LLAMA3_8B.tensors().len(), 291);
    }

    #[test]
    fn scaled_specs_are_close_to_their_target() {
        for gib in [1u64, 4, 16] {
            let target = gib << 30;
            let got = SynthSpec::for_bytes(target).total_bytes() as f64;
            assert!((got / target as f64 - 1.0).abs() < 0.1, "{gib} GiB -> {got}");
        }
    }
}
