"""dsjax.sampling's logits processors and warpers against transformers' own, row by row: a
batch whose rows carry different settings (one program) equals HF's processor applied to
each row with that row's setting."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

from dsjax import sampling as smp
from dsjax import settings as st

V, B, L, P = 40, 4, 24, 10  # vocab, rows, tokens per row (the first P are the prompt)
EOS = 3


def batch(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (B, V)).astype(np.float32)
    ids = rng.integers(0, 12, (B, L))  # a small alphabet: repeats and n-grams occur
    return logits, ids


def ours(logits, ids, per_row, warp=False, length=L):
    settings = [st.GenerationSettings(eos_token_id=(EOS,), **kw) for kw in per_row]
    s = st.sampling_rows(settings, B, [P] * B)
    hist = np.zeros((B, 32), np.int32)
    hist[:, :length] = ids[:, :length]
    h = smp.History(hist, np.full((B,), length, np.int32), np.full((B,), P, np.int32))
    f = st.features(settings)
    out = smp.process(jnp.asarray(logits), s, f, h, np.full((B,), length - P, np.int32))
    return np.asarray(smp.warp(out, s, f) if warp else out)


def hf(logits, ids, make, per_row, length=L):
    rows = [make(**kw)(torch.tensor(ids[b:b + 1, :length]), torch.tensor(logits[b:b + 1]))
            for b, kw in enumerate(per_row)]
    return torch.cat(rows).numpy()


def same(a, b):
    np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
    np.testing.assert_allclose(np.where(np.isinf(a), 0, a), np.where(np.isinf(b), 0, b),
                               rtol=1e-5, atol=1e-5)


def test_repetition_penalty_over_prompt_and_output():
    logits, ids = batch(1)
    rows = [dict(repetition_penalty=p) for p in (1.0, 1.3, 0.7, 2.0)]
    same(ours(logits, ids, rows),
         hf(logits, ids, lambda repetition_penalty: lp.RepetitionPenaltyLogitsProcessor(
             repetition_penalty), rows))


@pytest.mark.parametrize("length", [1, 2, 3, L])
def test_no_repeat_ngram(length):
    logits, ids = batch(2)
    rows = [dict(no_repeat_ngram_size=n) for n in (1, 2, 3, 0)]
    expect = [lp.NoRepeatNGramLogitsProcessor(n) if n else None for n in (1, 2, 3)]
    want = hf(logits, ids, lambda no_repeat_ngram_size: expect[no_repeat_ngram_size - 1]
              if no_repeat_ngram_size else (lambda i, s: s), rows, length)
    same(ours(logits, ids, rows, length=length), want)


def test_bad_words_single_and_sequences_eos_kept():
    logits, ids = batch(3)
    tail = ids[1, -2:].tolist()  # row 1 ends with this: its continuation is banned
    rows = [dict(bad_words_ids=[[5], [EOS]]), dict(bad_words_ids=[tail + [7], [9, 9, 9, 1]]),
            dict(), dict(bad_words_ids=[[ids[3, -1], 8], [2]])]
    want = hf(logits, ids, lambda bad_words_ids=None: lp.NoBadWordsLogitsProcessor(
        bad_words_ids, EOS) if bad_words_ids else (lambda i, s: s), rows)
    same(ours(logits, ids, rows), want)
    assert np.isinf(want[1, 7]) and np.isinf(want[3, 8]) and not np.isinf(want[0, EOS])


def test_min_new_tokens_and_min_length_mask_eos():
    logits, ids = batch(4)
    rows = [dict(min_new_tokens=L - P + 1), dict(min_new_tokens=L - P), dict(min_length=L + 1),
            dict(min_length=L)]

    def make(min_new_tokens=0, min_length=0):
        if min_new_tokens:
            return lp.MinNewTokensLengthLogitsProcessor(P, min_new_tokens, EOS)
        return lp.MinLengthLogitsProcessor(min_length, EOS)
    want = hf(logits, ids, make, rows)
    same(ours(logits, ids, rows), want)
    assert np.isinf(want[0, EOS]) and not np.isinf(want[1, EOS])


def test_sequence_bias_logit_bias_suppress_tokens():
    logits, ids = batch(5)
    rows = [dict(sequence_bias=[[[4], 2.5], [[6], -1.0]]), dict(suppress_tokens=[1, 2]),
            dict(logit_bias={7: -3.0, "8": 1.5}), dict()]
    got = ours(logits, ids, rows)
    same(got[:1], hf(logits[:1], ids[:1], lambda sequence_bias: lp.SequenceBiasLogitsProcessor(
        sequence_bias), rows[:1]))
    same(got[1:2], hf(logits[1:2], ids[1:2], lambda suppress_tokens: lp.
                      SuppressTokensLogitsProcessor(suppress_tokens), rows[1:2]))
    want = logits[2].copy()
    want[7] -= 3.0
    want[8] += 1.5
    same(got[2:], np.stack([want, logits[3]]))


def test_presence_and_frequency_penalties_count_the_output_only():
    logits, ids = batch(6)
    rows = [dict(presence_penalty=0.5), dict(frequency_penalty=0.3),
            dict(presence_penalty=-0.4, frequency_penalty=0.2), dict()]
    want = logits.copy()
    for b, kw in enumerate(rows):  # OpenAI's definition, on the generated tokens
        counts = np.bincount(ids[b, P:], minlength=V)
        want[b] -= kw.get("presence_penalty", 0) * (counts > 0) + kw.get("frequency_penalty", 0) * counts
    same(ours(logits, ids, rows), want)


def test_warpers_temperature_top_k_top_p_min_p():
    logits, ids = batch(7)
    rows = [dict(do_sample=True, temperature=0.7, top_k=5), dict(do_sample=True, top_p=0.8),
            dict(do_sample=True, top_k=0, min_p=0.1, temperature=1.5),
            dict(do_sample=True, top_k=3, top_p=0.5, min_p=0.3)]

    def make(do_sample, temperature=1.0, top_k=50, top_p=1.0, min_p=None):
        chain = [lp.TemperatureLogitsWarper(temperature)]
        chain += [lp.TopKLogitsWarper(top_k)] if top_k else []
        chain += [lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
        chain += [lp.MinPLogitsWarper(min_p)] if min_p is not None else []
        return lp.LogitsProcessorList(chain)
    same(ours(logits, ids, rows, warp=True), hf(logits, ids, make, rows))


def test_mixed_greedy_and_sampled_rows_in_one_batch():
    import jax

    logits, ids = batch(8)
    settings = [st.GenerationSettings(do_sample=b % 2 == 1, top_k=1 if b == 3 else 50)
                for b in range(B)]
    s, f = st.sampling_rows(settings, B), st.features(settings)
    draws = np.stack([np.asarray(smp.choose(logits, jax.random.key(k), s, f, None, None))
                      for k in range(16)])
    assert (draws[:, [0, 2, 3]] == logits[[0, 2, 3]].argmax(-1)).all()  # greedy and top_k=1
    assert len(set(draws[:, 1])) > 1  # the sampled row samples
