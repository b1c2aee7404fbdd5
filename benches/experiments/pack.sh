#!/bin/bash
# Usage: benches/experiments/pack.sh DIR [TEST ...]
# Builds, on a machine with the Rust toolchain, what a GPU machine without one needs to run the
# trials and races, stripped, into DIR (at most tens of MiB):
#   DIR/bin/gantry        the release CLI
#   DIR/t/TEST            each named integration test (a file crates/*/tests/TEST.rs), built
#                         with `cargo test --release --no-run`
#   DIR/py/gantry/        the Python package with its release extension (PYTHONPATH=DIR/py)
# then DIR/../$(basename DIR).tgz. Run the trials there with benches/experiments/gpu_trials.sh.
set -eu
DIR=$1; shift
rm -rf "$DIR"; mkdir -p "$DIR/bin" "$DIR/t" "$DIR/py/gantry"
cargo build --release -p gantry-cli -p gantry-py
cp target/release/gantry "$DIR/bin/"
cp crates/gantry-py/python/gantry/* "$DIR/py/gantry/"
cp target/release/lib_gantry.so "$DIR/py/gantry/_gantry.abi3.so"
for t in "$@"; do
  src=$(ls crates/*/tests/$t.rs | head -1)
  pkg=$(sed -n 's/^name = "\(.*\)"/\1/p' "$(dirname "$(dirname "$src")")/Cargo.toml" | head -1)
  exe=$(cargo test --release -p "$pkg" --test "$t" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable"): print(m["executable"])' | tail -1)
  cp "$exe" "$DIR/t/$t"
done
strip "$DIR"/bin/* "$DIR"/t/* "$DIR/py/gantry/_gantry.abi3.so" 2>/dev/null || true
du -sh "$DIR"
