#!/bin/bash
# Usage (root, to drop the page cache):
#   [DEVICE=cuda:0] [SIZE_GIB=16] [ROUNDS=3] [KEEP=trace.json.gz] benches/experiments/trace_overhead.sh [CHECKPOINT_DIR]
# What recording a timeline costs (`gantry load --trace FILE`), each load in a fresh process,
# ROUNDS interleaved samples of each, warm (the files in the page cache: a buffered read
# first) and cold (page cache dropped before each load): plain, with --trace, and with
# --explain (which records in memory for its verdict). Target: traced >= 0.97x plain.
# Prints one line per load ("<round> <warm|cold> <what> <GB/s> <seconds> <bound by>"), then
# the medians and ratios. KEEP=FILE.gz keeps the last warm trace, gzipped, with its verdict.
# Environment: GANTRY (the CLI, default target/release/gantry), DEVICE (host memory when
# unset), SIZE_GIB (a checkpoint of that size when CHECKPOINT_DIR holds none; unset:
# Llama-3-8B's shapes, 16 GB), ROUNDS (3).
set -u
G=$(realpath ${GANTRY:-target/release/gantry}) || exit 1
DEV=${DEVICE:-cpu}; ROUNDS=${ROUNDS:-3}; CK=$(realpath -m ${1:-$PWD/.trace-ckpt}); OUT=$(mktemp -d)
if [ ! -f $CK/model.safetensors.index.json ]; then
  if [ -n "${SIZE_GIB:-}" ]; then $G synth $CK --size-gib $SIZE_GIB >/dev/null || exit 1
  else $G synth $CK --llama3-8b >/dev/null || exit 1; fi
fi
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
warm() { cat $CK/*.safetensors > /dev/null; }
load() { # round, temperature, what, then gantry load arguments
  local r=$1 t=$2 what=$3; shift 3
  $G load $CK "$@" --device $DEV --json > $OUT/$t-$what-$r.json || exit 1
  python3 - $OUT/$t-$what-$r.json "$r $t $what" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
bound = (d.get("bound_by") or {}).get("stage", "-")
print("%s %.3f %.3f %s" % (sys.argv[2], d["gb_per_s"], d["seconds"], bound))
PY
}
for r in $(seq $ROUNDS); do
  warm
  load $r warm plain
  load $r warm traced --trace $OUT/warm.trace.json
  load $r warm explain --explain
  for what in plain traced; do
    drop
    if [ $what = plain ]; then load $r cold plain; else load $r cold traced --trace $OUT/cold.trace.json; fi
  done
done | tee $OUT/loads.txt
python3 - $OUT/loads.txt <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    r, t, what, gbps, secs = line.split()[:5]  # the verdict may be two words
    rates.setdefault((t, what), []).append(float(gbps))
for t in ("warm", "cold"):
    plain = statistics.median(rates[(t, "plain")])
    for what in ("plain", "traced", "explain"):
        if (t, what) in rates:
            m = statistics.median(rates[(t, what)])
            print("%s %-8s median %.2f GB/s  %.3fx plain" % (t, what, m, m / plain))
PY
if [ -n "${KEEP:-}" ]; then
  gzip -9 -c $OUT/warm.trace.json > $KEEP && $G trace summarize $OUT/warm.trace.json | head -n 1
  ls -la $KEEP
fi
