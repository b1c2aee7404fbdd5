//! Placed loads: a checkpoint read once, its tensors replicated or sliced across several
//! destinations ([`crate::plan::placement`]), in host memory or on GPUs (one read feeds every GPU
//! that wants those bytes).

use std::sync::Arc;
use std::time::Instant;

use gantry_format::{Checkpoint, TensorEntry};

use crate::api::loader::{LoadReport, Loader};
use crate::config::ReplicateVia;
use crate::cuda::{CudaDevice, DeviceBuffer, HostBuffer};
use crate::engine::sink::cuda::CudaSink;
use crate::engine::sink::host::PlacedSink;
use crate::engine::sink::Sink;
use crate::engine::topology::staging_groups;
use crate::error::{Error, Result};
use crate::plan::placement::{Layout, Share, ShareEntry};
use crate::plan::ReadSet;

/// A checkpoint placed across destinations, one buffer `B` per destination: host memory
/// ([`PlacedModel`]) or device memory ([`PlacedDeviceModel`]).
#[derive(Debug)]
pub struct Placed<B> {
    checkpoint: Checkpoint,
    layout: Layout,
    buffers: Vec<B>,
    report: LoadReport,
}

/// A checkpoint placed across destinations in host memory.
pub type PlacedModel = Placed<HostBuffer>;

/// A checkpoint placed across GPUs: one device allocation per destination.
pub type PlacedDeviceModel = Placed<DeviceBuffer>;

impl<B> Placed<B> {
    /// A placed model from its parts: `buffers[d]` holds destination `d`'s shares as
    /// `layout.shares[d]` lays them out.
    pub(crate) fn from_parts(
        checkpoint: Checkpoint,
        layout: Layout,
        buffers: Vec<B>,
        report: LoadReport,
    ) -> Self {
        assert_eq!(layout.shares.len(), buffers.len(), "one buffer per destination");
        Self { checkpoint, layout, buffers, report }
    }

    /// The checkpoint's table.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Figures of the load (bytes read count each atom once).
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// Destinations.
    pub fn devices(&self) -> usize {
        self.buffers.len()
    }

    /// The checkpoint's table, each destination's shares (checkpoint order) and buffer, and the
    /// figures: for bindings that hand each destination's memory to its own owner.
    pub fn into_parts(self) -> (Checkpoint, Vec<Vec<ShareEntry>>, Vec<B>, LoadReport) {
        (self.checkpoint, self.layout.shares, self.buffers, self.report)
    }

    /// Destination `destination`'s shares, in checkpoint order.
    pub fn share_entries(&self, destination: usize) -> &[ShareEntry] {
        &self.layout.shares[destination]
    }

    /// Destination `destination`'s shares in checkpoint order, each with its tensor.
    fn shares(&self, destination: usize) -> impl Iterator<Item = (&TensorEntry, &ShareEntry)> {
        self.share_entries(destination).iter().map(|s| (&self.checkpoint.tensors[s.tensor], s))
    }
}

/// One tensor's share at one destination in host memory.
#[derive(Debug, Clone, Copy)]
pub struct PlacedTensor<'a> {
    /// The tensor.
    pub entry: &'a TensorEntry,
    /// Its share: shape, length, what of the tensor.
    pub share: &'a ShareEntry,
    /// The share's bytes (C order of its shape).
    pub bytes: &'a [u8],
}

impl Placed<HostBuffer> {
    /// The shares destination `device` holds, in checkpoint order.
    pub fn tensors(&self, device: usize) -> impl Iterator<Item = PlacedTensor<'_>> {
        let buffer = &self.buffers[device];
        self.shares(device).map(move |(entry, share)| PlacedTensor {
            entry,
            share,
            bytes: &buffer[share.offset as usize..(share.offset + share.len) as usize],
        })
    }

    /// Destination `device`'s share of the tensor called `name`.
    pub fn tensor(&self, device: usize, name: &str) -> Option<PlacedTensor<'_>> {
        self.tensors(device).find(|t| t.entry.name == name)
    }
}

impl Loader {
    /// Loads `checkpoint` across `devices` destinations in host memory: `place(tensor)` says
    /// which destinations get what of each tensor (the whole, a [`crate::plan::placement::Slice`],
    /// or nothing). Bytes several destinations want are read once; a slice along dimension 0
    /// reads only its bytes. `on_ready(device, tensor)` is called on this thread as each share
    /// is complete.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let spec = gantry::synth::SynthSpec { vocab: 64, hidden: 64, intermediate: 224, kv: 16, layers: 1, shards: 1 };
    /// # gantry::synth::write_checkpoint(dir.path(), &spec, 0)?;
    /// use gantry::placement::{even, Share};
    /// let loader = gantry::Loader::new(gantry::Config::default())?;
    /// let checkpoint = gantry::open(dir.path())?;
    /// // Two tensor-parallel ranks: 2-D weights split by rows, everything else replicated.
    /// let model = loader.load_placed(checkpoint, 2, |t| {
    ///     if t.shape.len() == 2 {
    ///         Ok((0..2).map(|r| Ok((r, Share::Slice(even(t, 0, 2, r as u64)?)))).collect::<gantry::Result<_>>()?)
    ///     } else {
    ///         Ok(vec![(0, Share::Whole), (1, Share::Whole)])
    ///     }
    /// }, |_, _| {})?;
    /// let half = model.tensor(1, "lm_head.weight").unwrap();
    /// assert_eq!(half.share.shape, vec![32, 64]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load_placed(
        &self,
        checkpoint: Checkpoint,
        devices: usize,
        place: impl FnMut(&TensorEntry) -> Result<Vec<(usize, Share)>>,
        mut on_ready: impl FnMut(usize, &TensorEntry),
    ) -> Result<PlacedModel> {
        let (layout, plan_seconds) = lay_out(&checkpoint, devices, place)?;
        let mut buffers = layout
            .buffer_bytes
            .iter()
            .map(|&n| HostBuffer::new(n as usize))
            .collect::<Result<Vec<_>>>()?;
        let mut sink = PlacedSink::new(&layout, &mut buffers);
        let mut report = self.run_placed(&checkpoint, &layout, &mut sink, None, &mut on_ready)?;
        report.plan_seconds += plan_seconds;
        Ok(PlacedModel { checkpoint, layout, buffers, report })
    }

    /// Loads `checkpoint` across GPUs: destination `d` is `devices[d]` (the same GPU may be
    /// named more than once), with shares as for [`Loader::load_placed`]. Each destination's
    /// shares live in one device allocation; every byte is read once into pinned staging and
    /// copied to each destination that wants it (strided shares with one 2-D copy per staged
    /// read). Each destination's streams and allocation are made on a thread of its own while
    /// the files are opened and the first extents read; staging sits on the NUMA node of the
    /// GPUs taking the most bytes. Replicated bytes go to each GPU from the host, or once to
    /// one GPU and on over peer copies ([`crate::Config::replicate_via`]).
    /// `on_ready(destination, tensor)` is called on this thread once a share's copies have
    /// completed.
    pub fn load_placed_to_devices(
        &self,
        checkpoint: Checkpoint,
        devices: &[Arc<CudaDevice>],
        place: impl FnMut(&TensorEntry) -> Result<Vec<(usize, Share)>>,
        mut on_ready: impl FnMut(usize, &TensorEntry),
    ) -> Result<PlacedDeviceModel> {
        if devices.is_empty() {
            return Err(Error::Config("a placed load onto GPUs needs at least one GPU".into()));
        }
        let (layout, plan_seconds) = lay_out(&checkpoint, devices.len(), place)?;
        let relay = self.config().replication()? == ReplicateVia::Peer;
        // Places relative to each destination's allocation, which the sink's set-up threads
        // make while the files are opened and the first extents read.
        let places = layout.places(&vec![0; devices.len()]);
        // The caller's context is current again when this returns.
        let _bound = devices[0].bind_scoped()?;
        let mut sink = CudaSink::placed(devices, &layout.buffer_bytes, places, relay)?;
        // Staging (and the reader threads) on the NUMA node of the GPUs taking the most bytes.
        let nodes: Vec<Option<u32>> = devices.iter().map(|d| d.numa_node()).collect();
        let groups = staging_groups(&nodes, &layout.buffer_bytes);
        let stage_for = &devices[groups[0].destinations[0]];
        if groups.len() > 1 {
            log::debug!("GPUs on {} NUMA nodes: staging on {:?}", groups.len(), groups[0].node);
        }
        let mut report =
            self.run_placed(&checkpoint, &layout, &mut sink, Some(stage_for), &mut on_ready)?;
        report.plan_seconds += plan_seconds;
        let buffers = sink.take_buffers()?;
        drop(sink);
        Ok(PlacedDeviceModel { checkpoint, layout, buffers, report })
    }

    /// Runs a placed load into `sink`, calling `on_ready(destination, tensor)` as each share's
    /// last atom lands (at once for empty shares).
    fn run_placed(
        &self,
        checkpoint: &Checkpoint,
        layout: &Layout,
        sink: &mut dyn Sink,
        device: Option<&Arc<CudaDevice>>,
        on_ready: &mut dyn FnMut(usize, &TensorEntry),
    ) -> Result<LoadReport> {
        // Atoms feeding each share; a share is ready when its last atom has landed.
        let mut pending: Vec<Vec<u32>> = layout.shares.iter().map(|s| vec![0; s.len()]).collect();
        for copies in &layout.copies {
            for c in copies {
                pending[c.device][c.share] += 1;
            }
        }
        for (d, shares) in layout.shares.iter().enumerate() {
            for (s, share) in shares.iter().enumerate() {
                if pending[d][s] == 0 {
                    on_ready(d, &checkpoint.tensors[share.tensor]);
                }
            }
        }
        let wanted = vec![true; layout.atoms.len()];
        let reads = ReadSet::new(&checkpoint.files, &layout.atoms);
        self.run(reads, &wanted, sink, device, &mut |atom| {
            for c in &layout.copies[atom] {
                pending[c.device][c.share] -= 1;
                if pending[c.device][c.share] == 0 {
                    let share = &layout.shares[c.device][c.share];
                    on_ready(c.device, &checkpoint.tensors[share.tensor]);
                }
            }
        })
    }
}

/// Lays out a placed load, timed (logged at debug).
fn lay_out(
    checkpoint: &Checkpoint,
    devices: usize,
    place: impl FnMut(&TensorEntry) -> Result<Vec<(usize, Share)>>,
) -> Result<(Layout, f64)> {
    let start = Instant::now();
    let layout = Layout::new(checkpoint, devices, place)?;
    let seconds = start.elapsed().as_secs_f64();
    let deliveries: usize = layout.copies.iter().map(Vec::len).sum();
    log::debug!(
        "placement: {} tensors on {devices} destinations, {} atoms, {deliveries} deliveries, planned in {:.3} ms",
        checkpoint.tensors.len(),
        layout.atoms.len(),
        seconds * 1e3
    );
    Ok((layout, seconds))
}

/// One tensor's share on one destination GPU.
#[derive(Debug, Clone, Copy)]
pub struct PlacedDeviceTensor<'a> {
    /// The tensor.
    pub entry: &'a TensorEntry,
    /// Its share: shape, length, what of the tensor.
    pub share: &'a ShareEntry,
    /// Device address of the share's first byte (C order of its shape).
    pub ptr: u64,
}

impl Placed<DeviceBuffer> {
    /// The GPU of destination `destination`.
    pub fn device(&self, destination: usize) -> &Arc<CudaDevice> {
        self.buffers[destination].device()
    }

    /// The shares destination `destination` holds, in checkpoint order.
    pub fn tensors(&self, destination: usize) -> impl Iterator<Item = PlacedDeviceTensor<'_>> {
        let base = self.buffers[destination].ptr();
        self.shares(destination).map(move |(entry, share)| PlacedDeviceTensor {
            entry,
            share,
            ptr: base + share.offset,
        })
    }

    /// Destination `destination`'s share of the tensor called `name`.
    pub fn tensor(&self, destination: usize, name: &str) -> Option<PlacedDeviceTensor<'_>> {
        self.tensors(destination).find(|t| t.entry.name == name)
    }

    /// Copies a share back to host memory (for checks).
    pub fn copy_to_host(&self, destination: usize, t: &PlacedDeviceTensor<'_>) -> Result<Vec<u8>> {
        self.device(destination).copy_to_host(t.ptr, t.share.len as usize)
    }

    /// Device bytes per destination.
    pub fn device_bytes(&self, destination: usize) -> u64 {
        self.buffers[destination].len() as u64
    }
}
