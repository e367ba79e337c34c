"""Generation settings as transformers resolves them: the call's arguments over the model's
generation_config.json over transformers' global defaults (`max_length` 20, `top_k` 50, ...),
validated on the host, then turned into the per-row arrays of dsjax.sampling.

A field of generation_config.json that dsjax does not implement is a warning naming it, once
per engine; sampling values with greedy decoding (and beam values without beams) warn as
transformers warns. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from dsjax import validate
from dsjax.numerics import next_pow2
from dsjax.sampling import Features, Sampling

log = logging.getLogger("dsjax")

# transformers' GenerationConfig._get_default_generation_params (the values a field takes when
# neither the call nor the model sets it), for the fields dsjax reads
HF_DEFAULTS = dict(max_length=20, min_length=0, do_sample=False, early_stopping=False,
                   num_beams=1, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
                   length_penalty=1.0, no_repeat_ngram_size=0, num_return_sequences=1,
                   typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, num_beam_groups=1,
                   diversity_penalty=0.0, encoder_repetition_penalty=1.0,
                   encoder_no_repeat_ngram_size=0, remove_invalid_values=False)
# fields that change nothing about the tokens (outputs, caching, compilation, assistants)
NEUTRAL = {"transformers_version", "_from_model_config", "use_cache", "output_attentions",
           "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
           "cache_implementation", "cache_config", "compile_config", "disable_compile",
           "max_cache_len", "low_memory", "is_assistant", "num_assistant_tokens",
           "num_assistant_tokens_schedule", "assistant_confidence_threshold",
           "assistant_lookbehind", "target_lookbehind", "prefill_chunk_size",
           "continuous_batching_config", "decoder_start_token_id", "bos_token_id",
           "pad_token_id", "max_time"}
SAMPLING_ONLY = ("temperature", "top_p", "min_p", "top_k")
BEAM_ONLY = ("early_stopping", "length_penalty")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """One request's resolved settings (None where transformers leaves the field unset)."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens (transformers' max_length)
    min_new_tokens: int = 0
    min_length: int = 0  # prompt + new tokens before EOS may come
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple = ()  # token sequences never to produce
    suppress_tokens: tuple = ()  # single tokens never to produce
    logit_bias: tuple = ()  # ((token, bias), ...), OpenAI's logit_bias
    sequence_bias: tuple = ()  # transformers' sequence_bias: ((tokens, bias), ...)
    stop_strings: tuple = ()
    eos_token_id: tuple = ()
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        for name, fn in _CHECKS.items():
            object.__setattr__(self, name, fn(name, getattr(self, name)))
        if self.do_sample:  # greedy decoding reads none of these (transformers checks none)
            self._check_sampling()
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_return_sequences > 1 and self.num_beams == 1 and not self.do_sample:
            raise ValueError("greedy decoding (do_sample=False, num_beams=1) returns one sequence "
                             f"per prompt; num_return_sequences={self.num_return_sequences} needs "
                             "do_sample=True or num_beams >= num_return_sequences")
        if self.num_return_sequences > self.num_beams > 1:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} exceeds "
                             f"num_beams={self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not "
                             "implemented: pass do_sample=False for beam search, or num_beams=1")

    def _check_sampling(self) -> None:
        object.__setattr__(self, "top_k", validate.integer("top_k", self.top_k, low=0))
        for name in ("temperature", "top_p") + (("min_p",) if self.min_p is not None else ()):
            object.__setattr__(self, name, validate.real(name, getattr(self, name)))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (do_sample=False is "
                             f"greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def new_tokens(self, prompt_len: int) -> int:
        """New tokens this request may make after a prompt of prompt_len tokens (transformers:
        max_new_tokens, else max_length - prompt length, else 20)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(self.max_length - prompt_len, 0)
        return HF_DEFAULTS["max_length"]

    def min_new(self, prompt_len: int) -> int:
        return max(self.min_new_tokens, self.min_length - prompt_len)


def _opt(fn):
    return lambda name, v: None if v is None else fn(name, v)


def _int(low=0):
    return lambda name, v: validate.integer(name, v, low=low)


def _seqs(name, value) -> tuple:
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, (list, tuple)) and s for s in value):
        raise TypeError(f"{name} must be a list of non-empty token-id lists, got {value!r}")
    return tuple(tuple(validate.token_list(f"{name}[{i}]", s)) for i, s in enumerate(value))


def _bias(name, value) -> tuple:
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(k, b) for k, b in items]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a {{token: bias}} dict, got {value!r}") from None
    return tuple((validate.integer(f"{name} token", int(k) if isinstance(k, str) and k.isdigit()
                                   else k, low=0), validate.real(f"{name}[{k}]", b))
                 for k, b in pairs)


def _seq_bias(name, value) -> tuple:
    items = value.items() if isinstance(value, dict) else value
    try:
        items = [(tuple(k), b) for k, b in items]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a list of [token ids, bias] pairs, got {value!r}") from None
    return tuple((_seqs(name, [k])[0], validate.real(f"{name}[{k}]", b)) for k, b in items)


def _strings(name, value) -> tuple:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise TypeError(f"{name} must be a string or a list of non-empty strings, got {value!r}")
    return tuple(value)


def _number(name, value):
    """A sampling value's type (its range is checked when sampling: greedy decoding reads
    none, and transformers accepts any there)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return value.item() if isinstance(value, np.number) else value


def _ids(name, value) -> tuple:
    return tuple(validate.token_list(name, list(value) if isinstance(value, tuple) else value))


def _early(name, value):
    if value == "never" or isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be True, False or 'never', got {value!r}")


_CHECKS = dict(
    max_new_tokens=_opt(_int(1)), max_length=_opt(_int(1)), min_new_tokens=_int(),
    min_length=_int(), do_sample=validate.boolean, temperature=_number, top_k=_number,
    top_p=_number, min_p=_opt(_number), repetition_penalty=validate.real,
    presence_penalty=validate.real, frequency_penalty=validate.real,
    no_repeat_ngram_size=_int(), bad_words_ids=_seqs, suppress_tokens=_ids, logit_bias=_bias, sequence_bias=_seq_bias,
    stop_strings=_strings, eos_token_id=_ids,
    num_beams=_int(1), num_return_sequences=_int(1), length_penalty=validate.real,
    early_stopping=_early)
FIELDS = tuple(_CHECKS)


class Defaults:
    """A model's generation defaults (its generation_config.json's fields, else transformers'
    global defaults), checked once: a value of the wrong type is an error naming the field; a
    field dsjax does not implement is a warning naming it (once, here)."""

    def __init__(self, fields: dict, eos: list[int], where: str = "generation_config.json"):
        self.where = where
        self.values = {k: v for k, v in fields.items() if k in FIELDS and v is not None}
        self.values["eos_token_id"] = tuple(eos)
        for key, value in sorted(fields.items()):
            if key not in FIELDS and key not in NEUTRAL and not _is_default(key, value):
                log.warning("%s sets %s=%r, which dsjax does not implement: its outputs can "
                            "differ from transformers'", where, key, value)
        try:
            GenerationSettings(**self.values)
        except (TypeError, ValueError) as e:
            from converters.loader import CheckpointError

            raise CheckpointError(f"{where}: {e}") from None
        self._warned: set = set()

    def resolve(self, call: dict) -> GenerationSettings:
        """The call's arguments (those not None) over these defaults."""
        given = {k: v for k, v in call.items() if v is not None}
        settings = GenerationSettings(**{**self.values, **given})
        self._warn_unused(settings, set(given))
        return settings

    def _warn_unused(self, s: GenerationSettings, user: set) -> None:
        """transformers' warnings for sampling values without do_sample and beam values without
        beams (silent for a file's value when the call chose the mode explicitly)."""
        groups = [("do_sample", not s.do_sample, SAMPLING_ONLY),
                  ("num_beams", s.num_beams == 1, BEAM_ONLY)]
        for flag, unused, names in groups:
            for name in names if unused else ():
                value = getattr(s, name)
                if _is_default(name, value) or (flag in user and name not in user):
                    continue
                if (name, value) not in self._warned:
                    self._warned.add((name, value))
                    log.warning("%s=%r is only used with %s; it has no effect here (%s=%r)",
                                name, value, "do_sample=True" if flag == "do_sample"
                                else "num_beams > 1", flag, getattr(s, flag))


def _is_default(key, value) -> bool:
    if value is None or key not in HF_DEFAULTS and value in ((), [], {}, False):
        return True
    return key in HF_DEFAULTS and value == HF_DEFAULTS[key]


def features(settings: list[GenerationSettings]) -> Features:
    """The processors a batch of requests needs (static)."""
    any_ = lambda fn: any(fn(s) for s in settings)  # noqa: E731
    ngram = max(s.no_repeat_ngram_size for s in settings)
    return Features(
        do_sample=any_(lambda s: s.do_sample),
        penalties=any_(lambda s: s.repetition_penalty != 1 or s.presence_penalty or s.frequency_penalty),
        ngram=next_pow2(ngram) if ngram else 0,
        min_new=any_(lambda s: s.min_new_tokens or s.min_length),
        bias=any_(lambda s: s.logit_bias or s.suppress_tokens or _singles(s)),
        bad_seqs=any_(lambda s: _multis(s)),
        min_p=any_(lambda s: s.do_sample and s.min_p),
        stop_strings=any_(lambda s: s.stop_strings))


def _singles(s: GenerationSettings) -> list:
    """(token, bias) of single-token bad words (never an EOS id, as in transformers) and
    single-token sequence biases."""
    bad = [(w[0], -math.inf) for w in s.bad_words_ids if len(w) == 1 and w[0] not in s.eos_token_id]
    return bad + [(w[0], b) for w, b in s.sequence_bias if len(w) == 1]


def _multis(s: GenerationSettings) -> list:
    if any(len(w) > 1 for w, _ in s.sequence_bias):
        raise ValueError("sequence_bias entries of two or more tokens are not implemented; "
                         "single-token entries and bad_words_ids sequences are")
    return [w for w in s.bad_words_ids if len(w) > 1]


def sampling_rows(settings: list[GenerationSettings], rows: int,
                  prompt_lens=None) -> Sampling:
    """Per-row arrays for `rows` rows: row i takes settings[i] (rows past the list take the
    last one: filler rows). prompt_lens gives min_length's per-row share."""
    n = len(settings)
    pick = [settings[min(i, n - 1)] for i in range(rows)]
    plen = list(prompt_lens) if prompt_lens is not None else [0] * n
    plen += [0] * (rows - len(plen))
    biases = [dict(_pairs(s)) for s in pick]
    K = next_pow2(max([len(b) for b in biases] + [1]))
    seqs = [_multis(s) for s in pick]
    S = next_pow2(max([len(q) for q in seqs] + [1]))
    W = next_pow2(max([len(w) for q in seqs for w in q] + [2]))
    E = next_pow2(max([len(s.eos_token_id) for s in pick] + [1]))
    bias_ids = np.full((rows, K), -1, np.int32)
    bias = np.zeros((rows, K), np.float32)
    bad = np.full((rows, S, W), -1, np.int32)
    eos = np.full((rows, E), -1, np.int32)
    for r, (s, b, q) in enumerate(zip(pick, biases, seqs)):
        bias_ids[r, :len(b)], bias[r, :len(b)] = list(b), list(b.values())
        for j, w in enumerate(q):
            bad[r, j, W - len(w):] = w
        eos[r, :len(s.eos_token_id)] = s.eos_token_id
    col = lambda fn, dtype: np.asarray([fn(s) for s in pick], dtype)  # noqa: E731
    return Sampling(
        do_sample=col(lambda s: s.do_sample, bool),
        temperature=col(lambda s: s.temperature, np.float32),
        top_k=col(lambda s: s.top_k, np.int32), top_p=col(lambda s: s.top_p, np.float32),
        min_p=col(lambda s: s.min_p or 0.0, np.float32),
        repetition_penalty=col(lambda s: s.repetition_penalty, np.float32),
        presence_penalty=col(lambda s: s.presence_penalty, np.float32),
        frequency_penalty=col(lambda s: s.frequency_penalty, np.float32),
        no_repeat_ngram=col(lambda s: s.no_repeat_ngram_size, np.int32),
        min_new=np.asarray([s.min_new(p) for s, p in zip(pick, plen)], np.int32),
        eos=eos, bias_ids=bias_ids, bias=bias, bad_seqs=bad)


def _pairs(s: GenerationSettings) -> list:
    """(token, bias) pairs, summed per token: logit_bias, suppress_tokens, single-token bad
    words and sequence biases."""
    out: dict = {}
    for t, b in list(s.logit_bias) + [(t, -math.inf) for t in s.suppress_tokens] + _singles(s):
        out[t] = out.get(t, 0.0) + b
    return list(out.items())
