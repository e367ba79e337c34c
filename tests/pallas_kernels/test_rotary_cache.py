"""Rotary + KV-cache-write kernel (interpret mode) against its reference and the model's XLA path
(dsjax.ops.write_kv_xla: split, rotate, transpose, dsjax.cache.write)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import ops
from dsjax.config import ModelConfig
from dsjax.model import rotary
from dsjax.positions import rope_inv_freq
from pallas_kernels import rotary_cache as rc
from dsjax.numerics import quantize_kv

S = 12  # cache slots


def config(H, K, Dh, rot_dim, layout):
    return ModelConfig(family="test", vocab_size=8, hidden_size=H * Dh, num_layers=1,
                       num_heads=H, intermediate_size=8, num_kv_heads=K, head_dim=Dh,
                       positions="rotary" if rot_dim else "alibi", rotary_dim=rot_dim or None,
                       rotary_layout=layout)


@functools.partial(jax.jit, static_argnames=("cfg",))
def xla_path(qkv, k_cache, v_cache, positions, write_at, cfg):
    """What dsjax.model.Attention runs with the "xla" kernels before attending."""
    q, (k, v) = ops.write_kv_xla(qkv, (k_cache, v_cache), positions, write_at,
                                 heads=(cfg.num_heads, cfg.kv_heads, cfg.dim_head),
                                 rotary=rotary(cfg))
    return q, k, v


reference = jax.jit(rc.rotary_cache_write_reference, static_argnames=(
    "num_heads", "kv_heads", "head_dim", "rot_dim", "layout"))


def make(B, T, H, K, Dh, dtype, cache_dtype, seed=0):
    """qkv [B, T, (H + 2K) Dh], non-zero caches, positions and per-row write offsets."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    qkv = jax.random.normal(kq, (B, T, (H + 2 * K) * Dh), jnp.float32).astype(dtype)
    k_cache = jax.random.normal(kk, (B, K, S, Dh), jnp.float32).astype(cache_dtype)
    v_cache = jax.random.normal(kv, (B, K, S, Dh), jnp.float32).astype(cache_dtype)
    write_at = jnp.asarray([S - T, 0, 3][:B], jnp.int32)  # the last slots, the first, between
    positions = (write_at[:, None] + jnp.arange(T) + jnp.asarray([0, 7, 100][:B])[:, None])
    return qkv, k_cache, v_cache, positions.astype(jnp.int32), write_at


def assert_same(got, want, exact):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if exact:
            np.testing.assert_array_equal(g, w)
        else:  # bf16 / fp16: one rounding step of the output dtype
            np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout, H, K, Dh, rot_dim, T, dtype, block_t", [
    ("half", 4, 4, 64, 64, 1, jnp.float32, None),  # LLaMA-like MHA, one decode token
    ("half", 4, 2, 128, 32, 5, jnp.bfloat16, 2),  # GPT-NeoX: rot_dim = Dh / 4, GQA; T blocks
    ("interleaved", 2, 1, 256, 64, 3, jnp.float32, None),  # GPT-J: 64 of 256, MQA
    ("interleaved", 4, 2, 80, 80, 1, jnp.float16, None),  # Dh 80, rot_dim / 2 = 40: masked
    ("half", 2, 2, 64, 0, 3, jnp.bfloat16, None),  # no rotary (ALiBi / learned positions)
])
def test_matches_reference_and_model_path(layout, H, K, Dh, rot_dim, T, dtype, block_t):
    cfg = config(H, K, Dh, rot_dim, layout)
    inv_freq = rope_inv_freq(cfg) if rot_dim else None
    qkv, kc, vc, pos, wat = make(3, T, H, K, Dh, dtype, dtype)
    kw = dict(num_heads=H, kv_heads=K, head_dim=Dh, rot_dim=rot_dim, layout=layout,
              inv_freq=inv_freq)
    want = reference(qkv, kc, vc, pos, wat, **kw)
    model = xla_path(qkv, kc, vc, pos, wat, cfg)
    got = rc.rotary_cache_write(qkv, kc.copy(), vc.copy(), pos, wat, **kw, block_t=block_t,
                                interpret=True)  # the caches are donated
    assert len(got) == 3
    assert_same(got, want, exact=True)
    assert_same(got, model, exact=dtype == jnp.float32)


def test_int8_cache():
    H, K, Dh, rot_dim, T = 4, 2, 64, 32, 3
    cfg = config(H, K, Dh, rot_dim, "half")
    qkv, _, _, pos, wat = make(3, T, H, K, Dh, jnp.bfloat16, jnp.bfloat16, seed=1)
    kc, ks = quantize_kv(make(3, T, H, K, Dh, jnp.bfloat16, jnp.bfloat16, seed=2)[1])
    vc, vs = quantize_kv(make(3, T, H, K, Dh, jnp.bfloat16, jnp.bfloat16, seed=3)[2])
    kw = dict(num_heads=H, kv_heads=K, head_dim=Dh, rot_dim=rot_dim, layout="half",
              inv_freq=rope_inv_freq(cfg))
    want = reference(qkv, kc, vc, pos, wat, **kw, k_scale=ks, v_scale=vs)
    got = rc.rotary_cache_write(qkv, kc.copy(), vc.copy(), pos, wat, **kw, k_scale=ks.copy(),
                                v_scale=vs.copy(), interpret=True)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.int8, jnp.int8, jnp.float32, jnp.float32]
    assert_same(got, want, exact=True)
    # dequantized, the new rows are the bf16 rows of the model path to within half a step
    _, k_bf16, v_bf16 = xla_path(qkv, kc.astype(jnp.bfloat16), vc.astype(jnp.bfloat16), pos,
                                 wat, cfg)
    for cache, scale, full in ((got[1], got[3], k_bf16), (got[2], got[4], v_bf16)):
        for b, w in enumerate(np.asarray(wat)):
            rows = slice(w, w + T)
            deq = np.asarray(cache[b, :, rows], np.float32) * np.asarray(scale[b, :, rows])[..., None]
            err = np.abs(deq - np.asarray(full[b, :, rows], np.float32))
            assert np.all(err <= np.asarray(scale[b, :, rows])[..., None] / 2 + 1e-6)
