"""K-major GEMM weights: the layout the decode GEMV kernel (pallas_kernels/gemv.py) reads.

A model's GEMM weights are [K, N] everywhere they are stored or sliced (checkpoints, tensor
parallelism, quantization). The decode GEMV reads a weight fastest with each output's K inputs
contiguous, [N, K] (benchmarks/results/gemv_variants.md), so a one-device engine whose linear
op runs the Pallas kernels holds its layer GEMM weights (and an untied LM head) transposed in
device memory: converted once when the engine is built, back to [K, N] when it is saved.
Quantized weights stay [K, N] for quant_matmul: the gemv kernel's int8 form is faster at one row
but slower at two to eight (results/gemv_variants-lib-m1.md, -m2.md), so it is not routed yet.
"""

from __future__ import annotations

import dataclasses

import jax

from dsjax.quant import QuantizedWeight, QuantSpec, quantizable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KMajorWeight:
    values: jax.Array  # [N, K]

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [K, N] of the weight this stands for."""
        return self.values.shape[::-1]

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


_GEMMS = QuantSpec(lm_head=True)  # quantizable(path, _GEMMS): layer GEMMs and an LM head

_T = jax.jit(lambda w: w.T)
_T_DONATED = jax.jit(lambda w: w.T, donate_argnums=0)  # the [K, N] copy is freed at once


def _transpose(w):
    return (_T if jax.default_backend() == "cpu" else _T_DONATED)(w)  # the CPU cannot donate


def to_k_major(w):
    """A [K, N] array -> KMajorWeight; a QuantizedWeight is returned as it is."""
    return w if isinstance(w, QuantizedWeight) else KMajorWeight(_transpose(w))


def to_k_n(w):
    """The inverse of to_k_major (other leaves unchanged)."""
    return w.values.T if isinstance(w, KMajorWeight) else w


def k_major_flat(flat: dict) -> dict:
    """{path: leaf} with every layer GEMM kernel (and an untied LM head) K-major."""
    return {path: to_k_major(w) if quantizable(path, _GEMMS) else w for path, w in flat.items()}


def k_n_params(params):
    """Nested params with every KMajorWeight back in the stored [K, N] layout."""
    return jax.tree.map(to_k_n, params, is_leaf=lambda x: isinstance(x, KMajorWeight))
