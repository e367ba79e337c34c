"""K-major GEMM weights: the layout the decode GEMV kernel (pallas_kernels/gemv.py) reads.

A model's GEMM weights are [K, N] everywhere they are stored or sliced (checkpoints, tensor
parallelism, quantization). The decode GEMV reads a weight fastest with each output's K inputs
contiguous, [N, K] (benchmarks/results/gemv_variants.md), so a one-device engine whose linear
op runs the Pallas kernels holds its layer GEMM weights (and an untied LM head) transposed in
device memory: converted once when the engine is built, back to [K, N] when it is saved.

Symmetric per-channel int8 weights go K-major too (codes [N, K], scales [N]): quant_matmul
reads them in place (transpose_w), on gate_up and down 1.35-1.5x faster than XLA's bf16 GEMV at
1 to 16 rows, where over [K, N] codes it ran at 1.0-1.3x (see pallas_ops.INT8_GEMV_ROWS).
Other quantized forms (grouped, asymmetric, int4) stay [K, N] (quant_matmul can read them
K-major too; they are not timed that way yet).
"""

from __future__ import annotations

import dataclasses

import jax

from dsjax.quant import QuantizedWeight, QuantSpec, quantizable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KMajorWeight:
    values: jax.Array  # [N, K]: float, or int8 codes
    scales: jax.Array | None = None  # float32 [N] of int8 codes (W = q * s per output)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [K, N] of the weight this stands for."""
        return self.values.shape[::-1]

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + (0 if self.scales is None else int(self.scales.nbytes))


_GEMMS = QuantSpec(lm_head=True)  # quantizable(path, _GEMMS): layer GEMMs and an LM head

_T = jax.jit(lambda w: w.T)
_T_DONATED = jax.jit(lambda w: w.T, donate_argnums=0)  # the [K, N] copy is freed at once


def _transpose(w):
    return (_T if jax.default_backend() == "cpu" else _T_DONATED)(w)  # the CPU cannot donate


def _per_channel_int8(w: QuantizedWeight) -> bool:
    return w.bits == 8 and w.symmetric and w.group_size == w.shape[0]


def to_k_major(w):
    """A [K, N] array or a per-channel symmetric int8 QuantizedWeight -> KMajorWeight; another
    QuantizedWeight is returned as it is."""
    if not isinstance(w, QuantizedWeight):
        return KMajorWeight(_transpose(w))
    if not _per_channel_int8(w):
        return w
    return KMajorWeight(_transpose(w.values), w.scales.reshape(-1))


def to_k_n(w):
    """The inverse of to_k_major (other leaves unchanged)."""
    if not isinstance(w, KMajorWeight):
        return w
    if w.scales is None:
        return w.values.T
    K = w.values.shape[1]
    return QuantizedWeight(w.values.T, w.scales[None, :], None, bits=8, group_size=K)


def k_major_flat(flat: dict) -> dict:
    """{path: leaf} with every layer GEMM kernel (and an untied LM head) K-major."""
    return {path: to_k_major(w) if quantizable(path, _GEMMS) else w for path, w in flat.items()}


def k_n_params(params):
    """Nested params with every KMajorWeight back in the stored [K, N] layout."""
    return jax.tree.map(to_k_n, params, is_leaf=lambda x: isinstance(x, KMajorWeight))
