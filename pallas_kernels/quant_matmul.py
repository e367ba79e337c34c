"""Weight-only INT8 / INT4 GEMM (Pallas, Triton lowering), dequantized inside the kernel.

Weight format (dsjax/quant/weights.py): logical W [K, N] in groups of G rows along K.
  bits=8: values int8 [K, N] (W = q * s) or uint8 [K, N] (W = (q - z) * s)
  bits=4: values uint8 [K/2, N]; byte r holds row r (low nibble) and row r + K/2 (high nibble);
          W = (u - 8) * s, or (u - z) * s with zeros
  scales, zeros: float32 [K/G, N]
  transpose_w: values stored transposed, [N, K] or [N, K/2] (the K-major layout of dsjax.weights)

Each K step covers `bk` = gcd(block_k, G) rows of `values` (one group; int4: in each half).
Two forms, as in matmul.py. block_m >= 16, tensor cores: the tile is shifted to signed int8
(uint8: q - 128; nibbles: u - 8), converted to the activation dtype, and per group

    acc += s[g] * (x_g @ q_g - z'[g] * rowsum(x_g)),     z' = z - 128 (int8) or z - 8 (int4)

(the z' term only with zero points). block_m < 16, FMA GEMV: each code u becomes the float
2^23 + u by placing its bits under the exponent of 2^23 (one prmt per element in inline PTX on
the GPU), and W = (2^23 + u) - (2^23 + z) [* s] exactly; per channel the scale multiplies the
K sum instead (fractional zero points, as GGUF's Q4_1 has, are subtracted from u itself). No
dequantized weight is ever stored. Grid, split-K and the fused norm / epilogue are as in
matmul.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsjax import numerics
from pallas_kernels import fusion, matmul
from pallas_kernels.fusion import NormConfig



@dataclasses.dataclass(frozen=True)
class BlockSizes(matmul.BlockSizes):
    """matmul's tiles and Triton settings (powers of two); a K step is gcd(block_k, group size)
    rows, so that it lies in one group. In the FMA form inline_asm turns bytes into floats by
    prmt (PTX) rather than conversions."""

    DECODE_TILES = dict(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4)


@dataclasses.dataclass(frozen=True)
class _Spec:
    bits: int
    asym: bool
    group: int  # G, in logical rows
    half: int  # int4: K/2 (the high nibbles' row offset); int8: 0
    bm: int
    bn: int
    bk: int  # rows of `values` per K step
    unroll: int
    steps: int  # loop iterations (of unroll K steps) per split
    n_out: int  # grid columns (the I of a gated weight when gating in the kernel)
    mask_k: bool
    mask_n: bool
    gated: bool
    partial: bool
    activation: str | None
    has_bias: bool
    has_residual: bool
    norm: NormConfig | None
    has_norm_bias: bool
    asm: bool  # inline-PTX conversions (GPU only)
    transpose_w: bool  # values [Nw, K] ([Nw, K/2] packed)


def _signed(v, bits: int, asym: bool):
    """Integer tile [r, c] -> int8 tiles, one per logical row block (int4: low, high nibbles):
    q - 128 for uint8, u - 8 for nibbles (the tensor-core form's operands)."""
    if bits == 8:
        return [v.astype(jnp.int8) ^ jnp.int8(-128) if asym else v]
    lo = (v & jnp.uint8(15)).astype(jnp.int8) - jnp.int8(8)
    hi = (v >> jnp.uint8(4)).astype(jnp.int8) - jnp.int8(8)
    return [lo, hi]


class _Weights:
    """The quantized weight inside a kernel: group rows of scales / zeros and the two ways of
    contracting a loaded integer tile with x."""

    def __init__(self, s: _Spec, sc_ref, z_ref, col_ok):
        self.s, self.sc_ref, self.z_ref, self.col_ok = s, sc_ref, z_ref, col_ok
        self.halves = (0,) if s.bits == 8 else (0, s.half)  # logical row offset of each part
        self.per_channel = sc_ref.shape[0] == 1  # one group: scale the K sum, not each weight

    def along_n(self, v):
        """A [bn] vector (or a scalar) broadcast over a weight tile's N axis."""
        if jnp.ndim(v) == 0:
            return v
        return v[:, None] if self.s.transpose_w else v[None, :]

    def group_row(self, ref, row, c0):
        """[bn] float32 of the group holding logical row `row`."""
        g = jnp.minimum(row // self.s.group, self.sc_ref.shape[0] - 1)
        return fusion.load_row(ref, g, c0, self.s.bn, self.col_ok, 0.0)

    def zero_point(self, row, c0):
        """[bn] (or a constant): the zero of the unsigned codes."""
        if self.s.asym:
            return self.group_row(self.z_ref, row, c0)
        return 8.0 if self.s.bits == 4 else 128.0

    def mma_step(self, acc, xs, v, r0, c0):
        """acc [bm, bn] + s * (x @ q - z' * rowsum(x)), q = u - 128 or u - 8 (tensor cores)."""
        s = self.s
        for p, q in enumerate(_signed(v, s.bits, s.asym)):
            row = r0 + self.halves[p]
            d = fusion.dot(None, xs[p], q, transpose_w=s.transpose_w)
            if s.asym:
                shift = 8.0 if s.bits == 4 else 128.0
                d = d - xs[p].astype(jnp.float32).sum(1, keepdims=True) * (
                    self.zero_point(row, c0) - shift)[None, :]
            acc = acc + d * self.group_row(self.sc_ref, row, c0)[None, :]
        return acc

    def fma_step(self, acc_rows, xs, v, r0, c0):
        """Per row acc [bk, bn] ([bn, bk] transposed) + x * W, W = (u - z) [* s] =
        (2^23 + u) - (2^23 + z): exact for integer codes and zeros. Zero points may be
        fractional (GGUF's Q4_1: z = -m / d), which 2^23 + z would round: those are subtracted
        after the code, (2^23 + u) - 2^23 - z. Per channel the scale multiplies the K sum
        instead (finish)."""
        s = self.s
        floats = fusion.code_floats(v, nibbles=s.bits == 4, flip=s.bits == 8 and not s.asym,
                                    asm=s.asm)
        for p, f in enumerate(floats):
            row = r0 + self.halves[p]
            zero = self.along_n(self.zero_point(row, c0))
            w = (f - 8388608.0) - zero if s.asym else f - (8388608.0 + zero)
            if not self.per_channel:
                w = w * self.along_n(self.group_row(self.sc_ref, row, c0))
            acc_rows = tuple(fusion.fma(a, xv, w, transpose_w=s.transpose_w)
                             for a, xv in zip(acc_rows, xs[p]))
        return acc_rows

    def finish_rows(self, acc_rows, c0):
        """FMA form after the K loop: bm rows [bn]."""
        scale = self.group_row(self.sc_ref, 0, c0) if self.per_channel else 1.0
        return [a.sum(axis=1 if self.s.transpose_w else 0) * scale for a in acc_rows]


def _kernel(*refs, s: _Spec):
    it = iter(refs)
    x_ref, v_ref, sc_ref = next(it), next(it), next(it)  # [M, K]; [Kv, Nw] ([Nw, Kv]); [K/G, Nw]
    z_ref = next(it) if s.asym else None  # [K/G, Nw]
    ns_ref = next(it) if s.norm else None  # [K]
    nb_ref = next(it) if s.has_norm_bias else None
    b_ref = next(it) if s.has_bias else None  # [Nw]
    r_ref = next(it) if s.has_residual else None  # [M, n_out]
    o_ref = next(it)  # [M, n_out] or float32 partials [splits, M, Nw]
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = pl.multiple_of(pid_n * s.bn, s.bn)
    rows = fusion.Rows(x_ref, pid_m * s.bm, s.bm, norm=s.norm, scale_ref=ns_ref,
                       bias_ref=nb_ref)
    col_ok = fusion.span_mask(n0, s.bn, s.n_out, s.mask_n)  # [bn]
    col_offsets = (0, s.n_out) if s.gated else (0,)
    wq = _Weights(s, sc_ref, z_ref, col_ok)

    def load(r0, k_ok):
        vs = [fusion.load_weight(v_ref, r0, n0 + off, s.bk, s.bn, k_ok, col_ok,
                                 transpose_w=s.transpose_w)
              for off in col_offsets]  # each [bk, bn] ([bn, bk] transposed)
        return r0, [rows.load(r0 + h, s.bk, k_ok) for h in wq.halves], vs

    def compute(accs, loaded):
        r0, xs, vs = loaded  # xs per half: [bm, bk], or bm rows [bk]
        step = wq.fma_step if rows.vectors else wq.mma_step
        return tuple(step(acc, xs, v, r0, n0 + off) for acc, v, off in zip(accs, vs, col_offsets))

    tile = (s.bn, s.bk) if s.transpose_w else (s.bk, s.bn)
    zero = ((jnp.zeros(tile, jnp.float32),) * s.bm if rows.vectors
            else jnp.zeros((s.bm, s.bn), jnp.float32))
    accs = fusion.k_loop(s, pid_s, v_ref.shape[1 if s.transpose_w else 0], load, compute,
                         (zero,) * len(col_offsets))
    if rows.vectors:
        accs = [wq.finish_rows(acc, n0 + off) for acc, off in zip(accs, col_offsets)]
    fusion.write_output(o_ref, accs, s, rows, n0, col_ok, pid_s, b_ref, r_ref)


def _check(x, values, scales, zeros, bits, group_size, transpose_w):
    """Validates the weight format; returns (K, Nw)."""
    K = x.shape[-1]
    rows_v, Nw = values.shape[::-1] if transpose_w else values.shape
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, not {bits}")
    if rows_v != (K // 2 if bits == 4 else K) or (bits == 4 and K % 2):
        raise ValueError(f"x [..., {K}] does not match {bits}-bit values {values.shape}")
    want = jnp.uint8 if (bits == 4 or zeros is not None) else jnp.int8
    if values.dtype != want:
        raise ValueError(f"{bits}-bit {'asymmetric' if zeros is not None else 'symmetric'} "
                         f"values must be {jnp.dtype(want).name}, not {values.dtype}")
    G = group_size
    if K % G or (bits == 4 and G != K and (K // 2) % G):
        raise ValueError(f"group_size {G} must divide K={K}" + (" and K/2" if bits == 4 else ""))
    for name, a in (("scales", scales), ("zeros", zeros)):
        if a is not None and a.shape != (K // G, Nw):
            raise ValueError(f"{name} must be [K/G, N] = {(K // G, Nw)}, not {a.shape}")
    return K, Nw


def quant_matmul(x, values, scales, zeros=None, *, bits, group_size, bias=None, residual=None,
                 activation=None, gated=False, norm=None, transpose_w=False,
                 block_sizes: BlockSizes | None = None, interpret=False):
    """act(norm(x) [..., K] @ W + bias) [gated: act(gate) * up] + residual, W dequantized on
    the fly from (values, scales, zeros). norm: None or a dsjax.numerics.NormSpec.
    transpose_w: values stored [N, K] ([N, K/2] packed). Returns [..., N] (gated: [..., N/2]) in x.dtype."""
    fusion.check_activation(activation)
    K, Nw = _check(x, values, scales, zeros, bits, group_size, transpose_w)
    if gated and Nw % 2:
        raise ValueError(f"a gated [gate | up] weight needs an even column count, not {Nw}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K]
    M, rows_v, n_out = x2.shape[0], K // 2 if bits == 4 else K, Nw // 2 if gated else Nw
    bs = block_sizes or BlockSizes.for_shape(M, rows_v, n_out, transpose_w)
    G = group_size
    step = bs.block_k if G == K else math.gcd(G, bs.block_k)  # a power of two dividing G
    if step < 16:
        raise ValueError(f"group_size {G} and block_k {bs.block_k} share no power-of-two "
                         "factor >= 16 (Triton dots need K tiles of 16+ rows in one group)")
    per_iter = step * bs.unroll
    steps = pl.cdiv(pl.cdiv(rows_v, per_iter), bs.split_k)
    splits = pl.cdiv(pl.cdiv(rows_v, per_iter), steps)
    partial = splits > 1
    cols = Nw if partial else n_out
    norm_cfg = NormConfig.of(norm)
    ns, nb = (None, None) if norm is None else (norm.scale, norm.bias)
    s = _Spec(bits=bits, asym=zeros is not None, group=G, half=K // 2 if bits == 4 else 0,
              bm=bs.block_m, bn=bs.block_n, bk=step, unroll=bs.unroll, steps=steps, n_out=cols,
              mask_k=splits * steps * per_iter != rows_v, mask_n=cols % bs.block_n != 0,
              gated=gated and not partial, partial=partial, activation=activation,
              has_bias=bias is not None and not partial,
              has_residual=residual is not None and not partial, norm=norm_cfg,
              has_norm_bias=nb is not None, asm=bs.inline_asm and not interpret,
              transpose_w=transpose_w)
    res2 = None if residual is None else residual.reshape(M, n_out)
    args = [x2, values, scales, zeros, ns, nb, bias if s.has_bias else None,
            res2 if s.has_residual else None]
    out_shape = (jax.ShapeDtypeStruct((splits, M, Nw), jnp.float32) if partial
                 else jax.ShapeDtypeStruct((M, n_out), x.dtype))
    y = pl.pallas_call(
        functools.partial(_kernel, s=s),
        grid=(pl.cdiv(M, s.bm), pl.cdiv(cols, s.bn), splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=f"quant{bits}_matmul",
    )(*[a for a in args if a is not None])
    if partial:  # [splits, M, Nw] -> [M, n_out]
        y = fusion.epilogue(y.sum(0), bias, res2, activation=activation, gated=gated)
        y = y.astype(x.dtype)
    return y.reshape(*lead, n_out)


# ----------------------------------------------------------------------------- reference

def random_weight(rng, K: int, N: int, *, bits: int, symmetric: bool, group_size: int):
    """Random (values, scales, zeros) in this kernel's format, scaled so that x @ W stays O(1)
    for unit x (for tests and benchmarks; real weights come from dsjax.quant.quantize)."""
    G = group_size
    if bits == 8:
        values = (rng.integers(-127, 128, (K, N), dtype=np.int8) if symmetric
                  else rng.integers(0, 256, (K, N), dtype=np.uint8))
    else:
        values = rng.integers(0, 256, (K // 2, N), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.5, (K // G, N)).astype(np.float32) / (K ** 0.5 * 2 ** bits)
    zeros = None if symmetric else jnp.asarray(rng.integers(0, 2 ** bits, (K // G, N)).astype(np.float32))
    return jnp.asarray(values), jnp.asarray(scales), zeros


def quant_matmul_reference(x, values, scales, zeros=None, *, bits, group_size, bias=None,
                           residual=None, activation=None, gated=False, norm=None,
                           transpose_w=False):
    """Dequantize to float32, then (normed) x @ W in float32 and the float32 epilogue."""
    fusion.check_activation(activation)
    values = values.T if transpose_w else values
    if norm is not None:
        x = numerics.apply_norm(x, norm)
    w = numerics.dequantize(values, scales, zeros, bits=bits, group_size=group_size)
    y = jnp.einsum("...k,kn->...n", x.astype(jnp.float32), w,
                   precision=jax.lax.Precision.HIGHEST)
    return numerics.epilogue(y, bias, residual, activation=activation, gated=gated).astype(x.dtype)
