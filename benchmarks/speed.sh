#!/usr/bin/env bash
# On the GPU machine: benchmarks/speed.py through gpu_run.sh (the wheels of .whl/, a --deadline
# that leaves the report time to be written before LIMIT seconds, default 560), its arguments
# passed on (--parts ...). Writes $OUT (log: $OUT/speed.log).
exec bash "$(dirname "$0")/gpu_run.sh" speed "$@"
