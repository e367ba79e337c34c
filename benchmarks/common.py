"""Shared pieces of the GPU benchmarks: environment record, bandwidth ceiling, timing, output."""

from __future__ import annotations

from pathlib import Path

from dsjax import bench
from dsjax.bench import environment, median_time

__all__ = ["RESULTS", "decode_timing", "environment", "gemv_bandwidth", "median_time", "write"]

RESULTS = Path(__file__).parent / "results"


def decode_timing(run, new_tokens: int, reps: int) -> dict:
    """run(n) generates n tokens (and blocks). Decode ms/token = (T(n) - T(1)) / (n - 1): the
    prompt phase and the per-call overhead cancel out."""
    t_full, _ = median_time(lambda: run(new_tokens), reps)
    t_one, _ = median_time(lambda: run(1), reps)
    return {"t_generate_s": t_full, "t_prefill_s": t_one,
            "decode_ms_per_token": (t_full - t_one) / (new_tokens - 1) * 1e3}


def write(name: str, payload: dict, markdown: str, out_dirs: list[Path]) -> None:
    for d in out_dirs:
        bench.write(d, name, payload, markdown)


def gemv_bandwidth(**shape) -> dict:
    """The bf16 GEMV ceiling at the H200 shape of DESIGN.md (on any backend: these scripts are
    GPU measurements), unless a shape is given."""
    k, n = bench.GEMV_SHAPE["gpu"]
    return bench.gemv_bandwidth(**{"k": k, "n": n, **shape})
