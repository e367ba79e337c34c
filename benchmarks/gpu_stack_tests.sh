#!/usr/bin/env bash
# On the GPU machine (Python 3.12, its own JAX): the test suite on that JAX with the CPU platform
# (as CI runs it, more workers), then the GPU kernels against XLA (gpu_stack_check.py).
# Packages the machine lacks travel as wheels in .whl/ (flax, orbax-checkpoint, optax, pytest,
# pytest-xdist and their needs). Writes $OUT/tests.log and $OUT/gpu_stack_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())"
JAX_PLATFORMS=cpu timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider \
    -n "${WORKERS:-12}" 2>&1 | tee "$OUT/tests.log" | tail -25
python3 benchmarks/gpu_stack_check.py 2>&1 | grep -v Warning | tail -20
