"""How an engine executes: on one device, or over a (dp, pp, tp) mesh. Both runners hold the
model's graphdef and placed params and offer the same calls, so an engine never branches on
which one it has."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import generate as gen
from dsjax.encoders import module_for
from dsjax.model import abstract_model, flatten
from dsjax.parallel import distributed, offload, pipeline
from dsjax.weights import stored_params


class LocalRunner:
    """One device: the jitted functions of dsjax.generate."""

    plan = None
    batch_groups = 1  # the packed batch is cut into this many equal groups

    def __init__(self, graphdef, params):
        self.graphdef, self.params = graphdef, params

    def forward(self, ids: np.ndarray, mask: np.ndarray):
        """Logits [B, T, V] of right- or left-padded ids and mask [B, T]."""
        return gen.forward(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(mask))

    def generate_program(self, tokens, lengths, key, pad_id, request: gen.Request, *,
                         prog: gen.Program):
        """(jitted function, its arguments, its keyword arguments) of one generate call on
        packed prompts tokens [B', T], lengths [B'] (see gen.generate for the rest): `fn(*args,
        **kw)` runs it, `fn.lower(*args, **kw)` shows its program."""
        return gen.generate, (self.graphdef, self.params, tokens, lengths, key, pad_id,
                              request), dict(prog=prog)

    def rows(self, x):
        """A generate output [B', ...] as one row per packed prompt."""
        return x

    def cache_shards(self, cfg) -> int:
        """Into how many parts one device's share cuts a KV cache (see Parallel.cache_shards)."""
        return 1

    @property
    def device(self):
        """The device the KV cache lives on (a mesh: its first)."""
        return next(iter(jax.tree.leaves(self.params)[0].devices()))

    def stored_params(self) -> dict:
        """The params in the layout checkpoints store."""
        return stored_params(self.params)

    def num_params(self) -> int:
        """Logical parameters (a quantized [K, N] weight counts K * N)."""
        return sum(int(np.prod(x.shape)) for x in flatten(self.params).values())


class MeshRunner:
    """A mesh: pipeline stages and tensor slices inside one shard_map (dsjax.parallel); the
    batch is cut [dp, micro-batches, b]."""

    def __init__(self, plan: pipeline.Plan, graphdef, params):
        self.plan, self.graphdef, self.params = plan, graphdef, params
        self.specs = pipeline.hashable_specs(params)
        self.batch_groups = plan.par.dp * plan.par.micro_batches
        self._ticks: list | None = None

    @contextlib.contextmanager
    def record_ticks(self):
        """Within this block, each KV-offloaded generate of this runner appends one
        offload.Tick per tick program to the list it yields (nothing without offload_kv)."""
        self._ticks = []
        try:
            yield self._ticks
        finally:
            self._ticks = None

    def forward(self, ids: np.ndarray, mask: np.ndarray):
        B, dp = ids.shape[0], self.plan.par.dp
        rows = -(-B // dp) * dp
        ids, mask = (np.concatenate([a, np.repeat(a[-1:], rows - B, 0)]).reshape(dp, rows // dp, -1)
                     for a in (ids, mask))
        logits = distributed.gather(pipeline.forward(
            self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(mask), plan=self.plan,
            specs=self.specs))
        return logits.reshape(rows, *logits.shape[2:])[:B]

    def generate_program(self, tokens, lengths, key, pad_id, request: gen.Request, *,
                         prog: gen.Program):
        """As LocalRunner's; the program of the mesh (with offload_kv, `fn` is a Python loop over
        per-tick programs and has no `lower`). Over a mesh every row takes the same settings:
        temperature, top-k and top-p sampling or greedy, stop tokens, no other processor."""
        par = self.plan.par
        max_new, stop_ids, sampling = _mesh_request(request, prog)
        cut = lambda a: a.reshape(par.dp, par.micro_batches, -1, *a.shape[1:])  # noqa: E731
        args = (self.graphdef, self.params, cut(tokens), cut(lengths), key, max_new, stop_ids,
                pad_id, sampling)
        kw = dict(plan=self.plan, specs=self.specs, capacity=prog.capacity,
                  do_sample=prog.features.do_sample, return_logprobs=prog.return_logprobs,
                  int8_cache=prog.int8_cache)
        if par.offload_kv:
            return offload.generate_offloaded, args, dict(kw, ticks=self._ticks)
        if distributed.multiprocess():
            return _gathered(pipeline.generate), args, kw
        return pipeline.generate, args, kw

    def rows(self, x):
        return x.reshape(-1, *x.shape[3:])  # [dp, M, b, ...] -> [B', ...]

    def cache_shards(self, cfg) -> int:
        return self.plan.par.cache_shards(cfg)

    @property
    def device(self):
        """The mesh's first device of this process."""
        return distributed.first_own(self.plan.mesh.devices.flat)

    def stored_params(self) -> dict:
        raise ValueError("save() writes single-device checkpoints; this engine's weights are "
                         "sliced over a mesh: save from an engine built without "
                         "tensor/pipeline parallelism (or use `dsjax convert`)")

    def num_params(self) -> int:
        """The one-device model's count (no vocabulary padding or replicated KV heads)."""
        cfg = self.plan.cfg
        _, expected = abstract_model(cfg, module=module_for(cfg))
        return sum(int(np.prod(x.shape)) for x in expected.values())


def _gathered(fn):
    """fn whose outputs, sharded over several processes' devices, reach every process whole."""
    def run(*args, **kw):
        return distributed.gather(fn(*args, **kw))
    run.lower = fn.lower
    return run


def _mesh_request(req: gen.Request, prog: gen.Program):
    """(max_new_tokens, stop ids, one-row sampling) of a request the mesh programs can run, or
    a clear error naming what they cannot."""
    import dataclasses

    f = prog.features
    extra = [k for k, v in dataclasses.asdict(f).items() if v and k != "do_sample"]
    if extra or prog.samples > 1:
        raise ValueError(f"over a mesh, generate() does temperature / top-k / top-p sampling "
                         f"and greedy decoding only; this call needs {extra or ['num_return_sequences']}: "
                         "run it on an engine of one device")
    uniform = [np.all(np.asarray(x) == np.asarray(x)[:1]) for x in jax.tree.leaves(req)]
    if not all(uniform):
        raise ValueError("over a mesh every prompt of a call takes the same settings and "
                         "max_new_tokens (per_prompt and max_length per prompt need one device)")
    first = jax.tree.map(lambda x: x[:1], req.sampling)
    return jnp.max(req.limit), req.sampling.eos[0], first


def device_bytes(params) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))
