"""Live sources from Python: gantry.serve publishing a state dict, readers in this process and
in others, new versions, and gantry.update into existing tensors. Every check compares with
the arrays the test built itself (or a reference read with the ``safetensors`` package),
never with what gantry read. numpy is required; torch tests run when torch is installed (and
must under GANTRY_REQUIRE_GPU=1), the CUDA trial when a GPU is there too.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import types
import unittest

import numpy as np

import gantry

REQUIRE_GPU = os.environ.get("GANTRY_REQUIRE_GPU") == "1"

try:
    import torch
except ImportError:
    torch = None


def state_dict(seed, count=20):
    """``count`` arrays of varied dtypes and shapes (a 0-d and an empty one among them)."""
    rng = np.random.default_rng(seed)
    dtypes = [np.float32, np.float16, np.int64, np.uint8, np.int8, np.float64, np.bool_]
    out = {}
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        shape = (i % 4 + 1, 3 * (i % 5 + 1))
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        arr = raw.view(dtype).reshape(shape) if dtype is not np.bool_ else (raw & 1).astype(np.bool_).reshape(shape)
        out[f"layers.{i:02}.weight"] = arr
    out["scalar"] = np.array(1.5, dtype=np.float32)
    out["empty"] = np.zeros((0, 4), dtype=np.float16)
    return out


def changed(sd, names):
    """A copy of ``sd`` with the arrays ``names`` changed."""
    out = {n: a.copy() for n, a in sd.items()}
    for n in names:
        flat = out[n].reshape(-1).view(np.uint8)
        flat ^= 0x5A
    return out


def nbytes(arr):
    return int(arr.nbytes)


# A reader in another process: the table and every tensor's bytes, as JSON.
READER = """
import json, sys
import gantry
url = sys.argv[1]
table = {i.name: [i.dtype, list(i.shape)] for i in gantry.inspect(url)}
loaded = gantry.load(url, device="cpu", framework="dlpack")
print(json.dumps({"table": table, "bytes": {n: t.tobytes().hex() for n, t in loaded.items()}}))
"""

DTYPE_NAMES = {"float32": "F32", "float16": "F16", "int64": "I64", "uint8": "U8", "int8": "I8",
               "float64": "F64", "bool": "BOOL"}


class LiveTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory(dir=os.environ.get("GANTRY_TEST_TMPDIR"))
        self.socket = os.path.join(self.dir.name, "weights.sock")

    def tearDown(self):
        self.dir.cleanup()

    def check_same(self, loaded, sd):
        self.assertEqual(set(loaded), set(sd))
        for n, arr in sd.items():
            got = loaded[n]
            self.assertEqual(tuple(got.shape), arr.shape, n)
            self.assertEqual(np.asarray(got).tobytes(), arr.tobytes(), n)

    def test_a_served_state_dict_loads_bit_exact_in_another_process(self):
        sd = state_dict(1)
        with gantry.serve(sd, socket=self.socket) as server:
            self.assertEqual(server.url, "unix://" + self.socket)
            self.assertEqual(os.stat(self.socket).st_mode & 0o777, 0o600)
            out = subprocess.run([sys.executable, "-c", READER, server.url], capture_output=True,
                                 text=True, timeout=120)
            self.assertEqual(out.returncode, 0, out.stderr)
            got = json.loads(out.stdout)
            for n, arr in sd.items():
                self.assertEqual(got["table"][n], [DTYPE_NAMES[str(arr.dtype)], list(arr.shape)], n)
                self.assertEqual(bytes.fromhex(got["bytes"][n]), arr.tobytes(), n)
            self.assertEqual(set(got["bytes"]), set(sd))
            # In this process too, and through stream.
            self.check_same(gantry.load(server.url, device="cpu", framework="numpy"), sd)
            self.check_same(dict(gantry.stream(server.url, device="cpu", framework="numpy")), sd)
            gantry.inspect(server.url)
        self.assertFalse(os.path.exists(self.socket), "close left the socket file")

    def test_the_publication_reads_back_with_the_safetensors_package(self):
        import safetensors.numpy

        sd = state_dict(2)
        with gantry.serve(sd, socket=self.socket) as server:
            folder = os.path.join(self.dir.name, "copy")
            os.mkdir(folder)
            # Served again from the live source: a checkpoint published from a checkpoint.
            with gantry.serve(server.url, socket=os.path.join(self.dir.name, "again.sock")) as again:
                loaded = gantry.load(again.url, device="cpu", framework="numpy")
            path = os.path.join(folder, "model.safetensors")
            safetensors.numpy.save_file({n: np.asarray(t) for n, t in loaded.items()}, path)
            self.check_same(safetensors.numpy.load_file(path), sd)

    def test_a_reader_holding_the_old_version_gets_it_whole_and_the_next_gets_the_new(self):
        v1, v2 = state_dict(3), None
        v2 = changed(v1, list(v1))
        with gantry.serve(v1, socket=self.socket) as server:
            first = server.version
            held = gantry.stream(server.url, device="cpu", framework="numpy")  # leases v1
            second = server.update(v2)
            self.assertNotEqual(first, second)
            self.assertEqual(server.version, second)
            self.check_same(dict(held), v1)
            self.assertEqual(held.report()["version"], first)
            after = gantry.stream(server.url, device="cpu", framework="numpy")
            self.check_same(dict(after), v2)
            self.assertEqual(after.report()["version"], second)

    def test_update_into_existing_arrays_moves_only_changed_tensors(self):
        v1 = state_dict(4)
        with gantry.serve(v1, socket=self.socket) as server:
            dest = {n: np.zeros_like(a) for n, a in v1.items()}
            addresses = {n: a.ctypes.data for n, a in dest.items()}
            report = gantry.update(dest, server.url)
            self.assertEqual(report.moved_tensors, len(v1))
            self.assertEqual(report.moved_bytes, sum(nbytes(a) for a in v1.values()))
            self.assertEqual(report.version, server.version)
            self.check_same(dest, v1)
            # 2 of 22 tensors change in version 2.
            names = ["layers.03.weight", "layers.17.weight"]
            v2 = changed(v1, names)
            version = server.update(v2)
            report = gantry.update(dest, server.url, changed_only=True)
            self.assertEqual((report.moved_tensors, report.skipped_tensors), (2, len(v1) - 2))
            self.assertEqual(report.moved_bytes, sum(nbytes(v2[n]) for n in names))
            self.assertEqual(report.version, version)
            self.check_same(dest, v2)
            self.assertEqual(addresses, {n: a.ctypes.data for n, a in dest.items()}, "reallocated")

    def test_a_mismatch_is_refused_before_any_byte_moves(self):
        v1 = state_dict(5)
        with gantry.serve(v1, socket=self.socket) as server:
            dest = {n: np.full_like(a, 7) for n, a in v1.items()}
            before = {n: a.copy() for n, a in dest.items()}
            bad = dict(dest)
            bad["layers.19.weight"] = np.zeros((1, 1), dtype=v1["layers.19.weight"].dtype)
            with self.assertRaises(gantry.ConfigError) as e:
                gantry.update(bad, server.url)
            self.assertIn("layers.19.weight", str(e.exception))
            self.check_same(dest, before)
            partial = {n: a for n, a in dest.items() if n != "scalar"}
            with self.assertRaises(gantry.ConfigError) as e:
                gantry.update(partial, server.url)
            self.assertIn("scalar", str(e.exception))
            self.check_same(dest, before)
            report = gantry.update(partial, server.url, ignore_extra=True)
            self.assertEqual(report.ignored_tensors, 1)
            self.assertEqual(dest["scalar"].tobytes(), before["scalar"].tobytes())
            # Two names over the same memory (tied weights) are refused.
            tied = dict(dest, **{"layers.01.weight": dest["layers.08.weight"]})
            with self.assertRaises((ValueError, gantry.ConfigError)):
                gantry.update(tied, server.url)
            # changed_only needs a live source.
            path = os.path.join(self.dir.name, "m.safetensors")
            import safetensors.numpy
            safetensors.numpy.save_file(v1, path)
            with self.assertRaises(gantry.ConfigError) as e:
                gantry.update(dest, path, changed_only=True)
            self.assertIn("live source", str(e.exception))
            report = gantry.update(dest, path)
            self.assertEqual((report.moved_tensors, report.version), (len(v1), None))
            self.check_same(dest, v1)

    def test_bad_calls_are_clean_errors(self):
        with self.assertRaises(gantry.ConfigError):
            gantry.serve(state_dict(6), socket=self.socket, device="tpu:0")
        self.assertFalse(os.path.exists(self.socket))
        with self.assertRaises(gantry.LiveError):
            gantry.load("unix://" + self.socket, device="cpu")
        with self.assertRaises(TypeError):
            gantry.serve({"a": [1, 2]}, socket=self.socket)
        self.assertFalse(os.path.exists(self.socket), "a failed serve left its socket")
        with self.assertRaises(ValueError):
            gantry.serve(state_dict(6), socket=self.socket, socket_mode=0o10000)
        server = gantry.serve(state_dict(6), socket=self.socket, socket_mode=0o640)
        self.assertEqual(os.stat(self.socket).st_mode & 0o777, 0o640)
        with self.assertRaises(gantry.LiveError):  # the socket is taken
            gantry.serve(state_dict(6), socket=self.socket)
        server.close()
        server.close()  # twice is fine
        with self.assertRaises(RuntimeError):
            server.update(state_dict(6))


    def test_connections_are_capped_per_user(self):
        for bad, error in [(0, gantry.ConfigError), (1025, gantry.ConfigError), (True, TypeError),
                           (1.5, TypeError)]:
            with self.assertRaises(error, msg=repr(bad)):
                gantry.serve(state_dict(7), socket=self.socket, max_connections_per_user=bad)
            self.assertFalse(os.path.exists(self.socket), "a refused serve left its socket")
        sd = state_dict(7)
        # One connection: the lease an inspect takes, in a process of its own.
        inspect = [sys.executable, "-c", "import gantry, sys; print(len(gantry.inspect(sys.argv[1])))"]
        with gantry.serve(sd, socket=self.socket, max_connections_per_user=1) as server:
            out = subprocess.run(inspect + [server.url], capture_output=True, text=True, timeout=120)
            self.assertEqual((out.returncode, out.stdout.strip()), (0, str(len(sd))), out.stderr)
            # This process keeps its lease (one per source) after a load: the user's one
            # connection, so another process of this user is refused, saying why. (The server
            # frees the first reader's slot when it sees the close, on its own thread: until
            # then this load is refused too, so it is tried again for up to 30 s.)
            deadline = time.monotonic() + 30
            while True:
                try:
                    loaded = gantry.load(server.url, device="cpu", framework="numpy")
                    break
                except gantry.LiveError as e:
                    if "too many connections" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.check_same(loaded, sd)
            out = subprocess.run(inspect + [server.url], capture_output=True, text=True, timeout=120)
            self.assertNotEqual(out.returncode, 0, out.stdout)
            self.assertIn("LiveError", out.stderr)
            self.assertIn(f"too many connections from uid {os.geteuid()}", out.stderr)
            self.assertIn("at most 1 per user", out.stderr)

    def test_reading_the_version_or_closing_while_another_thread_publishes_does_not_deadlock(self):
        # In a child with a deadline: a deadlock (a thread holding the GIL waiting for the
        # server's lock while the publishing thread holds the lock and waits for the GIL) would
        # hang this test run forever.
        code = f"""
import threading, time, numpy as np, gantry
sd = {{"w": np.ones((32, 1024, 1024), dtype=np.uint8)}}
s = gantry.serve(sd, socket={self.socket!r})
done = []
def publish():
    for _ in range(4):
        s.update(sd)
    done.append(1)
t = threading.Thread(target=publish)
t.start()
end = time.time() + 20
while not done and time.time() < end:
    s.version
closer = threading.Thread(target=lambda: [s.update(sd) for _ in range(2)])
closer.start()
time.sleep(0.01)
s.close()
closer.join()
t.join()
print("ok")
"""
        try:
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired:
            self.fail("gantry.Server deadlocked: version/close while another thread published")
        # The closing thread's updates may fail (the server is closed): only a hang is wrong.
        self.assertIn("ok", out.stdout, out.stderr)


class VllmLiveSourceTests(unittest.TestCase):
    def test_a_live_source_is_the_model_path_or_the_extra_config_source(self):
        import gantry.vllm
        url = "unix:///run/weights.sock"
        self.assertEqual(gantry.vllm._model_folder(types.SimpleNamespace(model=url)), url)
        config = types.SimpleNamespace(model="/no/such/model")
        self.assertEqual(gantry.vllm._model_folder(config, url), url)


@unittest.skipUnless(torch is not None or REQUIRE_GPU, "torch is not installed")
class TorchLiveTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory(dir=os.environ.get("GANTRY_TEST_TMPDIR"))
        self.socket = os.path.join(self.dir.name, "weights.sock")
        gen = torch.Generator().manual_seed(11)
        self.sd = {f"w{i:02}": torch.randn(4 + i, 8, generator=gen).to(torch.bfloat16) for i in range(20)}
        self.sd["t"] = torch.randn(6, 5, generator=gen).t()  # not contiguous

    def tearDown(self):
        self.dir.cleanup()

    @staticmethod
    def raw(t):
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    def test_a_torch_state_dict_is_served_and_updated_in_place(self):
        with gantry.serve(self.sd, socket=self.socket) as server:
            loaded = gantry.load(server.url, device="cpu", framework="torch")
            for n, t in self.sd.items():
                self.assertEqual(loaded[n].dtype, t.dtype, n)
                self.assertEqual(self.raw(loaded[n]), self.raw(t), n)
            dest = {n: torch.zeros_like(t).contiguous() for n, t in self.sd.items()}
            gantry.update(dest, server.url)
            v2 = dict(self.sd, w03=self.sd["w03"] + 1, w11=self.sd["w11"] * 2)
            server.update(v2)
            report = gantry.update(dest, server.url, changed_only=True)
            self.assertEqual(report.moved_tensors, 2)
            for n, t in v2.items():
                self.assertEqual(self.raw(dest[n]), self.raw(t), n)

    def test_update_into_cuda_tensors(self):
        if not torch.cuda.is_available():
            if REQUIRE_GPU:
                self.fail("GANTRY_REQUIRE_GPU=1 but no GPU")
            self.skipTest("no GPU")
        with gantry.serve(self.sd, socket=self.socket) as server:
            dest = {n: torch.zeros_like(t, device="cuda:0").contiguous() for n, t in self.sd.items()}
            report = gantry.update(dest, server.url, changed_only=True)
            self.assertEqual(report.moved_tensors, len(self.sd))
            v2 = dict(self.sd, w05=self.sd["w05"] - 3, w19=self.sd["w19"] * 0.5)
            server.update(v2)
            report = gantry.update(dest, server.url, changed_only=True)
            self.assertEqual((report.moved_tensors, report.skipped_tensors), (2, len(self.sd) - 2))
            self.assertEqual(report.moved_bytes, sum(v2[n].numel() * 2 for n in ("w05", "w19")))
            for n, t in v2.items():
                self.assertEqual(self.raw(dest[n]), self.raw(t), n)
            # Served from CUDA tensors (copied to the host first).
            with gantry.serve({n: t for n, t in dest.items()}, socket=self.socket + "2") as again:
                loaded = gantry.load(again.url, device="cuda:0", framework="torch")
                for n, t in v2.items():
                    self.assertEqual(self.raw(loaded[n]), self.raw(t), n)


if __name__ == "__main__":
    unittest.main()
