"""Decode attention (one new query per sequence over a KV cache): flash-decoding in Pallas.

Shapes: B batch, H query heads, KVH kv heads, G = H // KVH query heads per kv head, S cache
slots, Dh head dim, NS splits of the visible key range.

The query of sequence b sits at position q_pos[b], the slot it was just written to (slot index
== position); it sees the slots s <= q_pos[b] (and s > q_pos[b] - window with a window). Grid
(B, KVH, NS): program (b, h, j) takes the j-th of NS equal chunks of sequence b's visible range,
[lo, q_pos[b] + 1), for all G query heads of kv head h at once, so every K/V block is read once.
A split ending before it starts reads nothing. Each program leaves its partial softmax state
(max m, sum l, unnormalised output o, all float32); a small XLA fusion combines the splits.
With one split (many sequences, or a short cache) the program normalizes its output itself
and stores it in q's dtype: one kernel, no combine.

Optional int8 cache: k, v int8 [B, KVH, S, Dh] with float32 scales [B, KVH, S] (symmetric, per
token per head: value = int8 * scale). The scale multiplies the scores (K) and the probabilities
(V) instead of the tiles, so dequantizing costs a convert per element.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsjax.numerics import MASKED, next_pow2

_MASKED = MASKED  # finite: exp(_MASKED - m) is 0, never NaN
_TARGET_PROGRAMS = 132  # one wave on an H100/H200 (132 SMs): docs/decisions.md#decode-split-count
_TILE_BYTES = 32 * 1024  # K (or V) bytes per loop step: 128 keys of bf16 x 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_k: keys per loop step; num_splits: chunks of the key range per (b, kv head), None
    picks enough to fill the GPU; num_warps, num_stages: Triton launch parameters."""

    block_k: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def default(cls, head_dim: int, kv_dtype) -> BlockSizes:
        """32 KiB K and V tiles (3 stages: 192 KiB of shared memory), 32 to 128 keys: bf16 up
        to Dh 128 and int8 take 128 keys, bf16 Dh 256 and fp32 Dh 128 64, fp32 Dh 256 32."""
        row_bytes = next_pow2(head_dim) * jnp.dtype(kv_dtype).itemsize
        return cls(block_k=min(128, max(32, _TILE_BYTES // row_bytes)))


def num_splits_for(batch: int, kv_heads: int, capacity: int, block_k: int,
                   min_split_keys: int = 0) -> int:
    """Splits per (b, kv head): at most one wave of programs (rounded down: one program fits an
    SM, so rounding up starts a nearly empty second wave), at most one per key block, and each
    covering at least min_split_keys cache slots (0: one key block; fewer splits can mean one,
    which needs no combine kernel: docs/decisions.md#decode-split-minimum)."""
    want = max(1, _TARGET_PROGRAMS // (batch * kv_heads))
    return max(1, min(want, -(-capacity // max(block_k, min_split_keys))))


# ----------------------------------------------------------------------------- reference

def decode_attention_reference(q, k, v, q_pos, *, scale: float, window: int | None = None,
                               alibi_slopes=None, k_scale=None, v_scale=None):
    """Plain-jnp decode attention, float32 throughout.

    q: [B, H, Dh]; k, v: [B, KVH, S, Dh] (int8 with k_scale, v_scale [B, KVH, S]); q_pos: [B].
    Returns [B, H * Dh] in q.dtype.
    """
    B, H, Dh = q.shape
    KVH, S = k.shape[1], k.shape[2]
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    if k_scale is not None:
        kf, vf = kf * k_scale[..., None], vf * v_scale[..., None]
    qf = q.astype(jnp.float32).reshape(B, KVH, H // KVH, Dh)
    s = jnp.einsum("bkgd,bksd->bkgs", qf, kf, precision="highest") * scale  # [B, KVH, G, S]
    rel = jnp.arange(S)[None, :] - q_pos[:, None]  # [B, S]: key position - query position
    mask = rel <= 0
    if window is not None:
        mask = mask & (rel > -window)
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(KVH, H // KVH)
        s = s + slopes[None, :, :, None] * rel[:, None, None, :].astype(jnp.float32)
    s = jnp.where(mask[:, None, None, :], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgs,bksd->bkgd", p, vf, precision="highest")
    return o.reshape(B, H * Dh).astype(q.dtype)


# ----------------------------------------------------------------------------- kernel

def _key_range(q_pos, j, *, window, block_k, num_splits):
    """[start, end) of split j of the keys a query at q_pos sees; start is block-aligned."""
    lo = 0 if window is None else jnp.maximum(q_pos - window + 1, 0) // block_k * block_k
    hi = q_pos + 1
    per_split = (hi - lo + num_splits - 1) // num_splits
    per_split = (per_split + block_k - 1) // block_k * block_k
    start = lo + j * per_split
    return start, jnp.minimum(start + per_split, hi)


def _decode_kernel(qpos_ref, q_ref, k_ref, v_ref, *refs, scale, window, block_k, num_splits,
                   groups, head_dim, alibi, quantized):
    # Blocks of program (b, h, j), padded to powers of two (Gp >= 16 rows for tl.dot, Dp):
    # qpos []; q [Gp, Dp]; k, v [S, Dp]; slopes [Gp]; k/v scales [S];
    # outputs o [Gp, Dp], m, l [Gp], float32 (one split: o [Gp, Dp] normalized, in q's dtype).
    refs = list(refs)
    slopes_ref = refs.pop(0) if alibi else None
    ks_ref, vs_ref = (refs.pop(0), refs.pop(0)) if quantized else (None, None)
    o_ref, *ml_refs = refs
    gp, dp = q_ref.shape
    g_ok, d_ok = jnp.arange(gp) < groups, jnp.arange(dp) < head_dim
    q = plgpu.load(q_ref, mask=g_ok[:, None] & d_ok[None, :], other=0)  # [Gp, Dp]
    cdt = q.dtype
    precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
    slopes = None if slopes_ref is None else plgpu.load(slopes_ref, mask=g_ok, other=0.0)
    qp = qpos_ref[()]
    start, end = _key_range(qp, pl.program_id(2), window=window, block_k=block_k,
                            num_splits=num_splits)
    first = -1 if window is None else qp - window  # keys must lie after it

    def body(i, carry):
        acc, m, l = carry  # [Gp, Dp], [Gp], [Gp]
        s0 = start + i * block_k
        pos = s0 + jnp.arange(block_k)  # [bk] key slots == positions
        row_ok = pos < end
        rows, tile_mask = pl.ds(s0, block_k), row_ok[:, None] & d_ok[None, :]
        k = plgpu.load(k_ref.at[rows, :], mask=tile_mask, other=0).astype(cdt)  # [bk, Dp]
        s = jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32)
        if quantized:
            s = s * (plgpu.load(ks_ref.at[rows], mask=row_ok, other=0.0) * scale)[None, :]
        else:
            s = s * scale  # [Gp, bk]
        if slopes is not None:
            s = s + slopes[:, None] * (pos - qp).astype(jnp.float32)[None, :]
        s = jnp.where((row_ok & (pos > first))[None, :], s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])  # [Gp, bk]
        l = l * corr + jnp.sum(p, axis=1)
        if quantized:
            p = p * plgpu.load(vs_ref.at[rows], mask=row_ok, other=0.0)[None, :]
        v = plgpu.load(v_ref.at[rows, :], mask=tile_mask, other=0).astype(cdt)  # [bk, Dp]
        pv = jnp.dot(p.astype(cdt), v, precision=precision, preferred_element_type=jnp.float32)
        return acc * corr[:, None] + pv, m_new, l

    init = (jnp.zeros((gp, dp), jnp.float32), jnp.full((gp,), _MASKED, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    steps = (jnp.maximum(end - start, 0) + block_k - 1) // block_k
    acc, m, l = jax.lax.fori_loop(0, steps, body, init)
    if not ml_refs:  # the only split: normalize here (l > 0: the query sees its own key)
        acc = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    plgpu.store(o_ref, acc, mask=g_ok[:, None] & d_ok[None, :])
    for ref, x in zip(ml_refs, (m, l)):
        plgpu.store(ref, x, mask=g_ok)


def _block_specs(S, G, Dh, *, alibi, quantized, split):
    """Blocks of program (b, h, j): a whole kv head's cache rows, its G query heads padded to
    Gp >= 16 rows (tl.dot's minimum) and Dh to a power of two (masked, never copied); outputs
    per split (o, m, l), or without `split` o alone."""
    gp, dp = max(16, next_pow2(G)), next_pow2(Dh)
    per_b = pl.BlockSpec((None,), lambda b, h, j: (b,))
    q = pl.BlockSpec((None, None, gp, dp), lambda b, h, j: (b, h, 0, 0))
    kv = pl.BlockSpec((None, None, S, dp), lambda b, h, j: (b, h, 0, 0))
    kv_scale = pl.BlockSpec((None, None, S), lambda b, h, j: (b, h, 0))
    slopes = pl.BlockSpec((None, gp), lambda b, h, j: (h, 0))
    o = pl.BlockSpec((None, None, None, gp, dp), lambda b, h, j: (b, h, j, 0, 0))
    ml = pl.BlockSpec((None, None, None, gp), lambda b, h, j: (b, h, j, 0))
    in_specs = [per_b, q, kv, kv] + [slopes] * alibi + [kv_scale, kv_scale] * quantized
    return in_specs, [o, ml, ml] if split else [q]


def _combine(o, m, l):
    """Split partials o [B, KVH, NS, G, Dh], m, l [B, KVH, NS, G] -> [B, KVH, G, Dh] float32."""
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # empty splits: m = _MASKED, w = 0
    return jnp.sum(o * w[..., None], axis=2) / jnp.sum(l * w, axis=2)[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "window", "block_sizes", "min_split_keys",
                                             "interpret"))
def decode_attention(q, k, v, q_pos, *, scale: float, window: int | None = None,
                     alibi_slopes=None, k_scale=None, v_scale=None,
                     block_sizes: BlockSizes | None = None, min_split_keys: int = 0,
                     interpret: bool = False):
    """Attention of one new query per sequence over its KV cache.

    q: [B, H, Dh]; k, v: [B, KVH, S, Dh] (the dsjax.cache layout), bf16/fp16/fp32, or int8 with
    k_scale, v_scale float32 [B, KVH, S]; q_pos: [B] int32, the slot of the query's own key;
    alibi_slopes: [H] or None (score += slope * (key pos - query pos)). Returns [B, H * Dh] in
    q.dtype; softmax and accumulation in float32. min_split_keys: see num_splits_for (used when
    block_sizes leaves num_splits None).
    """
    B, H, Dh = q.shape
    _, KVH, S, _ = k.shape
    G = H // KVH
    if (k_scale is None) != (v_scale is None) or (k_scale is None) != (k.dtype != jnp.int8):
        raise ValueError("an int8 cache needs k_scale and v_scale; other caches take neither")
    bs = block_sizes or BlockSizes.default(Dh, k.dtype)
    ns = bs.num_splits or num_splits_for(B, KVH, S, bs.block_k, min_split_keys)
    inputs = [q_pos.astype(jnp.int32), q.reshape(B, KVH, G, Dh), k, v]
    if alibi_slopes is not None:
        inputs.append(jnp.asarray(alibi_slopes, jnp.float32).reshape(KVH, G))
    if k_scale is not None:
        inputs += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    kernel = functools.partial(
        _decode_kernel, scale=scale, window=window, block_k=bs.block_k, num_splits=ns, groups=G,
        head_dim=Dh, alibi=alibi_slopes is not None, quantized=k_scale is not None)
    in_specs, out_specs = _block_specs(S, G, Dh, alibi=alibi_slopes is not None,
                                       quantized=k_scale is not None, split=ns > 1)
    if ns > 1:  # per split: o, m, l in float32
        part = jax.ShapeDtypeStruct((B, KVH, ns, G), jnp.float32)
        out_shape = [jax.ShapeDtypeStruct((B, KVH, ns, G, Dh), jnp.float32), part, part]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, KVH, G, Dh), q.dtype)]
    outs = pl.pallas_call(
        kernel,
        grid=(B, KVH, ns),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*inputs)
    out = _combine(*outs) if ns > 1 else outs[0]
    return out.reshape(B, H * Dh).astype(q.dtype)
