"""Which tiles and K splits the MoE grouped GEMM should take at decode-sized steps (one GPU).

    python benchmarks/experiments/grouped_gemm_tiles.py [--archs mixtral,qwen3] [--tokens 1,8]
        [--deadline UNIX_TIME] [--name grouped_gemm_tiles]

An experiment, not a benchmark of the library: it times the whole expert op (layout, the two
grouped GEMMs, the combine; `pallas_ops.experts`) of one layer, bf16, random routing, under
block sizes given explicitly: the default choice (`expert_block_sizes`), no split, and a
sweep of the first GEMM's tiles with the second's at its default, then the second's with the
first's at its default; against XLA's expert op (ragged_dot, reads every expert) and, where a
step has at most 16 (token, pick) rows, the sliced XLA op (`expert_slice_rows`). Every variant
is first checked against the XLA op. Active bytes: the experts the step's picks reach (their
[gate | up] and down weights); GB/s = active bytes / time. Each op is timed on 4 distinct
inputs (routing and x) in one jit, median of 7 (`harness.time_in_jit`). Writes
results/NAME.{json,md} (and under $OUT).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from dsjax import ops, pallas_ops  # noqa: E402
from dsjax.policy import KernelPolicy  # noqa: E402
from pallas_kernels.grouped_matmul import BlockSizes, expert_block_sizes  # noqa: E402

# D, I, E, top-k ("tiny": a CPU smoke run, interpreted)
ARCHS = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "tiny": (64, 256, 8, 2)}
PALLAS = KernelPolicy.pallas(experts="pallas")
UP = [BlockSizes(block_n=n, block_k=k, num_stages=3) for n in (32, 64, 128) for k in (64, 128)]
DOWN = [BlockSizes(block_n=n, block_k=k, num_stages=3, split_k=sp) for n, k in
        ((32, 128), (64, 64), (64, 128), (128, 128)) for sp in (1, 2, 4, 8)]


def inputs(arch: str, tokens: int, n: int = 4):
    D, I, E, k = ARCHS[arch]
    rng = np.random.default_rng(tokens)
    up = jnp.asarray(rng.standard_normal((E, D, 2 * I), np.float32) * D ** -0.5, jnp.bfloat16)
    down = jnp.asarray(rng.standard_normal((E, I, D), np.float32) * I ** -0.5, jnp.bfloat16)
    out = []
    for _ in range(n):
        picks = np.stack([rng.choice(E, k, replace=False) for _ in range(tokens)])
        out.append((jnp.asarray(rng.standard_normal((tokens, D)), jnp.bfloat16), up, down,
                    jnp.asarray(picks, jnp.int32), jnp.asarray(rng.uniform(size=(tokens, k)), jnp.bfloat16)))
    active = np.mean([len(np.unique(np.asarray(x[3]))) for x in out]) * 3 * D * I * 2
    return out, active


def variants(arch: str, tokens: int) -> dict:
    """name -> fn(x, up, down, picks, w)."""
    k = ARCHS[arch][3]
    xla = {"xla": lambda *a: ops.experts_xla(*a, activation="silu")}
    if tokens * k <= 16:
        sliced = KernelPolicy(expert_slice_rows=16)
        xla["xla-sliced"] = lambda *a: ops.experts(*a, activation="silu", policy=sliced)
    D, I, E, _ = ARCHS[arch]
    up0, down0 = expert_block_sizes(tokens * k, E, D, I)
    blocks = {"default": (up0, down0), "no split": (dataclasses.replace(up0, split_k=1),
                                                    dataclasses.replace(down0, split_k=1))}
    blocks |= {f"up {label(b)}": (dataclasses.replace(b, split_k=up0.split_k), down0) for b in UP}
    blocks |= {f"down {label(b)}": (up0, b) for b in DOWN}
    pallas = {f"pallas {name}": (lambda bs: lambda *a: pallas_ops.experts(
        *a, activation="silu", policy=PALLAS, block_sizes=bs))(bs) for name, bs in blocks.items()}
    return xla | pallas


def label(b: BlockSizes) -> str:
    return f"n{b.block_n} k{b.block_k} s{b.num_stages} split{b.split_k}"


def run_case(arch: str, tokens: int, deadline: float) -> list[dict]:
    data, active = inputs(arch, tokens)
    want = np.asarray(jax.jit(lambda *a: ops.experts_xla(*a, activation="silu"))(*data[0]), np.float32)
    rows = []
    for name, fn in variants(arch, tokens).items():
        if time.time() > deadline:
            rows.append({"arch": arch, "tokens": tokens, "variant": name, "error": "deadline"})
            continue
        row = {"arch": arch, "tokens": tokens, "variant": name, "active_mb": active / 1e6}
        try:
            got = np.asarray(jax.jit(fn)(*data[0]), np.float32)
            row["rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
            med, best = harness.time_in_jit(fn, data)
            row |= {"us": med * 1e6, "best_us": best * 1e6, "gb_s": active / med / 1e9}
        except Exception as e:  # noqa: BLE001 (the row says so)
            row["error"] = harness.error_line(e)
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# Grouped GEMM tiles at decode steps: {env.get('device')}", "",
             harness.versions_line(env), "",
             "| arch | tokens | variant | us | GB/s of active experts | x XLA | rel err |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (arch, tokens), rows in group(payload["rows"]).items():
        xla = next((r["us"] for r in rows if r["variant"] == "xla" and "us" in r), None)
        timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        keep = [r for r in timed if not r["variant"].startswith(("pallas up", "pallas down"))]
        keep += [r for r in timed if r not in keep][:6]  # the six fastest of the sweep
        for r in sorted(keep, key=lambda r: r["us"]):
            vs = f"{xla / r['us']:.2f}x" if xla else "-"
            lines.append(f"| {arch} | {tokens} | {r['variant']} | {r['us']:.1f} | {r['gb_s']:.0f} | "
                         f"{vs} | {r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def group(rows):
    out = {}
    for r in rows:
        out.setdefault((r["arch"], r["tokens"]), []).append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="mixtral,qwen3")
    ap.add_argument("--tokens", type=harness.ints, default=[1, 8])
    ap.add_argument("--deadline", type=float, default=time.time() + 1e9)
    ap.add_argument("--name", default="grouped_gemm_tiles")
    ap.add_argument("--out", default=str(harness.RESULTS))
    args = ap.parse_args()
    rows = []
    for arch in args.archs.split(","):
        for tokens in args.tokens:
            rows += run_case(arch, tokens, args.deadline)
            payload = {"environment": harness.environment(), "rows": rows}
            harness.save(args.name, payload, markdown(payload), args.out)
    print(markdown(payload))


if __name__ == "__main__":
    main()
