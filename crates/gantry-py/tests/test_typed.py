"""Typed values from Python that must never crash or exhaust the interpreter: shard counts,
ranks, sizes and paths are checked before anything is allocated, and whatever a caller passes
to an entry point ends in a result, a ``GantryError`` subclass, a ``TypeError`` or a
``ValueError``, never a ``PanicException`` or an ``OverflowError``. Run by tests/python.rs with
the other Python tests; host memory only, no servers (endpoints point at 127.0.0.1:1).

Loads are compared with the file's bytes as plain ``open().read()`` gives them.
"""

import json
import os
import random
import struct
import tempfile
import unittest

import gantry
from gantry import _gantry

ALLOWED = (gantry.GantryError, TypeError, ValueError)


def write_tiny(path):
    """A 4x6 F32 matrix ``w`` and a 1-D ``norm``; returns ``w``'s bytes as written."""
    w = bytes(range(96))
    norm = bytes([7]) * 16
    header = json.dumps(
        {
            "w": {"dtype": "F32", "shape": [4, 6], "data_offsets": [0, 96]},
            "norm": {"dtype": "F32", "shape": [4], "data_offsets": [96, 112]},
        }
    ).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + w + norm)
    return w


class TypedValues(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "tiny.safetensors")
        write_tiny(self.path)
        with open(self.path, "rb") as f:
            data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        self.w = data[8 + n : 8 + n + 96]

    def tearDown(self):
        self.dir.cleanup()

    def test_shard_counts_are_bounded_before_anything_is_built(self):
        for shard in ["replicate:30000000", "tp:18446744073709551615", "dim0:1025"]:
            with self.assertRaises(ValueError) as e:
                gantry.load(self.path, "cpu", shard=shard, framework="dlpack")
            self.assertIn("1 to 1024", str(e.exception))
        # The bound itself loads, each destination's `w` as the file holds it.
        placed = gantry.load(self.path, "cpu", shard="replicate:64", framework="dlpack")
        self.assertEqual(len(placed), 64)
        for shares in placed:
            self.assertEqual(shares["w"].tobytes(), self.w)

    def test_a_shard_that_is_not_a_string_is_a_type_error(self):
        for shard in [2, 2.5, b"tp:2", ["tp:2"]]:
            with self.assertRaises(TypeError):
                gantry.load(self.path, "cpu", shard=shard, framework="dlpack")

    def test_a_missing_dimension_names_the_tensor(self):
        with self.assertRaises(gantry.ConfigError) as e:
            gantry.load(self.path, "cpu", shard="dim5:2", framework="dlpack")
        self.assertIn("'w'", str(e.exception))

    def test_ranks_outside_the_world_are_refused(self):
        for rank, world in [(5, 2), (2, 2), (-1, 2), (0, 0), (0, 10**9)]:
            with self.assertRaises(gantry.ConfigError):
                gantry.load(self.path, "cpu", rank=rank, world=world, framework="dlpack")
        with self.assertRaises(TypeError):
            gantry.load(self.path, "cpu", rank="0", world=2, framework="dlpack")
        with self.assertRaises(gantry.ConfigError):
            gantry.load(self.path, "cuda:0", shard="tp:2", rank=5, world=2, framework="dlpack")

    def test_sizes_out_of_range_are_value_errors_naming_the_keyword(self):
        for key, value in [
            ("chunk_bytes", 2**70),
            ("staging_bytes", -1),
            ("queue_depth", 2**64),
            ("object_part_bytes", 2**64 + 4096),
        ]:
            with self.assertRaises(ValueError) as e:
                gantry.load(self.path, "cpu", framework="dlpack", **{key: value})
            self.assertIn(key, str(e.exception))
        with self.assertRaises(gantry.ConfigError) as e:
            gantry.load(
                self.path, "cuda:0", shard="tp:2", rank=0, world=2, window_mib=2**64,
                framework="dlpack",
            )
        self.assertIn("window_mib", str(e.exception))

    def test_an_empty_cache_dir_is_refused(self):
        with self.assertRaises(gantry.ConfigError) as e:
            gantry.load(self.path, "cpu", cache_dir="", framework="dlpack")
        self.assertIn("cache_dir", str(e.exception))

    def test_a_trace_keyword_writes_the_timeline(self):
        trace = os.path.join(self.dir.name, "load.trace.json")
        tensors = gantry.load(self.path, "cpu", trace=trace, framework="dlpack")
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
        landed = sorted(
            e["args"]["name"] for e in events if e.get("cat") == "tensor" and e["name"] == "landed"
        )
        self.assertEqual(landed, sorted(tensors))
        with self.assertRaises(gantry.ConfigError) as e:
            gantry.load(self.path, "cpu", trace="", framework="dlpack")
        self.assertIn("trace", str(e.exception))

    def test_random_values_end_in_a_result_or_a_clean_error(self):
        rng = random.Random(22)
        ints = [0, 1, -1, 7, 4096, 2**20, 2**31, 2**63, 2**64, 2**70, -(2**70)]
        odd = [None, "", "x" * 300, "\n", "tp:2", 1.5, float("nan"), True, [], {}, b"\xff"]
        keywords = [
            "path", "profile", "queue_depth", "chunk_bytes", "buffered_chunk_bytes",
            "staging_bytes", "threads", "hot_fraction", "verify_sha256", "cache_dir",
            "object_part_bytes", "object_concurrency", "s3_endpoint", "s3_region",
            "gcs_endpoint", "azure_endpoint", "object_options", "no_such_keyword",
        ]
        def value():
            return rng.choice([rng.choice(ints), rng.choice(odd), rng.randrange(-10, 10**6)])
        outcomes = {}
        for case in range(300):
            kind = rng.choice(["load", "stream", "inspect", "placed", "coop"])
            config = {k: value() for k in rng.sample(keywords, rng.randint(0, 3))}
            config = {k: v for k, v in config.items() if k != "cache_dir" or v != "x" * 300}
            try:
                if kind == "inspect":
                    gantry.inspect(self.path, **config)
                elif kind == "stream":
                    with gantry.stream(self.path, "cpu", framework="dlpack", **config) as s:
                        for name, t in s:
                            if name == "w":
                                self.assertEqual(t.tobytes(), self.w)
                elif kind == "placed":
                    shard = rng.choice(["replicate:", "dim0:", "tp:", "dim9:", "x:"]) + str(value())
                    gantry.load(self.path, "cpu", shard=shard, framework="dlpack", **config)
                elif kind == "coop":
                    gantry.load(
                        self.path, value(), rank=value(), world=value(), framework="dlpack",
                        **config,
                    )
                else:
                    loaded = gantry.load(self.path, "cpu", framework="dlpack", **config)
                    self.assertEqual(loaded["w"].tobytes(), self.w)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except ALLOWED as e:
                outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            except BaseException as e:  # PanicException derives from BaseException
                self.fail(f"case {case} ({kind}, {config!r}): {type(e).__name__}: {e}")
        self.assertGreater(outcomes.get("ok", 0), 0, outcomes)


if __name__ == "__main__":
    unittest.main()
