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

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from dsjax import settings as st
from dsjax.cache import cache_bytes, device_memory
from dsjax.parallel import distributed, pipeline
from dsjax.prompts import bucket
from dsjax.serving import batch
from dsjax.serving.blocks import BlockAllocator
from dsjax.serving.detokenize import IncrementalText
from dsjax.serving.paged import PagedCache
from dsjax.serving.requests import Request, RequestOutput
from dsjax.serving.scheduler import PENDING, Chunk, Scheduler, Sequence
from dsjax.serving.step import FEATURES, TOP_LOGPROBS, program, swap_weights
from dsjax.validate import id_array

log = logging.getLogger("dsjax")
SERVING_OPTIONS = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature",
                   "top_k", "top_p", "min_p", "eos_token_id", "stop_strings")


@dataclasses.dataclass
class StepRecord:
    """The last step(): the chunks it dispatched, the host's seconds from the step's start to
    its dispatch (scheduling and inputs), and the seconds it then waited for the step before
    (> 0: the device was still busy, so the dispatched step queued behind it: no idle gap)."""

    chunks: list[Chunk]
    prepare_s: float
    wait_s: float


class ServingEngine:
    """Continuous batching with Dynamic SplitFuse (see module docstring), on one device or over
    init_inference's mesh: tensor slices (tp) and replicas (dp), each replica with its own
    scheduler and blocks, all running one step program together.

    block_size: tokens per KV block; num_blocks: blocks per replica (default: memory_fraction of
    the device memory left after the weights; on the CPU, whose memory the host shares, at
    most what max_seqs sequences of max_model_len tokens hold); token_budget: tokens per step
    and replica; max_seqs: sequences per step and replica; max_model_len: prompt + new tokens
    per request (default: the engine's max_out_tokens); decode_steps: where every running
    sequence is decoding and no request waits, the decode steps one step program runs (a
    burst: the host's work per step is paid once per burst; a request that arrives meanwhile
    waits for the burst to end; 1: one per step)."""

    def __init__(self, engine, *, block_size: int = 16, num_blocks: int | None = None,
                 memory_fraction: float = 0.9, token_budget: int = 512, max_seqs: int = 64,
                 max_model_len: int | None = None, decode_steps: int = 1):
        if not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps!r}: a whole number >= 1")
        self.decode_steps = decode_steps
        self.engine, self.cfg, icfg = engine, engine.config, engine.inference_config
        self.plan = plan = _check_plan(engine.plan)
        self.max_len = max_model_len or icfg.max_out_tokens
        self.max_blocks = -(-self.max_len // block_size)
        self.replicas = 1 if plan is None else plan.par.dp
        local = self.cfg if plan is None else pipeline.stage_config(self.cfg, plan.par)
        int8 = icfg.kv_cache_dtype == "int8"
        num_blocks = num_blocks or self._fit_blocks(local, block_size, memory_fraction, int8,
                                                    1 + max_seqs * self.max_blocks)
        self.cache = self._pools(local, num_blocks, block_size, int8)
        self.scheds = [Scheduler(BlockAllocator(num_blocks, block_size), token_budget, max_seqs,
                                 self.max_len, prefix_salt=icfg.kv_cache_dtype.encode())
                       for _ in range(self.replicas)]
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._flight = None  # the step dispatched last: (chunks per replica, tokens, logprobs)
        rows = bucket(max_seqs, minimum=4)
        self._no_tokens = (jnp.zeros((rows,), jnp.int32) if plan is None else distributed.place(
            np.zeros((self.replicas, rows), np.int32), NamedSharding(plan.mesh, PS("dp"))))
        self.program = (program(engine.graphdef) if plan is None else
                        program(engine.graphdef, plan.mesh, engine.runner.specs))
        self._executables = {}  # (layout, full) -> the step compiled by warmup()
        # filler rows: greedy, so that a step of greedy requests runs the greedy program
        fill = dataclasses.replace(engine.defaults.resolve({}), do_sample=False, eos_token_id=())
        self._fill = batch.request_record(fill, 0, 0)
        self.last_step = StepRecord([], 0.0, 0.0)
        self.params = engine.params
        log.info("dsjax serving: %d KV blocks of %d tokens%s, %d-token steps, up to %d sequences",
                 num_blocks, block_size, "" if plan is None else f" per replica ({plan.par.dp} "
                 f"replicas of {plan.par.tp} tensor slices)", token_budget, max_seqs)

    def _fit_blocks(self, local, block_size: int, fraction: float, int8: bool,
                    cpu_cap: int) -> int:
        """Blocks per replica that fit `fraction` of one device's free memory (each device holds
        its tensor slice of its replica's blocks); on the CPU at most cpu_cap."""
        device = self.engine.runner.device
        limit, used = device_memory(device)
        per_block = cache_bytes(local, 1, block_size, self.engine.inference_config.jnp_dtype,
                                quantized=int8)
        fit = max(2, int((limit - used) * fraction) // per_block)
        return min(fit, cpu_cap) if device.platform == "cpu" else fit

    def _pools(self, local, num_blocks: int, block_size: int, int8: bool) -> PagedCache:
        """The pools: [replicas x num_blocks, KV heads, ...], over a mesh split by replica on
        the first axis and by tensor slice on the heads (created in place on each device)."""
        dtype = self.engine.inference_config.jnp_dtype
        if self.plan is None:
            return PagedCache.create(self.cfg, num_blocks, block_size, dtype, quantized=int8)
        make = functools.partial(PagedCache.create, local, num_blocks * self.replicas, block_size,
                                 dtype, quantized=int8, kv_heads=local.kv_heads * self.plan.par.tp)
        where = NamedSharding(self.plan.mesh, PS("dp", "tp"))
        return jax.jit(make, out_shardings=jax.tree.map(lambda _: where, jax.eval_shape(make)))()

    # the first replica's scheduler and blocks (the only ones on one device)
    sched = property(lambda self: self.scheds[0])
    alloc = property(lambda self: self.scheds[0].alloc)

    def blocks_in_use(self) -> int:
        """Blocks held by requests, over every replica (cached free prefixes not counted)."""
        return sum(s.alloc.in_use() for s in self.scheds)

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt, request_id: str | None = None, *, seed: int = 0,
                    top_logprobs: int = 0, **options) -> str:
        """Queues a prompt (token ids) with transformers' generation options (SERVING_OPTIONS)
        over the model's defaults; refuses at once a request that could never run. seed: the
        request's sampling seed; top_logprobs: how many of each step's most likely tokens to
        report with their log-probabilities (at most TOP_LOGPROBS)."""
        if not 0 <= top_logprobs <= TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={top_logprobs}: between 0 and {TOP_LOGPROBS}")
        unknown = sorted(set(options) - set(SERVING_OPTIONS))
        if unknown:
            raise TypeError(f"add_request() got options it does not serve {unknown}; it serves "
                            f"{', '.join(SERVING_OPTIONS)}")
        ids = id_array("prompt", prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("prompt must be one non-empty list of token ids")
        self.cfg.check_ids(ids)
        settings = self.engine.defaults.resolve(options)
        _check_features(settings)
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids.tolist(), settings.new_tokens(ids.size), order=next(self._ids))
        load = [len(s.running) + len(s.waiting) for s in self.scheds]
        replica = load.index(min(load))  # the least busy replica
        self.scheds[replica].add(seq)
        seed = int(seed) & 0xFFFFFFFF
        self.requests[rid] = Request(seq, settings, seed, replica,
                                      batch.request_record(settings, ids.size, seed),
                                      int(top_logprobs), text=IncrementalText(
                                          self.engine.tokenizer, [])  # (the output's own text)
                                      if settings.stop_strings else None)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks (None if it is unknown or already done)."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return None
        self.scheds[req.replica].remove(req.seq)
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
        for s in self.scheds:
            s.alloc.forget_prefixes()

    # ------------------------------------------------------------------ steps

    def step(self) -> list[RequestOutput]:
        """Dispatches one ragged step, then reads the step before it (which the device has
        finished or is finishing): the host prepares step n + 1 while the device runs step n.
        Returns the outputs of the requests that got a token (or finished) in the step read."""
        start = time.perf_counter()
        plans, steps = self._plan()
        flight, self._flight = self._flight, None
        if any(plans):
            prev = flight[1] if flight is not None else self._no_tokens
            reqs = [self.requests[c.seq.id] for chunks in plans for c in chunks]
            full = any(r.top_n or r.settings.do_sample for r in reqs)
            layout = self._layout(plans, [r.record for r in reqs], steps)
            self.cache, tok, out = self._run(self._buffer(plans, layout), prev, layout, full)
            out.copy_to_host_async()
            for sched, chunks in zip(self.scheds, plans):
                sched.advance(chunks)
                for i, c in enumerate(chunks):
                    if c.samples:  # its tokens exist only on the device until the next step
                        c.seq.out.extend([PENDING] * c.steps)
                        c.seq.pending_row = i
            self._flight = (plans, tok, out)
        prepared = time.perf_counter()
        outs, waited = ([], 0.0) if flight is None else self._read(flight)
        self.last_step = StepRecord([c for chunks in plans for c in chunks], prepared - start,
                                    waited)
        return outs

    def _plan(self) -> tuple[list[list[Chunk]], int]:
        """The next step's chunks per replica and its decode steps: a burst of decode_steps
        where every replica can run one (dsjax.serving.scheduler.Scheduler.burst_runs), else one
        SplitFuse step."""
        if self.decode_steps > 1:
            runs = [s.burst_runs(self.decode_steps) for s in self.scheds]
            if all(r is not None for r in runs) and any(runs):
                return [s.burst(r) for s, r in zip(self.scheds, runs)], self.decode_steps
        return [s.schedule() for s in self.scheds], 1

    def _read(self, flight) -> tuple[list[RequestOutput], float]:
        """The outputs of the step in flight, and the seconds spent waiting for its tokens."""
        plans, _, out = flight
        start = time.perf_counter()
        out = np.asarray(distributed.gather(out)).reshape(self.replicas, *out.shape[-3:])
        waited = time.perf_counter() - start
        single = out.shape[1] == 1  # a program of one decode step
        tok, chosen = _by_row(out[..., 0]), _by_row(out[..., 1].view(np.float32))
        top_ids = out[..., 2:2 + TOP_LOGPROBS]
        top = out[..., 2 + TOP_LOGPROBS:].view(np.float32)
        outs = []
        for r, chunks in enumerate(plans):
            for i, c in enumerate(chunks):
                if not c.samples:
                    continue
                at = c.start + c.n - len(c.seq.prompt)  # the index of its last token
                if single:
                    new, lps = [tok[r][i]], [chosen[r][i]]
                    c.seq.out[at] = new[0]
                else:
                    new, lps = tok[r][i][:c.steps], chosen[r][i]
                    c.seq.out[at - c.steps + 1:at + 1] = new
                if c.seq.out[-1] != PENDING:  # no newer token of it in flight
                    c.seq.pending_row = None
                req = self.requests.get(c.seq.id)
                if req is not None and req.seq is c.seq:  # not aborted or finished meanwhile
                    # (nor its id taken by a new request)
                    n = req.top_n
                    pairs = [list(zip(top_ids[r, k, i, :n].tolist(), top[r, k, i, :n].tolist()))
                             for k in range(c.steps)] if n else None
                    outs.append(self._took(req, new, lps, pairs))
        return outs, waited

    def _took(self, req: Request, tokens: list[int], logprobs: list[float],
              tops: list | None) -> RequestOutput:
        """A request's new tokens, in order, up to the first that finishes it (the burst's
        tokens after that one are dropped); tops: each one's top log-probabilities, if asked."""
        reason = None
        for n, token in enumerate(tokens, 1):
            req.logprobs.append(logprobs[n - 1])
            req.top.append(tops[n - 1] if tops else [])
            if token in req.settings.eos_token_id:  # (masked on the device before min_new)
                reason = "stop"
            elif req.settings.stop_strings and self._stop_string(req):
                reason = "stop"
            elif len(req.logprobs) >= req.seq.max_new:  # tokens read (more may be in flight)
                reason = "length"
            if reason is not None:
                self.requests.pop(req.seq.id)
                self.scheds[req.replica].remove(req.seq)
                return self._output(req, tokens[:n], reason)
        return self._output(req, tokens, reason)

    def _stop_string(self, req: Request) -> bool:
        """Whether the decoded output now contains a stop string (decoding only the new tokens,
        searching only the text that could hold a new occurrence)."""
        req.text.add(req.seq.out, end=len(req.logprobs))
        text = req.text.text
        longest = max(len(s) for s in req.settings.stop_strings)
        start = max(0, req.searched - longest + 1)
        found = [(text.find(s, start), s) for s in req.settings.stop_strings]
        found = [(i, s) for i, s in found if i >= 0]
        req.searched = len(text)
        if found:
            req.stop_string = min(found)[1]
        return bool(found)

    @staticmethod
    def _output(req: Request, new: list[int], reason: str | None) -> RequestOutput:
        return RequestOutput(req, new, reason)

    def _layout(self, plans: list[list[Chunk]], records, steps: int = 1) -> batch.Layout:
        """The step's bucketed shapes: N tokens (Chunk.fed: a burst's chunk puts one in) and S
        sequences to powers of two (the same for every replica), its decode steps."""
        tokens = max(sum(c.fed for c in chunks) for chunks in plans)
        return batch.Layout(bucket(tokens),
                            bucket(max(len(chunks) for chunks in plans), minimum=4),
                            batch.eos_columns(records), self.max_blocks, steps)

    def _buffer(self, plans: list[list[Chunk]], layout: batch.Layout):
        """The step's buffer on the device (one transfer; [replicas, ...] over a mesh)."""
        bs = self.scheds[0].alloc.block_size
        bufs = [batch.pack(chunks, [self.requests[c.seq.id].record for c in chunks], self._fill,
                           layout, bs) for chunks in plans]
        if self.plan is None:
            return jax.device_put(bufs[0])
        return distributed.place(np.stack(bufs), NamedSharding(self.plan.mesh, PS("dp")))

    def warmup(self, workers: int | None = None, sampling: bool = True) -> int:
        """Compiles the step for every bucket of tokens and sequences a step can take, greedy
        and (with sampling) the sampling program, in parallel threads (XLA compiles outside the
        GIL; default: one per CPU, at most 32), keeps the executables, which the steps then
        call (never tracing again), and runs each once on an empty batch (which writes
        nothing), so that serving never stops to trace or compile. Returns how many programs."""
        if self.has_unfinished():
            raise ValueError("warmup() needs an idle engine")
        todo = [(lay, full) for lay in self._step_layouts()
                for full in (False, True)[:1 + sampling]]
        empty = {lay: self._buffer([[] for _ in self.scheds], lay) for lay, _ in todo}
        start, done = time.perf_counter(), itertools.count(1)

        def compile_(job):
            lay, full = job
            self._executables[job] = self.program.lower(
                self.params, self.cache, empty[lay], self._no_tokens, layout=lay, full=full).compile()
            n = next(done)
            if n % max(1, len(todo) // 8) == 0 or n == len(todo):
                log.info("dsjax serving: compiled %d of %d step programs (%.0f s)", n, len(todo),
                         time.perf_counter() - start)
        with concurrent.futures.ThreadPoolExecutor(workers or min(32, os.cpu_count() or 8)) as pool:
            list(pool.map(compile_, todo))
        for n, (lay, full) in enumerate(todo, 1):  # each run once (the first-call costs)
            self.cache, tok, _ = self._run(empty[lay], self._no_tokens, lay, full)
            jax.block_until_ready(tok)
            if n % max(1, len(todo) // 8) == 0 or n == len(todo):
                log.info("dsjax serving: ran %d of %d step programs once (%.0f s)", n, len(todo),
                         time.perf_counter() - start)
        return len(todo)

    def _step_layouts(self) -> list[batch.Layout]:
        """Every layout a step can take: N tokens and S sequences (S <= N), and with
        decode_steps > 1 the bursts' (one token per sequence)."""
        top_n = bucket(self.sched.budget)
        top_s = bucket(self.sched.max_seqs, minimum=4)
        eos = batch.eos_columns([])
        out = [batch.Layout(n, s, eos, self.max_blocks) for n in _powers(16, top_n)
               for s in _powers(4, top_s) if s <= max(n, 4)]
        if self.decode_steps > 1:
            out += [batch.Layout(bucket(s), s, eos, self.max_blocks, self.decode_steps)
                    for s in _powers(4, top_s) if bucket(s) <= top_n]
        return out

    def _run(self, buf, prev, layout, full):
        """One step program: the executable warmup() compiled for its shape, else jit's call
        path (which traces and compiles a shape met for the first time)."""
        exe = self._executables.get((layout, full))
        if exe is None:
            return self.program(self.params, self.cache, buf, prev, layout=layout, full=full)
        return exe(self.params, self.cache, buf, prev)

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


def _check_features(settings: st.GenerationSettings) -> None:
    """Refuses settings (the model's generation_config.json defaults included) that ask for a
    logits processor the serving step does not run, rather than ignoring it."""
    need = st.features([settings])
    extra = [_UNSERVED[f] for f in _UNSERVED if getattr(need, f) and not getattr(FEATURES, f)]
    if extra:
        raise ValueError(f"the serving engine applies temperature, top_k, top_p, min_p, "
                         f"min_new_tokens, EOS ids and stop strings; these settings (with the "
                         f"model's generation_config.json defaults) also ask for "
                         f"{', '.join(extra)}, which it does not implement")


_UNSERVED = {"penalties": "repetition/presence/frequency penalties",
             "ngram": "no_repeat_ngram_size", "bias": "logit bias / suppressed or bad tokens",
             "bad_seqs": "bad_words_ids sequences"}


def _by_row(x: np.ndarray) -> list:
    """[replicas, K, R] as nested lists by replica and row: [r][i] a row's K values, or (one
    step, the common case, read fastest) its value."""
    return x[:, 0].tolist() if x.shape[1] == 1 else x.transpose(0, 2, 1).tolist()


def _check_plan(plan):
    """The mesh plan (None on one device) if the serving engine can run it."""
    if plan is not None and (plan.par.pp > 1 or plan.par.offload_kv):
        raise ValueError(f"the serving engine runs tensor slices and replicas (tensor_parallel, "
                         f"data_parallel); this engine has pipeline stages (pp_size="
                         f"{plan.par.pp}{', offload_kv' if plan.par.offload_kv else ''}): build "
                         "it without pipeline_parallel to serve it")
    return plan


def _powers(lo: int, hi: int) -> list[int]:
    """Powers of two from lo to hi."""
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out
