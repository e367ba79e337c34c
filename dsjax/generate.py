"""Prefill + decode loop under one jit.

The jitted functions are pure: (graphdef, params, arrays) in, arrays out. Prompts arrive
right-padded to a bucketed length with per-sequence lengths, so sequence b's token t sits in
cache slot t whatever the other prompts look like: a padded batch gives each prompt's own tokens.
The token choice (dsjax.sampling: logits processors, sampling) runs on the device with per-row
settings; the host sees the result once, after the loop (a streaming program also hands each
step's tokens to the host as they are made: dsjax.streaming).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax import sampling as smp
from dsjax.cache import KVCache
from dsjax.policy import ONCE
from dsjax.stop_strings import StopStrings, hit


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Request:
    """One generate call's per-row inputs (traced: new values do not recompile). Arrays of one
    row broadcast to every row."""

    limit: jax.Array  # [B] int32: at most this many new tokens per row
    sampling: smp.Sampling  # per-row settings (dsjax.sampling)
    stop: StopStrings | None = None  # per-row stop strings (features.stop_strings)

    @classmethod
    def greedy(cls, max_new_tokens: int, stop_ids=()) -> Request:
        """Greedy decoding of max_new_tokens per row, stopping at any of stop_ids (-1 entries
        never match: callers keep one shape over different stop sets)."""
        from dsjax.settings import GenerationSettings, sampling_rows

        sampling = sampling_rows([GenerationSettings(max_new_tokens=max_new_tokens)], 1)
        eos = np.asarray([list(stop_ids) or [-1]], np.int32)
        return cls(np.asarray([max_new_tokens], np.int32), dataclasses.replace(sampling, eos=eos))

    def rows(self, index) -> Request:
        """Row `index` of each per-row array (one-row arrays broadcast and stay)."""
        pick = lambda x: x[index] if x.shape[0] > 1 else x  # noqa: E731
        stop = self.stop.rows(index) if self.stop is not None else None
        return Request(pick(self.limit), jax.tree.map(pick, self.sampling), stop)


def pick_token(logits, key, done, sampling: smp.Sampling, pad_id, do_sample: bool,
               return_logprobs: bool, features: smp.Features | None = None, history=None,
               new_tokens=None):
    """logits [B, V] -> (token [B], its log-probability under the model [B]); finished rows
    get pad_id and 0."""
    features = features or smp.Features(do_sample=do_sample)
    tok = smp.choose(logits, key, sampling, features, history, new_tokens)
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.zeros(tok.shape, jnp.float32)
    if return_logprobs:
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
    return tok, jnp.where(done, 0.0, lp)


def is_stop_token(tok, stop_ids):
    """tok [B], stop_ids [E] or [B, E] (-1 never matches) -> [B] bool."""
    stop_ids = jnp.broadcast_to(stop_ids, (tok.shape[0], stop_ids.shape[-1]))
    return jnp.any(tok[:, None] == stop_ids, axis=-1)


def prefill(model, tokens, lengths, cache: KVCache):
    """Runs the prompts [B, T] into an empty cache; returns last-token logits [B, V]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, cache = model(tokens, positions, cache, from_start=True)
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
    history: smp.History | None  # prompt + new tokens per row (features.history)

    def replace(self, **changes) -> DecodeState:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Program:
    """The static choices of one generate program (part of the jit key)."""

    capacity: int
    features: smp.Features = smp.Features()
    return_logprobs: bool = False
    int8_cache: bool = False
    samples: int = 1  # rows per prompt after the prefill (num_return_sequences)
    stream: bool = False  # hand each step's tokens to the host as they are made (streaming)


def _pick(logits, key, done, req: Request, pad_id, prog: Program,
          history, count):
    tok, lp = pick_token(logits, key, done, req.sampling, pad_id, prog.features.do_sample,
                         prog.return_logprobs, prog.features, history, count)
    stopped = is_stop_token(tok, req.sampling.eos)
    if history is not None:
        history = history.append(tok, ~done)
        if prog.features.stop_strings:
            stopped |= hit(req.stop, history.tokens, history.length)
    return tok, lp, stopped, history


def per_sample(req: Request, prog: Program) -> Request:
    """The request of each prompt's prog.samples rows (one row per prompt given)."""
    if prog.samples == 1:
        return req
    return req.rows(jnp.repeat(jnp.arange(req.limit.shape[0]), prog.samples))


def start(model, tokens, lengths, key, pad_id, req: Request, prog: Program) -> DecodeState:
    """Prefill (each prompt once) and the first token; with prog.samples = n each prompt's row
    (its cache and history) is repeated n times after the prefill. req: per_sample's."""
    B, T = tokens.shape
    cache = KVCache.create(model.cfg, B, prog.capacity, model.embed.embedding.dtype,
                           quantized=prog.int8_cache)
    logits, cache = prefill(model, tokens, jnp.maximum(lengths, 1), cache)
    history = None
    if prog.features.history:
        hist = jnp.zeros((B, prog.capacity), jnp.int32).at[:, :T].set(tokens)
        history = smp.History(hist, lengths, lengths)
    if prog.samples > 1:
        index = jnp.repeat(jnp.arange(B), prog.samples)
        logits, cache, lengths, tokens = (jax.tree.map(lambda x: x[index], t)
                                          for t in (logits, cache, lengths, tokens))
        history = history.rows(index) if history is not None else None
        B = B * prog.samples
    filler = lengths == 0
    key, sub = jax.random.split(key)
    count = jnp.zeros((B,), jnp.int32)
    tok, lp, stopped, history = _pick(logits, sub, filler, req, pad_id, prog, history, count)
    count = (~filler).astype(jnp.int32)
    return DecodeState(
        step=jnp.int32(1), token=tok, done=filler | stopped | (count >= req.limit), count=count,
        out=jnp.full((B, prog.capacity), pad_id, jnp.int32).at[:, 0].set(tok),
        out_lp=jnp.zeros((B, prog.capacity), jnp.float32).at[:, 0].set(lp), cache=cache,
        key=key, history=history)


def advance(model, s: DecodeState, pad_id, req: Request, prog: Program) -> DecodeState:
    """One decode step: every row's next token (finished rows write pad_id and stay done)."""
    logits, cache = decode_step(model, s.token, s.cache)
    key, sub = jax.random.split(s.key)
    tok, lp, stopped, history = _pick(logits, sub, s.done, req, pad_id, prog, s.history,
                                      s.count)
    count = s.count + (~s.done).astype(jnp.int32)
    return s.replace(
        step=s.step + 1, token=tok, done=s.done | stopped | (count >= req.limit), count=count,
        out=jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.step)),
        out_lp=jax.lax.dynamic_update_slice(s.out_lp, lp[:, None], (0, s.step)),
        cache=cache, key=key, history=history)


def run_until(model, s: DecodeState, stop_step, pad_id, req: Request, prog: Program,
              stream_id=None):
    """Decode steps while some row runs and step < stop_step (with prog.stream, each step's
    tokens go to the host's stream `stream_id` as they are made)."""
    def body(s):
        s = advance(model, s, pad_id, req, prog)
        if prog.stream:
            emit(stream_id, s)
        return s
    return jax.lax.while_loop(lambda s: (s.step < stop_step) & ~jnp.all(s.done), body, s)


STREAMS: dict = {}  # stream id -> callable(tokens [B], counts [B], done [B]) on the host


def emit(stream_id, s: DecodeState) -> None:
    """Hands the last token, the counts and the done flags of every row to the host (an
    ordered callback: the steps arrive in order; only programs built with prog.stream have
    one)."""
    jax.experimental.io_callback(lambda i, *rows: STREAMS[int(i)](*rows), None, stream_id,
                                 s.token, s.count, s.done, ordered=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "prog"))
def generate(graphdef, params, tokens, lengths, key, pad_id, req: Request, stream_id=None, *,
             prog: Program):
    """Prefill + `lax.while_loop` decode.

    tokens [B, T] right-padded prompts, lengths [B] (0: a filler row that only pads the batch
    to its bucket: finished from the start, so it never holds up an early stop); pad_id: []
    int32; req: per-row limits, settings and stop strings. Returns (new tokens [B*n, capacity]
    padded with pad_id, count [B*n] of tokens generated including the stop token, logprobs
    [B*n, capacity]), n = prog.samples rows per prompt.
    """
    ONCE.new_program()
    model = nnx.merge(graphdef, params)
    req = per_sample(req, prog)
    s = start(model, tokens, lengths, key, pad_id, req, prog)
    if prog.stream:
        emit(stream_id, s)
    final = run_until(model, s, jnp.max(req.limit), pad_id, req, prog, stream_id)
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
