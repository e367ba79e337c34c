"""A prompt's phase through ops.cache_attention (from_start): the XLA op reads only the prompt's
slots, the Pallas path routes long prompts to cuDNN where it takes the case and says why not
elsewhere. cuDNN itself runs on a GPU only: benchmarks/speed.py (its attention part) times it
and gives its largest difference from jax.nn.dot_product_attention's own cuDNN call."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import ops, pallas_ops
from dsjax.policy import CUDNN_PROMPT_TOKENS, ONCE, KernelPolicy

B, T, S, H, KVH, DH = 2, 24, 40, 4, 2, 16


def _inputs(dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, DH), dtype)
    # the cache past the prompt holds garbage: from_start must not read it, causality hides it
    k, v = (jax.random.normal(x, (B, KVH, S, DH), dtype) for x in (kk, kv))
    return q, (k, v), jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


@pytest.mark.parametrize("window", [None, 7])
def test_from_start_equals_attention_over_the_whole_cache(window):
    q, kv, pos = _inputs()
    attn = dict(scale=DH ** -0.5, window=window, alibi_slopes=None)
    whole = ops.cache_attention_xla(q, kv, pos, **attn)
    start = ops.cache_attention_xla(q, kv, pos, from_start=True, **attn)
    # and against a direct softmax over each row's first T keys, written out here
    k, v = (np.asarray(x[:, :, :T], np.float64) for x in kv)
    qn = np.asarray(q, np.float64).reshape(B, T, KVH, H // KVH, DH)
    s = np.einsum("btkgd,bksd->bkgts", qn, k) * DH ** -0.5
    rel = np.arange(T)[None] - np.arange(T)[:, None]
    mask = (rel <= 0) & ((rel > -window) if window else True)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bkgts,bksd->btkgd", p, v).reshape(B, T, H * DH)
    np.testing.assert_allclose(np.asarray(start), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(start), atol=1e-6)


def test_pallas_policy_defaults_and_checks():
    assert KernelPolicy.pallas().cudnn_prompt_tokens == CUDNN_PROMPT_TOKENS > 0  # on under injection
    assert KernelPolicy().cudnn_prompt_tokens == 0
    with pytest.raises(ValueError, match="cudnn_prompt_tokens must be an integer >= 0"):
        KernelPolicy.pallas(cudnn_prompt_tokens=-1)


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 2, None), (4, 2, 5), (6, 1, 1), (4, 4, 50)])
def test_cudnn_route_slices_lays_out_and_windows_as_the_cache_op(heads, kv_heads, window):
    """The cuDNN route's own work (the cache's first T slots, its [B, T, KVH, Dh] layout, the
    window as local_window_size) through jax.nn.dot_product_attention's XLA implementation
    (the CPU has no cuDNN) equals ops.cache_attention_xla: GQA, MQA and MHA, windows of one
    key, a few and more than the prompt."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (B, T, heads, DH))
    cache = tuple(jax.random.normal(x, (B, kv_heads, S, DH)) for x in (kk, kv))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    got, why = pallas_ops.cudnn_prompt(q, cache, scale=0.3, window=window, implementation="xla")
    want = ops.cache_attention_xla(q, cache, pos, scale=0.3, window=window, alibi_slopes=None)
    assert why is None
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_cudnn_refusals_name_the_reason():
    q, kv, _ = _inputs(jnp.bfloat16)
    policy = KernelPolicy.pallas(cudnn_prompt_tokens=16, interpret=True)

    def why(q=q, kv=kv, alibi=None, from_start=True, policy=policy):
        return pallas_ops.cudnn_refusal(q, kv, alibi_slopes=alibi, from_start=from_start,
                                        policy=policy)
    assert why(from_start=False) == "not a long prompt from the start"
    assert why(policy=KernelPolicy.pallas(cudnn_prompt_tokens=T + 1)) == "not a long prompt from the start"
    assert why(policy=KernelPolicy.pallas(cudnn_prompt_tokens=0)) == "not a long prompt from the start"
    assert "float32" in why(q=q.astype(jnp.float32), kv=tuple(x.astype(jnp.float32) for x in kv))
    assert "q float32, K/V bfloat16" in why(q=q.astype(jnp.float32))
    int8 = (kv[0].astype(jnp.int8), kv[1].astype(jnp.int8), kv[0][..., 0], kv[1][..., 0])
    assert "int8" in why(kv=int8)
    assert why(alibi=jnp.ones(H)) == "ALiBi"
    big = jnp.zeros((B, T, H, 256), jnp.bfloat16), tuple(jnp.zeros((B, KVH, S, 256), jnp.bfloat16)
                                                          for _ in range(2))
    assert why(q=big[0], kv=big[1]) == "head size 256"
    assert why() == "cuDNN needs an NVIDIA GPU"  # interpret mode: the CPU's kernels


def test_pallas_prompt_on_the_cpu_runs_flash_and_says_why(caplog):
    q, kv, pos = _inputs(jnp.bfloat16)
    attn = dict(scale=DH ** -0.5, window=None, alibi_slopes=None, from_start=True)
    policy = KernelPolicy.pallas(cudnn_prompt_tokens=16, interpret=True)
    ONCE.new_program()  # (the kernel log says each message once per traced program)
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        got = ops.cache_attention(q, kv, pos, policy=policy, **attn)
    assert "flash_attention kernel (causal over the cache; not cuDNN: cuDNN needs an NVIDIA GPU)" \
        in caplog.text
    want = ops.cache_attention_xla(q, kv, pos, **attn)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2)


def test_a_call_cudnn_refuses_is_named_not_raised(caplog):
    """Shapes cuDNN refuses as they compile on their own (float32: refused by every cuDNN; on
    the CPU there is none) give the reason, logged as a warning; the caller then runs the flash
    kernel."""
    q, kv, _ = _inputs(jnp.float32)
    ONCE.new_program()
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        out, why = pallas_ops.cudnn_prompt(q, kv, scale=DH ** -0.5, window=None)
    assert out is None and why.startswith("cuDNN refused it: ")
    assert any(r.levelno == logging.WARNING and why in r.getMessage() for r in caplog.records)
