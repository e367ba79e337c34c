"""The kernel-injection seam: every heavy op the model runs goes through here.

Each op has implementations by name: "xla" (the reference, in this file) and "pallas" (the
kernels of pallas_kernels/, adapted in dsjax/pallas_ops.py). The caller passes an ordered
preference; the first implementation that exists and accepts the call runs, and the choice is
logged once per (op, implementation). Falling back past the first preference is logged as a
warning with the reason, never silent.

Ops: norm; linear (dense `matmul`, `norm_matmul` with the norm fused in front, `qmatmul` for
quantized weights; each with bias / activation / gated / residual epilogues); attention (no
cache); cache_attention (causal over a KV cache, slot == position); write_kv (split the fused
QKV output into heads, rotate, write K/V into the cache).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import cache as kv_cache
from dsjax.kmajor import KMajorWeight
from dsjax.quant import QuantizedWeight, dequantize

log = logging.getLogger("dsjax.ops")

_REGISTRY: dict[str, dict[str, Callable]] = {}
_ANNOUNCED: set[tuple[str, str, str]] = set()


class Unsupported(Exception):
    """Raised by an implementation that cannot run this particular call (the reason is logged
    and the next implementation in the preference runs)."""


def register(op: str, implementation: str, fn: Callable) -> None:
    _REGISTRY.setdefault(op, {})[implementation] = fn


def _announce(op: str, name: str, level: int, message: str) -> None:
    if (op, name, message) not in _ANNOUNCED:
        _ANNOUNCED.add((op, name, message))
        log.log(level, message)


OPS = ("norm", "linear", "attention", "cache_attention", "write_kv")


def preference_for(impl, op: str) -> tuple[str, ...]:
    """impl: implementation names in order (for every op), or ((op, names), ...) pairs where
    op "*" gives the default."""
    if impl and isinstance(impl[0], tuple):
        table = dict(impl)
        return tuple(table.get(op, table.get("*", ("xla",))))
    return tuple(impl)


def run(op: str, preference, *args, **kwargs):
    """Calls the first implementation of `op` in `preference` (see preference_for) that exists
    and accepts the call."""
    preference = preference_for(preference, op)
    if "pallas" in preference:
        from dsjax import pallas_ops  # noqa: F401

    impls = _REGISTRY.get(op, {})
    skipped = []
    for name in preference:
        if name not in impls:
            skipped.append(f"{name!r} has no {op} kernel")
            continue
        try:
            out = impls[name](*args, **kwargs)
        except Unsupported as why:
            skipped.append(f"{name!r} cannot run it ({why})")
            continue
        if skipped:
            _announce(op, name, logging.WARNING,
                      f"ops.{op}: {'; '.join(skipped)}: falling back to {name!r}")
        _announce(op, name, logging.INFO, f"ops.{op} runs the {name!r} implementation")
        return out
    raise NotImplementedError(f"ops.{op}: none of {list(preference)} can run this call "
                              f"({'; '.join(skipped)}); available: {list(impls)}")


# ----------------------------------------------------------------------------- small types

class NormSpec(NamedTuple):
    """A LayerNorm / RMSNorm to apply in front of a matmul (or alone)."""

    scale: jax.Array  # [D]
    bias: jax.Array | None  # [D]
    kind: str  # "layernorm" | "rmsnorm"
    eps: float
    plus_one: bool  # Gemma: scale + 1


class Rotary(NamedTuple):
    inv_freq: np.ndarray  # float32 [rot_dim / 2]
    rot_dim: int
    layout: str  # "half" | "interleaved"


ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


# ----------------------------------------------------------------------------- XLA reference

def norm_xla(x, spec: NormSpec):
    """LayerNorm or RMSNorm over the last axis, computed in float32 (two-pass variance: the
    one-pass E[x^2] - E[x]^2 loses precision when the mean dwarfs the spread)."""
    xf = x.astype(jnp.float32)
    if spec.kind == "layernorm":
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + spec.eps)
    w = spec.scale.astype(jnp.float32)
    y = y * (w + 1.0 if spec.plus_one else w)
    if spec.bias is not None:
        y = y + spec.bias.astype(jnp.float32)
    return y.astype(x.dtype)


def matmul_xla(x, kernel, bias=None, residual=None, *, activation=None, gated=False,
               kernel_nk=False):
    """act(x [..., K] @ kernel [K, N] + bias) + residual; gated: kernel is [gate | up] and the
    result act(gate) * up [..., N/2]; kernel_nk: kernel stored [N, K] (a tied embedding)."""
    y = jnp.einsum("...k,nk->...n" if kernel_nk else "...k,kn->...n", x, kernel)
    return epilogue_xla(y, bias, residual, activation=activation, gated=gated)


def epilogue_xla(y, bias=None, residual=None, *, activation=None, gated=False):
    """act(y + bias) + residual, gated: act(gate) * up of y = [gate | up]."""
    if bias is not None:
        y = y + bias
    if gated:
        gate, up = jnp.split(y, 2, axis=-1)
        y = ACTIVATIONS[activation](gate) * up
    elif activation is not None:
        y = ACTIVATIONS[activation](y)
    return y if residual is None else y + residual


def linear_xla(x, kernel, bias=None, residual=None, *, norm=None, activation=None, gated=False,
               kernel_nk=False):
    """The whole `linear` op in XLA: optional norm, dense or quantized matmul, epilogue."""
    if norm is not None:
        x = norm_xla(x, norm)
    if isinstance(kernel, KMajorWeight):
        if kernel.scales is None:
            return matmul_xla(x, kernel.values, bias, residual, activation=activation,
                              gated=gated, kernel_nk=True)
        return epilogue_xla(qmatmul_xla(x, kernel.codes(), values_nk=True), bias, residual,
                            activation=activation, gated=gated)
    if isinstance(kernel, QuantizedWeight):
        if kernel_nk:
            kernel = dequantize(kernel, x.dtype)
        else:
            return epilogue_xla(qmatmul_xla(x, kernel), bias, residual, activation=activation,
                                gated=gated)
    return matmul_xla(x, kernel, bias, residual, activation=activation, gated=gated,
                      kernel_nk=kernel_nk)


def qmatmul_xla(x, qw: QuantizedWeight, *, values_nk: bool = False):
    """x [..., K] @ W for a quantized W without materializing W: the integer codes are converted
    inside the dot's operand (XLA fuses the convert), scales and zero points are applied to the
    per-group partial products: x @ ((q - z) s) = sum_g (x_g @ q_g - z_g sum(x_g)) s_g.
    values_nk: 8-bit codes stored [N, K] (dsjax.kmajor)."""
    K, N = x.shape[-1], qw.scales.shape[1]
    G = qw.group_size
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if qw.bits == 4:  # byte r: row r (low nibble), row r + K/2 (high); codes u - 8 if symmetric
        q = jnp.concatenate([qw.values & 0xF, qw.values >> 4], axis=0)
    else:
        q = qw.values
    xg = x2.reshape(-1, K // G, G)  # [M, K/G, G]
    spec, shape = ("mag,nag->man", (N, K // G, G)) if values_nk else ("mag,agn->man",
                                                                       (K // G, G, N))
    part = jnp.einsum(spec, xg, q.reshape(shape).astype(x.dtype),
                      preferred_element_type=jnp.float32)  # [M, K/G, N]
    zero = (8.0 if qw.bits == 4 else None) if qw.zeros is None else qw.zeros
    if zero is not None:
        part = part - zero * jnp.sum(xg.astype(jnp.float32), axis=-1)[..., None]
    y = jnp.sum(part * qw.scales, axis=1)  # [M, N]
    return y.astype(x.dtype).reshape(*lead, N)


_MASKED = -1e30  # finite, so a fully masked row gives a uniform softmax, never NaN


def attention_xla(q, k, v, q_pos, k_pos, k_valid, *, scale: float, causal: bool,
                  window: int | None, alibi_slopes):
    """Softmax attention with GQA, causal/window masks by position and optional ALiBi.

    q: [B, T, H, Dh]; k, v: [B, KVH, S, Dh]; q_pos: [B, T]; k_pos, k_valid: [B, S].
    Returns [B, T, H * Dh].
    """
    B, T, H, Dh = q.shape
    KVH = k.shape[1]
    q = q.reshape(B, T, KVH, H // KVH, Dh)
    s = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    rel = k_pos[:, None, :] - q_pos[:, :, None]  # [B, T, S]: key position - query position
    mask = jnp.broadcast_to(k_valid[:, None, :], rel.shape)
    if causal:
        mask = mask & (rel <= 0)
    if window is not None:
        mask = mask & (rel > -window)
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes).reshape(KVH, H // KVH).astype(jnp.float32)
        s = s + slopes[None, :, :, None, None] * rel[:, None, None].astype(jnp.float32)
    s = jnp.where(mask[:, None, None], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bksd->btkgd", p, v)
    return o.reshape(B, T, H * Dh)


def cache_attention_xla(q, kv, q_pos, *, scale, window, alibi_slopes):
    """Causal attention of q [B, T, H, Dh] at positions q_pos [B, T] over a layer's KV cache
    kv = (k, v) [B, KVH, S, Dh] (or int8 k, v with k_scale, v_scale [B, KVH, S]) whose slot
    index is the key position."""
    k, v = kv[:2]
    if len(kv) == 4:
        k, v = (x.astype(jnp.float32) * s[..., None] for x, s in ((k, kv[2]), (v, kv[3])))
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    B, S = k.shape[0], k.shape[2]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return attention_xla(q, k, v, q_pos, k_pos, jnp.ones((B, S), bool), scale=scale, causal=True,
                         window=window, alibi_slopes=alibi_slopes)


def rotary_xla(x, positions, rotary: Rotary):
    """Rotates the first rot_dim features of x [B, T, N, Dh] by position [B, T]."""
    rd = rotary.rot_dim
    ang = positions[..., None].astype(jnp.float32) * rotary.inv_freq  # [B, T, rd/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xr = x[..., :rd].astype(jnp.float32)
    if rotary.layout == "half":
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:  # interleaved pairs (x0, x1), (x2, x3), ... as in GPT-J
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out.astype(x.dtype), x[..., rd:]], axis=-1)


def split_heads(qkv, positions, *, heads: tuple[int, int, int], rotary: Rotary | None):
    """qkv [B, T, (H + 2K) Dh] -> rotated q [B, T, H, Dh], k, v [B, K, T, Dh]."""
    B, T, _ = qkv.shape
    H, K, Dh = heads
    q = qkv[..., : H * Dh].reshape(B, T, H, Dh)
    k = qkv[..., H * Dh: (H + K) * Dh].reshape(B, T, K, Dh)
    v = qkv[..., (H + K) * Dh:].reshape(B, T, K, Dh)
    if rotary is not None:
        q, k = rotary_xla(q, positions, rotary), rotary_xla(k, positions, rotary)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def write_kv_xla(qkv, kv, positions, write_at, *, heads, rotary):
    """Splits and rotates qkv, writes the T new K/V of sequence b at cache slots write_at[b]..
    (quantized per token and head into an int8 cache); returns (q [B, T, H, Dh], new kv)."""
    q, k, v = split_heads(qkv, positions, heads=heads, rotary=rotary)
    if len(kv) == 2:
        return q, (kv_cache.write(kv[0], k, write_at), kv_cache.write(kv[1], v, write_at))
    from pallas_kernels.decode_attention import quantize_kv  # the kernels' own rounding rule

    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)  # [B, K, T, Dh], [B, K, T]
    write = lambda c, n: kv_cache.write(c[..., None], n[..., None], write_at)[..., 0]  # noqa: E731
    return q, (kv_cache.write(kv[0], kq, write_at), kv_cache.write(kv[1], vq, write_at),
               write(kv[2], ks), write(kv[3], vs))


register("norm", "xla", norm_xla)
register("linear", "xla", linear_xla)
register("attention", "xla", attention_xla)
register("cache_attention", "xla", cache_attention_xla)
register("write_kv", "xla", write_kv_xla)


# ----------------------------------------------------------------------------- the seam

def norm(x, spec: NormSpec, *, impl: Sequence[str] = ("xla",)):
    return run("norm", impl, x, spec)


def linear(x, kernel, bias=None, residual=None, *, norm: NormSpec | None = None,
           activation: str | None = None, gated: bool = False, kernel_nk: bool = False,
           impl: Sequence[str] = ("xla",)):
    """act(norm(x) @ kernel + bias) + residual. kernel: [K, N] array, [N, K] with kernel_nk, a
    QuantizedWeight or a KMajorWeight (dsjax.kmajor); gated: kernel is a fused [gate | up] and
    the result act(gate) * up."""
    return run("linear", impl, x, kernel, bias, residual, norm=norm, activation=activation,
               gated=gated, kernel_nk=kernel_nk)


def attention(q, k, v, q_pos, k_pos, k_valid, *, scale, causal, window, alibi_slopes,
              impl: Sequence[str] = ("xla",)):
    return run("attention", impl, q, k, v, q_pos, k_pos, k_valid, scale=scale, causal=causal,
               window=window, alibi_slopes=alibi_slopes)


def cache_attention(q, kv, q_pos, *, scale, window, alibi_slopes,
                    impl: Sequence[str] = ("xla",)):
    return run("cache_attention", impl, q, kv, q_pos, scale=scale, window=window,
               alibi_slopes=alibi_slopes)


def write_kv(qkv, kv, positions, write_at, *, heads, rotary, impl: Sequence[str] = ("xla",)):
    return run("write_kv", impl, qkv, kv, positions, write_at, heads=heads, rotary=rotary)
