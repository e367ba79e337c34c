"""The kernel-injection seam: every heavy op the model runs goes through here.

Each op has an XLA implementation (the reference, in this file) and, for most, a Pallas one
(dsjax.pallas_ops, over the kernels in pallas_kernels/). The engine's KernelPolicy names the one
each op runs; the registry that maps the names to functions is built once, below, and never
changes. An implementation that cannot take a particular call raises policy.Unsupported: the XLA
implementation runs instead and the log says why (a warning, never silent). Every choice is
logged once per compiled program (dsjax.policy.OncePerProgram).

Ops: norm; linear (dense or quantized weight of either layout, dsjax.weights; a norm in front,
bias / activation / gated / residual epilogues behind); attention (no cache); cache_attention
(causal over a KV cache, slot == position); write_kv (split the fused QKV output into heads,
rotate, write K/V into the cache); paged_write_kv and paged_attention (the same over the
serving engine's block pools, a flat batch of tokens from many sequences: dsjax.serving.paged);
experts (sparse expert MLPs of MoE layers, dropless).
"""

from __future__ import annotations

import logging
import math
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import cache as kv_cache
from dsjax import numerics, pallas_ops
from dsjax.numerics import NormSpec
from dsjax.policy import KernelPolicy, Unsupported, announce
from dsjax.quant.weights import dequantize
from dsjax.serving import paged
from dsjax.weights import QuantizedWeight, as_weight

__all__ = ["NormSpec", "Rotary", "attention", "cache_attention", "linear", "norm", "write_kv"]


class Rotary(NamedTuple):
    inv_freq: np.ndarray  # float32 [rot_dim / 2]
    rot_dim: int
    layout: str  # "half" | "interleaved"


# ----------------------------------------------------------------------------- XLA reference

def norm_xla(x, spec: NormSpec):
    return numerics.apply_norm(x, spec)


def linear_xla(x, w, bias=None, residual=None, *, norm=None, activation=None, gated=False):
    """act(norm(x) @ W + bias) + residual in XLA, for a weight of either layout."""
    if norm is not None:
        x = numerics.apply_norm(x, norm)
    if isinstance(w, QuantizedWeight):
        y = qmatmul_xla(x, w)
    else:
        y = jnp.einsum("...k,nk->...n" if w.k_major else "...k,kn->...n", x, w.values)
    return numerics.epilogue(y, bias, residual, activation=activation, gated=gated)


def qmatmul_xla(x, qw: QuantizedWeight):
    """x [..., K] @ W for a quantized W without materializing W: the integer codes are converted
    inside the dot's operand (XLA fuses the convert), scales and zero points are applied to the
    per-group partial products: x @ ((q - z) s) = sum_g (x_g @ q_g - z_g sum(x_g)) s_g."""
    K, N = qw.shape
    G = qw.group_size
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    q = numerics.unpack_int4(qw.values) if qw.bits == 4 else qw.values
    xg = x2.reshape(-1, K // G, G)  # [M, K/G, G]
    spec, shape = ("mag,nag->man", (N, K // G, G)) if qw.k_major else ("mag,agn->man",
                                                                       (K // G, G, N))
    part = _einsum_f32(spec, xg, q.reshape(shape).astype(x.dtype))  # [M, K/G, N]
    zero = (8.0 if qw.bits == 4 else None) if qw.zeros is None else qw.zeros
    if zero is not None:
        part = part - zero * jnp.sum(xg.astype(jnp.float32), axis=-1)[..., None]
    y = jnp.sum(part * qw.scales, axis=1)  # [M, N]
    return y.astype(x.dtype).reshape(*lead, N)


def _einsum_f32(spec: str, a, b):
    """einsum with float32 results. The CPU's batched dot has no bf16 x bf16 = f32: there the
    operands go up to float32 first (the same products, exactly)."""
    def up(a, b):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))

    def mixed(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return jax.lax.platform_dependent(a, b, cpu=up, default=mixed)


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
    s = jnp.where(mask[:, None, None], s, numerics.MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bksd->btkgd", p, v)
    return o.reshape(B, T, H * Dh)


def cache_attention_xla(q, kv, q_pos, *, scale, window, alibi_slopes, from_start=False):
    """Causal attention of q [B, T, H, Dh] at positions q_pos [B, T] over a layer's KV cache
    kv = (k, v) [B, KVH, S, Dh] (or int8 k, v with k_scale, v_scale [B, KVH, S]) whose slot
    index is the key position. from_start: the T tokens are their sequences' first (q_pos
    0..T-1 in every row), so only the cache's first T slots are read."""
    if from_start:
        kv = tuple(x[:, :, :q.shape[1]] for x in kv)
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
    return numerics.rotate(x, positions, rotary.inv_freq, rotary.rot_dim, rotary.layout)


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
    (kq, ks), (vq, vs) = numerics.quantize_kv(k), numerics.quantize_kv(v)  # [B, K, T, Dh], [B, K, T]
    write = lambda c, n: kv_cache.write(c[..., None], n[..., None], write_at)[..., 0]  # noqa: E731
    return q, (kv_cache.write(kv[0], kq, write_at), kv_cache.write(kv[1], vq, write_at),
               write(kv[2], ks), write(kv[3], vs))


def paged_write_kv_xla(qkv, layer, positions, *, heads, rotary):
    """Splits and rotates the flat batch's qkv [1, N, (H + 2K) Dh], writes its K/V at the
    step's slots; returns (q [1, N, H, Dh], the layer with its pools written)."""
    q, k, v = split_heads(qkv, positions, heads=heads, rotary=rotary)  # k, v [1, K, N, Dh]
    return q, paged.write_xla(layer, k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2))


def paged_attention_xla(q, layer, q_pos, *, scale, window, alibi_slopes):
    """Causal attention of each token of q [1, N, H, Dh] at q_pos [1, N] over its sequence's
    blocks (the reference: each token's keys gathered on their own)."""
    k, v = paged.gather_keys(layer, q.dtype)  # [N, KVH, C, Dh]
    N, C = k.shape[0], k.shape[2]
    k_pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (N, C))
    o = attention_xla(q[0][:, None], k, v, q_pos[0][:, None], k_pos, jnp.ones((N, C), bool),
                      scale=scale, causal=True, window=window, alibi_slopes=alibi_slopes)
    return o.reshape(1, N, -1)


def experts_xla(x, up, down, experts, weights, *, activation: str):
    """Sparse expert MLPs: x [N, D] -> [N, D], token n's output the sum over its k picks j of
    weights[n, j] * down_e(act(gate_e(x)) * up_e(x)), e = experts[n, j]; up [E, D, 2I] ([gate |
    up] per expert), down [E, I, D]. Exact and dropless: the (token, pick) rows sorted by expert
    run through ragged_dot (each expert's rows against its own weights), then are summed back
    per token."""
    up, down = (dequantize(w, x.dtype) if isinstance(w, QuantizedWeight) else w  # (the
                for w in (up, down))  # reference: the grouped GEMM dequantizes tiles instead)
    N, D = x.shape
    E, k = up.shape[0], experts.shape[1]
    flat = jnp.where(experts < 0, E, experts).reshape(-1)  # -1: no expert, sorted last
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.zeros(E, jnp.int32).at[flat].add(1, mode="drop")  # rows past the groups: 0
    h = jax.lax.ragged_dot(x[token], up, sizes, preferred_element_type=jnp.float32)
    h = numerics.epilogue(h, activation=activation, gated=True).astype(down.dtype)
    o = jax.lax.ragged_dot(h, down, sizes, preferred_element_type=jnp.float32)
    o = o * jnp.where(flat < E, weights.reshape(-1), 0)[order][:, None].astype(jnp.float32)
    return jnp.zeros((N, D), jnp.float32).at[token].add(o).astype(x.dtype)


def experts_sliced(x, up, down, experts, weights, *, activation: str):
    """experts_xla's result with each (token, pick) row run against its own expert's weights,
    sliced from the stacks by a dynamic index: a step with few rows reads only the experts it
    picked (ragged_dot reads them all). One row at a time (the rows are few: the policy's
    expert_slice_rows bounds them); a row of expert -1 contributes 0."""
    N, D = x.shape
    k = experts.shape[1]
    picks, scale = experts.reshape(-1), weights.reshape(-1).astype(jnp.float32)
    out = []
    for r in range(N * k):
        e = jnp.maximum(picks[r], 0)
        u, d = (_one_expert(w, e, x.dtype) for w in (up, down))
        h = jnp.dot(x[r // k][None], u, preferred_element_type=jnp.float32)
        h = numerics.epilogue(h, activation=activation, gated=True).astype(d.dtype)
        o = jnp.dot(h, d, preferred_element_type=jnp.float32)[0]
        out.append(o * jnp.where(picks[r] >= 0, scale[r], 0))
    return jnp.stack(out).reshape(N, k, D).sum(1).astype(x.dtype)


def _one_expert(w, e, dtype):
    """Expert e of a stack [E, K, N] (a QuantizedWeight stack: its parts sliced, dequantized)."""
    take = lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False)  # noqa: E731
    if isinstance(w, QuantizedWeight):
        return dequantize(jax.tree.map(take, w), dtype)
    return take(w)


# ----------------------------------------------------------------------------- the registry

_REGISTRY = MappingProxyType({op: MappingProxyType(impls) for op, impls in {
    "norm": {"xla": norm_xla},
    "linear": {"xla": linear_xla, "pallas": pallas_ops.linear},
    "attention": {"xla": attention_xla, "pallas": pallas_ops.attention},
    "cache_attention": {"xla": cache_attention_xla, "pallas": pallas_ops.cache_attention},
    "write_kv": {"xla": write_kv_xla, "pallas": pallas_ops.write_kv},
    "paged_write_kv": {"xla": paged_write_kv_xla},
    "paged_attention": {"xla": paged_attention_xla, "pallas": pallas_ops.paged_attention},
    "experts": {"xla": experts_xla, "pallas": pallas_ops.experts},
}.items()})


def run(op: str, policy: KernelPolicy, *args, **kwargs):
    """Runs `op` with the implementation the policy names; a Pallas implementation that cannot
    take this call (policy.Unsupported) falls back to XLA with a warning saying why."""
    name = policy.implementation(op)
    impls = _REGISTRY[op]
    if name != "xla":
        try:
            out = impls[name](*args, policy=policy, **kwargs)
        except Unsupported as why:
            announce(f"ops.{op}: {name!r} cannot run it ({why}): falling back to 'xla'",
                     logging.WARNING)
        else:
            announce(f"ops.{op} runs the {name!r} implementation")
            return out
    announce(f"ops.{op} runs the 'xla' implementation")
    return impls["xla"](*args, **kwargs)


# ----------------------------------------------------------------------------- the seam

def norm(x, spec: NormSpec, *, policy: KernelPolicy):
    return run("norm", policy, x, spec)


def linear(x, w, bias=None, residual=None, *, norm: NormSpec | None = None,
           activation: str | None = None, gated: bool = False, policy: KernelPolicy):
    """act(norm(x) @ W + bias) + residual. w: a stored [K, N] array or a dsjax.weights weight
    (DenseWeight or QuantizedWeight, either layout); gated: W is a fused [gate | up] and the
    result act(gate) * up. Under the Pallas linear, GEMMs of more rows than the policy's
    xla_gemm_rows (prompts) run XLA's (pallas_ops.route_linear)."""
    w = as_weight(w)
    if policy.linear == "pallas":
        rows = math.prod(x.shape[:-1])
        if pallas_ops.route_linear(w, rows, norm, policy).kernel == "xla":
            announce(f"ops.linear: XLA's GEMM for more than {policy.xla_gemm_rows} rows "
                     "(KernelPolicy.xla_gemm_rows)")
            return linear_xla(x, w, bias, residual, norm=norm, activation=activation, gated=gated)
    return run("linear", policy, x, w, bias, residual, norm=norm, activation=activation,
               gated=gated)


def attention(q, k, v, q_pos, k_pos, k_valid, *, scale, causal, window, alibi_slopes,
              policy: KernelPolicy):
    return run("attention", policy, q, k, v, q_pos, k_pos, k_valid, scale=scale, causal=causal,
               window=window, alibi_slopes=alibi_slopes)


def cache_attention(q, kv, q_pos, *, scale, window, alibi_slopes, policy: KernelPolicy,
                    from_start: bool = False):
    """from_start (static): the caller's promise that q's T tokens are their sequences' first
    (q_pos = 0..T-1 in every row, nothing in the cache before them): a prompt's phase."""
    return run("cache_attention", policy, q, kv, q_pos, scale=scale, window=window,
               alibi_slopes=alibi_slopes, from_start=from_start)


def write_kv(qkv, kv, positions, write_at, *, heads, rotary, policy: KernelPolicy):
    return run("write_kv", policy, qkv, kv, positions, write_at, heads=heads, rotary=rotary)


def paged_write_kv(qkv, layer, positions, *, heads, rotary, policy: KernelPolicy):
    return run("paged_write_kv", policy, qkv, layer, positions, heads=heads, rotary=rotary)


def paged_attention(q, layer, q_pos, *, scale, window, alibi_slopes, policy: KernelPolicy):
    return run("paged_attention", policy, q, layer, q_pos, scale=scale, window=window,
               alibi_slopes=alibi_slopes)


def experts(x, up, down, picks, weights, *, activation: str, policy: KernelPolicy):
    if policy.experts == "xla" and picks.size <= policy.expert_slice_rows:
        announce(f"ops.experts runs each of its {picks.size} rows against its expert's slice (XLA)")
        return experts_sliced(x, up, down, picks, weights, activation=activation)
    return run("experts", policy, x, up, down, picks, weights, activation=activation)
