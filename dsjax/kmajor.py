"""K-major GEMM weights: the layout the decode GEMV kernel (pallas_kernels/gemv.py) reads.

A model's GEMM weights are [K, N] everywhere they are stored or sliced (checkpoints, tensor
parallelism, quantization). The decode GEMV reads a weight fastest with each output's K inputs
contiguous, [N, K] (benchmarks/results/gemv_variants.md), so an engine whose linear op runs the
Pallas kernels holds its layer GEMM weights (and an untied LM head) transposed in device memory:
converted once when the engine is built, back to [K, N] when it is saved. Over a mesh each
device transposes its own slice after the weights are sliced and placed (dsjax.parallel).

INT8 weights go K-major too (codes [N, K]; scales and zero points as QuantizedWeight's,
[K/G, N]): quant_matmul reads them in place (transpose_w). Per channel, on gate_up and down it
runs 1.35-1.5x faster than XLA's bf16 GEMV at 1 to 16 rows, where over [K, N] codes it ran at
1.0-1.3x (see pallas_ops.INT8_GEMV_ROWS). In groups of 128, summed over the four LLaMA-3-8B
GEMMs, K-major codes took 133 us against 137 [K, N] at one row, 138 against 214 at four and
149 against 159 at sixteen (results/gemm_kernels-kmajor-q.md). INT4 weights stay [K, N]: their
K-major form lost at one row on every shape (20.9 -> 30.6 us on qkv, 59.5 -> 73.9 on gate_up).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from dsjax.quant import QuantizedWeight, QuantSpec, quantizable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KMajorWeight:
    values: jax.Array  # [N, K]: float, or int8 codes (uint8 with zero points)
    scales: jax.Array | None = None  # float32 [K/G, N] of codes, as QuantizedWeight's
    zeros: jax.Array | None = None  # float32 [K/G, N] of asymmetric codes

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [K, N] of the weight this stands for."""
        return self.values.shape[::-1]

    @property
    def group_size(self) -> int:
        """Rows of K per scale of int8 codes (K: one scale per output channel)."""
        return self.values.shape[1] // self.scales.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))

    def codes(self) -> QuantizedWeight:
        """int8 codes as a QuantizedWeight whose values stay [N, K] (for quant_matmul's
        transpose_w and qmatmul_xla's values_nk)."""
        return QuantizedWeight(self.values, self.scales, self.zeros, bits=8,
                               group_size=self.group_size)


_GEMMS = QuantSpec(lm_head=True)  # quantizable(path, _GEMMS): layer GEMMs and an LM head


def _transpose(w):
    """[..., K, N] -> [..., N, K] (stage-stacked [P, K, N] weights of a mesh too). A sharded
    array stays sharded the same way, each device transposing its own slice: the spec's last
    two axes swap, so a column-parallel [K, N/T] slice becomes a [N/T, K] one."""
    out = None
    if isinstance(getattr(w, "sharding", None), NamedSharding):
        spec = tuple(w.sharding.spec) + (None,) * (w.ndim - len(w.sharding.spec))
        out = NamedSharding(w.sharding.mesh, PS(*spec[:-2], spec[-1], spec[-2]))
    return _swap(out, jax.default_backend() != "cpu")(w)  # the CPU cannot donate


@functools.lru_cache(maxsize=None)
def _swap(out_sharding, donate: bool):
    # donated: the [K, N] copy is freed at once
    return jax.jit(lambda w: jnp.swapaxes(w, -1, -2), out_shardings=out_sharding,
                   donate_argnums=0 if donate else ())


def to_k_major(w):
    """A [K, N] array or an int8 QuantizedWeight -> KMajorWeight; an int4 QuantizedWeight is
    returned as it is."""
    if not isinstance(w, QuantizedWeight):
        return KMajorWeight(_transpose(w))
    if w.bits != 8:
        return w
    return KMajorWeight(_transpose(w.values), w.scales, w.zeros)


def to_k_n(w):
    """The inverse of to_k_major (other leaves unchanged)."""
    if not isinstance(w, KMajorWeight):
        return w
    if w.scales is None:
        return w.values.T
    return dataclasses.replace(w.codes(), values=w.values.T)


def k_major_flat(flat: dict) -> dict:
    """{path: leaf} with every layer GEMM kernel (and an untied LM head) K-major."""
    return {path: to_k_major(w) if quantizable(path, _GEMMS) else w for path, w in flat.items()}


def k_n_params(params):
    """Nested params with every KMajorWeight back in the stored [K, N] layout."""
    return jax.tree.map(to_k_n, params, is_leaf=lambda x: isinstance(x, KMajorWeight))
