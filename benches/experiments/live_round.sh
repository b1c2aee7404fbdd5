#!/bin/bash
# Usage (root, on a one-GPU machine, from the repository root):
#   benches/experiments/live_round.sh NEW.txz OLD.txz RESULTS_DIR
# One call's worth of the live-source and redesign figures, each step bounded in time:
#   trials  the GPU trials of NEW (pack.sh: gpu placed coop trace tensor_parallel live update
#           faults; object-store trials skipped: no network there) and the Python live tests;
#   live    issue 23's targets on the 16 GB Llama-3-8B shapes: the device-to-device and pinned
#           host-to-device ceilings (torch, same run), a warm file load, then a fresh `gantry
#           load` process per sample from `gantry serve --device cuda:0` (copy and
#           --share-live) and from `gantry serve --device cpu` (host residency);
#   update  `gantry.update(..., changed_only=True)` after 10% of the tensors (by bytes) changed
#           (a 2 GiB checkpoint: the figure is the bytes moved);
#   redesign OLD (the tree before issue 26's step) against NEW, warm and cold device loads,
#           interleaved.
#   verify  device residency bit-exact through the CLI (per-tensor XXH3 of a file load, a copy
#           and an alias), then the live trial's server child alone.
#   livetrace  where a new process's time goes on a load from `gantry serve --device cuda:0`:
#           copy and --share-live loads with --trace, the longest spans of each, and the
#           process's own timings (JSON);
#   ipc     benches/experiments/ipc_map.py: what mapping another process's GPU memory costs,
#           legacy CUDA IPC against VMM file-descriptor handles (4 x 4 GiB, 3 rounds).
#   sha     issue 25's SHA-256 targets: `gantry bench --verify-sha256` warm (states recorded,
#           against the all-core SHA-256 ceiling of the same run) and `--cold` (against the
#           plain load of the same run), SHA256SUMS written beside the 16 GB shards first.
# STEPS (default "trials live update redesign") picks and orders the steps; ROUNDS (3).
# Build the packs here with:
#   benches/experiments/pack.sh .pack/p gantry/gpu gantry/placed gantry/coop gantry/trace \
#     gantry/tensor_parallel gantry/live gantry/update gantry/faults
set -u
NEW=$(realpath "$1"); OLD=$(realpath "$2"); RES=$(realpath -m "$3"); mkdir -p "$RES"
T=/tmp/live-round; rm -rf $T; mkdir -p $T/new $T/old
tar xf "$NEW" -C $T/new && tar xf "$OLD" -C $T/old || exit 1
N=$T/new/$(ls $T/new | head -n 1); O=$T/old/$(ls $T/old | head -n 1)
G=$N/bin/gantry; ROUNDS=${ROUNDS:-3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
CK=$PWD/.live-ckpt; SOCK=$T/live.sock
case " ${STEPS:-live} " in *" live "*|*" redesign "*|*" sha "*|*" livetrace "*) $G synth $CK --llama3-8b >/dev/null || exit 1;; esac
json() { python3 -c 'import json,sys
d=json.load(sys.stdin); r=d if "seconds" in d else d.get("report", d)
print("%.4f %.3f %.3f %.3f %s %s" % (r["seconds"], r["gb_per_s"], r.get("total_seconds", 0), r.get("cuda_start_seconds", 0), r.get("version"), ",".join(sorted({f.get("reader") or "-" for f in r.get("files", [])}))))'; }
for step in ${STEPS:-trials live update redesign}; do
case $step in
trials)
echo "== trials"
# One GPU: the two-rank cooperative trials need two; coop's one-GPU trial runs alone.
tests=$(ls $N/t | grep -v '^gantry-coop$')
GANTRY_SKIP_OBJECT_TESTS=1 timeout ${TRIALS_S:-200} benches/experiments/gpu_trials.sh $N $tests 2>&1 | tee "$RES/trials.txt"
GANTRY_REQUIRE_GPU=1 timeout 40 $N/t/gantry-coop a_rank_told_to_read_alone --test-threads=1 2>&1 |
  grep -E '^test |test result' | tee -a "$RES/trials.txt"
GANTRY_REQUIRE_GPU=1 PYTHONPATH=$N/py timeout 60 python3 crates/gantry-py/tests/test_live.py -v 2>&1 | tail -15 | tee -a "$RES/trials.txt"
;;
live)
echo "== live" | tee "$RES/live.txt"
timeout 60 python3 - <<'EOF' 2>&1 | tee -a "$RES/live.txt"
import torch, time
n = 16 << 30
src = torch.empty(n, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
pin = torch.empty(n // 4, dtype=torch.uint8).pin_memory(); dev = torch.empty(n // 4, dtype=torch.uint8, device="cuda")
for name, d, s, b in (("dtod", dst, src, n), ("h2d-pinned", dev, pin, n // 4)):
    best = 0
    for _ in range(3):
        torch.cuda.synchronize(); t = time.perf_counter(); d.copy_(s, non_blocking=True); torch.cuda.synchronize()
        best = max(best, b / (time.perf_counter() - t) / 1e9)
    print(f"ceiling {name} {best:.1f} GB/s")
EOF
cat $CK/*.safetensors > /dev/null  # warm: in the page cache (synth leaves the files cold)
$G load $CK --device cuda:0 --json >/dev/null
for r in $(seq $ROUNDS); do
  start=$EPOCHREALTIME
  line=$($G load $CK --device cuda:0 --json | json)
  echo "$r file-warm $line wall $(awk "BEGIN { print $EPOCHREALTIME - $start }")" | tee -a "$RES/live.txt"
done
for where in cuda:0 cpu; do
  rm -f $SOCK; $G serve $CK --device $where --socket $SOCK > $T/serve.log 2>&1 &
  SP=$!
  for i in $(seq 120); do grep -q serving $T/serve.log && break; sleep 0.5; done
  cat $T/serve.log | tee -a "$RES/live.txt"
  for r in $(seq $ROUNDS); do
    for share in "" --share-live; do
      [ "$where" = cpu ] && [ -n "$share" ] && continue
      start=$EPOCHREALTIME
      line=$($G load unix://$SOCK --device cuda:0 $share --json | json)
      wall=$(awk "BEGIN { print $EPOCHREALTIME - $start }")
      echo "$r live-$where${share:+-share} $line wall $wall" | tee -a "$RES/live.txt"
    done
  done
  kill -TERM $SP; wait $SP
done
;;
update)
echo "== update" | tee "$RES/update.txt"
$G synth $T/small --size-gib 2 >/dev/null
PYTHONPATH=$N/py timeout 120 python3 - $T/small $T/upd.sock <<'EOF' 2>&1 | tee -a "$RES/update.txt"
import sys, time, torch, gantry, safetensors.torch
path, sock = sys.argv[1], sys.argv[2]
sd = {}
import glob
for f in sorted(glob.glob(path + "/*.safetensors")):
    sd.update(safetensors.torch.load_file(f))
total = sum(t.numel() * t.element_size() for t in sd.values())
with gantry.serve(sd, socket=sock) as server:
    dest = {k: torch.empty_like(v, device="cuda") for k, v in sd.items()}
    r = gantry.update(dest, server.url); print("full", r)
    changed, moved = [], 0
    for k in sorted(sd, key=lambda k: -sd[k].numel()):
        if moved >= total // 10: break
        sd[k].view(torch.uint8)[0] ^= 1; changed.append(k); moved += sd[k].numel() * sd[k].element_size()
    server.update(sd)
    t = time.perf_counter(); r = gantry.update(dest, server.url, changed_only=True); dt = time.perf_counter() - t
    print(f"changed {len(changed)} tensors {moved} bytes of {total} ({moved/total:.3f}); moved {r.moved_tensors} tensors {r.moved_bytes} bytes ({r.moved_bytes/total:.3f}) in {dt:.3f} s, version {r.version}")
    ok = all(torch.equal(dest[k].cpu().view(torch.uint8), sd[k].view(torch.uint8)) for k in sd)
    print("every tensor bit-exact after the update:", ok)
EOF
;;
redesign)
echo "== redesign" | tee "$RES/redesign.txt"
cat $CK/*.safetensors > /dev/null
for r in $(seq $ROUNDS); do
  for which in old new; do
    B=$T/$which/$(ls $T/$which | head -n 1)/bin/gantry
    $B load $CK --device cuda:0 >/dev/null
    echo "$r $which warm $($B load $CK --device cuda:0 --json | json)" | tee -a "$RES/redesign.txt"
  done
done
for r in $(seq $ROUNDS); do
  for which in old new; do
    B=$T/$which/$(ls $T/$which | head -n 1)/bin/gantry
    sync; echo 3 > /proc/sys/vm/drop_caches
    echo "$r $which cold $(timeout 60 $B load $CK --device cuda:0 --json | json)" | tee -a "$RES/redesign.txt"
  done
done
;;
verify)
# Device residency bit-exact through the CLI: per-tensor XXH3 of a file load against loads
# copied from (and aliasing) a server's GPU memory; then the trial's server child alone.
echo "== verify" | tee "$RES/verify.txt"
$G synth $T/v --size-gib 1 >/dev/null
sums() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["tensors"]), sorted({f.get("reader") for f in d["files"]}), __import__("hashlib").sha256(json.dumps(sorted((t["name"], t["xxh3"]) for t in d["tensors"])).encode()).hexdigest()[:16])'; }
echo "file   $($G load $T/v --device cuda:0 --checksum xxh3 --json | sums)" | tee -a "$RES/verify.txt"
rm -f $T/v.sock; $G serve $T/v --device cuda:0 --socket $T/v.sock > $T/vs.log 2>&1 &
SP=$!; for i in $(seq 60); do grep -q serving $T/vs.log && break; sleep 0.5; done
echo "copy   $($G load unix://$T/v.sock --device cuda:0 --checksum xxh3 --json | sums)" | tee -a "$RES/verify.txt"
echo "share  $($G load unix://$T/v.sock --device cuda:0 --share-live --checksum xxh3 --json | sums)" | tee -a "$RES/verify.txt"
kill -TERM $SP; wait $SP
mkdir -p $T/child; cp -r $T/v $T/child/model
GANTRY_SERVE_CHILD=$T/child/model GANTRY_SERVE_SOCKET=$T/child/s.sock timeout 20 $N/t/gantry-live --exact serve_child --nocapture --test-threads=1 < /dev/null 2>&1 | tail -8 | tee -a "$RES/verify.txt"
;;
livetrace)
echo "== livetrace" | tee "$RES/livetrace.txt"
rm -f $SOCK; $G serve $CK --device cuda:0 --socket $SOCK > $T/serve.log 2>&1 &
SP=$!
for i in $(seq 120); do grep -q serving $T/serve.log && break; sleep 0.5; done
for share in "" --share-live; do
  for r in 1 2; do
    start=$EPOCHREALTIME
    line=$(RUST_LOG=gantry=debug $G load unix://$SOCK --device cuda:0 $share --json --trace $T/lt$r$share.json 2> $T/lt$r$share.err | json)
    grep -E "cuIpcOpen|live" $T/lt$r$share.err | head -8
    echo "$r live${share:+-share} $line wall $(awk "BEGIN { print $EPOCHREALTIME - $start }")" | tee -a "$RES/livetrace.txt"
  done
  python3 - $T/lt2$share.json <<'PY' 2>&1 | tee -a "$RES/livetrace.txt"
import json, sys
ev = json.load(open(sys.argv[1]))["traceEvents"]
names = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
spans = sorted((e for e in ev if e.get("ph") == "X"), key=lambda e: -e["dur"])
t0 = min(e["ts"] for e in ev if "ts" in e)
for e in spans[:25]:
    print(f"  {e['dur']/1e3:9.2f} ms at {(e['ts']-t0)/1e3:9.2f} ms  {e.get('cat','')}/{e['name']}  [{names.get((e['pid'], e['tid']), e['tid'])}]  {json.dumps(e.get('args', {}))[:120]}")
PY
done
$G trace summarize $T/lt2.json 2>&1 | head -20 | tee -a "$RES/livetrace.txt"
kill -TERM $SP; wait $SP
;;
ipc)
echo "== ipc" | tee "$RES/ipc.txt"
timeout 120 python3 benches/experiments/ipc_map.py --gib-each 4 --count 4 --rounds 3 2>&1 | tee -a "$RES/ipc.txt"
;;
sha)
echo "== sha" | tee "$RES/sha.txt"
(cd $CK && ls *.safetensors | xargs -P 8 -n 1 sha256sum > SHA256SUMS) || exit 1
export GANTRY_SHA256_STATES_DIR=$T/states; rm -rf $T/states; mkdir -p $T/states
timeout 200 $G bench $CK --device cuda:0 --verify-sha256 --repeat $ROUNDS 2>&1 | tee -a "$RES/sha.txt"
timeout 300 $G bench $CK --device cuda:0 --verify-sha256 --cold --repeat $ROUNDS 2>&1 | tee -a "$RES/sha.txt"
rm -f $CK/SHA256SUMS; unset GANTRY_SHA256_STATES_DIR
;;
esac
done
rm -rf $CK
