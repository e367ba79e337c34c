"""Grouped GEMM for MoE experts in Pallas: rows grouped by expert, each expert's rows against its
own weights, reading only the experts that have rows.

Layout (made by `expert_layout`): the (token, pick) rows are sorted by expert and each expert's
group is padded to a multiple of block_m rows, so every block of block_m rows belongs to one
expert; `block_expert[b]` names it (-1: a block past the last group, skipped: it reads no weight
and writes zeros). There are at most ceil(M / block_m) + min(E, M) blocks for M rows and E
experts, a static bound, so the routing never changes a shape. Program (b, j) computes output columns
[j block_n, (j + 1) block_n) of block b's rows, looping over K in block_k steps: it loads only
its expert's weight tiles, so an expert without rows is never read (XLA's ragged_dot reads every
expert: docs/decisions.md#expert-layers-in-xla).

Epilogues: gated (the first GEMM of an expert MLP: w holds [gate | up] columns, the output is
act(x @ gate) * (x @ up), N / 2 columns) and row_scale (the second GEMM: each row times its
routing weight). Accumulation in float32.

Split K (`BlockSizes.split_k`): program (b, j, s) sums its K / split slice into a float32
partial [split, M, N], summed after the kernel (gated: the [gate | up] sums, whose activation
then runs in XLA). A decode step has few blocks with rows (top-2 of one token: two), so a GEMM
of few output columns would otherwise run fewer programs than the GPU has SMs, each walking
the whole K.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsjax.numerics import ACTIVATIONS
from dsjax.weights import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_m: int = 16  # rows per block (tl.dot's minimum): an expert's group is padded to it
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1  # K slices summed after the kernel (float32 partials)

    def fit(self, K: int, N: int, w=None) -> BlockSizes:
        """The largest power-of-two tiles (at least 16) that divide N and k_unit(K, w)."""
        def tile(size, want):
            t = want
            while t > 16 and size % t:
                t //= 2
            return t
        block_k = tile(k_unit(K, w), self.block_k)
        return dataclasses.replace(self, block_k=block_k, block_n=tile(N, self.block_n))

    def for_rows(self, rows: int, experts: int, K: int, N: int, gated: bool,
                 programs: int = 1024) -> BlockSizes:
        """Split K (powers of two, up to 8, each slice at least 4 K steps) until the blocks
        expected to have rows (one per row up to the experts' count, at least rows / block_m)
        times the output's column tiles (gated: N of [gate | up]'s 2 N) reach `programs`;
        decode-sized steps (at most 64 rows) load three tiles ahead (num_stages=3)."""
        blocks = max(-(-rows // self.block_m), min(rows, experts))
        split, cols = 1, (2 if gated else 1) * N // self.block_n
        while (split < 8 and blocks * cols * split * 2 <= programs
               and K // (self.block_k * split * 2) >= 4 and K % (self.block_k * split * 2) == 0):
            split *= 2
        stages = 3 if rows <= 64 else self.num_stages
        return dataclasses.replace(self, split_k=split, num_stages=stages)


def expert_block_sizes(rows: int, experts: int, hidden: int, width: int):
    """The (gated [gate | up], down) BlockSizes of an expert MLP step of `rows` (token, pick)
    rows over experts of hidden size `hidden` and width `width` (BlockSizes.for_rows)."""
    return (BlockSizes().for_rows(rows, experts, hidden, width, gated=True),
            BlockSizes().for_rows(rows, experts, width, hidden, gated=False))


def k_unit(K: int, w=None) -> int:
    """What block_k must divide: K; for a QuantizedWeight w also its group (a K step lies in one
    group) and, for 4-bit codes, K / 2 (a step reads one nibble of its bytes)."""
    if not isinstance(w, QuantizedWeight):
        return K
    return math.gcd(K // 2 if w.bits == 4 else K, w.group_size)


def expert_layout(picks, num_experts: int, block_m: int):
    """(slot of each (token, pick) row [N k] in the padded layout, block_expert [B]) for picks
    [N, k]; B = ceil(N k / block_m) + min(E, N k), the padded row count B x block_m. A pick of -1 gets
    the slot B x block_m, past the layout: it is neither computed nor read back."""
    E = num_experts
    flat = jnp.where(picks < 0, E, picks).reshape(-1)  # -1: no expert
    R = flat.shape[0]
    counts = jnp.zeros(E, jnp.int32).at[flat].add(1, mode="drop")
    padded = -(-counts // block_m) * block_m
    start = jnp.cumsum(padded) - padded  # each expert's first padded slot
    first = jnp.cumsum(counts) - counts  # each expert's first row in expert order
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros(R, jnp.int32).at[order].set(jnp.arange(R, dtype=jnp.int32))
    e = jnp.minimum(flat, E - 1)
    B = -(-R // block_m) + min(E, R)  # each expert with rows adds at most one partial block
    slot = jnp.where(flat < E, start[e] + rank - first[e], B * block_m)  # no expert: no slot
    block_start = jnp.arange(B) * block_m
    owner = jnp.searchsorted(jnp.cumsum(padded), block_start, side="right", method="compare_all")
    return slot.astype(jnp.int32), jnp.where(owner < E, owner, -1).astype(jnp.int32)


def _kernel(expert_ref, x_ref, w_ref, *refs, bn, bk, splits, activation, gated, scaled, quant):
    # quant: None, or (bits, group_size, has zeros): w_ref holds codes ([E, K, N] int8/uint8,
    # or [E, K/2, N] packed 4-bit) followed by scales (and zeros) [E, K/G, N] refs
    refs = list(refs)
    qs_ref, qz_ref = (refs.pop(0), refs.pop(0) if quant[2] else None) if quant else (None, None)
    scale_ref = refs.pop(0) if scaled else None
    (o_ref,) = refs
    e, j, s = expert_ref[()], pl.program_id(1), pl.program_id(2)
    K = x_ref.shape[1]
    steps = K // bk // splits  # this program's K steps: [s steps, (s + 1) steps)
    half = w_ref.shape[2] // 2

    def tile(k, col):  # expert e's weight rows [k bk, (k + 1) bk), columns [col, col + bn)
        if quant is None:
            return w_ref[e, pl.ds(k * bk, bk), pl.ds(col, bn)]
        bits, group, zeros = quant
        if bits == 4:  # byte r: row r (low nibble), row r + K / 2 (high nibble)
            high = k * bk >= K // 2
            rows = pl.ds(jnp.where(high, k * bk - K // 2, k * bk), bk)
            q = (w_ref[e, rows, pl.ds(col, bn)].astype(jnp.int32) >> jnp.where(high, 4, 0)) & 15
        else:
            q = w_ref[e, pl.ds(k * bk, bk), pl.ds(col, bn)].astype(jnp.int32)
        g = (k * bk) // group  # the tile lies in one group (bk divides it)
        scale = qs_ref[e, pl.ds(g, 1), pl.ds(col, bn)]  # [1, bn]
        zero = (qz_ref[e, pl.ds(g, 1), pl.ds(col, bn)] if zeros
                else jnp.float32(8.0 if bits == 4 else 0.0))
        return ((q.astype(jnp.float32) - zero) * scale).astype(x_ref.dtype)

    @pl.when(e < 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(e >= 0)
    def _():
        def step(k, acc):
            x = x_ref[:, pl.ds(k * bk, bk)]
            a = jnp.dot(x, tile(k, j * bn), preferred_element_type=jnp.float32)
            if not gated:
                return acc + a
            u = jnp.dot(x, tile(k, half + j * bn), preferred_element_type=jnp.float32)
            return acc[0] + a, acc[1] + u
        zero = jnp.zeros((x_ref.shape[0], bn), jnp.float32)
        acc = jax.lax.fori_loop(s * steps, (s + 1) * steps, step, (zero, zero) if gated else zero)
        y = ACTIVATIONS[activation](acc[0]) * acc[1] if gated else acc
        if scaled:
            y = y * scale_ref[...].astype(jnp.float32)[:, None]
        o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("activation", "out_dtype", "block_sizes", "interpret"))
def grouped_matmul(x, w, block_expert, row_scale=None, *, activation: str | None = None,
                   out_dtype=None, block_sizes: BlockSizes = BlockSizes(),
                   interpret: bool = False):
    """x [M, K] (M = B x block_m rows in the padded layout), w [E, K, N] (or a QuantizedWeight
    stack: codes, scales [E, K/G, N], zeros; dequantized tile by tile), block_expert [B] ->
    [M, N] (activation given: the gated epilogue, [M, N / 2]); row_scale [M] multiplies each
    output row; out_dtype: the output's (default x's); block_sizes.split_k > 1: float32
    partials over K slices, summed (gated: of [gate | up], the activation applied after)."""
    quantized = isinstance(w, QuantizedWeight)
    codes = w.values if quantized else w
    M, K = x.shape
    N = codes.shape[2]
    gated = activation is not None
    out_n = N // 2 if gated else N
    bs = block_sizes.fit(K, out_n, w)
    bm, bn, bk, splits = bs.block_m, bs.block_n, bs.block_k, bs.split_k
    if M % bm or k_unit(K, w) % bk or out_n % bn or (gated and N % 2):
        raise ValueError(f"grouped_matmul: M={M}, K={K}, N={out_n} must be multiples of the "
                         f"tiles ({bm}, {bk}, {bn}), and quantization groups (4-bit: K / 2) "
                         "of block_k")
    if splits < 1 or (K // bk) % splits:
        raise ValueError(f"grouped_matmul: split_k={splits} must divide the {K // bk} K steps")
    if gated and splits > 1:  # the activation needs whole sums: [gate | up] split, act after
        gu = grouped_matmul(x, w, block_expert, out_dtype=jnp.float32, block_sizes=bs,
                            interpret=interpret)
        y = ACTIVATIONS[activation](gu[:, :out_n]) * gu[:, out_n:]
        y = y if row_scale is None else y * row_scale.astype(jnp.float32)[:, None]
        return y.astype(out_dtype or x.dtype)
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, j, s: (0,) * a.ndim)  # noqa: E731 (indexed by the expert)
    in_specs = [pl.BlockSpec((None,), lambda b, j, s: (b,)),
                pl.BlockSpec((bm, K), lambda b, j, s: (b, 0)), whole(codes)]
    inputs = [block_expert.astype(jnp.int32), x, codes]
    quant = None
    if quantized:
        quant = (w.bits, w.group_size, w.zeros is not None)
        extra = [w.scales] + ([w.zeros] if w.zeros is not None else [])
        in_specs += [whole(a) for a in extra]
        inputs += extra
    if row_scale is not None:
        in_specs.append(pl.BlockSpec((bm,), lambda b, j, s: (b,)))
        inputs.append(row_scale)
    kernel = functools.partial(_kernel, bn=bn, bk=bk, splits=splits, activation=activation,
                               gated=gated, scaled=row_scale is not None, quant=quant)
    out_dtype = out_dtype or x.dtype
    out = pl.pallas_call(
        kernel, grid=(M // bm, out_n // bn, splits), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda b, j, s: (s, b, j)),
        out_shape=jax.ShapeDtypeStruct((splits, M, out_n), out_dtype if splits == 1 else jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret, name="grouped_matmul")(*inputs)
    return out[0] if splits == 1 else out.sum(0).astype(out_dtype)
