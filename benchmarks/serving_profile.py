"""Where the serving engine's step spends its time on the GPU, against the static decode floor.

    python benchmarks/serving_profile.py [--model llama3.2-1b] [--seqs 64] [--context 1024]
        [--budget 1024] [--out DIR]

Random weights. The engine runs --seqs requests of --context prompt tokens until all decode,
then: the engine's step interval (host included), the device time of one captured step program
called back to back (decode only; decode + prompt chunks filling the budget), each under a
profiler trace summarised per kernel (benchmarks/decode_profile.py), with variants of the same
inputs (sampling rows, top log-probabilities, the XLA paged attention, a pool of a few blocks
against one filling the device); and dsjax's static generate decode step at the same batch and
context. Writes serving_profile.json and .md under --out.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dsjax  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.decode_profile import kernel_summary, kind  # noqa: E402
from dsjax.serving.engine import ServingEngine  # noqa: E402


def build(args, policy, num_blocks):
    engine = dsjax.init_inference(args.model, dtype="bf16", kernels=policy, progress=False,
                                  max_out_tokens=args.context + 512)
    srv = ServingEngine(engine, token_budget=args.budget, max_seqs=128, num_blocks=num_blocks,
                        memory_fraction=0.85)
    return engine, srv


def fill(srv, args, rng) -> list[float]:
    """--seqs requests until every one decodes; returns the step intervals of 20 decode steps."""
    for _ in range(args.seqs):
        srv.add_request(rng.integers(0, srv.cfg.vocab_size, args.context).tolist(), max_new_tokens=400,
                        eos_token_id=[])
    while any(not s.out for s in srv.sched.running) or srv.sched.waiting:
        srv.step()
    times = []
    for _ in range(21):
        srv.step()
        times.append(time.perf_counter())
    return list(np.diff(times))


def capture(srv):
    """The inputs (buffer, layout) of the step the engine would run next (schedule() only grows
    and admits)."""
    plans = [s.schedule() for s in srv.scheds]
    layout = srv._layout(plans, [srv.requests[c.seq.id].record for c in plans[0]])
    return (srv._buffer(plans, layout), layout), sum(c.n for c in plans[0]), len(plans[0])


def call(srv, inputs, full=False):
    buf, layout = inputs
    srv.cache, tok, out = srv.program(srv.params, srv.cache, buf, srv._no_tokens, layout=layout,
                                      full=full)
    return out


def device_ms(srv, inputs, calls: int = 10, reps: int = 5, full=False) -> float:
    """Median ms per step program over reps of `calls` back-to-back calls (the cache chained)."""
    def run():
        t = time.perf_counter()
        for _ in range(calls):
            out = call(srv, inputs, full)
        dispatched.append((time.perf_counter() - t) / calls * 1e3)
        jax.block_until_ready(out)
    dispatched: list = []
    run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) / calls * 1e3)
    DISPATCH_MS.append(statistics.median(dispatched))
    return statistics.median(times)


DISPATCH_MS: list = []  # host ms per call to dispatch (the calls queued, not waited for)


def profile(srv, inputs, calls: int = 5) -> dict:
    """Per-kernel GPU time per step over `calls` steps, the top 12 and totals by kind."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(calls):
            out = call(srv, inputs)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        s = kernel_summary(Path(d))
    if "error" in s:
        return s
    rows = sorted(((v[1] / calls, v[0] / calls, k) for k, v in s["by_name"].items()), reverse=True)
    kinds: dict = {}
    for us, _, name in rows:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + us
    return {"busy_us": sum(r[0] for r in rows), "span_us": s["span_us"] / calls, "by_kind": kinds,
            "top": [{"us": us, "per_step": n, "name": name[:90]} for us, n, name in rows[:12]]}


def kind_of(name: str) -> str:
    low = name.lower()
    for key in ("paged_attention", "scatter", "sort", "top", "gather"):
        if key in low:
            return key
    return kind(name)


def variants(srv, inputs) -> dict:
    return {"greedy": device_ms(srv, inputs), "full (sampling, top-20)": device_ms(srv, inputs,
                                                                                 full=True)}


def host_profile(srv, steps: int = 20) -> str:
    """cProfile of `steps` engine steps: the host's top functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        srv.step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def static_decode_ms(engine, batch: int, context: int) -> float:
    prompts = harness.random_prompts(engine.config.vocab_size, batch, context)
    run = lambda n: engine.generate(prompts, max_new_tokens=n, eos_token_id=[]).tokens  # noqa: E731
    run(65)
    measured = harness.time_generate(run, 65, warmup=1, reps=3)
    return harness.timing(measured, 65)["decode_ms_per_token"]


def scenario(srv, args, rng, label: str, out: dict) -> None:
    out[f"{label} engine interval ms"] = statistics.median(fill(srv, args, rng)) * 1e3
    (Path(args.out) / f"host_profile_{label}.txt").write_text(host_profile(srv))
    rec = srv.last_step
    out[f"{label} host prepare ms"], out[f"{label} host wait ms"] = rec.prepare_s * 1e3, rec.wait_s * 1e3
    dec, n, s = capture(srv)
    out[f"{label} decode step"] = {"tokens": n, "seqs": s, **variants(srv, dec)}
    out[f"{label} dispatch ms"] = DISPATCH_MS[-2]
    out[f"{label} decode profile"] = profile(srv, dec)
    for _ in range(8):  # prompts that fill the rest of the budget
        srv.add_request(rng.integers(0, srv.cfg.vocab_size, args.context).tolist(), max_new_tokens=8,
                        eos_token_id=[])
    mixed, n, s = capture(srv)
    out[f"{label} mixed step"] = {"tokens": n, "seqs": s, "greedy": device_ms(srv, mixed)}
    out[f"{label} mixed profile"] = profile(srv, mixed)


def markdown(res: dict) -> str:
    lines = [f"# Serving step profile: {res['model']}, {res['env'].get('device')}", "",
             f"{res['seqs']} sequences at {res['context']} tokens of context; static generate "
             f"decode {res['static decode ms']:.2f} ms/step; weight-read floor "
             f"{res['floor ms']:.2f} ms.", ""]
    for key, val in res.items():
        if key.endswith("profile") and "top" in val:
            lines += [f"## {key}: busy {val['busy_us']:.0f} us of a {val['span_us']:.0f} us span",
                      "", "by kind: " + ", ".join(f"{k} {v:.0f} us" for k, v in
                                                  sorted(val["by_kind"].items(), key=lambda kv: -kv[1])),
                      "", "| us/step | per step | kernel |", "| --- | --- | --- |"]
            lines += [f"| {t['us']:.1f} | {t['per_step']:.1f} | `{t['name']}` |" for t in val["top"]]
            lines.append("")
        elif isinstance(val, (float, dict)) and not key.endswith("profile") and key not in ("env",):
            lines.append(f"- {key}: {json.dumps(val) if isinstance(val, dict) else f'{val:.3f}'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3.2-1b")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--skip", default="", help="comma list of: static, xla, bigpool")
    args = ap.parse_args(argv)
    skip = args.skip.split(",")
    res = {"model": args.model, "seqs": args.seqs, "context": args.context,
           "env": harness.environment()}
    small = args.seqs * (-(-(args.context + 512) // 16)) + 8 * 80
    engine, srv = build(args, harness.pallas(linear="xla"), small)
    bw = harness.gemv_bandwidth()["bytes_per_s"]
    res["floor ms"] = harness.weight_bytes_per_step(engine) / bw * 1e3
    res["static decode ms"] = (float("nan") if "static" in skip
                               else static_decode_ms(engine, args.seqs, args.context))
    print("static decode ms", res["static decode ms"], flush=True)
    scenario(srv, args, np.random.default_rng(0), "pallas", res)
    print(json.dumps({k: v for k, v in res.items() if "profile" not in k}, default=str), flush=True)
    if "bigpool" not in skip:
        del srv
        _, srv = build(args, harness.pallas(linear="xla"), None)
        res["bigpool blocks"] = srv.alloc.capacity
        res["bigpool engine interval ms"] = statistics.median(fill(srv, args,
                                                                   np.random.default_rng(0))) * 1e3
        res["bigpool decode step ms"] = device_ms(srv, capture(srv)[0])
    if "xla" not in skip:
        del srv, engine
        engine, srv = build(args, harness.XLA, small)
        res["xla engine interval ms"] = statistics.median(fill(srv, args,
                                                               np.random.default_rng(0))) * 1e3
        dec = capture(srv)[0]
        res["xla decode step ms"] = device_ms(srv, dec)
        res["xla decode profile"] = profile(srv, dec)
    harness.save("serving_profile", res, markdown(res), out=Path(args.out))
    print(markdown(res))


if __name__ == "__main__":
    main()
