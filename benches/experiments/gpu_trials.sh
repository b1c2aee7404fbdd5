#!/bin/bash
# Usage (on the GPU machine, from the repository root): benches/experiments/gpu_trials.sh DIR [TEST ...]
# Runs the test binaries benches/experiments/pack.sh put in DIR/t (all of them by default)
# with GANTRY_REQUIRE_GPU=1, so a trial that cannot find its GPUs fails instead of skipping;
# the CLI tests use DIR/bin/gantry (GANTRY_TEST_BIN), the C clients DIR/lib (GANTRY_LIB_DIR;
# they compile against the headers of the path the tests were built at, so the checkout must
# sit there too, a symbolic link will do); PYTHON_TESTS (unittest names, e.g.
# CooperativeTests) also runs those Python tests against DIR/py. NCCL comes from torch's
# wheel when GANTRY_NCCL_LIB is unset. Prints one line per test binary and a total.
set -u
DIR=$(realpath "$1"); shift
export GANTRY_REQUIRE_GPU=1 GANTRY_TEST_BIN=$DIR/bin/gantry GANTRY_LIB_DIR=$DIR/lib
export GANTRY_TEST_TMPDIR=${GANTRY_TEST_TMPDIR:-/tmp/gantry-trials}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -n "${GANTRY_NCCL_LIB:-}" ] || export GANTRY_NCCL_LIB=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], "lib", "libnccl.so.2"))' 2>/dev/null || find / -name libnccl.so.2 2>/dev/null | head -1)
mkdir -p "$GANTRY_TEST_TMPDIR"
[ $# -gt 0 ] || set -- $(ls "$DIR/t")
failed=0
for t in "$@"; do
  log=$GANTRY_TEST_TMPDIR/$t.log
  if "$DIR/t/$t" --test-threads=1 > "$log" 2>&1; then
    echo "PASS $t: $(grep -h '^test result' "$log" | tail -1)"
  else
    failed=$((failed + 1)); echo "FAIL $t"; grep -E "^test .*FAILED|panicked|^---- " -A12 "$log" | head -60
  fi
done
if [ -n "${PYTHON_TESTS:-}" ]; then
  if PYTHONPATH=$DIR/py python3 crates/gantry-py/tests/test_gantry.py $PYTHON_TESTS -v > "$GANTRY_TEST_TMPDIR/python.log" 2>&1; then
    echo "PASS python: $(tail -3 "$GANTRY_TEST_TMPDIR/python.log" | tr '\n' ' ')"
  else
    failed=$((failed + 1)); echo "FAIL python"; tail -40 "$GANTRY_TEST_TMPDIR/python.log"
  fi
fi
echo "failed: $failed"
exit $failed
