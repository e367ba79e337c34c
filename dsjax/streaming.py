"""Streaming: the decode loop of dsjax.generate cut into programs the host drives, so tokens
reach the caller as they are made.

`start_program` prefills and picks the first token; each `advance_program` call runs one more
step (the state is donated: updated in place). The host dispatches step k + 1 before it reads
step k's tokens, so the device never waits for the host; the non-streaming generate() runs the
whole loop in one program and is untouched by this module.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dsjax import decoding
from dsjax import generate as gen


def _chunks(engine, p: decoding.Prepared, key, fill: int):
    """Yields (tokens [B, k] from column `at`, at, [2, B] counts and done flags) after the
    prefill and after each later step, reading step k while step k + 1 runs."""
    if engine.runner.plan is not None:
        raise ValueError("streaming runs on one device; this engine is over a mesh")
    prog = decoding.program(engine, p, return_logprobs=False)
    req = decoding.device_request(p.request)
    pad = jnp.int32(fill)
    state, *current = gen.start_program(engine.graphdef, engine.params, jnp.asarray(p.tokens),
                                        jnp.asarray(p.lengths), key, pad, req, prog=prog)
    for _ in range(p.width - 1):
        state, *nxt = gen.advance_program(engine.graphdef, engine.params, state, pad, req,
                                          prog=prog, steps=1)  # dispatched, not awaited
        cols, at, info = (np.asarray(x) for x in current)  # waits for the step before
        yield cols, int(at), info
        if info[1].all():
            return
        current = nxt
    cols, at, info = (np.asarray(x) for x in current)
    yield cols, int(at), info


def steps(engine, p: decoding.Prepared, key, fill: int):
    """Yields, per decode step, each real row's new tokens as a list (empty when the row
    produced none: finished, or stopped before this step)."""
    n = len(p.rows) * p.samples
    seen = np.zeros((n,), np.int64)
    for cols, at, info in _chunks(engine, p, key, fill):
        count = info[0, :n]
        chunk = []
        for r in range(n):
            new = range(max(seen[r], at), min(count[r], at + cols.shape[1]))
            chunk.append([int(cols[r, j - at]) for j in new])
            seen[r] = max(seen[r], count[r])
        yield chunk


def to_streamer(engine, p: decoding.Prepared, key, fill: int, pad: int, streamer,
                return_logprobs: bool) -> decoding.GenerationOutput:
    """generate(streamer=...): transformers' protocol (put the prompt, then each new token as
    a [1] array, then end()); one prompt, one sequence, as transformers allows."""
    if len(p.rows) != 1 or p.samples != 1:
        raise ValueError("streamer= streams one prompt and one sequence (as transformers' "
                         "streamers do); for batches use engine.stream()")
    if return_logprobs:
        raise ValueError("streamer= does not return logprobs; call generate() without it")
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put() and end() methods (transformers' "
                        f"streamer protocol), got {type(streamer).__name__}")
    streamer.put(np.asarray(p.rows[0])[None].astype(np.int64))
    made: list[int] = []
    for chunk in steps(engine, p, key, fill):
        for t in chunk[0]:
            streamer.put(np.asarray([t], np.int64))
        made += chunk[0]
    streamer.end()
    out = np.full((1, p.width), pad, np.int32)
    out[0, :len(made)] = made
    return decoding.GenerationOutput(out, np.asarray([len(made)]), None)
