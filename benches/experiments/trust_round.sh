#!/bin/bash
# Usage (root, on a one-GPU machine, from the repository root):
#   benches/experiments/trust_round.sh PACK.tgz|PACK.txz WEED.xz RESULTS_DIR
# One call's worth of the trust round's GPU figures, each step bounded in time so the whole
# fits one command:
#   1. the GPU trials (benches/experiments/gpu_trials.sh) of what pack.sh put in PACK.tgz|PACK.txz, the
#      two-rank cooperative trials left out (one GPU; `coop` runs its one-GPU trial);
#   2. what a timeline costs (trace_overhead.sh: warm and cold, plain / --trace / --explain),
#      keeping the warm 16 GB trace, gzipped;
#   3. the object cache (cache_race.sh: store, first load with --cache-dir, load from the
#      checked copies, local), against SeaweedFS (WEED.xz: the `weed` binary, xz-compressed).
# STEPS (default "trials trace cache") picks and orders the steps; SIZE_GIB (default: the 16 GB
# Llama-3-8B shapes) the checkpoint's size for the last two.
# Build the pack here with:
#   benches/experiments/pack.sh .pack/p gantry/gpu gantry/placed gantry/coop gantry/trace gantry/tensor_parallel
set -u
PACK=$(realpath "$1"); WEED_XZ=$(realpath "$2"); RES=$(realpath -m "$3"); mkdir -p "$RES"
T=/tmp/trust-round; rm -rf $T; mkdir -p $T
tar xf "$PACK" -C $T || exit 1
P=$T/$(ls $T | head -n 1)
xz -dc "$WEED_XZ" > $T/weed && chmod +x $T/weed || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
CK=$PWD/.trust-ckpt
if [ -n "${SIZE_GIB:-}" ]; then $P/bin/gantry synth $CK --size-gib $SIZE_GIB >/dev/null || exit 1; fi
for step in ${STEPS:-trials trace cache}; do
case $step in
trials)
echo "== trials"
tests=$(ls $P/t | grep -v '^gantry-coop$')
timeout 150 benches/experiments/gpu_trials.sh $P $tests 2>&1 | tee "$RES/trials.txt"
GANTRY_REQUIRE_GPU=1 timeout 40 $P/t/gantry-coop a_rank_told_to_read_alone --test-threads=1 2>&1 |
  grep -E '^test |test result' | tee -a "$RES/trials.txt"
;;
trace)
echo "== trace overhead"
DEVICE=cuda:0 ROUNDS=3 GANTRY=$P/bin/gantry KEEP="$RES/warm.trace.json.gz" \
  timeout 170 benches/experiments/trace_overhead.sh $CK 2>&1 | tee "$RES/trace.txt"
;;
cache)
echo "== cache"
WEED=$T/weed DEVICE=cuda:0 ROUNDS=${ROUNDS:-2} GANTRY=$P/bin/gantry OUT=$T/cache \
  timeout ${CACHE_S:-180} benches/experiments/cache_race.sh $CK 2>&1 | tee "$RES/cache.txt"
;;
esac
done
rm -rf $CK
