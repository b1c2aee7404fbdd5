#!/bin/bash
# Usage (root, on a machine with 4 GPUs): benches/experiments/coop_race.sh [cold] [warm]
# One checkpoint loaded onto 4 GPUs the ways a tensor-parallel server can, each sample a fresh
# set of processes, the modes interleaved, ROUNDS samples of each:
#   single       one process, one GPU (gantry load --device cuda:0): the time to beat
#   independent  4 processes, each reading the whole checkpoint on its own (the baseline:
#                gantry load --ranks 4 with NCCL switched off, GANTRY_NCCL_LIB=/nonexistent)
#   cooperative  4 processes splitting the reads and exchanging with NCCL (--ranks 4)
#   replicate    one process feeding 4 GPUs from one read (--shard replicate:4): warm target
#   cooptp       4 cooperative processes each keeping its tensor-parallel shares
#                (--ranks 4 --shard tp:4, exchanged a window at a time)
#   cooptp8g     the same with 8 GiB windows (--window-mib 8192) instead of 2 GiB
#   tp           one process placing the tp:4 shares on 4 GPUs (--shard tp:4)
# cold drops the page cache before every sample; warm reads the checkpoint once first.
# Per sample: load seconds (the slowest rank's), whole-command seconds (process start to
# exit, every rank), bytes read from the block device under CKPT (/sys/block/DEV/stat
# sectors, before and after) and, for --ranks, the ranks' own /proc/PID/io read_bytes summed.
# Targets: cooperative bytes = checkpoint within 1%; cold cooperative <= 1.1x single; warm
# cooperative rate >= 0.8x replicate.
# Environment: GANTRY (default target/release/gantry), CKPT (/root/gantry-ckpt, written with
# gantry synth --llama3-8b when absent), GPUS (cuda:0,cuda:1,cuda:2,cuda:3), ROUNDS (3),
# MODES (default single independent cooperative replicate), OUT (where logs go, default .), DISK (the block device to count, default the one under CKPT).
set -u
G=$(realpath ${GANTRY:-target/release/gantry}); CKPT=${CKPT:-/root/gantry-ckpt}
GPUS=${GPUS:-cuda:0,cuda:1,cuda:2,cuda:3}; ROUNDS=${ROUNDS:-3}; OUT=${OUT:-.}
N=$(echo $GPUS | tr ',' '\n' | wc -l)
LOG=$OUT/coop-race.jsonl
[ -f $CKPT/model.safetensors.index.json ] || $G synth $CKPT --llama3-8b >/dev/null || exit 1
if [ -z "${DISK:-}" ]; then # the whole disk under CKPT (override with DISK=nvme0n1)
  DISK=$(basename $(readlink -f /sys/dev/block/$(mountpoint -d $(df --output=target $CKPT | tail -n 1))))
  [ -e /sys/block/$DISK ] || DISK=$(basename $(dirname $(readlink -f /sys/class/block/$DISK)))
fi
sectors() { awk '{print $3}' /sys/block/$DISK/stat; }

command_of() { # command_of MODE
  case $1 in
    single) echo "$G load $CKPT --device ${GPUS%%,*} --json" ;;
    independent) echo "env GANTRY_NCCL_LIB=/nonexistent $G load $CKPT --ranks $N --device $GPUS --json" ;;
    cooperative) echo "$G load $CKPT --ranks $N --device $GPUS --json" ;;
    replicate) echo "$G load $CKPT --shard replicate:$N --device $GPUS --json" ;;
    cooptp) echo "$G load $CKPT --ranks $N --shard tp:$N --device $GPUS --json" ;;
    cooptp8g) echo "$G load $CKPT --ranks $N --shard tp:$N --window-mib 8192 --device $GPUS --json" ;;
    tp) echo "$G load $CKPT --shard tp:$N --device $GPUS --json" ;;
  esac
}

sample() { # sample TEMPERATURE MODE ROUND
  [ $1 = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
  local before=$(sectors) start=$(date +%s.%N)
  local json; json=$($(command_of $2)) || { echo "  $1 $2: failed" >&2; return; }
  local end=$(date +%s.%N) after=$(sectors)
  python3 - "$1" "$2" "$3" "$start" "$end" "$(( (after - before) * 512 ))" "$json" >> $LOG <<'PY'
import json, sys
temp, mode, rnd, start, end, disk, out = sys.argv[1:]
o = json.loads(out)
print(json.dumps({"temperature": temp, "mode": mode, "round": int(rnd),
    "load_s": o["seconds"], "command_s": float(end) - float(start), "disk_read_bytes": int(disk),
    "ranks_read_bytes": o.get("storage_read_bytes"), "bytes": o.get("checkpoint_bytes", o.get("bytes")),
    "cooperative": o.get("cooperative"),
    "per_rank": [{k: r.get(k) for k in ("seconds", "read_seconds", "exchange_tail_seconds",
        "share_copy_seconds", "windows", "rounds")} for r in o.get("per_rank", [])]}))
PY
}

race() { # race TEMPERATURE
  [ $1 = warm ] && cat $(find $CKPT -name "*.safetensors") > /dev/null # O_DIRECT loads would leave the page cache cold
  for r in $(seq $ROUNDS); do
    for mode in ${MODES:-single independent cooperative replicate}; do sample $1 $mode $r; done
  done
}

summary() {
  python3 - $LOG $(du -sb --apparent-size $CKPT/*.safetensors | awk '{s+=$1} END {print s}') <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size = int(sys.argv[2])
med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"checkpoint {size/1e9:.2f} GB; medians of {max(r['round'] for r in rows)} samples")
print(f"{'':5} {'mode':12} {'load s':>8} {'command s':>10} {'GB/s':>7} {'disk GB':>8} {'ranks GB':>9}")
for temp in ("cold", "warm"):
    base = {}
    for mode in ("single", "independent", "cooperative", "replicate", "cooptp", "cooptp8g", "tp"):
        rs = [r for r in rows if r["temperature"] == temp and r["mode"] == mode]
        if not rs:
            continue
        load = med([r["load_s"] for r in rs])
        base[mode] = load
        ranks = [r["ranks_read_bytes"] for r in rs if r["ranks_read_bytes"] is not None]
        print(f"{temp:5} {mode:12} {load:8.3f} {med([r['command_s'] for r in rs]):10.3f} "
              f"{size/load/1e9:7.2f} {med([r['disk_read_bytes'] for r in rs])/1e9:8.2f} "
              f"{(med(ranks)/1e9 if ranks else float('nan')):9.2f}")
        per = [r["per_rank"][0] for r in rs if r.get("per_rank") and r["per_rank"][0].get("read_seconds") is not None]
        if per:
            print(f"{'':5}   rank 0: load {med([p['seconds'] for p in per]):.3f} s = reads "
                  f"{med([p['read_seconds'] for p in per]):.3f} + exchange tails "
                  f"{med([p['exchange_tail_seconds'] for p in per]):.3f} + share copies "
                  f"{med([p['share_copy_seconds'] for p in per]):.3f} + the rest; "
                  f"{per[0]['windows']} windows, {per[0]['rounds']} rounds")
    if "cooperative" in base and "single" in base:
        print(f"{temp:5} cooperative / single load time: {base['cooperative']/base['single']:.3f}")
    if "cooperative" in base and "replicate" in base:
        print(f"{temp:5} cooperative rate / replicate rate: {base['replicate']/base['cooperative']:.3f}")
    if "cooptp" in base and "tp" in base:
        print(f"{temp:5} cooperative tp shares rate / one-process tp rate: {base['tp']/base['cooptp']:.3f}")
    if "cooptp" in base and "single" in base:
        print(f"{temp:5} cooperative tp shares / single load time: {base['cooptp']/base['single']:.3f}")
PY
}

: > $LOG
echo "machine: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs); disk $DISK; $(date -u +%F)"
[ $# -gt 0 ] || set -- cold warm
for temperature in "$@"; do race $temperature; done
summary
