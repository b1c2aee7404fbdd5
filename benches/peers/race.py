#!/usr/bin/env python3
"""Race gantry against the safetensors loaders people use today, on one checkpoint, in one run.

Each loader runs in a fresh process, cold (page cache dropped) and warm, interleaved; each
loader's tensors are hashed once (XXH3-64 of their bytes, after the timing, on its first
sample) and must agree with the first loader's. Output: a table of median seconds, GB/s, peak RSS, and gantry's speed-up over each.

    python3 benches/peers/race.py CHECKPOINT_DIR --gantry target/release/gantry [--cold 1] [--warm 3]

"gantry" is the CLI (its own process, no Python); "gantry-python" is the Python package
(`gantry.stream`, importable from PYTHONPATH or installed). Both report the time to their
first tensor, as does Run:ai's streamer.

Timing starts after the process has initialised CUDA (every loader pays that once, gantry
included) and ends when every tensor is in GPU memory (synchronised).
"""
import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LOADERS = ["gantry", "gantry-python", "safetensors-load_file", "safetensors-safe_open", "runai", "fastsafetensors"]


def shards(ckpt):
    """The checkpoint's files: those its index names (shards may sit in subdirectories, one
    volume each), else its *.safetensors files."""
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(ckpt, n) for n in names]
    return sorted(glob.glob(os.path.join(ckpt, "*.safetensors")))


def digest(tensors):
    import torch
    import xxhash

    out = {}
    for name, t in tensors.items():
        b = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        out[name] = xxhash.xxh3_64_hexdigest(b)
    return out


def run_peer(name, ckpt, device, want_digest):
    """Runs in the child: load with one peer, print one JSON line."""
    import torch

    torch.cuda.init()
    torch.empty(1, device=device)
    torch.cuda.synchronize()
    files = shards(ckpt)
    tensors = {}
    first = None
    start = time.perf_counter()
    if name == "gantry-python":
        import gantry

        for k, t in gantry.stream(ckpt, device=device):
            if first is None:
                first = time.perf_counter() - start
            tensors[k] = t
    elif name == "safetensors-load_file":
        from safetensors.torch import load_file

        for f in files:
            tensors.update(load_file(f, device=device))
    elif name == "safetensors-safe_open":
        from safetensors import safe_open

        for f in files:
            with safe_open(f, framework="pt", device=device) as st:
                for k in st.keys():
                    tensors[k] = st.get_tensor(k)
    elif name == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_files(files)
            for k, t in streamer.get_tensors():
                tensors[k] = t.to(device, non_blocking=True)
                if first is None:
                    torch.cuda.synchronize()
                    first = time.perf_counter() - start
    elif name == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader

        loader = SafeTensorsFileLoader(None, device, nogds=True)
        loader.add_filenames({0: files})
        fb = loader.copy_files_to_device()
        for k in loader.get_keys():
            tensors[k] = fb.get_tensor(k)
    else:
        raise SystemExit(f"unknown loader {name}")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "first_seconds": first,
                      "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                      "xxh3": digest(tensors) if want_digest else None}))


def drop_cache(ckpt):
    os.sync()
    for f in shards(ckpt):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def warm_cache(ckpt):
    for f in shards(ckpt):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run_one(name, args, want_digest):
    """A fresh process for one load; returns (result dict, peak RSS bytes, process seconds)."""
    if name == "gantry":
        cmd = [args.gantry, "load", args.checkpoint, "--device", args.device, "--json"]
        cmd += ["--checksum", "xxh3"] if want_digest else []
    else:
        cmd = [sys.executable, __file__, "--child", name, args.checkpoint, "--device", args.device]
        cmd += ["--digest"] if want_digest else []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise SystemExit(f"{name} failed ({status}): {err.decode()[-2000:]}")
    r = json.loads(out.decode().strip().splitlines()[-1])
    if name == "gantry":
        xxh3 = {t["name"]: t["xxh3"] for t in r["tensors"]} if want_digest else None
        # The engine's first-tensor time counts from the start of reading; add what came before.
        first = r.get("first_tensor_seconds")
        # Timed like the peers: from CUDA's start-up done (gantry starts CUDA while it reads the
        # headers) to every tensor on the device.
        total = r["total_seconds"] - r.get("cuda_start_seconds", 0.0)
        before = total - r["seconds"]
        r = {"seconds": total, "bytes": r["bytes"], "xxh3": xxh3,
             "first_seconds": None if first is None else before + first}
    return r, usage.ru_maxrss * 1024, wall


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--gantry", default="target/release/gantry")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--cold", type=int, default=1, help="cold samples per loader")
    p.add_argument("--warm", type=int, default=3, help="warm samples per loader")
    p.add_argument("--loaders", default=",".join(LOADERS))
    p.add_argument("--child")
    p.add_argument("--digest", action="store_true")
    p.add_argument("--json-out")
    args = p.parse_args()
    if args.child:
        return run_peer(args.child, args.checkpoint, args.device, args.digest)
    loaders = args.loaders.split(",")
    results = {(n, m): [] for n in loaders for m in ("cold", "warm")}
    reference = None
    for mode, samples in (("cold", args.cold), ("warm", args.warm)):
        for i in range(samples):
            order = loaders[i % len(loaders):] + loaders[: i % len(loaders)]  # rotate: no loader always first
            for name in order:
                if mode == "cold":
                    drop_cache(args.checkpoint)
                else:
                    warm_cache(args.checkpoint)
                first = not any(results[(name, m)] for m in ("cold", "warm"))
                r, rss, wall = run_one(name, args, first)  # hash each loader's bytes once
                if reference is None:
                    reference = r["xxh3"]
                if first and r["xxh3"] != reference:
                    bad = sorted(k for k in reference if r["xxh3"].get(k) != reference[k])[:5]
                    raise SystemExit(f"{name} produced different bytes: {bad}")
                results[(name, mode)].append((r["seconds"], r["bytes"], rss, wall, r.get("first_seconds")))
                first_s = f", first tensor {r['first_seconds']:.3f} s" if r.get("first_seconds") is not None else ""
                print(f"{mode} {name}: {r['seconds']:.2f} s, {r['bytes'] / r['seconds'] / 1e9:.2f} GB/s, "
                      f"peak RSS {rss / 2**30:.2f} GiB, process {wall:.1f} s{first_s}", flush=True)
    rows = []
    print(f"\n{'mode':<5} {'loader':<22} {'n':>2} {'seconds':>8} {'GB/s':>7} {'peak RSS GiB':>12} {'process s':>9} {'gantry speed-up':>15}")
    for mode in ("cold", "warm"):
        med = {n: statistics.median(s[0] for s in results[(n, mode)]) for n in loaders if results[(n, mode)]}
        for n in loaders:
            s = results[(n, mode)]
            if not s:
                continue
            secs, nbytes = med[n], s[0][1]
            rss = max(x[2] for x in s) / 2**30
            wall = statistics.median(x[3] for x in s)
            speedup = med[n] / med["gantry"] if "gantry" in med else float("nan")
            firsts = [x[4] for x in s if x[4] is not None]
            rows.append({"mode": mode, "loader": n, "samples": len(s), "seconds": secs, "gb_per_s": nbytes / secs / 1e9,
                         "peak_rss_gib": rss, "process_seconds": wall, "gantry_speedup": speedup,
                         "first_tensor_seconds": statistics.median(firsts) if firsts else None})
            print(f"{mode:<5} {n:<22} {len(s):>2} {secs:>8.2f} {nbytes / secs / 1e9:>7.2f} {rss:>12.2f} {wall:>9.1f} {speedup:>14.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    print("all loaders produced identical bytes" if reference else "")


if __name__ == "__main__":
    main()
