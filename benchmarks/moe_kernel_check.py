"""On the GPU: the MoE expert op's implementations (XLA's ragged_dot path and the Pallas grouped
GEMM, compiled, not interpreted) against a float32 reference computed expert by expert with
plain dots, at a test-sized shape and at Mixtral's, bf16 and fp32, with routings that leave
experts idle or put every row on one expert. Prints one line per case; writes $OUT/moe_kernel_check.json.

    python benchmarks/moe_kernel_check.py [SHAPE,...]      (default: every shape of SHAPES)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsjax import ops, pallas_ops  # noqa: E402
from dsjax.numerics import ACTIVATIONS  # noqa: E402
from dsjax.policy import KernelPolicy  # noqa: E402

# N, k, D, I, E: the test shape, and Mixtral's at a decode step of 1 and 64 rows and a prompt
SHAPES = {"small": (19, 2, 32, 48, 6), "mixtral": (64, 2, 4096, 14336, 8),
          "mixtral-1": (1, 2, 4096, 14336, 8), "mixtral-1024": (1024, 2, 4096, 14336, 8)}


def reference(x, up, down, picks, w):
    """Expert by expert in float32 with the highest precision dots."""
    x, up, down = (np.asarray(a, np.float32) for a in (x, up, down))
    picks, w = np.asarray(picks), np.asarray(w, np.float32)
    out, I = np.zeros(x.shape, np.float32), down.shape[1]
    for e in range(up.shape[0]):
        n, j = np.nonzero(picks == e)
        if n.size:
            h = x[n] @ up[e]
            h = np.asarray(ACTIVATIONS["silu"](jnp.asarray(h[:, :I]))) * h[:, I:]
            np.add.at(out, n, (h @ down[e]) * w[n, j][:, None])
    return out


def case(shape: str, how: str, dtype) -> dict:
    N, k, D, I, E = SHAPES[shape]
    rng = np.random.default_rng(0)
    picks = {"random": rng.integers(0, E, (N, k)), "one_expert": np.full((N, k), E - 1),
             "idle_experts": np.stack([np.arange(N) % 2, 2 + np.arange(N) % 2], 1)}[how]
    def normal(*size, scale=1.0):
        a = rng.standard_normal(size, dtype=np.float32)
        a *= scale
        return jnp.asarray(a, dtype)
    x, up, down = normal(N, D), normal(E, D, 2 * I, scale=D ** -0.5), normal(E, I, D, scale=I ** -0.5)
    w = jnp.asarray(rng.uniform(size=(N, k)), dtype)
    want = reference(x, up, down, picks, w)
    row = {"shape": shape, "routing": how, "dtype": jnp.dtype(dtype).name}
    for name, fn in (("xla", ops.experts_xla), ("pallas", pallas_ops.experts)):
        kw = {} if name == "xla" else {"policy": KernelPolicy.pallas(interpret=False)}
        try:
            with jax.default_matmul_precision("highest"):
                got = np.asarray(jax.jit(lambda *a, f=fn, kw=kw: f(*a, activation="silu", **kw))(
                    x, up, down, jnp.asarray(picks, jnp.int32), w), np.float32)
            row[name] = float(np.abs(got - want).max() / np.abs(want).max())
        except Exception as e:  # noqa: BLE001 (the row says so)
            row[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return row


def main() -> None:
    rows, shapes = [], sys.argv[1].split(",") if len(sys.argv) > 1 else list(SHAPES)
    for shape in shapes:
        for how in ("random", "one_expert", "idle_experts")[:3 if shape == "small" else 1]:
            for dtype in (jnp.float32, jnp.bfloat16):
                rows.append(case(shape, how, dtype))
                print(rows[-1], flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "moe_kernel_check.json").write_text(json.dumps(
            {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
