"""KV-cache offload for the pipeline (`pipeline_parallel` offload_kv, beyond open-source
DeepSpeed): the M micro-batches' cache slots live in pinned host memory (JAX memory kinds)
between their ticks, so that the device holds two slots instead of M.

The two device buffers are the slot a tick works on and a spare into which the same tick copies
the next tick's slot from the host while it computes. `generate_offloaded` runs the pipeline's
ticks (`pipeline._prompt_tick`, `pipeline._token_tick`) as one program each from a Python loop,
since transfers inside the one program over all ticks left the slots on the device (XLA's
schedule keeps them there); a tick's program sends its slot back to host memory and the two
device buffers swap roles (donated, updated in place). The default path (`pipeline.generate`)
is untouched: one program, caches on the device.
Measurements and trade-offs: docs/decisions.md#kv-offload-per-tick-programs

A run can be observed: given a `ticks` list (an engine's `runner.record_ticks()` passes one),
it appends one `Tick` per tick program (the slot it worked on, the slots it sent to and fetched
from host memory, where the slots were after it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from dsjax.parallel.pipeline import (Plan, _all_done, _new_cache, _prompt_tick, _rounds, _Stage,
                                     _start, _token_tick)
from dsjax.policy import ONCE

_ROWS = PS(("dp", "pp", "tp"))  # a value each device keeps between programs: its own rows


@dataclasses.dataclass(frozen=True)
class Tick:
    """One tick program of a generate_offloaded run, as it was dispatched."""

    phase: str  # "prompt" or "token"
    t: int  # the tick: tau in the prompt phase, the tick within its round in the token phase
    r: int  # the round (token phase; 0 in the prompt phase)
    slot: int  # the cache slot the tick worked on
    to_host: int | None  # the slot it sent to pinned host memory (None: kept for the next tick)
    fetched: int | None  # the slot it copied from pinned host memory into the spare buffer
    on_device: float  # cache slots alive in device memory just after it (jax.live_arrays)
    on_host: float  # cache slots alive in pinned host memory just after it
    args: tuple = dataclasses.field(repr=False)  # its arguments, abstract (ShapeDtypeStruct)
    static: dict = dataclasses.field(repr=False)  # its static keyword arguments

    def lower(self) -> jax.stages.Lowered:
        """The tick's program; `.compile()` gives its layouts, aliases and memory statistics."""
        return _offload_tick.lower(*self.args, **self.static)


def generate_offloaded(graphdef, params, tokens, lengths, key, max_new_tokens, stop_ids, pad_id,
                       sampling, *, plan: Plan, specs, capacity: int,
                       do_sample: bool, return_logprobs: bool, int8_cache: bool = False,
                       ticks: list | None = None):
    """`pipeline.generate` with the cache slots in pinned host memory: the same ticks, each its
    own program, run from this Python loop. Two slot buffers stay on the device: the one a tick
    works on, and a spare that the tick fills with the next tick's slot from the host while it
    computes; it then sends its own slot to the host and the two buffers swap roles. The
    arguments and the result are `generate`'s; `ticks`, if given, receives one Tick per tick
    program."""
    par = plan.par
    P, M = par.pp, par.micro_batches
    R, n_pass = max(M, P), int(max_new_tokens) - 1
    schedule = [("prompt", tau, 0) for tau in range(M + P - 1)] + [
        ("token", t, r) for r in range(_rounds(n_pass, M, P, R) if n_pass > 0 else 0)
        for t in range(R)]
    inputs = (tokens, lengths, key, max_new_tokens, stop_ids, pad_id, sampling)
    static = dict(plan=plan, specs=specs, capacity=capacity, do_sample=do_sample,
                  return_logprobs=return_logprobs, int8_cache=int8_cache)
    host, work, spare, carry = [None] * M, None, None, None
    for phase, t, r in schedule:
        slot, nxt, keep = _slots(phase, t, M, P)
        if work is None:  # a fresh slot: it takes the idle buffer
            work, spare = spare, None
        incoming = None if nxt is None else host[nxt]
        if nxt is not None:
            host[nxt] = None  # a slot lives in one place: freed once the tick has read it
        kw = dict(phase=phase, t=t, **static)
        args = None if ticks is None else _abstract(
            (graphdef, params, work, spare, incoming, carry, jnp.int32(r), *inputs))
        work, spare, carry, done, out = _offload_tick(
            graphdef, params, work, spare, incoming, carry, jnp.int32(r), *inputs, **kw)
        if ticks is not None:
            ticks.append(Tick(phase, t, r, slot, None if keep else slot, nxt,
                              *_slots_alive(work), args, kw))
        del incoming
        if not keep:
            host[slot], work, spare = out, spare, work
        if phase == "prompt" and t == M + P - 2:  # the token phase starts from nothing received
            recv = carry["recv"]
            carry["recv"] = jnp.zeros((recv.shape[0], 1, recv.shape[2]), recv.dtype,
                                      device=recv.sharding)
        if phase == "token" and t == R - 1 and np.all(np.asarray(done)):
            break
    last = lambda x: np.asarray(x).reshape(par.dp, P, par.tp, -1, *x.shape[1:])[:, -1, 0]  # noqa: E731
    return tuple(np.stack([last(x) for x in getattr(carry["mbs"], name)], axis=1)
                 for name in ("out", "count", "out_lp"))


def _abstract(tree):
    """tree with its arrays replaced by their ShapeDtypeStructs (the shardings and memory kinds
    of committed arrays included; uncommitted ones go where the program runs): what lowering a
    program needs, without keeping any array alive."""
    def spec(a):
        if not isinstance(a, jax.Array):
            return a
        weak = getattr(jax.typeof(a), "weak_type", False)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=weak,
                                    sharding=a.sharding if a.committed else None)
    graphdef, *rest = tree
    return (graphdef, *jax.tree.map(spec, tuple(rest)))


def _slots_alive(work) -> tuple[float, float]:
    """(device, pinned host): the cache slots of work's shape alive in each memory, counted in
    slots (arrays of the shape of a layer's K, [devices x b, kv heads, capacity, head dim])."""
    leaves = jax.tree.leaves(work)
    shape, dtype = leaves[0].shape, leaves[0].dtype
    per_slot = sum(leaf.shape == shape and leaf.dtype == dtype for leaf in leaves)
    kinds = [a.sharding.memory_kind for a in jax.live_arrays()
             if a.shape == shape and a.dtype == dtype]
    return kinds.count("device") / per_slot, kinds.count("pinned_host") / per_slot


def _slots(phase: str, t: int, M: int, P: int):
    """(the slot that tick t of `phase` works on, the slot the next tick needs from host memory
    or None, whether the next tick works on this same slot, which then stays on the device)."""
    if phase == "token":
        return t % M, (t + 1) % M, False
    if t + 1 < M:  # the next prompt tick starts a fresh slot
        return t, None, False
    nxt = (t + 1) % M if t + 1 < M + P - 1 else 0  # token tick 0 works on slot 0
    return t % M, (None if nxt == t % M else nxt), nxt == t % M


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "specs", "phase", "t", "capacity",
                                             "do_sample", "return_logprobs", "int8_cache"),
                   donate_argnames=("work", "spare", "carry"), keep_unused=True)
def _offload_tick(graphdef, params, work, spare, incoming, carry, r, tokens, lengths, key,
                  max_new_tokens, stop_ids, pad_id, sampling, *, plan: Plan, specs, phase: str,
                  t: int, capacity: int, do_sample: bool, return_logprobs: bool,
                  int8_cache: bool):
    """One tick of generate_offloaded: (work, spare, carry, done, out) = the tick's slot on the
    device, the spare buffer (now holding `incoming`'s slot, if any), the per-device state
    (hidden state received, pipeline.MicroBatches), whether every row has stopped, and the
    tick's slot in pinned host memory. work, spare, carry and done hold each device's rows."""
    ONCE.new_program()
    body = functools.partial(_offload_tick_local, graphdef, plan=plan, phase=phase, t=t,
                             capacity=capacity, do_sample=do_sample,
                             return_logprobs=return_logprobs, int8_cache=int8_cache)
    batch = PS("dp")
    fn = jax.shard_map(body, mesh=plan.mesh, in_specs=(
        jax.tree.unflatten(*specs), _ROWS, _ROWS, PS(), batch, batch, PS(), PS(), PS(), PS(),
        PS()), out_specs=_ROWS, check_vma=False)
    rows = NamedSharding(plan.mesh, _ROWS)
    if incoming is not None:  # issued first: the copy overlaps the tick's compute
        spare = jax.device_put(incoming, rows)
    work, carry, done = fn(params, work, carry, r, tokens, lengths, key, max_new_tokens, stop_ids,
                           pad_id, sampling)
    keep = _slots(phase, t, plan.par.micro_batches, plan.par.pp)[2]
    out = None if keep else jax.device_put(work, rows.with_memory_kind("pinned_host"))
    return work, spare, carry, done, out


def _offload_tick_local(graphdef, params, work, carry, r, tokens, lengths, key, max_new_tokens,
                        stop_ids, pad_id, sampling, *, plan: Plan, phase, t, capacity, do_sample,
                        return_logprobs, int8_cache):
    st = _Stage(graphdef, params, plan)
    tokens, lengths = tokens[0], lengths[0]  # [M, b, T], [M, b]
    b, T = tokens.shape[1:]
    key, pick, mbs = _start(st, b, key, sampling, pad_id, capacity=capacity, do_sample=do_sample,
                            return_logprobs=return_logprobs)
    if carry is None:  # the first tick
        carry = dict(recv=jnp.zeros((b, T, st.model.cfg.hidden_size),
                                    st.model.embed.embedding.dtype), mbs=mbs)
    recv, mbs = carry["recv"], carry["mbs"]
    if phase == "prompt":
        old = _new_cache(st, b, capacity, int8_cache) if t < st.M else work
        recv, work, mbs = _prompt_tick(st, t, recv, tokens, lengths, old, mbs, pick, key,
                                       stop_ids)
    else:
        recv, work, mbs = _token_tick(st, t, r, recv, work, mbs, pick, key, stop_ids,
                                      max_new_tokens - 1)
    return work, dict(recv=recv, mbs=mbs), _all_done(st, mbs)[None]
