"""Why `dsjax demo` (GPT-2 124M, fp32, one row) decodes slower than HF eager on a two-core CPU:
a chain of GPT-2's MLP GEMVs ([1, 768] x [768, 3072], then x [3072, 768], 12 times) in one
jitted XLA program, in several forms (plain dot, multiply + reduce, weights pre-split into 2
or 4 column blocks whose dots are independent), against torch's eager matmuls on 1 and 2
threads. GB/s = weight bytes read / median time.

    python benchmarks/experiments/cpu_gemv.py [--name cpu_gemv]     (~1 min)

Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dsjax.bench import median_time  # noqa: E402

K, N, LAYERS = 768, 3072, 12
BYTES = LAYERS * 2 * K * N * 4


def median_us(fn, reps: int = 50) -> float:
    return median_time(fn, reps)[0] * 1e6


def xla_rows(rng) -> list[dict]:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(rng.standard_normal((1, K), dtype=np.float32))
    forms = {"dot": lambda x, w: x @ w,
             "multiply + reduce": lambda x, w: (x[0][:, None] * w).sum(0)[None]}
    rows = []
    for parts in (1, 2, 4):
        ups = [[jnp.asarray(rng.standard_normal((K, N // parts), dtype=np.float32))
                for _ in range(parts)] for _ in range(LAYERS)]
        downs = [[jnp.asarray(rng.standard_normal((N, K // parts), dtype=np.float32))
                  for _ in range(parts)] for _ in range(LAYERS)]
        for name, form in forms.items() if parts == 1 else [("dot", forms["dot"])]:
            def chain(x, ups, downs, form=form):
                for up, down in zip(ups, downs):
                    h = jnp.concatenate([form(x, w) for w in up], 1)
                    x = jnp.concatenate([form(h, w) for w in down], 1) * 1e-3
                return x
            run = jax.jit(chain)
            us = median_us(lambda: run(x, ups, downs).block_until_ready())
            rows.append({"system": f"XLA {name}" + (f", {parts} column blocks" if parts > 1 else ""),
                         "us": us, "gb_s": BYTES / us / 1e3})
    return rows


def torch_rows(rng) -> list[dict]:
    import torch

    ups = [torch.from_numpy(rng.standard_normal((K, N), dtype=np.float32)) for _ in range(LAYERS)]
    downs = [torch.from_numpy(rng.standard_normal((N, K), dtype=np.float32)) for _ in range(LAYERS)]
    x = torch.from_numpy(rng.standard_normal((1, K), dtype=np.float32))

    def chain():
        h = x
        for up, down in zip(ups, downs):
            h = (h @ up) @ down * 1e-3
        return h
    rows, before = [], torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            us = median_us(chain)
        rows.append({"system": f"torch eager, {threads} thread{'s' * (threads > 1)}", "us": us,
                     "gb_s": BYTES / us / 1e3})
    torch.set_num_threads(before)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="cpu_gemv")
    args = parser.parse_args()
    from benchmarks import harness

    rng = np.random.default_rng(0)
    rows = xla_rows(rng) + torch_rows(rng)
    env = harness.environment()
    lines = [f"# GPT-2 124M's MLP GEMV chain on the CPU ({env['device']}, JAX {env['jax']}, torch "
             f"{env['torch']}, commit {env['git_commit']})", "",
             f"{LAYERS} x ([1, {K}] x [{K}, {N}] then x [{N}, {K}]), fp32, "
             f"{BYTES / 2**20:.0f} MiB of weights; median of 50.", "",
             "| system | us | GB/s |", "|---|---|---|"]
    lines += [f"| {r['system']} | {r['us']:.0f} | {r['gb_s']:.1f} |" for r in rows]
    md = "\n".join(lines) + "\n"
    harness.save(args.name, {"env": env, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
