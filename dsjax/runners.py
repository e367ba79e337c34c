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
from dsjax.parallel import offload, pipeline
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

    def generate_program(self, tokens, lengths, *args, **kw):
        """(jitted function, its arguments, its keyword arguments) of one generate call on
        packed prompts tokens [B', T], lengths [B'] (see gen.generate for the rest): `fn(*args,
        **kw)` runs it, `fn.lower(*args, **kw)` shows its program."""
        return gen.generate, (self.graphdef, self.params, tokens, lengths, *args), kw

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
        logits = pipeline.forward(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(mask),
                                  plan=self.plan, specs=self.specs)
        return logits.reshape(rows, *logits.shape[2:])[:B]

    def generate_program(self, tokens, lengths, *args, **kw):
        """As LocalRunner's; the program of the mesh (with offload_kv, `fn` is a Python loop over
        per-tick programs and has no `lower`)."""
        par = self.plan.par
        cut = lambda a: a.reshape(par.dp, par.micro_batches, -1, *a.shape[1:])  # noqa: E731
        kw = dict(kw, plan=self.plan, specs=self.specs)
        if par.offload_kv:
            return offload.generate_offloaded, (self.graphdef, self.params, cut(tokens),
                                                cut(lengths), *args), dict(kw, ticks=self._ticks)
        return pipeline.generate, (self.graphdef, self.params, cut(tokens), cut(lengths), *args), kw

    def rows(self, x):
        return x.reshape(-1, *x.shape[3:])  # [dp, M, b, ...] -> [B', ...]

    def cache_shards(self, cfg) -> int:
        return self.plan.par.cache_shards(cfg)

    @property
    def device(self):
        return self.plan.mesh.devices.flat[0]

    def stored_params(self) -> dict:
        raise ValueError("save() writes single-device checkpoints; this engine's weights are "
                         "sliced over a mesh: save from an engine built without "
                         "tensor/pipeline parallelism (or use `dsjax convert`)")

    def num_params(self) -> int:
        """The one-device model's count (no vocabulary padding or replicated KV heads)."""
        cfg = self.plan.cfg
        _, expected = abstract_model(cfg, module=module_for(cfg))
        return sum(int(np.prod(x.shape)) for x in expected.values())


def device_bytes(params) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))
