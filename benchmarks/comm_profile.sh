#!/bin/bash
# What bounds bs-1 tensor-parallel decode: per-decode-step GPU profiles of GPU 0 for llama3-8b at
# TP 1/2/4 (benchmarks/decode_profile.py, the trace of generate(n) minus that of generate(1)):
# GEMM, collective and other kernel time, and the idle time between kernels.
#   OUT=benchmarks/results [TP_SIZES="1 2"] bash benchmarks/comm_profile.sh   (TP4 needs 4 GPUs)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for tp in ${TP_SIZES:-1 2 4}; do
  echo "=== TP$tp"
  timeout 200 python benchmarks/decode_profile.py --arch llama3-8b --batch 1 --new-tokens 65 \
    --tp $tp --json $OUT/tp_profile-tp$tp.json 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^W1" | head -16
done
