#!/usr/bin/env bash
# On the GPU machine: benchmarks/serving.py with the wheels of .whl/ (flax, orbax, ...; the
# machine's own jax, torch and transformers), its arguments passed on. Writes $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${LIMIT:-560}" python3 benchmarks/serving.py "$@" 2>&1 | grep -v Warning | tee "${OUT:-/tmp}/serving.log" | tail -40
