"""dsjax.stop_strings against transformers' StopStringCriteria (the reference) on tokenizers
trained offline: a byte-level BPE (GPT-2 style), a Metaspace BPE with a token whose text is
empty, and a Llama-style BPE with <0xNN> byte-fallback tokens. Every prefix of every test row is
judged by both, in one `hit` call per case."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.generation.stopping_criteria import StopStringCriteria  # noqa: E402

from dsjax.stop_strings import StopStrings, hit, max_lookback, token_texts  # noqa: E402

VOCAB = 512  # covers every test tokenizer; ids past a tokenizer's own size have no text
WIDTH = 16  # tokens per test row
ROWS = 48  # test rows per case (each checked at all WIDTH prefix lengths)
CORPUS = ["The quick brown fox jumps over the lazy dog.",
          "Stop here: STOP! stopping stops stopped.",
          "User: hello\nAssistant: hi there\n\nUser: bye", "the end, fin. the end.",
          "éà ü 日本 über"]
JOINED = " ".join(CORPUS)
LONG = "Assistant: hi there"  # longer than any token of these vocabularies
# " stopping" is one token; "Stop her" and "quick bro" end inside the tokens " here", " brown"
STRINGS = ["stop", " the end", "!", LONG, " stopping", "Stop her", "quick bro", "hell", "é",
           "日本"]
EMPTY = "<e>"  # the Metaspace tokenizer's token with empty text (its decoder deletes it)
_HIT = jax.jit(hit)


def _train(pre_tokenizer, decoder, size, specials, corpus) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    byte_level = isinstance(decoder, decoders.ByteLevel)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(
        vocab_size=size, special_tokens=specials, initial_alphabet=alphabet))
    return tok


def _byte_fallback() -> Tokenizer:
    """Llama's layout: ▁ words, <0xNN> tokens for chars outside the vocab (here the non-ASCII
    ones), and a Replace / ByteFallback / Fuse / Strip decoder."""
    ascii_corpus = [s.encode("ascii", "ignore").decode() for s in CORPUS]
    cfg = json.loads(_train(pre_tokenizers.Metaspace(), decoders.Metaspace(), 300,
                            ["<unk>", "<s>"], ascii_corpus).to_str())
    vocab = cfg["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    cfg["model"]["byte_fallback"] = True
    cfg["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return Tokenizer.from_str(json.dumps(cfg))


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    made = {
        "byte_level": _train(pre_tokenizers.ByteLevel(add_prefix_space=False),
                             decoders.ByteLevel(), 400, ["<|endoftext|>"], CORPUS),
        "metaspace": _train(pre_tokenizers.Metaspace(),
                            decoders.Sequence([decoders.Replace(EMPTY, ""), decoders.Metaspace()]),
                            300, ["<unk>", "<s>", EMPTY], CORPUS),
        "byte_fallback": _byte_fallback(),
    }
    return {name: PreTrainedTokenizerFast(tokenizer_object=t) for name, t in made.items()}


def _rows(tok, strings, rng) -> np.ndarray:
    """[ROWS, WIDTH] ids: texts holding a stop string (in its corpus context, or part of one
    between random chars), cut at random points and encoded piece by piece so that the string
    spans tokens in many ways, after random filler; then random mixes of those tokens with
    unknown ids (and empty tokens)."""
    chars = sorted(set("".join(strings)) | set(" xe.\n"))
    pool = {len(tok), VOCAB - 1, VOCAB + 3} | set(tok.convert_tokens_to_ids([EMPTY, "<s>"]))
    rows = []
    for i in range(ROWS * 3 // 4):
        s = strings[i % len(strings)]
        at = JOINED.find(s)
        if at >= 0 and rng.random() < 0.5:  # s in its corpus context: tokens run past its ends
            text = JOINED[max(0, at - rng.integers(0, 6)): at + len(s) + rng.integers(0, 6)]
        else:
            around = ["".join(rng.choice(chars, rng.integers(0, 4))) for _ in range(2)]
            body = s[: rng.integers(1, len(s))] if len(s) > 1 and rng.random() < 0.2 else s
            text = around[0] + body + around[1]
        n_cuts = min(len(text) - 1, rng.integers(0, 4))
        cuts = sorted(rng.choice(np.arange(1, len(text)), n_cuts, replace=False))
        ids = [t for a, b in zip([0, *cuts], [*cuts, len(text)])
               for t in tok.encode(text[a:b], add_special_tokens=False)]
        pool.update(ids)
        rows.append(ids[-WIDTH:])
    pool = np.array(sorted(i for i in pool if i is not None), np.int64)
    rows += [list(rng.choice(pool, WIDTH)) for _ in range(ROWS - len(rows))]
    filled = [np.concatenate([rng.choice(pool, WIDTH - len(r)), r]) for r in rows]
    return np.stack(filled).astype(np.int64)


def _hf(tok, strings, rows: np.ndarray) -> np.ndarray:
    """[rows, WIDTH] HF's verdict on each row cut after 1..WIDTH tokens."""
    crit = StopStringCriteria(tok, strings)
    return np.stack([crit(torch.tensor(rows[:, :n]), scores=None).numpy()
                     for n in range(1, WIDTH + 1)], axis=1)


def _ours(stop: StopStrings, rows: np.ndarray) -> np.ndarray:
    """The same verdicts from one `hit` call over [rows * WIDTH] prefixes."""
    tokens = np.repeat(rows, WIDTH, axis=0).astype(np.int32)
    length = np.tile(np.arange(1, WIDTH + 1, dtype=np.int32), len(rows))
    return np.asarray(_HIT(stop, tokens, length)).reshape(len(rows), WIDTH)


def _repeat_rows(per_row: list) -> list:
    return [r for r in per_row for _ in range(WIDTH)]  # one entry per prefix row of _ours


def _check_meaningful(want: np.ndarray) -> None:
    assert 0.02 < want.mean() < 0.9, f"a weak case: HF hits {want.mean():.2f} of the prefixes"


@pytest.mark.parametrize("name", ["byte_level", "metaspace", "byte_fallback"])
def test_matches_hf(toks, name):
    tok = toks[name]
    assert len(tok.encode(" stopping", add_special_tokens=False)) == 1  # a stop string = one token
    assert len(LONG) > max(len(t) for t in tok.get_vocab())
    rng = np.random.default_rng(len(name))
    for strings in (STRINGS, ["p"], ["stop"]):
        rows = _rows(tok, strings, rng)
        want = _hf(tok, strings, rows)
        _check_meaningful(want)
        stop = StopStrings.build(tok, strings if len(strings) > 1 else strings[0], VOCAB)
        np.testing.assert_array_equal(_ours(stop, rows), want, err_msg=f"{name} {strings}")


def test_empty_token_matches_hf(toks):
    """HF lets an empty-text token sit anywhere inside a match, never as the last token, and
    counts it in the window of max(len(stop string)) tokens it looks back over."""
    tok = toks["metaspace"]
    s, t, o, p, e = tok.convert_tokens_to_ids(["s", "t", "o", "p", EMPTY])
    cases = [([s, t, o, p], "TTT"), ([s, t, o, p, e], "FFF"), ([t, e, o, p], "FFF"),
             ([s, t, e, o, p], "FTT"), ([s, e, t, o, e, p], "FFT")]  # windows of 4, 5, 6 tokens
    sets = [["stop"], ["stop", "abcde"], ["stop", "abcdef"]]
    rows = np.array([[e] * (WIDTH - len(r)) + r for _ in sets for r, _ in cases])
    want = np.concatenate([_hf(tok, strings, rows[:len(cases)]) for strings in sets])
    np.testing.assert_array_equal(want[:, -1], [w[i] == "T" for i in range(3) for _, w in cases])
    per_row = [strings for strings in sets for _ in cases]
    stop = StopStrings.build_rows(tok, _repeat_rows(per_row), VOCAB)
    np.testing.assert_array_equal(_ours(stop, rows), want)
    rng = np.random.default_rng(7)
    rows = _rows(tok, ["stop", " the end"], rng)
    rows[rng.random(rows.shape) < 0.25] = e
    want = _hf(tok, ["stop", " the end"], rows)
    _check_meaningful(want)
    stop = StopStrings.build(tok, ["stop", " the end"], VOCAB)
    np.testing.assert_array_equal(_ours(stop, rows), want)


def test_last_token_with_several_coverages(toks):
    """A last token "ll" may cover the final 1 or 2 chars of "hell": after "he" the 2-char
    reading matches, after "hel" the 1-char one."""
    tok = toks["byte_level"]
    he, ll, h, e, el = tok.convert_tokens_to_ids(["he", "ll", "h", "e", "l"])
    cases = [([he, ll], True), ([h, e, el, ll], True), ([h, ll], False), ([e, ll], False)]
    rows = np.array([[e] * (WIDTH - len(r)) + r for r, _ in cases])
    want = _hf(tok, "hell", rows)
    np.testing.assert_array_equal(want[:, -1], [w for _, w in cases])
    np.testing.assert_array_equal(_ours(StopStrings.build(tok, "hell", VOCAB), rows), want)


def test_per_row_strings(toks):
    """One batch, different stop strings per row (and rows with none), against HF per row."""
    tok = toks["byte_level"]
    sets = [["stop"], None, [" the end", "!"], "日本", [], ["p", LONG]]
    per_row = [sets[i % len(sets)] for i in range(ROWS)]
    rng = np.random.default_rng(3)
    rows, want = np.zeros((ROWS, WIDTH), np.int64), np.zeros((ROWS, WIDTH), bool)
    for i, strings in enumerate(sets):  # each row's text holds its own stop strings (or "stop")
        listed = [strings] if isinstance(strings, str) else strings or ["stop"]
        rows[i::len(sets)] = _rows(tok, listed, rng)[::len(sets)]
        if strings:
            want[i::len(sets)] = _hf(tok, strings, rows[i::len(sets)])
    _check_meaningful(want)
    stop = StopStrings.build_rows(tok, _repeat_rows(per_row), VOCAB)
    np.testing.assert_array_equal(_ours(stop, rows), want)
    texts = token_texts(tok, VOCAB)  # read once, reused by later builds
    again = StopStrings.build_rows(texts, _repeat_rows(per_row), VOCAB)
    np.testing.assert_array_equal(_ours(again, rows), want)


def test_same_bucket_reuses_program(toks):
    """Different stop strings of similar sizes give equal shapes: one compiled program."""
    tok = toks["byte_level"]
    traces = []

    def counted(stop, tokens, length):
        traces.append(stop)
        return hit(stop, tokens, length)

    f = jax.jit(counted)
    a = StopStrings.build(tok, ["stop", "fox"], VOCAB)
    b = StopStrings.build(tok, ["dog.", "the"], VOCAB)
    assert [x.shape for x in jax.tree.leaves(a)] == [x.shape for x in jax.tree.leaves(b)]
    assert max_lookback(a) == 4
    ids = tok.encode("a stop", add_special_tokens=False)
    tokens = np.array([ids + [0] * (8 - len(ids))], np.int32)
    length = np.array([len(ids)], np.int32)
    assert bool(f(a, tokens, length)[0]) and not bool(f(b, tokens, length)[0])
    assert len(traces) == 1


def test_input_errors(toks):
    tok = toks["byte_level"]
    for strings, error in (([], ValueError), ([""], ValueError), ("", ValueError), (5, TypeError),
                           (["a", 3], TypeError), ({"a"}, TypeError), (None, TypeError)):
        with pytest.raises(error, match="strings"):
            StopStrings.build(object(), strings, VOCAB)  # checked before the tokenizer is read
    for size in (0, -1, "10", 2.0, True, None):
        with pytest.raises(ValueError, match="vocab_size"):
            StopStrings.build(object(), "stop", size)
    with pytest.raises(TypeError, match="tokenizer"):
        StopStrings.build(object(), "stop", VOCAB)
    with pytest.raises(ValueError, match="per_row"):
        StopStrings.build_rows(tok, [], VOCAB)
    with pytest.raises(ValueError, match=r"per_row\[1\]"):
        StopStrings.build_rows(tok, [["a"], [""]], VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        StopStrings.build_rows(token_texts(tok, VOCAB), ["a"], VOCAB * 2)
    stop = StopStrings.build_rows(tok, [["a"], ["b"], None], VOCAB)
    with pytest.raises(ValueError, match="rows"):
        hit(stop, np.zeros((2, 4), np.int32), np.ones(2, np.int32))
    with pytest.raises(ValueError, match=r"\[B, W\]"):
        hit(stop, np.zeros((3,), np.int32), np.ones(3, np.int32))
