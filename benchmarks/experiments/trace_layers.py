"""Seconds to trace, lower and compile one generate program against the number of layers.

    python benchmarks/experiments/trace_layers.py [--layers 1,2,4,8,16] [--name trace_layers-cpu]

An experiment, not a benchmark of the library. Why: a cold process's first generate pays for
tracing and lowering its program (the persistent compilation cache removes only the backend
compile), and before blocks ran as one shared nested jit (dsjax.model.run_block) each layer
was traced and lowered again: with the Pallas kernels, each layer's kernels too. A tiny LLaMA
(hidden 64, random weights, fp32), greedy generate of two prompts (8 new tokens), the XLA
policy and the all-Pallas one (interpreted on the CPU); one fresh process a point, no
compilation cache, medians over --reps processes. Run it at two commits to compare them.
Writes results/NAME.{json,md} (and $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

CHILD = """
import json, sys, time
import dsjax
from dsjax.config import ModelConfig
layers, kernels = int(sys.argv[1]), sys.argv[2]
cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=layers, num_heads=4,
                  num_kv_heads=2, intermediate_size=128, norm="rmsnorm", activation="silu",
                  gated_mlp=True, positions="rotary")
policy = dsjax.KernelPolicy.pallas() if kernels == "pallas" else dsjax.KernelPolicy()
engine = dsjax.init_inference(cfg, dtype="fp32", max_out_tokens=64, progress=False,
                              kernels=policy)
fn, args, kw = engine.greedy_program([[1, 2, 3, 4, 5], [6, 7, 8]], 8)
t0 = time.perf_counter(); traced = fn.trace(*args, **kw)
t1 = time.perf_counter(); lowered = traced.lower()
t2 = time.perf_counter(); lowered.compile()
t3 = time.perf_counter()
print(json.dumps({"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2}))
"""
PARTS = ("trace_s", "lower_s", "compile_s")


def point(layers: int, kernels: str, reps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(DSJAX_COMPILATION_CACHE="0", PYTHONPATH=str(ROOT))
    runs = []
    for _ in range(reps):
        done = subprocess.run([sys.executable, "-c", CHILD, str(layers), kernels], env=env,
                              capture_output=True, text=True, timeout=1200)
        if done.returncode:
            raise RuntimeError(done.stderr[-1500:])
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"layers": layers, "kernels": kernels, "reps": reps,
            **{p: statistics.median(r[p] for r in runs) for p in PARTS}}


def markdown(payload: dict) -> str:
    lines = ["# Trace, lower and compile seconds of one generate program by layer count", "",
             "Tiny LLaMA (hidden 64, fp32), greedy, two prompts, 8 new tokens; fresh process a "
             f"point, no compilation cache; medians of {payload['reps']}. "
             f"Device: {payload['environment'].get('device')}.", "",
             "| kernels | layers | trace (s) | lower (s) | compile (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['kernels']} | {r['layers']} | {r['trace_s']:.2f} | {r['lower_s']:.2f} | "
              f"{r['compile_s']:.2f} |" for r in payload["rows"]]
    return "\n".join(lines + ["", harness.versions_line(payload["environment"])]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=harness.ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--kernels", default="xla,pallas")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="trace_layers-cpu")
    ap.add_argument("--out", default=str(harness.RESULTS))
    args = ap.parse_args()
    rows = [point(n, k, args.reps) for k in args.kernels.split(",") for n in args.layers]
    payload = {"environment": harness.environment(), "reps": args.reps, "rows": rows}
    harness.save(args.name, payload, markdown(payload), args.out)
    print(markdown(payload))


if __name__ == "__main__":
    main()
