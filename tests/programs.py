"""What an engine's program contains: the Pallas kernels in its jaxpr (dsjax.pallas_ops.pallas_calls).

Kernel-injection tests assert which kernels a program runs this way, independently of the log
(a cached program logs nothing) and of any fallback (a silent one would compare XLA with XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax import generate as gen
from dsjax.pallas_ops import pallas_calls, pallas_eqns  # noqa: F401 (the tests use both)


def generate_program(engine, rows, *, max_new_tokens: int = 4, int8_cache: bool = False,
                     return_logprobs: bool = False):
    """The jaxpr of the program engine.generate(rows) runs (greedy); traced, not compiled (and
    not traced again where the test already ran generate with the same static arguments)."""
    fn, args, kw = engine.greedy_program(rows, max_new_tokens, return_logprobs=return_logprobs,
                                         int8_cache=int8_cache)
    return fn.trace(*args, **kw).jaxpr


def generate_kernels(engine, rows, **kw):
    """The Pallas kernels of the program engine.generate(rows) runs (greedy)."""
    return pallas_calls(generate_program(engine, rows, **kw))


def forward_kernels(engine, ids):
    """The Pallas kernels of the program engine(ids) runs."""
    ids = jnp.asarray(ids, jnp.int32)
    return pallas_calls(jax.make_jaxpr(lambda i, m: gen.forward(engine.graphdef, engine.params,
                                                                i, m))(ids, jnp.ones_like(ids)))
