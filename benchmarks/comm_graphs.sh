#!/bin/bash
# Is the idle time of bs-1 TP decode the CUDA-graph splits around XLA's own all-reduce kernels?
# Per-decode-step profiles of GPU 0 (8 layers of llama3-8b, TP=$TP) with XLA's all-reduce kernel
# or NCCL's, with and without collectives inside the command buffers (CUDA graphs).
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES --xla_gpu_graph_min_graph_size=1"
NK="--xla_gpu_allow_all_reduce_kernel=false"
prof() { echo "=== $1: ${*:2}"; XLA_FLAGS="${*:2}" timeout 120 python benchmarks/decode_profile.py --arch llama3-8b --layers 8 --batch 1 --new-tokens 65 --tp ${TP:-2} 2>&1 | grep -E "^llama|^per decode|^ +[0-9]" | head -12; }
prof base
prof nccl $NK
prof nccl-graphs $NK $CB
prof graphs $CB
