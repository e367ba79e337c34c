"""Beam search on the device, with transformers' semantics (`GenerationMixin._beam_search`).

Per prompt, N running beams and N finished hypotheses. Each step scores every (beam, token)
continuation as the beam's summed log-probability plus the token's processed log-probability
(processors run on log_softmax of the logits, as HF applies them), and keeps the best K =
max(2, 1 + E) * N (E stop ids):
- the next running beams are the best N of those K that did not stop (a stop id, or the
  prompt's max length reached);
- those of the best N that stopped become hypotheses scored sum / new_tokens ** length_penalty
  (the stop token counted), and the best N hypotheses so far are kept, best first.
At its max length (prompt + max_new_tokens) every continuation stops, so the best N all become
hypotheses, EOS or not. A prompt finishes there, when early_stopping is True and N hypotheses
exist, or when N hypotheses exist and HF's heuristic says no running beam can beat the worst:
the best running score divided by (tokens so far) ** length_penalty -- by max_new_tokens **
length_penalty instead for early_stopping="never" with a positive penalty.

Each prompt behaves as HF with that prompt alone: a finished prompt's beams are frozen while
the batch goes on (HF's masks that keep a finished prompt's hypotheses from changing only act
in a batch, so they are not needed), and filler rows (length 0) are finished from the start.
Everything runs in one `lax.while_loop` on the device, the KV cache rows gathered by the chosen
beams each step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.cache import KVCache
from dsjax.generate import decode_step, prefill
from dsjax.policy import ONCE
from dsjax.sampling import Features, History, Sampling, process

_NEG = -1.0e9  # HF's "never choose": the initial copies of beam 0, stopped continuations


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamState:
    """The loop's carry: B prompts x N beams, C = capacity; running beams in cache-row order."""

    step: jax.Array  # [] int32: new tokens each running beam holds
    token: jax.Array  # [B*N] int32: each running beam's last token (the next forward's input)
    run_out: jax.Array  # [B, N, C] int32: running beams' new tokens, pad_id after them
    run_score: jax.Array  # [B, N] float32: their summed log-probabilities, best first
    fin_out: jax.Array  # [B, N, C] int32: hypotheses' new tokens, pad_id after them
    fin_count: jax.Array  # [B, N] int32: their lengths (stop token included)
    fin_score: jax.Array  # [B, N] float32: length-penalised scores, best first (-inf: empty)
    fin_flag: jax.Array  # [B, N] bool: the slot holds a hypothesis
    done: jax.Array  # [B] bool: the prompt's search is over (or a filler row)
    cache: KVCache  # B*N rows
    history: History | None  # B*N rows of prompt + tokens (only when a processor reads them)

    def replace(self, **changes) -> BeamState:
        return dataclasses.replace(self, **changes)


def _take(x, idx):
    """x [B, M, ...] gathered along axis 1 by idx [B, J] -> [B, J, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _continuations(s: BeamState, logprobs, stop_ids, max_new_tokens, k: int):
    """The best k (beam, token) continuations of each prompt: (scores [B, k], parent beams,
    tokens, whether each stops, their new tokens [B, k, C]), best first."""
    B, N, V = logprobs.shape
    total = (logprobs + s.run_score[..., None]).reshape(B, N * V)
    score, idx = jax.lax.top_k(total, k)
    parent, tok = idx // V, (idx % V).astype(jnp.int32)
    stops = jnp.any(tok[..., None] == stop_ids, axis=-1) | (s.step + 1 >= max_new_tokens)
    C = s.run_out.shape[-1]
    out = jnp.where(jnp.arange(C) == s.step, tok[..., None], _take(s.run_out, parent))
    return score, parent, tok, stops, out


def _finish_check(s: BeamState, stops, length_penalty, max_new_tokens, early_stopping):
    """[B] bool: HF's end of a prompt's search after this step (s already updated)."""
    n = s.step.astype(jnp.float32)
    if early_stopping == "never":
        n = jnp.where(length_penalty > 0, max_new_tokens.astype(jnp.float32), n)
    best = s.run_score[:, :1] / n ** length_penalty
    worst = jnp.where(s.fin_flag, jnp.min(s.fin_score, axis=1, keepdims=True), _NEG)
    improvable = jnp.any(best > worst, axis=1)
    all_in = jnp.all(s.fin_flag, axis=1) & (early_stopping is True)
    return ~(improvable & ~all_in & ~jnp.all(stops, axis=1))


def _step(s: BeamState, logprobs, stop_ids, max_new_tokens, length_penalty, k: int):
    """HF's beam step for every prompt from the processed log-probabilities [B, N, V]: the state
    with the new running beams and hypotheses (cache, history, token not yet reordered), the
    running beams' parents and tokens [B, N], and which of the k continuations stop [B, k]."""
    N = logprobs.shape[1]
    score, parent, tok, stops, out = _continuations(s, logprobs, stop_ids, max_new_tokens, k)
    run_score, j = jax.lax.top_k(score + stops * _NEG, N)  # HF's penalty keeps its arithmetic
    new = stops & (jnp.arange(k) < N)  # only the best N continuations may finish
    n = s.step + 1
    hyp = jnp.where(new, score / n.astype(jnp.float32) ** length_penalty, -jnp.inf)
    fin_score, m = jax.lax.top_k(jnp.concatenate([s.fin_score, hyp], axis=1), N)

    def merged(old, cand):
        return _take(jnp.concatenate([old, cand], axis=1), m)

    upd = s.replace(step=n, run_out=_take(out, j), run_score=run_score,
                    fin_out=merged(s.fin_out, out),
                    fin_count=merged(s.fin_count, jnp.full(tok.shape, n)),
                    fin_score=fin_score, fin_flag=merged(s.fin_flag, new))
    return upd, _take(parent, j), _take(tok, j), stops


_PER_PROMPT = ("run_out", "run_score", "fin_out", "fin_count", "fin_score", "fin_flag")


def _advance(s: BeamState, logits, sampling: Sampling, features: Features, stop_ids,
             max_new_tokens, length_penalty, early_stopping, k: int) -> BeamState:
    """One beam step from the running beams' logits [B*N, V]: HF's step, then the cache and
    history reordered by the chosen beams; prompts already finished stay as they were."""
    B, N = s.run_score.shape
    logprobs = process(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), sampling,
                       features, s.history, jnp.full((B * N,), s.step, jnp.int32))
    upd, parent, tok, stops = _step(s, logprobs.reshape(B, N, -1), stop_ids, max_new_tokens,
                                    length_penalty, k)
    keep = s.done  # [B]
    held = {f: jnp.where(keep.reshape((B,) + (1,) * (getattr(s, f).ndim - 1)), getattr(s, f),
                         getattr(upd, f)) for f in _PER_PROMPT}
    keep_rows = jnp.repeat(keep, N)
    rows = jnp.where(keep[:, None], jnp.arange(N), parent) + N * jnp.arange(B)[:, None]
    rows = rows.reshape(-1)  # each new running beam's cache row: its parent's (frozen: its own)
    history = s.history
    if history is not None:
        history = history.rows(rows).append(tok.reshape(-1), ~keep_rows)
    upd = upd.replace(token=jnp.where(keep_rows, s.token, tok.reshape(-1)), history=history,
                      cache=jax.tree.map(lambda x: x[rows], s.cache), **held)
    finished = _finish_check(upd, stops, length_penalty, max_new_tokens, early_stopping)
    return upd.replace(done=keep | finished)


def _check_static(num_beams: int, num_return: int, early_stopping, features: Features) -> None:
    """The static arguments, checked at trace time (the engine validates the traced values)."""
    if num_beams < 2:
        raise ValueError(f"beam search needs num_beams >= 2 (1 is greedy search), got {num_beams}")
    if not 1 <= num_return <= num_beams:
        raise ValueError(f"num_return must be in [1, num_beams={num_beams}], got {num_return}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if features.do_sample:
        raise ValueError("beam search is deterministic: features.do_sample must be False")


def _initial(tokens, lengths, cache, pad_id, capacity: int, num_beams: int,
             features: Features) -> BeamState:
    """The state before the first step: every beam a copy of its prompt, only beam 0 live."""
    B, N, C = lengths.shape[0], num_beams, capacity
    history = None
    if features.history:
        prompt = jnp.full((B, C), pad_id, jnp.int32).at[:, :tokens.shape[1]].set(tokens)
        history = History(prompt, lengths, lengths).rows(jnp.repeat(jnp.arange(B), N))
    return BeamState(
        step=jnp.int32(0), token=jnp.zeros((B * N,), jnp.int32),
        run_out=jnp.full((B, N, C), pad_id, jnp.int32),
        run_score=jnp.zeros((B, N), jnp.float32).at[:, 1:].set(_NEG),
        fin_out=jnp.full((B, N, C), pad_id, jnp.int32), fin_count=jnp.zeros((B, N), jnp.int32),
        fin_score=jnp.full((B, N), -jnp.inf, jnp.float32), fin_flag=jnp.zeros((B, N), bool),
        done=lengths == 0, cache=cache, history=history)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "num_beams", "num_return",
                                             "early_stopping", "features", "int8_cache"))
def beam_search(graphdef, params, tokens, lengths, max_new_tokens, stop_ids, pad_id,
                length_penalty, sampling: Sampling, *, capacity: int, num_beams: int,
                num_return: int, early_stopping, features: Features, int8_cache: bool = False):
    """HF's beam search for each prompt: prefill once per prompt, then a `lax.while_loop` of
    beam steps over B * num_beams cache rows.

    tokens [B, T] right-padded prompts, lengths [B] (0: a filler row that only pads the batch;
    finished from the start); max_new_tokens, pad_id: [] int32; stop_ids [E] int32 (-1 never
    matches); length_penalty [] float32; sampling: B per-prompt rows (repeated per beam here);
    features: which processors run (static; do_sample False); early_stopping: True, False or
    "never" (HF's meanings). Returns (sequences [B, num_return, capacity] int32: each returned
    hypothesis's new tokens, best first, pad_id after its end; counts [B, num_return] int32: its
    new tokens, stop token included; scores [B, num_return] float32: HF's sequences_scores).
    """
    _check_static(num_beams, num_return, early_stopping, features)
    ONCE.new_program()
    model = nnx.merge(graphdef, params)
    B, N = tokens.shape[0], num_beams
    cache = KVCache.create(model.cfg, B, capacity, model.embed.embedding.dtype,
                           quantized=int8_cache)
    logits, cache = prefill(model, tokens, jnp.maximum(lengths, 1), cache)
    # HF keeps (1 + E) * N continuations (at least 2N) so that N of them never stop; counting
    # the -1 slots of stop_ids in E keeps more, which picks the same beams
    k = min(max(2, 1 + stop_ids.shape[0]) * N, N * logits.shape[-1])
    beams = jnp.repeat(jnp.arange(B), N)
    cache = jax.tree.map(lambda x: x[beams], cache)
    rows = sampling.rows(beams)
    step = functools.partial(_advance, sampling=rows, features=features, stop_ids=stop_ids,
                             max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                             early_stopping=early_stopping, k=k)
    state = step(_initial(tokens, lengths, cache, pad_id, capacity, N, features), logits[beams])

    def body(s: BeamState) -> BeamState:
        logits, cache = decode_step(model, s.token, s.cache)
        return step(s.replace(cache=cache), logits)

    final = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
    filler = (lengths == 0)[:, None]
    R = num_return
    return (final.fin_out[:, :R], jnp.where(filler, 0, final.fin_count[:, :R]),
            jnp.where(filler, 0.0, final.fin_score[:, :R]))
