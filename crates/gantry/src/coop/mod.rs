//! Cooperative loads for one process per GPU: the ranks of a tensor-parallel group split the
//! reads of a checkpoint between them (every byte read from storage once across the ranks)
//! and exchange what they read over NVLink with NCCL.

pub mod split;
