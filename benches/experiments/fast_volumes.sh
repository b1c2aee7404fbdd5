#!/bin/bash
# Usage (root, on a GPU machine): benches/experiments/fast_volumes.sh STEP...
# Steps, in the order they are usually run:
#   setup        write a Llama-3-8B-shaped checkpoint (gantry synth --llama3-8b) to $CKPT on the
#                disk, and copy it onto fast volumes: ext4 on loop devices over /dev/shm files
#                (losetup --direct-io=off), one volume per shard ($FAST/pershard/v0..v3, the
#                index above them) and one volume for all shards ($FAST/onevol)
#   race-fast    per storage layout (pershard, onevol): the storage ceiling and gantry, cold,
#                interleaved (gantry bench --cold), then the race against fastsafetensors and
#                Run:ai (benches/peers/race.py, fresh process per load, cold)
#   race-virtio  the same on the disk under $CKPT
#   warm         gantry bench warm (page-cache ceiling, pinned H2D, gantry) and a settings sweep
#   timeline     one cold and one warm load with debug timestamps, and each process's wall time
#   teardown     unmount and detach the volumes
# Environment: GANTRY (the CLI, default target/release/gantry), DEVICE (cuda:0), CKPT
# (/root/gantry-ckpt), FAST (/root/gantry-fast), ROUNDS (3), OUT (where logs go, default .).
set -u
G=$(realpath ${GANTRY:-target/release/gantry}); DEVICE=${DEVICE:-cuda:0}
CKPT=${CKPT:-/root/gantry-ckpt}; FAST=${FAST:-/root/gantry-fast}; ROUNDS=${ROUNDS:-3}
OUT=${OUT:-.}; HERE=$(cd "$(dirname "$0")/../.." && pwd)
RACE="python3 $HERE/benches/peers/race.py"

volume() { # volume NAME SIZE_GIB MOUNTPOINT
  local img=/dev/shm/gantry-$1.img
  truncate -s ${2}G $img && mkfs.ext4 -q -F $img || exit 1
  local dev=$(losetup --find --show --direct-io=off $img) || exit 1
  mkdir -p $3 && mount $dev $3 || exit 1
}

setup() {
  [ -f $CKPT/model.safetensors.index.json ] || $G synth $CKPT --llama3-8b >/dev/null || exit 1
  mkdir -p $FAST/pershard
  local i=0 shard
  for shard in $(python3 -c "import json,sys; print(' '.join(sorted(set(json.load(open('$CKPT/model.safetensors.index.json'))['weight_map'].values()))))"); do
    local gib=$(( $(stat -c %s $CKPT/$shard) / 1073741824 + 2 ))
    volume shard$i $gib $FAST/pershard/v$i
    cp $CKPT/$shard $FAST/pershard/v$i/ || exit 1
    i=$((i + 1))
  done
  python3 - "$CKPT" "$FAST/pershard" <<'PY'
import json, sys
index = json.load(open(sys.argv[1] + "/model.safetensors.index.json"))
shards = sorted(set(index["weight_map"].values()))
where = {s: f"v{i}/{s}" for i, s in enumerate(shards)}
index["weight_map"] = {k: where[v] for k, v in index["weight_map"].items()}
json.dump(index, open(sys.argv[2] + "/model.safetensors.index.json", "w"))
PY
  local total=$(( $(du -sb $CKPT | cut -f1) / 1073741824 + 3 ))
  volume onevol $total $FAST/onevol
  cp $CKPT/* $FAST/onevol/ || exit 1
  sync
  df -h $FAST/pershard/v* $FAST/onevol | sed 's/^/  /'
}

race() { # race NAME DIR
  echo "== $1: ceiling and gantry, cold, interleaved"
  $G bench $2 --device $DEVICE --cold --repeat $ROUNDS --json > $OUT/bench-$1.json && python3 - $OUT/bench-$1.json <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
for r in b["runs"]:
    print(f"  storage ceiling {r['storage_gb_per_s']:.2f} GB/s, gantry {r['gantry_gb_per_s']:.2f} GB/s ({r['gantry_gb_per_s']/r['storage_gb_per_s']:.3f})")
PY
  echo "== $1: race, cold, fresh process per load"
  $RACE $2 --gantry $G --device $DEVICE --loaders gantry,fastsafetensors,runai --cold $ROUNDS --warm 0 \
    --json-out $OUT/race-$1.json 2>&1 | tail -n 8
  $G load $2 --device $DEVICE --explain | head -n 12 > $OUT/explain-$1.txt
}

warm() {
  echo "== warm: ceilings and gantry"
  $G bench $CKPT --device $DEVICE --repeat $ROUNDS | tail -n 6
  echo "== warm sweep (GB/s of one load each, fresh process)"
  for staging in 64 128 512; do for chunk in 2 4 8; do for threads in 12 16; do
    printf "  staging %4s MiB chunk %s MiB threads %2s:" $staging $chunk $threads
    for r in 1 2; do
      $G load $CKPT --device $DEVICE --path buffered --json --staging-mib $staging --buffered-chunk-mib $chunk --threads $threads \
        | python3 -c 'import json,sys; print(" %.2f" % json.load(sys.stdin)["gb_per_s"], end="")'
    done; echo
  done; done; done
}

timeline() {
  for mode in cold warm; do
    [ $mode = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; } || cat $CKPT/*.safetensors > /dev/null
    local t0=$(date +%s.%N)
    RUST_LOG=gantry=debug,gantry_cli=debug $G load $CKPT --device $DEVICE --json 2> $OUT/timeline-$mode.log > $OUT/timeline-$mode.json
    local t1=$(date +%s.%N)
    python3 - $OUT/timeline-$mode.json $t0 $t1 $mode <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"  {sys.argv[4]}: process {wall:.3f} s, total {r['total_seconds']:.3f} s, load {r['seconds']:.3f} s ({r['gb_per_s']:.2f} GB/s), process - load {wall - r['seconds']:.3f} s")
PY
    sed 's/^/    /' $OUT/timeline-$mode.log | head -n 20
  done
}

teardown() {
  for m in $FAST/pershard/v* $FAST/onevol; do umount $m 2>/dev/null; done
  losetup -D; rm -f /dev/shm/gantry-*.img
}

for step in "$@"; do
  case $step in
    setup) setup ;;
    race-fast) race pershard $FAST/pershard; race onevol $FAST/onevol ;;
    race-virtio) race virtio $CKPT ;;
    warm) warm ;;
    timeline) timeline ;;
    teardown) teardown ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
