//! Tools beside the engine, for its users and its tests, not on the data path: synthetic
//! checkpoints (`synth`) and the reference readers benchmarks measure gantry against
//! (`baseline`). The crate root re-exports both.

pub mod baseline;
pub mod synth;
