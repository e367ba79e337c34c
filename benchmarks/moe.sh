#!/usr/bin/env bash
# On the GPU machine: benchmarks/moe.py with the wheels of .whl/ (the machine's own jax, torch
# and transformers), its arguments passed on. Writes $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout "${LIMIT:-560}" python3 benchmarks/moe.py "$@" 2>&1 | grep -v Warning | tee "${OUT:-/tmp}/moe.log" | tail -30
