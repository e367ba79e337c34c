"""Prefill + decode loop under one jit, and sampling.

The jitted functions are pure: (graphdef, params, arrays) in, arrays out. Prompts arrive
right-padded to a bucketed length with per-sequence lengths, so sequence b's token t sits in
cache slot t whatever the other prompts look like: a padded batch gives each prompt's own tokens.
Sampling runs on the device; the host sees the result once, after the loop.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax import validate
from dsjax.cache import KVCache
from dsjax.policy import ONCE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per-call sampling values (traced: changing them does not recompile)."""

    temperature: jax.Array  # [] float32
    top_k: jax.Array  # [] int32, 0 = off
    top_p: jax.Array  # [] float32, 1 = off

    @classmethod
    def make(cls, temperature=1.0, top_k=0, top_p=1.0) -> Sampling:
        temperature = validate.real("temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (do_sample=False is greedy), "
                             f"got {temperature}")
        top_k = validate.integer("top_k", top_k, low=0)
        top_p = validate.real("top_p", top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def sample(logits, key, sampling: Sampling, do_sample: bool):
    """logits [B, V] float32 -> tokens [B] int32. Temperature, then top-k, then top-p (HF order)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    logits = logits / sampling.temperature
    desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, V), V)
    desc = jnp.where(jnp.arange(V) < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum((mass_before < sampling.top_p) & (jnp.arange(V) < k), axis=-1)  # >= 1
    threshold = jnp.take_along_axis(desc, (keep - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def pick_token(logits, key, done, sampling: Sampling, pad_id, do_sample: bool,
               return_logprobs: bool):
    """logits [B, V] -> (token [B], its log-probability [B]); finished rows get pad_id and 0."""
    tok = jnp.where(done, pad_id, sample(logits, key, sampling, do_sample))
    lp = jnp.zeros(tok.shape, jnp.float32)
    if return_logprobs:
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
    return tok, jnp.where(done, 0.0, lp)


def is_stop_token(tok, stop_ids):
    """tok [B], stop_ids [E] (-1 never matches) -> [B] bool."""
    return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)


def prefill(model, tokens, lengths, cache: KVCache):
    """Runs the prompts [B, T] into an empty cache; returns last-token logits [B, V]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, cache = model(tokens, positions, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return model.logits(last), cache.replace(lengths=lengths)


def decode_step(model, tokens, cache: KVCache):
    """One new token per sequence [B] at position cache.lengths; returns logits [B, V]."""
    hidden, cache = model(tokens[:, None], cache.lengths[:, None], cache)
    return model.logits(hidden[:, 0]), cache.replace(lengths=cache.lengths + 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The decode loop's carry: B rows, C = capacity."""

    step: jax.Array  # [] int32, the index of the next new token
    token: jax.Array  # [B] int32, the last token picked
    done: jax.Array  # [B] bool, stopped (or a filler row)
    count: jax.Array  # [B] int32, tokens generated so far (the stop token included)
    out: jax.Array  # [B, C] int32 new tokens, pad_id after each row's end
    out_lp: jax.Array  # [B, C] float32 their log-probabilities
    cache: KVCache
    key: jax.Array  # the PRNG key

    def replace(self, **changes) -> DecodeState:
        return dataclasses.replace(self, **changes)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "do_sample", "return_logprobs",
                                             "int8_cache"))
def generate(graphdef, params, tokens, lengths, key, max_new_tokens, stop_ids, pad_id,
             sampling: Sampling, *, capacity: int, do_sample: bool, return_logprobs: bool,
             int8_cache: bool = False):
    """Prefill + `lax.while_loop` decode.

    tokens [B, T] right-padded prompts, lengths [B] (0: a filler row that only pads the batch
    to its bucket: finished from the start, so it never holds up an early stop); max_new_tokens,
    pad_id: [] int32; stop_ids [E] int32 (-1 entries never match); int8_cache: K/V stored as
    int8 with per-token scales. Returns (new tokens [B, capacity] padded with pad_id, count [B]
    of tokens generated including the stop token, logprobs [B, capacity]).
    """
    ONCE.new_program()
    model = nnx.merge(graphdef, params)
    B = tokens.shape[0]
    cache = KVCache.create(model.cfg, B, capacity, model.embed.embedding.dtype,
                           quantized=int8_cache)
    filler = lengths == 0
    logits, cache = prefill(model, tokens, jnp.maximum(lengths, 1), cache)

    def pick(logits, key, done):
        return pick_token(logits, key, done, sampling, pad_id, do_sample, return_logprobs)

    key, sub = jax.random.split(key)
    tok, lp = pick(logits, sub, filler)
    state = DecodeState(
        step=jnp.int32(1), token=tok, done=filler | is_stop_token(tok, stop_ids),
        count=(~filler).astype(jnp.int32),
        out=jnp.full((B, capacity), pad_id, jnp.int32).at[:, 0].set(tok),
        out_lp=jnp.zeros((B, capacity), jnp.float32).at[:, 0].set(lp), cache=cache, key=key)

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState):
        logits, cache = decode_step(model, s.token, s.cache)
        key, sub = jax.random.split(s.key)
        tok, lp = pick(logits, sub, s.done)
        return s.replace(
            step=s.step + 1, token=tok, done=s.done | is_stop_token(tok, stop_ids),
            count=s.count + (~s.done).astype(jnp.int32),
            out=jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.step)),
            out_lp=jax.lax.dynamic_update_slice(s.out_lp, lp[:, None], (0, s.step)),
            cache=cache, key=key)

    final = jax.lax.while_loop(cond, body, state)
    return final.out, final.count, final.out_lp


@functools.partial(jax.jit, static_argnames=("graphdef",))
def forward(graphdef, params, tokens, attention_mask):
    """Full-sequence logits [B, T, V] (float32) with an HF-style padding mask [B, T] (any side):
    positions count real tokens only, padded keys are masked."""
    ONCE.new_program()
    model = nnx.merge(graphdef, params)
    mask = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    hidden, _ = model(tokens, positions, None, key_mask=mask)
    return model.logits(hidden)
