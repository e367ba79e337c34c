"""The generic model's cache path against its own full-sequence path, for the ModelConfig
features whose HF parity arrives with the family issue (ALiBi, windows, parallel residual,
interleaved partial rotary, post-LN). HF parity of GPT-2 and LLaMA is in tests/converters."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax import generate as gen
from dsjax.cache import KVCache
from dsjax.config import ModelConfig, RopeScaling
from dsjax import model as model_lib
from dsjax.model import Transformer
from dsjax.policy import ONCE
from dsjax.positions import alibi_slopes

BASE = ModelConfig(family="test", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                   intermediate_size=48, max_position_embeddings=64)
FEATURES = {
    "alibi_embed_norm": dict(positions="alibi", embedding_norm=True),
    "window_local_layers": dict(sliding_window=3, local_layers=(1,), positions="rotary"),
    "gptj_like": dict(positions="rotary", rotary_dim=4, rotary_layout="interleaved",
                      parallel_residual=True, shared_norm=True, qkv_bias=False),
    "neox_like": dict(positions="rotary", rotary_dim=2, parallel_residual=True),
    "post_ln_relu_offset": dict(norm_position="post", activation="relu", position_offset=2),
    "gemma_like": dict(norm="rmsnorm", norm_plus_one=True, activation="gelu_tanh", gated_mlp=True,
                       positions="rotary", num_kv_heads=1, embed_scale=32 ** 0.5),
}


# The model split once and jitted (graphdef static): op by op, every small op compiles alone.
@functools.partial(jax.jit, static_argnums=0)
def _full(graphdef, state, tokens, positions):
    model = nnx.merge(graphdef, state)
    return model.logits(model(tokens, positions)[0])


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, tokens, lengths, cache):
    return gen.prefill(nnx.merge(graphdef, state), tokens, lengths, cache)


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(graphdef, state, tokens, cache):
    return gen.decode_step(nnx.merge(graphdef, state), tokens, cache)


@pytest.mark.parametrize("name", FEATURES)
def test_cached_decode_equals_full_forward(name):
    cfg = dataclasses.replace(BASE, **FEATURES[name])
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    full = _full(graphdef, state, tokens, positions)
    cache = KVCache.create(cfg, 2, 16, jnp.float32)
    lengths = jnp.array([6, 6], jnp.int32)
    logits, cache = _prefill(graphdef, state, tokens[:, :6], lengths, cache)
    steps = [logits]
    for t in range(6, 10):
        logits, cache = _decode_step(graphdef, state, tokens[:, t], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps[:-1], 1), full[:, 5:9], atol=2e-5, rtol=2e-5)
    assert np.isfinite(np.asarray(full)).all()


def test_blocks_of_one_structure_trace_once_and_inline(monkeypatch):
    """Five layers, one of them windowed: the forward traces two blocks (the four alike share
    one nested program), and the compiled program has no call left (XLA inlined it)."""
    cfg = dataclasses.replace(BASE, hidden_size=24, num_layers=5, sliding_window=3,
                              local_layers=(1,), positions="rotary")
    traced = []
    block_call = model_lib.Block.__call__
    monkeypatch.setattr(model_lib.Block, "__call__",
                        lambda self, *a, **k: traced.append(self.attn.window) or
                        block_call(self, *a, **k))
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((1, 5), jnp.int32)
    positions = jnp.arange(5)[None]
    lowered = _full.lower(graphdef, state, tokens, positions)
    assert sorted(traced, key=str) == [3, None]
    assert " call(" not in lowered.compile().as_text()


def test_a_program_that_reuses_a_block_trace_still_logs_its_kernels(caplog):
    """The second program's blocks come from the nested jit's cache (nothing traces them
    again): their kernel choices are logged for it all the same."""
    cfg = dataclasses.replace(BASE, hidden_size=40, num_layers=3)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens, positions = jnp.zeros((1, 5), jnp.int32), jnp.arange(5)[None]
    hidden = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p)[0])
    for lower in (lambda: _full.lower(graphdef, state, tokens, positions),
                  lambda: hidden.lower(state, tokens, positions)):
        ONCE.new_program()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dsjax.ops"):
            lower()
        assert "ops.attention runs the 'xla' implementation" in caplog.messages


def test_window_masks_distant_tokens():
    cfg = dataclasses.replace(BASE, sliding_window=2, positions="rotary")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    a = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    b = a.at[0, 0].set(9)  # differs only 5 positions before the last token
    pos = jnp.arange(6)[None]
    la, lb = (_full(*nnx.split(model), x, pos)[0] for x in (a, b))
    # with a window of 2 and 2 layers, the last token sees at most 2 tokens back
    np.testing.assert_allclose(la[-1], lb[-1], atol=1e-6)
    assert not np.allclose(la[1], lb[1])


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2 ** -(i + 1) for i in range(8)])
    assert len(alibi_slopes(12)) == 12  # non power of two: BLOOM's interleaved extras


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(BASE, num_kv_heads=3)
    with pytest.raises(ValueError, match="activation"):
        dataclasses.replace(BASE, activation="swishy")
    with pytest.raises(ValueError, match="rotary_dim"):
        dataclasses.replace(BASE, positions="rotary", rotary_dim=3)
    with pytest.raises(ValueError, match="shared_norm"):
        dataclasses.replace(BASE, shared_norm=True)
    cfg = dataclasses.replace(BASE, rope_scaling=RopeScaling("linear", 2.0), local_layers=None)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_fully_masked_rows_are_finite():
    from dsjax.ops import attention_xla

    q = jnp.ones((1, 2, 2, 4))
    k = v = jnp.ones((1, 2, 3, 4))
    out = jax.jit(functools.partial(attention_xla, scale=0.5, causal=True, window=None,
                                    alibi_slopes=None))(
        q, k, v, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), bool))
    assert np.isfinite(np.asarray(out)).all()
