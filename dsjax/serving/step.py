"""One jitted serving step: a flat batch of tokens (decode tokens and prompt chunks of many
sequences) through the one model over the paged KV pools, and a token for each sequence whose
last pending token is in the batch.

Shapes are bucketed by the caller (tokens N and sequences S to powers of two, block tables to
the pool's per-sequence maximum), so steady-state serving reuses a handful of programs: two per
shape (greedy, and sampling with top log-probabilities).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as PS

from dsjax import sampling as smp
from dsjax.policy import ONCE
from dsjax.serving import batch
from dsjax.serving.paged import PagedCache, StepMeta, slots_of

# the full program holds greedy and sampled rows, min_new_tokens and min-p: the request mix
# changes from step to step, the program does not
FEATURES = smp.Features(do_sample=True, min_new=True, min_p=True)
GREEDY = smp.Features(min_new=True)  # the program of steps where no row samples
TOP_LOGPROBS = 20  # the most likely tokens each step reports (OpenAI's top_logprobs maximum)


@functools.cache
def program(graphdef, mesh=None, specs=None):
    """The jitted step of one model, its graphdef closed over (hashed here, once, not on every
    call): run(params, cache, buf, prev_tokens, *, layout, full) -> (the cache with this step's
    K/V written, tokens [R], out [K, R, 2 (+ 2 TOP_LOGPROBS when full)] int32), R =
    prev_tokens' length (the rows of every step's output: one shape, so the next step reads
    this one's tokens on the device, before the host has seen them), K = layout.steps (decode
    steps: a burst runs several, tokens are each row's last). buf: the step's buffer
    (dsjax.serving.batch, its static layout). out: per decode step and row the token, its
    log-probability's bits and, when full, the TOP_LOGPROBS most likely tokens and their
    log-probabilities' bits. full: the program that samples and reports top log-probabilities;
    otherwise greedy (the host picks per step, so a greedy step never sorts the vocabulary). A request's draws depend only on its seed and its
    position, never on what else shares the step.

    Over a ("dp", "pp", "tp") mesh with pp = 1 (dsjax.parallel; specs: the params' partition
    specs): each of the dp replicas runs its own buffer (buf and prev_tokens [dp, ...]) over its
    own blocks (the pools' first axis, dp x its blocks) with its tensor slice of the weights
    and of the KV heads (the pools' second axis); tokens [dp, R] and out [dp, K, R, ...]."""
    fn = functools.partial(_one if mesh is None else _over_mesh, graphdef)
    if mesh is not None:
        fn = functools.partial(fn, mesh=mesh, specs=specs)
    return jax.jit(fn, static_argnames=("layout", "full"), donate_argnums=(1,))


def _one(graphdef, params, cache: PagedCache, buf, prev_tokens, *, layout, full):
    ONCE.new_program()
    return _step(nnx.merge(graphdef, params), cache, buf, prev_tokens, layout, full)


def _over_mesh(graphdef, params, cache: PagedCache, buf, prev_tokens, *, mesh, specs, layout,
               full):
    ONCE.new_program()
    pools, rows = PS("dp", "tp"), PS("dp")

    def local(params, cache, buf, prev):
        params = {**params, "layers": jax.tree.map(lambda a: a[0], params["layers"])}
        cache, tok, out = _step(nnx.merge(graphdef, params), cache, buf[0], prev[0], layout, full)
        return cache, tok[None], out[None]

    cache_specs = jax.tree.map(lambda _: pools, cache)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(jax.tree.unflatten(*specs), cache_specs, rows,
                                                   rows),
                       out_specs=(cache_specs, rows, rows), check_vma=False)
    return fn(params, cache, buf, prev_tokens)


def _step(model, cache: PagedCache, buf, prev_tokens, layout: batch.Layout, full: bool):
    inputs = batch.unpack(buf, layout)
    tokens = jnp.where(inputs.from_prev >= 0, prev_tokens[jnp.maximum(inputs.from_prev, 0)],
                       inputs.tokens)
    if layout.steps > 1:
        cache, tok, out = _burst(model, cache, inputs, tokens, layout.steps, full)
    else:
        hidden, cache = model(tokens[None], inputs.positions[None], cache.at_step(inputs.meta))
        tok, out = _choose(model, hidden[0], inputs, inputs.positions, 0, full)
        cache, out = cache.at_step(None), out[None]
    pad = prev_tokens.shape[0] - tok.shape[0]
    return cache, jnp.pad(tok, (0, pad)), jnp.pad(out, [(0, 0), (0, pad), (0, 0)])


def _choose(model, hidden, inputs: batch.StepInputs, positions, j, full: bool):
    """Each sequence row's token after its last token in hidden [N, D] (its `j`-th decode
    step of this program), and its output columns [S, C]."""
    logits = model.logits(hidden[inputs.sample_at])  # [S, V]
    keys = None
    if full:
        pos = positions[inputs.sample_at]
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(inputs.seeds, pos)
    tok = smp.choose(logits, keys, inputs.sampling, FEATURES if full else GREEDY, None,
                     inputs.new_tokens + j)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))
    bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)  # noqa: E731
    cols = [tok[:, None], bits(jnp.take_along_axis(logprobs, tok[:, None], axis=-1))]
    if full:
        top_lp, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
        cols += [top_ids.astype(jnp.int32), bits(top_lp)]
    return tok, jnp.concatenate(cols, axis=1)


def _burst(model, cache: PagedCache, inputs: batch.StepInputs, tokens, steps: int, full: bool):
    """`steps` decode steps of one token per sequence row, each step's tokens the inputs of
    the next: a row runs its `steps` column's count (a sequence that reaches its max_new_tokens
    sooner); in later steps it repeats its last position and writes into the reserved block 0
    (which no sequence reads), not nowhere: its token stays valid, as the Pallas kernel's tiles
    need every sequence's valid tokens ahead of the padding. Returns (cache, each row's last
    token [S], the steps' outputs [steps, S, C])."""
    meta, bs = inputs.meta, cache.block_size
    limit = inputs.steps[meta.token_seq]  # [N]: the decode steps of each token's sequence
    live0 = meta.slots >= 0  # (padding tokens never write)

    def body(carry, j):
        cache, tokens, last = carry
        live = live0 & (j < limit)
        pos = inputs.positions + jnp.minimum(j, jnp.maximum(limit - 1, 0))
        slots = jnp.where(live, slots_of(meta.block_tables, meta.token_seq, pos, bs),
                          jnp.where(live0, pos % bs, -1))
        step_meta = StepMeta(slots, meta.token_seq, meta.block_tables)
        hidden, cache = model(tokens[None], pos[None], cache.at_step(step_meta))
        tok, out = _choose(model, hidden[0], inputs, pos, j, full)
        last = jnp.where(j < inputs.steps, tok, last)
        return (cache.at_step(None), tok[meta.token_seq], last), out

    init = (cache, tokens, jnp.zeros_like(inputs.steps))
    (cache, _, last), outs = jax.lax.scan(body, init, jnp.arange(steps))
    return cache, last, outs


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
