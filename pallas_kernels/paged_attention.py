"""Paged attention (a flat batch of tokens from many sequences over block pools) in Pallas.

Shapes: N tokens, H query heads, KVH kv heads, G = H // KVH query heads per kv head, NB blocks
of bs slots in each pool, Dh head dim, S sequence rows of MB block-table entries.

The serving engine's step (dsjax.serving.paged): token i belongs to sequence row token_seq[i]
and sits at position q_pos[i]; key position p of sequence s lives in block
block_tables[s, p // bs] at offset p % bs. Token i attends causally to its sequence's keys
0..q_pos[i] (and > q_pos[i] - window with a window), the keys of its own prompt chunk included:
they are written before attention runs.

Grid (T, KVH): the tokens of each sequence (contiguous in the flat batch) split into tiles of
block_q tokens, and program (t, h) takes tile t with all G query heads of kv head h as the
block_q * G rows of one dot, so a prompt chunk's K/V rows are read once per tile, not once per
token; block_q = 1 (one program per token) suits decode steps. T = N / block_q + S bounds the
tiles (unused ones are empty). A program walks the key range its rows can see, block_k keys per
loop step with an online softmax and a causal mask per row; each key's block id is gathered
from the sequence's block-table row, and K/V rows are gathered from the pools (a key step spans
several blocks, or part of one, so block_k is independent of the pool's block size: the
tensor-core dot wants at least 16 rows and keys and power-of-two shapes, pools may have 4-slot
blocks). Each tile writes its rows in order; XLA gathers each token's rows back.

Optional int8 pools: k, v int8 with float32 scales [NB, KVH, bs] (per token and head); the
scale multiplies the scores (K) and the probabilities (V), as in decode_attention.

What a faster version would do: few long sequences leave most SMs idle: split the key range as
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
    """block_q: tokens of one sequence per program (1: one program per token; None: 1 for a
    step of no more tokens than sequences (decode), else 64 query rows' worth); block_k: keys
    per loop step (a power of two, at least 16); num_warps, num_stages: Triton launch
    parameters."""

    block_q: int | None = None
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, head_dim: int, kv_dtype) -> BlockSizes:
        """decode_attention's key tiles (32 KiB of K or V per step) for one-token programs;
        64 keys for tiles of 64 query rows (their scores stay in registers)."""
        return cls(block_k=DecodeBlockSizes.default(head_dim, kv_dtype).block_k)

    def resolved(self, tokens: int, seqs: int, groups: int) -> BlockSizes:
        """block_q and block_k for a step of `tokens` tokens of `seqs` sequences."""
        if self.block_q is not None:
            return self
        if tokens <= seqs:
            return dataclasses.replace(self, block_q=1)
        return dataclasses.replace(self, block_q=max(1, 64 // next_pow2(groups)),
                                   block_k=min(self.block_k, 64))


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

def _paged_kernel(start_ref, count_ref, table_ref, qpos_ref, q_ref, k_ref, v_ref, *refs, scale,
                  window, block_k, block_q, groups, head_dim, alibi, quantized):
    # Program (t, h): tile t's `count` tokens from flat index `start` (all of one sequence, whose
    # block-table row is `table` [MB]), kv head h. Its R query rows are (token i // Gq, head
    # i % Gq) for Gq = next_pow2(G), padded to R >= 16 rows (tl.dot's minimum): q [N, Gq, Dp]
    # of the kv head (rows gathered); qpos [N]; pools [NB, bs, Dp]; slopes [Gq]; k/v scales
    # [NB, bs]; the output o [R, Dp], the tile's rows in order.
    refs = list(refs)
    slopes_ref = refs.pop(0) if alibi else None
    ks_ref, vs_ref = (refs.pop(0), refs.pop(0)) if quantized else (None, None)
    (o_ref,) = refs
    gq, (rows, dp), bs = q_ref.shape[1], o_ref.shape, k_ref.shape[1]
    tok, g = jnp.arange(rows) // gq, jnp.arange(rows) % gq
    ok = (tok < jnp.minimum(count_ref[()], block_q)) & (g < groups)  # [R] real rows
    at = jnp.where(ok, start_ref[()] + tok, 0)  # each row's token in the flat batch
    d = jnp.arange(dp)
    d_ok = d < head_dim
    q = plgpu.load(q_ref.at[at[:, None], g[:, None], d[None, :]],
                   mask=ok[:, None] & d_ok[None, :], other=0)  # [R, Dp]
    cdt = q.dtype
    precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
    qp = plgpu.load(qpos_ref.at[at], mask=ok, other=0)  # [R] query positions
    slopes = None if slopes_ref is None else plgpu.load(slopes_ref.at[g], mask=ok, other=0.0)
    hi = jnp.max(jnp.where(ok, qp, 0)) + 1  # keys [lo, hi) cover every row's visible keys
    lo = 0 if window is None else jnp.maximum(jnp.min(jnp.where(ok, qp, hi)) - window + 1, 0)

    def body(j, carry):
        acc, m, l = carry  # [R, Dp], [R], [R]
        pos = lo + j * block_k + jnp.arange(block_k)  # [bk] key positions
        key_ok = pos < hi
        block = plgpu.load(table_ref.at[pos // bs], mask=key_ok, other=0)  # [bk] block ids
        slot = (block, pos % bs)  # each key's slot; its K/V row gathered by array indices
        tile = (block[:, None], slot[1][:, None], d[None, :])
        tile_mask = key_ok[:, None] & d_ok[None, :]
        k = plgpu.load(k_ref.at[tile], mask=tile_mask, other=0).astype(cdt)  # [bk, Dp]
        s = jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32)
        if quantized:
            s = s * (plgpu.load(ks_ref.at[slot], mask=key_ok, other=0.0) * scale)[None, :]
        else:
            s = s * scale  # [R, bk]
        if slopes is not None:
            s = s + slopes[:, None] * (pos[None, :] - qp[:, None]).astype(jnp.float32)
        seen = key_ok[None, :] & (pos[None, :] <= qp[:, None])
        if window is not None:
            seen = seen & (pos[None, :] > qp[:, None] - window)
        s = jnp.where(seen, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])  # [R, bk]
        l = l * corr + jnp.sum(p, axis=1)
        if quantized:
            p = p * plgpu.load(vs_ref.at[slot], mask=key_ok, other=0.0)[None, :]
        v = plgpu.load(v_ref.at[tile], mask=tile_mask, other=0).astype(cdt)  # [bk, Dp]
        pv = jnp.dot(p.astype(cdt), v, precision=precision, preferred_element_type=jnp.float32)
        return acc * corr[:, None] + pv, m_new, l

    init = (jnp.zeros((rows, dp), jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, (hi - lo + block_k - 1) // block_k, body, init)
    acc = acc / jnp.where(l > 0, l, 1.0)[:, None]  # l > 0: a token sees its own key
    o_ref[...] = acc.astype(o_ref.dtype)


def _tiles(token_seq, valid, block_tables, block_q: int):
    """The programs' tiles: (start, count, block-table row) each, [T] [T] [T, MB]; and each
    token's tile and its first row there, [N] [N] (in units of query heads: row / Gq). A
    sequence's tokens are contiguous in the flat batch, in row order; each sequence's valid
    tokens split into tiles of block_q, T = N / block_q + S bounding their number (empty tiles
    count 0)."""
    N, S = token_seq.shape[0], block_tables.shape[0]
    n = jnp.arange(N, dtype=jnp.int32)
    if block_q == 1:
        return n, valid.astype(jnp.int32), block_tables[token_seq], n, jnp.zeros_like(n)
    counts = jnp.zeros(S, jnp.int32).at[token_seq].add(valid.astype(jnp.int32))
    firsts = jnp.cumsum(counts) - counts
    per_seq = (counts + block_q - 1) // block_q
    ends = jnp.cumsum(per_seq)
    T = -(-N // block_q) + S
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right", method="compare_all"), S - 1)
    local = t - (ends - per_seq)[seq]
    count = jnp.where(t < ends[-1], jnp.minimum(counts[seq] - local * block_q, block_q), 0)
    mine = n - firsts[token_seq]  # each token's index in its sequence's chunk
    tile_of = jnp.minimum((ends - per_seq)[token_seq] + mine // block_q, T - 1)
    return ((firsts[seq] + local * block_q).astype(jnp.int32), count, block_tables[seq],
            tile_of, mine % block_q)


def _block_specs(N, NB, bs, MB, G, Dh, block_q, *, alibi, quantized):
    """Blocks of program (t, h): tile t's start, count and block-table row; every token's
    position; kv head h of q ([N, Gq, Dp], padded to powers of two: masked, never copied), of
    every block of the pools, of the slopes; the output's tile t and kv head h [R, Dp]."""
    gq, dp = next_pow2(G), max(16, next_pow2(Dh))
    rows = max(16, block_q * gq)
    per_tile = pl.BlockSpec((None,), lambda t, h: (t,))
    table = pl.BlockSpec((None, MB), lambda t, h: (t, 0))
    every = pl.BlockSpec((N,), lambda t, h: (0,))
    q = pl.BlockSpec((N, None, gq, dp), lambda t, h: (0, h, 0, 0))
    pool = pl.BlockSpec((NB, None, bs, dp), lambda t, h: (0, h, 0, 0))
    pool_scale = pl.BlockSpec((NB, None, bs), lambda t, h: (0, h, 0))
    slopes = pl.BlockSpec((None, gq), lambda t, h: (h, 0))
    in_specs = ([per_tile, per_tile, table, every, q, pool, pool] + [slopes] * alibi
                + [pool_scale] * 2 * quantized)
    return in_specs, pl.BlockSpec((None, None, rows, dp), lambda t, h: (t, h, 0, 0)), rows, dp


@functools.partial(jax.jit, static_argnames=("scale", "window", "block_sizes", "interpret"))
def paged_attention(q, k, v, q_pos, token_seq, block_tables, valid=None, *, scale: float,
                    window: int | None = None, alibi_slopes=None, k_scale=None, v_scale=None,
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Causal attention of each token of a flat batch over its own sequence's blocks.

    q: [N, H, Dh]; k, v: pools [NB, KVH, bs, Dh] (dsjax.serving.paged), bf16/fp16/fp32, or int8
    with k_scale, v_scale float32 [NB, KVH, bs]; q_pos, token_seq: [N] int32 (each token's
    position and block-table row; a sequence's tokens contiguous, in row order); block_tables:
    [S, MB] int32; valid: [N] bool, the tokens to compute (None: all; others give 0);
    alibi_slopes: [H] or None (score += slope * (key pos - query pos)). Returns [N, H * Dh] in
    q.dtype; softmax and accumulation in float32.
    """
    N, H, Dh = q.shape
    NB, KVH, bs, _ = k.shape
    G, MB = H // KVH, block_tables.shape[1]
    if (k_scale is None) != (v_scale is None) or (k_scale is None) == (k.dtype == jnp.int8):
        raise ValueError("int8 pools need k_scale and v_scale; other pools take neither")
    bks = (block_sizes or BlockSizes.default(Dh, k.dtype)).resolved(N, block_tables.shape[0], G)
    if bks.block_k < 16 or bks.block_k & (bks.block_k - 1):
        raise ValueError(f"block_k={bks.block_k}: a power of two of at least 16 (tl.dot's)")
    quantized, alibi = k_scale is not None, alibi_slopes is not None
    valid = jnp.ones(N, bool) if valid is None else valid
    starts, counts, tables, tile_of, first = _tiles(token_seq, valid,
                                                    block_tables.astype(jnp.int32), bks.block_q)
    inputs = [starts, counts, tables, q_pos.astype(jnp.int32), q.reshape(N, KVH, G, Dh), k, v]
    if alibi:
        inputs.append(jnp.asarray(alibi_slopes, jnp.float32).reshape(KVH, G))
    if quantized:
        inputs += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    kernel = functools.partial(
        _paged_kernel, scale=scale, window=window, block_k=bks.block_k, block_q=bks.block_q,
        groups=G, head_dim=Dh, alibi=alibi, quantized=quantized)
    in_specs, out_spec, rows, dp = _block_specs(N, NB, bs, MB, G, Dh, bks.block_q, alibi=alibi,
                                                quantized=quantized)
    T = starts.shape[0]
    out = pl.pallas_call(
        kernel,
        grid=(T, KVH),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((T, KVH, rows, dp), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bks.num_warps, num_stages=bks.num_stages),
        interpret=interpret,
        name="paged_attention",
    )(*inputs)
    # each token's rows: tile tile_of, rows first * Gq + (0 .. G - 1) of every kv head
    row = first[:, None] * next_pow2(G) + jnp.arange(G)[None, :]  # [N, G]
    out = out[tile_of[:, None, None], jnp.arange(KVH)[None, :, None], row[:, None, :], :Dh]
    return jnp.where(valid[:, None], out.reshape(N, H * Dh), 0)
