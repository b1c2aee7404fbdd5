//! Loads into GPU memory: gantry-owned device memory per file (the default), or the caller's
//! own device pointers per tensor.

use std::path::Path;
use std::sync::Arc;

use gantry_format::{Checkpoint, TensorEntry};

use crate::api::loader::{LoadReport, Loader};
use crate::cuda::{CudaDevice, DeviceBuffer};
use crate::engine::sink::cuda::CudaSink;
use crate::error::{Error, Result};

/// A tensor whose bytes have landed in device memory, as handed to the ready callback.
#[derive(Debug, Clone, Copy)]
pub struct ReadyOnDevice<'a> {
    /// Position in the checkpoint's tensor table.
    pub index: usize,
    /// Name, dtype, shape, file and offset.
    pub entry: &'a TensorEntry,
    /// Device address of its first byte.
    pub ptr: u64,
}

/// A checkpoint loaded into GPU memory: one allocation per file's data section.
#[derive(Debug)]
pub struct DeviceModel {
    checkpoint: Checkpoint,
    /// Per file, its data section; empty for a model that aliases a live server's memory.
    buffers: Vec<DeviceBuffer>,
    wanted: Vec<bool>,
    report: LoadReport,
    device: Arc<CudaDevice>,
    /// With [`crate::Config::share_live`]: the live server's memory the tensors alias.
    aliased: Option<crate::source::live::Aliased>,
}

/// A loaded tensor in device memory.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTensor<'a> {
    /// Name, dtype, shape, file and offset.
    pub entry: &'a TensorEntry,
    /// Device address of its first byte (in the device's primary context).
    pub ptr: u64,
}

impl DeviceModel {
    /// The checkpoint's table.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Figures of the load.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// The GPU.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// Every loaded tensor, in file and offset order.
    pub fn tensors(&self) -> impl Iterator<Item = DeviceTensor<'_>> {
        (0..self.checkpoint.tensors.len()).filter(|&i| self.wanted[i]).map(|i| self.at(i))
    }

    /// The loaded tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<DeviceTensor<'_>> {
        let i = self.checkpoint.tensors.iter().position(|t| t.name == name)?;
        self.wanted[i].then(|| self.at(i))
    }

    /// Copies a tensor back to host memory (for checks).
    pub fn copy_to_host(&self, tensor: &DeviceTensor<'_>) -> Result<Vec<u8>> {
        self.device.copy_to_host(tensor.ptr, tensor.entry.len as usize)
    }

    /// Whether the tensors alias a live server's device memory ([`crate::Config::share_live`]):
    /// read-only by contract, kept alive by this model's lease.
    pub fn is_shared(&self) -> bool {
        self.aliased.is_some()
    }

    /// Device bytes the model holds (0 for a shared model: the memory is the server's).
    pub fn device_bytes(&self) -> u64 {
        self.buffers.iter().map(|b| b.len() as u64).sum()
    }

    /// The tensor at position `index` of the checkpoint's table, if it was loaded.
    pub fn get(&self, index: usize) -> Option<DeviceTensor<'_>> {
        (*self.wanted.get(index)?).then(|| self.at(index))
    }

    /// A model from its parts: `buffers[f]` holds file `f`'s data section (empty when none
    /// of its tensors is wanted).
    pub(crate) fn from_parts(
        checkpoint: Checkpoint,
        buffers: Vec<DeviceBuffer>,
        wanted: Vec<bool>,
        report: LoadReport,
        device: Arc<CudaDevice>,
    ) -> Self {
        Self { checkpoint, buffers, wanted, report, device, aliased: None }
    }

    fn at(&self, i: usize) -> DeviceTensor<'_> {
        let entry = &self.checkpoint.tensors[i];
        let file = &self.checkpoint.files[entry.file.0];
        let base = match &self.aliased {
            Some(aliased) => aliased.base(entry.file.0),
            None => self.buffers[entry.file.0].ptr(),
        };
        DeviceTensor { entry, ptr: base + (entry.offset - file.header.data_offset) }
    }
}

impl Loader {
    /// Loads every tensor of the checkpoint at `path` onto `device`.
    pub fn load_to_device(
        &self,
        path: impl AsRef<Path>,
        device: &Arc<CudaDevice>,
    ) -> Result<DeviceModel> {
        self.load_to_device_with(crate::open_with(path, self.config())?, device, |_| true, |_| {})
    }

    /// Loads the tensors `filter` keeps onto `device`, into one allocation per file, calling
    /// `on_ready` on this thread as each one's copies complete. On error every allocation
    /// made so far is freed.
    ///
    /// ```no_run
    /// let loader = gantry::Loader::new(gantry::Config::default())?;
    /// let gpu = gantry::CudaDevice::open(0)?; // an error, not a panic, without a driver
    /// let checkpoint = gantry::Checkpoint::open("model/")?;
    /// let model = loader.load_to_device_with(checkpoint, &gpu, |t| !t.name.starts_with("lm_head"), |ready| {
    ///     println!("{} at {:#x}", ready.entry.name, ready.ptr); // usable on any stream now
    /// })?;
    /// println!("{:.2} GB/s", model.report().gb_per_s());
    /// # Ok::<(), gantry::Error>(())
    /// ```
    pub fn load_to_device_with(
        &self,
        checkpoint: Checkpoint,
        device: &Arc<CudaDevice>,
        filter: impl Fn(&TensorEntry) -> bool,
        mut on_ready: impl FnMut(ReadyOnDevice<'_>),
    ) -> Result<DeviceModel> {
        let wanted: Vec<bool> = checkpoint.tensors.iter().map(&filter).collect();
        if self.config.share_live {
            if let Some(model) = self.alias_live(&checkpoint, device, &wanted)? {
                for (i, t) in checkpoint.tensors.iter().enumerate().filter(|(i, _)| wanted[*i]) {
                    let ptr = model.at(i).ptr;
                    on_ready(ReadyOnDevice { index: i, entry: t, ptr });
                }
                return Ok(model);
            }
        }
        let mut buffers = Vec::with_capacity(checkpoint.files.len());
        for (f, file) in checkpoint.files.iter().enumerate() {
            let len =
                if checkpoint.file_wanted(&wanted, f) { file.header.data_len as usize } else { 0 };
            buffers.push(device.alloc(len, &file.path.display().to_string())?);
        }
        let targets: Vec<Option<u64>> = checkpoint
            .tensors
            .iter()
            .zip(&wanted)
            .map(|(t, &w)| {
                let data_offset = checkpoint.files[t.file.0].header.data_offset;
                w.then(|| buffers[t.file.0].ptr() + (t.offset - data_offset))
            })
            .collect();
        let report = self.fill_device(&checkpoint, device, targets, &mut on_ready)?;
        Ok(DeviceModel {
            checkpoint,
            buffers,
            wanted,
            report,
            device: Arc::clone(device),
            aliased: None,
        })
    }

    /// A model whose tensors alias the live server's device memory, when `checkpoint` is of a
    /// live source that keeps it on a GPU this device can map.
    fn alias_live(
        &self,
        checkpoint: &Checkpoint,
        device: &Arc<CudaDevice>,
        wanted: &[bool],
    ) -> Result<Option<DeviceModel>> {
        let Some(lease) = crate::source::live::device_lease(checkpoint) else { return Ok(None) };
        let Some((aliased, report)) = crate::source::live::alias_device(lease, checkpoint, device)?
        else {
            return Ok(None);
        };
        Ok(Some(DeviceModel {
            checkpoint: checkpoint.clone(),
            buffers: Vec::new(), // the tensors live in `aliased`
            wanted: wanted.to_vec(),
            report,
            device: Arc::clone(device),
            aliased: Some(aliased),
        }))
    }

    /// Reads `model`'s tensors again into the device memory it already holds.
    pub fn reload_device(&self, model: &mut DeviceModel) -> Result<()> {
        if model.aliased.is_some() {
            return Err(Error::Config(
                "a shared model aliases a live server's memory: open the source again and \
                 load it to get a newer version"
                    .into(),
            ));
        }
        let targets = (0..model.checkpoint.tensors.len())
            .map(|i| model.wanted[i].then(|| model.at(i).ptr))
            .collect();
        model.report = self.fill_device(&model.checkpoint, &model.device, targets, &mut |_| {})?;
        Ok(())
    }

    /// Loads into the caller's own device memory: `target` gives each tensor's device address
    /// (memory of at least the tensor's length in `device`'s primary context, e.g. from
    /// `cudaMalloc`), or `None` to skip it. Every address is checked against its allocation
    /// before anything is read.
    pub fn load_into_device(
        &self,
        checkpoint: &Checkpoint,
        device: &Arc<CudaDevice>,
        mut target: impl FnMut(&TensorEntry) -> Option<u64>,
        mut on_ready: impl FnMut(ReadyOnDevice<'_>),
    ) -> Result<LoadReport> {
        // Checking the caller's pointers needs the context current; the caller's own is
        // current again when this returns.
        let _bound = device.bind_scoped()?;
        let targets: Vec<Option<u64>> = checkpoint.tensors.iter().map(&mut target).collect();
        for (t, ptr) in checkpoint.tensors.iter().zip(&targets) {
            if let Some(ptr) = *ptr {
                if t.len > 0 {
                    device.check_range(ptr, t.len).map_err(|message| Error::Destination {
                        tensor: t.name.clone(),
                        message,
                    })?;
                }
            }
        }
        self.fill_device(checkpoint, device, targets, &mut on_ready)
    }

    fn fill_device(
        &self,
        checkpoint: &Checkpoint,
        device: &Arc<CudaDevice>,
        targets: Vec<Option<u64>>,
        on_ready: &mut dyn FnMut(ReadyOnDevice<'_>),
    ) -> Result<LoadReport> {
        // A live source that keeps its version on a GPU of this host: copies from there (no
        // SHA-256 on that path: a load that checks files reads the host memory it hashes).
        let lease = match self.config.verify_sha256 {
            true => None,
            false => crate::source::live::device_lease(checkpoint),
        };
        if let Some(share) = lease.as_deref().and_then(crate::live::Lease::device) {
            let mut ready = |i: usize| {
                let ptr = targets[i].unwrap_or_default();
                on_ready(ReadyOnDevice { index: i, entry: &checkpoint.tensors[i], ptr });
            };
            let filled =
                crate::source::live::fill_device(share, checkpoint, device, &targets, &mut ready)?;
            if let Some(report) = filled {
                return Ok(report);
            }
        }
        let wanted: Vec<bool> = targets.iter().map(Option::is_some).collect();
        let ptrs = targets.clone();
        // The caller's context is current again when this returns (the sink binds the
        // device's for its streams and copies).
        let _bound = device.bind_scoped()?;
        let lens: Vec<u64> = checkpoint.tensors.iter().map(|t| t.len).collect();
        let mut sink = CudaSink::new(device, targets, &lens)?;
        self.run_tensors(checkpoint, &wanted, &mut sink, Some(device), &mut |i| {
            let ptr = ptrs[i].expect("only wanted tensors land");
            on_ready(ReadyOnDevice { index: i, entry: &checkpoint.tensors[i], ptr });
        })
    }
}
