#!/bin/bash
# Usage (root): [DEVICE=cuda:0] benches/experiments/loop_profiles.sh [SIZE_GIB]
# Cold loads from two volumes of one machine, the disk under the working directory and ext4
# on a loop device backed by memory (NVMe-speed, O_DIRECT-capable), with the settings `auto`
# picks against the other profiles, interleaved. Prints one line per load.
G=${GANTRY:-target/release/gantry}; G=$(realpath $G); SIZE=${1:-4}
DISK=${DISK_DIR:-$PWD/.loop-profiles-disk}; IMG=/dev/shm/gantry-loop.img; MNT=/mnt/gantry-loop
mkdir -p $DISK $MNT
truncate -s $((SIZE + 2))G $IMG && mkfs.ext4 -q -F $IMG || exit 1
LOOP=$(losetup --find --show --direct-io=on $IMG) && mount $LOOP $MNT || exit 1
$G synth $DISK --size-gib $SIZE >/dev/null; $G synth $MNT --size-gib $SIZE >/dev/null; sync
for where in $DISK $MNT; do
  echo 3 > /proc/sys/vm/drop_caches
  $G load $where --path direct --device ${DEVICE:-cpu} --explain | head -1
done
for round in 1 2 3; do
  for where in $DISK $MNT; do
    for opts in "" "--profile nvme" "--profile io2" "--profile gp3" "--chunk-mib 128 --queue-depth 8"; do
      echo 3 > /proc/sys/vm/drop_caches
      gbs=$($G load $where --path direct --device ${DEVICE:-cpu} --json $opts | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["gb_per_s"])')
      echo "round $round $(basename $where) ${opts:-auto} $gbs"
    done
  done
done
umount $MNT; losetup -d $LOOP; rm -f $IMG; rm -rf $DISK
