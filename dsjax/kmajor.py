"""K-major GEMM weights: the layout the decode GEMV kernel (pallas_kernels/gemv.py) reads.

A model's GEMM weights are [K, N] everywhere they are stored or sliced (checkpoints, tensor
parallelism, quantization). The decode GEMV reads a weight fastest with each output's K inputs
contiguous, [N, K] (benchmarks/results/gemv_variants.md), so a one-device engine whose linear
op runs the Pallas kernels holds its layer GEMM weights (and an untied LM head) transposed in
device memory: converted once when the engine is built, back to [K, N] when it is saved.
Per-channel symmetric int8 weights keep their codes, transposed; other quantized formats stay
as they are (their kernel reads [K, N]).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from dsjax.quant import QuantizedWeight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KMajorWeight:
    values: jax.Array  # [N, K]: float, or int8 codes (W = q * s)
    scales: jax.Array | None  # float32 [N] for int8 codes, else None

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [K, N] of the weight this stands for."""
        return self.values.shape[::-1]

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))


_GEMM = re.compile(r"(^|\.)(layers\.\d+\.(attn\.(qkv|out)|mlp\.(up|down))|lm_head)\.kernel$")


_T = jax.jit(lambda w: w.T)
_T_DONATED = jax.jit(lambda w: w.T, donate_argnums=0)  # the [K, N] copy is freed at once


def _transpose(w):
    return (_T if jax.default_backend() == "cpu" else _T_DONATED)(w)  # the CPU cannot donate


def to_k_major(w):
    """A [K, N] array or per-channel symmetric int8 QuantizedWeight -> KMajorWeight; any other
    quantized weight is returned as it is."""
    if isinstance(w, QuantizedWeight):
        if w.bits != 8 or not w.symmetric or w.scales.shape[0] != 1:
            return w
        return KMajorWeight(_transpose(w.values), w.scales[0])
    return KMajorWeight(_transpose(w), None)


def to_k_n(w):
    """The inverse of to_k_major (other leaves unchanged)."""
    if not isinstance(w, KMajorWeight):
        return w
    if w.scales is None:
        return w.values.T
    K = w.values.shape[1]
    return QuantizedWeight(w.values.T, w.scales[None, :], None, bits=8, group_size=K)


def k_major_params(params: dict, path: str = "") -> dict:
    """Nested params with every layer GEMM kernel (and an untied LM head) K-major."""
    out = {}
    for key in list(params):
        value, sub = params[key], f"{path}{key}"
        if isinstance(value, dict):
            out[key] = k_major_params(value, sub + ".")
        else:
            out[key] = to_k_major(value) if _GEMM.search(sub) else value
    return out


def k_n_params(params):
    """Nested params with every KMajorWeight back in the stored [K, N] layout."""
    return jax.tree.map(to_k_n, params, is_leaf=lambda x: isinstance(x, KMajorWeight))


def matmul_xla(x, w: KMajorWeight):
    """x [..., K] @ W in XLA: the int8 codes are converted inside the dot, the scales applied
    to its result."""
    y = jnp.einsum("...k,nk->...n", x, w.values.astype(x.dtype),
                   preferred_element_type=jnp.float32)
    if w.scales is not None:
        y = y * w.scales
    return y.astype(x.dtype)
