"""Stop strings judged on token ids on the device, with the semantics of transformers'
`StopStringCriteria`: a row stops when its last token completes a stop string, where the last
token may run past the string's end and the first token may begin before its start.

Text units. Every token id gets the text HF's criteria gives it: byte-level vocabularies (GPT-2's
Ġ alphabet) read each token as its bytes, byte-fallback ones (<0xNN>) read those tokens as one
byte, and every other token is decoded after a fixed prefix, so that a leading-space marker (▁,
Ġ) becomes the space it stands for. Byte vocabularies compare stop strings as UTF-8 bytes, the
others as chars; "length" below counts these units.

The match, walking back from the last token of a row, for a stop string s of length L:
- the last token either contains s (a hit), or its text starts with s[L-k:] for some 0 < k < L,
  leaving the final k units covered (several k may hold at once);
- with the final p units covered, an earlier token t of length l fits if its text ends with
  s[max(0, L-p-l) : L-p] (inside s, or running off its start); coverage becomes p + l, a hit
  once >= L. An empty token fits at every p and covers nothing; ids without text never fit;
- HF looks back at most max(len(s)) tokens over the row's stop strings (empty tokens use up this
  window), and so does `hit`. A stop string that no token can end never hits (HF refuses a set
  where this holds for every string).

Device representation. The set of live coverages is a bool vector over p. Tokens are grouped
into classes with identical behaviour (length, and per stop string: contains it, the k it can
leave as last token, the p it fits at); class 0 is every token that takes part in no match, so
the per-token table is one int32 per id and the class tables stay small. Stop-string count,
length and class count are padded to powers of two, so string sets of similar sizes share one
compiled program. Rows may have their own stop strings (`StopStrings.build_rows`, for requests
of a server); reading the vocabulary is the slow part of a build, so `token_texts` reads it once
and builds take its result in place of the tokenizer.
"""

from __future__ import annotations

import bisect
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.numerics import next_pow2

_PREFIX = "abcdef"  # tokens are decoded after this text, so they get their in-context text
_TOKENIZER_METHODS = ("get_vocab", "convert_ids_to_tokens", "convert_tokens_to_string")


@dataclasses.dataclass(frozen=True)
class TokenTexts:
    """Each token id's text in matching units (str, or bytes when `as_bytes`), read once per
    tokenizer: pass it to `StopStrings.build*` in place of the tokenizer to skip the vocab pass."""

    texts: tuple  # [V] str | bytes | None (an id the tokenizer does not know)
    as_bytes: bool  # stop strings are compared as their UTF-8 bytes
    lengths: np.ndarray  # [V] int32, -1 where no text
    order: np.ndarray  # ids with a text, sorted by text
    sorted_texts: list  # their texts, in that order
    rorder: np.ndarray  # ids with a text, sorted by reversed text
    rsorted_texts: list  # their reversed texts, in that order

    def units(self, s: str) -> str | bytes:
        return s.encode("utf-8") if self.as_bytes else s


def _decoder_types(config) -> set[str]:
    """Every "type" named anywhere in a tokenizers decoder's JSON config."""
    if isinstance(config, list):
        return set().union(*map(_decoder_types, config))
    if not isinstance(config, dict):
        return set()
    own = {config["type"]} if isinstance(config.get("type"), str) else set()
    return own.union(*map(_decoder_types, config.values()))


def _unit_mode(tokenizer) -> str | None:
    """How HF reads this tokenizer's tokens: "byte_fallback" (a ByteFallback decoder step wins),
    "byte_level" (a ByteLevel decoder), or None (decoded text)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    if type(decoder).__name__ == "ByteLevel":
        return "byte_level"
    try:
        types = _decoder_types(json.loads(decoder.__getstate__()))
    except (AttributeError, TypeError, ValueError):
        return None
    if "ByteFallback" in types:
        return "byte_fallback"
    return "byte_level" if "ByteLevel" in types else None


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable Latin-1 bytes stand for themselves,
    the other bytes for consecutive chars from U+0100."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(0x100 + i): b for i, b in enumerate(moved)}}


def token_texts(tokenizer, vocab_size: int) -> TokenTexts:
    """Reads every token's text (ids 0..vocab_size-1) from a transformers tokenizer."""
    _check_vocab_size(vocab_size)
    methods = [getattr(tokenizer, m, None) for m in _TOKENIZER_METHODS]
    if not callable(tokenizer) or not all(callable(m) for m in methods):
        raise TypeError(f"stop strings need a transformers tokenizer (callable, with "
                        f"{', '.join(_TOKENIZER_METHODS)}), got {type(tokenizer).__name__}")
    mode = _unit_mode(tokenizer)
    alphabet = _byte_level_alphabet() if mode == "byte_level" else {}
    prefix_ids = tokenizer(_PREFIX, add_special_tokens=False)["input_ids"]
    base = tokenizer.convert_ids_to_tokens(prefix_ids)

    def text_of(token: str) -> str | bytes:
        if mode == "byte_level" and all(c in alphabet for c in token):
            return bytes(alphabet[c] for c in token)
        if mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") \
                and token.endswith(">") and all(c in "0123456789abcdefABCDEF" for c in token[3:5]):
            return bytes([int(token[3:5], 16)])
        decoded = tokenizer.convert_tokens_to_string([*base, token])
        if _PREFIX not in decoded:
            raise ValueError(f"cannot read the text of token {token!r}: decoding it after "
                             f"{_PREFIX!r} gave {decoded!r}")
        text = decoded[decoded.index(_PREFIX) + len(_PREFIX):]
        return text.encode("utf-8") if mode else text

    texts: list = [None] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if 0 <= i < vocab_size:
            texts[i] = text_of(token)
    known = [i for i, t in enumerate(texts) if t is not None]
    order = sorted(known, key=lambda i: texts[i])
    rorder = sorted(known, key=lambda i: texts[i][::-1])
    return TokenTexts(tuple(texts), mode is not None,
                      np.array([-1 if t is None else len(t) for t in texts], np.int32),
                      np.array(order, np.int64), [texts[i] for i in order],
                      np.array(rorder, np.int64), [texts[i][::-1] for i in rorder])


def _starting_with(sorted_texts: list, order: np.ndarray, q) -> np.ndarray:
    """Ids whose (sorted) text starts with q: one contiguous run of the sorted list."""
    lo = bisect.bisect_left(sorted_texts, q)
    return order[lo:bisect.bisect_right(sorted_texts, q, lo, key=lambda t: t[: len(q)])]


def _equal_to(texts: TokenTexts, q) -> np.ndarray:
    lo = bisect.bisect_left(texts.sorted_texts, q)
    return texts.order[lo:bisect.bisect_right(texts.sorted_texts, q, lo)]


def _string_matches(texts: TokenTexts, u) -> tuple[np.ndarray, dict, dict]:
    """For stop string u (length L): ids containing u; ends[k] (0 < k < L) = ids whose text
    starts with u[L-k:]; fits[p] (0 < p < L) = ids whose text ends with u[max(0, L-p-l):L-p],
    l its length (equal to a piece of u ending there, or ending with all of u[:L-p])."""
    L = len(u)
    whole = np.array([i for i, t in zip(texts.order, texts.sorted_texts) if u in t], np.int64)
    ends = {k: _starting_with(texts.sorted_texts, texts.order, u[L - k:]) for k in range(1, L)}
    fits = {}
    for p in range(1, L):
        r = L - p  # units of u still to cover
        overhang = _starting_with(texts.rsorted_texts, texts.rorder, u[:r][::-1])
        fits[p] = np.concatenate([overhang, *(_equal_to(texts, u[r - l:r]) for l in range(r))])
    return whole, ends, fits


def _class_tables(texts: TokenTexts, units: list, n_pad: int, steps: int) -> dict:
    """Groups tokens into classes of identical rows [whole (N) | ends (N, S) | fits (N, S) |
    length] (class 0: the tokens in no match); returns StopStrings' token and class fields."""
    width = n_pad * (1 + 2 * steps)
    ids, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for n, u in enumerate(units):
        whole, ends, fits = _string_matches(texts, u)
        ids.append(whole), cols.append(np.full(whole.size, n))
        for base, found in ((n_pad + n * steps, ends), (n_pad * (1 + steps) + n * steps, fits)):
            for p, hits in found.items():
                ids.append(hits), cols.append(np.full(hits.size, base + p))
    ids, cols = np.concatenate(ids), np.concatenate(cols)
    relevant = np.unique(ids)
    bits = np.zeros((relevant.size, width), bool)
    bits[np.searchsorted(relevant, ids), cols] = True
    lengths = texts.lengths[relevant]
    keys = np.concatenate([np.packbits(bits, axis=1), lengths.view(np.uint8).reshape(-1, 4)], 1)
    seen: dict[bytes, int] = {}  # a token's row, as bytes -> its class - 1
    inverse = np.array([seen.setdefault(k.tobytes(), len(seen)) for k in keys], np.int32)
    example = np.zeros(len(seen), np.int64)
    example[inverse] = np.arange(relevant.size)  # one token of each class (all alike)
    size = max(8, next_pow2(len(seen) + 1))
    table, class_len = np.zeros((size, width), bool), np.zeros(size, np.int32)
    table[1:len(seen) + 1], class_len[1:len(seen) + 1] = bits[example], lengths[example]
    token_class = np.zeros(len(texts.texts), np.int32)
    token_class[relevant] = inverse + 1
    return dict(token_class=token_class, class_len=class_len, class_whole=table[:, :n_pad],
                class_end=table[:, n_pad:n_pad * (1 + steps)].reshape(-1, n_pad, steps),
                class_fit=table[:, n_pad * (1 + steps):].reshape(-1, n_pad, steps))


def _check_vocab_size(vocab_size) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")


def _check_strings(strings, what: str) -> tuple[str, ...]:
    """A str (one stop string) or a non-empty list/tuple of non-empty str."""
    if isinstance(strings, str):
        strings = (strings,)
    if not isinstance(strings, (list, tuple)):
        raise TypeError(f"{what} must be a str or a list of str, got {type(strings).__name__}")
    if not strings:
        raise ValueError(f"{what} is empty: give at least one stop string")
    for s in strings:
        if not isinstance(s, str):
            raise TypeError(f"{what}: stop strings must be str, got {type(s).__name__} {s!r}")
        if not s:
            raise ValueError(f"{what}: a stop string must not be empty")
    return tuple(strings)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopStrings:
    """Stop strings of a batch as device tables (all fields arrays, so a StopStrings is traced
    data under jit). V vocab, C classes, N stop strings, S steps (max_lookback), R rows (1: the
    same strings for every row, or one per batch row)."""

    token_class: jax.Array  # [V] int32, 0: takes part in no match
    class_len: jax.Array  # [C] int32, text length in units
    class_whole: jax.Array  # [C, N] bool: contains the stop string
    class_end: jax.Array  # [C, N, S] bool: as last token, may leave the final p units covered
    class_fit: jax.Array  # [C, N, S] bool: fits before a token when the final p units are covered
    string_len: jax.Array  # [N] int32
    row_strings: jax.Array  # [R, N] bool: the stop strings of each row
    row_lookback: jax.Array  # [R] int32: trailing tokens each row may use (its longest string)

    @classmethod
    def build(cls, tokenizer, strings, vocab_size: int) -> StopStrings:
        """One set of stop strings (a str or a list of str) for every row."""
        return cls.build_rows(tokenizer, [_check_strings(strings, "strings")], vocab_size)

    @classmethod
    def build_rows(cls, tokenizer, per_row, vocab_size: int) -> StopStrings:
        """Stop strings per batch row: each entry a str, a list of str, or None / [] (the row never
        stops on text). `tokenizer` may be a transformers tokenizer or its `token_texts`."""
        if not isinstance(per_row, (list, tuple)) or not per_row:
            raise ValueError(f"per_row must be a non-empty list (one entry per row), "
                             f"got {per_row!r}")
        rows = [() if r is None or (isinstance(r, (list, tuple)) and not r)
                else _check_strings(r, f"per_row[{i}]") for i, r in enumerate(per_row)]
        _check_vocab_size(vocab_size)
        if isinstance(tokenizer, TokenTexts):
            if len(tokenizer.texts) != vocab_size:
                raise ValueError(f"token_texts cover {len(tokenizer.texts)} ids, "
                                 f"vocab_size is {vocab_size}")
            texts = tokenizer
        else:
            texts = token_texts(tokenizer, vocab_size)
        strings = list(dict.fromkeys(s for r in rows for s in r))
        units = [texts.units(s) for s in strings]
        n_pad = next_pow2(max(len(units), 1))
        steps = max(4, next_pow2(max((len(u) for u in units), default=1)))
        string_len = np.zeros(n_pad, np.int32)
        string_len[:len(units)] = [len(u) for u in units]
        row_strings = np.zeros((len(rows), n_pad), bool)
        for b, r in enumerate(rows):
            row_strings[b, [strings.index(s) for s in r]] = True
        row_lookback = np.where(row_strings, string_len, 0).max(axis=1).astype(np.int32)
        return cls(**_class_tables(texts, units, n_pad, steps), string_len=string_len,
                   row_strings=row_strings, row_lookback=row_lookback)


def max_lookback(stop: StopStrings) -> int:
    """How many trailing tokens per row `hit` reads at most (static, bucketed)."""
    return stop.class_fit.shape[-1]


def _class_at(stop: StopStrings, tokens, length, window, j: int):
    """[B] class of each row's j-th token from the end; 0 outside the row's window or vocab."""
    pos = jnp.clip(length - 1 - j, 0, tokens.shape[1] - 1)
    ids = jnp.take_along_axis(tokens, pos[:, None], axis=1)[:, 0]
    vocab = stop.token_class.shape[0]
    ok = (j < window) & (ids >= 0) & (ids < vocab)
    return jnp.where(ok, stop.token_class[jnp.clip(ids, 0, vocab - 1)], 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Walk:
    """The backward walk's state after some tokens: which coverages of each stop string's end are
    still possible, and which strings are already complete."""

    live: jax.Array  # [B, N, S] bool
    done: jax.Array  # [B, N] bool


def hit(stop: StopStrings, tokens, length) -> jax.Array:
    """[B] bool: whether each row's valid tokens (tokens[b, :length[b]], of [B, W] int32) end,
    at their last token, with one of the row's stop strings (HF's semantics, module docstring).
    Reads at most `max_lookback(stop)` trailing tokens per row; no host sync."""
    tokens, length = jnp.asarray(tokens, jnp.int32), jnp.asarray(length, jnp.int32)
    if tokens.ndim != 2 or length.shape != tokens.shape[:1]:
        raise ValueError(f"hit needs tokens [B, W] and length [B], got {tokens.shape} and "
                         f"{length.shape}")
    if stop.row_strings.shape[0] not in (1, tokens.shape[0]):
        raise ValueError(f"stop strings built for {stop.row_strings.shape[0]} rows, the batch has "
                         f"{tokens.shape[0]}")
    window = jnp.minimum(length, stop.row_lookback)  # [B]
    p = jnp.arange(max_lookback(stop))  # [S] covered units of the stop string's end

    def step(j, walk: _Walk) -> _Walk:  # the j-th token from the end precedes the walk so far
        c = _class_at(stop, tokens, length, window, j)
        size = stop.class_len[c][:, None, None]  # [B, 1, 1]
        fit = walk.live & stop.class_fit[c]  # [B, N, S]
        done = walk.done | jnp.any(fit & (p + size >= stop.string_len[:, None]), axis=-1)
        src = jnp.broadcast_to(p - size, fit.shape)  # coverage p came from p - size
        return _Walk((src >= 0) & jnp.take_along_axis(fit, jnp.maximum(src, 0), axis=-1), done)

    last = _class_at(stop, tokens, length, window, 0)
    walk = _Walk(live=stop.class_end[last], done=stop.class_whole[last])
    walk = jax.lax.fori_loop(1, max_lookback(stop), step, walk)
    return jnp.any(walk.done & stop.row_strings, axis=-1)
