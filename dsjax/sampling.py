"""Choosing the next token on the device: logits processors and sampling, per row.

Every setting is a traced per-row array (`Sampling`, [B] or [B, K]), so one batch mixes
settings (a greedy row next to a sampled one, a penalised row next to a plain one) and new values
never recompile. Which processors exist in the program at all is static (`Features`): a call that
uses none of them runs exactly the plain argmax / temperature-top-k-top-p program.

The processors and their order are transformers' (`GenerationMixin._get_logits_processor`),
with OpenAI's presence and frequency penalties next to the repetition penalty:

    logit bias (additive; bad single tokens as -inf)  -> repetition_penalty (prompt + output)
    -> presence / frequency penalties (output only)  -> no_repeat_ngram_size
    -> bad token sequences  -> min_new_tokens (EOS masked)
    sampling rows only: temperature -> top_k -> top_p -> min_p -> draw

Processors that look at earlier tokens read a `History`: each row's prompt followed by its
generated tokens, one row of the cache's capacity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Features:
    """Which processors the program contains (static: part of the jit key)."""

    do_sample: bool = False  # some row samples (the others take the argmax)
    penalties: bool = False  # repetition / presence / frequency
    ngram: int = 0  # the largest no_repeat_ngram_size of the batch (bucketed); 0: off
    min_new: bool = False  # min_new_tokens / min_length
    bias: bool = False  # logit bias and single-token bad words
    bad_seqs: bool = False  # bad words of two or more tokens
    min_p: bool = False
    stop_strings: bool = False

    @property
    def history(self) -> bool:
        """Whether the program keeps each row's tokens (prompt + output) as it decodes."""
        return self.penalties or self.ngram > 0 or self.bad_seqs or self.stop_strings

    @property
    def plain(self) -> bool:
        """No logits processor: the token is chosen from the model's logits directly."""
        return not (self.penalties or self.ngram or self.min_new or self.bias or self.bad_seqs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per-row values (traced). Off values: temperature 1, top_k 0, top_p 1, min_p 0,
    repetition_penalty 1, presence / frequency 0, no_repeat_ngram 0, min_new 0."""

    do_sample: jax.Array  # [B] bool
    temperature: jax.Array  # [B] float32 (> 0)
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32 (> 0)
    presence_penalty: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32
    no_repeat_ngram: jax.Array  # [B] int32
    min_new: jax.Array  # [B] int32: EOS is masked while fewer new tokens exist
    eos: jax.Array  # [B, E] int32, -1 padded: the ids min_new masks
    bias_ids: jax.Array  # [B, K] int32, -1 padded
    bias: jax.Array  # [B, K] float32 (-inf: a banned token)
    bad_seqs: jax.Array  # [B, S, W] int32: a banned last token after its prefix, -1 left padded

    def rows(self, index) -> Sampling:
        """The rows `index` (e.g. each prompt's row repeated for n samples or beams)."""
        return jax.tree.map(lambda x: x[index], self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class History:
    """Each row's tokens: the prompt, then the generated tokens; positions >= length unused."""

    tokens: jax.Array  # [B, C] int32
    length: jax.Array  # [B] int32
    prompt_len: jax.Array  # [B] int32

    def append(self, tok, ok=True) -> History:
        """tok [B] written at each row's length (rows where ok is False are left as they are)."""
        B, C = self.tokens.shape
        at = jnp.minimum(self.length, C - 1)
        written = self.tokens.at[jnp.arange(B), at].set(tok)
        ok = jnp.broadcast_to(ok, (B,))
        return History(jnp.where(ok[:, None], written, self.tokens),
                       self.length + ok.astype(jnp.int32), self.prompt_len)

    def rows(self, index) -> History:
        return jax.tree.map(lambda x: x[index], self)


def _token_mask(tokens, valid, V):
    """[B, V] bool: the tokens [B, N] (where valid) present per row."""
    B = tokens.shape[0]
    idx = jnp.where(valid, tokens, V)  # out of range: dropped
    return jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], idx].set(True, mode="drop")


def _token_counts(tokens, valid, V):
    B = tokens.shape[0]
    idx = jnp.where(valid, tokens, V)
    return jnp.zeros((B, V), jnp.int32).at[jnp.arange(B)[:, None], idx].add(1, mode="drop")


def penalize(logits, s: Sampling, h: History):
    """HF's repetition penalty over prompt + output (a seen token's logit divided by the penalty
    if positive, multiplied if negative), then OpenAI's presence and frequency penalties over
    the output (logit - presence * [count > 0] - frequency * count)."""
    V = logits.shape[-1]
    pos = jnp.arange(h.tokens.shape[1])[None]
    seen = _token_mask(h.tokens, pos < h.length[:, None], V)
    p = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
    counts = _token_counts(h.tokens, (pos >= h.prompt_len[:, None]) & (pos < h.length[:, None]), V)
    return (logits - s.presence_penalty[:, None] * (counts > 0)
            - s.frequency_penalty[:, None] * counts)


def ban_repeated_ngrams(logits, s: Sampling, h: History, max_n: int):
    """HF's no_repeat_ngram_size n: the token that would complete an n-gram already present in
    the row's tokens is banned. Token q (1 <= ... < length) is banned when the n - 1 tokens
    before it equal the row's last n - 1 tokens (for n = 1: every token seen)."""
    B, C = h.tokens.shape
    n = s.no_repeat_ngram[:, None]
    q = jnp.arange(C)[None]
    ok = (n > 0) & (q >= n - 1) & (q < h.length[:, None])
    for k in range(max_n - 1):  # the k-th token before q against the k-th before the end
        before = jnp.take_along_axis(h.tokens, jnp.clip(q - 1 - k, 0, C - 1), axis=1)
        last = jnp.take_along_axis(h.tokens, jnp.clip(h.length - 1 - k, 0, C - 1)[:, None], axis=1)
        ok &= (k >= n - 1) | (before == last)
    return jnp.where(_token_mask(h.tokens, ok, logits.shape[-1]), -jnp.inf, logits)


def ban_sequences(logits, s: Sampling, h: History):
    """HF's bad_words_ids of two or more tokens: a sequence's last token is banned when the row
    ends with the rest of it. bad_seqs [B, S, W]: prefix right-aligned in columns 0..W-2 (-1
    padding on the left), the banned token in column W-1 (-1: no sequence)."""
    B, C = h.tokens.shape
    W = s.bad_seqs.shape[-1]
    back = h.length[:, None] - (W - 1) + jnp.arange(W - 1)[None]  # [B, W-1] positions
    tail = jnp.where(back >= 0, jnp.take_along_axis(h.tokens, jnp.clip(back, 0, C - 1), axis=1), -2)
    prefix = s.bad_seqs[..., :-1]
    match = jnp.all((prefix == -1) | (prefix == tail[:, None, :]), axis=-1)  # [B, S]
    last = s.bad_seqs[..., -1]
    return jnp.where(_token_mask(last, match & (last >= 0), logits.shape[-1]), -jnp.inf, logits)


def add_bias(logits, s: Sampling):
    """Sparse per-row logit bias (OpenAI's logit_bias; -inf entries ban a token)."""
    B, V = logits.shape
    idx = jnp.where(s.bias_ids >= 0, s.bias_ids, V)
    return logits.at[jnp.arange(B)[:, None], idx].add(s.bias, mode="drop")


def mask_eos(logits, s: Sampling, new_tokens):
    """EOS ids get -inf while a row has fewer than min_new new tokens."""
    early = (new_tokens < s.min_new)[:, None]
    eos = _token_mask(s.eos, (s.eos >= 0) & early, logits.shape[-1])
    return jnp.where(eos, -jnp.inf, logits)


def process(logits, s: Sampling, f: Features, h: History | None, new_tokens):
    """The logits processors (module docstring order) on logits [B, V] float32; new_tokens [B]:
    tokens each row has generated so far."""
    if f.bias:
        logits = add_bias(logits, s)
    if f.penalties:
        logits = penalize(logits, s, h)
    if f.ngram:
        logits = ban_repeated_ngrams(logits, s, h, f.ngram)
    if f.bad_seqs:
        logits = ban_sequences(logits, s, h)
    if f.min_new:
        logits = mask_eos(logits, s, new_tokens)
    return logits


def warp(logits, s: Sampling, f: Features, min_keep: int = 1):
    """HF's warpers for sampling: temperature, then top-k, then top-p, then min-p (each keeps
    at least min_keep tokens); removed tokens get -inf."""
    V = logits.shape[-1]
    logits = logits / s.temperature[:, None]
    desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where(s.top_k > 0, jnp.clip(jnp.maximum(s.top_k, min_keep), 1, V), V)[:, None]
    rank = jnp.arange(V)[None]
    desc = jnp.where(rank < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(((mass_before < s.top_p[:, None]) | (rank < min_keep)) & (rank < k), axis=-1)
    threshold = jnp.take_along_axis(desc, (keep - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    if f.min_p:
        probs = jax.nn.softmax(logits, axis=-1)
        floor = s.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
        kth = jax.lax.top_k(logits, min_keep)[0][:, min_keep - 1:min_keep]
        logits = jnp.where((probs >= floor) | (logits >= kth), logits, -jnp.inf)
    return logits


def choose(logits, key, s: Sampling, f: Features, h: History | None, new_tokens):
    """logits [B, V] float32 -> tokens [B] int32: processed, then the argmax (greedy rows) or a
    draw from the warped distribution (sampling rows); key: one PRNG key, or one per row [B]."""
    logits = process(logits, s, f, h, new_tokens)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not f.do_sample:
        return best
    warped = warp(logits, s, f)
    if key.shape:  # one key per row (the serving engine: each request its own stream)
        drawn = jax.vmap(lambda k, x: jax.random.categorical(k, x))(key, warped)
    else:
        drawn = jax.random.categorical(key, warped, axis=-1)
    return jnp.where(s.do_sample, drawn.astype(jnp.int32), best)
