"""Where a dsjax decode step spends its time on the GPU: a profiler trace of one generate call,
summarised per kernel (count per step, total time), with the GPU-busy fraction.

    python benchmarks/decode_profile.py --arch gpt2-1.3b --batch 1 [--variant dsjax-pallas]
        [--tp 2] [--layers 8] [--json OUT_FILE] [--hlo OUT_FILE]

Random weights (built in JAX, no torch). --variant: a dsjax engine variant of
benchmarks/harness.py (a KernelPolicy and init_inference keywords; `--kernels on` is the older
spelling of dsjax-pallas). Prints decode ms/token (dsjax.bench's measure) against the
weight-read floor and the top kernels; `--hlo` writes the optimized HLO of the jitted generate.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

import dsjax  # noqa: E402
from benchmarks import harness  # noqa: E402
from dsjax import presets  # noqa: E402


_COLLECTIVE = re.compile(r"nccl|psum|all.?reduce|all.?gather|collective|one.?shot", re.I)


def kernel_summary(trace_dir: Path) -> dict:
    """Per-kernel totals of the first GPU from the perfetto trace that jax.profiler writes."""
    path = next(trace_dir.rglob("*.trace.json.gz"))
    events = json.loads(gzip.open(path).read())["traceEvents"]
    gpus = sorted((str(e.get("args", {}).get("name", "")), e["pid"]) for e in events
                  if e.get("ph") == "M" and e.get("name") == "process_name"
                  and "GPU" in str(e.get("args", {}).get("name", "")))
    gpu_pids = {pid for _, pid in gpus[:1]}  # the first GPU (over a mesh they run in lockstep)
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]
    if not kernels:
        return {"error": f"no GPU events found in {path.name}"}
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
    return {"gpu": gpus[0][0], "span_us": max(e["ts"] + e["dur"] for e in kernels)
            - min(e["ts"] for e in kernels), "by_name": dict(by_name)}


def kind(name: str) -> str:
    return ("collective" if _COLLECTIVE.search(name) else
            "gemm" if re.search(r"gemm|nvjet|dot|cublas|matmul", name, re.I) else "other")


def per_step(long: dict, short: dict, steps: int) -> dict:
    """What the extra steps of the long run cost on the GPU: (long - short) / steps."""
    names = set(long["by_name"]) | set(short["by_name"])
    diff = {n: [(long["by_name"].get(n, [0, 0])[i] - short["by_name"].get(n, [0, 0])[i]) / steps
                for i in (0, 1)] for n in names}
    out = {"span_us": (long["span_us"] - short["span_us"]) / steps, "kernels": 0.0,
           "busy_us": 0.0, **{f"{k}_us": 0.0 for k in ("gemm", "collective", "other")},
           **{f"{k}_kernels": 0.0 for k in ("gemm", "collective", "other")}}
    for n, (count, us) in diff.items():
        out["kernels"] += count
        out["busy_us"] += us
        out[f"{kind(n)}_us"] += us
        out[f"{kind(n)}_kernels"] += count
    out["idle_us"] = out["span_us"] - out["busy_us"]
    out["all"] = [{"name": n[:120], "per_step": c, "us": t}
                  for n, (c, t) in sorted(diff.items(), key=lambda kv: -kv[1][1]) if c or t]
    out["top"] = out["all"][:20]
    return out


def attention_rate(d: dict, kv_bytes: float) -> dict:
    """The Pallas decode-attention kernel's own read rate: the K/V bytes an average decode step
    reads over that kernel's GPU time per step (launch gaps and the XLA fusion that combines
    its splits not counted)."""
    hits = [k for k in d["all"] if "decode_attention" in k["name"]]
    us = sum(k["us"] for k in hits)
    return {"kernels_per_step": sum(k["per_step"] for k in hits), "us_per_step": us,
            "kv_bytes_per_step": kv_bytes, "bytes_per_s": kv_bytes / (us * 1e-6) if us else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gpt2-1.3b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (profiles GPU 0)")
    p.add_argument("--layers", type=int, help="override the architecture's layer count")
    p.add_argument("--variant", choices=list(harness.DSJAX_VARIANTS), default=None,
                   help="the engine variant (default dsjax-xla)")
    p.add_argument("--kernels", choices=("on", "off"), default="off",
                   help="on: --variant dsjax-pallas (replace_with_kernel_inject)")
    p.add_argument("--json", default=None, help="write the per-step summary here")
    p.add_argument("--hlo", default=None, help="write the optimized HLO of generate here")
    args = p.parse_args()
    variant = args.variant or ("dsjax-pallas" if args.kernels == "on" else "dsjax-xla")

    model = args.arch
    if args.layers:  # the same layers, fewer of them
        model = dataclasses.replace(presets.model_config(args.arch), num_layers=args.layers)
    engine = dsjax.init_inference(model, dtype="bf16", max_out_tokens=args.prompt_len + args.new_tokens,
                                  tensor_parallel={"tp_size": args.tp}, progress=False,
                                  **harness.DSJAX_VARIANTS[variant][1])
    prompts = harness.random_prompts(engine.config.vocab_size, args.batch, args.prompt_len)
    run = lambda n: engine.generate(prompts, max_new_tokens=n, eos_token_id=[]).tokens  # noqa: E731
    run(args.new_tokens)
    measured = harness.time_generate(run, args.new_tokens, warmup=1, reps=5)
    decode_ms = harness.timing(measured, args.new_tokens)["decode_ms_per_token"]
    bw = harness.gemv_bandwidth()["bytes_per_s"]
    floor_ms = harness.weight_bytes_per_step(engine) / bw * 1e3  # bytes on one device
    print(f"{args.arch} bs {args.batch}, {variant}: decode {decode_ms:.3f} ms/token, floor "
          f"{floor_ms:.3f} ms ({decode_ms / floor_ms:.2f}x); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)

    traces = {}
    for n in (1, args.new_tokens):  # the difference is the decode steps alone
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d, create_perfetto_trace=True)
            run(n)
            jax.profiler.stop_trace()
            traces[n] = kernel_summary(Path(d))
    if "error" in traces[1] or "error" in traces[args.new_tokens]:
        print(traces[1].get("error") or traces[args.new_tokens]["error"])
    else:
        d = per_step(traces[args.new_tokens], traces[1], args.new_tokens - 1)
        print(f"per decode step on {traces[1]['gpu']}: GPU span {d['span_us']:.0f} us, kernels "
              f"{d['busy_us']:.0f} us ({d['busy_us'] / d['span_us']:.0%} busy, idle {d['idle_us']:.0f} us), "
              f"{d['kernels']:.0f} kernels: GEMM {d['gemm_us']:.0f} us in {d['gemm_kernels']:.0f}, "
              f"collectives {d['collective_us']:.0f} us in {d['collective_kernels']:.0f}, "
              f"other {d['other_us']:.0f} us in {d['other_kernels']:.0f}")
        for k in d["top"]:
            print(f"  {k['us']:8.1f} us/step  {k['per_step']:6.1f}/step  {k['name']}")
        # decode steps i = 1 .. n - 1 (the difference of the runs): step i sees prompt + i keys
        mean_ctx = args.prompt_len + args.new_tokens / 2
        att = attention_rate(d, harness.kv_bytes_per_step(engine.config, args.batch, mean_ctx,
                                                          harness.kv_itemsize(engine)))
        if att["bytes_per_s"]:
            print(f"decode_attention kernel: {att['us_per_step']:.1f} us/step in "
                  f"{att['kernels_per_step']:.0f} kernels for {att['kv_bytes_per_step'] / 1e6:.1f} "
                  f"MB of K/V: {att['bytes_per_s'] / 1e12:.2f} TB/s "
                  f"({att['bytes_per_s'] / bw:.0%} of the GEMV ceiling)")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"arch": args.arch, "layers": engine.config.num_layers, "tp": args.tp,
                 "variant": variant, "kernels": engine.inference_config.kernels.describe(),
                 "batch": args.batch, "decode_ms_per_token": decode_ms, "floor_ms": floor_ms,
                 **harness.environment(), "gemv_bytes_per_s": bw, "attention": att, "per_step": d},
                indent=1))
    if args.hlo:
        Path(args.hlo).write_text(harness.compiled_generate(engine, args.prompt_len, args.batch).as_text())


if __name__ == "__main__":
    main()
