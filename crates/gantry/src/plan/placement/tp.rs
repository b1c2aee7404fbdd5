//! The tensor-parallel rule (`tp:N`): which weights are split along which dimension, by tensor
//! name, for the common decoder architectures (Llama, Mistral, Qwen2/Qwen3 and their MoE
//! variants, Mixtral).
//!
//! It follows Megatron-LM (Shoeybi et al., 2019, "Megatron-LM: Training Multi-Billion
//! Parameter Language Models Using Model Parallelism") as vLLM and SGLang implement it
//! (`vllm/model_executor/layers/linear.py`, `vocab_parallel_embedding.py`). A linear layer
//! stores its weight as `[out_features, in_features]`:
//!
//! - **column-parallel** layers split their output features, dimension 0 of the weight (and
//!   their bias): `q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`, Mixtral's experts
//!   `w1` and `w3`; the embedding and the LM head split the vocabulary, also dimension 0;
//! - **row-parallel** layers split their input features, dimension 1: `o_proj`, `down_proj`,
//!   Mixtral's experts `w2`; their bias is added once after the all-reduce, so it is
//!   replicated;
//! - everything else is **replicated**: norms (`input_layernorm`, `post_attention_layernorm`,
//!   `model.norm`, Qwen3's `q_norm`/`k_norm`), MoE routers (`block_sparse_moe.gate`,
//!   `mlp.gate`), and any tensor no pattern names.
//!
//! A tensor the rule splits whose dimension does not divide by N is an error naming it and its
//! shape, never a silent replica. `k_proj`/`v_proj` split by rows like `q_proj`: with more
//! ranks than key-value heads vLLM replicates those heads instead, which the rule cannot see
//! from names; a caller in that case adds its own pattern ([`TensorParallel::with_rule`]).

use gantry_format::TensorEntry;

use super::{even, Share};
use crate::error::{Error, Result};

/// How the rule treats one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Column-parallel (or vocabulary-parallel): split along dimension 0.
    Column,
    /// Row-parallel: split along dimension 1.
    Row,
    /// The whole tensor to every rank.
    Replicate,
    /// Split along this dimension.
    Dim(usize),
}

impl Split {
    /// The dimension split, `None` when replicated.
    pub fn dim(self) -> Option<usize> {
        match self {
            Split::Column => Some(0),
            Split::Row => Some(1),
            Split::Replicate => None,
            Split::Dim(d) => Some(d),
        }
    }
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "column" => Ok(Split::Column),
            "row" => Ok(Split::Row),
            "replicate" => Ok(Split::Replicate),
            _ => s
                .strip_prefix("dim")
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse().ok())
                .map(Split::Dim)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "'{}' is not a split (column, row, replicate, dimN)",
                        gantry_format::escape(s)
                    ))
                }),
        }
    }
}

/// The patterns of the default rule, first match wins (`*` matches any run of characters).
pub const DEFAULT_RULES: &[(&str, Split)] = &[
    // Attention: q/k/v column-parallel (with their biases, Qwen2 has them), o row-parallel.
    ("*.q_proj.weight", Split::Column),
    ("*.k_proj.weight", Split::Column),
    ("*.v_proj.weight", Split::Column),
    ("*.q_proj.bias", Split::Column),
    ("*.k_proj.bias", Split::Column),
    ("*.v_proj.bias", Split::Column),
    ("*.o_proj.weight", Split::Row),
    // MLP, dense and per expert (Qwen MoE names its experts' projections the same way).
    ("*.gate_proj.weight", Split::Column),
    ("*.up_proj.weight", Split::Column),
    ("*.gate_proj.bias", Split::Column),
    ("*.up_proj.bias", Split::Column),
    ("*.down_proj.weight", Split::Row),
    // Mixtral experts: w1 (gate) and w3 (up) column-parallel, w2 (down) row-parallel.
    ("*.experts.*.w1.weight", Split::Column),
    ("*.experts.*.w3.weight", Split::Column),
    ("*.experts.*.w2.weight", Split::Row),
    // Vocabulary-parallel embedding and LM head.
    ("*embed_tokens.weight", Split::Column),
    ("lm_head.weight", Split::Column),
];

/// The tensor-parallel rule over `parts` ranks, with [`DEFAULT_RULES`].
///
/// ```
/// use gantry::placement::{tensor_parallel, Split};
/// let tp = tensor_parallel(4);
/// assert_eq!(tp.split_of("model.layers.0.self_attn.q_proj.weight"), Split::Column);
/// assert_eq!(tp.split_of("model.layers.0.mlp.down_proj.weight"), Split::Row);
/// assert_eq!(tp.split_of("model.layers.0.input_layernorm.weight"), Split::Replicate);
/// // The caller's own patterns come first.
/// let mine = tensor_parallel(4).with_rule("*.my_adapter.weight", Split::Row);
/// assert_eq!(mine.split_of("model.layers.3.my_adapter.weight"), Split::Row);
/// ```
pub fn tensor_parallel(parts: usize) -> TensorParallel {
    TensorParallel { parts, rules: DEFAULT_RULES.iter().map(|&(p, s)| (p.to_owned(), s)).collect() }
}

/// A tensor-parallel rule: name patterns to splits, over `parts` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorParallel {
    parts: usize,
    rules: Vec<(String, Split)>,
}

impl TensorParallel {
    /// Adds a pattern ahead of the existing ones (so it wins over the defaults).
    pub fn with_rule(mut self, pattern: &str, split: Split) -> Self {
        self.rules.insert(0, (pattern.to_owned(), split));
        self
    }

    /// The rule with only the caller's patterns (everything unnamed is replicated).
    pub fn empty(parts: usize) -> Self {
        TensorParallel { parts, rules: Vec::new() }
    }

    /// Ranks.
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// How the tensor called `name` is split.
    pub fn split_of(&self, name: &str) -> Split {
        self.rules
            .iter()
            .find(|(pattern, _)| glob(pattern, name))
            .map_or(Split::Replicate, |&(_, s)| s)
    }

    /// The tensors among `entries` that no pattern names and that have two or more
    /// dimensions: they go whole to every rank by default, which for a weight matrix usually
    /// means a model whose names the rule does not know (its bytes copied `parts` times).
    /// Vectors (norms, biases) are left out: replicating them is what tensor parallelism does.
    pub fn unmatched<'a>(&self, entries: &'a [TensorEntry]) -> Vec<&'a TensorEntry> {
        entries
            .iter()
            .filter(|t| t.shape.len() >= 2)
            .filter(|t| !self.rules.iter().any(|(pattern, _)| glob(pattern, &t.name)))
            .collect()
    }

    /// Each rank's share of `entry`: an even slice along the rule's dimension, or the whole
    /// tensor; an error naming the tensor and its shape when that dimension does not divide.
    pub fn place(&self, entry: &TensorEntry) -> Result<Vec<(usize, Share)>> {
        let split = self.split_of(&entry.name);
        let Some(dim) = split.dim() else {
            return Ok((0..self.parts).map(|r| (r, Share::Whole)).collect());
        };
        let divides =
            entry.shape.get(dim).is_some_and(|&n| self.parts > 0 && n % self.parts as u64 == 0);
        if !divides {
            return Err(Error::placement(
                entry,
                format!(
                    "tp:{} splits it along dimension {dim} ({split:?}), which {}",
                    self.parts,
                    match entry.shape.get(dim) {
                        Some(n) => format!("has size {n}, not a multiple of {}", self.parts),
                        None => "it does not have".to_owned(),
                    }
                ),
            ));
        }
        (0..self.parts)
            .map(|r| Ok((r, Share::Slice(even(entry, dim, self.parts as u64, r as u64)?))))
            .collect()
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (dots included).
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and how much of the name it has taken.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_format::{Dtype, FileId};

    fn entry(name: &str, shape: &[u64]) -> TensorEntry {
        let len = shape.iter().product::<u64>() * 2;
        TensorEntry {
            name: name.into(),
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
            file: FileId(0),
            offset: 0,
            len,
        }
    }

    #[test]
    fn matrices_no_pattern_names_are_listed_and_vectors_are_not() {
        let entries = [
            entry("model.layers.0.self_attn.q_proj.weight", &[8, 8]),
            entry("model.layers.0.input_layernorm.weight", &[8]),
            entry("model.layers.0.attn.c_attn.weight", &[8, 24]),
            entry("transformer.wte.weight", &[32, 8]),
            entry("model.layers.0.mine.weight", &[8, 8]),
        ];
        let names = |tp: &TensorParallel| -> Vec<String> {
            tp.unmatched(&entries).iter().map(|t| t.name.clone()).collect()
        };
        let tp = tensor_parallel(2);
        assert_eq!(
            names(&tp),
            [
                "model.layers.0.attn.c_attn.weight",
                "transformer.wte.weight",
                "model.layers.0.mine.weight"
            ]
        );
        // A caller's pattern names a tensor, whatever its split (replicate included).
        let tp = tp
            .with_rule("*.mine.weight", Split::Replicate)
            .with_rule("*.c_attn.weight", Split::Column);
        assert_eq!(names(&tp), ["transformer.wte.weight"]);
    }

    #[test]
    fn globs() {
        for (pattern, name, want) in [
            ("*.q_proj.weight", "model.layers.0.self_attn.q_proj.weight", true),
            ("*.q_proj.weight", "model.layers.0.self_attn.q_proj.bias", false),
            ("*.experts.*.w1.weight", "model.layers.1.block_sparse_moe.experts.7.w1.weight", true),
            ("*.experts.*.w1.weight", "model.layers.1.block_sparse_moe.experts.7.w2.weight", false),
            ("lm_head.weight", "lm_head.weight", true),
            ("lm_head.weight", "model.lm_head.weight", false),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("", "x", false),
        ] {
            assert_eq!(glob(pattern, name), want, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn the_rule_by_architecture() {
        let tp = tensor_parallel(4);
        let l = "model.layers.3.";
        for (name, want) in [
            // Llama / Mistral
            ("model.embed_tokens.weight", Split::Column),
            ("lm_head.weight", Split::Column),
            ("model.norm.weight", Split::Replicate),
            ("self_attn.q_proj.weight", Split::Column),
            ("self_attn.k_proj.weight", Split::Column),
            ("self_attn.v_proj.weight", Split::Column),
            ("self_attn.o_proj.weight", Split::Row),
            ("mlp.gate_proj.weight", Split::Column),
            ("mlp.up_proj.weight", Split::Column),
            ("mlp.down_proj.weight", Split::Row),
            ("input_layernorm.weight", Split::Replicate),
            ("post_attention_layernorm.weight", Split::Replicate),
            // Qwen2 biases, Qwen3 q/k norms
            ("self_attn.q_proj.bias", Split::Column),
            ("self_attn.v_proj.bias", Split::Column),
            ("self_attn.o_proj.bias", Split::Replicate),
            ("self_attn.q_norm.weight", Split::Replicate),
            ("self_attn.k_norm.weight", Split::Replicate),
            // Mixtral
            ("block_sparse_moe.gate.weight", Split::Replicate),
            ("block_sparse_moe.experts.0.w1.weight", Split::Column),
            ("block_sparse_moe.experts.5.w3.weight", Split::Column),
            ("block_sparse_moe.experts.7.w2.weight", Split::Row),
            // Qwen MoE
            ("mlp.gate.weight", Split::Replicate),
            ("mlp.experts.12.gate_proj.weight", Split::Column),
            ("mlp.experts.12.down_proj.weight", Split::Row),
            ("mlp.shared_expert_gate.weight", Split::Replicate),
        ] {
            let name = if name.contains("embed")
                || name.starts_with("lm_head")
                || name.starts_with("model.")
            {
                name.to_owned()
            } else {
                format!("{l}{name}")
            };
            assert_eq!(tp.split_of(&name), want, "{name}");
        }
    }

    #[test]
    fn shares_and_errors() {
        let tp = tensor_parallel(2);
        let o = entry("model.layers.0.self_attn.o_proj.weight", &[8, 6]);
        let shares = tp.place(&o).unwrap();
        assert_eq!(shares.len(), 2);
        assert_eq!(shares[1].1, Share::Slice(super::super::Slice { dim: 1, start: 3, len: 3 }));
        let norm = entry("model.norm.weight", &[7]);
        assert_eq!(tp.place(&norm).unwrap(), vec![(0, Share::Whole), (1, Share::Whole)]);
        let odd = entry("model.layers.0.mlp.down_proj.weight", &[8, 7]);
        let e = tp.place(&odd).unwrap_err().to_string();
        assert!(
            e.contains("down_proj") && e.contains("[8, 7]") && e.contains("dimension 1"),
            "{e}"
        );
        let flat = entry("model.layers.0.mlp.down_proj.weight", &[8]);
        assert!(tp.place(&flat).unwrap_err().to_string().contains("does not have"));
        let custom = tensor_parallel(2).with_rule("model.norm.weight", Split::Column);
        assert!(custom.place(&norm).is_err(), "7 rows do not split in 2");
        assert_eq!("dim2".parse::<Split>().unwrap(), Split::Dim(2));
        assert!("sideways".parse::<Split>().is_err());
        assert_eq!(TensorParallel::empty(3).split_of("lm_head.weight"), Split::Replicate);
    }
}
