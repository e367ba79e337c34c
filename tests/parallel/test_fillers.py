"""Filler rows (that only pad the batch to its bucket) are finished from the start on a mesh
too, in the one-program pipeline and in the offloaded one, so an early stop never waits for
them. 8 simulated CPU devices (tests/conftest.py)."""

import jax
import pytest

from tests.conftest import prompt
from tests.parallel.test_parallel import V, _engine, gqa_llama
from tests.test_generate import filler_rows_finished

if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX starts",
                allow_module_level=True)


@pytest.mark.parametrize("offload", [False, True], ids=["one_program", "offload_kv"])
def test_filler_rows_finished_on_a_pipeline(offload):
    engine = _engine(gqa_llama(), 2, 2, pipe={"micro_batches": 2, "offload_kv": offload})
    prompts = [prompt(50 + i, 3 + 2 * i, V) for i in range(5)]  # M 2 x 4 rows: 3 fillers
    free = engine.generate(prompts, max_new_tokens=16, eos_token_id=[]).sequences
    stops = sorted({row[2] for row in free})
    B, count, out = filler_rows_finished(engine, prompts, stop=stops)
    real = [b for b in range(B) if b < len(prompts)]
    assert B == 8 and all(count[b] == 0 and (out[b] == 0).all() for b in range(5, 8))
    for b in real:
        n = min(i for i, t in enumerate(free[b]) if t in stops) + 1
        assert count[b] == n and out[b, :n].tolist() == free[b][:n]
