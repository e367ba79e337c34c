"""Causal prefill attention on one GPU: the dsjax Pallas flash kernel against cuDNN, XLA and
JAX's own Pallas-Triton `mha`, at B=1, H=32, Dh=128, bf16, KVH 8 (GQA) and 32 (MHA).

    python benchmarks/attention_prefill.py [--seq-lens 512,1024] [--tune] [--check] [--cache]

Each implementation gets its own best layout, converted outside the timed region: the Pallas
kernel and XLA read K/V as the KV cache stores them ([B, KVH, S, Dh]); cuDNN reads
[B, S, KVH, Dh]; `mha` has no GQA, so it reads K/V repeated to H heads. Several independent
calls run inside one jit so that dispatch overhead does not dominate the small sizes; the time
per call is the median over repetitions. TFLOP/s counts the causal half: 2*2*B*H*T*T*Dh / 2.
--tune times a grid of BlockSizes at T=1024 and T=4096 first and uses the fastest of each for
the short and the long prompts; --check compares the compiled kernel with its reference on a
few shapes; --cache times a 512-token prefill into caches of 512, 4096 and 16384 slots.
Writes results/attention_prefill.{json,md} (and copies under $OUT when set), rewritten after
every row.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
IMPLS = ("pallas", "cudnn", "xla", "mha")


def causal_flops(T: int, heads: int = 32, dim: int = 128, batch: int = 1) -> float:
    return 2 * 2 * batch * heads * T * T * dim / 2


def _attention_fns(T: int, kv_heads: int, heads: int, dim: int, block_sizes):
    """name -> (fn(q, k, v) -> out, layout(k) -> k as that implementation reads it)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu.attention import mha

    from dsjax.ops import attention_xla
    from pallas_kernels.flash_attention import flash_attention

    scale = dim ** -0.5
    q_pos = jnp.arange(T, dtype=jnp.int32)[None]  # [1, T]
    k_valid = jnp.ones((1, T), bool)
    to_bshd = lambda k: k.transpose(0, 2, 1, 3)  # noqa: E731  [B, KVH, S, Dh] -> [B, S, KVH, Dh]
    return {
        "pallas": (lambda q, k, v: flash_attention(q, k, v, q_pos, scale=scale, causal=True,
                                                   block_sizes=block_sizes), lambda k: k),
        "cudnn": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn"), to_bshd),
        "xla": (lambda q, k, v: attention_xla(q, k, v, q_pos, q_pos, k_valid, scale=scale,
                                              causal=True, window=None, alibi_slopes=None),
                lambda k: k),
        "mha": (lambda q, k, v: mha(q, k, v, None, sm_scale=scale, causal=True),
                lambda k: jnp.repeat(to_bshd(k), heads // kv_heads, axis=2)),
    }


def time_attention(fn, layout, T: int, kv_heads: int, heads: int = 32, dim: int = 128,
                   reps: int = 10, S: int | None = None, calls: int | None = None) -> float:
    """Median ms per call of fn(q [1, T, H, Dh], k, v [1, KVH, S, Dh]) (bf16; S defaults to
    T), `calls` independent calls per jit (default 32768 // T, within 1..16) so that launch
    overhead and host jitter are amortised over several ms of GPU work."""
    import jax
    import jax.numpy as jnp

    calls = calls or min(16, max(1, 32768 // T))
    keys = jax.random.split(jax.random.key(T), calls + 2)
    qs = tuple(jax.random.normal(kk, (1, T, heads, dim), jnp.bfloat16) for kk in keys[2:])
    k, v = (layout(jax.random.normal(kk, (1, kv_heads, S or T, dim), jnp.bfloat16))
            for kk in keys[:2])
    run = jax.jit(lambda qs, k, v: [fn(q, k, v) for q in qs])
    t, _ = common.median_time(lambda: jax.block_until_ready(run(qs, k, v)), reps, warmup=2)
    return t / calls * 1e3


def _short_error(e: Exception) -> str:
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
        return "out of memory"
    return f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"


def prefill_rows(seq_lens=SEQ_LENS, kv_heads=(8, 32), heads: int = 32, dim: int = 128,
                 reps: int = 10, block_sizes=None, impls=IMPLS, on_row=None) -> list[dict]:
    """One row per (T, KVH): ms and TFLOP/s per implementation (None + error when it failed),
    and the Pallas kernel's speed relative to cuDNN (> 1: faster). block_sizes: None (the
    kernel's defaults) or a function T -> BlockSizes; on_row(rows) is called after each row."""
    import gc

    rows = []
    for kvh, T in itertools.product(kv_heads, seq_lens):
        bs = block_sizes(T) if block_sizes else None
        fns = _attention_fns(T, kvh, heads, dim, bs)
        row = {"T": T, "kv_heads": kvh, "heads": heads, "dim": dim, "ms": {}, "tflops": {},
               "errors": {}, "block_sizes": vars(bs) if bs else "default"}
        for name in impls:
            try:
                calls = 1 if name == "xla" and T >= 8192 else None  # its [T, T] scores are big
                ms = time_attention(*fns[name], T, kvh, heads, dim, reps, calls=calls)
                row["ms"][name] = ms
                row["tflops"][name] = causal_flops(T, heads, dim) / (ms * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001  (record, keep going: OOM at large T is data)
                row["ms"][name] = row["tflops"][name] = None
                row["errors"][name] = _short_error(e)
            gc.collect()
        p, c = row["ms"].get("pallas"), row["ms"].get("cudnn")
        row["pallas_vs_cudnn"] = c / p if p and c else None
        print(_row_line(row), flush=True)
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


def cache_rows(T: int = 512, capacities=(512, 4096, 16384), kv_heads: int = 8,
               heads: int = 32, dim: int = 128, reps: int = 10) -> list[dict]:
    """Prefill of T tokens into caches of growing capacity (k_pos=None, q_pos = 0..T-1): the
    kernel skips the empty slots, so the time should not grow with the capacity."""
    rows = []
    for S in capacities:
        fn, layout = _attention_fns(T, kv_heads, heads, dim, None)["pallas"]
        try:
            row = {"T": T, "S": S, "ms": time_attention(fn, layout, T, kv_heads, heads, dim,
                                                        reps, S=S)}
        except Exception as e:  # noqa: BLE001
            row = {"T": T, "S": S, "ms": None, "error": _short_error(e)}
        print("cache", row, flush=True)
        rows.append(row)
    return rows


# (block_q, block_k) pairs x num_warps x num_stages tried by --tune, per shape class
TUNE_GRID = {
    "short": ([(64, 64), (64, 128), (32, 64), (128, 64)], (4, 8), (2, 3)),
    "long": ([(128, 64), (128, 128), (128, 32), (64, 64), (64, 128)], (4, 8), (2, 3)),
}


def tune(T: int, grid, kv_heads: int = 8, heads: int = 32, dim: int = 128, reps: int = 5,
         budget_s: float = 90.0):
    """Times the kernel over a grid of BlockSizes at query length T (stopping after budget_s);
    returns (fastest BlockSizes, [(config dict, ms)])."""
    import time

    from pallas_kernels.flash_attention import BlockSizes

    pairs, warps, stages = grid
    results, t0 = [], time.perf_counter()
    for (bq, bk), w, st in itertools.product(pairs, warps, stages):
        bs = BlockSizes(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
        if bs.smem_bytes(dim, 2) > 227 * 1024 or time.perf_counter() - t0 > budget_s:
            continue
        fn, layout = _attention_fns(T, kv_heads, heads, dim, bs)["pallas"]
        try:
            ms = time_attention(fn, layout, T, kv_heads, heads, dim, reps)
        except Exception as e:  # noqa: BLE001  (a config Triton cannot fit is skipped)
            print(f"tune {bs}: {_short_error(e)}", flush=True)
            continue
        print(f"tune T={T} KVH={kv_heads} {bs}: {ms:.3f} ms", flush=True)
        results.append((bs, ms))
    best = min(results, key=lambda r: r[1])[0] if results else None
    return best, [({"T": T, **vars(bs)}, ms) for bs, ms in results]


CHECK_CASES = [  # (B, T, S, H, KVH, Dh, dtype, causal, window, alibi, k_pos given, k_valid)
    (2, 300, 1000, 8, 2, 128, "bfloat16", True, None, False, False, False),
    (2, 200, 200, 8, 1, 80, "float16", True, 64, True, True, True),
    (1, 129, 515, 4, 4, 96, "bfloat16", True, 100, False, False, True),
    (2, 100, 100, 4, 2, 256, "float32", False, None, False, True, True),
    (2, 70, 70, 8, 8, 64, "bfloat16", True, None, True, True, True),
    (2, 1000, 1000, 8, 2, 256, "bfloat16", True, None, False, False, False),
]


def check_one(B, T, S, H, KVH, Dh, dtype, causal, window, alibi, given, padded) -> dict:
    """Compiled kernel vs its fp32 reference on one shape: max abs error and finiteness.
    Queries sit at the end of the keys (a chunk of prefill); with k_valid, batch row 1 has
    no valid key at all (its output must be the mean of V)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.flash_attention import flash_attention, flash_attention_reference

    ks = jax.random.split(jax.random.key(T), 3)
    q = jax.random.normal(ks[0], (B, T, H, Dh), dtype)
    k, v = (jax.random.normal(kk, (B, KVH, S, Dh), dtype) for kk in ks[1:])
    k_valid = jnp.arange(S)[None] < jnp.array([S - 7, 0][:B])[:, None] if padded else None
    q_pos = jnp.arange(T, dtype=jnp.int32)[None].repeat(B, 0) + (0 if given else S - T)
    k_pos = jnp.arange(S, dtype=jnp.int32)[None].repeat(B, 0) if given else None
    slopes = 2.0 ** -jnp.arange(1, H + 1, dtype=jnp.float32) if alibi else None
    kw = dict(scale=Dh ** -0.5, causal=causal, window=window, alibi_slopes=slopes)
    row = {"shape": [B, T, S, H, KVH, Dh], "dtype": dtype, "causal": causal, "window": window,
           "alibi": alibi, "k_pos": given, "k_valid": padded}
    try:
        out = np.asarray(flash_attention(q, k, v, q_pos, k_pos, k_valid, **kw), np.float32)
    except Exception as e:  # noqa: BLE001
        return {**row, "error": _short_error(e)}
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = np.asarray(flash_attention_reference(*f32, q_pos, k_pos, k_valid, **kw))
    return {**row, "max_abs_err": float(np.abs(out - ref).max()),
            "finite": bool(np.isfinite(out).all())}


def check_rows() -> list[dict]:
    rows = [check_one(*case) for case in CHECK_CASES]
    for row in rows:
        print("check", row, flush=True)
    return rows


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _row_line(row) -> str:
    cells = [f"{n} {_fmt(row['ms'].get(n), '.3f')} ms/{_fmt(row['tflops'].get(n))} TF"
             for n in IMPLS if n in row["ms"]]
    return (f"T={row['T']:>6} KVH={row['kv_heads']:>2}: " + ", ".join(cells)
            + f"; pallas/cudnn speed {_fmt(row['pallas_vs_cudnn'], '.2f')}")


def markdown(env, rows, block_sizes, checks=None, tuning=None, cache=None) -> str:
    lines = [f"# Causal prefill attention, {env['device']}, JAX {env['jax']}",
             "", f"B=1, H=32, Dh=128, bf16. Pallas block sizes: {block_sizes}.",
             "Median ms per call and TFLOP/s (causal FLOPs 2*2*B*H*T*T*Dh/2); speed = cuDNN "
             "ms / Pallas ms (> 1: Pallas faster).", "",
             "| T | KVH | " + " | ".join(f"{n} ms | {n} TF/s" for n in IMPLS) + " | speed |",
             "|---|---|" + "---|---|" * len(IMPLS) + "---|"]
    for r in rows:
        cells = []
        for n in IMPLS:
            err = r["errors"].get(n)
            cells += [err or _fmt(r["ms"].get(n), ".3f"), "" if err else _fmt(r["tflops"].get(n))]
        lines.append(f"| {r['T']} | {r['kv_heads']} | " + " | ".join(cells)
                     + f" | {_fmt(r['pallas_vs_cudnn'], '.2f')} |")
    for T in sorted({cfg["T"] for cfg, _ in tuning or ()}):
        runs = sorted(((cfg, ms) for cfg, ms in tuning if cfg["T"] == T), key=lambda r: r[1])
        lines += ["", f"Tuning at T={T}, KVH=8, fastest 5 of {len(runs)}:", ""]
        lines += [f"- {cfg}: {ms:.3f} ms" for cfg, ms in runs[:5]]
    if checks:
        lines += ["", "Compiled-kernel check vs fp32 reference:", ""]
        lines += [f"- {c['shape']} {c['dtype']} causal={c['causal']} window={c['window']} "
                  f"alibi={c['alibi']} k_pos={c['k_pos']} k_valid={c['k_valid']}: " + (
                      c["error"] if "error" in c else
                      f"max abs err {c['max_abs_err']:.2e}, finite={c['finite']}")
                  for c in checks]
    if cache:
        lines += ["", "Prefill into a cache of capacity S (k_pos=None: empty slots skipped):", ""]
        lines += [f"- T={r['T']} S={r['S']}: " + (r.get("error") or f"{r['ms']:.3f} ms")
                  for r in cache]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)))
    p.add_argument("--kv-heads", default="8,32")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tune", action="store_true", help="pick the Pallas block sizes first")
    p.add_argument("--check", action="store_true", help="compiled kernel vs reference first")
    p.add_argument("--cache", action="store_true", help="time prefill into larger caches")
    args = p.parse_args()

    env = common.environment()
    checks = check_rows() if args.check else None
    from pallas_kernels.flash_attention import SHORT_PREFILL, BlockSizes

    pick, tuning = None, None
    shown = (f"T <= {SHORT_PREFILL}: {BlockSizes.get_default(128, seq_len=SHORT_PREFILL)}; "
             f"longer: {BlockSizes.get_default(128)}")
    if args.tune:
        short, tuned_short = tune(SHORT_PREFILL, TUNE_GRID["short"], budget_s=45)
        long, tuned_long = tune(4096, TUNE_GRID["long"], budget_s=75)
        if short and long:
            pick = lambda T: short if T <= SHORT_PREFILL else long  # noqa: E731
            shown = f"T <= {SHORT_PREFILL}: {short}; longer: {long}"
        tuning = tuned_short + tuned_long
    outs = [common.RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    cache = cache_rows() if args.cache else None

    def save(rows):
        md = markdown(env, rows, shown, checks, tuning, cache)
        common.write("attention_prefill", {"env": env, "args": vars(args), "block_sizes": shown,
                                           "checks": checks, "tuning": tuning, "cache": cache,
                                           "rows": rows}, md, outs)
        return md

    rows = prefill_rows(tuple(int(t) for t in args.seq_lens.split(",")),
                        tuple(int(k) for k in args.kv_heads.split(",")), reps=args.reps,
                        block_sizes=pick, on_row=save)
    print(save(rows))


if __name__ == "__main__":
    main()
