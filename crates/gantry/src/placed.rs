//! Placed loads into host memory: a checkpoint read once, its tensors replicated or sliced
//! across several destinations ([`crate::placement`]).

use gantry_format::{Checkpoint, TensorEntry};

use crate::error::Result;
use crate::loader::{LoadReport, Loader};
use crate::placement::{Layout, Share, ShareEntry};
use crate::sink::host::{HostBuffer, PlacedSink};

/// A checkpoint placed across destinations in host memory: one buffer per destination.
#[derive(Debug)]
pub struct PlacedModel {
    checkpoint: Checkpoint,
    layout: Layout,
    buffers: Vec<HostBuffer>,
    report: LoadReport,
}

/// One tensor's share at one destination.
#[derive(Debug, Clone, Copy)]
pub struct PlacedTensor<'a> {
    /// The tensor.
    pub entry: &'a TensorEntry,
    /// Its share: shape, length, what of the tensor.
    pub share: &'a ShareEntry,
    /// The share's bytes (C order of its shape).
    pub bytes: &'a [u8],
}

impl PlacedModel {
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

    /// The shares destination `device` holds, in checkpoint order.
    pub fn tensors(&self, device: usize) -> impl Iterator<Item = PlacedTensor<'_>> {
        self.layout.shares[device].iter().map(move |share| PlacedTensor {
            entry: &self.checkpoint.tensors[share.tensor],
            share,
            bytes: &self.buffers[device]
                [share.offset as usize..(share.offset + share.len) as usize],
        })
    }

    /// Destination `device`'s share of the tensor called `name`.
    pub fn tensor(&self, device: usize, name: &str) -> Option<PlacedTensor<'_>> {
        self.tensors(device).find(|t| t.entry.name == name)
    }
}

impl Loader {
    /// Loads `checkpoint` across `devices` destinations in host memory: `place(tensor)` says
    /// which destinations get what of each tensor (the whole, a [`crate::placement::Slice`],
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
        let layout = Layout::new(&checkpoint, devices, place)?;
        let mut buffers = layout
            .buffer_bytes
            .iter()
            .map(|&n| HostBuffer::new(n as usize))
            .collect::<Result<Vec<_>>>()?;
        // Atoms feeding each share; a share is ready when its last atom has landed.
        let mut pending: Vec<Vec<u32>> = layout.shares.iter().map(|s| vec![0; s.len()]).collect();
        for copies in &layout.copies {
            for c in copies {
                pending[c.device][c.share] += 1;
            }
        }
        for (device, shares) in layout.shares.iter().enumerate() {
            for (s, share) in shares.iter().enumerate() {
                if pending[device][s] == 0 {
                    on_ready(device, &checkpoint.tensors[share.tensor]);
                }
            }
        }
        let wanted = vec![true; layout.atoms.tensors.len()];
        let mut sink = PlacedSink::new(&layout, &mut buffers);
        let report = self.run(&layout.atoms, &wanted, &mut sink, None, &mut |atom| {
            for c in &layout.copies[atom] {
                pending[c.device][c.share] -= 1;
                if pending[c.device][c.share] == 0 {
                    let share = &layout.shares[c.device][c.share];
                    on_ready(c.device, &checkpoint.tensors[share.tensor]);
                }
            }
        })?;
        Ok(PlacedModel { checkpoint, layout, buffers, report })
    }
}
