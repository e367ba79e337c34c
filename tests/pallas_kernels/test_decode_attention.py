"""Decode attention kernel (interpret mode) against its reference and dsjax.ops.attention_xla."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import numerics
from dsjax.ops import attention_xla
from pallas_kernels import decode_attention as da
from pallas_kernels.decode_attention import BlockSizes, decode_attention, num_splits_for

SMALL = BlockSizes(block_k=16, num_splits=3)  # S = 37: a ragged last block, several splits
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


# Everything jitted, each test's kernel and references in one program: op-by-op dispatch
# compiles every small op separately, which dominates interpret tests.
quantize_kv = jax.jit(numerics.quantize_kv)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 7))
def make(B, H, KVH, S, Dh, dtype, q_pos, seed=0):
    """q [B, H, Dh] and a cache [B, KVH, S, Dh] whose slots after q_pos hold NaN (never written:
    a kernel that reads or weighs them shows it), plus the same cache with those slots zeroed."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, H, Dh), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, KVH, S, Dh), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, KVH, S, Dh), jnp.float32).astype(dtype)
    q_pos = jnp.asarray(q_pos, jnp.int32)
    written = (jnp.arange(S)[None, :] <= q_pos[:, None])[:, None, :, None]
    clean = [jnp.where(written, x, 0).astype(dtype) for x in (k, v)]
    dirty = [jnp.where(written, x, jnp.nan).astype(dtype) for x in (k, v)]
    return q, clean, dirty, q_pos


@functools.partial(jax.jit, static_argnames=("scale", "window"))
def xla(q, k, v, q_pos, **kw):
    """dsjax.ops.attention_xla on the decode problem: one query at q_pos over the whole cache."""
    B, S = k.shape[0], k.shape[2]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    out = attention_xla(q[:, None], k, v, q_pos[:, None], k_pos, jnp.ones((B, S), bool),
                        causal=True, **kw)
    return out[:, 0]


def check(out, want, dtype, tol_scale=1.0):
    assert out.dtype == want.dtype
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, want, atol=TOL[dtype] * tol_scale, rtol=TOL[dtype] * tol_scale)


@pytest.mark.parametrize("H, KVH, Dh, dtype", [
    (4, 4, 64, jnp.float32),  # MHA (GQA ratio 1)
    (8, 2, 80, jnp.bfloat16),  # GQA ratio 4; head dims not powers of two: masked columns
    (8, 1, 96, jnp.float16),  # MQA, ratio 8 (Dh 128: the int8 test)
    (2, 2, 256, jnp.float32),
])
def test_matches_reference_and_xla(H, KVH, Dh, dtype):
    # rows of different lengths: the whole cache, one slot (length 1), a ragged middle
    q, (k, v), (k_nan, v_nan), q_pos = make(3, H, KVH, 37, Dh, dtype, [36, 0, 20])
    kw = dict(scale=Dh**-0.5)

    @jax.jit  # one compile for the three
    def run(q, k, v, k_nan, v_nan, q_pos):
        return (decode_attention(q, k_nan, v_nan, q_pos, **kw, block_sizes=SMALL, interpret=True),
                da.decode_attention_reference(q, k, v, q_pos, **kw),
                xla(q, k, v, q_pos, window=None, alibi_slopes=None, **kw))
    out, ref, via_xla = run(q, k, v, k_nan, v_nan, q_pos)
    check(out, ref, dtype)
    check(out, via_xla, dtype, tol_scale=2)


@pytest.mark.parametrize("window, alibi", [(5, False), (None, True)])
def test_window_and_alibi(window, alibi):
    H, KVH, Dh = 8, 2, 64
    q, (k, v), (k_nan, v_nan), q_pos = make(3, H, KVH, 37, Dh, jnp.float32, [36, 2, 23], seed=1)
    slopes = jnp.linspace(0.05, 1.0, H) if alibi else None
    kw = dict(scale=Dh**-0.5, window=window)

    @jax.jit  # one compile for the three
    def run(q, k, v, k_nan, v_nan, q_pos, slopes):
        return (decode_attention(q, k_nan, v_nan, q_pos, **kw, alibi_slopes=slopes,
                                 block_sizes=SMALL, interpret=True),
                da.decode_attention_reference(q, k, v, q_pos, **kw, alibi_slopes=slopes),
                xla(q, k, v, q_pos, **kw, alibi_slopes=slopes))
    out, ref, via_xla = run(q, k, v, k_nan, v_nan, q_pos, slopes)
    check(out, ref, jnp.float32)
    check(out, via_xla, jnp.float32)


@pytest.mark.parametrize("int8", [False, True])
def test_one_split_normalizes_in_the_kernel(int8):
    """num_splits 1: no combine; the kernel divides by the softmax sum and casts (bf16, GQA,
    a window and ALiBi; rows of lengths 37, 1 and 24)."""
    H, KVH, Dh, window = 8, 2, 80, 9
    q, (k, v), (k_nan, v_nan), q_pos = make(3, H, KVH, 37, Dh, jnp.bfloat16, [36, 0, 23], seed=5)
    slopes = jnp.linspace(0.05, 1.0, H)
    kw = dict(scale=Dh**-0.5, window=window, alibi_slopes=slopes)
    one = BlockSizes(block_k=16, num_splits=1)

    @jax.jit  # one compile for both
    def run(q, k, v, k_nan, v_nan, q_pos):
        if int8:  # NaN slots do not survive quantization: the zeroed cache
            (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
            k_nan, v_nan, kw8 = k, v, dict(k_scale=ks, v_scale=vs)
        else:
            kw8 = {}
        return (decode_attention(q, k_nan, v_nan, q_pos, **kw, **kw8, block_sizes=one,
                                 interpret=True),
                da.decode_attention_reference(q, k, v, q_pos, **kw, **kw8))
    out, ref = run(q, k, v, k_nan, v_nan, q_pos)
    check(out, ref, jnp.bfloat16)


def test_cache_of_one_slot():
    q, (k, v), _, q_pos = make(2, 4, 2, 1, 64, jnp.float32, [0, 0])
    out = decode_attention(q, k, v, q_pos, scale=0.125, interpret=True)
    # one visible key: the output is its value, head by head
    want = jnp.repeat(v[:, :, 0], 2, axis=1).reshape(2, -1)
    check(out, want, jnp.float32)


def test_default_block_sizes_many_splits():
    # bf16 at the default blocks: one row fills most splits, the other leaves all but one empty
    q, (k, v), (k_nan, v_nan), q_pos = make(2, 4, 1, 300, 64, jnp.bfloat16, [299, 3], seed=2)

    @jax.jit  # one compile for both
    def run(q, k, v, k_nan, v_nan, q_pos):
        return (decode_attention(q, k_nan, v_nan, q_pos, scale=0.125, interpret=True),
                da.decode_attention_reference(q, k, v, q_pos, scale=0.125))
    out, ref = run(q, k, v, k_nan, v_nan, q_pos)
    check(out, ref, jnp.bfloat16)


def test_int8_cache_with_window_and_alibi():
    window = 9
    H, KVH, Dh = 8, 2, 128
    q, (k, v), _, q_pos = make(2, H, KVH, 37, Dh, jnp.bfloat16, [36, 17], seed=3)
    (k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
    slopes = jnp.linspace(0.1, 0.9, H)
    kw = dict(scale=Dh**-0.5, window=window)

    @jax.jit  # one compile for the three
    def run(q, k, v, k8, v8, ks, vs, q_pos, slopes):
        return (decode_attention(q, k8, v8, q_pos, **kw, alibi_slopes=slopes, k_scale=ks,
                                 v_scale=vs, block_sizes=SMALL, interpret=True),
                da.decode_attention_reference(q, k8, v8, q_pos, **kw, alibi_slopes=slopes,
                                              k_scale=ks, v_scale=vs),
                da.decode_attention_reference(q, k, v, q_pos, **kw, alibi_slopes=slopes))
    out, ref, full = run(q, k, v, k8, v8, ks, vs, q_pos, slopes)
    check(out, ref, jnp.bfloat16)
    # int8 rounding error against the bf16 cache: |v| ~ N(0, 1), step max|v| / 127 ~ 0.03
    full = np.asarray(full, np.float32)
    err = np.abs(np.asarray(out, np.float32) - full)
    assert err.max() < 0.1 and err.mean() < 0.02, (err.max(), err.mean())


def test_int8_needs_both_scales():
    q, (k, v), _, q_pos = make(1, 2, 1, 8, 64, jnp.float32, [3])
    (k8, ks), (v8, _) = quantize_kv(k), quantize_kv(v)
    with pytest.raises(ValueError, match="int8"):
        decode_attention(q, k8, v8, q_pos, scale=1.0, k_scale=ks, interpret=True)


def test_quantize_kv_round_trip():
    x = jax.random.normal(jax.random.key(4), (3, 5, 64), jnp.float32).at[0, 0].set(0.0)
    q, scale = quantize_kv(x)
    assert q.dtype == jnp.int8 and scale.shape == (3, 5)
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
    err = jnp.abs(q.astype(jnp.float32) * scale[..., None] - x)
    assert bool(jnp.all(err <= scale[..., None] / 2 + 1e-7))
    assert float(scale[0, 0]) == 1.0 and not bool(jnp.any(q[0, 0]))


def test_block_size_defaults():
    assert BlockSizes.default(128, jnp.bfloat16) == BlockSizes(block_k=128)
    assert BlockSizes.default(80, jnp.bfloat16).block_k == 128  # padded to 128
    assert BlockSizes.default(256, jnp.bfloat16).block_k == 64
    assert BlockSizes.default(128, jnp.float32).block_k == 64
    assert BlockSizes.default(256, jnp.float32).block_k == 32
    assert BlockSizes.default(128, jnp.int8).block_k == 128
    assert num_splits_for(1, 8, 32768, 128) == 16  # few sequences: one wave, 132 // 8 splits
    assert num_splits_for(64, 8, 32768, 128) == 1  # 512 programs already
    assert num_splits_for(1, 8, 300, 128) == 3  # never more splits than key blocks
    assert num_splits_for(1, 8, 300, 128, min_split_keys=256) == 2  # at least 256 slots each
    assert num_splits_for(1, 8, 256, 128, min_split_keys=256) == 1
