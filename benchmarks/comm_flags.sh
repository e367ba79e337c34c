#!/bin/bash
# XLA collective flag sweep for bs-1 TP latency (8 layers of llama3-8b)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi topo -m > $OUT/topo.txt 2>&1
run() { name=$1; shift; echo "=== $name: $*"; XLA_FLAGS="$*" timeout 200 python benchmarks/parallel.py --part latency --layers 8 --reps 3 --suffix=-flags-$name --out $OUT > $OUT/$name.log 2>&1; echo "rc=$?"; grep -E "ms/token|rel. L2|Error|error" $OUT/$name.log | tail -8; }
run base ""
run oneshot "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
run sync "--xla_gpu_disable_async_collectives=ALLREDUCE"
run symm "--xla_gpu_experimental_enable_nccl_symmetric_buffers=true"
run oneshot_sync "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true --xla_gpu_disable_async_collectives=ALLREDUCE"
