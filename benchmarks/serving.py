"""Serving on one GPU: dsjax's continuous-batching engine against static batching and HF
transformers' continuous batching on one request trace, the trace's roofline, and latency at
Poisson arrival rates.

    python benchmarks/serving.py [--model llama3.2-1b] [--requests 256] [--name serving-1b]
    python benchmarks/serving.py --model llama3-8b --requests 128 --rates 0.5 --poisson-requests 64

The trace (seeded): prompts of uniformly drawn lengths in --prompt-len (64-2048 tokens),
outputs of log-uniformly drawn lengths in --output-len (16-512: most answers short, some long,
as answers end at EOS), random token ids, every request exactly its length (no stop token).
Systems, in this order:
  hf       HF transformers' continuous batching (init_continuous_batching, per-request
           max_new_tokens), its own process first (it must not share the GPU with JAX's pool);
  static   dsjax generate() in batches of --static-batches in arrival order (two passes: the
           first compiles, the second is timed);
  serving  the ServingEngine: warmup() compiles every step shape, then the whole trace at once
           (throughput), then at Poisson rates (fractions --rates of the measured request
           throughput) over the first --poisson-requests requests: TTFT, TPOT, ITL, E2E,
           FastGen's effective throughput (dsjax.serving.metrics); once per --decode-steps
           value (decode bursts), the others compared with the first in their own table.
Roofline of the trace: over the serving run's own steps, sum of max(bytes / bandwidth, FLOPs /
matmul rate), bytes = the weights + each chunk's sequence K/V read once + the new K/V written,
FLOPs = 2 x body parameters x tokens + 2 x head parameters x chunks + causal attention;
bandwidth = the bf16 GEMV's measured bytes/s, matmul rate = a measured bf16 8192^3 matmul.
The decode floor of a step: (weights + its decode sequences' K/V) / bandwidth.
Overlap: per step, the seconds the host waited for the step before after dispatching the next
one (> 0: the device had work queued, no idle gap between steps).
Writes benchmarks/results/NAME.json/.md/.png (and $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import harness, serving_report as report, serving_systems as systems  # noqa: E402
from dsjax import presets  # noqa: E402
from dsjax.bench_serve import arrivals, random_requests  # noqa: E402


def make_trace(n: int, vocab: int, prompt_len, output_len, seed: int) -> list[dict]:
    """dsjax bench serve's random requests, as {"prompt": ids, "max_new": n}."""
    return [{"prompt": r["prompt"], "max_new": r["max_tokens"]}
            for r in random_requests(n, prompt_len, output_len, seed, vocab)]


def run_hf(args, trace) -> dict:
    """HF in a child process (its CUDA memory is gone when it returns)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(trace, f)
    cmd = [sys.executable, __file__, "--hf-child", f.name, "--model", args.model,
           "--hf-timeout", str(args.hf_timeout)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hf_timeout + 300)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {"error": done.stderr.strip()[-600:]}
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    finally:
        os.unlink(f.name)


def ceilings() -> dict:
    import jax
    import jax.numpy as jnp

    bw = harness.gemv_bandwidth()["bytes_per_s"]
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    t, _ = harness.median_time(lambda: mm(a).block_until_ready(), 10, warmup=2)
    return {"bytes_per_s": bw, "flops_per_s": 2 * 8192 ** 3 / t}


def model_costs(engine) -> dict:
    """Per-token bytes and FLOP counts of the engine's model for the roofline."""
    from dsjax.bench import weight_bytes_per_step
    from dsjax.model import flatten

    cfg = engine.config
    sizes = {k: int(np.prod(v.shape)) for k, v in flatten(engine.params).items()}
    body = sum(sizes.values()) - sizes.get("embed.embedding", 0) - sizes.get("lm_head.kernel", 0)
    return {"weight_bytes": weight_bytes_per_step(engine), "body_params": body,
            "head_params": cfg.vocab_size * cfg.hidden_size,
            "kv_token_bytes": 2 * cfg.num_layers * cfg.kv_heads * cfg.dim_head * 2,
            "attn_flops_per_pair": 4 * cfg.num_layers * cfg.num_heads * cfg.dim_head}


def roofline(steps, costs: dict, ceil: dict) -> dict:
    """The trace's floor over the run's steps, and each step's decode floor."""
    total, decode_floors = 0.0, []
    for chunks in (one for s in steps for one in model_steps(s["chunks"])):
        tokens = sum(n for _, n in chunks)
        kv = costs["kv_token_bytes"] * (sum(a + n for a, n in chunks) + tokens)
        nbytes = costs["weight_bytes"] + kv
        pairs = sum(n * a + n * (n + 1) / 2 for a, n in chunks)  # causal (query, key) pairs
        flops = (2 * costs["body_params"] * tokens + 2 * costs["head_params"] * len(chunks)
                 + costs["attn_flops_per_pair"] * pairs)
        total += max(nbytes / ceil["bytes_per_s"], flops / ceil["flops_per_s"])
        dec = [a for a, n in chunks if n == 1]
        if dec:
            decode_floors.append((costs["weight_bytes"] + costs["kv_token_bytes"]
                                  * sum(a + 1 for a in dec)) / ceil["bytes_per_s"])
    return {"floor_s": total, "decode_floor_ms_p50": float(np.median(decode_floors) * 1e3)
            if decode_floors else None}


def model_steps(chunks) -> list[list[tuple[int, int]]]:
    """A step's chunks [(start, n, steps)] as the model steps it ran [[(start, n)]]: a burst's
    chunk (steps > 1) is one token in each of its first `steps` decode steps."""
    k = max((st for _, _, st in chunks), default=1)
    if k == 1:
        return [[(a, n) for a, n, _ in chunks]]
    return [[(a + j, 1) for a, _, st in chunks if j < st] for j in range(k)]


def overlap(steps) -> dict:
    """How often the host found the previous step still running after dispatching the next."""
    steady = steps[2:-2]
    waits = np.array([s["wait_s"] for s in steady])
    return {"steps": len(steps), "waited_fraction": float(np.mean(waits > 1e-4)) if len(steady) else None,
            "prepare_ms_p50": float(np.median([s["prepare_s"] for s in steady]) * 1e3) if steady else None,
            "step_ms_p50": float(np.median(np.diff([s["t"] for s in steady])) * 1e3) if len(steady) > 1 else None}




def check_kernels(args, trace) -> dict:
    """The Pallas paged-attention kernel against the XLA reference on the GPU: greedy tokens and
    their log-probabilities of a few short requests on two engines of the same weights."""
    import dsjax
    from benchmarks.harness import pallas
    from dsjax.policy import KernelPolicy
    from dsjax.serving.engine import ServingEngine

    reqs = [r["prompt"][:200] for r in trace[:6]]
    result = {}
    for dtype in ("bf16", "fp32"):
        outs = {}
        for name, policy in (("xla", KernelPolicy()), ("pallas", pallas(linear="xla"))):
            eng = dsjax.init_inference(args.model, dtype=dtype, max_out_tokens=512,
                                       kernels=policy, progress=False)
            srv = ServingEngine(eng, num_blocks=512, token_budget=128, max_seqs=8)
            outs[name] = srv.generate(reqs, max_new_tokens=24, eos_token_id=[])
            del srv, eng
        same, gaps = 0, []
        for x, p in zip(outs["xla"], outs["pallas"]):
            n = next((i for i, (a, b) in enumerate(zip(x.token_ids, p.token_ids)) if a != b), 24)
            same += n
            gaps += [abs(a - b) for a, b in zip(x.logprobs[:n + 1], p.logprobs[:n + 1])]
        result[dtype] = {"tokens_equal_before_divergence": same / (24 * len(reqs)),
                         "max_abs_logprob_diff": float(max(gaps))}
    return result


def run_dsjax(args, trace, res: dict, name: str) -> None:
    """static, serving and check (as --systems asks) into res, saved after each."""
    import dsjax
    from benchmarks.harness import pallas

    which = args.systems.split(",")
    engine = dsjax.init_inference(args.model, dtype="bf16", kernels=pallas(linear="xla"),
                                  max_out_tokens=args.prompt_len[1] + args.output_len[1],
                                  progress=False)
    if "static" in which:
        res["static"] = []
        for b in args.static_batches:
            try:
                systems.static_batches(engine, trace, b)  # the first pass compiles
                res["static"].append(systems.static_batches(engine, trace, b))
            except Exception as e:  # noqa: BLE001 (a row of the report)
                res["static"].append({"batch": b, "error": harness.error_line(e)})
            print("static:", res["static"][-1], flush=True)
            harness.save(name, res, report.markdown(res))
    if "serving" in which:
        costs = model_costs(engine)
        for k in args.decode_steps:  # the first: res["serving"]; the others: res["bursts"]
            try:
                base = res.get("serving", {}).get("offline", {}).get("request_throughput")
                run = run_serving(args, trace, engine, k, base)
            except Exception as e:  # noqa: BLE001 (the report says so; the rest still runs)
                traceback.print_exc()
                res["serving_error"] = harness.error_line(e)
                continue
            for fig in [run["offline"]] + run["poisson"]:
                steps = fig.pop("steps")
                fig["roofline"] = roofline(steps, costs, res["ceilings"])
                fig["overlap"] = overlap(steps)
            if "serving" in res:
                res.setdefault("bursts", []).append(run)
            else:
                res["serving"] = run
            harness.save(name, res, report.markdown(res))
    del engine
    if "check" in which:
        try:
            res["check"] = check_kernels(args, trace)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["check_error"] = harness.error_line(e)


def run_serving(args, trace, engine, decode_steps: int = 1, base_rate: float | None = None):
    """The engine on the trace at once, then at Poisson rates: fractions of base_rate (default:
    this run's own request throughput), so that every --decode-steps value sees the same
    arrivals."""
    from dsjax.serving.engine import ServingEngine

    srv = ServingEngine(engine, block_size=args.block_size, token_budget=args.token_budget,
                        max_seqs=args.max_seqs, memory_fraction=0.85,
                        num_blocks=args.num_blocks, decode_steps=decode_steps)
    t = time.perf_counter()
    programs = srv.warmup(workers=16)
    out = {"decode_steps": decode_steps,
           "warmup": {"programs": programs, "seconds": time.perf_counter() - t}}
    out["offline"] = systems.serve(srv, trace)
    max_rate = base_rate or out["offline"]["request_throughput"]
    sub = trace[:args.poisson_requests]
    out["poisson"] = []
    for frac in args.rates:
        rate = frac * max_rate
        fig = systems.serve(srv, sub, arrivals(len(sub), rate, 1.0, args.seed))  # Poisson
        out["poisson"].append(dict(fig, fraction=frac, rate=rate))
        print(f"poisson {frac:.2f}: TPOT p95 {fig['tpot_ms']['p95']:.1f} ms", flush=True)
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3.2-1b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=harness.ints, default=[64, 2048])
    ap.add_argument("--output-len", type=harness.ints, default=[16, 512])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="hf,static,serving,check")
    ap.add_argument("--static-batches", type=harness.ints, default=[32, 64])
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--max-seqs", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, help="default: 85%% of the free device memory")
    ap.add_argument("--decode-steps", type=harness.ints, default=[1], help="the engine's "
                    "decode bursts (ServingEngine(decode_steps=)): decode steps per step "
                    "program where no request waits; several (e.g. 1,8): one serving run each, "
                    "the first the report's main one (default 1: none)")
    ap.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",")],
                    default=[0.3, 0.6, 0.9])
    ap.add_argument("--poisson-requests", type=int, default=128)
    ap.add_argument("--hf-timeout", type=float, default=240)
    ap.add_argument("--hf-child")
    ap.add_argument("--name")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.hf_child:  # the HF process
        trace = json.loads(Path(args.hf_child).read_text())
        print(json.dumps(systems.hf_continuous(presets.hf_config(args.model), trace,
                                               args.hf_timeout)))
        return
    vocab = presets.hf_config(args.model)["vocab_size"]
    trace = make_trace(args.requests, vocab, args.prompt_len, args.output_len, args.seed)
    which = args.systems.split(",")
    res = {"args": vars(args), "trace": {"requests": len(trace),
           "prompt_tokens": sum(len(r["prompt"]) for r in trace),
           "output_tokens": sum(r["max_new"] for r in trace)}}
    if "hf" in which:
        res["hf"] = run_hf(args, trace)
        print("hf:", res["hf"], flush=True)
    name = args.name or f"serving-{args.model}"
    res["env"], res["ceilings"] = harness.environment(), ceilings()
    run_dsjax(args, trace, res, name)
    harness.save(name, res, report.markdown(res))
    report.plot(res, name)
    print(report.summary(res))


if __name__ == "__main__":
    main()
