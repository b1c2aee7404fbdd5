"""Run:ai Model Streamer in its S3 mode reading a checkpoint's shards into host memory, or with
RUNAI_DEVICE (e.g. cuda:0) on into a GPU. One JSON line: seconds, tensor bytes, GB/s, the
device and which API read them.

    [RUNAI_DEVICE=cuda:0] python3 benches/peers/runai_s3.py s3://bucket/prefix/ model-00001-of-00002.safetensors ...

With torch: `SafetensorsStreamer` into CPU tensors (its default, `owned=True`: every tensor the
caller's to keep), how vLLM loads with it; each tensor is counted, not copied again. With
RUNAI_DEVICE, each tensor `get_tensors()` yields is copied `.to(RUNAI_DEVICE)` as it comes (what
vLLM's loader does with them) and the copies are kept, as a model keeps its weights; the time
ends after `torch.cuda.synchronize()`. CUDA starts (context and a first allocation) before the
time starts, as in benches/peers/race.py; the JSON's cuda_start_seconds says how long that took.
Without torch (or with RUNAI_RAW=1; not with RUNAI_DEVICE): the streamer's own request API
(`libstreamer`, the C++ reader the Python streamer drives) reads each shard's header, then
every tensor's byte range into one host buffer per shard. The modules are imported before the
time starts; it runs from the first request to the last byte.

Needs runai-model-streamer and runai-model-streamer-s3; the endpoint and credentials come from
the AWS variables (set RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0 for path-style stores).
"""
import ctypes
import importlib.util
import json
import os
import struct
import sys
import time
import types


def with_torch(files, device=None):
    """Returns (a function that streams the files and returns (tensor bytes, tensors), into CPU
    tensors or, with a device, on into copies there; CUDA's start-up in seconds). The imports
    and CUDA's start-up happen here, outside the time."""
    import torch
    from runai_model_streamer import SafetensorsStreamer

    cuda_start = 0.0
    if device:
        t = time.perf_counter()
        torch.cuda.init()
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
        cuda_start = time.perf_counter() - t

    def stream():
        n = count = 0
        kept = []
        with SafetensorsStreamer() as s:
            s.stream_files(files)
            for _, tensor in s.get_tensors():
                n += tensor.numel() * tensor.element_size()
                count += 1
                if device:
                    kept.append(tensor.to(device))
        if device:
            torch.cuda.synchronize(device)
        return n, count

    return stream, cuda_start


def libstreamer():
    """The request API, imported without the package's __init__ (which imports torch)."""
    spec = importlib.util.find_spec("runai_model_streamer")
    if spec is None:
        sys.exit("runai_model_streamer is not installed")
    package = types.ModuleType("runai_model_streamer")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("runai_model_streamer", package)
    from runai_model_streamer.libstreamer import libstreamer as lib

    return lib


def fetch(lib, streamer, paths, ranges):
    """Reads ranges[i] = [(offset, size), ...] of paths[i] into fresh buffers; returns them."""
    buffers = [[bytearray(size) for _, size in file_ranges] for file_ranges in ranges]
    dsts = [
        ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)) if len(b) else 0
        for file_buffers in buffers
        for b in file_buffers
    ]
    offsets = [o for file_ranges in ranges for o, _ in file_ranges]
    sizes = [s for file_ranges in ranges for _, s in file_ranges]
    lib.runai_request(streamer, paths, [len(r) for r in ranges], offsets, sizes, dsts)
    for _ in range(len(sizes)):
        response = lib.runai_response(streamer)
        if response is None:
            sys.exit("the streamer finished before every range was read")
        if response[0] != lib.SUCCESS_ERROR_CODE:
            sys.exit(f"range {response[2]}:{response[3]}: {lib.runai_response_str(response[0])}")
    return buffers


def raw(files):
    """Returns (a function that reads the files with the request API, imported here; 0.0)."""
    lib = libstreamer()
    return (lambda: read_raw(lib, files)), 0.0


def read_raw(lib, files):
    streamer = lib.runai_start()
    try:
        prefixes = fetch(lib, streamer, files, [[(0, 8)] for _ in files])
        lengths = [struct.unpack("<Q", p[0])[0] for p in prefixes]
        headers = fetch(lib, streamer, files, [[(8, n)] for n in lengths])
        ranges = []
        for length, header in zip(lengths, headers):
            table = json.loads(bytes(header[0]))
            table.pop("__metadata__", None)
            start = 8 + length
            ranges.append([(start + t["data_offsets"][0], t["data_offsets"][1] - t["data_offsets"][0])
                           for t in table.values()])
        data = fetch(lib, streamer, files, ranges)
    finally:
        lib.runai_end(streamer)
    return sum(len(b) for file_buffers in data for b in file_buffers), sum(len(r) for r in ranges)


def main():
    src = sys.argv[1]
    files = [src + f for f in sys.argv[2:]]
    device = os.environ.get("RUNAI_DEVICE") or None
    has_torch = importlib.util.find_spec("torch") is not None
    if device and not has_torch:
        sys.exit(f"RUNAI_DEVICE={device} needs torch")
    use_torch = has_torch and (device is not None or os.environ.get("RUNAI_RAW") != "1")
    stream, cuda_start = with_torch(files, device) if use_torch else raw(files)
    t = time.perf_counter()
    n, count = stream()
    dt = time.perf_counter() - t
    if not use_torch:
        api = "libstreamer requests"
    elif device:
        api = f"SafetensorsStreamer, torch CPU tensors .to({device})"
    else:
        api = "SafetensorsStreamer, torch CPU tensors"
    print(json.dumps({"seconds": dt, "bytes": n, "tensors": count, "gb_per_s": n / dt / 1e9,
                      "device": device or "cpu", "cuda_start_seconds": cuda_start, "api": api}))


if __name__ == "__main__":
    main()
