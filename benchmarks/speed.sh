#!/usr/bin/env bash
# On the GPU machine: benchmarks/speed.py with the wheels of .whl/ (flax, orbax, ...; the
# machine's own jax), its arguments passed on (--parts ...), with a deadline that leaves the
# report time to be written before LIMIT seconds (default 560) stop it. Writes $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-560}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "$LIMIT" python3 benchmarks/speed.py --deadline $(( $(date +%s) + LIMIT - 40 )) "$@" 2>&1 \
    | grep -v Warning | tee "${OUT:-/tmp}/speed.log" | tail -40
