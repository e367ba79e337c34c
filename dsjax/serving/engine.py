"""The serving engine: requests in, tokens out, continuous batching over the paged KV pools.

    serving = ServingEngine(engine, token_budget=512)    # engine: dsjax.init_inference(...)
    rid = serving.add_request(prompt_ids, max_new_tokens=64, temperature=0.7, do_sample=True)
    while serving.has_unfinished():
        for out in serving.step():                      # one ragged step: RequestOutputs
            ...
    serving.abort(rid)

Each step: the scheduler's chunks (dsjax.serving.scheduler) become one flat batch (bucketed
shapes), the jitted step (dsjax.serving.step) writes their K/V and picks a token for each
sequence whose prompt (or recomputation) ends in it, and the host checks stop tokens and
lengths. Per-request settings are transformers' generation options over the model's
generation_config.json (dsjax.settings), plus a sampling seed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import settings as st
from dsjax.cache import cache_bytes, device_memory
from dsjax.prompts import bucket
from dsjax.serving.blocks import BlockAllocator
from dsjax.serving.paged import PagedCache, StepMeta
from dsjax.serving.scheduler import PENDING, Chunk, Scheduler, Sequence
from dsjax.serving.step import StepInputs, ragged_step, swap_weights
from dsjax.validate import id_array

log = logging.getLogger("dsjax")
SERVING_OPTIONS = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature",
                   "top_k", "top_p", "min_p", "eos_token_id", "stop_strings")


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every token generated so far
    logprobs: list[float]  # log p of each under the model
    new_token_ids: list[int]  # those of this step
    finished: bool = False
    finish_reason: str | None = None  # "stop" (a stop token or string), "length", "abort"
    stop_string: str | None = None  # the stop string that ended it (OpenAI's and vLLM's
    # semantics: found in the decoded text; the text returned ends before it)


@dataclasses.dataclass
class _Request:
    seq: Sequence
    settings: st.GenerationSettings
    seed: int
    logprobs: list = dataclasses.field(default_factory=list)
    searched: int = 0  # decoded characters already searched for stop strings
    stop_string: str | None = None


class ServingEngine:
    """Continuous batching with Dynamic SplitFuse on one device (see module docstring).

    block_size: tokens per KV block; num_blocks: the pool (default: memory_fraction of the
    device memory left after the weights); token_budget: tokens per step; max_seqs: sequences
    per step; max_model_len: prompt + new tokens per request (default: the engine's
    max_out_tokens)."""

    def __init__(self, engine, *, block_size: int = 16, num_blocks: int | None = None,
                 memory_fraction: float = 0.9, token_budget: int = 512, max_seqs: int = 64,
                 max_model_len: int | None = None):
        if engine.runner.plan is not None:
            raise ValueError("the serving engine runs on one device for now; this engine is "
                             "over a mesh")
        self.engine, self.cfg, icfg = engine, engine.config, engine.inference_config
        self.max_len = max_model_len or icfg.max_out_tokens
        self.max_blocks = -(-self.max_len // block_size)
        int8 = icfg.kv_cache_dtype == "int8"
        num_blocks = num_blocks or self._fit_blocks(block_size, memory_fraction, int8)
        self.cache = PagedCache.create(self.cfg, num_blocks, block_size, icfg.jnp_dtype,
                                       quantized=int8)
        self.alloc = BlockAllocator(num_blocks, block_size)
        self.sched = Scheduler(self.alloc, token_budget, max_seqs, self.max_len,
                               prefix_salt=icfg.kv_cache_dtype.encode())
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._flight = None  # the step dispatched last: (chunks, tokens, logprobs), unread
        self._no_tokens = jnp.zeros((bucket(max_seqs, minimum=4),), jnp.int32)
        self.params = engine.params
        log.info("dsjax serving: %d KV blocks of %d tokens, %d-token steps, up to %d sequences",
                 num_blocks, block_size, token_budget, max_seqs)

    def _fit_blocks(self, block_size: int, fraction: float, int8: bool) -> int:
        limit, used = device_memory(self.engine.runner.device)
        per_block = cache_bytes(self.cfg, 1, block_size, self.engine.inference_config.jnp_dtype,
                                quantized=int8)
        return max(2, int((limit - used) * fraction) // per_block)

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt, request_id: str | None = None, *, seed: int = 0,
                    **options) -> str:
        """Queues a prompt (token ids) with transformers' generation options (SERVING_OPTIONS)
        over the model's defaults; refuses at once a request that could never run."""
        unknown = sorted(set(options) - set(SERVING_OPTIONS))
        if unknown:
            raise TypeError(f"add_request() got options it does not serve {unknown}; it serves "
                            f"{', '.join(SERVING_OPTIONS)}")
        ids = id_array("prompt", prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("prompt must be one non-empty list of token ids")
        self.cfg.check_ids(ids)
        settings = self.engine.defaults.resolve(options)
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids.tolist(), settings.new_tokens(ids.size), order=next(self._ids))
        self.sched.add(seq)
        self.requests[rid] = _Request(seq, settings, int(seed) & 0xFFFFFFFF)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks (None if it is unknown or already done)."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return None
        self.sched.remove(req.seq)
        return self._output(req, [], "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._flight is not None

    def swap_params(self, params) -> None:
        """Replaces the weights in place (same structure, shapes, dtypes): no recompile. Between
        requests only (the prefix cache, computed with the old weights, is dropped)."""
        if self.has_unfinished():
            raise ValueError("swap_params() needs an idle engine: finish or abort the running "
                             "requests first")
        self.params = swap_weights(self.engine.graphdef, self.params, params)
        self.alloc.forget_prefixes()

    # ------------------------------------------------------------------ steps

    def step(self) -> list[RequestOutput]:
        """Dispatches one ragged step, then reads the step before it (which the device has
        finished or is finishing): the host prepares step n + 1 while the device runs step n.
        Returns the outputs of the requests that got a token (or finished) in the step read."""
        chunks = [c for c in self.sched.schedule() if c.seq in self.sched.running]
        flight, self._flight = self._flight, None
        if chunks:
            inputs = self._inputs(chunks)
            prev = flight[1] if flight is not None else self._no_tokens
            self.cache, tok, lp = ragged_step(self.engine.graphdef, self.params, self.cache,
                                              inputs, prev)
            self.sched.advance(chunks)
            for i, c in enumerate(chunks):
                if c.samples:  # its token exists only on the device until the next step
                    c.seq.out.append(PENDING)
                    c.seq.pending_row = i
            self._flight = (chunks, tok, lp)
        return [] if flight is None else self._read(flight)

    def _read(self, flight) -> list[RequestOutput]:
        chunks, tok, lp = flight
        tok, lp = np.asarray(tok), np.asarray(lp)
        outs = []
        for i, c in enumerate(chunks):
            if not c.samples:
                continue
            c.seq.out[c.start + c.n - len(c.seq.prompt)] = int(tok[i])
            if c.seq.out[-1] != PENDING:  # no newer token of it in flight
                c.seq.pending_row = None
            if c.seq.id in self.requests:  # not aborted or finished meanwhile
                outs.append(self._took(self.requests[c.seq.id], int(tok[i]), float(lp[i])))
        return outs

    def _took(self, req: _Request, token: int, logprob: float) -> RequestOutput:
        req.logprobs.append(logprob)
        reason = None
        if token in req.settings.eos_token_id:  # (masked on the device before min_new_tokens)
            reason = "stop"
        elif req.settings.stop_strings and self._stop_string(req):
            reason = "stop"
        elif len(req.logprobs) >= req.seq.max_new:  # tokens read (one may still be in flight)
            reason = "length"
        if reason is not None:
            self.requests.pop(req.seq.id)
            self.sched.remove(req.seq)
        return self._output(req, [token], reason)

    def _stop_string(self, req: _Request) -> bool:
        """Whether the decoded output now contains a stop string (searching only the text that
        could hold a new occurrence)."""
        text = self.engine.tokenizer.decode(req.seq.out[:len(req.logprobs)])
        longest = max(len(s) for s in req.settings.stop_strings)
        start = max(0, req.searched - longest + 1)
        found = [(text.find(s, start), s) for s in req.settings.stop_strings]
        found = [(i, s) for i, s in found if i >= 0]
        req.searched = len(text)
        if found:
            req.stop_string = min(found)[1]
        return bool(found)

    @staticmethod
    def _output(req: _Request, new: list[int], reason: str | None) -> RequestOutput:
        return RequestOutput(req.seq.id, req.seq.prompt, req.seq.out[:len(req.logprobs)],
                             list(req.logprobs),
                             new, reason is not None, reason, req.stop_string)

    def _inputs(self, chunks: list[Chunk]) -> StepInputs:
        """The flat batch of the chunks, padded to bucketed N tokens and S sequences."""
        n = sum(c.n for c in chunks)
        N, S, bs = bucket(n), bucket(len(chunks), minimum=4), self.alloc.block_size
        tokens, positions = np.zeros(N, np.int32), np.zeros(N, np.int32)
        from_prev = np.full(N, -1, np.int32)
        slots, token_seq = np.full(N, -1, np.int32), np.zeros(N, np.int32)
        tables = np.zeros((S, self.max_blocks), np.int32)
        sample_at, new_tokens = np.zeros(S, np.int32), np.zeros(S, np.int32)
        seeds, at = np.zeros(S, np.uint32), 0
        settings = []
        for i, c in enumerate(chunks):
            seq, req = c.seq, self.requests[c.seq.id]
            pos = np.arange(c.start, c.start + c.n)
            tokens[at:at + c.n] = np.maximum(np.asarray(seq.tokens, np.int32)[pos], 0)
            if seq.pending_row is not None:  # its last token is the step in flight's
                last = len(seq.tokens) - 1
                if c.start <= last < c.start + c.n:
                    from_prev[at + last - c.start] = seq.pending_row
            positions[at:at + c.n], token_seq[at:at + c.n] = pos, i
            slots[at:at + c.n] = np.asarray(seq.blocks)[pos // bs] * bs + pos % bs
            tables[i, :len(seq.blocks)] = seq.blocks
            sample_at[i], new_tokens[i], seeds[i] = at + c.n - 1, len(seq.out), req.seed
            settings.append(req.settings)
            at += c.n
        sampling = st.sampling_rows(settings, S, [len(c.seq.prompt) for c in chunks])
        arrays = (tokens, from_prev, positions, StepMeta(slots, token_seq, tables), sample_at,
                  new_tokens, seeds, sampling)
        return jax.tree.map(jnp.asarray, StepInputs(*arrays))

    # ------------------------------------------------------------------ offline

    def generate(self, prompts, **options) -> list[RequestOutput]:
        """Every prompt to the end, as continuous batching runs them; outputs in input order."""
        ids = [self.add_request(p, **options) for p in prompts]
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]
