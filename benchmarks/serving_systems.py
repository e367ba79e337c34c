"""The systems benchmarks/serving.py runs on one request trace: dsjax's serving engine (all
requests at once, or arriving as a Poisson process), dsjax's static generate in batches, and HF
transformers' continuous batching (its own process). Each returns a dict of figures; the
serving engine also its steps (for the roofline) and per-request timings (dsjax.serving.metrics).

A trace is a list of {"prompt": [ids], "max_new": n}; every system makes exactly n tokens per
request (no stop token: random weights have no meaningful EOS, so the trace's output lengths
stand in for where real answers end).
"""

from __future__ import annotations

import time

import jax

from dsjax.serving.engine import ServingEngine
from dsjax.serving.metrics import RequestTiming, summarize


def serve(srv: ServingEngine, trace: list[dict], arrivals: list[float] | None = None) -> dict:
    """Runs the trace through the engine; arrivals: seconds after the start at which each request
    is added (None: all at once). Returns summarize()'s figures plus the steps' records."""
    arrivals = arrivals or [0.0] * len(trace)
    order = sorted(range(len(trace)), key=lambda i: arrivals[i])
    timings = [RequestTiming(a, len(r["prompt"])) for a, r in zip(arrivals, trace)]
    steps, nxt, start = [], 0, time.perf_counter()
    while nxt < len(order) or srv.has_unfinished():
        now = time.perf_counter() - start
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            i = order[nxt]
            srv.add_request(trace[i]["prompt"], request_id=str(i),
                            max_new_tokens=trace[i]["max_new"], eos_token_id=[])
            nxt += 1
        if not srv.has_unfinished():
            time.sleep(max(0.0, arrivals[order[nxt]] - now))
            continue
        outs = srv.step()
        t = time.perf_counter() - start
        rec = srv.last_step
        steps.append({"t": t, "prepare_s": rec.prepare_s, "wait_s": rec.wait_s,
                      "chunks": [(c.start, c.n, c.steps) for c in rec.chunks],
                      "running": sum(len(s.running) for s in srv.scheds)})
        for o in outs:
            timings[int(o.request_id)].token_times.extend([t] * len(o.new_token_ids))
    last = max(t.token_times[-1] for t in timings if t.token_times)
    figures = summarize(timings, last - min(arrivals))
    figures["preemptions"] = sum(s.preemptions for s in srv.scheds)
    figures["prefix_hits"] = sum(s.alloc.hits for s in srv.scheds)
    assert srv.blocks_in_use() == 0, "the run leaked KV blocks"
    return dict(figures, steps=steps)


def static_batches(engine, trace: list[dict], batch: int) -> dict:
    """generate() on batches of `batch` requests in arrival order, each row its own
    max_new_tokens (a batch runs until its longest row ends: what static batching costs)."""
    start, made = time.perf_counter(), 0
    for b in range(0, len(trace), batch):
        rows = trace[b:b + batch]
        out = engine.generate([r["prompt"] for r in rows], eos_token_id=[],
                              per_prompt=[{"max_new_tokens": r["max_new"]} for r in rows])
        made += sum(len(s) for s in out.sequences)
    jax.effects_barrier()
    wall = time.perf_counter() - start
    want = sum(r["max_new"] for r in trace)
    assert made == want, f"static generate made {made} tokens, the trace asks {want}"
    prompt = sum(len(r["prompt"]) for r in trace)
    return {"batch": batch, "duration_s": wall, "output_tokens": made,
            "output_tokens_per_s": made / wall, "total_tokens_per_s": (made + prompt) / wall}


def hf_continuous(hf_config: dict, trace: list[dict], timeout_s: float) -> dict:
    """HF transformers' continuous batching (init_continuous_batching's manager, each request its
    own max_new_tokens) on a random-weight torch model of the same architecture, bf16, on the
    GPU. Stops at timeout_s (then the figures are over the requests finished by then)."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**hf_config)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    gen = transformers.GenerationConfig(max_new_tokens=max(r["max_new"] for r in trace),
                                        do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch([r["prompt"] for r in trace[:8]], generation_config=gen,
                         max_new_tokens=16)  # warm-up: CUDA graphs, kernels
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    start, done, made, prompt = time.perf_counter(), 0, 0, 0
    try:
        for i, r in enumerate(trace):
            manager.add_request(r["prompt"], request_id=str(i), max_new_tokens=r["max_new"])
        while done < len(trace) and time.perf_counter() - start < timeout_s:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done += 1
                made += len(result.generated_tokens)
                prompt += len(trace[int(result.request_id)]["prompt"])
    finally:
        wall = time.perf_counter() - start
        manager.stop(block=False)
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "completed": done, "requests": len(trace), "duration_s": wall, "output_tokens": made,
            "output_tokens_per_s": made / wall, "total_tokens_per_s": (made + prompt) / wall,
            "timed_out": done < len(trace)}
