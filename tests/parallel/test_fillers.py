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
    # the tokens without a stop (five stop ids -1, which no token is, as generate's [-1] for
    # none) and with stops come from one program: stop ids of one shape compile once
    _, count, free = filler_rows_finished(engine, prompts, stop=[-1] * 5)
    assert (count[:5] == 16).all()
    free = [free[b].tolist() for b in range(5)]
    stops = sorted({row[2] for row in free})  # every row stops by its third token
    B, count, out = filler_rows_finished(engine, prompts, stop=stops + [-1] * (5 - len(stops)))
    real = [b for b in range(B) if b < len(prompts)]
    assert B == 8 and all(count[b] == 0 and (out[b] == 0).all() for b in range(5, 8))
    for b in real:
        n = min(i for i, t in enumerate(free[b]) if t in stops) + 1
        assert count[b] == n and out[b, :n].tolist() == free[b][:n]
