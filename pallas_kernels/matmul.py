"""Dense GEMM (Pallas, Triton lowering) with an optional fused norm prologue and epilogue.

    y = act(norm(x) @ w + bias) [gated: act(gate) * up] + residual

Grid (M blocks, N blocks, K splits). Each program streams its K range in steps of `block_k`
rows (`unroll` steps' loads issued together), accumulating in float32, in one of two forms:
block_m >= 16 uses the tensor cores ([bm, bn] accumulator, Triton's software pipelining);
block_m < 16 (decode) is an FMA GEMV: per row a [bk, bn] accumulator of products, summed once
after the loop, so the weight never goes through shared memory and no 16-row padding is paid.
With one K split the epilogue runs in the kernel; with several (decode: the N blocks alone do
not fill the GPU) each split writes float32 partials [splits, M, Nw] and one small XLA fusion
sums them and applies the epilogue. Ragged M, N, K are masked; nothing is padded or copied.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsjax import numerics
from pallas_kernels import fusion
from pallas_kernels.fusion import NormConfig

_SMS = 132  # streaming multiprocessors of an H100/H200


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton settings; `for_shape` picks them per shape class."""
    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    unroll: int = 1  # K steps whose loads are issued together per loop iteration
    inline_asm: bool = True  # FMA form: bfloat16 -> float32 by a shift (PTX)

    # m <= 16 (tensor-core decode form) tiles; quant_matmul's subclass tunes its own
    DECODE_TILES = dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)

    @classmethod
    def for_shape(cls, m: int, k: int, n: int, transpose_w: bool = False) -> BlockSizes:
        """m <= 4: the FMA GEMV form (block_m < 16), split-K to fill the GPU; m <= 16: the
        tensor-core form, split-K; larger m: a classic tiled GEMM. A weight stored [N, K]
        (transpose_w) takes the tensor-core form from m = 1, where its FMA form was slower, so
        only explicit block sizes reach the transposed FMA form (tests, benchmarks); why:
        docs/decisions.md#matmul-block-sizes. (For quant_matmul, k is the K extent of
        `values`: K, or K/2 packed.)"""
        if m <= 4 and not transpose_w:  # per row a [block_k, block_n] f32 accumulator
            bm = pl.next_power_of_2(m)
            return cls.split(cls(block_m=bm, block_n=128, block_k=64 // bm, num_warps=8,
                                 num_stages=1, unroll=2), k, n, programs=4 * _SMS)
        if m <= 16:
            return cls.split(cls(**cls.DECODE_TILES), k, n, programs=2 * _SMS)
        if m <= 64:
            return cls(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4)
        return cls(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)

    @staticmethod
    def split(bs: BlockSizes, k: int, n: int, *, programs: int) -> BlockSizes:
        """bs with split_k raised until the grid has about `programs` programs."""
        want = programs // pl.cdiv(n, bs.block_n)
        iters = pl.cdiv(k, bs.block_k * bs.unroll)
        return dataclasses.replace(bs, split_k=max(1, min(want, iters, 32)))


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call (the kernel is specialised on it)."""
    bm: int
    bn: int
    bk: int
    unroll: int
    steps: int  # loop iterations (of unroll K steps) per split
    n_out: int  # output columns (the I of a gated [gate | up] weight)
    mask_k: bool
    mask_n: bool
    transpose_w: bool
    gated: bool  # gating in the kernel (one split only)
    partial: bool  # write float32 partials, epilogue outside
    activation: str | None
    has_bias: bool
    has_residual: bool
    norm: NormConfig | None
    has_norm_bias: bool
    return_normed: bool
    asm: bool  # inline-PTX conversions (GPU only)


def _kernel(*refs, s: _Spec):
    it = iter(refs)
    x_ref, w_ref = next(it), next(it)  # [M, K]; [K, Nw] or [Nw, K]
    ns_ref = next(it) if s.norm else None  # [K]
    nb_ref = next(it) if s.has_norm_bias else None  # [K]
    b_ref = next(it) if s.has_bias else None  # [Nw]
    r_ref = next(it) if s.has_residual else None  # [M, n_out]
    o_ref = next(it)  # [M, n_out] or float32 partials [splits, M, Nw]
    xn_ref = next(it) if s.return_normed else None  # [M, K]
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = pl.multiple_of(pid_n * s.bn, s.bn)
    rows = fusion.Rows(x_ref, pid_m * s.bm, s.bm, norm=s.norm, scale_ref=ns_ref,
                       bias_ref=nb_ref)
    col_ok = fusion.span_mask(n0, s.bn, s.n_out, s.mask_n)  # [bn]; the up half shares it
    col_offsets = (0, s.n_out) if s.gated else (0,)
    tw = s.transpose_w

    def load(k0, k_ok):
        ws = [fusion.load_weight(w_ref, k0, n0 + off, s.bk, s.bn, k_ok, col_ok, transpose_w=tw)
              for off in col_offsets]  # each [bk, bn] ([bn, bk] when transpose_w)
        return k0, k_ok, rows.load(k0, s.bk, k_ok), ws

    def compute(accs, loaded):
        k0, k_ok, xs, ws = loaded  # xs: [bm, bk], or bm rows [bk]
        if xn_ref is not None:
            rows.store(xn_ref, xs, k0, k_ok, pid_n == 0)
        if not rows.vectors:
            return tuple(fusion.dot(acc, xs, w, transpose_w=tw) for acc, w in zip(accs, ws))
        ws = [fusion.to_float32(w, asm=s.asm) for w in ws]
        return tuple(tuple(fusion.fma(a, xv, w, transpose_w=tw) for a, xv in zip(acc, xs))
                     for acc, w in zip(accs, ws))

    if rows.vectors:  # per column block, per row: [bk, bn] ([bn, bk]) products
        zero = (jnp.zeros((s.bn, s.bk) if tw else (s.bk, s.bn), jnp.float32),) * s.bm
    else:
        zero = jnp.zeros((s.bm, s.bn), jnp.float32)
    accs = fusion.k_loop(s, pid_s, x_ref.shape[1], load, compute, (zero,) * len(col_offsets))
    if rows.vectors:
        accs = [[a.sum(axis=1 if tw else 0) for a in acc] for acc in accs]  # bm rows [bn]
    fusion.write_output(o_ref, accs, s, rows, n0, col_ok, pid_s, b_ref, r_ref)


def _gemm(x, w, bias, residual, norm_scale, norm_bias, *, norm, activation, gated,
          transpose_w, return_normed, block_sizes, interpret):
    fusion.check_activation(activation)
    *lead, K = x.shape
    x2 = x.reshape(-1, K)  # [M, K]
    M = x2.shape[0]
    Nw, Kw = w.shape if transpose_w else w.shape[::-1]
    if Kw != K:
        raise ValueError(f"x [..., {K}] does not match the weight {w.shape} "
                         f"(transpose_w={transpose_w})")
    if gated and Nw % 2:
        raise ValueError(f"a gated [gate | up] weight needs an even column count, not {Nw}")
    n_out = Nw // 2 if gated else Nw
    bs = block_sizes or BlockSizes.for_shape(M, K, n_out, transpose_w)
    per_iter = bs.block_k * bs.unroll
    steps = pl.cdiv(pl.cdiv(K, per_iter), bs.split_k)
    splits = pl.cdiv(pl.cdiv(K, per_iter), steps)
    partial = splits > 1
    grid_cols = Nw if partial else n_out
    s = _Spec(bm=bs.block_m, bn=bs.block_n, bk=bs.block_k, unroll=bs.unroll, steps=steps,
              n_out=grid_cols, mask_k=splits * steps * per_iter != K,
              mask_n=grid_cols % bs.block_n != 0, transpose_w=transpose_w,
              gated=gated and not partial, partial=partial, activation=activation,
              has_bias=bias is not None and not partial,
              has_residual=residual is not None and not partial, norm=norm,
              has_norm_bias=norm_bias is not None, return_normed=return_normed,
              asm=bs.inline_asm and not interpret)
    out_shape = [jax.ShapeDtypeStruct((splits, M, Nw), jnp.float32) if partial
                 else jax.ShapeDtypeStruct((M, n_out), x.dtype)]
    if return_normed:
        out_shape.append(jax.ShapeDtypeStruct((M, K), x.dtype))
    res2 = None if residual is None else residual.reshape(M, n_out)
    args = [x2, w, norm_scale if norm else None, norm_bias, bias if s.has_bias else None,
            res2 if s.has_residual else None]
    outs = pl.pallas_call(
        functools.partial(_kernel, s=s),
        grid=(pl.cdiv(M, s.bm), pl.cdiv(grid_cols, s.bn), splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="norm_matmul" if norm else "matmul",
    )(*[a for a in args if a is not None])
    y = outs[0]
    if partial:  # [splits, M, Nw] -> [M, n_out]
        y = fusion.epilogue(y.sum(0), bias, res2, activation=activation, gated=gated)
        y = y.astype(x.dtype)
    y = y.reshape(*lead, n_out)
    return (y, outs[1].reshape(x.shape)) if return_normed else y


def matmul(x, w, bias=None, residual=None, *, activation=None, gated=False, transpose_w=False,
           block_sizes: BlockSizes | None = None, interpret=False):
    """act(x [..., K] @ w [K, N] + bias [N]) + residual [..., N] -> [..., N] in x.dtype.

    gated: w is a fused [gate | up] weight [K, 2I]; the output is act(gate) * up, [..., I].
    transpose_w: w is stored [N, K] (a tied embedding as LM head), contracted in place.
    """
    return _gemm(x, w, bias, residual, None, None, norm=None, activation=activation,
                 gated=gated, transpose_w=transpose_w, return_normed=False,
                 block_sizes=block_sizes, interpret=interpret)


def norm_matmul(x, norm, w, bias=None, *, activation=None, gated=False, transpose_w=False,
                return_normed=False, block_sizes: BlockSizes | None = None, interpret=False):
    """matmul(norm(x), w, bias) with the LayerNorm/RMSNorm of x fused in as a prologue.

    The norm runs in float32 and is cast back to x.dtype before the GEMM (as the unfused
    path does). norm: a dsjax.numerics.NormSpec. transpose_w: w is stored [N, K].
    return_normed: also return norm(x) [..., K].
    """
    return _gemm(x, w, bias, None, norm.scale, norm.bias, norm=NormConfig.of(norm),
                 activation=activation, gated=gated, transpose_w=transpose_w,
                 return_normed=return_normed, block_sizes=block_sizes, interpret=interpret)


# ----------------------------------------------------------------------------- references

def matmul_reference(x, w, bias=None, residual=None, *, activation=None, gated=False,
                     transpose_w=False):
    """Plain-jnp matmul: float32 accumulation, epilogue in float32, one cast at the end."""
    fusion.check_activation(activation)
    y = jnp.einsum("...k,nk->...n" if transpose_w else "...k,kn->...n", x, w.astype(x.dtype),
                   preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    return numerics.epilogue(y, bias, residual, activation=activation, gated=gated).astype(x.dtype)


def norm_matmul_reference(x, norm, w, bias=None, *, activation=None, gated=False,
                          transpose_w=False, return_normed=False):
    xn = numerics.apply_norm(x, norm)
    y = matmul_reference(xn, w, bias, activation=activation, gated=gated, transpose_w=transpose_w)
    return (y, xn) if return_normed else y
