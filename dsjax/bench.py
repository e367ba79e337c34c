"""`dsjax bench`: end-to-end generate latency per batch size, against the weight-read roofline.

Each batch size runs greedy `generate` on random prompts (a fixed seed) with no stop token, so
every run makes exactly `new_tokens` tokens. The first call compiles (its wall time is
`compile_s`, one run included); `warmup` untimed calls in all (the first one included), then
`reps` timed calls of the full generate give P50/P95/mean latency. Time to first token is the
median of `reps` calls that generate one token; decode ms/token = (P50 T(n) - P50 T(1)) / (n - 1),
which removes the prompt phase. The floor of one decode step is the bytes it must read (the
weights, and K/V over the mean context) / the bandwidth of a bf16 GEMV measured in the same run.

The measure itself (`time_generate`, `decode_ms_per_token`, `timing`) is the one every GPU script
in benchmarks/ uses too (through benchmarks/harness.py), so their figures mean the same.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model import flatten

# the H200 ceiling shape of DESIGN.md; the CPU measures a small one so that it stays quick
GEMV_SHAPE = {"gpu": (8192, 28672), "cpu": (1024, 4096)}


# ----------------------------------------------------------------------------- statistics

def percentile(values, q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between closest ranks: the
    sorted values x[0..n-1] sit at ranks 0..n-1, q maps to rank q/100 * (n-1), and a rank between
    two values interpolates linearly. This is numpy's default (method="linear", Hyndman and Fan's
    type 7): P50 of [1, 2, 3, 4] is 2.5, P95 of [1..10] is 9.55."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    rank = q / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def latency_stats(times) -> dict:
    """{p50, p95, mean, min, max, n} of a list of times, in the times' own unit."""
    xs = [float(t) for t in times]
    return {"p50": percentile(xs, 50), "p95": percentile(xs, 95), "mean": statistics.fmean(xs),
            "min": min(xs), "max": max(xs), "n": len(xs)}


def median_time(fn, reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time (s) of fn() (which must block until its result is ready), and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ----------------------------------------------------------------------------- the decode measure

def random_prompts(vocab: int, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, prompt_len], a function of (seed, batch) alone: every system and
    every variant of a run gets the same prompts at the same batch size."""
    return np.random.default_rng([seed, batch]).integers(0, vocab, (batch, prompt_len))


def time_generate(generate, new_tokens: int, warmup: int, reps: int) -> dict:
    """generate(n) makes exactly n tokens and returns them on the host (so it has blocked).
    `warmup` untimed calls of new_tokens, `reps` timed ones, one untimed one-token call (its own
    warm-up), `reps` timed one-token calls. The times (ms) and the last timed call's tokens."""
    def timed(n):
        t0 = time.perf_counter()
        out = generate(n)
        return (time.perf_counter() - t0) * 1e3, out

    for _ in range(warmup):
        generate(new_tokens)
    full = [timed(new_tokens) for _ in range(reps)]
    generate(1)
    first = [timed(1)[0] for _ in range(reps)]
    return {"full_ms": [t for t, _ in full], "first_ms": first,
            "tokens": np.asarray(full[-1][1]).tolist()}


def decode_ms_per_token(full_ms, first_ms, new_tokens: int) -> float:
    """THE decode time per token: (P50 T(n) - P50 T(1)) / (n - 1). The prompt phase and the
    per-call overhead cancel out; what is left is one decode step of the whole batch."""
    return (percentile(full_ms, 50) - percentile(first_ms, 50)) / (new_tokens - 1)


def timing(measured: dict, new_tokens: int) -> dict:
    """A row's figures from time_generate()'s times: latency statistics of the full generate,
    ms/token = P50 / n, decode ms/token, TTFT = P50 of the one-token calls, and tokens/s =
    batch x n / mean."""
    lat = latency_stats(measured["full_ms"])
    return {"latency_ms": lat, "ms_per_token": lat["p50"] / new_tokens,
            "decode_ms_per_token": decode_ms_per_token(measured["full_ms"], measured["first_ms"],
                                                       new_tokens),
            "tokens_per_s": len(measured["tokens"]) * new_tokens / (lat["mean"] / 1e3),
            "ttft_ms": percentile(measured["first_ms"], 50)}


# ----------------------------------------------------------------------------- roofline

def weight_bytes_per_step(engine) -> int:
    """Bytes one decode step must read: every weight but the input embedding and position tables
    (only a row of those is read); a tied LM head reads the embedding once. Quantized weights
    count their stored bytes (values, scales and zero points). Over a mesh, the bytes each
    device reads: a tensor-parallel slice of them (a pipeline's stages read theirs in turn)."""
    skip = {"pos_embed.embedding", "type_embed.embedding"}
    if not engine.config.tie_word_embeddings:
        skip.add("embed.embedding")
    def read(x):  # a tensor-sliced array: each device reads its 1/tp of it
        sliced = engine.plan is not None and "tp" in tuple(x.sharding.spec)
        return int(x.nbytes) // (engine.plan.par.tp if sliced else 1)
    return sum(read(x) for k, v in flatten(engine.params).items() if k not in skip
               for x in jax.tree.leaves(v))


def kv_bytes_per_step(cfg, batch: int, context: float, itemsize: float = 2) -> int:
    """K and V of every layer for `batch` sequences of `context` cached tokens."""
    return int(2 * cfg.num_layers * batch * cfg.kv_heads * context * cfg.dim_head * itemsize)


def kv_itemsize(engine) -> float:
    """Bytes per cached K or V element: the compute dtype's, or for an int8 cache 1 byte plus
    its float32 scale per token and head shared by dim_head elements."""
    icfg = engine.inference_config
    if icfg.kv_cache_dtype == "int8":
        return 1 + 4 / engine.config.dim_head
    return jnp.dtype(icfg.jnp_dtype).itemsize


def roofline(weight_bytes: int, kv_bytes: int, bytes_per_s: float) -> dict:
    """The floor of one decode step: the bytes it must read at the measured bandwidth."""
    return {"weight_bytes": int(weight_bytes), "kv_bytes": int(kv_bytes),
            "floor_ms": (weight_bytes + kv_bytes) / bytes_per_s * 1e3}


def gemv_bandwidth(k: int | None = None, n: int | None = None, copies: int = 3, calls: int = 20,
                   reps: int = 7) -> dict:
    """Bytes/s that XLA's bf16 GEMV [1, k] @ [k, n] reads: the weight-read ceiling the floors use.
    Rotates over `copies` weight matrices so that the cache never holds the next one. The shape
    defaults to GEMV_SHAPE of the default backend (any accelerator counts as "gpu")."""
    default = GEMV_SHAPE["cpu" if jax.default_backend() == "cpu" else "gpu"]
    k, n = k or default[0], n or default[1]
    keys = jax.random.split(jax.random.key(0), copies + 1)
    ws = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in keys[1:]]
    x = jax.random.normal(keys[0], (1, k), jnp.bfloat16)
    f = jax.jit(lambda x, w: x @ w)

    def run():
        jax.block_until_ready([f(x, ws[i % copies]) for i in range(calls)])

    t, _ = median_time(run, reps, warmup=2)
    per_call = t / calls
    return {"shape": [1, k, n], "us_per_gemv": per_call * 1e6, "bytes_per_s": k * n * 2 / per_call}


# ----------------------------------------------------------------------------- the harness

def peak_memory_bytes() -> int | None:
    """The process's peak device memory so far (device 0), or None where the backend keeps no
    statistics (the CPU). JAX cannot reset it: later batch sizes report the running maximum."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="dsjax bench", unit="run", disable=not enabled, leave=False)


def run(engine, batch_sizes, prompt_len: int, new_tokens: int, reps: int = 10, warmup: int = 2,
        progress: bool = True, seed: int = 0, bandwidth: dict | None = None) -> list[dict]:
    """One row per batch size (see the module docstring for what each figure means).
    bandwidth: a gemv_bandwidth() result; measured here when not given."""
    if new_tokens < 2 or reps < 1 or prompt_len < 1:
        raise ValueError("dsjax bench needs new_tokens >= 2, reps >= 1 and prompt_len >= 1")
    bandwidth = bandwidth or gemv_bandwidth()
    wbytes, cfg = weight_bytes_per_step(engine), engine.config
    bar = _progress(len(batch_sizes) * (max(warmup, 1) + 2 * reps + 1), progress)

    def generate(prompts, n):
        tokens = engine.generate(prompts, max_new_tokens=n, eos_token_id=[]).tokens
        bar.update()
        return tokens

    rows = []
    for bs in batch_sizes:
        call = functools.partial(generate, random_prompts(cfg.vocab_size, bs, prompt_len, seed))
        bar.set_postfix(batch=bs)
        t0 = time.perf_counter()
        call(new_tokens)  # compiles (max_new_tokens is traced: the one-token calls reuse it)
        compile_s = time.perf_counter() - t0
        measured = time_generate(call, new_tokens, max(warmup, 1) - 1, reps)
        kv = kv_bytes_per_step(cfg, bs, prompt_len + new_tokens // 2, kv_itemsize(engine))
        floor = roofline(wbytes, kv, bandwidth["bytes_per_s"])
        row = {"batch": bs, "prompt_len": prompt_len, "new_tokens": new_tokens,
               **timing(measured, new_tokens), "compile_s": compile_s,
               "peak_memory_bytes": peak_memory_bytes(), **floor}
        rows.append(dict(row, over_floor=row["decode_ms_per_token"] / floor["floor_ms"]))
    bar.close()
    return rows


# ----------------------------------------------------------------------------- reports

COLUMNS = ("batch", "P50 ms", "P95 ms", "mean ms", "ms/token", "decode ms/token", "tokens/s",
           "TTFT ms", "compile s", "peak memory GiB", "floor ms/token", "decode / floor")


def _cells(r: dict) -> list[str]:
    lat, mem = r["latency_ms"], r["peak_memory_bytes"]
    return [str(r["batch"]), f"{lat['p50']:.2f}", f"{lat['p95']:.2f}", f"{lat['mean']:.2f}",
            f"{r['ms_per_token']:.3f}", f"{r['decode_ms_per_token']:.3f}", f"{r['tokens_per_s']:.1f}",
            f"{r['ttft_ms']:.2f}", f"{r['compile_s']:.1f}", "n/a" if mem is None else f"{mem / 2**30:.2f}",
            f"{r['floor_ms']:.3f}", f"{r['over_floor']:.2f}x"]


def report_markdown(rows: list[dict], env: dict, args: dict) -> str:
    """A markdown report: what ran, on what, and one table row per batch size. env: environment()
    plus "gemv_bandwidth"; args: the run's settings (model, dtype, quant, kernels, prompt_len,
    new_tokens, reps, warmup, optional command)."""
    lines = [f"# dsjax bench: {args['model']}", "", _setting(env, args), "", _definitions(env, args), ""]
    if args.get("command"):
        lines += [f"Command: `{args['command']}`", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _setting(env: dict, args: dict) -> str:
    return (f"{env['device']} x{env['device_count']}, JAX {env['jax']}, commit {env['git_commit']}, "
            f"{env['date']}. {args['dtype']}, weights {args.get('quant') or 'unquantized'}, kernels "
            f"{args['kernels']}; random prompts of {args['prompt_len']} tokens, {args['new_tokens']} new "
            f"tokens, greedy, no early stop; {args['warmup']} warm-up and {args['reps']} timed runs "
            "per batch size.")


def _definitions(env: dict, args: dict) -> str:
    bw = env.get("gemv_bandwidth")
    ceiling = (f"{bw['bytes_per_s'] / 1e12:.3f} TB/s (bf16 GEMV {bw['shape']} measured in this run)"
               if bw else "the measured bandwidth")
    return ("Latency: a full `generate`. ms/token = P50 / new tokens. Decode ms/token = (P50 - TTFT) / "
            f"{args['new_tokens'] - 1}, TTFT = median time of a one-token generate. tokens/s = batch x "
            "new tokens / mean. Compile s: the first call (one run included; small when an earlier "
            "batch size compiled the same power-of-two batch bucket). Peak memory: the process's "
            "running peak on device 0 (n/a: the backend keeps no statistics). Floor = bytes one "
            f"decode step reads (weights, K/V over the mean context) / {ceiling}.")


def environment() -> dict:
    """Date, git commit (or $DSJAX_COMMIT), device kind and count, and the versions of Python
    and the packages a figure depends on (None: not installed; read without importing them)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, text=True,
                                capture_output=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("DSJAX_COMMIT") or commit or "unknown",
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "python": sys.version.split()[0],
        **{name: _version(name) for name in ("jaxlib", "flax", "transformers", "torch")},
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def write(out_dir, name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Writes out_dir/name.json and out_dir/name.md, each whole or not at all (written beside
    and renamed into place, so an interrupted run never leaves half a report); returns their
    paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{name}.json", out / f"{name}.md"
    for path, text in zip(paths, (json.dumps(payload, indent=2), markdown)):
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_text(text)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return paths
