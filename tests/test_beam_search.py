"""dsjax.beam.beam_search against transformers' own beam search (torch, fp32): the tokens of
every returned beam and HF's sequences_scores, for every decoder family.

Compile-bound like the rest of the suite: each family compiles one program (batch bucket 2,
prompt bucket 16, two stop-id slots, its static beam settings from STATIC) and checks several
settings with it: length_penalty, max_new_tokens, the stop ids and the penalty are traced."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsjax
from dsjax.beam import beam_search
from dsjax.sampling import Features, Sampling
from tests.conftest import prompt
from tests.converters.test_decoder_families import CASES, V, build

CAPACITY = 64
PAD = 95  # HF fills ended beams with pad_token_id (0 would make it the EOS: `pad or eos[0]`)
PROMPTS = (prompt(30, 5, V), prompt(31, 11, V))  # one bucket (16): a padded batch of two

_pairs: dict = {}


def pair(name):
    """(HF model, dsjax engine) of a family, built once per module."""
    if name not in _pairs:
        model = build(name)
        _pairs[name] = model, dsjax.init_inference(model, dtype="fp32", max_out_tokens=CAPACITY,
                                                   progress=False)
    return _pairs[name]


def sampling_rows(B: int, repetition_penalty: float = 1.0) -> Sampling:
    """B rows of dsjax.sampling.Sampling: every processor off but the repetition penalty."""
    full = lambda v, dtype: jnp.full((B,), v, dtype)  # noqa: E731
    f32, i32 = jnp.float32, jnp.int32
    return Sampling(
        do_sample=full(False, bool), temperature=full(1, f32), top_k=full(0, i32),
        top_p=full(1, f32), min_p=full(0, f32), repetition_penalty=full(repetition_penalty, f32),
        presence_penalty=full(0, f32), frequency_penalty=full(0, f32),
        no_repeat_ngram=full(0, i32), min_new=full(0, i32), eos=jnp.full((B, 1), -1, i32),
        bias_ids=jnp.full((B, 1), -1, i32), bias=jnp.zeros((B, 1), f32),
        bad_seqs=jnp.full((B, 1, 2), -1, i32))


def hf_beams(model, p, *, num_beams, num_return, early_stopping, max_new, length_penalty=1.0,
             eos=(), repetition_penalty=None):
    """HF's returned beams of one unpadded prompt: (new-token lists, sequences_scores)."""
    ids = torch.tensor([p])
    extra = {} if repetition_penalty is None else {"repetition_penalty": repetition_penalty}
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=num_beams,
            num_return_sequences=num_return, early_stopping=early_stopping,
            length_penalty=length_penalty, max_new_tokens=max_new, output_scores=True,
            return_dict_in_generate=True, eos_token_id=list(eos) or None, pad_token_id=PAD,
            **extra)
    beams = []
    for row in out.sequences[:, len(p):].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), max_new)
        assert all(t == PAD for t in row[end:])  # HF's filler after the beam's end
        beams.append(row[:end])
    return beams, out.sequences_scores.numpy()


def ours(engine, prompts, *, num_beams, num_return, early_stopping, max_new, length_penalty=1.0,
         eos=(), repetition_penalty=None):
    """beam_search on packed prompts: per prompt (new-token lists, scores); also checks that
    everything after each beam's end, and every filler row, is padding."""
    tokens, lengths = engine.pack(prompts, PAD)
    stop = jnp.asarray((list(eos) + [-1, -1])[:2], jnp.int32)
    features = Features(penalties=repetition_penalty is not None)
    seqs, counts, scores = beam_search(
        engine.graphdef, engine.params, jnp.asarray(tokens), jnp.asarray(lengths),
        jnp.int32(max_new), stop, jnp.int32(PAD), jnp.float32(length_penalty),
        sampling_rows(len(tokens), repetition_penalty or 1.0), capacity=CAPACITY,
        num_beams=num_beams, num_return=num_return, early_stopping=early_stopping,
        features=features)
    seqs, counts, scores = np.asarray(seqs), np.asarray(counts), np.asarray(scores)
    assert seqs.shape == (len(tokens), num_return, CAPACITY)
    after = np.arange(CAPACITY)[None, None] >= counts[..., None]
    assert (seqs[after] == PAD).all()
    assert (counts[len(prompts):] == 0).all()  # filler rows
    return [([s[:c].tolist() for s, c in zip(seqs[b], counts[b])], scores[b])
            for b in range(len(prompts))]


def assert_same(model, engine, prompts=PROMPTS, **kw):
    """Each prompt of a padded batch (filler rows included) gives HF's beams of that prompt
    alone."""
    for p, (beams, scores) in zip(prompts, ours(engine, prompts, **kw)):
        ref, ref_scores = hf_beams(model, p, **kw)
        assert beams == ref, (p, kw)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4, rtol=1e-5)


def firing_eos(model, p, max_new, **kw):
    """A token the free-running beams produce that, as EOS, ends one of the num_beams kept
    hypotheses mid-way (after its first token, before max_new): finished hypotheses then
    compete with running beams."""
    kw = dict(kw, num_return=kw["num_beams"])  # every kept hypothesis
    free, _ = hf_beams(model, p, max_new=max_new, **kw)
    candidates = dict.fromkeys(t for beam in free for t in beam[1:-1])
    for eos in list(candidates)[:8]:
        beams, _ = hf_beams(model, p, max_new=max_new, eos=(eos,), **kw)
        if any(b[-1] == eos and 1 < len(b) < max_new for b in beams):
            return eos
    raise AssertionError("no token of the free-running beams ends a returned beam mid-way")


# Each family's static settings (its one program): together every early_stopping mode,
# num_return below and equal to num_beams, and the processor path (penalties: the family's
# calls run with repetition_penalty 1.3 and 1.0, both in that program).
STATIC = {name: dict(num_beams=nb, num_return=nr, early_stopping=es, penalties=pen)
          for name, (nb, nr, es, pen) in {
              "bloom_alibi": (3, 2, False, False),
              "gpt_neo_local_window_3": (4, 4, True, False),
              "gpt_neox_parallel_rotary_quarter": (3, 1, "never", False),
              "gpt_neox_sequential": (2, 2, False, True),
              "gptj_rotary_dim_4_of_8": (4, 3, True, False),
              "opt_pre_ln": (3, 3, "never", True),
              "opt_post_ln_projected": (3, 2, False, False),
              "mistral_window_5_gqa": (4, 2, True, True),
              "qwen2_qkv_bias_gqa": (3, 2, "never", False),
              "qwen2_sliding_top_layer": (2, 1, True, False),
              "gemma_mqa_geglu_plus_one": (3, 2, False, False)}.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_family_matches_hf(name):
    """One program per family, four calls: an EOS that fires mid-way; two EOS ids with a
    penalty favouring long beams; no EOS with one favouring short beams (hypotheses then end at
    max_new_tokens); a single prompt, packed with a filler row."""
    model, engine = pair(name)
    static = dict(STATIC.get(name, STATIC["bloom_alibi"]))
    rep = 1.3 if static.pop("penalties") else None
    eos = firing_eos(model, PROMPTS[0], 12, repetition_penalty=rep, **static)
    assert_same(model, engine, max_new=12, eos=(eos,), repetition_penalty=rep, **static)
    eos2 = firing_eos(model, PROMPTS[1], 10, **static)
    assert_same(model, engine, max_new=10, eos=(eos, eos2), length_penalty=2.0,
                repetition_penalty=rep and 1.0, **static)
    assert_same(model, engine, max_new=7, length_penalty=-0.5, repetition_penalty=rep, **static)
    assert_same(model, engine, PROMPTS[1:], max_new=9, eos=(eos,), length_penalty=0.7,
                repetition_penalty=rep, **static)


def test_bad_static_arguments():
    _, engine = pair("opt_pre_ln")
    base = dict(num_beams=3, num_return=1, early_stopping=False, max_new=4)
    for change, match in ((dict(num_beams=1), "num_beams >= 2"),
                          (dict(num_return=4), r"num_return must be in \[1, num_beams=3\]"),
                          (dict(early_stopping="always"), "early_stopping must be")):
        with pytest.raises(ValueError, match=match):
            ours(engine, PROMPTS, **dict(base, **change))
