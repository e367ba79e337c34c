"""Several processes, one mesh: JAX's multi-controller runtime (one process per host, each
holding only its own devices' shards of every global array).

`initialize()` joins the processes (dsjax's environment variables, else JAX's own cluster
detection); `place` builds a global array from a host array that every process holds (or can
read) identically, each process touching only the slices its devices keep; `gather` gives every
process the whole of a global output.

    DSJAX_COORDINATOR      host:port of process 0's coordination service
    DSJAX_NUM_PROCESSES    how many processes join
    DSJAX_PROCESS_ID       this process's rank, 0 .. N-1
    DSJAX_HEARTBEAT_TIMEOUT  seconds after which a silent process counts as dead (default 30)
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Sharding

from dsjax.integrity import NonFiniteWeights
from dsjax.lazy import Lazy

ENV = ("DSJAX_COORDINATOR", "DSJAX_NUM_PROCESSES", "DSJAX_PROCESS_ID")
HEARTBEAT_TIMEOUT = 30  # seconds; JAX's default (100) leaves a survivor waiting long
INIT_TIMEOUT = 120  # seconds for every process to join


def initialize() -> None:
    """Joins this process to the others (nothing when already joined, e.g. by the caller's own
    jax.distributed.initialize). Must run before JAX touches a device."""
    if jax.distributed.is_initialized():
        return
    kw = _env_arguments()
    beat = kw.pop("heartbeat", HEARTBEAT_TIMEOUT)
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes
    try:
        jax.distributed.initialize(**kw, initialization_timeout=INIT_TIMEOUT,
                                   heartbeat_timeout_seconds=beat)
    except ValueError as e:
        if kw:
            raise
        raise ValueError(f"distributed=True found no cluster ({e}): set {', '.join(ENV)} "
                         "(dsjax launch does), or JAX's own JAX_COORDINATOR_ADDRESS, "
                         "JAX_NUM_PROCESSES and JAX_PROCESS_ID") from e
    except RuntimeError as e:
        if "before" in str(e):
            raise RuntimeError(f"distributed=True must join the other processes before JAX "
                               f"uses a device (call init_inference(..., distributed=True) "
                               f"or jax.distributed.initialize first): {e}") from e
        raise


def _env_arguments() -> dict:
    """jax.distributed.initialize's arguments from DSJAX_* (empty: JAX detects the cluster
    itself, e.g. from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    given = [k for k in ENV if os.environ.get(k)]
    if not given:
        return {}
    if len(given) < len(ENV):
        raise ValueError(f"distributed=True: set all of {', '.join(ENV)} (only "
                         f"{', '.join(given)} set)")
    try:
        n, rank = int(os.environ[ENV[1]]), int(os.environ[ENV[2]])
        beat = int(os.environ.get("DSJAX_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT))
    except ValueError as e:
        raise ValueError(f"distributed=True: {ENV[1]}, {ENV[2]} and DSJAX_HEARTBEAT_TIMEOUT "
                         f"must be integers: {e}") from e
    if not 0 <= rank < n:
        raise ValueError(f"{ENV[2]}={rank} must be in 0..{n - 1} ({ENV[1]}={n})")
    return dict(coordinator_address=os.environ[ENV[0]], num_processes=n, process_id=rank,
                heartbeat=beat)


def multiprocess() -> bool:
    return jax.process_count() > 1


def first_own(devices):
    """The first of `devices` that belongs to this process."""
    return next(d for d in devices if d.process_index == jax.process_index())


def place(x, sharding: Sharding) -> jax.Array:
    """A global array of host array `x` (the same on every process, or a dsjax.lazy tensor):
    each process reads and slices out only the blocks its own devices hold, each distinct
    block once (replicas share it)."""
    if sharding.is_fully_addressable and not isinstance(x, Lazy):
        return jax.device_put(x, sharding)
    blocks = {}

    def block(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = np.asarray(x[index])
        return blocks[key]
    return jax.make_array_from_callback(np.shape(x), sharding, block)


_ERROR_BYTES = 2048


def agree(error: Exception | None) -> None:
    """Every process raises if any process met an error in a step that each does on its own
    slices (a bad weight only one process reads): its own error where it has one, else the
    first failing process's, by type and message; one process: `error` as it is."""
    if not multiprocess():
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    text = b"" if error is None else f"{type(error).__name__}\n{error}".encode()[:_ERROR_BYTES]
    mine = np.zeros(_ERROR_BYTES + 1, np.uint8)  # [failed?, the message's bytes...]
    mine[0], mine[1:1 + len(text)] = bool(text), np.frombuffer(text, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    if error is not None:
        raise error
    for process, row in enumerate(everyone):
        if row[0]:
            kind, message = bytes(row[1:]).rstrip(b"\0").decode(errors="replace").split("\n", 1)
            cls = NonFiniteWeights if kind == NonFiniteWeights.__name__ else ValueError
            raise cls(f"process {process} failed ({kind}): {message}")


def gather(tree):
    """Every leaf whole on every process (global arrays sharded over other processes'
    devices are all-gathered; the rest are returned as they are)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return multihost_utils.process_allgather(x, tiled=True)
        return x
    return jax.tree.map(one, tree)
