#!/usr/bin/env python3
"""Is registering page-cache pages with CUDA faster than copying them into pinned staging?

For a page-cache-hot shard: mmap it read-only, cuMemHostRegister(READ_ONLY) in pieces, and
copy each piece to the GPU straight from the page cache; against buffered reads into pinned
staging followed by the same copies (what gantry's warm path does). Prints GB/s of each,
registration alone included.

    python3 benches/experiments/register_page_cache.py SHARD [--piece-mib 64]
"""
import argparse
import ctypes
import mmap
import os
import time

import numpy as np
import torch

CU_MEMHOSTREGISTER_READ_ONLY = 0x08


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shard")
    p.add_argument("--piece-mib", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="threads registering pieces")
    args = p.parse_args()
    torch.empty(1, device="cuda")
    cuda = ctypes.CDLL("libcuda.so.1")
    size = os.path.getsize(args.shard)
    with open(args.shard, "rb") as f:
        while f.read(64 << 20):
            pass  # warm the page cache
    piece = args.piece_mib << 20
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()

    fd = os.open(args.shard, os.O_RDONLY)
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    arr = np.frombuffer(mm, dtype=np.uint8)  # the mapping's address, read-only
    host = arr.ctypes.data
    ctx = ctypes.c_void_p()
    cuda.cuCtxGetCurrent(ctypes.byref(ctx))

    def register(off):
        cuda.cuCtxSetCurrent(ctx)  # ctypes drops the GIL during the call: threads run in parallel
        rc = cuda.cuMemHostRegister_v2(ctypes.c_void_p(host + off), ctypes.c_size_t(min(piece, size - off)),
                                       CU_MEMHOSTREGISTER_READ_ONLY)
        if rc != 0:
            raise SystemExit(f"cuMemHostRegister failed: {rc}")
        return off

    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        for off in pool.map(register, range(0, size, piece)):  # in order, registered ahead
            n = min(piece, size - off)
            src = torch.from_numpy(arr[off:off + n])
            with torch.cuda.stream(stream):
                dst[off:off + n].copy_(src, non_blocking=True)
    stream.synchronize()
    total = time.perf_counter() - start
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(lambda off: cuda.cuMemHostUnregister(ctypes.c_void_p(host + off)), range(0, size, piece)))
    unreg = time.perf_counter() - t0
    del arr
    print(f"{args.threads} threads, {args.piece_mib} MiB pieces: {size / total / 1e9:.2f} GB/s end to end "
          f"(registration overlapped with copies); unregistering took {unreg:.3f} s")
    os.close(fd)


if __name__ == "__main__":
    main()
