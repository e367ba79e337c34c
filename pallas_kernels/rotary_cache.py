"""Rotary embedding + KV-cache write in one Pallas kernel (Triton lowering).

Shapes: B batch, T new tokens, H query heads, KVH kv heads, Dh head dim, S cache slots,
R = rot_dim / 2 rotated pairs.

qkv [B, T, (H + 2 KVH) Dh] is the fused projection output, columns [q heads | k heads | v heads].
Grid (B, T blocks, H + 2 KVH): program (b, t, n) reads head n's [bt, Dh] tile once, rotates the
first rot_dim features (q and k heads) at angle position * inv_freq in float32, and stores it:
q heads to the q output [B, T, H, Dh], k and v heads into the caches [B, KVH, S, Dh] at slots
write_at[b] + t (in place: the caches are aliased to the outputs). With int8 caches each k/v row
is quantized (dsjax-style symmetric per token per head, see dsjax.numerics.quantize_kv) and its
scale stored in k_scale / v_scale [B, KVH, S].

A head is handled as tiles of contiguous features: the two rotated halves (a, b) and the
pass-through rest, each cut into power-of-two widths (Triton's tile rule) that fit exactly, so no
column masks and no reads past a head. Layout "half": a = features [0, R), b = [R, 2R). Layout
"interleaved": the arrays are viewed as [..., Dh / 2, 2] (a free reshape) and a, b are
components 0 and 1 of the pairs [0, R), so no strided access is needed (interpret mode has none).

Called outside a jit, the caches (and scales) are donated: the arrays passed in are consumed.
Inside the caller's jit they update in place when the caller donates or owns them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsjax.numerics import next_pow2, quantize_kv, rotate, round_half_away


# ----------------------------------------------------------------------------- reference

def _rotate_reference(x, positions, rot_dim: int, layout: str, inv_freq):
    """x [B, T, N, Dh] with its first rot_dim features rotated by positions [B, T]."""
    if not rot_dim or inv_freq is None:
        return x
    return rotate(x, positions, inv_freq, rot_dim, layout)


def rotary_cache_write_reference(qkv, k_cache, v_cache, positions, write_at, *, num_heads,
                                 kv_heads, head_dim, rot_dim, layout, inv_freq, k_scale=None,
                                 v_scale=None):
    """Plain-jnp rotary_cache_write (same arguments and results, no aliasing)."""
    B, T, _ = qkv.shape
    H, K, Dh = num_heads, kv_heads, head_dim
    q = qkv[..., : H * Dh].reshape(B, T, H, Dh)
    k = qkv[..., H * Dh: (H + K) * Dh].reshape(B, T, K, Dh)
    v = qkv[..., (H + K) * Dh:].reshape(B, T, K, Dh)
    q = _rotate_reference(q, positions, rot_dim, layout, inv_freq)
    k = _rotate_reference(k, positions, rot_dim, layout, inv_freq)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
    slots = write_at[:, None] + jnp.arange(T)  # [B, T]
    bidx = jnp.arange(B)[:, None]

    def put(cache, new):  # cache [B, K, S, ...], new [B, K, T, ...]
        return cache.at[bidx, :, slots].set(jnp.moveaxis(new, 2, 1))

    if k_scale is None:
        return q, put(k_cache, k), put(v_cache, v)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    return q, put(k_cache, kq), put(v_cache, vq), put(k_scale, ks), put(v_scale, vs)


# ----------------------------------------------------------------------------- kernel

def _pow2_chunks(width: int) -> list[tuple[int, int]]:
    """[0, width) as (offset, size) chunks of power-of-two sizes, largest first (Triton tiles
    must be powers of two; exact chunks need no column masks and never leave the array)."""
    chunks, off = [], 0
    for bit in reversed(range(max(width, 1).bit_length())):
        if width & (1 << bit):
            chunks.append((off, 1 << bit))
            off += 1 << bit
    return chunks


def _pieces(layout: str, head_dim: int, rot_dim: int):
    """How a head splits into tiles. Returns (pairs, rest): pairs = [(a, b, freq offset)], the
    matching tiles of the rotated halves; rest = pass-through tiles. A tile is (offset, width,
    component) in the head's feature view: [Dh] ("half"), [Dh / 2, 2] pairs ("interleaved")."""
    R = rot_dim // 2
    if layout == "half" or not rot_dim:
        pairs = [((o, w, None), (R + o, w, None), o) for o, w in _pow2_chunks(R)] if R else []
        return pairs, [(rot_dim + o, w, None) for o, w in _pow2_chunks(head_dim - rot_dim)
                       if head_dim > rot_dim]
    pairs = [((o, w, 0), (o, w, 1), o) for o, w in _pow2_chunks(R)]
    rest = [(R + o, w, c) for o, w in _pow2_chunks(head_dim // 2 - R) if head_dim > rot_dim
            for c in (0, 1)]
    return pairs, rest


def _at(ref, lead, col, piece):
    """ref.at[lead..., features col + offset ...(, component)] for one [bt, width] tile."""
    off, width, comp = piece
    return ref.at[lead + (pl.ds(col + off, width),) + (() if comp is None else (jnp.int32(comp),))]


def _rotary_kernel(*refs, H, K, Dh, bt, T, rot_dim, layout, has_rotary, quantized):
    # positions [B, T]; write_at [B]; inv_freq [R]; qkv [B, T, (H+2K) Dh] (or its pair view)
    # outputs: q [B, T, H, Dh]; k, v caches [B, K, S, Dh] (pair views); scales [B, K, S]
    pos_ref, wat_ref, *refs = refs
    freq_ref = refs.pop(0) if has_rotary else None
    qkv_ref, *refs = refs
    refs = refs[2 + 2 * quantized:]  # skip the aliased cache inputs
    q_ref, k_ref, v_ref, *scale_refs = refs
    b, tb, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = tb * bt
    rows, rows_ok = pl.ds(t0, bt), (t0 + jnp.arange(bt) < T)[:, None]  # [bt, 1]
    pairs, rest = _pieces(layout, Dh, rot_dim if has_rotary else 0)
    tiles = [t for a, b_, _ in pairs for t in (a, b_)] + rest
    col = n * (Dh // 2 if has_rotary and layout == "interleaved" else Dh)
    src = [plgpu.load(_at(qkv_ref, (b, rows), col, t), mask=rows_ok, other=0) for t in tiles]
    rotated = list(src)  # each [bt, width]
    if pairs:
        pos = plgpu.load(pos_ref.at[b, rows], mask=rows_ok[:, 0], other=0).astype(jnp.float32)
        for i, (_, (_, w, _), fo) in enumerate(pairs):
            ang = pos[:, None] * freq_ref[pl.ds(fo, w)][None, :]  # [bt, w]
            cos, sin = jnp.cos(ang), jnp.sin(ang)
            x1, x2 = src[2 * i].astype(jnp.float32), src[2 * i + 1].astype(jnp.float32)
            rotated[2 * i] = (x1 * cos - x2 * sin).astype(src[0].dtype)
            rotated[2 * i + 1] = (x2 * cos + x1 * sin).astype(src[0].dtype)
    cache_rows = pl.ds(wat_ref[b] + t0, bt)

    @pl.when(n < H)
    def _():
        for t, x in zip(tiles, rotated):
            plgpu.store(_at(q_ref, (b, rows, n), 0, t), x, mask=rows_ok)

    def to_cache(ref, scale_ref, head, values):
        if scale_ref is not None:
            values, scale = _quantize(values)
            plgpu.store(scale_ref.at[b, head, cache_rows], scale, mask=rows_ok[:, 0])
        for t, x in zip(tiles, values):
            plgpu.store(_at(ref, (b, head, cache_rows), 0, t), x, mask=rows_ok)

    ks_ref, vs_ref = scale_refs if quantized else (None, None)
    pl.when((n >= H) & (n < H + K))(lambda: to_cache(k_ref, ks_ref, n - H, rotated))
    pl.when(n >= H + K)(lambda: to_cache(v_ref, vs_ref, n - H - K, src))


def _quantize(values):
    """Row-wise int8 quantization of a head split into tiles; as quantize_kv on the whole row."""
    xs = [x.astype(jnp.float32) for x in values]
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), axis=1) for x in xs])  # [bt]
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = [jnp.clip(round_half_away(x / scale[:, None]), -127, 127).astype(jnp.int8) for x in xs]
    return q, scale


@functools.partial(jax.jit, static_argnames=(
    "num_heads", "kv_heads", "head_dim", "rot_dim", "layout", "block_t", "interpret"),
    donate_argnames=("k_cache", "v_cache", "k_scale", "v_scale"))
def rotary_cache_write(qkv, k_cache, v_cache, positions, write_at, *, num_heads: int,
                       kv_heads: int, head_dim: int, rot_dim: int, layout: str, inv_freq,
                       k_scale=None, v_scale=None, block_t: int | None = None,
                       interpret: bool = False):
    """Splits the fused qkv, rotates q and k, writes k and v into the caches in place.

    qkv: [B, T, (H + 2 KVH) Dh]; k_cache, v_cache: [B, KVH, S, Dh] (qkv.dtype, or int8 with
    k_scale, v_scale float32 [B, KVH, S]); positions: [B, T] int32; write_at: [B] int32, sequence
    b's tokens go to slots write_at[b] .. write_at[b] + T - 1 (< S). rot_dim: rotated features
    per head (0 or inv_freq None: no rotary); layout: "half" or "interleaved"; inv_freq: float32
    [rot_dim / 2]. Returns (q [B, T, H, Dh], k_cache, v_cache[, k_scale, v_scale]).
    """
    B, T, C = qkv.shape
    H, K, Dh = num_heads, kv_heads, head_dim
    S = k_cache.shape[2]
    assert C == (H + 2 * K) * Dh and rot_dim % 2 == 0 and rot_dim <= Dh, (qkv.shape, rot_dim)
    quantized = k_scale is not None
    has_rotary = bool(rot_dim) and inv_freq is not None
    pair_view = has_rotary and layout == "interleaved"
    view = (lambda x: x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)) if pair_view else (lambda x: x)
    bt = block_t or min(next_pow2(T), 32)
    inputs = [positions.astype(jnp.int32), write_at.astype(jnp.int32)]
    if has_rotary:
        inputs.append(jnp.asarray(inv_freq, jnp.float32))
    inputs += [view(qkv), view(k_cache), view(v_cache)]
    q_shape = (B, T, H, Dh // 2, 2) if pair_view else (B, T, H, Dh)
    out_shape = [jax.ShapeDtypeStruct(q_shape, qkv.dtype)]
    out_shape += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs[-2:]]
    if quantized:
        inputs += [k_scale, v_scale]
        out_shape += [jax.ShapeDtypeStruct((B, K, S), jnp.float32)] * 2
    first_cache = len(inputs) - 2 - 2 * quantized
    aliases = {first_cache + i: 1 + i for i in range(2 + 2 * quantized)}
    kernel = functools.partial(_rotary_kernel, H=H, K=K, Dh=Dh, bt=bt, T=T, rot_dim=rot_dim,
                               layout=layout, has_rotary=has_rotary, quantized=quantized)
    outs = pl.pallas_call(
        kernel,
        grid=(B, pl.cdiv(T, bt), H + 2 * K),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=1 if bt * Dh <= 2048 else 4, num_stages=1),
        interpret=interpret,
        name="rotary_cache_write",
    )(*inputs)
    q, k_new, v_new = (x.reshape(*x.shape[:-2], Dh) if pair_view else x for x in outs[:3])
    return (q, k_new, v_new, *outs[3:])
