"""One jitted serving step: a flat batch of tokens (decode tokens and prompt chunks of many
sequences) through the one model over the paged KV pools, and a token for each sequence whose
last pending token is in the batch.

Shapes are bucketed by the caller (tokens N and sequences S to powers of two, block tables to
the pool's per-sequence maximum), so steady-state serving reuses a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as PS

from dsjax import sampling as smp
from dsjax.policy import ONCE
from dsjax.serving.paged import PagedCache, StepMeta

# every step program can hold greedy and sampled rows, min_new_tokens and min-p: the request
# mix changes from step to step, the program does not
FEATURES = smp.Features(do_sample=True, min_new=True, min_p=True)
GREEDY = smp.Features(min_new=True)  # the same program's path when no row samples
TOP_LOGPROBS = 20  # the most likely tokens each step reports (OpenAI's top_logprobs maximum)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logprobs:
    """A step's log-probabilities under the model (before sampling's processors), per row."""

    chosen: jax.Array  # [R] of the token picked
    top_ids: jax.Array  # [R, TOP_LOGPROBS] the most likely tokens
    top: jax.Array  # [R, TOP_LOGPROBS] their log-probabilities


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array  # [N] int32 (padding: 0)
    from_prev: jax.Array  # [N] int32: >= 0 takes the previous step's token of that row instead
    positions: jax.Array  # [N] int32
    meta: StepMeta
    sample_at: jax.Array  # [S] int32: the index in N of each sequence's last token
    new_tokens: jax.Array  # [S] int32: tokens each sequence has generated so far
    seeds: jax.Array  # [S] uint32: each request's sampling seed
    report_top: jax.Array  # [] bool: some request wants its top log-probabilities
    sampling: smp.Sampling  # [S] rows


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(2,))
def ragged_step(graphdef, params, cache: PagedCache, inputs: StepInputs, prev_tokens):
    """(the cache with this step's K/V written, tokens [R], Logprobs); R = prev_tokens' length (the rows of every step's output: one shape, so the
    next step can read this one's tokens on the device, before the host has seen them). A
    request's draws depend only on its seed and its position, never on what else shares the
    step."""
    ONCE.new_program()
    return _step(nnx.merge(graphdef, params), cache, inputs, prev_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "specs"), donate_argnums=(2,))
def mesh_step(graphdef, params, cache: PagedCache, inputs: StepInputs, prev_tokens, *, mesh,
              specs):
    """ragged_step over a ("dp", "pp", "tp") mesh with pp = 1 (dsjax.parallel): each of the dp
    replicas runs its own flat batch (inputs and prev_tokens [dp, ...]) over its own blocks
    (the pools' first axis, dp x its blocks) with its tensor slice of the weights and of the
    KV heads (the pools' second axis). Returns tokens [dp, R] and Logprobs ([dp, R, ...])."""
    ONCE.new_program()
    pools, rows = PS("dp", "tp"), PS("dp")

    def local(params, cache, inputs, prev):
        params = {**params, "layers": jax.tree.map(lambda a: a[0], params["layers"])}
        one = jax.tree.map(lambda a: a[0], (inputs, prev))
        cache, tok, lp = _step(nnx.merge(graphdef, params), cache, *one)
        return cache, tok[None], jax.tree.map(lambda x: x[None], lp)

    cache_specs = jax.tree.map(lambda _: pools, cache)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(jax.tree.unflatten(*specs), cache_specs, rows,
                                                   rows),
                       out_specs=(cache_specs, rows, rows), check_vma=False)
    return fn(params, cache, inputs, prev_tokens)


def _step(model, cache: PagedCache, inputs: StepInputs, prev_tokens):
    tokens = jnp.where(inputs.from_prev >= 0, prev_tokens[jnp.maximum(inputs.from_prev, 0)],
                       inputs.tokens)
    hidden, cache = model(tokens[None], inputs.positions[None], cache.at_step(inputs.meta))
    logits = model.logits(hidden[0][inputs.sample_at])  # [S, V]
    pos = inputs.positions[inputs.sample_at]
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(inputs.seeds, pos)
    choose = lambda f: lambda: smp.choose(logits, keys, inputs.sampling, f, None,  # noqa: E731
                                          inputs.new_tokens)
    # the sampling path sorts the vocabulary for every row: run it only if some row samples
    tok = jax.lax.cond(jnp.any(inputs.sampling.do_sample), choose(FEATURES), choose(GREEDY))
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))
    lp = jnp.take_along_axis(logprobs, tok[:, None], axis=-1)[:, 0]
    none = (jnp.zeros((tok.shape[0], TOP_LOGPROBS), jnp.float32),
            jnp.zeros((tok.shape[0], TOP_LOGPROBS), jnp.int32))
    top_lp, top_ids = jax.lax.cond(inputs.report_top,
                                   lambda: tuple(jax.lax.top_k(logprobs, TOP_LOGPROBS)),
                                   lambda: none)
    pad = prev_tokens.shape[0] - tok.shape[0]
    rows = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
    return cache.at_step(None), rows(tok), Logprobs(rows(lp), rows(top_ids), rows(top_lp))


def swap_weights(graphdef, old_params, new_params):
    """new_params (a params pytree of the same structure, shapes and dtypes) placed like the old
    ones: what an RL loop swaps in between rollouts without recompiling."""
    old_leaves, old_def = jax.tree.flatten(old_params)
    new_leaves, new_def = jax.tree.flatten(new_params)
    if old_def != new_def:
        raise ValueError("the new params do not have the engine's structure")
    for i, (a, b) in enumerate(zip(old_leaves, new_leaves)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"params leaf {i}: {b.shape} {b.dtype} where the engine holds "
                             f"{a.shape} {a.dtype}")
    return jax.tree.unflatten(old_def, [_like(a, b) for a, b in zip(old_leaves, new_leaves)])


def _like(old, new):
    """new placed as old is, committed to its device(s) or not (jit's cache tells the two
    apart: a change would recompile)."""
    same_place = isinstance(new, jax.Array) and new.devices() == old.devices()
    if getattr(old, "committed", True) or not same_place and isinstance(new, jax.Array):
        return jax.device_put(new, old.sharding)
    return jax.device_put(new) if isinstance(new, jax.Array) else jnp.asarray(new)
