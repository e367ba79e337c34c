"""Shared pieces of the GPU benchmarks: environment record, bandwidth ceiling, timing, output."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    import jax

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("DSJAX_COMMIT") or commit or "unknown",
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
    }


def median_time(fn, reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time (s) of fn() (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def decode_timing(run, new_tokens: int, reps: int) -> dict:
    """run(n) generates n tokens (and blocks). Decode ms/token = (T(n) - T(1)) / (n - 1): the
    prompt phase and the per-call overhead cancel out."""
    t_full, _ = median_time(lambda: run(new_tokens), reps)
    t_one, _ = median_time(lambda: run(1), reps)
    return {"t_generate_s": t_full, "t_prefill_s": t_one,
            "decode_ms_per_token": (t_full - t_one) / (new_tokens - 1) * 1e3}


def gemv_bandwidth(k: int = 8192, n: int = 28672, copies: int = 3, calls: int = 20, reps: int = 7) -> dict:
    """Bytes/s that XLA's bf16 GEMV [1, k] @ [k, n] reads: the weight-read ceiling the floors use.
    Rotates over `copies` weight matrices so that L2 never holds the next one."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), copies + 1)
    ws = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in keys[1:]]
    x = jax.random.normal(keys[0], (1, k), jnp.bfloat16)
    f = jax.jit(lambda x, w: x @ w)

    def run():
        out = [f(x, ws[i % copies]) for i in range(calls)]
        jax.block_until_ready(out)

    t, _ = median_time(run, reps, warmup=2)
    per_call = t / calls
    return {"shape": [1, k, n], "us_per_gemv": per_call * 1e6,
            "bytes_per_s": k * n * 2 / per_call}


def write(name: str, payload: dict, markdown: str, out_dirs: list[Path]) -> None:
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(json.dumps(payload, indent=2))
        (d / f"{name}.md").write_text(markdown)
