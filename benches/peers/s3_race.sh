#!/bin/bash
# Usage: AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_ALLOW_HTTP=true \
#        benches/peers/s3_race.sh s3://bucket/prefix/ [ROUNDS]
# Object storage into host memory, interleaved rounds: (a) the ceiling, s5cmd copying the
# objects into memory (/dev/shm) with its default concurrency; (b) gantry loading them into
# host memory (`gantry load --json`, its own timer: headers, allocation and the load);
# (c) Run:ai Model Streamer in its S3 mode, when RUNAI_PYTHON names a Python that has it;
# (d) gantry's in-process ceiling and reload (`gantry bench`). Prints one line per sample.
SRC=${1:?s3://bucket/prefix/}; ROUNDS=${2:-3}
G=${GANTRY:-target/release/gantry}
S5="s5cmd ${AWS_ENDPOINT_URL:+--endpoint-url $AWS_ENDPOINT_URL}"
BYTES=$($G inspect "$SRC" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_bytes"])')
OBJ_BYTES=$($S5 du "$SRC*" | awk '{print $1}')
echo "checkpoint $SRC: tensors $BYTES bytes, objects $OBJ_BYTES bytes"
for r in $(seq 1 "$ROUNDS"); do
  D=$(mktemp -d /dev/shm/s3race.XXXX)
  t0=$(date +%s.%N); $S5 cp "$SRC*" "$D/" >/dev/null || exit 1; t1=$(date +%s.%N)
  rm -rf "$D"
  echo "round $r s5cmd $(python3 -c "print('%.2f GB/s' % ($OBJ_BYTES / ($t1 - $t0) / 1e9))")"
  if [ -n "$RUNAI_PYTHON" ]; then
    SHARDS=$($G inspect "$SRC" --json | python3 -c 'import json,sys; print(" ".join(f["path"].rsplit("/",1)[1] for f in json.load(sys.stdin)["files"]))')
    RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0 AWS_EC2_METADATA_DISABLED=true "$RUNAI_PYTHON" "$(dirname "$0")/runai_s3.py" "$SRC" $SHARDS | python3 -c 'import json,sys; j=json.load(sys.stdin); print("round '"$r"' runai %.2f GB/s" % j["gb_per_s"])'
  fi
  $G load "$SRC" --device cpu --json | python3 -c 'import json,sys; j=json.load(sys.stdin); print("round '"$r"' gantry %.2f GB/s (load), %.2f GB/s (end to end)" % (j["gb_per_s"], j["bytes"] / j["total_seconds"] / 1e9))'
done
$G bench "$SRC" --repeat "$ROUNDS" | tail -2
