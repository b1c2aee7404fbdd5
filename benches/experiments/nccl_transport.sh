#!/bin/bash
# Usage (on a machine with 2+ GPUs): GANTRY=... benches/experiments/nccl_transport.sh CKPT_DIR [N]
# Which transport NCCL picks between the processes of a cooperative load, and what it costs:
# N ranks (default 2) load CKPT_DIR warm (read into the page cache first) whole and with
# tp:N shares, with NCCL's defaults and with NCCL_CUMEM_ENABLE=0 (legacy CUDA IPC handles,
# for containers where NCCL's cuMem handles cannot be shared between processes), each rank's
# output kept (GANTRY_RANK_LOG_DIR, NCCL_DEBUG=INFO, RUST_LOG=gantry=debug) under $OUT.
# Prints, per load, the slowest rank's seconds, rank 0's read and exchange-tail seconds, where
# rank 0's exchanger spent its time, and the transport lines NCCL logged ("via P2P/IPC",
# "via SHM", ...). PIECE_MIB (default 64) sets the pieces (--piece-mib).
set -u
G=$(realpath ${GANTRY:-target/release/gantry}); CK=$1; N=${2:-2}; OUT=${OUT:-$(mktemp -d)}
GPUS=$(seq -s, -f 'cuda:%g' 0 $((N - 1)))
[ -f $CK/model.safetensors.index.json ] || $G synth $CK --size-gib 4 >/dev/null || exit 1
cat $CK/*.safetensors > /dev/null
i=0
for env in "" "NCCL_CUMEM_ENABLE=0"; do
  for shard in "" "--shard tp:$N"; do
    for round in 1 2; do
      i=$((i + 1)); d=$OUT/load-$i; mkdir -p $d
      json=$(env $env NCCL_DEBUG=INFO RUST_LOG=gantry=debug GANTRY_RANK_LOG_DIR=$d \
        $G load $CK --ranks $N --device $GPUS $shard --piece-mib ${PIECE_MIB:-64} --json) || { echo "load $i failed"; continue; }
      echo "$json" | python3 -c '
import json, sys
o = json.load(sys.stdin); r = o["per_rank"][0]
print("%-24s %-12s slowest %.3f s; rank 0 reads %.3f s, exchange tail %.3f s, %d windows" % (
    sys.argv[1], sys.argv[2], o["seconds"], r["read_seconds"], r["exchange_tail_seconds"], r["windows"]))' "${env:-defaults}" "${shard:-whole}"
    done
    grep -h "rounds: Spent" $d/rank-0.log | sed 's/.*DEBUG gantry::coop::rounds. //'
    grep -ho "via [A-Za-z0-9/]*" $d/rank-0.log | sort | uniq -c | head -5
  done
done
echo "logs in $OUT"
