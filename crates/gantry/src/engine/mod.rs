//! The moving parts of a load, in the order a byte meets them: the load's files opened and
//! each given its reader (`open`), readers on their own threads (`read`) filling buffers of
//! the staging ring (`staging`), the consumer that drives them (`pipeline`), and the sinks
//! the bytes land in (`sink`: host memory or GPUs). `topology` binds staging and reader
//! threads to the GPU's NUMA node.
//!
//! Nothing here is public: the API ([`crate::api`]) is the way in. Memory and the CUDA
//! driver sit below, in [`crate::cuda`].

pub(crate) mod open;
pub(crate) mod pipeline;
pub(crate) mod read;
pub(crate) mod sink;
pub(crate) mod staging;
pub(crate) mod topology;
