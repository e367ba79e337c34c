"""Where a dsjax decode step spends its time on the GPU: a profiler trace of one generate call,
summarised per kernel (count per step, total time), with the GPU-busy fraction.

    python benchmarks/decode_profile.py --arch gpt2-1.3b --batch 1 [--hlo OUT_FILE]

Random weights (built in JAX, no torch). Prints decode ms/token against the weight-read floor
and the top kernels; `--hlo` writes the optimized HLO of the jitted generate for reading.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.decode_latency import weight_bytes_per_step  # noqa: E402


def kernel_summary(trace_dir: Path) -> dict:
    """Per-kernel totals from the perfetto trace that jax.profiler writes."""
    path = next(trace_dir.rglob("*.trace.json.gz"))
    events = json.loads(gzip.open(path).read())["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]
    if not kernels:
        return {"error": f"no GPU events found in {path.name}"}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
    busy = sum(e["dur"] for e in kernels)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    return {"gpu_span_us": end - start, "kernel_time_us": busy, "kernel_launches": len(kernels),
            "top": [{"name": n[:120], "count": c, "total_us": t} for n, (c, t) in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gpt2-1.3b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--hlo", default=None, help="write the optimized HLO of generate here")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    import dsjax
    from dsjax import generate as gen

    engine = dsjax.init_inference(args.arch, dtype="bf16", max_out_tokens=args.prompt_len + args.new_tokens)
    prompts = np.random.default_rng(0).integers(0, engine.config.vocab_size,
                                                (args.batch, args.prompt_len)).tolist()
    run = lambda n: engine.generate(prompts, max_new_tokens=n, eos_token_id=[])  # noqa: E731
    run(args.new_tokens)
    decode_ms = common.decode_timing(run, args.new_tokens, 5)["decode_ms_per_token"]
    bw = common.gemv_bandwidth()["bytes_per_s"]
    floor_ms = weight_bytes_per_step(engine) / bw * 1e3
    print(f"{args.arch} bs {args.batch}: decode {decode_ms:.3f} ms/token, floor {floor_ms:.3f} ms "
          f"({decode_ms / floor_ms:.2f}x); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        run(args.new_tokens)
        jax.profiler.stop_trace()
        summary = kernel_summary(Path(d))
    steps = args.new_tokens
    if "error" in summary:
        print(summary["error"])
    else:
        print(f"GPU span {summary['gpu_span_us'] / 1e3:.2f} ms, kernel time {summary['kernel_time_us'] / 1e3:.2f} ms "
              f"({summary['kernel_time_us'] / summary['gpu_span_us']:.0%} busy), "
              f"{summary['kernel_launches'] / steps:.1f} kernels per step")
        for k in summary["top"]:
            print(f"  {k['total_us'] / steps:8.1f} us/step  {k['count'] / steps:6.1f}/step  {k['name']}")
    if args.hlo:
        tokens, lengths = (jnp.asarray(a) for a in
                           __import__("dsjax.engine", fromlist=["_pack"])._pack(
                               [np.asarray(r) for r in prompts], engine.inference_config.max_out_tokens, 0))
        lowered = gen.generate.lower(
            engine.graphdef, engine.params, tokens, lengths, jax.random.key(0), jnp.int32(8),
            jnp.asarray([-1], jnp.int32), jnp.int32(0), gen.Sampling.make(),
            capacity=engine.inference_config.max_out_tokens, do_sample=False, return_logprobs=False)
        Path(args.hlo).write_text(lowered.compile().as_text())


if __name__ == "__main__":
    main()
