"""KV-cache offload (pipeline_parallel offload_kv) on 8 simulated CPU devices: the same greedy
tokens and log-probabilities as the engine without offload (PP1 and PP2, M = 2 and 4, M < P,
data parallel, a padded batch, an EOS stop), and the slots really live in pinned host memory
between their ticks, with at most two slots on the device (on the CPU the memory kinds are
distinct arrays and program layouts but one memory: the GPU benchmark measures the bytes)."""

import re

import jax
import numpy as np
import pytest

from dsjax.parallel import offload, pipeline
from tests.conftest import prompt
from tests.parallel.test_parallel import ROWS, V, _engine, hf_tokens, one_layer_a_stage, reference

if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX starts",
                allow_module_level=True)

N = 10
PADDED = ROWS + [prompt(8, 6, V), prompt(9, 1, V), prompt(10, 11, V)]  # lengths 9 3 14 6 1 11


# The GQA model with one layer a stage (test_parallel's: a stage's layer loop adds nothing to the
# slots' schedule; at PP4 the four-layer model, whose PP4 M2 plain engine is test_parallel's
# too). Every layout's plain engine must make HF's tokens.
PP2 = one_layer_a_stage(2)
# stop ids past the vocabulary, which no step produces: eight columns of stop ids, as
# test_offload_stops_at_eos_like_the_plain_engine's (its PP2 M2 engines run this case's programs)
NEVER = list(range(V, V + 8))


def _pair(hf, tp, pp, M, **kw):
    """(engine without offload, engine with offload) of the same layout."""
    return [_engine(hf, tp, pp, pipe={"micro_batches": M, "offload_kv": off}, **kw)
            for off in (False, True)]


def _recorded(engine, rows, **kw):
    """(engine.generate(rows, **kw), its offload tick programs as offload.Tick records)."""
    with engine.runner.record_ticks() as ticks:
        return engine.generate(rows, **kw), ticks


# PP1 (its ticks: fresh slots, then the last prompt tick prefetches slot 0, then token ticks
# that each take the next slot), PP2 with M = P (a tick that keeps its slot on the device) and
# with M > P (two of four slots on the device), M < P (idle ticks), data parallel; TP at PP1 and
# PP2
CASES = [(2, 1, 2, {}, []), (1, 2, 2, {}, NEVER), (2, 2, 4, {}, []), (1, 4, 2, {}, []),
         (1, 2, 2, {"data_parallel": {"dp_size": 2}}, [])]


@pytest.mark.parametrize("tp,pp,M,kw,eos", CASES,
                         ids=["tp2-pp1-m2", "pp2-m2", "tp2-pp2-m4", "pp4-m2-idle-ticks",
                              "dp2-pp2-m2"])
def test_offload_gives_the_same_tokens_and_logprobs(tp, pp, M, kw, eos):
    model = one_layer_a_stage(pp)
    plain, offloaded = _pair(reference(model)[0], tp, pp, M, **kw)
    ref = plain.generate(PADDED, max_new_tokens=N, eos_token_id=eos, return_logprobs=True)
    out, ticks = _recorded(offloaded, PADDED, max_new_tokens=N, eos_token_id=eos,
                           return_logprobs=True)
    assert ref.sequences == hf_tokens(model, PADDED)
    assert out.sequences == ref.sequences
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    _check_idle_slots_in_pinned_host_memory(ticks, M)


def _check_idle_slots_in_pinned_host_memory(ticks: list[offload.Tick], M: int):
    """After every tick at most two slots are on the device (the one worked on and the next,
    prefetched) and the others in pinned host memory; a token tick's compiled program takes the
    next slot from host memory (S(5) layouts), gives its own slot back to host memory and works
    in place on the two donated device buffers."""
    token = [tick for tick in ticks if tick.phase == "token"]
    assert max(tick.on_device for tick in ticks) <= 2
    # after a token tick: the two device buffers, the M - 1 idle slots and the tick's own slot
    # just sent to host memory (the slot it prefetched is freed there once the tick has run)
    assert [tick.on_device for tick in token] == [2] * len(token)
    assert all(tick.on_host >= M for tick in token)
    text = token[0].lower().compile().as_text()
    layout = re.search(r"entry_computation_layout=(.*)", text).group(1)
    params, results = layout.split(")->")
    per_slot = len(jax.tree.leaves(token[0].args[2]))  # the work buffers' leaves
    assert params.count("S(5)") == per_slot  # the incoming slot
    assert results.count("S(5)") == per_slot  # the tick's own slot, sent back
    aliased = re.search(r"input_output_alias=\{(.*?)\}, entry", text).group(1)
    assert aliased.count("may-alias") >= 2 * per_slot  # work and spare updated in place


def test_offload_stops_at_eos_like_the_plain_engine():
    """Every row stops at its first stop token (each meets one by its second token); the
    offloaded loop ends with the round in which the last row stopped (eight rows: no filler
    rows; test_fillers.py covers those). The stop ids fill NEVER's eight columns (the rest past
    the vocabulary), so the engines run the programs of the pp2-m2 case above."""
    plain, offloaded = _pair(reference(PP2)[0], 1, 2, 2)
    rows = PADDED + [prompt(11, 4, V), prompt(12, 8, V)]
    expected = hf_tokens(PP2, rows)
    stops = sorted({e[1] for e in expected})
    assert len(stops) <= len(NEVER)
    stops += NEVER[len(stops):]
    ref = plain.generate(rows, max_new_tokens=N, eos_token_id=stops, return_logprobs=True)
    out, ticks = _recorded(offloaded, rows, max_new_tokens=N, eos_token_id=stops,
                           return_logprobs=True)
    cut = [min(e.index(s) for s in stops if s in e) + 1 for e in expected]
    assert out.sequences == ref.sequences == [e[:n] for e, n in zip(expected, cut)]
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    all_rounds = pipeline._rounds(N - 1, 2, 2, 2)
    assert len(ticks) < (2 + 2 - 1) + all_rounds * 2


def test_offload_sampling_draws_the_same_tokens():
    plain, offloaded = _pair(reference(PP2)[0], 1, 2, 2)
    kw = dict(max_new_tokens=N, eos_token_id=[], do_sample=True, top_k=20,
              prng_key=jax.random.key(3))
    assert offloaded.generate(PADDED, **kw).sequences == plain.generate(PADDED, **kw).sequences
