"""KV-cache offload: the caches of micro-batches not computing kept in pinned host memory.

    python benchmarks/kv_offload.py [--arch llama3-8b] [--batch 128] [--prompt-len 2048]
        [--new-tokens 8] [--micro-batches 4] [--reps 1] [--dtype bf16] [--matmul-precision P]
        [--suffix ""]

Runs the same greedy generate (random weights, --dtype, Pallas flash attention for the prompt so
that its scores are never materialized) with the M micro-batches' caches on the device and
with them offloaded, each in its own process (JAX cannot reset its peak-memory counter), and
reports the peak device memory (and the peak of loading alone), the cache size, the time of a
full generate and of a prompt-only one (max_new_tokens=1), and whether all tokens agree; of
the offloaded run, from its tick records (engine.runner.record_ticks()), the most cache slots
alive on the device after any tick and the compiled memory statistics of a token tick.
Writes results/kv_offload{suffix}.{json,md} (and into $OUT when set). The two runs are
different compiled programs, so rounding may differ and decide a near-tie between two tokens
differently: the report gives the log-probability gap wherever a row first differs. With
--dtype fp32, JAX's default matmul precision on the GPU still lets XLA use TF32;
--matmul-precision highest rules that out too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dsjax  # noqa: E402
from benchmarks import harness  # noqa: E402


def one(a) -> dict:
    """One process's run: with the caches on the device, or offloaded (a.offload)."""
    engine = dsjax.init_inference(
        a.arch, dtype=a.dtype, max_out_tokens=a.prompt_len + a.new_tokens, progress=False,
        kernels=harness.ATTENTION,  # Pallas flash attention: the prompt's scores never materialized
        pipeline_parallel={"pp_size": 1, "micro_batches": a.micro_batches, "offload_kv": a.offload})
    cfg = engine.config
    built_peak = harness.peak_memory_bytes()  # loading random weights has its own peak
    prompts = harness.random_prompts(cfg.vocab_size, a.batch, a.prompt_len)
    run = lambda n: engine.generate(prompts, max_new_tokens=n, eos_token_id=[],  # noqa: E731
                                    return_logprobs=True)
    t0 = time.perf_counter()
    with engine.runner.record_ticks() as ticks:  # offloaded tick programs (none without offload)
        first = run(a.new_tokens)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        out = run(a.new_tokens)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    run(1)  # the prompt phase alone: the same programs, already compiled
    prompt_s = time.perf_counter() - t0
    kv = (2 * cfg.num_layers * a.batch * cfg.kv_heads * (a.prompt_len + a.new_tokens) * cfg.dim_head
          * engine.inference_config.jnp_dtype.itemsize)
    return {"offload": a.offload, "peak_bytes": harness.peak_memory_bytes(), "load_peak_bytes": built_peak,
            "weight_bytes": engine.weight_bytes(), "kv_bytes": kv, "compile_s": compile_s,
            "generate_s": sorted(times)[len(times) // 2], "prompt_only_s": prompt_s,
            "tokens": [row[:8] for row in out.sequences[:4]],
            "tokens_sha1": hashlib.sha1(json.dumps(out.sequences).encode()).hexdigest(),
            "sequences": out.sequences, "logprobs": np.round(out.logprobs, 4).tolist(),
            "deterministic": first.sequences == out.sequences,
            "slots_on_device_max": max((t.on_device for t in ticks), default=None),
            "token_tick_memory": _tick_memory(ticks)}


def _tick_memory(ticks) -> dict | None:
    """The compiled memory statistics of the first token tick's program (device and host
    arguments, outputs, aliases, temporaries), or None without offload."""
    token = next((t for t in ticks if t.phase == "token"), None)
    if token is None:
        return None
    m = token.lower().compile().memory_analysis()
    return {k: getattr(m, k) for k in dir(m) if k.endswith("_in_bytes")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama3-8b")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (weights, compute, caches)")
    p.add_argument("--matmul-precision", default=None, choices=["default", "high", "highest"],
                   help="jax_default_matmul_precision for both runs (unset: JAX's default)")
    p.add_argument("--suffix", default="")
    p.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        if a.matmul_precision:
            jax.config.update("jax_default_matmul_precision", a.matmul_precision)
        print("RESULT " + json.dumps(one(a)), flush=True)
        return
    rows = []
    for offload in (False, True):
        cmd = [sys.executable, __file__, "--one", *sys.argv[1:]] + ["--offload"] * offload
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            rows.append({"offload": offload, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            print("\n".join(proc.stderr.splitlines()[-30:]), flush=True)
        else:
            rows.append(json.loads(lines[0][7:]))
        print(rows[-1], flush=True)
    env = harness.environment()
    gb = lambda x: f"{x / 1e9:.1f}" if x else "-"  # noqa: E731
    md = [f"# KV-cache offload, {a.arch} ({a.dtype}), batch {a.batch} in {a.micro_batches} "
          f"micro-batches, prompt {a.prompt_len} + {a.new_tokens} new tokens", "",
          f"{env['device']}, JAX {env['jax']}, commit {env['git_commit']}, {env['date']}; "
          f"matmul precision {a.matmul_precision or 'JAX default'}.", "",
          "| KV caches | peak device GB | of which loading's peak | weights GB | all caches GB | "
          "generate s | prompt only s | error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {'pinned host (offload_kv)' if r['offload'] else 'device'} | "
                  f"{gb(r.get('peak_bytes'))} | {gb(r.get('load_peak_bytes'))} | "
                  f"{gb(r.get('weight_bytes'))} | {gb(r.get('kv_bytes'))} | "
                  f"{r.get('generate_s', float('nan')):.2f} | "
                  f"{r.get('prompt_only_s', float('nan')):.2f} | {r.get('error', '')} |")
    if all("tokens" in r for r in rows):
        md.append(f"\nAll {a.batch} rows' greedy tokens equal with and without offload: "
                  f"{rows[0]['tokens_sha1'] == rows[1]['tokens_sha1']}. Generate "
                  f"{rows[1]['generate_s'] / rows[0]['generate_s']:.2f}x slower with offload; "
                  f"without the prompt phase (generate - prompt only) "
                  f"{_decode(rows[1]) / _decode(rows[0]):.1f}x.")
        md.append(_agreement(rows[0], rows[1]))
        if rows[0]["peak_bytes"] and rows[1]["peak_bytes"]:
            slot = rows[0]["kv_bytes"] / a.micro_batches
            saved = rows[0]["peak_bytes"] - rows[1]["peak_bytes"]
            md.append(f"Offload saves {gb(saved)} GB of peak device memory: {saved / slot:.2f} "
                      f"of the {a.micro_batches} slots of {gb(slot)} GB (two stay on the device: "
                      "the one a tick works on, and the next, prefetched).")
        if rows[1].get("slots_on_device_max") is not None:
            md.append(f"The offloaded run's tick records: at most {rows[1]['slots_on_device_max']:g} "
                      f"cache slots alive on the device after any tick.")
    md = "\n".join(md) + "\n"
    harness.save(f"kv_offload{a.suffix}", {"env": env, "args": vars(a), "rows": rows}, md)
    print(md)


def _agreement(a: dict, b: dict) -> str:
    """How far the two variants' tokens agree: a differing row whose two chosen tokens had
    nearly the same log-probability there is a near-tie that rounding decided."""
    same, at_split, before = 0, [], [0.0]
    for sa, sb, la, lb in zip(a["sequences"], b["sequences"], a["logprobs"], b["logprobs"]):
        k = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), None)
        same += k is None
        before += [abs(x - y) for x, y in zip(la[:k], lb[:k])]
        if k is not None:
            at_split.append(abs(la[k] - lb[k]))
    split = (f"; where a row first differs, the two chosen tokens' log-probabilities differ by "
             f"at most {max(at_split):.4f} (median {sorted(at_split)[len(at_split) // 2]:.4f})"
             if at_split else "")
    return (f"Rows with identical tokens: {same} of {len(a['sequences'])}; before their first "
            f"difference, log-probabilities agree within {max(before):.4f}{split}.")


def _decode(row: dict) -> float:
    return row["generate_s"] - row["prompt_only_s"]


if __name__ == "__main__":
    main()
