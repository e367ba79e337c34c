"""JAX's persistent compilation cache, on by default: a process that builds a program another
process compiled before (on this machine, with the same JAX, backend and flags) reads it from
disk instead of compiling it again.

The directory: the user's own choice if JAX already has one (`JAX_COMPILATION_CACHE_DIR`, or
`jax.config.update("jax_compilation_cache_dir", ...)`), else `DSJAX_CACHE_DIR`, else
`$XDG_CACHE_HOME/dsjax/jax` (`~/.cache/dsjax/jax`). `DSJAX_COMPILATION_CACHE=0` (or the CLI's
`--no-compilation-cache`) leaves JAX as it is (no cache unless JAX was given one). JAX keys each entry by the program, the JAX and XLA
versions, the backend and the compile options, so one directory serves them all; JAX only
writes programs that took at least `jax_persistent_cache_min_compile_time_secs` to compile.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger("dsjax")
OFF = ("0", "false", "off", "no")


def directory() -> Path | None:
    """Where the cache is, or None when it is off (without turning it on)."""
    if os.environ.get("DSJAX_COMPILATION_CACHE", "1").strip().lower() in OFF:
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if os.environ.get("DSJAX_CACHE_DIR"):
        return Path(os.environ["DSJAX_CACHE_DIR"]).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home) / "dsjax" / "jax"


def enable() -> Path | None:
    """Turns the cache on (once per process; see the module docstring); returns its directory,
    or None when it is off."""
    path = directory()
    if path is None or jax.config.jax_compilation_cache_dir == str(path):
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: compile as before, and say so
        log.warning("dsjax: no persistent compilation cache (%s: %s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    log.info("dsjax: persistent compilation cache in %s (DSJAX_COMPILATION_CACHE=0: off)", path)
    return path
