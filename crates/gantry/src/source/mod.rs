//! Where bytes come from, first on the data path: the probes that say what a local file and
//! this machine allow (`probe`: `O_DIRECT`, alignment, page-cache residency, io_uring,
//! memlock), object storage (`object`: ranged GETs from S3, GCS and Azure) and its local
//! write-through copies (`cache`), and live processes (`live`: a running `gantry serve` or
//! a framework publishing through it, whose sealed shared memory a load reads like files).
//!
//! A source knows nothing of plans, staging or destinations; the readers that move a local
//! file's bytes live with the engine (`engine/read`), since they share its staging ring
//! and completion path.

pub mod cache;
pub mod live;
pub mod object;
pub mod probe;
