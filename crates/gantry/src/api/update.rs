//! In-place updates: a source (a live `unix://` source, or files and object URLs) copied into
//! tensors the caller already holds, host byte buffers or device pointers, named like the
//! source's tensors. A serving engine refits its weights this way without reallocating.
//!
//! Everything is checked before any byte moves: every target names a tensor of the source
//! with the same dtype and shape (and, on the host, a buffer of its length), no name twice, no
//! two device targets sharing a byte, and every tensor of the source has a target unless the
//! caller asked to ignore the rest ([`UpdateOptions::ignore_extra`]). The copy itself is an ordinary load into the caller's
//! memory ([`Loader::load_into`], [`Loader::load_into_device`]), so it reads, places and
//! reports like any other.
//!
//! With [`UpdateOptions::changed_only`], only tensors whose digest changed move. The source's
//! digest is a live source's published table (XXH3-64 per tensor): `changed_only` needs a live
//! source, since for files the only way to know a tensor's digest is to read it, which is the
//! cost it is meant to save. The destination's digest is, on the host, XXH3-64 of its bytes,
//! hashed on all cores; on a device, the digest gantry recorded when an update last wrote that
//! exact range (device, address, length) from a live source. That record is process-wide and
//! knows only gantry's own updates: a caller who writes into the weights itself (an optimizer
//! step, a load that is not an update, memory freed and allocated again at the same address)
//! must pass `changed_only = false`, which moves every tensor and records their digests anew.
//! An update that fails forgets the ranges it was writing, so they move next time.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use gantry_format::{Checkpoint, Dtype};
use parking_lot::Mutex;

use crate::api::loader::{LoadReport, Loader};
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::source::live;

/// A host tensor to update: its name in the source, dtype and shape (checked against the
/// source's), and its bytes, overwritten in place.
#[derive(Debug)]
pub struct HostTarget<'a> {
    /// The tensor's name in the source.
    pub name: &'a str,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'a [u64],
    /// Its bytes: exactly the tensor's length.
    pub bytes: &'a mut [u8],
}

/// A device tensor to update: its name, dtype and shape, and the device address of its first
/// byte (memory of at least the tensor's length in the device's primary context).
#[derive(Debug, Clone, Copy)]
pub struct DeviceTarget<'a> {
    /// The tensor's name in the source.
    pub name: &'a str,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'a [u64],
    /// Device address of its first byte.
    pub ptr: u64,
}

/// The caller's tensors an update writes into.
#[derive(Debug)]
pub enum Targets<'a> {
    /// Host memory.
    Host(Vec<HostTarget<'a>>),
    /// Memory on one GPU.
    Device(Arc<CudaDevice>, Vec<DeviceTarget<'a>>),
}

/// How an update chooses what moves.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpdateOptions {
    /// Move only tensors whose digest differs from the destination's (needs a live source;
    /// see the module docs for what a device destination's digest is).
    pub changed_only: bool,
    /// Tensors of the source without a target are left out instead of being an error.
    pub ignore_extra: bool,
}

/// What an update did.
#[derive(Debug, Clone, Default)]
pub struct UpdateReport {
    /// Tensors copied into their targets.
    pub moved_tensors: usize,
    /// Their bytes.
    pub moved_bytes: u64,
    /// Tensors left as they were (their digest had not changed).
    pub skipped_tensors: usize,
    /// Their bytes.
    pub skipped_bytes: u64,
    /// Tensors of the source without a target, left out ([`UpdateOptions::ignore_extra`]).
    pub ignored_tensors: usize,
    /// The publication version read (live sources).
    pub version: Option<String>,
    /// The load that moved the bytes (`None` when nothing moved).
    pub load: Option<LoadReport>,
}

/// Held for the whole of a device update ([`Loader::update`] onto a GPU).
static DEVICE_UPDATES: Mutex<()> = parking_lot::const_mutex(());

/// The digest last written by an update at each device range: (ordinal, address) -> (length,
/// digest). Ranges never overlap: writing a range first drops every record it touches.
static DEVICE_DIGESTS: Mutex<BTreeMap<(u32, u64), (u64, u64)>> =
    parking_lot::const_mutex(BTreeMap::new());

/// Drops the records of every range that overlaps `ptr..ptr + len` on device `ordinal`.
fn forget(records: &mut BTreeMap<(u32, u64), (u64, u64)>, ordinal: u32, ptr: u64, len: u64) {
    let end = ptr.saturating_add(len.max(1));
    let mut touched: Vec<(u32, u64)> =
        records.range((ordinal, ptr)..(ordinal, end)).map(|(&key, _)| key).collect();
    if let Some((&key, &(l, _))) = records.range(..(ordinal, ptr)).next_back() {
        if key.0 == ordinal && key.1.saturating_add(l) > ptr {
            touched.push(key);
        }
    }
    for key in touched {
        records.remove(&key);
    }
}

/// The digest recorded for exactly `ptr..ptr + len` on device `ordinal`.
fn recorded(ordinal: u32, ptr: u64, len: u64) -> Option<u64> {
    match DEVICE_DIGESTS.lock().get(&(ordinal, ptr)) {
        Some(&(l, digest)) if l == len => Some(digest),
        _ => None,
    }
}

/// Every two of `ranges` (address, length, tensor name) are disjoint; else an error naming
/// both tensors. Overlapping device targets (tied weights, a view inside another) would take
/// two tensors' bytes in an undefined order, and the digest recorded for one would then vouch
/// for bytes the other wrote; overlapping host targets would be two mutable borrows of the same
/// bytes (a binding that makes `HostTarget`s from raw memory checks with this first).
pub fn check_disjoint(mut ranges: Vec<(u64, u64, &str)>) -> Result<()> {
    ranges.retain(|&(_, len, _)| len > 0);
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((a, a_len, a_name), (b, _, b_name)) = (pair[0], pair[1]);
        if a.saturating_add(a_len) > b {
            return Err(Error::Destination {
                tensor: b_name.to_owned(),
                message: format!(
                    "its target at {b:#x} overlaps the target of '{a_name}' ({a_len} bytes at \
                     {a:#x}): tied weights take one target (ignore the other tensor)"
                ),
            });
        }
    }
    Ok(())
}

/// A target's name, dtype and shape, whichever memory it is in.
struct Spec<'a> {
    name: &'a str,
    dtype: Dtype,
    shape: &'a [u64],
}

/// For each tensor of `checkpoint`, the index of its target, or `None` (ignored); every
/// mismatch is an error naming the tensor.
fn match_targets(
    checkpoint: &Checkpoint,
    specs: &[Spec<'_>],
    ignore_extra: bool,
) -> Result<Vec<Option<usize>>> {
    let bad = |tensor: &str, message: String| Error::Destination { tensor: tensor.into(), message };
    let mut by_name = HashMap::with_capacity(specs.len());
    for (j, spec) in specs.iter().enumerate() {
        if by_name.insert(spec.name, j).is_some() {
            return Err(bad(spec.name, "two targets of the update have this name".into()));
        }
    }
    let mut matched = vec![None; checkpoint.tensors.len()];
    for (i, t) in checkpoint.tensors.iter().enumerate() {
        let Some(j) = by_name.remove(t.name.as_str()) else {
            if ignore_extra {
                continue;
            }
            return Err(bad(
                &t.name,
                "in the source, but the update has no target for it (ignore tensors without a \
                 target to leave them out)"
                    .into(),
            ));
        };
        let spec = &specs[j];
        if spec.dtype != t.dtype || spec.shape != t.shape.as_slice() {
            return Err(bad(
                &t.name,
                format!(
                    "the target is {} {:?}, the source has {} {:?}",
                    spec.dtype, spec.shape, t.dtype, t.shape
                ),
            ));
        }
        matched[i] = Some(j);
    }
    if let Some(j) = by_name.into_values().min() {
        return Err(bad(specs[j].name, "a target of the update, but not in the source".into()));
    }
    Ok(matched)
}

impl Loader {
    /// Copies `source` (a live `unix://` source, or any checkpoint path or URL) into the
    /// caller's existing tensors, `targets`, by name; see [`UpdateOptions`] and the README for the
    /// checks (all made before any byte moves) and for `changed_only`.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let spec = gantry::synth::SynthSpec { vocab: 64, hidden: 64, intermediate: 224, kv: 16, layers: 1, shards: 1 };
    /// # gantry::synth::write_checkpoint(dir.path(), &spec, 0)?;
    /// use gantry::{HostTarget, Targets, UpdateOptions};
    /// let loader = gantry::Loader::new(gantry::Config::default())?;
    /// let table = gantry::open(dir.path())?;
    /// // The engine's own parameters, allocated once.
    /// let mut params: Vec<Vec<u8>> = table.tensors.iter().map(|t| vec![0; t.len as usize]).collect();
    /// let targets = table.tensors.iter().zip(&mut params).map(|(t, p)| HostTarget {
    ///     name: &t.name, dtype: t.dtype, shape: &t.shape, bytes: p.as_mut_slice(),
    /// });
    /// let report = loader.update(dir.path(), Targets::Host(targets.collect()), &UpdateOptions::default())?;
    /// assert_eq!(report.moved_bytes, table.total_bytes());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn update(
        &self,
        source: impl AsRef<Path>,
        targets: Targets<'_>,
        options: &UpdateOptions,
    ) -> Result<UpdateReport> {
        let source = source.as_ref();
        let checkpoint = crate::open_with(source, self.config())?;
        let version = live::version_of(&checkpoint);
        if options.changed_only && version.is_none() {
            return Err(Error::Config(format!(
                "{}: changed_only needs a live source (unix:///path), whose digest table says \
                 what changed; update from files with changed_only off",
                source.display()
            )));
        }
        match targets {
            Targets::Host(targets) => self.update_host(&checkpoint, targets, options, version),
            Targets::Device(device, targets) => {
                self.update_device(&checkpoint, &device, &targets, options, version)
            }
        }
    }

    fn update_host(
        &self,
        checkpoint: &Checkpoint,
        targets: Vec<HostTarget<'_>>,
        options: &UpdateOptions,
        version: Option<String>,
    ) -> Result<UpdateReport> {
        let specs: Vec<Spec<'_>> =
            targets.iter().map(|t| Spec { name: t.name, dtype: t.dtype, shape: t.shape }).collect();
        let matched = match_targets(checkpoint, &specs, options.ignore_extra)?;
        for (t, j) in checkpoint.tensors.iter().zip(&matched) {
            let Some(j) = *j else { continue };
            if targets[j].bytes.len() as u64 != t.len {
                return Err(Error::Destination {
                    tensor: t.name.clone(),
                    message: format!(
                        "the target is {} bytes, the tensor {}",
                        targets[j].bytes.len(),
                        t.len
                    ),
                });
            }
        }
        let unchanged: Vec<bool> = if options.changed_only {
            let slices: Vec<&[u8]> = targets.iter().map(|t: &HostTarget<'_>| &*t.bytes).collect();
            let held = live::hash_all(&slices);
            let mut unchanged = vec![false; targets.len()];
            for (i, j) in matched.iter().enumerate() {
                if let Some(j) = *j {
                    unchanged[j] = live::expected_digest(checkpoint, i)? == held[j];
                }
            }
            unchanged
        } else {
            vec![false; targets.len()]
        };
        let mut slots: Vec<Option<&mut [u8]>> =
            targets.into_iter().map(|t| Some(t.bytes)).collect();
        let mut report = UpdateReport { version, ..UpdateReport::default() };
        let mut moving = Vec::with_capacity(checkpoint.tensors.len());
        for (t, j) in checkpoint.tensors.iter().zip(&matched) {
            let slot = match *j {
                None => {
                    report.ignored_tensors += 1;
                    None
                }
                Some(j) if unchanged[j] => {
                    report.skipped_tensors += 1;
                    report.skipped_bytes += t.len;
                    None
                }
                Some(j) => {
                    report.moved_tensors += 1;
                    report.moved_bytes += t.len;
                    slots[j].take()
                }
            };
            moving.push(slot);
        }
        if report.moved_tensors > 0 {
            let mut moving = moving.into_iter();
            report.load = Some(self.load_into(checkpoint, |_| moving.next().flatten(), |_| {})?);
        }
        Ok(report)
    }

    fn update_device(
        &self,
        checkpoint: &Checkpoint,
        device: &Arc<CudaDevice>,
        targets: &[DeviceTarget<'_>],
        options: &UpdateOptions,
        version: Option<String>,
    ) -> Result<UpdateReport> {
        // Device updates of this process run one at a time: two at once onto the same tensors
        // from different versions could leave a record naming one version over bytes of the
        // other (each clears, loads, then records), and a later `changed_only` would skip them.
        let _one = DEVICE_UPDATES.lock();
        let specs: Vec<Spec<'_>> =
            targets.iter().map(|t| Spec { name: t.name, dtype: t.dtype, shape: t.shape }).collect();
        let matched = match_targets(checkpoint, &specs, options.ignore_extra)?;
        check_disjoint(
            checkpoint
                .tensors
                .iter()
                .zip(&matched)
                .filter_map(|(t, j)| j.map(|j| (targets[j].ptr, t.len, targets[j].name)))
                .collect(),
        )?;
        let ordinal = device.ordinal();
        let mut report = UpdateReport { version: version.clone(), ..UpdateReport::default() };
        // Per source tensor: its target address and, from a live source, its digest.
        let mut moving: Vec<Option<(u64, Option<u64>)>> = Vec::with_capacity(matched.len());
        for (i, (t, j)) in checkpoint.tensors.iter().zip(&matched).enumerate() {
            let Some(j) = *j else {
                report.ignored_tensors += 1;
                moving.push(None);
                continue;
            };
            let ptr = targets[j].ptr;
            let digest = match version {
                Some(_) => Some(live::expected_digest(checkpoint, i)?),
                None => None,
            };
            if options.changed_only && digest.is_some() && recorded(ordinal, ptr, t.len) == digest {
                report.skipped_tensors += 1;
                report.skipped_bytes += t.len;
                moving.push(None);
                continue;
            }
            report.moved_tensors += 1;
            report.moved_bytes += t.len;
            moving.push(Some((ptr, digest)));
        }
        if report.moved_tensors == 0 {
            return Ok(report);
        }
        {
            // What is being written is unknown until the load succeeds.
            let mut records = DEVICE_DIGESTS.lock();
            for (t, m) in checkpoint.tensors.iter().zip(&moving) {
                if let Some((ptr, _)) = *m {
                    forget(&mut records, ordinal, ptr, t.len);
                }
            }
        }
        let mut ptrs = moving.iter().map(|m| m.map(|(ptr, _)| ptr));
        let load = self.load_into_device(checkpoint, device, |_| ptrs.next().flatten(), |_| {})?;
        let mut records = DEVICE_DIGESTS.lock();
        for (t, m) in checkpoint.tensors.iter().zip(&moving) {
            if let Some((ptr, Some(digest))) = *m {
                records.insert((ordinal, ptr), (t.len, digest));
            }
        }
        drop(records);
        report.load = Some(load);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device targets that share any byte are refused, naming both; touching ones are not.
    #[test]
    fn overlapping_device_targets_are_refused_naming_both() {
        let ok = vec![(100, 10, "a"), (110, 10, "b"), (0, 100, "c"), (110, 0, "empty")];
        check_disjoint(ok).unwrap();
        for (bad, names) in [
            (vec![(100, 10, "a"), (100, 10, "tied")], ("a", "tied")),
            (vec![(200, 8, "x"), (100, 101, "big")], ("big", "x")),
            (vec![(100, 10, "a"), (109, 1, "inside"), (300, 1, "far")], ("a", "inside")),
        ] {
            let err = check_disjoint(bad).unwrap_err().to_string();
            assert!(err.contains(names.0) && err.contains(names.1), "{err}");
        }
    }

    /// Writing a range drops every record it overlaps, and only those.
    #[test]
    fn forgetting_a_range_drops_exactly_the_records_it_overlaps() {
        let cases: &[(u64, u64, &[u64])] = &[
            // (ptr, len, starts left of the records at 100..110, 110..120, 200..210 on device 0)
            (0, 100, &[100, 110, 200]),
            (0, 101, &[110, 200]),
            (105, 1, &[110, 200]),
            (109, 2, &[200]),
            (120, 80, &[100, 110, 200]),
            (150, 100, &[100, 110]),
            (100, 10, &[110, 200]),
            (0, u64::MAX, &[]),
            (110, 0, &[100, 200]),
        ];
        for &(ptr, len, left) in cases {
            let mut records = BTreeMap::new();
            for start in [100u64, 110, 200] {
                records.insert((0u32, start), (10u64, start));
            }
            records.insert((1u32, 100), (10, 0));
            forget(&mut records, 0, ptr, len);
            let starts: Vec<u64> = records.keys().filter(|k| k.0 == 0).map(|k| k.1).collect();
            assert_eq!(starts, left, "forget({ptr}, {len})");
            assert!(records.contains_key(&(1, 100)), "another device's record was dropped");
        }
    }
}
