#!/bin/bash
# Usage (root, to drop the page cache): [DEVICE=cuda:0] [SIZE_GIB=16] [ROUNDS=3] benches/experiments/sha256_race.sh [CHECKPOINT_DIR]
# The cost of --verify-sha256, each load in a fresh process, ROUNDS interleaved samples of each
# (SHA256SUMS written beside the shards first, so every file is checked). A file verified for
# the first time is hashed sequentially and its segment states recorded
# (GANTRY_SHA256_STATES_DIR, a fresh directory here); later loads hash its segments in
# parallel from them (crates/gantry/src/integrity/states.rs):
#  - cold (page cache dropped): plain, with --verify-sha256 the first time (no states), and
#    with --verify-sha256 from recorded states; target: verify >= 0.97x.
#  - warm (the files read into the page cache with a buffered read first): one verified load
#    to record the states (not measured), then per round: plain, with --verify-sha256 (from
#    the states), and the largest shard alone with --verify-sha256 the first time (one lane,
#    no states); target: verify >= 0.9x. A first verified load cannot end before its largest
#    shard is hashed on one core, so the bound the segment states beat is
#    plain time / max(plain time, the largest shard's first verified load alone). Also
#    printed: one core's SHA-256 rate on that shard by gantry (its bytes over that load's
#    time) and by Python's hashlib (OpenSSL), the same bytes warm.
# Prints one line per load: "<round> <what> <GB/s> <seconds> <hashing of the first file>",
# then the warm table.
# The object cache's race (--cache-dir against SeaweedFS) is benches/experiments/cache_race.sh.
G=${GANTRY:-target/release/gantry}; G=$(realpath $G); SIZE=${SIZE_GIB:-16}; DEV=${DEVICE:-cpu}
ROUNDS=${ROUNDS:-3}; CK=${1:-$PWD/.sha256-race-ckpt}; OUT=$(mktemp -d)
[ -f $CK/model.safetensors.index.json ] || $G synth $CK --size-gib $SIZE >/dev/null || exit 1
(cd $CK && sha256sum *.safetensors > SHA256SUMS) || exit 1
LARGEST=$(ls -S $CK/*.safetensors | head -n 1)
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
load() { # what, then gantry load arguments
  local what=$1; shift
  $G load "$@" --device $DEV --json > $OUT/$what.json || exit 1
  python3 -c "import json,sys; d=json.load(open('$OUT/$what.json')); print('%s %.3f %.3f %s' % ('$what', d['gb_per_s'], d['seconds'], d['files'][0].get('sha256_hashing', '-')))"
}
fresh() { rm -rf $OUT/states-$1; mkdir -p $OUT/states-$1; echo $OUT/states-$1; }
export GANTRY_SHA256_STATES_DIR=$(fresh kept)
cat $CK/*.safetensors > /dev/null
echo "0 $(load warm-record $CK --verify-sha256)"
for round in $(seq $ROUNDS); do
  drop; echo "$round $(load cold-plain-$round $CK)"
  drop; echo "$round $(GANTRY_SHA256_STATES_DIR=$(fresh none) load cold-verify-$round $CK --verify-sha256)"
  drop; echo "$round $(load cold-states-$round $CK --verify-sha256)"
  cat $CK/*.safetensors > /dev/null # a buffered read: a cold gantry load reads around the page cache
  echo "$round $(load warm-plain-$round $CK)"
  echo "$round $(load warm-verify-$round $CK --verify-sha256)"
  echo "$round $(GANTRY_SHA256_STATES_DIR=$(fresh none) load warm-largest-$round $LARGEST --verify-sha256)"
done
python3 - $OUT $ROUNDS $LARGEST <<'PY'
import hashlib, json, os, statistics, sys, time
out, rounds, largest = sys.argv[1], int(sys.argv[2]), sys.argv[3]
size = os.path.getsize(largest)
t = time.perf_counter(); h = hashlib.sha256()
with open(largest, "rb", buffering=0) as f:
    while block := f.read(8 << 20):
        h.update(block)
openssl = size / (time.perf_counter() - t) / 1e9
s = lambda what, r: json.load(open(f"{out}/{what}-{r}.json"))["seconds"]
print(f"\nwarm: the largest shard is {size / 1e9:.2f} GB ({os.path.basename(largest)})")
print("round  plain s  verify s  ratio  largest alone s  one-lane bound  ratio/bound  one core, gantry")
ratios, bounds = [], []
for r in range(1, rounds + 1):
    plain, verify, alone = s("warm-plain", r), s("warm-verify", r), s("warm-largest", r)
    ratio, bound = plain / verify, plain / max(plain, alone)
    ratios.append(ratio); bounds.append(bound)
    print(f"{r:5} {plain:8.3f} {verify:9.3f} {ratio:6.3f} {alone:16.3f} {bound:15.3f} {ratio / bound:12.3f}"
          f"  {size / alone / 1e9:.2f} GB/s")
print(f"median warm ratio {statistics.median(ratios):.3f} (target 0.9) from recorded states,"
      f" one-lane bound of a first verified load {statistics.median(bounds):.3f};"
      f" one core's SHA-256 by Python's hashlib (OpenSSL) on the same warm bytes: {openssl:.2f} GB/s")
for what in ("cold-verify", "cold-states"):
    cold = [s("cold-plain", r) / s(what, r) for r in range(1, rounds + 1)]
    how = "first verified load" if what == "cold-verify" else "from recorded states"
    print(f"cold ratios, {how}: {' '.join(f'{x:.3f}' for x in cold)}, median {statistics.median(cold):.3f} (target 0.97)")
PY
rm -rf $OUT
