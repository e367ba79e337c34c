"""The host side of DecoderEngine.generate(): each prompt's settings (dsjax.settings), its
token limit, the packed per-row request, and the outputs. The engine runs the program; this
module only prepares and unpacks, so the same steps serve generate, stream and beam search."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import generate as gen
from dsjax import settings as st
from dsjax import validate
from dsjax.cache import check_budget
from dsjax.prompts import prompt_rows

log = logging.getLogger("dsjax")


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    tokens: np.ndarray  # [N, max new tokens] new tokens, pad_token_id after each sequence's end
    num_tokens: np.ndarray  # [N] tokens generated per sequence (a stop token included)
    logprobs: np.ndarray | None  # [N, max new tokens] log p(token) under the model, if asked
    sequences_scores: np.ndarray | None = None  # [N] beam scores (transformers' definition)

    # N = prompts x num_return_sequences, each prompt's sequences together (transformers' order)

    @property
    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.num_tokens)]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One generate call, checked and packed (rows: the real prompts)."""

    rows: list
    settings: list  # GenerationSettings per prompt
    limits: list  # new tokens allowed per prompt
    tokens: np.ndarray  # [B', T] packed prompts
    lengths: np.ndarray  # [B']
    request: gen.Request
    features: object  # dsjax.sampling.Features
    samples: int  # sequences per prompt (num_return_sequences)
    beams: int

    @property
    def width(self) -> int:
        return max(self.limits)


def resolve(engine, input_ids, attention_mask, call: dict, per_prompt) -> tuple[list, list]:
    """(prompt rows, their settings): the call's arguments over the model's defaults, and each
    per_prompt dict over those."""
    rows = prompt_rows(input_ids, attention_mask)
    for r in rows:
        engine.config.check_ids(r)
    if per_prompt is None:
        return rows, [engine.defaults.resolve(call)] * len(rows)
    if not isinstance(per_prompt, (list, tuple)) or len(per_prompt) != len(rows):
        raise ValueError(f"per_prompt must be a list of {len(rows)} dicts (one per prompt), "
                         f"got {type(per_prompt).__name__}")
    for i, d in enumerate(per_prompt):
        check_names(d, f"per_prompt[{i}]")
    return rows, [engine.defaults.resolve({**call, **(d or {})}) for d in per_prompt]


def check_names(options: dict | None, where: str = "generate()") -> None:
    unknown = sorted(set(options or {}) - set(st.FIELDS))
    if unknown:
        raise TypeError(f"{where} got unknown generation options {unknown}; dsjax implements "
                        f"{', '.join(st.FIELDS)}")


def limits(rows, settings, budget: int, warned: set) -> list[int]:
    """New tokens per prompt: max_new_tokens (checked against the cache budget), else
    max_length's or transformers' default 20, cut at the budget with one warning."""
    out = []
    for r, s in zip(rows, settings):
        n = s.new_tokens(len(r))
        if s.max_new_tokens is None and len(r) + n > budget:
            if ("budget", s.max_length) not in warned:
                warned.add(("budget", s.max_length))
                log.warning("max_length=%s reaches past this engine's max_out_tokens=%d: "
                            "generation stops at %d tokens (pass max_new_tokens, or a larger "
                            "max_out_tokens to init_inference)", s.max_length, budget, budget)
            n = budget - len(r)
        if n < 1:
            raise ValueError(f"max_length={s.max_length} leaves no room for new tokens after a "
                             f"prompt of {len(r)} tokens; pass max_new_tokens")
        check_budget(len(r), n, budget)
        out.append(n)
    return out


def prepare(engine, rows, settings, fill: int, stop_factory) -> Prepared:
    """Packs the prompts and their per-row request (filler rows take the last prompt's
    settings; they are finished from the start)."""
    static = {(s.num_beams, s.num_return_sequences) for s in settings}
    if len(static) > 1:
        raise ValueError("num_beams and num_return_sequences must be the same for every prompt "
                         f"of one call, got {sorted(static)}")
    beams, samples = static.pop()
    lim = limits(rows, settings, engine.inference_config.max_out_tokens, engine.warned)
    tokens, lengths = engine.pack(rows, fill)
    B = len(tokens)
    sampling = st.sampling_rows(settings, B, [len(r) for r in rows])
    stop = None
    if any(s.stop_strings for s in settings):
        stop = stop_factory([list(s.stop_strings) or None for s in settings]
                            + [None] * (B - len(rows)))
    limit = np.asarray(lim + lim[-1:] * (B - len(rows)), np.int32)
    request = gen.Request(limit, sampling, stop)
    return Prepared(rows, settings, lim, tokens, lengths, request, st.features(settings),
                    samples if beams == 1 else 1, beams)


def program(engine, p: Prepared, return_logprobs: bool) -> gen.Program:
    return gen.Program(capacity=engine.inference_config.max_out_tokens, features=p.features,
                       return_logprobs=return_logprobs,
                       int8_cache=engine.inference_config.kv_cache_dtype == "int8",
                       samples=p.samples)


def output(p: Prepared, out, count, lps, pad: int, return_logprobs: bool) -> GenerationOutput:
    """The real rows' outputs, cut to the longest limit, pad_token_id after each end."""
    n = len(p.rows) * p.samples
    out, count = np.array(out)[:n, :p.width], np.asarray(count)[:n]
    out[np.arange(out.shape[1])[None] >= count[:, None]] = pad  # HF's filler, any id
    return GenerationOutput(out, count, np.asarray(lps)[:n, :p.width] if return_logprobs else None)


def prng_key(key, do_sample: bool):
    """The sampling key: a jax.random.key (or a legacy uint32 [2] key); greedy needs none."""
    if key is None:
        if do_sample:
            raise ValueError("do_sample=True needs an explicit prng_key (jax.random.key(seed))")
        return jax.random.key(0)
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    legacy = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,)
    if not (typed and key.shape == ()) and not legacy:
        raise TypeError(f"prng_key must be one jax.random.key(seed), got {type(key).__name__}"
                        f"{' of shape ' + str(key.shape) if hasattr(key, 'shape') else ''}")
    return key


def device_request(req: gen.Request) -> gen.Request:
    return jax.tree.map(jnp.asarray, req)


def pad_id(engine, pad_token_id) -> int:
    if pad_token_id is None:
        return engine.pad_token_id
    pad = validate.integer("pad_token_id", pad_token_id, low=0)
    engine.config.check_ids([pad], "pad_token_id")
    return pad
