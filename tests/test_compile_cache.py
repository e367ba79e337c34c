"""The persistent compilation cache (dsjax.compile_cache) in fresh processes: the first one
writes its programs under the user's cache directory, the second reads them back instead of
compiling; DSJAX_COMPILATION_CACHE=0 adds none, and a directory the user gave JAX wins."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

from dsjax import compile_cache

SCRIPT = """
import json, jax, dsjax
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
engine = dsjax.init_inference("tiny-gpt2", dtype="fp32", max_out_tokens=32, progress=False)
out = engine.generate([[1, 2, 3]], max_new_tokens=4).sequences[0]
print(json.dumps({"hits": len(hits), "dir": jax.config.jax_compilation_cache_dir, "out": out}))
"""


def _run(tmp_path, **env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "DSJAX_"))}
    clean.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=clean, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_reads_the_first_ones_programs(tmp_path):
    where = tmp_path / "dsjax" / "jax"
    first = _run(tmp_path)
    assert first["dir"] == str(where) and first["hits"] == 0
    written = {p.name for p in where.iterdir()}
    assert any(name.startswith("jit_") for name in written)
    second = _run(tmp_path)
    assert second["hits"] >= 1 and second["out"] == first["out"]


def test_off_and_the_users_own_directory(tmp_path, monkeypatch):
    """DSJAX_COMPILATION_CACHE=0: no directory; a JAX directory of the user's own: that one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("DSJAX_COMPILATION_CACHE", "0")
    assert compile_cache.directory() is None and compile_cache.enable() is None
    monkeypatch.setenv("DSJAX_COMPILATION_CACHE", "1")
    assert compile_cache.directory() == Path(jax.config.jax_compilation_cache_dir)  # (the
    # suite's own, set by tests/conftest.py before JAX started)
    assert not (tmp_path / "dsjax").exists()
