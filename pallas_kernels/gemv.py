"""Decode GEMV (Pallas, Triton lowering) over a K-major weight, with an optional RMSNorm or
LayerNorm prologue and the GEMM kernels' epilogue:

    y = act(norm(x) @ W + bias) [gated: act(gate) * up] + residual,   W = w.T, w [N, K]

for the few rows of a decode step (M <= 8). w is bf16/fp16/fp32, or int8 codes with one
float32 scale per output (W = q * s, symmetric per channel). dsjax/pallas_ops.py routes float
weights at one row here, with an RMSNorm or none; the int8 form and the fused LayerNorm are
tested but not routed, since the alternatives ran faster (why: docs/decisions.md#gemv-rows).

The shape: a program owns `block_n` rows of w and walks their K-contiguous bytes in steps of
`block_k`; x is loaded by a broadcast index straight into the weight tile's own register
layout, so no step reshuffles x through shared memory behind a barrier (the [K, N] kernels of
matmul.py do, which leaves their loads idle); products are accumulated elementwise in float32
[block_n, block_k] with one fused multiply-add each and summed once after the loop. There is
no split-K: N / block_n programs fill the GPU, so bias, activation, gating and residual are
applied in the kernel and one launch does the whole op. int8 codes become floats by the
2^23 + u trick (fusion.int8_floats). Why this shape: docs/decisions.md#gemv-kernel-shape.

RMSNorm / LayerNorm fused: before its weight loop each program reads its rows of x once more
(K values from L2, short loops) for the row statistics, as the GEMM kernels' prologue does
(fusion.Rows: a two-pass variance for LayerNorm); the weight loop then normalizes the x it
loads anyway, (x - mean) * rstd * g [+ b], in float32 (fusion.apply_norm). It does not
accumulate the statistics and the weight sums g @ W, b @ W alongside the products: those four
more accumulator tiles made the kernel slower (docs/decisions.md#gemv-norm-prologue).
(The unfused path rounds the normed x to the activation dtype before its GEMM; this does not.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsjax import numerics
from pallas_kernels import fusion

MAX_ROWS = 8  # more rows than this are a GEMM (matmul.py / quant_matmul.py)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows of w per program, K step, warps; `for_shape` picks them."""
    block_n: int = 4
    block_k: int = 512
    num_warps: int = 4
    inline_asm: bool = True  # int8 -> float32 by prmt, fma.rn.f32 (GPU only)

    @classmethod
    def for_shape(cls, m: int, k: int, parts: int) -> BlockSizes:
        """The M = 1 tile a sweep chose (4 rows x 512, 4 warps), shrunk so that the float32
        accumulators (m rows x parts of [block_n, block_k]) stay within 64 registers a thread.
        Why: docs/decisions.md#gemv-kernel-shape."""
        warps, bn, bk = 4, 4, min(512, pl.next_power_of_2(k))
        budget = 64 * 32 * warps  # accumulator elements a program can hold
        while bn > 1 and m * parts * bn * bk > budget:
            bn //= 2
        while bk > 64 and m * parts * bn * bk > budget:
            bk //= 2
        return cls(block_n=bn, block_k=bk, num_warps=warps)


@dataclasses.dataclass(frozen=True)
class _Spec:
    bn: int
    bk: int
    m: int
    k: int
    n_out: int  # output columns (gated: the up rows start at n_out)
    gated: bool
    int8: bool
    activation: str | None
    has_bias: bool
    has_residual: bool
    norm: fusion.NormConfig | None
    has_norm_bias: bool
    asm: bool


def _kernel(*refs, s: _Spec):
    it = iter(refs)
    x_ref, w_ref = next(it), next(it)  # [M, K]; [Nw, K]
    sc_ref = next(it) if s.int8 else None  # [Nw] float32
    g_ref = next(it) if s.norm else None  # [K]
    nb_ref = next(it) if s.has_norm_bias else None  # [K]
    b_ref = next(it) if s.has_bias else None  # [Nw]
    r_ref = next(it) if s.has_residual else None  # [M, n_out]
    o_ref = next(it)  # [M, n_out]
    n0 = pl.multiple_of(pl.program_id(0) * s.bn, s.bn)
    tile = (s.bn, s.bk)
    k_iota = lax.broadcasted_iota(jnp.int32, tile, 1)  # [bn, bk]: the k of each element
    row_iota = lax.broadcasted_iota(jnp.int32, tile, 0)
    rows_ok = (n0 + row_iota) < s.n_out if s.n_out % s.bn else None  # [bn, bk]
    ragged_k = s.k % s.bk != 0
    offsets = (0, s.n_out) if s.gated else (0,)

    def mask(k_ok):
        if rows_ok is None:
            return k_ok
        return rows_ok if k_ok is None else rows_ok & k_ok

    def load(ref, idx, m):
        return plgpu.load(ref.at[idx], mask=m, other=0) if m is not None else plgpu.load(
            ref.at[idx])

    # per row (mean or None, rstd), float32 scalars (m0 traced: a Python int index breaks
    # interpret mode)
    stats = fusion.Rows(x_ref, jnp.asarray(0, jnp.int32), s.m, norm=s.norm).stats

    def body(i, accs):  # accs[part][row]: [bn, bk] float32
        k0 = pl.multiple_of(i * s.bk, s.bk)
        cols = k_iota + k0
        k_ok = cols < s.k if ragged_k else None
        ws = []
        for off in offsets:
            w = load(w_ref, (pl.ds(n0 + off, s.bn), pl.ds(k0, s.bk)), mask(k_ok))
            if s.int8:
                w = fusion.int8_floats(w, asm=s.asm)
            ws.append(w.astype(jnp.float32))
        zeros = jnp.zeros(tile, jnp.int32)
        g = nb = None
        if s.norm is not None:
            g = load(g_ref, (cols,), k_ok).astype(jnp.float32)
            g = g + 1.0 if s.norm.plus_one else g
            if s.has_norm_bias:
                nb = load(nb_ref, (cols,), k_ok).astype(jnp.float32)
        new_accs = [list(a) for a in accs]
        for r in range(s.m):
            x = load(x_ref, (zeros + r, cols), k_ok).astype(jnp.float32)  # in w's layout
            if stats is not None:  # g holds the + 1 already
                x = fusion.apply_norm(x, *stats[r], g, nb, plus_one=False)
            for p, w in enumerate(ws):
                new_accs[p][r] = fusion.fma_f32(x, w, accs[p][r], asm=s.asm)
        return tuple(tuple(a) for a in new_accs)

    zero = jnp.zeros(tile, jnp.float32)
    accs = lax.fori_loop(0, pl.cdiv(s.k, s.bk), body, tuple((zero,) * s.m for _ in offsets))

    cols_ok = (n0 + jnp.arange(s.bn)) < s.n_out if rows_ok is not None else None  # [bn]
    per_part = []
    for off in offsets:
        scale = fusion.load_vec(sc_ref, n0 + off, s.bn, cols_ok, 0.0) if s.int8 else None
        bias = (fusion.load_vec(b_ref, n0 + off, s.bn, cols_ok, 0).astype(jnp.float32)
                if s.has_bias else None)
        per_part.append((scale, bias))
    for r in range(s.m):
        row = jnp.asarray(r, jnp.int32)  # a Python int index breaks interpret mode
        ys = []
        for p, (scale, _) in enumerate(per_part):
            y = accs[p][r].sum(axis=1)  # [bn]
            if scale is not None:
                y = y * scale
            ys.append(y)
        res = None
        if s.has_residual:
            res = fusion.load_row(r_ref, row, n0, s.bn, cols_ok, 0).astype(jnp.float32)
        out = fusion.finish(ys[0], ys[1] if s.gated else None, activation=s.activation,
                            gate_bias=per_part[0][1], up_bias=per_part[-1][1] if s.gated else None,
                            residual=res)
        fusion.store_row(o_ref, out, row, n0, jnp.bool_(True), cols_ok)


def gemv(x, w, scales=None, bias=None, residual=None, *, norm=None, activation=None,
         gated=False, block_sizes: BlockSizes | None = None, interpret=False):
    """act(norm(x) [..., K] @ w.T + bias) [gated] + residual -> [..., N] in x.dtype.

    w: [N, K] float, or int8 codes with `scales` float32 [N] (W = q * s per output); gated: w
    holds the gate rows then the up rows ([2I, K]) and the result is act(gate) * up [..., I];
    norm: None or a dsjax.numerics.NormSpec (RMSNorm or LayerNorm; a bias is added after the
    scale in both). At most MAX_ROWS rows of x."""
    fusion.check_activation(activation)
    *lead, K = x.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    Nw, Kw = w.shape
    if Kw != K:
        raise ValueError(f"x [..., {K}] does not match the K-major weight {w.shape}")
    if M > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {M} (use a GEMM kernel)")
    int8 = w.dtype == jnp.int8
    if int8 != (scales is not None):
        raise ValueError("int8 codes need their per-output scales (and only they take scales)")
    if int8 and scales.shape != (Nw,):
        raise ValueError(f"scales must be [N] = [{Nw}], not {scales.shape}")
    if gated and Nw % 2:
        raise ValueError(f"a gated [gate; up] weight needs an even row count, not {Nw}")
    norm_cfg = fusion.NormConfig.of(norm)
    g, nb = (None, None) if norm is None else (norm.scale, norm.bias)
    n_out = Nw // 2 if gated else Nw
    bs = block_sizes or BlockSizes.for_shape(M, K, 2 if gated else 1)
    s = _Spec(bn=bs.block_n, bk=min(bs.block_k, pl.next_power_of_2(K)), m=M, k=K, n_out=n_out,
              gated=gated, int8=int8, activation=activation, has_bias=bias is not None,
              has_residual=residual is not None, norm=norm_cfg, has_norm_bias=nb is not None,
              asm=bs.inline_asm and not interpret)
    res2 = None if residual is None else residual.reshape(M, n_out)
    args = [x2, w, scales, g, nb, bias, res2]
    y = pl.pallas_call(
        functools.partial(_kernel, s=s),
        grid=(pl.cdiv(n_out, s.bn),),
        out_shape=jax.ShapeDtypeStruct((M, n_out), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=1),
        interpret=interpret,
        name="gemv",
    )(*[a for a in args if a is not None])
    return y.reshape(*lead, n_out)


# ----------------------------------------------------------------------------- reference

def gemv_reference(x, w, scales=None, bias=None, residual=None, *, norm=None, activation=None,
                   gated=False):
    """Plain jnp: the normed x (float32, not rounded) @ dequantized w.T in float32, the float32
    epilogue, one cast at the end."""
    fusion.check_activation(activation)
    xf = x.astype(jnp.float32)
    if norm is not None:
        xf = numerics.apply_norm(xf, norm)
    wf = w.astype(jnp.float32)
    if scales is not None:
        wf = wf * scales[:, None]
    y = jnp.einsum("...k,nk->...n", xf, wf, precision=lax.Precision.HIGHEST)
    return numerics.epilogue(y, bias, residual, activation=activation, gated=gated).astype(x.dtype)
