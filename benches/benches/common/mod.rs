//! What the benches share: their input checkpoint.

use std::path::PathBuf;

/// Size of the generated checkpoint when none is given (MiB).
const GENERATED_MIB: u64 = 512;

/// The checkpoint to read (`GANTRY_BENCH_CHECKPOINT`, else one generated once under the
/// target folder), and a line saying where it came from.
pub fn checkpoint() -> (PathBuf, String) {
    if let Some(p) = std::env::var_os("GANTRY_BENCH_CHECKPOINT") {
        let p = PathBuf::from(p);
        let why = format!("GANTRY_BENCH_CHECKPOINT={}", p.display());
        return (p, why);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-checkpoint");
    let spec = gantry::synth::SynthSpec::for_bytes(GENERATED_MIB << 20);
    let index =
        gantry::synth::write_checkpoint(&dir, &spec, 7).expect("writing the bench checkpoint");
    (index, format!("a generated {GENERATED_MIB} MiB checkpoint (set GANTRY_BENCH_CHECKPOINT to use another)"))
}
