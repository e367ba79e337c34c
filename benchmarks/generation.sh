#!/usr/bin/env bash
# On the GPU machine: benchmarks/generation.py with the wheels of .whl/ (as gpu_stack_tests.sh)
# and the previous commit's dsjax in baseline_head/ (git archive BASE dsjax converters
# pallas_kernels | tar -x -C baseline_head, BASE: the commit before the change measured)
# for the baseline row.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/generation.py ${BASELINE:---baseline baseline_head} "$@" 2>&1 | grep -v Warning | tail -30
