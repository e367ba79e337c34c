"""Flash (prefill) attention: a Pallas kernel in the Triton lowering, and its jnp reference.

Semantics are those of `dsjax.ops.attention_xla`: softmax(q.k * scale [+ ALiBi]) over the keys
a query may see, with GQA/MQA read straight from the KV-cache layout [B, KVH, S, Dh]. Key s is
visible to query t iff k_valid[b, s] and (not causal or k_pos <= q_pos) and (window is None or
k_pos > q_pos - window). Masked scores take the finite value -1e30 (not -inf), so a query that
sees no key at all gets the uniform average of V over all S keys, never NaN.

The kernel runs one program per (query block, batch, query head); the kv head is h // (H/KVH).
Each program sweeps key blocks with an online softmax (fp32 statistics and accumulator, scores
in base 2). With k_pos=None (key slot index == position, the KV-cache case) and a causal or
windowed mask, the sweep covers only key blocks some query of the block can see, so prefill
into a large cache costs what the prompt needs; blocks that every query of the block sees in
full skip the mask arithmetic. Head dims that are not powers of two are padded in registers
(masked loads), never in HBM.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsjax.numerics import MASKED

MASK_VALUE = MASKED  # finite, so a fully masked row averages V (as the XLA path does)
_LOG2E = math.log2(math.e)
SMEM_BUDGET = 200 * 1024  # of the H200's 227 KiB per block, leaving Triton some headroom


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters.

    block_q: query rows per program; block_k: keys per inner-loop step (both powers of two,
    >= 16, shrunk to the problem when it is smaller); num_warps, num_stages: Triton's.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def get_default(cls, head_dim: int, dtype=jnp.bfloat16, seq_len: int | None = None
                    ) -> BlockSizes:
        """The tuned sizes for this head dim and query length (prompts up to SHORT_PREFILL
        tokens are one shape class, longer ones another), shrunk (stages first, then
        block_k) until the tiles fit the shared-memory budget for this dtype."""
        dims = next(d for d in sorted(_TUNED) if head_dim <= d or d == max(_TUNED))
        short, long = _TUNED[dims]
        bs = short if seq_len is not None and seq_len <= SHORT_PREFILL else long
        itemsize = jnp.dtype(dtype).itemsize
        while bs.smem_bytes(head_dim, itemsize) > SMEM_BUDGET:
            if bs.num_stages > 2:
                bs = dataclasses.replace(bs, num_stages=bs.num_stages - 1)
            elif bs.block_k > 16:
                bs = dataclasses.replace(bs, block_k=bs.block_k // 2)
            else:
                break
        return bs

    def smem_bytes(self, head_dim: int, itemsize: int) -> int:
        """Estimated shared memory: the q tile plus num_stages K and V tiles."""
        padded = max(16, pl.next_power_of_2(head_dim))
        return (self.block_q + 2 * self.num_stages * self.block_k) * padded * itemsize


SHORT_PREFILL = 1024
# head dim bound -> (sizes for T <= SHORT_PREFILL, sizes for longer T). The 128 row (serving
# Dh 80, 96, 128) is the fastest of a sweep at a short and a long prompt; the 64 and 256 rows
# are untuned. Why: docs/decisions.md#flash-block-sizes
_TUNED = {
    64: (BlockSizes(128, 64, 4, 2), BlockSizes(128, 64, 4, 3)),
    128: (BlockSizes(128, 64, 8, 2), BlockSizes(64, 64, 4, 3)),
    256: (BlockSizes(64, 64, 8, 2), BlockSizes(64, 64, 8, 2)),
}


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernel body is specialised on (hashable, trace-time constants)."""

    T: int
    S: int
    head_dim: int
    block_q: int
    block_k: int
    scale: float
    causal: bool
    window: int | None
    has_k_pos: bool
    has_k_valid: bool
    has_alibi: bool

    @property
    def padded_dim(self) -> int:
        return max(16, pl.next_power_of_2(self.head_dim))

    @property
    def num_k_blocks(self) -> int:
        return pl.cdiv(self.S, self.block_k)

    @property
    def may_skip(self) -> bool:
        """Whether whole key blocks can be skipped (positions known from the slot index)."""
        return not self.has_k_pos and (self.causal or self.window is not None)


def _load_tile(ref, start, rows: int, limit: int, head_dim: int):
    """ref [L, Dp] -> rows [start, start + rows) as [rows, Dp]; rows >= limit and columns >=
    head_dim read as 0 (masked loads, emitted only where the shapes need them)."""
    padded = ref.shape[-1]
    mask = None
    if limit % rows:
        mask = (start + jnp.arange(rows) < limit)[:, None]
    if head_dim != padded:
        cols = (jnp.arange(padded) < head_dim)[None, :]
        mask = cols if mask is None else mask & cols
    if mask is None:
        return ref[pl.ds(start, rows), :]
    return plgpu.load(ref.at[pl.ds(start, rows), :], mask=mask, other=0)


def _load_vec(ref, start, n: int, limit: int):
    """ref [L] -> [n] from start; entries >= limit read as 0."""
    if limit % n == 0:
        return ref[pl.ds(start, n)]
    return plgpu.load(ref.at[pl.ds(start, n)], mask=start + jnp.arange(n) < limit, other=0)


def _masked_logits(s, start, *, c: _Static, q_pos, slope, k_pos_ref, k_valid_ref):
    """Raw scores s [bq, bk] of key block `start` -> base-2 logits with ALiBi added and
    invisible keys set to MASK_VALUE (slots past the array to -inf: no weight at all)."""
    bk = c.block_k
    s = s * (c.scale * _LOG2E)
    slots = start + jnp.arange(bk)  # [bk]
    k_pos = _load_vec(k_pos_ref, start, bk, c.S) if c.has_k_pos else slots
    rel = k_pos[None, :] - q_pos[:, None]  # [bq, bk] key position - query position
    if c.has_alibi:
        s = s + slope * rel.astype(jnp.float32)
    visible = None
    if c.has_k_valid:
        valid = _load_vec(k_valid_ref, start, bk, c.S) != 0  # [bk]
        visible = jnp.broadcast_to(valid[None, :], s.shape)
    if c.causal:
        visible = rel <= 0 if visible is None else visible & (rel <= 0)
    if c.window is not None:
        inside = rel > -c.window
        visible = inside if visible is None else visible & inside
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    if c.S % bk:
        s = jnp.where((slots < c.S)[None, :], s, -jnp.inf)
    return s


def _key_step(j, carry, *, masked: bool, c: _Static, q, q_pos, slope, k_ref, v_ref,
              k_pos_ref, k_valid_ref):
    """One online-softmax step over key block j. carry: acc [bq, Dp] f32, m, l [bq] f32
    (m, l in base 2). masked=False: every query of the block sees every key of it."""
    acc, m, l = carry
    start = j * c.block_k
    k = _load_tile(k_ref, start, c.block_k, c.S, c.head_dim)  # [bk, Dp]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    to_log2 = c.scale * _LOG2E
    if masked:
        s = _masked_logits(s, start, c=c, q_pos=q_pos, slope=slope, k_pos_ref=k_pos_ref,
                           k_valid_ref=k_valid_ref)
    elif c.has_alibi or to_log2 <= 0:
        s = s * to_log2
        if c.has_alibi:  # unmasked blocks only arise with k_pos None: position == slot
            rel = start + jnp.arange(c.block_k)[None, :] - q_pos[:, None]  # [bq, bk]
            s = s + slope * rel.astype(jnp.float32)
    if masked or c.has_alibi or to_log2 <= 0:
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [bq]
        p = jnp.exp2(s - m_new[:, None])  # [bq, bk]
    else:  # scale the row max, not the tile: one FMA per score
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * to_log2)
        p = jnp.exp2(s * to_log2 - m_new[:, None])
    alpha = jnp.exp2(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1)
    v = _load_tile(v_ref, start, c.block_k, c.S, c.head_dim)  # [bk, Dp]
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v,
                                         preferred_element_type=jnp.float32)
    return acc, m_new, l


def _block_ranges(c: _Static, q_pos, row_ok):
    """Dynamic key-block bounds lo <= a <= b <= hi: [lo, a) and [b, hi) need the mask,
    [a, b) is visible to every query row of the block; blocks outside [lo, hi) see nothing."""
    nk, bk = c.num_k_blocks, c.block_k
    if not c.may_skip:
        full = 0 if (c.has_k_pos or c.has_k_valid) else c.S // bk
        return 0, 0, full, nk
    q_max = jnp.max(jnp.where(row_ok, q_pos, -(2**30)))  # Python constants: the Triton
    q_min = jnp.min(jnp.where(row_ok, q_pos, 2**30))  # lowering cannot negate a literal array
    lo, a, b, hi = jnp.int32(0), jnp.int32(0), jnp.int32(c.S // bk), jnp.int32(nk)
    if c.causal:
        hi = jnp.minimum(lax.div(jnp.maximum(q_max + 1, 0) + bk - 1, bk), nk)
        b = jnp.minimum(lax.div(jnp.maximum(q_min + 1, 0), bk), b)
    if c.window is not None:
        lo = lax.div(jnp.maximum(q_min - c.window + 1, 0), bk)
        a = lax.div(jnp.maximum(q_max - c.window + 1, 0) + bk - 1, bk)
    lo = jnp.minimum(lo, hi)
    if c.has_k_valid:  # padding may hide any key: every block needs the mask
        return lo, hi, hi, hi
    a = jnp.minimum(jnp.maximum(a, lo), hi)
    return lo, a, jnp.minimum(jnp.maximum(b, a), hi), hi


def _flash_kernel(q_ref, k_ref, v_ref, q_pos_ref, k_pos_ref, k_valid_ref, slope_ref, o_ref,
                  *, c: _Static):
    """q_ref, o_ref [T, Dp]; k_ref, v_ref [S, Dp]; q_pos_ref [T]; k_pos_ref, k_valid_ref [S]
    or None; slope_ref [] or None. Grid (query block, batch, head), heaviest blocks first."""
    bq = c.block_q
    i = pl.num_programs(0) - 1 - pl.program_id(0)
    q_start = i * bq
    row_ok = q_start + jnp.arange(bq) < c.T  # [bq]
    q = _load_tile(q_ref, q_start, bq, c.T, c.head_dim)  # [bq, Dp]
    q_pos = _load_vec(q_pos_ref, q_start, bq, c.T)  # [bq]
    slope = slope_ref[()] * _LOG2E if c.has_alibi else None
    step = functools.partial(_key_step, c=c, q=q, q_pos=q_pos, slope=slope, k_ref=k_ref,
                             v_ref=v_ref, k_pos_ref=k_pos_ref, k_valid_ref=k_valid_ref)
    masked, unmasked = (functools.partial(step, masked=flag) for flag in (True, False))

    carry = (jnp.zeros((bq, c.padded_dim), jnp.float32),
             jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    lo, a, b, hi = _block_ranges(c, q_pos, row_ok)
    carry = lax.fori_loop(lo, a, masked, carry)
    carry = lax.fori_loop(a, b, unmasked, carry)
    carry = lax.fori_loop(b, hi, masked, carry)
    if c.may_skip:
        # A row that saw no key averages V over every slot, as attention_xla does: sweep the
        # skipped blocks too, only where such a row exists (padding rows, empty sequences).
        dead = jnp.max(jnp.where(row_ok & (carry[1] == MASK_VALUE), 1, 0)) > 0
        rest = jnp.where(dead, lo + c.num_k_blocks - hi, 0)
        carry = lax.fori_loop(0, rest, lambda n, cr: masked(jnp.where(n < lo, n, n - lo + hi), cr),
                              carry)
    acc, _, l = carry
    out = (acc / l[:, None]).astype(o_ref.dtype)  # [bq, Dp]
    if c.T % bq == 0 and c.head_dim == c.padded_dim:
        o_ref[pl.ds(q_start, bq), :] = out
    else:
        mask = row_ok[:, None] & (jnp.arange(c.padded_dim) < c.head_dim)[None, :]
        plgpu.store(o_ref.at[pl.ds(q_start, bq), :], out, mask=mask)


def _fit(block: int, n: int) -> int:
    """The block size actually used along an axis of length n: a power of two >= 16."""
    return max(16, min(block, pl.next_power_of_2(n)))


@functools.partial(jax.jit, static_argnames=("scale", "causal", "window", "block_sizes",
                                             "interpret"))
def flash_attention(q, k, v, q_pos, k_pos=None, k_valid=None, *, scale: float, causal: bool,
                    window: int | None = None, alibi_slopes=None,
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Softmax attention (prefill) with GQA, causal/window masks by position and ALiBi.

    q: [B, T, H, Dh]; k, v: [B, KVH, S, Dh] with H % KVH == 0; q_pos: [B, T] int positions;
    k_pos: [B, S] int positions, or None for slot index == position (enables block skipping);
    k_valid: [B, S] bool or None (all valid); alibi_slopes: [H] or None. Returns
    [B, T, H * Dh] in q.dtype. A query that sees no key gets the mean of V over all S keys.
    """
    B, T, H, Dh = q.shape
    _, KVH, S, _ = k.shape
    if k.shape != (B, KVH, S, Dh) or v.shape != k.shape or H % KVH or q_pos.shape != (B, T):
        raise ValueError(f"bad shapes q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"q_pos {q_pos.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    bs = block_sizes or BlockSizes.get_default(Dh, q.dtype, T)
    c = _Static(T=T, S=S, head_dim=Dh, block_q=_fit(bs.block_q, T), block_k=_fit(bs.block_k, S),
                scale=float(scale), causal=bool(causal), window=window,
                has_k_pos=k_pos is not None, has_k_valid=k_valid is not None,
                has_alibi=alibi_slopes is not None)
    G, Dp = H // KVH, c.padded_dim
    per_row = lambda n: pl.BlockSpec((None, n), lambda i, b, h: (b, 0))  # noqa: E731
    kv_spec = pl.BlockSpec((None, None, S, Dp), lambda i, b, h: (b, h // G, 0, 0))
    qo_spec = pl.BlockSpec((None, T, None, Dp), lambda i, b, h: (b, 0, h, 0))
    operands = [
        (q, qo_spec), (k, kv_spec), (v, kv_spec), (q_pos.astype(jnp.int32), per_row(T)),
        (None if k_pos is None else k_pos.astype(jnp.int32), per_row(S)),
        (None if k_valid is None else k_valid.astype(jnp.int32), per_row(S)),
        (None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32).reshape(H),
         pl.BlockSpec((None,), lambda i, b, h: (h,))),
    ]
    out = pl.pallas_call(
        functools.partial(_flash_kernel, c=c),
        grid=(pl.cdiv(T, c.block_q), B, H),
        in_specs=[None if x is None else spec for x, spec in operands],
        out_specs=qo_spec,
        out_shape=jax.ShapeDtypeStruct((B, T, H, Dh), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="flash_attention",
    )(*(x for x, _ in operands))
    return out.reshape(B, T, H * Dh)


def flash_attention_reference(q, k, v, q_pos, k_pos=None, k_valid=None, *, scale: float,
                              causal: bool, window: int | None = None, alibi_slopes=None):
    """Plain jnp attention with the same arguments and semantics as `flash_attention`:
    K/V repeated per query head, scores and softmax in float32, -1e30 for masked scores."""
    B, T, H, Dh = q.shape
    S, G = k.shape[2], H // k.shape[1]
    if k_pos is None:
        k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    if k_valid is None:
        k_valid = jnp.ones((B, S), bool)
    kh = jnp.repeat(k, G, axis=1).astype(jnp.float32)  # [B, H, S, Dh]
    vh = jnp.repeat(v, G, axis=1).astype(jnp.float32)  # [B, H, S, Dh]
    qh = q.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, H, T, Dh]
    scores = jnp.matmul(qh, kh.swapaxes(-1, -2), precision="highest") * scale  # [B, H, T, S]
    rel = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.int32)  # [B, T, S]
    visible = k_valid[:, None, :] & jnp.ones(rel.shape, bool)
    if causal:
        visible &= rel <= 0
    if window is not None:
        visible &= rel > -window
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, H, 1, 1)
        scores = scores + slopes * rel[:, None].astype(jnp.float32)
    scores = jnp.where(visible[:, None], scores, MASK_VALUE)
    weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    out = jnp.matmul(weights, vh, precision="highest")  # [B, H, T, Dh]
    return out.transpose(0, 2, 1, 3).reshape(B, T, H * Dh).astype(q.dtype)
