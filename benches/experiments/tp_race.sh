#!/bin/bash
# Usage: benches/experiments/tp_race.sh CHECKPOINT_DIR [GANTRY_BINARY]
#   env: GPUS (default 4), SAMPLES (default 3), OUT (raw samples, default tp_race.tsv)
#
# One process driving several GPUs, warm (page cache hot) and cold, each load a fresh process,
# samples interleaved (every mode once per round): one GPU plain, replicate:N with one
# host-to-device copy per GPU and with peer relays (GANTRY_REPLICATE_VIA=peer), dim0:N, dim1:N
# and tp:N. Prints medians of read GB/s, delivered GB/s, load s, planning ms and whole-process
# s (wall clock around the process: CUDA start-up, allocation, pinning and exit included), then
# the pinned host-to-device ceiling from `gantry bench`: each GPU alone, and all GPUs at once.
# Cold samples drop the page cache (root: drop_caches; otherwise posix_fadvise DONTNEED on each
# file, which drops clean pages of files this user can read).
set -euo pipefail
CK=${1:?usage: tp_race.sh CHECKPOINT_DIR [GANTRY_BINARY]}
G=$(realpath "${2:-${GANTRY:-target/release/gantry}}")
N=${GPUS:-4}
SAMPLES=${SAMPLES:-3}
OUT=${OUT:-tp_race.tsv}
DEVICES=$(seq -s, -f 'cuda:%g' 0 $((N - 1)))
FILES=$(find "$CK" -maxdepth 1 -name '*.safetensors' | sort)
[ -n "$FILES" ] || { echo "no .safetensors files in $CK" >&2; exit 1; }

drop_cache() {
  sync
  if [ "$(id -u)" = 0 ] && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then return; fi
  python3 - $FILES <<'PY'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
PY
}

warm_cache() {
  for f in $FILES; do cat "$f" > /dev/null; done
}

# mode -> gantry arguments (and environment)
args_of() {
  case $1 in
    plain) echo "--device cuda:0" ;;
    replicate-host) echo "--shard replicate:$N --device $DEVICES --replicate-via host" ;;
    replicate-peer) echo "--shard replicate:$N --device $DEVICES --replicate-via peer" ;;
    *) echo "--shard $1:$N --device $DEVICES" ;;
  esac
}

MODES="plain replicate-host replicate-peer dim0 dim1 tp"
printf 'temp\tmode\tsample\tread_gb_per_s\tdelivered_gb_per_s\tload_s\tplan_s\twhole_s\n' > "$OUT"
for sample in $(seq 1 "$SAMPLES"); do
  for temp in warm cold; do
    for mode in $MODES; do
      if [ $temp = cold ]; then drop_cache; else warm_cache; fi
      start=$(date +%s.%N)
      # shellcheck disable=SC2046
      json=$("$G" load "$CK" $(args_of $mode) --json)
      end=$(date +%s.%N)
      python3 - "$temp" "$mode" "$sample" "$start" "$end" "$json" >> "$OUT" <<'PY'
import json, sys
temp, mode, sample, start, end, text = sys.argv[1:]
d = json.loads(text)
if "read_gb_per_s" in d:  # placed
    read, delivered = d["read_gb_per_s"], d["delivered_gb_per_s"]
else:
    read = delivered = d["gb_per_s"]
print("\t".join(map(str, [temp, mode, sample, read, delivered, d["seconds"],
                          d.get("plan_seconds", 0.0), float(end) - float(start)])))
PY
      tail -n1 "$OUT" >&2
    done
  done
done

python3 - "$OUT" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
keys = ["read_gb_per_s", "delivered_gb_per_s", "load_s", "plan_s", "whole_s"]
print(f"\n{'temp':5} {'mode':15} {'read GB/s':>10} {'deliv GB/s':>11} {'load s':>8} {'plan ms':>8} {'whole s':>8}  (medians)")
seen = []
for r in rows:
    if (r["temp"], r["mode"]) not in seen:
        seen.append((r["temp"], r["mode"]))
for temp, mode in seen:
    m = {k: statistics.median(float(r[k]) for r in rows if (r["temp"], r["mode"]) == (temp, mode)) for k in keys}
    print(f"{temp:5} {mode:15} {m['read_gb_per_s']:>10.2f} {m['delivered_gb_per_s']:>11.2f} "
          f"{m['load_s']:>8.3f} {m['plan_s'] * 1e3:>8.2f} {m['whole_s']:>8.3f}")
PY

echo
echo "pinned host-to-device ceiling (gantry bench, warm):"
h2d() { python3 -c "import json,sys; d=json.load(sys.stdin); print(max(r.get('h2d_gb_per_s') or 0 for r in d['runs']))"; }
warm_cache
for g in $(seq 0 $((N - 1))); do
  echo "  cuda:$g alone: $("$G" bench "$CK" --device cuda:$g --repeat 1 --json | h2d) GB/s"
done
tmp=$(mktemp -d)
for g in $(seq 0 $((N - 1))); do
  ("$G" bench "$CK" --device cuda:$g --repeat 1 --json | h2d > "$tmp/$g") &
done
wait
sum=$(cat "$tmp"/* | python3 -c "import sys; print(round(sum(float(x) for x in sys.stdin), 2))")
echo "  all $N at once: $sum GB/s summed (each GPU: $(cat "$tmp"/* | paste -sd' '))"
rm -rf "$tmp"
