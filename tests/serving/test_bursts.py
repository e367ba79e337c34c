"""Decode bursts (ServingEngine(decode_steps=K)): where every running sequence decodes and no
request waits, one step program runs K decode steps. Requests end as they would one step at a
time: stop tokens, stop strings and max_new_tokens inside a burst drop the burst's later tokens;
seeded draws and top log-probabilities are those of single steps; an abort mid-burst frees the
request's blocks; after warmup() a burst compiles nothing."""

import jax
import numpy as np

import dsjax

from dsjax.serving.engine import ServingEngine
from dsjax.serving.blocks import BlockAllocator
from dsjax.serving.scheduler import Scheduler, Sequence
from tests.conftest import prompt

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
        steps = []
        while srv.has_unfinished():
            outs = srv.step()
            steps.append(max((c.steps for c in srv.last_step.chunks), default=0))
            if any(o.request_id == a and len(o.token_ids) >= 9 for o in outs) and a in srv.requests:
                assert srv.abort(a).finish_reason == "abort"
                assert len(srv.requests[b].seq.blocks) > 0 and srv.blocks_in_use() == len(
                    srv.requests[b].seq.blocks)  # a's blocks free at once
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and 4 in steps and srv.blocks_in_use() == 0


def test_a_burst_waits_for_waiting_requests_and_never_preempts():
    """No burst while a request waits or a prompt is still running, nor where the free blocks
    cannot hold every sequence's next steps (then nothing changes: a single step runs, and
    preempts as it must)."""
    sched = Scheduler(BlockAllocator(8, 4), token_budget=16, max_seqs=4, max_len=64)
    a, b = Sequence("a", list(range(1, 7)), 20, order=0), Sequence("b", [9] * 9, 3, order=1)
    sched.add(a)
    assert sched.burst(4) is None  # a waits
    sched.advance(sched.schedule())  # a's prompt (6 tokens, 2 blocks)
    a.out.append(5)  # its first token, sampled
    sched.add(b)
    assert sched.burst(4) is None  # b waits
    sched.advance(sched.schedule())  # a's decode token and b's prompt (9 tokens, 3 blocks)
    a.out.append(6)
    b.out.append(7)
    held = [sched.alloc.allocate(), sched.alloc.allocate()]  # none left: a needs one more
    # for its next 4 tokens (b's 3 blocks hold its 2)
    before = (list(a.blocks), list(b.blocks), sched.alloc.num_free)
    assert sched.burst(4) is None and (list(a.blocks), list(b.blocks),
                                       sched.alloc.num_free) == before
    sched.alloc.free(held)
    chunks = sched.burst(4)
    assert [(c.seq.id, c.start, c.n, c.steps, c.samples) for c in chunks] == [
        ("a", 7, 4, 4, True), ("b", 9, 2, 2, True)]  # b: 2 of its 3 new tokens are left
    assert len(a.blocks) == 3 and len(b.blocks) == 3 and sched.preemptions == 0
