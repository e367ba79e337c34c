#!/usr/bin/env bash
# On a GPU machine: `bash benchmarks/gpu_run.sh NAME [ARGS...]` runs benchmarks/NAME.py with the
# wheels of .whl/ (flax, orbax, ...; the machine's own jax, torch and transformers), NVLink
# multicast off (KINDS.md; as comm_profile.sh), its arguments passed on after a --deadline that
# leaves the report time to be written before LIMIT seconds (default 560) stop it. For scripts
# that take --deadline (speed, moe_parallel, serving_parallel). Log: $OUT/NAME.log.
set -uo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: gpu_run.sh NAME [ARGS...]}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LIMIT=${LIMIT:-560}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "$LIMIT" python3 "benchmarks/$name.py" --deadline $(( $(date +%s) + LIMIT - 40 )) "$@" 2>&1 \
    | grep -v Warning | tee "${OUT:-/tmp}/$name.log" | tail -60
