"""generate()'s options end to end against transformers' model.generate on the same weights:
each option alone and mixed in one padded batch, generation_config.json, stop strings,
num_return_sequences and streaming."""

import json
import logging
import threading

import jax
import numpy as np
import pytest
import torch
import transformers

import dsjax
from tests.conftest import llama_model, prompt

PROMPTS = [prompt(41, 5), prompt(42, 9), prompt(43, 12)]
N = 14


def hf_generate(model, p, **kw):
    ids = torch.tensor([p])
    kw = {"max_new_tokens": N, "do_sample": False, "pad_token_id": 0, **kw}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return out[0, len(p):].tolist() if out.ndim == 2 and len(out) == 1 else out[:, len(p):].tolist()


def strip(seq, pad=0):
    """HF pads finished rows with pad_token_id; our sequences stop at their end."""
    while seq and seq[-1] == pad:
        seq = seq[:-1]
    return seq


def free_run(engine, p):
    return engine.generate([p], max_new_tokens=N, eos_token_id=[]).sequences[0]


def options(engine):
    """Option sets built from the model's own free-running tokens, so each one bites."""
    free = free_run(engine, PROMPTS[0])
    return [dict(repetition_penalty=1.6, no_repeat_ngram_size=2),
            dict(eos_token_id=free[2], min_new_tokens=6, bad_words_ids=[[free[3]], free[:2]]),
            dict(no_repeat_ngram_size=1, suppress_tokens=[free[0]],
                 sequence_bias=[[[free[1]], -2.0]])]


def test_each_option_and_a_mixed_padded_batch_equal_hf(llama_pair):
    model, engine = llama_pair
    sets = options(engine)
    for i, opts in enumerate(sets):
        got = engine.generate(PROMPTS, max_new_tokens=N, **{"eos_token_id": [], **opts})
        for p, seq in zip(PROMPTS, got.sequences):
            assert seq == strip(hf_generate(model, p, **opts)), (i, opts)
    mixed = engine.generate(PROMPTS, max_new_tokens=N, eos_token_id=[], per_prompt=sets)
    for p, opts, seq in zip(PROMPTS, sets, mixed.sequences):
        assert seq == strip(hf_generate(model, p, **opts))


def test_generation_config_file_is_honoured(tmp_path, caplog):
    model = llama_model(seed=3)
    model.save_pretrained(tmp_path)
    eos = free_run(dsjax.init_inference(model, dtype="fp32", max_out_tokens=128,
                                        progress=False), PROMPTS[1])[4]
    fields = dict(repetition_penalty=1.4, no_repeat_ngram_size=3, min_new_tokens=6,
                  max_new_tokens=11, eos_token_id=eos, pad_token_id=0, typical_p=0.9)
    (tmp_path / "generation_config.json").write_text(json.dumps(fields))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with caplog.at_level(logging.WARNING, logger="dsjax"):
        engine = dsjax.init_inference(tmp_path, dtype="fp32", max_out_tokens=128, progress=False)
    assert "typical_p=0.9" in caplog.text  # not implemented: named, once
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), typical_p=1.0)
    assert engine.generate([PROMPTS[1]]).sequences[0] == strip(want[0, ids.shape[1]:].tolist())
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), typical_p=1.0,
                           max_new_tokens=5, repetition_penalty=1.0)
    got = engine.generate([PROMPTS[1]], max_new_tokens=5, repetition_penalty=1.0)
    assert got.sequences[0] == strip(want[0, ids.shape[1]:].tolist())


def test_sampling_values_with_greedy_warn(llama_pair, caplog):
    _, engine = llama_pair
    with caplog.at_level(logging.WARNING, logger="dsjax"):
        a = engine.generate(PROMPTS[:1], max_new_tokens=4, temperature=0.37, top_p=0.5)
    assert "temperature=0.37" in caplog.text and "top_p=0.5" in caplog.text
    assert a.sequences == engine.generate(PROMPTS[:1], max_new_tokens=4).sequences


def word_tokenizer_96():
    """A word-level tokenizer of 96 short pieces (letters and pairs), decoded with spaces
    ("abcdef" among them: stop-string tables read each token's text after it, as
    transformers' do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = [chr(97 + i) for i in range(26)] + [a + b for a in "thes" for b in "aehinorstu"]
    pieces += ["abcdef"] + [f"{a}{b}" for a in "xyzq" for b in "abcdefghijklmnop"]
    pieces = pieces[:95]
    vocab = {w: i for i, w in enumerate(pieces + ["<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_stop_strings_equal_hf(llama_pair):
    model, engine = llama_pair
    tok = word_tokenizer_96()
    free = free_run(engine, PROMPTS[2])
    text = tok.decode(free[5:8])
    for stop in (text[1:-1], tok.decode(free[9:10])):  # across tokens, overhanging; one token
        got = engine.generate([PROMPTS[2]], max_new_tokens=N, eos_token_id=[],
                              stop_strings=stop, tokenizer=tok).sequences[0]
        want = hf_generate(model, PROMPTS[2], stop_strings=stop, tokenizer=tok)
        assert got == strip(want) and len(got) < N


def test_num_return_sequences_share_the_prompt_and_respect_the_warpers(llama_pair):
    model, engine = llama_pair
    greedy = engine.generate(PROMPTS[:2], max_new_tokens=8, eos_token_id=[]).sequences
    ones = engine.generate(PROMPTS[:2], max_new_tokens=8, eos_token_id=[], do_sample=True,
                           top_k=1, num_return_sequences=3, prng_key=jax.random.key(1))
    assert ones.sequences == [greedy[0]] * 3 + [greedy[1]] * 3
    out = engine.generate(PROMPTS[:2], max_new_tokens=8, eos_token_id=[], do_sample=True,
                          temperature=1.7, top_k=4, num_return_sequences=3,
                          prng_key=jax.random.key(2))
    assert len({tuple(s) for s in out.sequences[:3]}) > 1  # the samples differ
    warp = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(1.7),
                                             transformers.TopKLogitsWarper(4)])
    for i, seq in enumerate(out.sequences):  # each token inside HF's warped support
        p = PROMPTS[i // 3]
        with torch.no_grad():
            logits = model(torch.tensor([p + seq])).logits[0, len(p) - 1:-1]
        kept = warp(None, logits)
        assert all(torch.isfinite(kept[j, t]) for j, t in enumerate(seq))


def test_beam_search_through_generate_equals_hf(llama_pair):
    model, engine = llama_pair
    kw = dict(num_beams=3, num_return_sequences=2, length_penalty=0.8, early_stopping=True,
              no_repeat_ngram_size=2, max_new_tokens=8)
    out = engine.generate(PROMPTS[:2], eos_token_id=[], **kw)
    for i, p in enumerate(PROMPTS[:2]):
        ids = torch.tensor([p])
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  pad_token_id=0, output_scores=True,
                                  return_dict_in_generate=True, **kw)
        assert out.sequences[2 * i: 2 * i + 2] == want.sequences[:, len(p):].tolist()
        np.testing.assert_allclose(out.sequences_scores[2 * i: 2 * i + 2],
                                   want.sequences_scores.numpy(), rtol=1e-4, atol=1e-5)


def test_a_mesh_engine_names_what_it_cannot_do():
    engine = dsjax.init_inference("tiny-llama", dtype="fp32", max_out_tokens=32, progress=False,
                                  tensor_parallel={"tp_size": 2})
    for kw, match in [(dict(repetition_penalty=1.2), "penalties"), (dict(num_beams=2), "mesh"),
                      (dict(per_prompt=[{}, {"top_k": 3, "do_sample": True}],
                            prng_key=jax.random.key(0)), "same settings")]:
        with pytest.raises(ValueError, match=match):
            engine.generate([[1, 2], [3, 4]], max_new_tokens=3, **kw)
    with pytest.raises(ValueError, match="mesh"):
        next(engine.stream([1, 2], max_new_tokens=3))


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(np.asarray(value).tolist())

    def end(self):
        self.calls.append("end")


def test_streaming_delivers_generates_tokens(llama_pair):
    _, engine = llama_pair
    stop = free_run(engine, PROMPTS[1])[6]
    want = engine.generate(PROMPTS, max_new_tokens=N, eos_token_id=stop)
    rec = Recorder()
    one = engine.generate([PROMPTS[1]], max_new_tokens=N, eos_token_id=stop, streamer=rec)
    assert rec.calls[0] == [PROMPTS[1]] and rec.calls[-1] == "end"
    assert [c[0] for c in rec.calls[1:-1]] == want.sequences[1] == one.sequences[0]
    steps = list(engine.stream(PROMPTS, max_new_tokens=N, eos_token_id=stop))
    assert all(len(row) <= 1 for step in steps for row in step)
    assert [sum((s[r] for s in steps), []) for r in range(3)] == want.sequences
    assert [t for s in engine.stream(PROMPTS[1], max_new_tokens=N, eos_token_id=stop)
            for t in s] == want.sequences[1]


def test_text_iterator_streamer_from_a_thread(llama_pair):
    _, engine = llama_pair
    tok = word_tokenizer_96()
    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    worker = threading.Thread(target=engine.generate, args=([PROMPTS[0]],),
                              kwargs=dict(max_new_tokens=6, eos_token_id=[], streamer=streamer))
    worker.start()
    text = "".join(streamer)
    worker.join(60)
    want = engine.generate([PROMPTS[0]], max_new_tokens=6, eos_token_id=[]).sequences[0]
    assert text.split() == tok.decode(want).split()


@pytest.mark.parametrize("kw,match", [
    (dict(typical_p=0.5), "unknown generation options"),
    (dict(num_return_sequences=2), "greedy decoding"),
    (dict(num_beams=2, do_sample=True), "beam sampling"),
    (dict(stop_strings=[""]), "non-empty"),
    (dict(per_prompt=[{}]), "one per prompt"),
    (dict(early_stopping="sometimes"), "early_stopping"),
])
def test_bad_options(llama_pair, kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        llama_pair[1].generate(PROMPTS[:2], max_new_tokens=4, **kw)
