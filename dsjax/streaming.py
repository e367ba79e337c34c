"""Streaming: generate's own program, which hands each step's tokens to the host as it makes
them (an ordered host callback inside the decode loop, compiled in only when streaming), run in
a thread while the caller's iterator yields them.

One program, the same loop as generate's: a program cut into host-driven steps instead loses
what XLA hoists out of the loop (measured: docs/decisions.md#streaming-by-host-callback). The
non-streaming generate() compiles without the callback and is untouched by this module.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import decoding
from dsjax import generate as gen

_IDS = itertools.count()


def _steps(engine, p: decoding.Prepared, key, fill: int):
    """Yields (last tokens [B'], tokens made so far [B'], done [B']) after the prefill and each
    decode step, as the device makes them. Closing the iterator early lets the program run out
    in its thread, unheard."""
    if engine.runner.plan is not None:
        raise ValueError("streaming runs on one device; this engine is over a mesh")
    prog = dataclasses.replace(decoding.program(engine, p, return_logprobs=False), stream=True)
    sid, steps, failed = next(_IDS), queue.Queue(), []
    gen.STREAMS[sid] = lambda *rows: steps.put(tuple(np.asarray(r) for r in rows))
    args = (engine.graphdef, engine.params, jnp.asarray(p.tokens), jnp.asarray(p.lengths), key,
            jnp.int32(fill), decoding.device_request(p.request), jnp.int32(sid))

    def run():
        try:
            jax.block_until_ready(gen.generate(*args, prog=prog))
        except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
            failed.append(e)
        finally:
            steps.put(None)

    threading.Thread(target=run, daemon=True, name="dsjax-stream").start()
    try:
        while (item := steps.get()) is not None:
            yield item
    finally:
        gen.STREAMS[sid] = lambda *rows: None  # an early close: the rest is dropped
    gen.STREAMS.pop(sid, None)
    if failed:
        raise failed[0]


def steps(engine, p: decoding.Prepared, key, fill: int):
    """Yields, per decode step, each real row's new tokens as a list (empty when the row
    produced none: finished, or stopped before this step)."""
    n = len(p.rows) * p.samples
    seen = np.zeros((n,), np.int64)
    for token, count, _ in _steps(engine, p, key, fill):
        made = count[:n] > seen
        seen = np.maximum(seen, count[:n])
        yield [[int(token[r])] if made[r] else [] for r in range(n)]


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
