//! A sharded checkpoint's `model.safetensors.index.json`: `weight_map` from tensor name to
//! shard file, and the optional `metadata` object.
//!
//! Parsing is pure (bytes in, map out) so it can be fuzzed; checking the map against the
//! shards' own headers happens in `checkpoint`, which has read them.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::Value;

use crate::error::{ErrorKind, FormatError};
use crate::header::parse_entries;
use crate::open::normalize_shard;

/// Largest index file read, so a hostile file cannot make us allocate without bound.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

/// A parsed index: the shards in first-mention order and, per shard, its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The `metadata` object, when present (values kept as JSON text for non-strings).
    pub metadata: BTreeMap<String, String>,
    /// Shard file names relative to the index's directory, in name order.
    pub shards: Vec<String>,
    /// `(tensor, shard position in shards)` in the order the index lists them.
    pub weight_map: Vec<(String, usize)>,
}

impl Index {
    /// The error for shard `position` not existing, naming a tensor the index maps to it.
    pub fn missing_shard(&self, index_path: &Path, position: usize) -> FormatError {
        let tensor = self
            .weight_map
            .iter()
            .find(|(_, s)| *s == position)
            .map(|(t, _)| t.clone())
            .unwrap_or_default();
        let shard = self.shards[position].clone();
        FormatError::new(index_path, ErrorKind::MissingShard { shard, tensor })
    }
}

/// Parses an index file's bytes. `path` is used in errors only.
pub fn parse_index(path: &Path, bytes: &[u8]) -> Result<Index, FormatError> {
    let bad = |message: String| FormatError::new(path, ErrorKind::BadIndex { message });
    let text = std::str::from_utf8(bytes)
        .map_err(|e| bad(format!("not UTF-8 at byte {}", e.valid_up_to())))?;
    let raw: RawIndex<'_> = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let metadata = match raw.metadata {
        Some(value) => metadata_strings(value).map_err(bad)?,
        None => BTreeMap::new(),
    };
    let Some(weight_map) = raw.weight_map else {
        return Err(bad("no \"weight_map\" object".to_owned()));
    };
    // The duplicate-keeping visitor: a plain JSON map would keep only the last of two
    // entries for the same tensor.
    let map_entries =
        parse_entries(weight_map.get()).map_err(|e| bad(format!("\"weight_map\": {e}")))?;
    let mut shards: Vec<String> = Vec::new();
    let mut seen = HashSet::with_capacity(map_entries.len());
    let mut weights = Vec::with_capacity(map_entries.len());
    for (tensor, shard) in map_entries {
        let Ok(shard) = serde_json::from_str::<String>(shard.get()) else {
            return Err(bad(format!("weight_map['{tensor}'] is not a string")));
        };
        if !seen.insert(tensor.clone()) {
            return Err(bad(format!("tensor '{tensor}' appears twice in weight_map")));
        }
        // `a.safetensors` and `./a.safetensors` are one shard.
        let Some(shard) = normalize_shard(&shard) else {
            let kind = ErrorKind::ShardOutsideDirectory { shard, resolved: None };
            return Err(FormatError::new(path, kind));
        };
        let position = match shards.iter().position(|s| *s == shard) {
            Some(p) => p,
            None => {
                shards.push(shard);
                shards.len() - 1
            }
        };
        weights.push((tensor, position));
    }
    if weights.is_empty() {
        return Err(bad("\"weight_map\" is empty: the index names no tensor".to_owned()));
    }
    // Shards in name order (model-00001-of-00004 first), whatever order the map lists them in.
    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.sort_by(|&a, &b| shards[a].cmp(&shards[b]));
    let mut rank = vec![0; shards.len()];
    for (new, &old) in order.iter().enumerate() {
        rank[old] = new;
    }
    let shards = order.iter().map(|&i| shards[i].clone()).collect();
    let weight_map = weights.into_iter().map(|(t, s)| (t, rank[s])).collect();
    Ok(Index { metadata, shards, weight_map })
}

#[derive(serde::Deserialize)]
struct RawIndex<'a> {
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(borrow, default)]
    weight_map: Option<&'a serde_json::value::RawValue>,
}

fn metadata_strings(value: Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = value else {
        return Err("\"metadata\" is not an object".to_owned());
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}
