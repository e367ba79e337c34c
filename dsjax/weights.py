"""The GEMM weight family: a weight carries its own layout.

A model stores a GEMM weight as a [K, N] array (checkpoints, tensor slicing and quantization all
see that form). What `ops.linear` receives is one of:
  DenseWeight(values, k_major)  float [K, N], or [N, K] when k_major (each output's K inputs
                                contiguous: the layout the decode gemv reads; also a tied
                                embedding [V, D] used as the LM head)
  QuantizedWeight(values, scales, zeros, bits, group_size, k_major)
                                integer codes cut along K into groups of G rows (G = K: one
                                scale per output channel):
    8 bits: int8 [K, N] (symmetric: W = q * s) or uint8 [K, N] (asymmetric: W = (q - z) * s);
            k_major: the codes are [N, K], scales and zeros stay [K/G, N]; or FP8:
            float8_e4m3fn [K, N] values (W = q * s; FP8 checkpoints, quant fp8), which XLA
            runs and the Pallas kernels decline
    4 bits: uint8 [K/2, N]; byte r holds row r in its low nibble and row r + K/2 in its high
            one, u in [0, 15]; symmetric: W = (u - 8) * s, asymmetric: W = (u - z) * s
    scales, zeros: float32 [K/G, N] (zeros only when asymmetric: integers from dsjax.quant,
                  fractional from GGUF's Q4_1)

An engine whose linear op runs the Pallas kernels holds its layer GEMM weights (and an untied
LM head) K-major, converted once when it is built and back to [K, N] when it is saved; INT4
codes stay [K/2, N] (docs/decisions.md#k-major-weights). Over a mesh each device transposes its
own slice after the weights are sliced and placed.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

_STATIC = dict(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseWeight:
    values: jax.Array  # [K, N], or [N, K] when k_major
    k_major: bool = dataclasses.field(default=False, **_STATIC)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [K, N] of the weight."""
        return self.values.shape[::-1] if self.k_major else self.values.shape

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    values: jax.Array  # int8/uint8 [K, N] ([N, K] when k_major), or uint8 [K/2, N] packed 4-bit
    scales: jax.Array  # float32 [K/G, N]
    zeros: jax.Array | None  # float32 [K/G, N], or None when symmetric
    bits: int = dataclasses.field(**_STATIC)
    group_size: int = dataclasses.field(**_STATIC)
    k_major: bool = dataclasses.field(default=False, **_STATIC)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical [K, N] of the weight this stands for ([E, K, N]: a stack of MoE experts,
        each quantized on its own)."""
        *lead, rows, cols = self.values.shape
        rows, cols = (cols, rows) if self.k_major else (rows, cols)
        return (*lead, rows * 2 if self.bits == 4 else rows, cols)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def per_channel(self) -> bool:
        """Symmetric, one scale per output channel."""
        return self.zeros is None and self.scales.shape[-2] == 1

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))


Weight = DenseWeight | QuantizedWeight


def as_weight(w) -> Weight:
    """A stored [K, N] array -> DenseWeight; a weight of the family as it is."""
    return w if isinstance(w, (DenseWeight, QuantizedWeight)) else DenseWeight(w)


def is_weight(x) -> bool:
    return isinstance(x, (DenseWeight, QuantizedWeight))


# ----------------------------------------------------------------------------- layouts

def to_k_major(w):
    """A stored [K, N] array -> DenseWeight(k_major); 8-bit codes -> K-major codes; 4-bit codes
    are returned as they are."""
    if isinstance(w, QuantizedWeight):
        return w if w.bits != 8 or w.k_major else dataclasses.replace(
            w, values=_transpose(w.values), k_major=True)
    return DenseWeight(_transpose(w), k_major=True)


def to_stored(w):
    """The inverse of to_k_major: the layout checkpoints and slicing use (other leaves as they
    are)."""
    if isinstance(w, DenseWeight):
        return w.values.T if w.k_major else w.values
    if isinstance(w, QuantizedWeight) and w.k_major:
        return dataclasses.replace(w, values=w.values.T, k_major=False)
    return w


def _transpose(w):
    """[..., K, N] -> [..., N, K] (stage-stacked [P, K, N] weights of a mesh too). A sharded
    array stays sharded the same way, each device transposing its own slice: the spec's last
    two axes swap, so a column-parallel [K, N/T] slice becomes a [N/T, K] one. The [K, N] copy
    is donated (freed at once) where the backend can donate (not the CPU)."""
    out = None
    if isinstance(getattr(w, "sharding", None), NamedSharding):
        spec = tuple(w.sharding.spec) + (None,) * (w.ndim - len(w.sharding.spec))
        out = NamedSharding(w.sharding.mesh, PS(*spec[:-2], spec[-1], spec[-2]))
    return (_swap if jax.default_backend() == "cpu" else _swap_donating)(w, out)


def _swapped(w, out_sharding):
    y = jnp.swapaxes(w, -1, -2)
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


_swap = jax.jit(_swapped, static_argnums=1)
_swap_donating = jax.jit(_swapped, static_argnums=1, donate_argnums=0)


# Block GEMM weights (and an untied LM head) by flat parameter path.
_LAYER_KERNEL = re.compile(r"(^|\.)layers\.\d+\.(attn\.(qkv|out)|mlp\.(up|down))\.kernel$")
_LM_HEAD = re.compile(r"(^|\.)lm_head\.kernel$")
_EXPERTS = re.compile(r"(^|\.)layers\.\d+\.mlp\.experts_(up|down)$")


def is_experts(path: str) -> bool:
    """Whether a flat parameter path names an MoE layer's stacked expert weights [E, K, N]."""
    return bool(_EXPERTS.search(path))


def is_gemm(path: str, lm_head: bool = True) -> bool:
    """Whether a flat parameter path names a layer GEMM weight (or, with lm_head, the LM head)."""
    return bool(_LAYER_KERNEL.search(path) or (lm_head and _LM_HEAD.search(path)))


def k_major_flat(flat: dict) -> dict:
    """{path: leaf} with every layer GEMM weight (and an untied LM head) K-major."""
    return {path: to_k_major(w) if is_gemm(path) else w for path, w in flat.items()}


def stored_params(params):
    """Nested params with every weight back in the stored [K, N] layout."""
    return jax.tree.map(to_stored, params, is_leaf=is_weight)
