"""Pipeline stages with micro-batched decode, tensor slicing inside each stage, over one
`shard_map` on the ("dp", "pp", "tp") mesh.

The L layers are cut into P contiguous stages of L/P. Stage-local layer j of every stage is one
array [P, ...] sharded over "pp" (each device holds its own stage's [1, ...] block, squeezed
to a per-layer array inside shard_map: no per-step slicing copies, DESIGN.md); embeddings,
final norm and LM head are replicated over "pp". Hidden states go from stage s to s + 1 with one
`ppermute` per tick (the ring's edge P-1 -> 0 carries the sampled token back to the first
stage); each stage keeps the KV cache of its own layers. With P = 1 this is plain tensor
parallelism (one tick per token).

Schedule (P = 3 stages, M = 3 micro-batches a b c; a digit is the pass: 0 = prompt):

    tick      0   1   2   3   4   5   6   7   8 ...
    stage 0   a0  b0  c0 | a1  b1  c1  a2  b2  c2
    stage 1       a0  b0 | c0  a1  b1  c1  a2  b2
    stage 2           a0 | b0  c0  a1  b1  c1  a2
              prompt phase| token phase (ring): every stage busy on every tick

Prompt phase: a GPipe pass over the M prompt micro-batches (M + P - 1 ticks, then the token
phase starts; its own program, since prompts are [b, T] and tokens [b, 1]). Token phase: stage s
works at tick u on micro-batch (u - s) mod R, R = max(M, P); the token that the last stage
samples for a micro-batch reaches stage 0 by the tick that micro-batch is due there again. With
M >= P no stage idles after the fill; with M < P (M must divide P) each stage idles P - M ticks
in every P; M = 1 is the un-micro-batched pipeline. Every stage runs the same program: work
outside a stage's turn is computed and discarded (its cache writes land where a valid write
will overwrite them first, and its lengths do not move), which costs no wall time because the
stages run in lockstep. A stage stores micro-batch m's cache in slot (m + s) mod M, so the slot
a tick uses is the same on every stage and known when tracing: no cache is ever copied.
Sampling streams (do_sample) differ from the single-device generate; greedy tokens are equal.

KV offload (offload_kv: the cache slots in pinned host memory between their ticks) runs these
same ticks as one program each: dsjax/parallel/offload.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from dsjax import generate as gen
from dsjax.cache import KVCache
from dsjax.config import ModelConfig
from dsjax.lazy import Computed, Lazy
from dsjax.model import abstract_model, unflatten
from dsjax.parallel import distributed, tensor
from dsjax.parallel.mesh import Parallel
from dsjax.policy import ONCE
from dsjax.quant import QuantSpec, quantizable, quantize

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def stage_config(cfg: ModelConfig, par: Parallel) -> ModelConfig:
    """One device's model: its stage's L/P layers, its tensor slice."""
    local = tensor.local_config(cfg, par.tp)
    Lp = cfg.num_layers // par.pp
    windowed = None if cfg.local_layers is None else tuple(
        j for j in range(Lp) if cfg.layer_window(j) is not None)
    return dataclasses.replace(local, num_layers=Lp, local_layers=windowed)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of a parallel engine (hashable: a jit static argument)."""

    cfg: ModelConfig  # the whole model
    par: Parallel
    mesh: Mesh

    @property
    def ring(self):
        P = self.par.pp
        return [(s, (s + 1) % P) for s in range(P)]


# ----------------------------------------------------------------------------- weights

def build(cfg: ModelConfig, par: Parallel, mesh: Mesh, flat: dict, dtype, policy=None,
          quant: QuantSpec | None = None):
    """(plan, graphdef, params) of a model served over `mesh`, from its full single-device
    parameters {path: host array} (consumed): each device's module and its slices. `policy`
    (the kernel policy) goes to abstract_model unchanged."""
    plan = Plan(cfg, par, mesh)
    graphdef, _ = abstract_model(stage_config(cfg, par), dtype, policy,
                                 shard=tensor.shard_for(cfg, par.tp, par.ep))
    return plan, graphdef, place(flat, plan, quant)


def place(flat: dict, plan: Plan, quant: QuantSpec | None = None) -> dict:
    """Full single-device parameters {path: host array or lazy tensor} -> the stage-stacked,
    tensor-sliced arrays, each device receiving only its slice. Quantizable weights are
    quantized per slice (so a row-parallel per-channel weight gets one scale row per slice).
    A bad value met in one process's slices fails every process (distributed.agree)."""
    error = out = None
    try:
        out = _place(flat, plan, quant)
    except ValueError as e:  # a non-finite or out-of-range weight, read by this process only
        error = e
    distributed.agree(error)
    return out


def _place(flat: dict, plan: Plan, quant: QuantSpec | None) -> dict:
    cfg, par = plan.cfg, plan.par
    Lp = cfg.num_layers // par.pp
    out, stacks = {}, {}
    for path in list(flat):
        x = flat.pop(path)
        x = x if isinstance(x, Lazy) else np.asarray(x)
        how = tensor.slicing(path, cfg)
        parts = tensor.pieces(x, how, par.tp)
        if quant is not None and quantizable(path, quant):
            parts = [_quantized(p, quant) for p in parts]
        joined = parts[0] if how.axis is None else jax.tree.map(
            lambda *xs: np.concatenate(xs, axis=how.axis % xs[0].ndim), *parts)
        layer = _LAYER.match(path)
        if layer is None:
            out[path] = _put(joined, plan.mesh, how, layer=False, ep=par.ep)
        else:
            stage, j = divmod(int(layer[1]), Lp)
            stacks.setdefault(f"layers.{j}.{layer[2]}", [None] * par.pp)[stage] = (joined, how)
    for path, per_stage in stacks.items():
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *[p for p, _ in per_stage])
        out[path] = _put(stacked, plan.mesh, per_stage[0][1], layer=True, ep=par.ep)
    return unflatten(out)


def _quantized(part, quant: QuantSpec):
    """One slice quantized; a lazy slice as a QuantizedWeight of lazy leaves, quantized (once,
    for all its leaves) only where a device of this process holds it."""
    if not isinstance(part, Lazy):
        return jax.tree.map(np.asarray, quantize(jnp.asarray(part), quant))
    shapes = jax.eval_shape(lambda w: quantize(w, quant),
                            jax.ShapeDtypeStruct(part.shape, part.dtype))
    whole = functools.cache(lambda: jax.tree.leaves(_quantized(np.asarray(part), quant)))
    leaves, tree = jax.tree.flatten(shapes)
    return jax.tree.unflatten(tree, [Computed(s.shape, s.dtype, lambda i=i: whole()[i])
                                     for i, s in enumerate(leaves)])


def _put(x, mesh: Mesh, how: tensor.Slicing, *, layer: bool, ep: int = 1):
    """Host arrays -> global arrays whose devices each receive only their slice (expert
    arrays with expert parallelism: their replica's experts too)."""
    def put(a):
        axes = [None] * (a.ndim - layer)
        if how.axis is not None:
            axes[how.axis % len(axes)] = tensor.AXIS
        if how.experts and ep > 1:
            axes[0] = tensor.EXPERT_AXIS
        spec = PS("pp", *axes) if layer else PS(*axes)
        return distributed.place(a, NamedSharding(mesh, spec))
    return jax.tree.map(put, x)


def _local(params: dict) -> dict:
    """Inside shard_map: each layer leaf's [1, ...] stage block -> the layer's own array."""
    layers = jax.tree.map(lambda a: a.reshape(a.shape[1:]), params["layers"])
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- generate

def _select(valid, new, old):
    return jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, old)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "specs", "capacity", "do_sample",
                                             "return_logprobs", "int8_cache"))
def generate(graphdef, params, tokens, lengths, key, max_new_tokens, stop_ids, pad_id,
             sampling, *, plan: Plan, specs, capacity: int, do_sample: bool,
             return_logprobs: bool, int8_cache: bool = False):
    """gen.generate over the mesh. tokens [dp, M, b, T] right-padded prompts cut into
    micro-batches, lengths [dp, M, b]; specs: the params' in_specs as a hashable
    (treedef, leaves) pair (see `hashable_specs`). Returns (tokens, count, logprobs) shaped
    [dp, M, b, capacity], [dp, M, b], [dp, M, b, capacity]."""
    ONCE.new_program()
    body = functools.partial(_generate_local, graphdef, plan=plan, capacity=capacity,
                             do_sample=do_sample, return_logprobs=return_logprobs,
                             int8_cache=int8_cache)
    batch = PS("dp")
    fn = jax.shard_map(body, mesh=plan.mesh, in_specs=(
        jax.tree.unflatten(*specs), batch, batch, PS(), PS(), PS(), PS(), PS()),
        out_specs=(batch, batch, batch), check_vma=False)
    return fn(params, tokens, lengths, key, max_new_tokens, stop_ids, pad_id, sampling)


def hashable_specs(params: dict):
    """The in_specs of placed parameters (their shardings' specs), as (treedef, leaves)."""
    leaves, treedef = jax.tree.flatten(jax.tree.map(lambda a: a.sharding.spec, params))
    return treedef, tuple(leaves)


class _Stage:
    """One device's view: its model, its stage index and the ring hand-off."""

    def __init__(self, graphdef, params, plan: Plan):
        self.model = nnx.merge(graphdef, _local(params))
        self.P, self.M = plan.par.pp, plan.par.micro_batches
        self.R = max(self.M, self.P)
        self.s = jax.lax.axis_index("pp")
        self.first, self.last = self.s == 0, self.s == self.P - 1
        self.plan = plan

    def run(self, recv, tokens, positions, cache, key_mask=None, from_start=False):
        """The stage's layers on the previous stage's output (the embedded tokens on stage 0)."""
        x = self.model.embed_inputs(tokens, positions)
        if self.P > 1:
            x = jnp.where(self.first, x, recv)
        return self.model.blocks(x, positions, cache, key_mask, from_start)

    def head(self, hidden):
        return self.model.logits(self.model.finish(hidden))

    def pass_on(self, tree):
        return tree if self.P == 1 else jax.lax.ppermute(tree, "pp", self.plan.ring)

    def from_last(self, x):
        """A value the last stage computed, on every stage (a masked sum over "pp")."""
        if self.P == 1:
            return x
        return jax.lax.psum(jnp.where(self.last, x, jnp.zeros((), x.dtype)), "pp")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MicroBatches:
    """The generation state of the M micro-batches on one device: each field has one entry per
    micro-batch (b rows each, capacity = the token budget). The last stage writes a micro-batch's
    tokens; stage 0 keeps the token it feeds next. A tick returns an updated copy (`put`)."""

    buf: tuple[jax.Array, ...]  # [b] int32: the token stage 0 feeds on the micro-batch's next pass
    count: tuple[jax.Array, ...]  # [b] int32: tokens generated per row (the last stage's)
    done: tuple[jax.Array, ...]  # [b] bool: rows that stopped (a stop token, or a filler row)
    out: tuple[jax.Array, ...]  # [b, capacity] int32: the generated tokens, pad_id after them
    out_lp: tuple[jax.Array, ...]  # [b, capacity] float32: their log-probabilities

    @classmethod
    def create(cls, M: int, b: int, capacity: int, pad_id) -> MicroBatches:
        per_mb = lambda make: tuple(make() for _ in range(M))  # noqa: E731
        return cls(buf=per_mb(lambda: jnp.zeros((b,), jnp.int32)),
                   count=per_mb(lambda: jnp.zeros((b,), jnp.int32)),
                   done=per_mb(lambda: jnp.zeros((b,), bool)),
                   out=per_mb(lambda: jnp.full((b, capacity), pad_id, jnp.int32)),
                   out_lp=per_mb(lambda: jnp.zeros((b, capacity), jnp.float32)))

    def put(self, m: int, **entries) -> MicroBatches:
        """This state with micro-batch m's entry of each named field replaced."""
        return dataclasses.replace(self, **{
            name: tuple(value if i == m else x for i, x in enumerate(getattr(self, name)))
            for name, value in entries.items()})


def _record(row, value, step, ok):
    """row [b, capacity] with value [b] written at column `step` where ok."""
    return jnp.where(ok, jax.lax.dynamic_update_slice(row, value[:, None], (0, step)), row)


def _prompt_phase(st: _Stage, tokens, lengths, caches, mbs: MicroBatches, pick, key, stop_ids):
    """GPipe over the M prompt micro-batches (micro-batch tau - s on stage s at tick tau): fills
    each stage's cache slots and, on the last stage, samples each micro-batch's first token."""
    recv = jnp.zeros(tokens.shape[1:] + (st.model.cfg.hidden_size,), st.model.embed.embedding.dtype)
    for tau in range(st.M + st.P - 1):
        recv, caches[tau % st.M], mbs = _prompt_tick(st, tau, recv, tokens, lengths,
                                                     caches[tau % st.M], mbs, pick, key, stop_ids)
    return caches, mbs


def _prompt_tick(st: _Stage, tau: int, recv, tokens, lengths, old, mbs: MicroBatches, pick, key,
                 stop_ids):
    """Prompt tick tau on slot tau mod M (its cache `old`): (what the next stage receives, the
    slot's new cache, mbs with the last stage's micro-batch's first token recorded)."""
    P, M = st.P, st.M
    b, T = tokens.shape[1:]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
    j = tau - st.s
    # from_start holds on the tick that keeps its result (a fresh slot); the others are dropped
    h, new = st.run(recv, tokens[min(tau, M - 1)], positions, old, from_start=True)
    new = new.replace(lengths=jnp.maximum(lengths[jnp.clip(j, 0, M - 1)], 1))
    new = new if P - 1 <= tau < M else _select((j >= 0) & (j < M), new, old)
    tok = jnp.zeros((b,), jnp.int32)
    jl = tau - (P - 1)  # the last stage's micro-batch
    if 0 <= jl < M:
        filler = lengths[jl] == 0  # rows that only pad the batch: finished from the start
        last = jnp.take_along_axis(h, (jnp.maximum(lengths[jl], 1) - 1)[:, None, None],
                                   axis=1)[:, 0]
        tok, lp = pick(st.head(last), jax.random.fold_in(key, jl), filler)
        mbs = mbs.put(jl, out=_record(mbs.out[jl], tok, 0, True),
                      out_lp=_record(mbs.out_lp[jl], lp, 0, True),
                      count=(~filler).astype(jnp.int32),
                      done=filler | gen.is_stop_token(tok, stop_ids))
    recv, tok = st.pass_on((h, tok))
    if 0 <= jl < M:
        mbs = mbs.put(jl, buf=tok)
    return recv, new, mbs


def _start(st: _Stage, b: int, key, sampling, pad_id, *, capacity, do_sample, return_logprobs):
    """This replica's sampling key, the token picker and the M micro-batches' fresh state."""
    key = jax.random.fold_in(key, jax.lax.axis_index("dp"))  # replicas sample their own rows
    pick = functools.partial(gen.pick_token, sampling=sampling, pad_id=pad_id,
                             do_sample=do_sample, return_logprobs=return_logprobs)
    return key, pick, MicroBatches.create(st.M, b, capacity, pad_id)


def _new_cache(st: _Stage, b: int, capacity: int, int8_cache: bool) -> KVCache:
    return KVCache.create(st.model.cfg, b, capacity, st.model.embed.embedding.dtype,
                          quantized=int8_cache)


def _rounds(n_pass, M: int, P: int, R: int):
    """Rounds of R ticks for n_pass >= 1 decode passes (the last micro-batch's last pass leaves
    the last stage in the last round)."""
    return ((M - 1) + (P - 1) + (n_pass - 1) * R) // R + 1


def _generate_local(graphdef, params, tokens, lengths, key, max_new_tokens, stop_ids, pad_id,
                    sampling, *, plan: Plan, capacity, do_sample, return_logprobs, int8_cache):
    st = _Stage(graphdef, params, plan)
    P, M, R, model = st.P, st.M, st.R, st.model
    tokens, lengths = tokens[0], lengths[0]  # [M, b, T], [M, b]
    b = tokens.shape[1]
    key, pick, mbs = _start(st, b, key, sampling, pad_id, capacity=capacity, do_sample=do_sample,
                            return_logprobs=return_logprobs)
    caches = [_new_cache(st, b, capacity, int8_cache) for _ in range(M)]
    caches, mbs = _prompt_phase(st, tokens, lengths, caches, mbs, pick, key, stop_ids)

    # token phase: rounds of R ticks; micro-batch (t - s) mod R on stage s at round tick t
    n_pass = max_new_tokens - 1  # decode passes after the prompt's token
    rounds = jnp.where(n_pass > 0, _rounds(n_pass, M, P, R), 0)

    def round_(state):
        r, recv, caches, mbs, _ = state
        caches = list(caches)
        for t in range(R):
            recv, caches[t % M], mbs = _token_tick(st, t, r, recv, caches[t % M], mbs, pick, key,
                                                   stop_ids, n_pass)
        return r + 1, recv, caches, mbs, _all_done(st, mbs)

    recv = jnp.zeros((b, 1, model.cfg.hidden_size), model.embed.embedding.dtype)
    state = (jnp.int32(0), recv, caches, mbs, jnp.bool_(False))
    _, _, _, mbs, _ = jax.lax.while_loop(lambda s: (s[0] < rounds) & ~s[-1], round_, state)
    result = (jnp.stack(mbs.out), jnp.stack(mbs.count), jnp.stack(mbs.out_lp))
    return tuple(st.from_last(x)[None] for x in result)


def _token_tick(st: _Stage, t: int, r, recv, cache: KVCache, mbs: MicroBatches, pick, key,
                stop_ids, n_pass):
    """Tick t of round r on slot t mod M (its cache `cache`): (what the next stage receives, the
    slot's new cache, mbs with the last stage's micro-batch's token recorded)."""
    P, M, R = st.P, st.M, st.R
    b = cache.lengths.shape[0]
    j, k = (t - st.s) % R, r - (t < st.s).astype(jnp.int32)
    valid = (j < M) & (k >= 0) & (k < n_pass)
    pos = cache.lengths[:, None]
    h, new = st.run(recv, mbs.buf[min(t, M - 1)][:, None], pos, cache)
    new = new.replace(lengths=cache.lengths + valid.astype(jnp.int32))
    tok, jl = jnp.zeros((b,), jnp.int32), (t - (P - 1)) % R  # the last stage's
    if jl < M:
        kl = r - int(t < P - 1)
        ok, done = (kl >= 0) & (kl < n_pass), mbs.done[jl]
        tok, lp = pick(st.head(h[:, 0]), jax.random.fold_in(key, (r * R + t) * M + jl + M), done)
        step = jnp.clip(kl + 1, 0, cache.capacity - 1)
        mbs = mbs.put(jl, out=_record(mbs.out[jl], tok, step, ok),
                      out_lp=_record(mbs.out_lp[jl], lp, step, ok),
                      count=mbs.count[jl] + (ok & ~done).astype(jnp.int32),
                      done=done | (ok & gen.is_stop_token(tok, stop_ids)))
    recv, tok = st.pass_on((h, tok))
    if jl < M:  # stage 0 keeps it until micro-batch jl is due there again
        mbs = mbs.put(jl, buf=jnp.where(ok, tok, mbs.buf[jl]))
    return recv, new, mbs


def _all_done(st: _Stage, mbs: MicroBatches):
    """Whether every row of every micro-batch of every replica has stopped (the last stages'
    word, on every device): replicas stop together, since devices that run different numbers of
    loop iterations would wait for each other in the collectives (XLA aborts on the CPU)."""
    done = st.from_last(jnp.all(jnp.stack(mbs.done)).astype(jnp.int32))
    return (jax.lax.pmin(done, "dp") if st.plan.par.dp > 1 else done) > 0


# ----------------------------------------------------------------------------- forward

@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "specs"))
def forward(graphdef, params, tokens, attention_mask, *, plan: Plan, specs):
    """gen.forward over the mesh: tokens, attention_mask [dp, B, T] -> logits [dp, B, T, V]."""
    ONCE.new_program()
    batch = PS("dp")
    fn = jax.shard_map(functools.partial(_forward_local, graphdef, plan=plan), mesh=plan.mesh,
                       in_specs=(jax.tree.unflatten(*specs), batch, batch), out_specs=batch,
                       check_vma=False)
    return fn(params, tokens, attention_mask)


def _forward_local(graphdef, params, tokens, attention_mask, *, plan: Plan):
    st = _Stage(graphdef, params, plan)
    tokens, mask = tokens[0], attention_mask[0].astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    h = jnp.zeros(tokens.shape + (st.model.cfg.hidden_size,), st.model.embed.embedding.dtype)
    for tick in range(st.P):  # one micro-batch through the stages
        h, _ = st.run(h, tokens, positions, None, mask)
        if tick < st.P - 1:
            h = st.pass_on(h)
    return st.from_last(st.head(h))[None]
