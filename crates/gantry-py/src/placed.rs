//! Placed loads from Python: a checkpoint read once and placed across several destinations
//! (host memory or GPUs), replicated, split along a dimension, or by the tensor-parallel rule
//! (`tp:N`). Each destination's shares come back as tensors over one buffer of its own, freed
//! when the last of them is released.

use std::sync::Arc;

use gantry::placement::{self, Placement, ShardSpec, Share, Split};
use gantry::{Loader, TensorEntry};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::dlpack::{DEVICE_CPU, DEVICE_CUDA};
use crate::memory::Memory;
use crate::stream::{open_device, parse_config, parse_device, Tensor};
use crate::to_py;

/// A `shard` rule (`replicate:N`, `dimK:N` or `tp:N`, see [`ShardSpec`]) with the caller's
/// tensor-parallel patterns, as a placement, and its number of destinations.
fn parse_rule(shard: &str, tp_rules: &[(String, String)]) -> PyResult<(Placement, usize)> {
    let spec = parse_shard(shard)?;
    let rules = tp_rules
        .iter()
        .map(|(pattern, split)| Ok((pattern.clone(), split.parse::<Split>()?)))
        .collect::<gantry::Result<Vec<_>>>()
        .map_err(to_py)?;
    Ok((spec.placement(&rules).map_err(to_py)?, spec.parts))
}

/// `shard` parsed; a `ValueError` for text that is not a rule (or a count past the bound).
fn parse_shard(shard: &str) -> PyResult<ShardSpec> {
    shard.parse().map_err(|e: gantry::Error| PyValueError::new_err(e.to_string()))
}

/// The number of destinations of a `shard` rule (a `ValueError` for a rule that is not one),
/// so that the Python layer never builds a list from an unchecked count.
#[pyfunction]
pub fn shard_destinations(shard: &str) -> PyResult<usize> {
    crate::guarded(|| Ok(parse_shard(shard)?.parts))
}

/// One destination's shares: `(name, Tensor)` in checkpoint order.
type Shares = Vec<(String, Tensor)>;

/// Loads `source` across `devices` (all `"cpu"`, or all GPUs; a GPU may be named more than
/// once) by `shard`; returns each destination's shares.
#[pyfunction]
#[pyo3(signature = (source, devices, shard, config = None, tp_rules = None))]
pub fn load_placed(
    py: Python<'_>,
    source: std::path::PathBuf,
    devices: Vec<String>,
    shard: &str,
    config: Option<&Bound<'_, PyDict>>,
    tp_rules: Option<Vec<(String, String)>>,
) -> PyResult<Vec<Shares>> {
    crate::guarded(|| placed(py, &source, &devices, shard, config, tp_rules))
}

fn placed(
    py: Python<'_>,
    source: &std::path::Path,
    devices: &[String],
    shard: &str,
    config: Option<&Bound<'_, PyDict>>,
    tp_rules: Option<Vec<(String, String)>>,
) -> PyResult<Vec<Shares>> {
    let (rule, n) = parse_rule(shard, &tp_rules.unwrap_or_default())?;
    let ordinals = devices.iter().map(|d| parse_device(d)).collect::<PyResult<Vec<_>>>()?;
    if ordinals.len() != n {
        return Err(PyValueError::new_err(format!(
            "shard {shard:?} places across {n} destinations but devices names {}",
            ordinals.len()
        )));
    }
    let gpus: Option<Vec<u32>> = ordinals.iter().copied().collect();
    if gpus.is_none() && ordinals.iter().any(Option::is_some) {
        return Err(PyValueError::new_err("devices are either all 'cpu' or all GPUs"));
    }
    let config = parse_config(config)?;
    let place = move |t: &TensorEntry| -> gantry::Result<Vec<(usize, Share)>> { rule(t) };
    py.detach(|| -> gantry::Result<Vec<Shares>> {
        let loader = Loader::new(config)?;
        let checkpoint = gantry::open_with(source, loader.config())?;
        match gpus {
            Some(gpus) => {
                let devices =
                    gpus.iter().map(|&g| open_device(g)).collect::<gantry::Result<Vec<_>>>()?;
                let model =
                    loader.load_placed_to_devices(checkpoint, &devices, place, |_, _| {})?;
                let (checkpoint, shares, buffers, _) = model.into_parts();
                let memory = buffers.into_iter().map(|b| Arc::new(Memory::device(b))).collect();
                let ids = gpus.iter().map(|&g| (DEVICE_CUDA, g as i32)).collect();
                Ok(tensors(&checkpoint.tensors, shares, memory, ids))
            }
            None => {
                let model = loader.load_placed(checkpoint, n, place, |_, _| {})?;
                let (checkpoint, shares, buffers, _) = model.into_parts();
                let memory = buffers
                    .into_iter()
                    .map(|mut b| {
                        let m = Memory::host(&mut b);
                        m.keep(b);
                        Arc::new(m)
                    })
                    .collect();
                Ok(tensors(&checkpoint.tensors, shares, memory, vec![(DEVICE_CPU, 0); n]))
            }
        }
    })
    .map_err(to_py)
}

/// One rank of a cooperative load of shares (`shard` over `world` ranks): rank `rank` on
/// GPU `device` joins the NCCL communicator of `unique_id` (hex), or reads its shares on its
/// own for `alone` (the reason); returns its shares and the report's cooperative part.
#[pyfunction]
#[pyo3(signature = (source, device, shard, rank, world, unique_id, alone, config = None, tp_rules = None, window_mib = None))]
#[allow(clippy::too_many_arguments)]
pub fn load_cooperative_placed(
    py: Python<'_>,
    source: std::path::PathBuf,
    device: &str,
    shard: &str,
    rank: usize,
    world: usize,
    unique_id: Option<String>,
    alone: Option<String>,
    config: Option<&Bound<'_, PyDict>>,
    tp_rules: Option<Vec<(String, String)>>,
    window_mib: Option<u64>,
) -> PyResult<(Shares, bool, String)> {
    crate::guarded(|| {
        let window_bytes = window_mib.map(crate::stream::window_bytes).transpose()?;
        let (rule, n) = parse_rule(shard, &tp_rules.unwrap_or_default())?;
        if n != world {
            return Err(PyValueError::new_err(format!(
                "shard {shard:?} places across {n} ranks but world is {world}"
            )));
        }
        if rank >= world {
            return Err(crate::ConfigError::new_err(format!(
                "rank {rank} of world {world}: a rank is 0 to world - 1"
            )));
        }
        let coop = (rank, world, unique_id, alone);
        cooperative_placed(py, &source, device, coop, (rule, window_bytes), config)
    })
}

/// A rank, its world, the NCCL unique id (hex) or why it reads alone.
type RankOf = (usize, usize, Option<String>, Option<String>);

fn cooperative_placed(
    py: Python<'_>,
    source: &std::path::Path,
    device: &str,
    (rank, world, unique_id, alone): RankOf,
    (rule, window_bytes): (Placement, Option<u64>),
    config: Option<&Bound<'_, PyDict>>,
) -> PyResult<(Shares, bool, String)> {
    let Some(ordinal) = parse_device(device)? else {
        return Err(PyValueError::new_err("a cooperative load of shares needs a GPU device"));
    };
    let config = parse_config(config)?;
    let place = move |t: &TensorEntry| -> gantry::Result<Vec<(usize, Share)>> { rule(t) };
    py.detach(|| -> gantry::Result<(Shares, bool, String)> {
        use gantry::coop::{Communicator, Cooperation, UniqueId};
        let loader = Loader::new(config)?;
        let checkpoint = gantry::open_with(source, loader.config())?;
        let gpu = open_device(ordinal)?;
        let comm = match &unique_id {
            Some(hex) => {
                let nccl = gantry::coop::load_nccl()
                    .map_err(|reason| gantry::Error::Unavailable { what: "NCCL", reason })?;
                let id = UniqueId::from_hex(hex)?;
                let timeout = gantry::coop::comm::TIMEOUT;
                Some(Communicator::init(nccl, &id, rank, world, &gpu, timeout)?)
            }
            None => None,
        };
        let coop = match &comm {
            Some(c) => Cooperation::nccl(c),
            None => Cooperation::alone(rank, world, alone.unwrap_or_else(|| "no unique id".into())),
        };
        let coop = match window_bytes {
            Some(bytes) => coop.window_bytes(bytes),
            None => coop,
        };
        let done = loader.load_cooperative_placed(checkpoint, &gpu, coop, place, |_| {})?;
        let (checkpoint, shares, buffers, _) = done.model.into_parts();
        let memory = buffers.into_iter().map(|b| Arc::new(Memory::device(b))).collect();
        let ids = vec![(DEVICE_CUDA, ordinal as i32)];
        let mine = tensors(&checkpoint.tensors, shares, memory, ids).pop().unwrap_or_default();
        Ok((mine, done.coop.cooperative, done.coop.reason))
    })
    .map_err(to_py)
}

fn tensors(
    table: &[TensorEntry],
    shares: Vec<Vec<placement::ShareEntry>>,
    memory: Vec<Arc<Memory>>,
    ids: Vec<(i32, i32)>,
) -> Vec<Shares> {
    shares
        .into_iter()
        .zip(memory)
        .zip(ids)
        .map(|((shares, memory), id)| {
            shares
                .into_iter()
                .map(|s| {
                    let t = &table[s.tensor];
                    let at = (memory.base() + s.offset, s.len as usize);
                    let tensor =
                        Tensor::new(t.name.clone(), t.dtype, s.shape, at, id, Arc::clone(&memory));
                    (t.name.clone(), tensor)
                })
                .collect()
        })
        .collect()
}
