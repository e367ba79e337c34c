"""Paged attention (a flat batch of tokens from many sequences over block pools) in Pallas.

Shapes: N tokens, H query heads, KVH kv heads, G = H // KVH query heads per kv head, NB blocks
of bs slots in each pool, Dh head dim, S sequence rows of MB block-table entries.

The serving engine's step (dsjax.serving.paged): token i belongs to sequence row token_seq[i]
and sits at position q_pos[i]; key position p of sequence s lives in block
block_tables[s, p // bs] at offset p % bs. Token i attends causally to its sequence's keys
0..q_pos[i] (and > q_pos[i] - window with a window), the keys of its own prompt chunk included:
they are written before attention runs. Grid (N, KVH): program (i, h) takes token i and all G
query heads of kv head h, so each K/V row is read once per token and kv head. It walks the
visible key range block_k keys per loop step with an online softmax; each key's block id is
gathered from the token's block-table row, and K/V rows are gathered from the pools (a key step
spans several blocks, or part of one, so block_k is independent of the pool's block size: the
tensor-core dot wants at least 16 keys and power-of-two shapes, pools may have 4-slot blocks).

Optional int8 pools: k, v int8 with float32 scales [NB, KVH, bs] (per token and head); the
scale multiplies the scores (K) and the probabilities (V), as in decode_attention.

What a faster version would do: the tokens of one prompt chunk share their sequence's K/V
blocks, and this kernel reads them once per token; a chunk-aware grid (one program per
(sequence chunk, kv head), its queries as the rows of one dot, flash_attention-style) reads
each block once per chunk. Few long sequences leave most SMs idle: split the key range as
decode_attention does and combine the partials.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsjax.numerics import MASKED, next_pow2
from pallas_kernels.decode_attention import BlockSizes as DecodeBlockSizes
from pallas_kernels.decode_attention import decode_attention_reference

POOL_DTYPES = tuple(jnp.dtype(d) for d in ("bfloat16", "float16", "float32", "int8"))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_k: keys per loop step (a power of two, at least 16); num_warps, num_stages: Triton
    launch parameters."""

    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, head_dim: int, kv_dtype) -> BlockSizes:
        """decode_attention's key tiles (32 KiB of K or V per step)."""
        return cls(block_k=DecodeBlockSizes.default(head_dim, kv_dtype).block_k)


# ----------------------------------------------------------------------------- reference

def gather_sequences(pool, token_seq, block_tables):
    """Each token's sequence as a contiguous cache: pool [NB, KVH, bs, ...] -> [N, KVH,
    MB * bs, ...], key index == position."""
    x = pool[block_tables[token_seq]]  # [N, MB, KVH, bs, ...]
    N, MB, KVH, bs = x.shape[:4]
    return jnp.moveaxis(x, 2, 1).reshape(N, KVH, MB * bs, *x.shape[4:])


def paged_attention_reference(q, k, v, q_pos, token_seq, block_tables, *, scale: float,
                              window: int | None = None, alibi_slopes=None, k_scale=None,
                              v_scale=None):
    """Plain-jnp paged attention, float32 throughout: decode attention of each token over its
    sequence gathered into a contiguous cache. Arguments as paged_attention's."""
    gather = functools.partial(gather_sequences, token_seq=token_seq, block_tables=block_tables)
    scales = {} if k_scale is None else dict(k_scale=gather(k_scale), v_scale=gather(v_scale))
    return decode_attention_reference(q, gather(k), gather(v), q_pos, scale=scale, window=window,
                                      alibi_slopes=alibi_slopes, **scales)


# ----------------------------------------------------------------------------- kernel

def _paged_kernel(qpos_ref, table_ref, q_ref, k_ref, v_ref, *refs, scale, window, block_k,
                  groups, head_dim, alibi, quantized):
    # Blocks of program (i, h), padded to powers of two (Gp >= 16 rows for tl.dot, Dp >= 16):
    # qpos []; table [MB] (token i's block-table row); q [Gp, Dp]; k, v pools [NB, bs, Dp];
    # slopes [Gp]; k/v scales [NB, bs]; output o [Gp, Dp] in q's dtype.
    refs = list(refs)
    slopes_ref = refs.pop(0) if alibi else None
    ks_ref, vs_ref = (refs.pop(0), refs.pop(0)) if quantized else (None, None)
    (o_ref,) = refs
    gp, dp = q_ref.shape
    bs = k_ref.shape[1]
    g_ok, d_ok = jnp.arange(gp) < groups, jnp.arange(dp) < head_dim
    q = plgpu.load(q_ref, mask=g_ok[:, None] & d_ok[None, :], other=0)  # [Gp, Dp]
    cdt = q.dtype
    precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
    slopes = None if slopes_ref is None else plgpu.load(slopes_ref, mask=g_ok, other=0.0)
    qp = qpos_ref[()]
    first = -1 if window is None else qp - window  # visible keys lie after it
    start = jnp.maximum(first + 1, 0)  # keys are gathered one by one: no block alignment

    def body(j, carry):
        acc, m, l = carry  # [Gp, Dp], [Gp], [Gp]
        pos = start + j * block_k + jnp.arange(block_k)  # [bk] key positions
        ok = (pos <= qp) & (pos > first)
        block = plgpu.load(table_ref.at[pos // bs], mask=ok, other=0)  # [bk] block ids
        at = (block, pos % bs)  # each key's slot; its K/V row gathered by array indices
        tile = (block[:, None], at[1][:, None], jnp.arange(dp)[None, :])  # (interpret mode
        tile_mask = ok[:, None] & d_ok[None, :]  # takes no slice mixed with arrays)
        k = plgpu.load(k_ref.at[tile], mask=tile_mask, other=0).astype(cdt)  # [bk, Dp]
        s = jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32)
        if quantized:
            s = s * (plgpu.load(ks_ref.at[at], mask=ok, other=0.0) * scale)[None, :]
        else:
            s = s * scale  # [Gp, bk]
        if slopes is not None:
            s = s + slopes[:, None] * (pos - qp).astype(jnp.float32)[None, :]
        s = jnp.where(ok[None, :], s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])  # [Gp, bk]
        l = l * corr + jnp.sum(p, axis=1)
        if quantized:
            p = p * plgpu.load(vs_ref.at[at], mask=ok, other=0.0)[None, :]
        v = plgpu.load(v_ref.at[tile], mask=tile_mask, other=0).astype(cdt)  # [bk, Dp]
        pv = jnp.dot(p.astype(cdt), v, precision=precision, preferred_element_type=jnp.float32)
        return acc * corr[:, None] + pv, m_new, l

    init = (jnp.zeros((gp, dp), jnp.float32), jnp.full((gp,), MASKED, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    steps = (qp + 1 - start + block_k - 1) // block_k
    acc, m, l = jax.lax.fori_loop(0, steps, body, init)
    acc = acc / jnp.where(l > 0, l, 1.0)[:, None]  # l > 0: a token sees its own key
    plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=g_ok[:, None] & d_ok[None, :])


def _block_specs(NB, bs, MB, G, Dh, *, alibi, quantized):
    """Blocks of program (i, h): token i's position and block-table row, its G query heads of
    kv head h padded to Gp >= 16 rows (tl.dot's minimum) and Dh to Dp >= 16 (masked, never
    copied), and kv head h of every block of the pools; the output like q."""
    gp, dp = max(16, next_pow2(G)), max(16, next_pow2(Dh))
    per_token = pl.BlockSpec((None,), lambda i, h: (i,))
    table = pl.BlockSpec((None, MB), lambda i, h: (i, 0))
    q = pl.BlockSpec((None, None, gp, dp), lambda i, h: (i, h, 0, 0))
    pool = pl.BlockSpec((NB, None, bs, dp), lambda i, h: (0, h, 0, 0))
    pool_scale = pl.BlockSpec((NB, None, bs), lambda i, h: (0, h, 0))
    slopes = pl.BlockSpec((None, gp), lambda i, h: (h, 0))
    in_specs = [per_token, table, q, pool, pool] + [slopes] * alibi + [pool_scale] * 2 * quantized
    return in_specs, q


@functools.partial(jax.jit, static_argnames=("scale", "window", "block_sizes", "interpret"))
def paged_attention(q, k, v, q_pos, token_seq, block_tables, *, scale: float,
                    window: int | None = None, alibi_slopes=None, k_scale=None, v_scale=None,
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Causal attention of each token of a flat batch over its own sequence's blocks.

    q: [N, H, Dh]; k, v: pools [NB, KVH, bs, Dh] (dsjax.serving.paged), bf16/fp16/fp32, or int8
    with k_scale, v_scale float32 [NB, KVH, bs]; q_pos, token_seq: [N] int32 (each token's
    position and block-table row); block_tables: [S, MB] int32; alibi_slopes: [H] or None
    (score += slope * (key pos - query pos)). Returns [N, H * Dh] in q.dtype; softmax and
    accumulation in float32.
    """
    N, H, Dh = q.shape
    NB, KVH, bs, _ = k.shape
    G, MB = H // KVH, block_tables.shape[1]
    if (k_scale is None) != (v_scale is None) or (k_scale is None) == (k.dtype == jnp.int8):
        raise ValueError("int8 pools need k_scale and v_scale; other pools take neither")
    bks = block_sizes or BlockSizes.default(Dh, k.dtype)
    if bks.block_k < 16 or bks.block_k & (bks.block_k - 1):
        raise ValueError(f"block_k={bks.block_k}: a power of two of at least 16 (tl.dot's)")
    quantized, alibi = k_scale is not None, alibi_slopes is not None
    tables = block_tables.astype(jnp.int32)[token_seq]  # [N, MB]: each token's row
    inputs = [q_pos.astype(jnp.int32), tables, q.reshape(N, KVH, G, Dh), k, v]
    if alibi:
        inputs.append(jnp.asarray(alibi_slopes, jnp.float32).reshape(KVH, G))
    if quantized:
        inputs += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    kernel = functools.partial(
        _paged_kernel, scale=scale, window=window, block_k=bks.block_k, groups=G, head_dim=Dh,
        alibi=alibi, quantized=quantized)
    in_specs, out_spec = _block_specs(NB, bs, MB, G, Dh, alibi=alibi, quantized=quantized)
    out = pl.pallas_call(
        kernel,
        grid=(N, KVH),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((N, KVH, G, Dh), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bks.num_warps, num_stages=bks.num_stages),
        interpret=interpret,
        name="paged_attention",
    )(*inputs)
    return out.reshape(N, H * Dh)
