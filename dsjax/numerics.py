"""The numeric helpers the XLA ops and the Pallas kernels' references share, each written once:
activations, the norm spec and its math, the matmul epilogue, rotary embeddings, int8 K/V
rounding, weight dequantization, the masking constant and powers of two.

Plain jnp over whole arrays, float32 inside. Nothing here imports from the rest of dsjax (and
`import dsjax` loads its submodules lazily), so pallas_kernels/ use it without loading the engine.
"""

from __future__ import annotations

import dataclasses
import functools
from types import MappingProxyType

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite: a fully masked row gives a uniform softmax, never NaN; exp(MASKED - m) = 0

ACTIVATIONS = MappingProxyType({
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
})
NORM_KINDS = ("layernorm", "rmsnorm")


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def check_activation(name: str | None) -> None:
    if name is not None and name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")


# ----------------------------------------------------------------------------- norms

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A LayerNorm or RMSNorm over the last axis: y = norm(x) * scale (+ bias). plus_one: the
    scale is stored as (scale - 1) (Gemma). The arrays are leaves; kind, eps, plus_one static."""

    scale: jax.Array  # [D]
    bias: jax.Array | None  # [D], LayerNorm only (None otherwise)
    kind: str = dataclasses.field(metadata=dict(static=True))
    eps: float = dataclasses.field(metadata=dict(static=True))
    plus_one: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"norm kind must be one of {NORM_KINDS}, not {self.kind!r}")


def apply_norm(x, spec: NormSpec):
    """norm(x) over the last axis in float32 (two-pass variance: the one-pass E[x^2] - E[x]^2
    loses precision when the mean dwarfs the spread), cast back to x.dtype."""
    xf = x.astype(jnp.float32)
    if spec.kind == "layernorm":
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + spec.eps)
    w = spec.scale.astype(jnp.float32)
    y = y * (w + 1.0 if spec.plus_one else w)
    if spec.bias is not None:
        y = y + spec.bias.astype(jnp.float32)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- epilogue

def epilogue(y, bias=None, residual=None, *, activation=None, gated=False):
    """act(y + bias) + residual; gated: y = [gate | up] [..., 2N] and the result act(gate) * up
    [..., N], in jnp's promotion of the operands' dtypes (float32 for the kernels' references)."""
    if bias is not None:
        y = y + bias
    if gated:
        gate, up = jnp.split(y, 2, axis=-1)
        y = ACTIVATIONS[activation](gate) * up
    elif activation is not None:
        y = ACTIVATIONS[activation](y)
    return y if residual is None else y + residual


# ----------------------------------------------------------------------------- rotary

def rotate(x, positions, inv_freq, rot_dim: int, layout: str):
    """x [B, T, N, Dh] with its first rot_dim features rotated by positions [B, T]: "half" pairs
    feature i with i + rot_dim/2 (NeoX, LLaMA), "interleaved" pairs 2i with 2i + 1 (GPT-J)."""
    ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]  # [B, T, 1, R]
    xr = x[..., :rot_dim].astype(jnp.float32)
    if layout == "half":
        x1, x2 = xr[..., : rot_dim // 2], xr[..., rot_dim // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out.astype(x.dtype), x[..., rot_dim:]], axis=-1)


# ----------------------------------------------------------------------------- int8 K/V

def round_half_away(x):
    """Round to nearest, ties away from zero (floor, abs and select only: lowers to Triton)."""
    r = jnp.floor(jnp.abs(x) + 0.5)
    return jnp.where(x < 0, -r, r)


def quantize_kv(x):
    """x [..., Dh] -> (int8 [..., Dh], float32 scale [...]) with x ~= int8 * scale; symmetric,
    scale = max|x| / 127 per row (1 for an all-zero row)."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(round_half_away(xf / scale[..., None]), -127, 127)
    return q.astype(jnp.int8), scale


# ----------------------------------------------------------------------------- weights

def unpack_int4(values):
    """uint8 [K/2, N] -> codes [K, N] in [0, 15]: byte r holds row r in its low nibble and row
    r + K/2 in its high one."""
    return jnp.concatenate([values & 0xF, values >> 4], axis=0)


def dequantize(values, scales, zeros=None, *, bits: int, group_size: int, dtype=jnp.float32):
    """W [K, N] from quantized codes (int8/uint8 [K, N] or packed 4-bit [K/2, N]), scales and
    zero points [K/G, N]: W = (q - z) * s, z = 8 for symmetric 4-bit, 0 for symmetric 8-bit
    (and for FP8 codes, float values)."""
    q = values if jnp.issubdtype(values.dtype, jnp.floating) else values.astype(jnp.int32)
    if bits == 4:
        q = unpack_int4(q)
    K, N = q.shape
    zero = (8.0 if bits == 4 else 0.0) if zeros is None else zeros[:, None]
    wg = q.astype(jnp.float32).reshape(K // group_size, group_size, N) - zero
    return (wg * scales[:, None]).reshape(K, N).astype(dtype)
