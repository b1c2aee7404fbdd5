"""Run:ai Model Streamer in its S3 mode reading a checkpoint's shards into host memory (its own
buffers; each tensor is touched, not copied). One JSON line.

    python3 benches/peers/runai_s3.py s3://bucket/prefix/ model-00001-of-00002.safetensors ...

Needs runai-model-streamer and runai-model-streamer-s3; the endpoint and credentials come from
the AWS variables (set RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0 for path-style stores).
"""
import os, sys, time, json
from runai_model_streamer import SafetensorsStreamer
src = sys.argv[1]
files = [src + f for f in sys.argv[2:]]
t = time.perf_counter(); n = 0; count = 0
with SafetensorsStreamer() as s:
    s.stream_files(files)
    for name, tensor in s.get_tensors():
        n += tensor.numel() * tensor.element_size(); count += 1
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "bytes": n, "tensors": count, "gb_per_s": n / dt / 1e9}))
