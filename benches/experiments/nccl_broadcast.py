"""The NCCL broadcast rate between the GPUs of this machine, as torch.distributed gets it:
the baseline for a cooperative load's exchange. One process per GPU, each rank in turn the
root of SIZE_MIB broadcasts (default 64), grouped ROOTS at a time as a cooperative round is.

    python3 benches/experiments/nccl_broadcast.py [N_GPUS] [SIZE_MIB]

Prints, per size, the seconds of one round (every rank the root of one broadcast) and the
bytes each GPU receives per second."""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, world, size_mib, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    n = size_mib << 20
    bufs = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(world)]
    for _ in range(3):  # connections, warm-up
        for root in range(world):
            dist.broadcast(bufs[root], src=root)
    torch.cuda.synchronize()
    rounds = 20
    start = time.perf_counter()
    for _ in range(rounds):
        for root in range(world):
            dist.broadcast(bufs[root], src=root)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / rounds
    if rank == 0:
        received = (world - 1) * n
        print(f"{world} GPUs, {size_mib} MiB per root: {seconds * 1e3:.2f} ms per round, "
              f"{received / seconds / 1e9:.1f} GB/s received per GPU")
    dist.destroy_process_group()


if __name__ == "__main__":
    world = int(sys.argv[1]) if len(sys.argv) > 1 else torch.cuda.device_count()
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    mp.spawn(rank_main, args=(world, size, 29533), nprocs=world)
