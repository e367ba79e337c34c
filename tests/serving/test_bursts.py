"""Decode bursts (ServingEngine(decode_steps=K)): where every running sequence decodes and no
request waits, one step program runs K decode steps. Requests end as they would one step at a
time: stop tokens, stop strings and max_new_tokens inside a burst drop the burst's later tokens;
seeded draws and top log-probabilities are those of single steps; an abort mid-burst frees the
request's blocks; after warmup() a burst compiles nothing."""

import jax
import numpy as np

import dsjax

from dsjax.policy import KernelPolicy
from dsjax.serving.engine import ServingEngine
from dsjax.serving.blocks import BlockAllocator
from dsjax.serving.scheduler import Scheduler, Sequence
from tests.conftest import llama_model, prompt

KW = dict(block_size=4, num_blocks=64, token_budget=64, max_seqs=8)  # every prompt in one step


def run(srv, requests: dict) -> tuple[dict, int]:
    """{id: (prompt, options)} added at once and run to the end: ({id: [outputs]}, bursts)."""
    for rid, (p, opts) in requests.items():
        srv.add_request(p, request_id=rid, **opts)
    outs, bursts = {}, 0
    while srv.has_unfinished():
        for o in srv.step():
            outs.setdefault(o.request_id, []).append(o)
        bursts += any(c.steps > 1 for c in srv.last_step.chunks)
    assert srv.blocks_in_use() == 0
    return outs, bursts


def test_bursts_end_requests_as_single_steps_do():
    engine = dsjax.init_inference("tiny-llama", dtype="fp32", max_out_tokens=64, progress=False)
    p = [prompt(800 + i, 3 + 4 * i) for i in range(4)]
    free = engine.generate([p[0]], max_new_tokens=12, eos_token_id=[]).sequences[0]
    decode = engine.tokenizer.decode
    stop = decode(free)[len(decode(free[:6])):len(decode(free[:8]))]  # tokens 6 and 7's text
    sampled = dict(max_new_tokens=9, do_sample=True, temperature=1.3, top_k=40, seed=11,
                   top_logprobs=3, eos_token_id=[])
    requests = {
        "eos": (p[0], dict(max_new_tokens=12, eos_token_id=[free[5]])),  # mid-burst stop token
        "stop": (p[0], dict(max_new_tokens=12, eos_token_id=[], stop_strings=[stop])),
        "length": (p[1], dict(max_new_tokens=7, eos_token_id=[])),  # not a multiple of 3
        "sampled": (p[2], sampled),
        "greedy": (p[3], dict(max_new_tokens=11, eos_token_id=[], top_logprobs=2)),
    }
    single, _ = run(ServingEngine(engine, **KW), requests)
    burst, bursts = run(ServingEngine(engine, **KW, decode_steps=3), requests)
    assert bursts > 0
    for rid in requests:
        want, got = single[rid][-1], burst[rid][-1]
        assert got.token_ids == want.token_ids, rid
        assert got.finish_reason == want.finish_reason and got.stop_string == want.stop_string
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
        assert [[i for i, _ in t] for t in got.top_logprobs or []] == \
            [[i for i, _ in t] for t in want.top_logprobs or []]
        # streamed: the new tokens of each output join to the whole answer
        assert sum((o.new_token_ids for o in burst[rid]), []) == got.token_ids, rid
    assert burst["eos"][-1].token_ids == free[:free.index(free[5]) + 1]
    assert burst["stop"][-1].finish_reason == "stop"
    assert burst["length"][-1].finish_reason == "length" and len(burst["length"][-1].token_ids) == 7
    assert burst["greedy"][-1].token_ids == engine.generate(
        [p[3]], max_new_tokens=11, eos_token_id=[]).sequences[0]
    assert max(len(o.new_token_ids) for o in burst["greedy"]) == 3  # a burst's three at once


def test_abort_mid_burst_and_warmed_bursts_compile_nothing(llama_pair):
    _, engine = llama_pair
    srv = ServingEngine(engine, block_size=8, num_blocks=64, token_budget=32, max_seqs=4,
                        decode_steps=4)
    assert srv.warmup(sampling=False) == 2 + 1  # steps of 16 or 32 tokens, bursts of 4 rows
    compiles = []

    def listener(name, secs, **kw):
        if "backend_compile" in name:
            compiles.append(name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        a = srv.add_request(prompt(850, 5), max_new_tokens=30, eos_token_id=[])
        b = srv.add_request(prompt(851, 6), max_new_tokens=30, eos_token_id=[])
        steps, aborted, after = [], False, []
        while srv.has_unfinished():
            outs = srv.step()
            after += [o for o in outs if aborted and o.request_id == a]
            in_flight = [c for c in srv.last_step.chunks if c.seq.id == a]
            steps.append(max((c.steps for c in srv.last_step.chunks), default=0))
            if not aborted and any(o.request_id == a and len(o.token_ids) >= 9 for o in outs) \
                    and in_flight and in_flight[0].steps == 4:  # a burst holding a in flight
                assert srv.abort(a).finish_reason == "abort"
                aborted = True
                assert len(srv.requests[b].seq.blocks) > 0 and srv.blocks_in_use() == len(
                    srv.requests[b].seq.blocks)  # a's blocks free at once
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert aborted and after == []  # nothing of a's burst in flight reported after the abort
    assert compiles == [] and 4 in steps and srv.blocks_in_use() == 0


def test_pallas_paged_attention_bursts_with_a_row_that_stops_early():
    """A row that reaches its max_new_tokens inside a burst keeps a valid token in the flat
    batch (the Pallas kernel's tiles count each sequence's valid tokens from its first), so
    the rows after it attend as they would in single steps (interpret mode)."""
    engine = dsjax.init_inference(llama_model(num_hidden_layers=1), dtype="fp32",
                                  max_out_tokens=64, progress=False,
                                  kernels=KernelPolicy(paged_attention="pallas", interpret=True))
    prompts = [prompt(870, 7), prompt(871, 6), prompt(872, 9)]
    outs = {}
    for k in (1, 4):
        srv = ServingEngine(engine, block_size=4, num_blocks=64, token_budget=64, max_seqs=8,
                            decode_steps=k)
        for i, (p, m) in enumerate(zip(prompts, (6, 12, 12))):  # 0 stops inside a burst
            srv.add_request(p, request_id=str(i), max_new_tokens=m, eos_token_id=[])
        done, bursts = {}, 0
        while srv.has_unfinished():
            done.update({o.request_id: o.token_ids for o in srv.step() if o.finished})
            bursts += any(c.steps > 1 for c in srv.last_step.chunks)
        outs[k] = [done[str(i)] for i in range(3)]
        assert bursts > 0 or k == 1
    assert outs[4] == outs[1]


def test_a_burst_waits_for_waiting_requests_and_never_preempts():
    """No burst while a request waits or a prompt is still running, nor where the free blocks
    cannot hold every sequence's next steps (then nothing changes: a single step runs, and
    preempts as it must)."""
    sched = Scheduler(BlockAllocator(8, 4), token_budget=16, max_seqs=4, max_len=64)
    a, b = Sequence("a", list(range(1, 7)), 20, order=0), Sequence("b", [9] * 9, 3, order=1)
    assert sched.burst_runs(4) == []  # idle: a replica with nothing to run joins any burst
    sched.add(a)
    assert sched.burst_runs(4) is None  # a waits
    sched.advance(sched.schedule())  # a's prompt (6 tokens, 2 blocks)
    a.out.append(5)  # its first token, sampled
    sched.add(b)
    assert sched.burst_runs(4) is None  # b waits
    sched.advance(sched.schedule())  # a's decode token and b's prompt (9 tokens, 3 blocks)
    a.out.append(6)
    b.out.append(7)
    held = [sched.alloc.allocate(), sched.alloc.allocate()]  # none left: a needs one more
    # for its next 4 tokens (b's 3 blocks hold its 2)
    before = (list(a.blocks), list(b.blocks), sched.alloc.num_free)
    assert sched.burst_runs(4) is None and (list(a.blocks), list(b.blocks),
                                            sched.alloc.num_free) == before
    sched.alloc.free(held)
    a.max_new, a_max = len(a.out) + 3, a.max_new
    assert sched.burst_runs(4) is None  # nobody has 4 tokens left: single steps, no idle steps
    a.max_new = a_max
    chunks = sched.burst(sched.burst_runs(4))
    assert [(c.seq.id, c.start, c.n, c.steps, c.samples) for c in chunks] == [
        ("a", 7, 4, 4, True), ("b", 9, 2, 2, True)]  # b: 2 of its 3 new tokens are left
    assert len(a.blocks) == 3 and len(b.blocks) == 3 and sched.preemptions == 0
