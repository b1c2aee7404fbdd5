#!/bin/bash
# Usage: benches/experiments/pack.sh DIR [CRATE/TEST ...]   (e.g. gantry/coop gantry-cli/ranks)
# Builds, on a machine with the Rust toolchain, what a GPU machine without one needs to run the
# trials and races, stripped, into DIR (at most tens of MiB):
#   DIR/bin/gantry        the release CLI
#   DIR/bin/fault_rate    benches/experiments/fault_rate.c, static
#   DIR/t/CRATE-TEST      each named integration test (crates/CRATE/tests/TEST.rs), built
#                         with `cargo test --release --no-run`
#   DIR/lib/libgantry.so  the C ABI's library (the C clients' tests: GANTRY_LIB_DIR=DIR/lib)
#   DIR/py/gantry/        the Python package with its release extension (PYTHONPATH=DIR/py)
# then packs DIR into DIR.tgz. Run the trials there with benches/experiments/gpu_trials.sh.
set -eu
DIR=$1; shift
rm -rf "$DIR"; mkdir -p "$DIR/bin" "$DIR/t" "$DIR/py/gantry" "$DIR/lib"
cargo build --release -p gantry-cli -p gantry-py -p gantry-capi
cp target/release/gantry "$DIR/bin/"
# How fast the machine faults in fresh memory (object_round.sh step `fault`).
cc -O2 -pthread -static -o "$DIR/bin/fault_rate" benches/experiments/fault_rate.c ||
  echo "fault_rate not built (no static C toolchain): object_round.sh's fault step will say so"
cp target/release/libgantry.so "$DIR/lib/"
cp crates/gantry-py/python/gantry/* "$DIR/py/gantry/"
cp target/release/lib_gantry.so "$DIR/py/gantry/_gantry.abi3.so"
for ct in "$@"; do
  crate=${ct%%/*}; t=${ct#*/}
  pkg=$(sed -n 's/^name = "\(.*\)"/\1/p' "crates/$crate/Cargo.toml" | head -1)
  exe=$(cargo test --release -p "$pkg" --test "$t" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable") and m["target"]["kind"] == ["test"] and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$t" | tail -1)
  cp "$exe" "$DIR/t/$crate-$t"
done
strip "$DIR"/bin/* "$DIR"/t/* "$DIR/py/gantry/_gantry.abi3.so" "$DIR/lib/libgantry.so" 2>/dev/null || true
tar czf "$DIR.tgz" -C "$(dirname "$DIR")" "$(basename "$DIR")"
du -sh "$DIR" "$DIR.tgz"
