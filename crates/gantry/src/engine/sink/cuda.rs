//! GPU destinations through the CUDA driver API (cudarc, loaded at run time); the device,
//! its memory and page-locked staging live in [`crate::cuda::driver`].
//!
//! - [`CudaSink`] queues each staged extent's copies on one of a few streams per GPU (one
//!   read can feed several GPUs), records an event per GPU, and hands (events, lease) to a
//!   poller thread. The poller waits for the events, then returns the staging slot to the
//!   pool and tells the consumer the extent landed. So a buffer is
//!   reused only after the GPU has finished reading it, and a tensor is reported ready only
//!   after its copies completed.

use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::gpus::{Gpu, Setup};
use super::{RawTarget, Sink};
use crate::engine::read::Message;
use crate::engine::staging::Lease;
use crate::error::{Error, Result};
use crate::plan::placement::Place;
use crate::plan::{CopyStep, Extent};

use crate::cuda::driver::ContextGuard;
use crate::cuda::stream::Event;
use crate::cuda::{CudaDevice, DeviceBuffer};

/// Handles sent to the poller thread: one event per GPU the extent was copied to.
struct Pending {
    events: Vec<(usize, Event)>,
    lease: Lease,
    extent: usize,
    /// When the copies were queued (traced loads), and their bytes.
    queued_ns: Option<u64>,
    bytes: u64,
}

/// Copies staged extents to device addresses on one or several GPUs: each staged byte is read
/// once and copied to every destination that wants it, strided rows with one 2-D copy.
pub struct CudaSink {
    gpus: Vec<Gpu>,
    /// Per tensor, every place its bytes go (empty when skipped); addresses are relative to
    /// `bases[place.destination]`.
    targets: Vec<Vec<Place>>,
    /// Per destination, the address its places are relative to.
    bases: Vec<u64>,
    /// The destinations' set-up, still running on their threads (placed loads).
    setup: Option<Setup>,
    /// Allocations the set-up made, one per destination, until [`CudaSink::take_buffers`].
    buffers: Vec<DeviceBuffer>,
    /// With replication over peer copies: `relay[a][b]` when destination `a` can copy to `b`
    /// without passing through host memory.
    relay: Option<Vec<Vec<bool>>>,
    /// The GPU whose context is current on the consumer thread.
    bound: usize,
    /// Per GPU, the position of the stream this extent's copies use (scratch for `deliver`).
    chosen: Vec<Option<usize>>,
    poller: Option<(Sender<Pending>, JoinHandle<()>)>,
    /// Makes the caller's context current again when the sink is dropped.
    previous_context: Option<ContextGuard>,
}

impl std::fmt::Debug for CudaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ordinals: Vec<u32> = self.gpus.iter().map(|g| g.device.ordinal()).collect();
        f.debug_struct("CudaSink").field("devices", &ordinals).finish_non_exhaustive()
    }
}

/// A device-to-device copy queued after an extent's host-to-device copies.
#[derive(Debug, Clone, Copy)]
struct Relay {
    from: usize,
    to: usize,
    source: u64,
    dest: u64,
    len: u64,
}

impl CudaSink {
    /// A sink writing range `i` (of `lens[i]` bytes) to `targets[i]` (device address; `None`
    /// skips it). Binds the device's context on this thread until the sink is dropped.
    pub fn new(device: &Arc<CudaDevice>, targets: Vec<Option<u64>>, lens: &[u64]) -> Result<Self> {
        let targets = targets
            .iter()
            .zip(lens)
            .map(|(t, &len)| t.map(|addr| Place::whole(0, addr, len)).into_iter().collect())
            .collect();
        Self::fan_out(std::slice::from_ref(device), targets)
    }

    /// A sink copying tensor `i` to every place in `targets[i]`, whose destination is a
    /// position in `devices` (the same GPU may appear more than once: each entry gets its own
    /// streams) and whose address is absolute.
    pub fn fan_out(devices: &[Arc<CudaDevice>], targets: Vec<Vec<Place>>) -> Result<Self> {
        let mut sink = Self::empty(devices, targets);
        for device in devices {
            sink.gpus.push(Gpu::new(device)?); // pushed at once: Drop destroys what was made
        }
        sink.bases = vec![0; devices.len()];
        sink.bind(0)?;
        Ok(sink)
    }

    /// A sink for a placed load: destination `d` gets `bytes[d]` of device memory on
    /// `devices[d]`, and tensor `i`'s bytes go to `targets[i]`, addresses relative to their
    /// destination's allocation. Streams and allocations are made one thread per
    /// destination, side by side; the first delivery waits for them, so the loader opens
    /// files and starts reading meanwhile. With `relay`, bytes several GPUs want whole are
    /// copied to one of them from the host and relayed to the others over peer copies.
    pub fn placed(
        devices: &[Arc<CudaDevice>],
        bytes: &[u64],
        targets: Vec<Vec<Place>>,
        relay: bool,
    ) -> Result<Self> {
        let mut sink = Self::empty(devices, targets);
        sink.setup = Some(Setup::start(devices, bytes)?);
        sink.relay = relay.then(Vec::new);
        Ok(sink)
    }

    fn empty(devices: &[Arc<CudaDevice>], targets: Vec<Vec<Place>>) -> Self {
        assert!(!devices.is_empty(), "a CUDA sink needs a GPU");
        assert!(
            targets.iter().flatten().all(|t| t.destination < devices.len()),
            "target on no GPU"
        );
        Self {
            gpus: Vec::with_capacity(devices.len()),
            targets,
            bases: Vec::new(),
            setup: None,
            buffers: Vec::new(),
            relay: None,
            bound: usize::MAX,
            chosen: vec![None; devices.len()],
            poller: None,
            previous_context: ContextGuard::keep_current(),
        }
    }

    /// Waits for the destinations' set-up, if it is still running.
    fn ready(&mut self) -> Result<()> {
        let Some(setup) = self.setup.take() else { return Ok(()) };
        for (gpu, buffer) in setup.finish()? {
            self.gpus.push(gpu);
            self.bases.push(buffer.ptr());
            self.buffers.push(buffer);
        }
        if self.relay.is_some() {
            self.relay = Some(super::gpus::enable_peers(&self.gpus));
        }
        self.bound = usize::MAX;
        Ok(())
    }

    /// The destinations' allocations (placed loads), once: waits for their set-up.
    pub fn take_buffers(&mut self) -> Result<Vec<DeviceBuffer>> {
        self.ready()?;
        Ok(std::mem::take(&mut self.buffers))
    }

    /// Makes GPU `gpu`'s context current on this thread.
    fn bind(&mut self, gpu: usize) -> Result<()> {
        if self.bound != gpu {
            self.gpus[gpu].device.bind()?;
            self.bound = gpu;
        }
        Ok(())
    }

    /// Binds GPU `gpu` and returns the position of the stream its copies of this extent use.
    fn stream_for(&mut self, gpu: usize) -> Result<usize> {
        self.bind(gpu)?;
        Ok(match self.chosen[gpu] {
            Some(stream) => stream,
            None => *self.chosen[gpu].insert(self.gpus[gpu].take_stream()),
        })
    }

    fn poller(&mut self, landed: &Sender<Result<Message>>) -> Result<&Sender<Pending>> {
        if self.poller.is_none() {
            let (tx, rx) = mpsc::channel::<Pending>();
            let devices: Vec<Arc<CudaDevice>> =
                self.gpus.iter().map(|g| Arc::clone(&g.device)).collect();
            let (landed, trace) = (landed.clone(), crate::trace::current());
            let handle = std::thread::Builder::new()
                .name("gantry-cuda-poll".into())
                .spawn(move || {
                    let _in = crate::trace::enter(trace.as_ref(), "CUDA copy poller");
                    let mut tracks = std::collections::HashMap::new();
                    for p in rx {
                        let mut synced = Ok(());
                        for (gpu, event) in p.events {
                            // The event was recorded in this GPU's context.
                            let done = devices[gpu].bind().and_then(|()| event.synchronize());
                            drop(event);
                            if let (Some(begin), true) = (p.queued_ns, done.is_ok()) {
                                let ordinal = devices[gpu].ordinal() as usize;
                                traced_copy(&mut tracks, begin, ordinal, p.lease.index(), p.bytes);
                            }
                            synced = synced.and(done);
                        }
                        drop(p.lease); // the GPUs are done reading it (or failed: nothing reads it now)
                                       // The copy's span into the load's trace before its landing is told: the
                                       // load may write the trace once every extent landed, while this thread
                                       // lives on until the sink is dropped.
                        crate::trace::flush();
                        let message = synced.map(|()| Message::Landed { extent: p.extent });
                        // A failed send means the load was abandoned; keep syncing so every
                        // lease comes back only after its copies are finished.
                        let _ = landed.send(message);
                    }
                })
                .map_err(|source| Error::Resource { what: "spawning the CUDA poller", source })?;
            self.poller = Some((tx, handle));
        }
        Ok(&self.poller.as_ref().expect("just set").0)
    }

    /// Queues the copies of `steps` from `source`; the streams used are left in `chosen`.
    fn queue_copies(&mut self, extent: usize, steps: &[CopyStep], source: &[u8]) -> Result<()> {
        let mut relays = Vec::new();
        for s in steps {
            let bytes = &source[s.source_offset as usize..(s.source_offset + s.len) as usize];
            for k in 0..self.targets[s.tensor].len() {
                let t = self.targets[s.tensor][k];
                let from = self.relay_source(s.tensor, k, extent);
                for piece in t.rows.pieces(s.target_offset, s.len) {
                    assert!(piece.dest + piece.len() <= t.rows.len(), "a piece past its share");
                    let dest = self.bases[t.destination] + t.addr + piece.dest;
                    if let Some(f) = from {
                        let f = self.targets[s.tensor][f];
                        let source = self.bases[f.destination] + f.addr + piece.dest;
                        let (from, to, len) = (f.destination, t.destination, piece.len());
                        relays.push(Relay { from, to, source, dest, len });
                        continue;
                    }
                    let stream = self.stream_for(t.destination)?;
                    let stream = &self.gpus[t.destination].streams[stream];
                    // SAFETY: the destination lies inside the target's share (asserted), in
                    // device memory of the bound context; the source is pinned staging held
                    // by the lease until the events recorded after these copies complete.
                    unsafe { super::gpus::copy_piece(bytes, &piece, dest, stream)? };
                }
            }
        }
        self.queue_relays(&relays)
    }

    /// With replication over peer copies, the place of `tensor` that place `k` copies from
    /// (`None`: from the host). Places with the same rows form a group; one of them, in turn
    /// by extent so that every GPU's link takes its part, is copied from the host.
    fn relay_source(&self, tensor: usize, k: usize, extent: usize) -> Option<usize> {
        let relay = self.relay.as_ref()?;
        let places = &self.targets[tensor];
        let group: Vec<usize> =
            (0..places.len()).filter(|&j| places[j].rows == places[k].rows).collect();
        let first = group[extent % group.len()];
        (first != k && relay[places[first].destination][places[k].destination]).then_some(first)
    }

    /// Queues `relays` after the host-to-device copies already queued: each source GPU
    /// records an event, each destination's stream waits for it, then copies.
    fn queue_relays(&mut self, relays: &[Relay]) -> Result<()> {
        if relays.is_empty() {
            return Ok(());
        }
        let mut sources: Vec<(usize, Event)> = Vec::new();
        let mut waited: Vec<(usize, usize)> = Vec::new();
        let mut outcome = Ok(());
        for r in relays {
            let queued = self.queue_relay(r, &mut sources, &mut waited);
            if queued.is_err() {
                outcome = queued;
                break;
            }
        }
        for (gpu, event) in sources {
            let _ = self.bind(gpu);
            drop(event); // the driver keeps it until the waits on it are done
        }
        outcome
    }

    fn queue_relay(
        &mut self,
        r: &Relay,
        sources: &mut Vec<(usize, Event)>,
        waited: &mut Vec<(usize, usize)>,
    ) -> Result<()> {
        let source = match sources.iter().position(|(g, _)| *g == r.from) {
            Some(k) => k,
            None => {
                let stream = self.stream_for(r.from)?;
                let event = Event::record(&self.gpus[r.from].streams[stream])?;
                sources.push((r.from, event));
                sources.len() - 1
            }
        };
        let stream = self.stream_for(r.to)?;
        let stream = &self.gpus[r.to].streams[stream];
        if !waited.contains(&(r.to, r.from)) {
            stream.wait_for(&sources[source].1)?;
            waited.push((r.to, r.from));
        }
        let (from, to) = (&self.gpus[r.from].device, &self.gpus[r.to].device);
        // SAFETY: both ranges are shares in their destinations' allocations; the source's
        // bytes are complete once the event waited for above has fired; the stream is the
        // destination's, its context bound.
        unsafe { stream.copy_device(from, r.source, to, r.dest, r.len) }
    }

    /// Records an event after this extent's copies on every stream in `chosen`; on failure,
    /// waits for the copies instead (the lease must not come back before they finish).
    fn record_events(&mut self) -> Result<Vec<(usize, Event)>> {
        let mut events = Vec::new();
        for gpu in 0..self.chosen.len() {
            let Some(stream) = self.chosen[gpu] else { continue };
            let recorded =
                self.bind(gpu).and_then(|()| Event::record(&self.gpus[gpu].streams[stream]));
            match recorded {
                Ok(event) => {
                    self.chosen[gpu] = None;
                    events.push((gpu, event));
                }
                Err(e) => {
                    self.wait_chosen(); // this stream and those not reached yet
                    self.wait_events(events);
                    return Err(e);
                }
            }
        }
        Ok(events)
    }

    /// Waits for the copies queued on every stream in `chosen`, and clears it.
    fn wait_chosen(&mut self) {
        for gpu in 0..self.chosen.len() {
            if let Some(stream) = self.chosen[gpu].take() {
                let _ = self.bind(gpu);
                self.gpus[gpu].streams[stream].synchronize("a failed extent's copies").ok();
            }
        }
    }

    /// Waits for recorded `events`, then destroys them.
    fn wait_events(&mut self, events: Vec<(usize, Event)>) {
        for (gpu, event) in events {
            let _ = self.bind(gpu);
            event.synchronize().ok(); // recorded in that GPU's context; destroyed on drop
        }
    }
}

/// Records a device copy from its queueing to its completion, on one track per GPU and
/// staging slot (a slot holds one extent at a time, so spans on a track never overlap).
fn traced_copy(
    tracks: &mut std::collections::HashMap<(usize, usize), Option<u32>>,
    begin: u64,
    gpu: usize,
    slot: usize,
    bytes: u64,
) {
    let track = *tracks
        .entry((gpu, slot))
        .or_insert_with(|| crate::trace::track(|| format!("GPU {gpu}: copies from slot {slot}")));
    crate::trace::complete(begin, track, "copy", "device copy", || {
        crate::trace::Args::new().u64("bytes", bytes).u64("gpu", gpu as u64)
    });
}

impl Sink for CudaSink {
    fn direct_target(&mut self, _: &Extent, _: &[CopyStep], _: u64) -> Option<RawTarget> {
        None // device memory: every extent goes through pinned staging
    }

    fn device_reads(&self) -> bool {
        self.gpus.len() == 1 && self.targets.iter().all(|t| t.len() <= 1)
    }

    fn device_pointer(&self, tensor: usize) -> Option<u64> {
        match self.targets[tensor].as_slice() {
            [only] if self.device_reads() => Some(only.addr),
            _ => None,
        }
    }

    fn deliver(
        &mut self,
        extent: usize,
        steps: &[CopyStep],
        lease: Lease,
        landed: &Sender<Result<Message>>,
    ) -> Result<bool> {
        if let Err(e) = self.ready() {
            drop(lease); // nothing was queued from it
            return Err(e);
        }
        // The poller first: once copies are queued, the lease may only go back through it.
        self.poller(landed)?;
        let queued_ns = crate::trace::now();
        let bytes = steps.iter().map(|s| s.len).sum();
        if let Err(e) = self.queue_copies(extent, steps, lease.as_slice()) {
            self.wait_chosen(); // the copies already queued must finish before the lease drops
            return Err(e);
        }
        let events = self.record_events()?;
        let pending = Pending { events, lease, extent, queued_ns, bytes };
        if let Err(mpsc::SendError(p)) = self.poller(landed)?.send(pending) {
            self.wait_events(p.events); // the poller is gone; wait here instead
        }
        Ok(false)
    }

    /// Stops the poller once it has waited for every extent sent to it (each lease is dropped
    /// only after its copies completed).
    fn settle(&mut self) {
        if let Some((tx, handle)) = self.poller.take() {
            drop(tx);
            if handle.join().is_err() {
                log::error!("the CUDA poller thread panicked");
            }
        }
    }
}

impl Drop for CudaSink {
    fn drop(&mut self) {
        self.settle();
        if let Some(setup) = self.setup.take() {
            drop(setup.finish()); // a load that never delivered: free what the threads made
        }
        self.gpus.clear(); // waits for each stream (the poller is joined), then destroys it
        self.buffers.clear(); // a failed load's allocations, before the caller's context returns
        drop(self.previous_context.take()); // the caller's context, current again
    }
}
