"""generate(): padding, sampling, stop tokens, logprobs, recompilation, the token budget."""

import jax
import numpy as np
import pytest

from dsjax import generate as gen
from dsjax.prompts import bucket
from tests.conftest import hf_greedy, hf_greedy_logprobs, prompt


@pytest.mark.parametrize("pair", ["gpt2_pair", "llama_pair"])
def test_padded_batch_equals_single_prompts(pair, request):
    model, engine = request.getfixturevalue(pair)
    prompts = [prompt(10, 3), prompt(11, 11), prompt(12, 7)]
    batch = engine.generate(prompts, max_new_tokens=12, eos_token_id=[]).sequences
    singles = [engine.generate([p], max_new_tokens=12, eos_token_id=[]).sequences[0] for p in prompts]
    assert batch == singles
    assert batch[0] == hf_greedy(model, prompts[0], 12)


def test_hf_style_left_padded_array(llama_pair):
    _, engine = llama_pair
    prompts = [prompt(13, 4), prompt(14, 9)]
    ids = np.zeros((2, 9), np.int64)
    mask = np.zeros((2, 9), np.int64)
    for b, p in enumerate(prompts):
        ids[b, 9 - len(p):], mask[b, 9 - len(p):] = p, 1
    left = engine.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).sequences
    assert left == engine.generate(prompts, max_new_tokens=8, eos_token_id=[]).sequences


def test_stop_token_ends_each_sequence(gpt2_pair):
    model, engine = gpt2_pair
    p = prompt(15, 6)
    free = engine.generate([p], max_new_tokens=16, eos_token_id=[]).sequences[0]
    stop = free[5]
    first = free.index(stop)
    out = engine.generate([p, prompt(16, 4)], max_new_tokens=16, eos_token_id=stop, pad_token_id=0)
    assert out.sequences[0] == free[: first + 1]
    assert out.tokens[0, first + 1:].tolist() == [0] * (16 - first - 1)
    assert out.sequences[0] == hf_greedy(model, p, 16, eos_token_id=stop)


def filler_rows_finished(engine, prompts, **kw):
    """generate()'s packed program on `prompts` with a stop token that ends every row early:
    (number of real rows, counts, tokens) of all packed rows, filler rows included."""
    fn, args, kwargs = engine.greedy_program(prompts, 16, stop_ids=kw["stop"], int8_cache=False)
    out, count, _ = fn(*args, **kwargs)
    rows = int(np.prod(args[2].shape[:-1]))  # packed prompts (cut [dp, M, b] over a mesh)
    out, count = np.asarray(out), np.asarray(count)
    return rows, count.reshape(-1), out.reshape(-1, out.shape[-1])


def test_filler_rows_do_not_hold_up_an_early_stop(gpt2_pair):
    """3 prompts fill a bucket of 4: the filler row must be finished from the start (no tokens),
    or the loop would run to max_new_tokens after every real row has stopped."""
    _, engine = gpt2_pair
    prompts = [prompt(40, 5), prompt(41, 7), prompt(42, 3)]
    free = engine.generate(prompts, max_new_tokens=16, eos_token_id=[]).sequences
    stops = sorted({row[2] for row in free})  # every row stops by its third token
    B, count, out = filler_rows_finished(engine, prompts, stop=stops)
    assert B == 4
    assert count[3] == 0 and (out[3] == 0).all()
    for b, row in enumerate(free):
        n = min(i for i, t in enumerate(row) if t in stops) + 1
        assert count[b] == n and out[b, :n].tolist() == row[:n]


def test_sampling_reproducible_and_key_dependent(llama_pair):
    _, engine = llama_pair
    p = [prompt(17, 5)]
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.5, eos_token_id=[])
    a = engine.generate(p, prng_key=jax.random.key(1), **kw).sequences
    b = engine.generate(p, prng_key=jax.random.key(1), **kw).sequences
    c = engine.generate(p, prng_key=jax.random.key(2), **kw).sequences
    assert a == b
    assert a != c


def test_top_k_1_and_tiny_top_p_are_greedy(llama_pair):
    _, engine = llama_pair
    p = [prompt(18, 6)]
    greedy = engine.generate(p, max_new_tokens=10, eos_token_id=[]).sequences
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        out = engine.generate(p, max_new_tokens=10, eos_token_id=[], do_sample=True, temperature=2.0,
                              prng_key=jax.random.key(3), **kw).sequences
        assert out == greedy


def test_logprobs_are_hfs(llama_pair):
    model, engine = llama_pair
    p = prompt(19, 5)
    out = engine.generate([p], max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    tokens, logprobs = hf_greedy_logprobs(model, p, 6)
    assert out.sequences[0] == tokens
    np.testing.assert_allclose(out.logprobs[0], logprobs, atol=1e-4)


def test_no_recompile_for_same_bucket(gpt2_pair):
    _, engine = gpt2_pair
    engine.generate([prompt(20, 5)], max_new_tokens=4)
    before = gen.generate._cache_size()  # compiled programs
    engine.generate([prompt(21, 5)], max_new_tokens=4)  # same shapes
    engine.generate([prompt(22, 9)], max_new_tokens=7)  # other length, same bucket (16)
    engine.generate([prompt(23, 3)], max_new_tokens=2, do_sample=False, eos_token_id=[5])
    assert gen.generate._cache_size() == before
    engine.generate([prompt(24, 70)], max_new_tokens=4)  # bucket 128, used by no other test
    assert gen.generate._cache_size() == before + 1


def test_budget_checked_before_compute(gpt2_pair):
    _, engine = gpt2_pair
    before = gen.generate._cache_size()
    with pytest.raises(ValueError, match=r"100 tokens \+ max_new_tokens=40 = 140 .* max_out_tokens=128"):
        engine.generate([prompt(25, 100)], max_new_tokens=40)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.generate([prompt(25, 10)], max_new_tokens=0)
    assert gen.generate._cache_size() == before


def test_bad_requests(gpt2_pair):
    _, engine = gpt2_pair
    with pytest.raises(ValueError, match="prng_key"):
        engine.generate([[1, 2]], do_sample=True)
    with pytest.raises(ValueError, match="token ids must lie"):
        engine.generate([[1, 500]])
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1, 2]], do_sample=True, temperature=0.0, prng_key=jax.random.key(0))
    with pytest.raises(ValueError, match="contiguous"):
        engine.generate(np.ones((1, 4), int), attention_mask=[[1, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"pad_token_id must lie in \[0, 96\)"):
        engine.generate([[1, 2, 3]], pad_token_id=101)
    with pytest.raises(ValueError, match="130 tokens exceed the 128 learned positions"):
        engine(np.ones((1, 130), int))


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
    assert [bucket(n, minimum=1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
