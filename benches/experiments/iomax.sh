#!/bin/bash
# Usage (root, cgroup v2): DISK=vda DEVNO=254:0 benches/experiments/iomax.sh [CHECKPOINT_DIR]
# Emulate a capped volume with cgroup v2 io.max and compare request settings under it.
G=${GANTRY:-target/release/gantry}; G=$(realpath $G); CK=${1:-${TMPDIR:-/tmp}/gantry-iomax-ckpt}
$G synth $CK --size-gib 2 >/dev/null
CG=/sys/fs/cgroup/gantry-volume
echo "+io" > /sys/fs/cgroup/cgroup.subtree_control 2>&1
mkdir -p $CG || exit 1
# gp3-like: 500 MB/s, 2000 IOPS.
echo "${DEVNO:-254:0} rbps=500000000 riops=2000" > $CG/io.max || { echo "io.max not writable"; exit 1; }
cat $CG/io.max
cat /sys/block/${DISK:-vda}/queue/max_sectors_kb
for s in "naive-1MiBx1 1 1" "naive-1MiBx32 1 32" "gp3 16 4" "default 64 8"; do set -- $s
  sync; echo 3 > /proc/sys/vm/drop_caches
  before=$(awk '{print $1}' /sys/block/${DISK:-vda}/stat)
  r=$(sh -c "echo \$\$ > $CG/cgroup.procs; exec $G load $CK --json --path direct --chunk-mib $2 --queue-depth $3 --staging-mib 512" | python3 -c "import json,sys; d=json.load(sys.stdin); print('%.3f GB/s' % d['gb_per_s'])")
  after=$(awk '{print $1}' /sys/block/${DISK:-vda}/stat)
  echo "$1 (chunk $2 MiB x $3): $r, $((after-before)) read requests completed by the disk"
done
cat $CG/io.stat
