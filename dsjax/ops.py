"""The kernel-injection seam: every heavy op the model runs goes through here.

Each op has implementations by name ("xla" here; the Pallas kernel issues register "pallas"
ones). The caller passes an ordered preference; the first registered implementation runs, and
the choice is logged once per (op, implementation). Falling back past the first preference is
logged as a warning, never silent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

log = logging.getLogger("dsjax.ops")

_REGISTRY: dict[str, dict[str, Callable]] = {}
_ANNOUNCED: set[tuple[str, str]] = set()


def register(op: str, implementation: str, fn: Callable) -> None:
    _REGISTRY.setdefault(op, {})[implementation] = fn


def available(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, preference: Sequence[str]) -> Callable:
    """The first implementation of `op` in `preference` that exists; logs which one runs."""
    impls = _REGISTRY.get(op, {})
    for rank, name in enumerate(preference):
        if name in impls:
            if (op, name) not in _ANNOUNCED:
                _ANNOUNCED.add((op, name))
                if rank:
                    log.warning("ops.%s: %s unavailable, falling back to %r", op,
                                ", ".join(map(repr, preference[:rank])), name)
                log.info("ops.%s runs the %r implementation", op, name)
            return impls[name]
    raise NotImplementedError(
        f"ops.{op}: none of {list(preference)} is implemented (available: {list(impls)})"
    )


# ----------------------------------------------------------------------------- XLA reference

def norm_xla(x, scale, bias, *, kind: str, eps: float, plus_one: bool):
    """LayerNorm or RMSNorm over the last axis, computed in float32 (two-pass variance: the
    one-pass E[x^2] - E[x]^2 loses precision when the mean dwarfs the spread)."""
    xf = x.astype(jnp.float32)
    if kind == "layernorm":
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    w = scale.astype(jnp.float32)
    y = y * (w + 1.0 if plus_one else w)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def linear_xla(x, kernel, bias=None, *, kernel_nk: bool = False):
    """x [..., K] @ kernel [K, N] (+ bias [N]); kernel_nk: the kernel is stored [N, K] (a tied
    embedding used as the LM head), contracted in place rather than transposed."""
    y = jnp.einsum("...k,nk->...n" if kernel_nk else "...k,kn->...n", x, kernel)
    return y if bias is None else y + bias


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
        slopes = alibi_slopes.reshape(KVH, H // KVH).astype(jnp.float32)
        s = s + slopes[None, :, :, None, None] * rel[:, None, None].astype(jnp.float32)
    s = jnp.where(mask[:, None, None], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bksd->btkgd", p, v)
    return o.reshape(B, T, H * Dh)


register("norm", "xla", norm_xla)
register("linear", "xla", linear_xla)
register("attention", "xla", attention_xla)


def norm(x, scale, bias, *, kind, eps, plus_one, impl: Sequence[str] = ("xla",)):
    return resolve("norm", impl)(x, scale, bias, kind=kind, eps=eps, plus_one=plus_one)


def linear(x, kernel, bias=None, *, kernel_nk: bool = False, impl: Sequence[str] = ("xla",)):
    return resolve("linear", impl)(x, kernel, bias, kernel_nk=kernel_nk)


def attention(q, k, v, q_pos, k_pos, k_valid, *, scale, causal, window, alibi_slopes,
              impl: Sequence[str] = ("xla",)):
    return resolve("attention", impl)(q, k, v, q_pos, k_pos, k_valid, scale=scale,
                                      causal=causal, window=window, alibi_slopes=alibi_slopes)
