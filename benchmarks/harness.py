"""What the GPU scripts of benchmarks/ share, each written once:

- the environment record, environment(): date, commit, GPU, device count, Python, jax, jaxlib,
  flax, transformers and torch versions, the driver, XLA_FLAGS;
- the bf16 GEMV ceiling, gemv_bandwidth(): what every floor is set against;
- the decode measure, time_generate() + timing(): decode ms/token = (P50 T(n) - P50 T(1)) / (n - 1).
  These live in dsjax/bench.py, so that `dsjax bench` measures exactly the same way;
- loops for kernels: median_time (whole calls), best_time (back-to-back calls, fastest rep),
  time_in_jit (distinct inputs inside one jit, so L2 never holds the next one);
- the dsjax engine variants, DSJAX_VARIANTS: each a name for init_inference keywords whose
  `kernels` is a KernelPolicy. Two engines with different policies compile separately, so the
  variants of one run never share a trace;
- save(): NAME.json + NAME.md into the results directory (and $OUT when set); scripts call it
  after every variant, so that a run cut short keeps what it measured;
- error_line(): an exception as one line of a result row.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import bench
from dsjax.bench import (decode_ms_per_token, gemv_bandwidth, kv_bytes_per_step, kv_itemsize,  # noqa: F401
                         latency_stats, median_time, peak_memory_bytes, random_prompts, roofline,
                         time_generate, timing, weight_bytes_per_step)
from dsjax.policy import KernelPolicy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
T0 = time.perf_counter()

# ----------------------------------------------------------------------------- engine variants

INT8, INT8_G128, INT4_G128 = {"bits": 8}, {"bits": 8, "group_size": 128}, {"bits": 4, "group_size": 128}
XLA, PALLAS = KernelPolicy(), KernelPolicy.pallas()  # PALLAS: replace_with_kernel_inject=True


def pallas(**changes) -> KernelPolicy:
    """KernelPolicy.pallas() with some fields changed."""
    return dataclasses.replace(PALLAS, **changes)


ATTENTION = pallas(linear="xla", experts="xla")  # Pallas attention and cache write, XLA GEMMs
BOTH_NORMS = ("rmsnorm", "layernorm")
KV8 = {"kv_cache_dtype": "int8"}

DSJAX_VARIANTS = {  # name -> (label, init_inference keywords)
    "dsjax-xla": ("dsjax XLA", {"kernels": XLA}),
    "dsjax-kernels": ("dsjax Pallas attention + XLA GEMMs", {"kernels": ATTENTION}),
    "dsjax-pallas": ("dsjax all Pallas", {"kernels": PALLAS}),
    "dsjax-int8": ("dsjax INT8 weights (XLA)", {"kernels": XLA, "quant": INT8}),
    "dsjax-int8-kernels": ("dsjax INT8, Pallas attention + XLA GEMMs", {"kernels": ATTENTION, "quant": INT8}),
    "dsjax-int8-pallas": ("dsjax INT8, all Pallas", {"kernels": PALLAS, "quant": INT8}),
    "dsjax-int8g128-pallas": ("dsjax INT8 groups of 128, all Pallas", {"kernels": PALLAS, "quant": INT8_G128}),
    "dsjax-int4-pallas": ("dsjax INT4 groups of 128, all Pallas", {"kernels": PALLAS, "quant": INT4_G128}),
    "dsjax-kernels-kv8": ("dsjax Pallas attention + XLA GEMMs, INT8 KV cache", {"kernels": ATTENTION, **KV8}),
    "dsjax-pallas-kv8": ("dsjax all Pallas, INT8 KV cache", {"kernels": PALLAS, **KV8}),
    "dsjax-int8-pallas-kv8": ("dsjax INT8, all Pallas, INT8 KV cache", {"kernels": PALLAS, "quant": INT8, **KV8}),
    # routing experiments: one KernelPolicy threshold away from the default
    "dsjax-int8-pallas-gemv1": ("dsjax INT8, all Pallas, INT8 gemv at one row",
                                {"kernels": pallas(int8_gemv_rows=1), "quant": INT8}),
    "dsjax-pallas-lnfused": ("dsjax all Pallas, LayerNorm fused into the gemv",
                             {"kernels": pallas(gemv_fused_norms=BOTH_NORMS)}),
    "dsjax-pallas-split256": ("dsjax all Pallas, attention splits of >= 256 keys",
                              {"kernels": pallas(min_split_keys=256)}),
    "dsjax-pallas-ln-split256": ("dsjax all Pallas, LayerNorm fused, splits of >= 256 keys",
                                 {"kernels": pallas(gemv_fused_norms=BOTH_NORMS, min_split_keys=256)}),
    "dsjax-pallas-flash": ("dsjax all Pallas, every prompt through the flash kernel (no cuDNN)",
                           {"kernels": pallas(cudnn_prompt_tokens=0)}),
}
FORMER_NAMES = {  # decode_variants.py's names, which its results files (decode_variants*) use
    "bf16-xla": "dsjax-xla", "bf16-pallas": "dsjax-pallas", "attn-pallas": "dsjax-kernels",
    "int8-xla": "dsjax-int8", "int8-pallas": "dsjax-int8-pallas", "int8-xla-attn-pallas": "dsjax-int8-kernels",
    "int8g128-pallas": "dsjax-int8g128-pallas", "int4-pallas": "dsjax-int4-pallas",
    "attn-pallas-kv8": "dsjax-kernels-kv8", "bf16-pallas-kv8": "dsjax-pallas-kv8",
    "int8-pallas-kv8": "dsjax-int8-pallas-kv8", "int8-pallas-gemv1": "dsjax-int8-pallas-gemv1",
    "bf16-pallas-lnfused": "dsjax-pallas-lnfused", "bf16-pallas-split256": "dsjax-pallas-split256",
    "bf16-pallas-ln-split256": "dsjax-pallas-ln-split256",
}


def describe(options: dict) -> dict:
    """A variant's init_inference keywords as JSON (the KernelPolicy field by field)."""
    return {k: dataclasses.asdict(v) if isinstance(v, KernelPolicy) else v for k, v in options.items()}


# ----------------------------------------------------------------------------- environment, output

def environment() -> dict:
    """dsjax.bench.environment() (date, commit, device, versions) + the driver and XLA_FLAGS."""
    return dict(bench.environment(), driver=nvidia_smi("driver_version"),
                xla_flags=os.environ.get("XLA_FLAGS", ""))


def versions_line(env: dict) -> str:
    """The commit and the versions a result depends on, for a report's last line."""
    return (f"commit {env.get('git_commit')}, jax {env.get('jax')}, torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}.")


def nvidia_smi(query: str) -> str | None:
    """nvidia-smi --query-gpu=QUERY of the first GPU, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def save(name: str, payload: dict, markdown: str, out=RESULTS) -> list[Path]:
    """Writes NAME.json and NAME.md into `out` and into $OUT when that is set."""
    dirs = dict.fromkeys([Path(out)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []))
    return [p for d in dirs for p in bench.write(d, name, payload, markdown)]


def error_line(e: BaseException) -> str:
    """The exception's type and the first line of its message (runs of spaces made one), or
    "out of memory" for any kind of allocation failure."""
    text = str(e).strip()
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "out of memory"
    lines = text.splitlines()
    return f"{type(e).__name__}: {' '.join(lines[0].split())[:300]}" if lines else type(e).__name__


def elapsed() -> float:
    """Seconds since this module was imported (the scripts' time budgets count from there)."""
    return time.perf_counter() - T0


def ints(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64] (an argparse type)."""
    return [int(x) for x in text.split(",") if x]


# ----------------------------------------------------------------------------- kernel timing

def best_time(run, reps: int = 10, min_s: float = 5e-3) -> float:
    """Seconds per run(): the fastest of `reps` timings, each over enough back-to-back calls
    (dispatched without waiting) to last about min_s, so dispatch and sync overheads cancel."""
    jax.block_until_ready(run())
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    calls = max(1, min(200, int(min_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return min(times)


def time_in_jit(fn, inputs: list[tuple], reps: int = 7, inner: int = 4) -> tuple[float, float]:
    """(median, min) seconds per fn(*x): one jit runs fn once per x in inputs (distinct arrays:
    L2 never holds the next one and XLA can merge nothing), and `inner` calls of that jit are
    queued per measurement, so that host dispatch overlaps the GPU."""
    f = jax.jit(lambda inputs: [fn(*x) for x in inputs])
    jax.block_until_ready(f(inputs))

    def run():
        jax.block_until_ready([f(inputs) for _ in range(inner)])

    t, times = median_time(run, reps, warmup=1)
    calls = inner * len(inputs)
    return t / calls, min(times) / calls


# ----------------------------------------------------------------------------- engines

def compiled_generate(engine, prompt_len: int, batch: int = 2):
    """The engine's compiled generate program for `batch` prompts of prompt_len tokens, packed
    as generate() packs them (`.as_text()`: its optimized HLO)."""
    fn, args, kw = engine.greedy_program([np.zeros(prompt_len, np.int32)] * batch, 8)
    return fn.lower(*args, **kw).compile()


def host_random_params(cfg, dtype=jnp.bfloat16, seed: int = 0) -> dict:
    """Random weights of a decoder config as nested numpy arrays in host memory (the stored [K, N]
    layout that dsjax.engine.build_engine takes), made on the CPU device: a model larger than
    one GPU is never made on one."""
    from dsjax.model import random_params

    with jax.default_device(jax.devices("cpu")[0]):
        params = random_params(cfg, dtype, seed)
    return jax.tree.map(np.asarray, params)
