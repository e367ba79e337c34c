"""Shared pieces of the GEMM kernels: activations, the norm prologue, the epilogue, tile I/O.

The math (`ACTIVATIONS` with an erf Triton can lower, `apply_norm`, `finish`, `epilogue`) is what
the kernels run on loaded tiles (and their split-K tails on whole arrays); the references use
dsjax.numerics, the XLA path's own math. The tile helpers (`load_tile`, `store_tile`, `Rows`) work on Pallas refs inside a Triton kernel;
masks are built only for the dims that need them, so aligned shapes load unmasked.
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

from dsjax import numerics

# ----------------------------------------------------------------------------- activations

# Abramowitz & Stegun 7.1.26: |erf error| < 1.5e-7. Pallas-Triton has no lowering for erf.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x):
    """float32 erf from exp and a rational polynomial (usable inside a Triton kernel)."""
    a = jnp.abs(x)
    t = 1.0 / (1.0 + _ERF_P * a)
    poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
    y = 1.0 - poly * jnp.exp(-a * a)
    return jnp.where(x < 0, -y, y)


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


ACTIVATIONS = {
    "gelu": _gelu,  # exact (erf) GELU
    "gelu_tanh": _gelu_tanh,
    "relu": lambda x: jnp.maximum(x, 0.0),
    "silu": lambda x: x * jax.nn.sigmoid(x),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


check_activation = numerics.check_activation  # the kernels take the activations the XLA path has


# ----------------------------------------------------------------------------- epilogue math

def finish(gate, up=None, *, activation, gate_bias=None, up_bias=None, residual=None):
    """act(gate + gate_bias) [* (up + up_bias)] [+ residual], all float32 [..., N]."""
    if gate_bias is not None:
        gate = gate + gate_bias
    y = gate if activation is None else ACTIVATIONS[activation](gate)
    if up is not None:
        y = y * (up if up_bias is None else up + up_bias)
    return y if residual is None else y + residual


def epilogue(y, bias=None, residual=None, *, activation, gated):
    """Whole-array epilogue: y float32 [..., Nw] (gated: Nw = 2N, [gate | up]) -> float32."""
    f32 = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
    bias, residual = f32(bias), f32(residual)
    if not gated:
        return finish(y, activation=activation, gate_bias=bias, residual=residual)
    n = y.shape[-1] // 2
    gb, ub = (None, None) if bias is None else (bias[:n], bias[n:])
    return finish(y[..., :n], y[..., n:], activation=activation, gate_bias=gb, up_bias=ub,
                  residual=residual)


# ----------------------------------------------------------------------------- norm math

@dataclasses.dataclass(frozen=True)
class NormConfig:
    """LayerNorm or RMSNorm over the last axis; plus_one: the scale is stored as (scale - 1)."""
    kind: str
    eps: float
    plus_one: bool

    def __post_init__(self):
        if self.kind not in numerics.NORM_KINDS:
            raise ValueError(f"norm kind must be one of {numerics.NORM_KINDS}, not {self.kind!r}")

    @classmethod
    def of(cls, spec) -> NormConfig | None:
        """The static part of a dsjax.numerics.NormSpec (None: no norm)."""
        return None if spec is None else cls(spec.kind, float(spec.eps), bool(spec.plus_one))


def apply_norm(x, mean, rstd, scale, bias, *, plus_one: bool):
    """float32 x [.., K], mean/rstd [.., 1] (mean None for RMSNorm), scale/bias [K] -> float32."""
    if mean is not None:
        x = x - mean
    scale = scale.astype(jnp.float32)
    y = (x * rstd) * (scale + 1.0 if plus_one else scale)
    return y if bias is None else y + bias.astype(jnp.float32)


# ----------------------------------------------------------------------------- tile I/O (kernels)

def _mask(row_ok, col_ok):
    """[r, c] mask from optional per-row / per-column masks; None when both are None."""
    if row_ok is None and col_ok is None:
        return None
    if row_ok is None:
        return col_ok[None, :]
    if col_ok is None:
        return row_ok[:, None]
    return row_ok[:, None] & col_ok[None, :]


def span_mask(start, size: int, limit: int, needed: bool):
    """[size] bool (start + i < limit), or None when the caller knows it is all true."""
    return (start + jnp.arange(size)) < limit if needed else None


def load_tile(ref, r0, c0, br: int, bc: int, row_ok=None, col_ok=None, other=0, lead=()):
    """ref[*lead, r0:r0+br, c0:c0+bc] with masked-out entries set to `other`."""
    mask = _mask(row_ok, col_ok)
    view = ref.at[(*lead, pl.ds(r0, br), pl.ds(c0, bc))]
    if mask is None:
        return plgpu.load(view)
    return plgpu.load(view, mask=mask, other=other)


def load_weight(ref, k0, c0, bk: int, bc: int, k_ok=None, col_ok=None, *, transpose_w: bool):
    """A weight tile, masked-out entries 0: [bk, bc] of ref [K, N], or [bc, bk] of ref [N, K]
    when transpose_w."""
    if transpose_w:
        return load_tile(ref, c0, k0, bc, bk, col_ok, k_ok, 0)
    return load_tile(ref, k0, c0, bk, bc, k_ok, col_ok, 0)


def load_vec(ref, c0, bc: int, col_ok=None, other=0):
    view = ref.at[pl.ds(c0, bc)]
    return plgpu.load(view) if col_ok is None else plgpu.load(view, mask=col_ok, other=other)


def load_row(ref, r, c0, bc: int, col_ok=None, other=0):
    """ref[r, c0:c0+bc] (r a scalar row index)."""
    view = ref.at[r, pl.ds(c0, bc)]
    return plgpu.load(view) if col_ok is None else plgpu.load(view, mask=col_ok, other=other)


def store_tile(ref, value, r0, c0, row_ok=None, col_ok=None, lead=()):
    """ref[*lead, r0:r0+br, c0:c0+bc] = value [br, bc] where the mask holds."""
    br, bc = value.shape
    view = ref.at[(*lead, pl.ds(r0, br), pl.ds(c0, bc))]
    plgpu.store(view, value.astype(ref.dtype), mask=_mask(row_ok, col_ok))


def store_row(ref, value, r, c0, row_ok, col_ok=None, lead=()):
    """ref[*lead, r, c0:c0+bc] = value [bc] where row_ok (a scalar) and col_ok hold."""
    mask = jnp.broadcast_to(row_ok, value.shape) if col_ok is None else col_ok & row_ok
    plgpu.store(ref.at[(*lead, r, pl.ds(c0, value.shape[0]))], value.astype(ref.dtype),
                mask=mask)


# ----------------------------------------------------------------------------- K loop (kernels)

def k_loop(s, pid_s, limit: int, load, compute, init):
    """This split's K loop: s.steps iterations of s.unroll steps of s.bk rows (of `limit`).
    Each iteration first issues the loads of all its steps (`load(k0, k_ok)`), so that they are
    in flight together, then folds them into the carry (`compute(carry, loaded)`)."""
    def body(i, carry):
        loaded = []
        for u in range(s.unroll):
            k0 = pl.multiple_of(((pid_s * s.steps + i) * s.unroll + u) * s.bk, s.bk)
            loaded.append(load(k0, span_mask(k0, s.bk, limit, s.mask_k)))
        for item in loaded:
            carry = compute(carry, item)
        return carry
    return lax.fori_loop(0, s.steps, body, init)


def dot(acc, x, w, *, transpose_w: bool = False):
    """Tensor-core form: acc [bm, bn] + x [bm, bk] @ w [bk, bn] (w [bn, bk] when transpose_w);
    acc None: the product alone."""
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    y = lax.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    return y if acc is None else acc + y


def fma(acc, xv, w, *, transpose_w: bool = False):
    """FMA (GEMV) form for one row: acc [bk, bn] + xv [bk, None] * w [bk, bn] (acc, w [bn, bk]
    when transpose_w), float32. The sum over k runs once, after the K loop, so the loop has no
    cross-thread reduction and the weight never goes through shared memory."""
    xf, wf = xv.astype(jnp.float32), w.astype(jnp.float32)  # w: float32 already (to_float32)
    return acc + (xf[None, :] * wf if transpose_w else xf[:, None] * wf)


# Inline PTX (GPU only): byte / half-word -> float32 with one prmt / shift per element, where
# the plain conversions cost quarter-rate cvt or several integer ops. pack=4: four u8 elements
# share one 32-bit register, element i in byte i. prmt selector 0x765i builds the word
# 0x4B0000uu (bytes 4..7 come from m = 0x4B000000): the float 2^23 + u.
_PRMT4 = "prmt.b32 $0, t, m, 0x7650; prmt.b32 $1, t, m, 0x7651; " \
         "prmt.b32 $2, t, m, 0x7652; prmt.b32 $3, t, m, 0x7653;"
_BYTES_ASM = "{ .reg .b32 t, m; mov.b32 m, 0x4B000000; %s " + _PRMT4 + " }"
_NIBBLE_OPS = ("and.b32 t, $4, 0x0F0F0F0F;",  # low nibbles; high: shift first
               "shr.b32 t, $4, 4; and.b32 t, t, 0x0F0F0F0F;")
_BF16_ASM = "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000; }"


def code_floats(v, *, nibbles: bool, flip: bool, asm: bool):
    """Integer tile v (int8/uint8) -> float32 tiles of 2^23 + u for its unsigned codes u:
    bytes (flip: u = q + 128 of an int8 q), or nibbles (low, high). Exact; asm: inline PTX."""
    out = jax.ShapeDtypeStruct(v.shape, jnp.float32)
    if asm:  # one result per asm op (Pallas lowers multi-result inline asm wrongly)
        ops = _NIBBLE_OPS if nibbles else (
            "xor.b32 t, $4, 0x80808080;" if flip else "mov.b32 t, $4;",)
        return [plgpu.elementwise_inline_asm(_BYTES_ASM % op, args=[v], pack=4,
                                             constraints="=r," * 4 + "r",
                                             result_shape_dtypes=[out])[0] for op in ops]
    u = v.astype(jnp.uint8).astype(jnp.uint32)
    parts = [u & 15, u >> 4] if nibbles else [u ^ 128 if flip else u]
    return [lax.bitcast_convert_type(p | jnp.uint32(0x4B000000), jnp.float32) for p in parts]


def int8_floats(v, *, asm: bool):
    """int8 tile -> float32 tile of the same values: code_floats' 2^23 + q + 128, minus that
    offset (exact)."""
    return code_floats(v, nibbles=False, flip=True, asm=asm)[0] - (8388608.0 + 128.0)


def fma_f32(a, b, c, *, asm: bool):
    """a * b + c in float32 with one rounding: fma.rn.f32 in inline PTX on the GPU (Triton does
    not contract a * b + c itself)."""
    if not asm:
        return a * b + c
    return plgpu.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


def to_float32(w, *, asm: bool):
    """A weight tile as float32; bfloat16 by shifting the bits (inline PTX) when asm."""
    if not asm or w.dtype != jnp.bfloat16:
        return w.astype(jnp.float32)
    out = jax.ShapeDtypeStruct(w.shape, jnp.float32)
    return plgpu.elementwise_inline_asm(_BF16_ASM, args=[w], constraints="=r,=r,r", pack=2,
                                        result_shape_dtypes=[out])[0]


def write_output(o_ref, ys, s, rows, n0, col_ok, pid_s, b_ref=None, r_ref=None):
    """Stores the float32 results `ys` (one per column block: gate[, up]; each [bm, bn], or a
    list of bm rows [bn] in the vector form): partials at split pid_s when s.partial, else the
    epilogue (bias, activation, gating, residual) in the output dtype."""
    if not rows.vectors:
        store = functools.partial(store_tile, r0=rows.m0, row_ok=rows.row_ok)
        load = functools.partial(load_tile, r0=rows.m0, br=s.bm, row_ok=rows.row_ok)
        return _write(o_ref, ys, s, n0, col_ok, pid_s, b_ref, r_ref, store, load)
    for r in range(s.bm):
        ok = rows.valid[r]
        store = functools.partial(store_row, r=rows.m0 + r, row_ok=ok)
        load = functools.partial(_load_row_masked, r=rows.m0 + r, row_ok=ok)
        _write(o_ref, [y[r] for y in ys], s, n0, col_ok, pid_s, b_ref, r_ref, store, load)


def _load_row_masked(ref, *, r, row_ok, c0, bc, col_ok, other):
    mask = jnp.broadcast_to(row_ok, (bc,)) if col_ok is None else col_ok & row_ok
    return plgpu.load(ref.at[r, pl.ds(c0, bc)], mask=mask, other=other)


def _write(o_ref, ys, s, n0, col_ok, pid_s, b_ref, r_ref, store, load):
    if s.partial:
        store(o_ref, ys[0], c0=n0, col_ok=col_ok, lead=(pid_s,))
        return
    offsets = (0, s.n_out) if s.gated else (0,)
    bias = [None, None]
    if b_ref is not None:
        bias = [load_vec(b_ref, n0 + off, s.bn, col_ok, 0).astype(jnp.float32)
                for off in offsets] + [None]
    res = None
    if r_ref is not None:
        res = load(r_ref, c0=n0, bc=s.bn, col_ok=col_ok, other=0).astype(jnp.float32)
    y = finish(ys[0], ys[1] if s.gated else None, activation=s.activation, gate_bias=bias[0],
               up_bias=bias[1], residual=res)
    store(o_ref, y, c0=n0, col_ok=col_ok)


# ----------------------------------------------------------------------------- A operand (kernels)

class Rows:
    """The A operand inside a kernel: rows m0..m0+bm of x [M, K], optionally normalized on the
    fly (row statistics over the whole K are computed when built). bm >= 16: [bm, bk] tiles for
    the tensor cores; smaller bm: the vector form, one [bk] vector per row."""

    def __init__(self, x_ref, m0, bm: int, *, norm: NormConfig | None = None, scale_ref=None,
                 bias_ref=None):
        self.x_ref, self.m0, self.bm = x_ref, m0, bm
        self.norm, self.scale_ref, self.bias_ref = norm, scale_ref, bias_ref
        self.vectors = bm < 16
        M, K = x_ref.shape
        self.row_ok = None if self.vectors else span_mask(m0, bm, M, True)  # [bm]
        self.valid = [m0 + r < M for r in range(bm)] if self.vectors else None  # scalars
        self.stats = None
        if norm is not None:
            bk = min(1024 if self.vectors else 4096 // bm, pl.next_power_of_2(K))
            self.stats = ([self._stats(K, bk, r) for r in range(bm)] if self.vectors
                          else self._stats(K, bk, None))

    def _raw(self, k0, bk: int, col_ok, r):
        """x[m0 + r, k0:k0+bk] ([bk]) for a row r, else the [bm, bk] tile."""
        if r is None:
            return load_tile(self.x_ref, self.m0, k0, self.bm, bk, self.row_ok, col_ok, 0)
        return _load_row_masked(self.x_ref, r=self.m0 + r, row_ok=self.valid[r], c0=k0, bc=bk,
                                col_ok=col_ok, other=0)

    def _stats(self, K: int, bk: int, r):
        """(mean or None, rstd): [bm, 1] for the tile, scalars for row r. The loops add
        elementwise and reduce once at the end (a reduction per step costs barriers)."""
        def total(fn):
            def body(i, acc):
                k0 = i * bk
                ok = span_mask(k0, bk, K, K % bk != 0)
                return acc + fn(self._raw(k0, bk, ok, r).astype(jnp.float32), ok)
            shape = (bk,) if r is not None else (self.bm, bk)
            acc = lax.fori_loop(0, pl.cdiv(K, bk), body, jnp.zeros(shape, jnp.float32))
            return jnp.sum(acc) if r is not None else jnp.sum(acc, axis=1, keepdims=True)

        mean = total(lambda x, ok: x) / K if self.norm.kind == "layernorm" else None

        def sq(x, ok):
            if mean is not None:
                x = x - mean
                if ok is not None:
                    x = jnp.where(ok, x, 0.0)
            return x * x
        return mean, lax.rsqrt(total(sq) / K + self.norm.eps)

    def load(self, k0, bk: int, col_ok=None):
        """(Normalized) x in x.dtype, masked-out columns 0: a [bm, bk] tile, or (vector form)
        a list of bm [bk] rows."""
        if not self.vectors:
            return self._normed(self._raw(k0, bk, col_ok, None), self.stats, k0, bk, col_ok)
        return [self._normed(self._raw(k0, bk, col_ok, r), self.stats and self.stats[r], k0,
                             bk, col_ok) for r in range(self.bm)]

    def _normed(self, x, stats, k0, bk, col_ok):
        if self.norm is None:
            return x
        scale = load_vec(self.scale_ref, k0, bk, col_ok, 0)
        bias = None if self.bias_ref is None else load_vec(self.bias_ref, k0, bk, col_ok, 0)
        y = apply_norm(x.astype(jnp.float32), *stats, scale, bias, plus_one=self.norm.plus_one)
        if col_ok is not None:
            y = jnp.where(col_ok, y, 0.0)
        return y.astype(x.dtype)

    def store(self, ref, xs, k0, col_ok, when):
        """Writes what `load` returned into ref [M, K] where the scalar `when` holds."""
        if not self.vectors:
            store_tile(ref, xs, self.m0, k0, self.row_ok & when, col_ok)
            return
        for r, xv in enumerate(xs):
            store_row(ref, xv, self.m0 + r, k0, self.valid[r] & when, col_ok)
