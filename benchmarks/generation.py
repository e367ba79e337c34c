"""Generation options on the GPU: decode ms/token of plain greedy generate (against the
previous commit's generate in the same run: the baseline), streaming (engine.stream),
logits processors + sampling, and beam search; plus streaming's time to the first token.

    python benchmarks/generation.py [--model gpt2-1.3b] [--batch 1,16] [--new-tokens 128]
    python benchmarks/generation.py --baseline DIR   # DIR: a checkout of the previous commit

Every mode makes exactly --new-tokens tokens (no stop token) from the same random prompts on
one engine; decode ms/token = (P50 T(n) - P50 T(1)) / (n - 1) (dsjax.bench.timing). With
--baseline the previous commit's plain generate runs first, in a subprocess that imports DIR.
Writes benchmarks/results/generation-<card>.json/.md (and $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("DSJAX_BASELINE"):  # the previous commit's dsjax, for the baseline row
    sys.path.insert(0, os.environ["DSJAX_BASELINE"])

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dsjax  # noqa: E402
from benchmarks import harness  # noqa: E402
from dsjax import bench  # noqa: E402

MODES = {  # name -> generate options (beyond max_new_tokens, eos_token_id=[])
    "greedy": {},
    "stream": {},
    "processors+sampling": dict(do_sample=True, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                presence_penalty=0.3, no_repeat_ngram_size=3),
    "beam4": dict(num_beams=4),
}


def run_mode(engine, mode: str, prompts, n_new: int, reps: int) -> dict:
    opts = dict(MODES.get(mode, {}), eos_token_id=[])
    if opts.get("do_sample"):
        opts["prng_key"] = jax.random.key(0)
    if mode == "stream":
        def gen(n):
            return list(engine.stream(list(prompts), max_new_tokens=n, **opts))
    else:
        def gen(n):
            return engine.generate(list(prompts), max_new_tokens=n, **opts).tokens
    measured = bench.time_generate(gen, n_new, warmup=1, reps=reps)
    row = bench.timing(dict(measured, tokens=[0] * len(prompts)), n_new)
    if mode == "stream":
        row["first_chunk_ms"] = _first_chunk_ms(engine, prompts, n_new, reps)
    return row


def _first_chunk_ms(engine, prompts, n_new: int, reps: int) -> float:
    """Median time from calling stream() to holding the first token (a warm program)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        it = engine.stream(list(prompts), max_new_tokens=n_new, eos_token_id=[])
        next(it)
        times.append((time.perf_counter() - t0) * 1e3)
        for _ in it:
            pass
    return bench.percentile(times, 50)


def measure(args, modes) -> list[dict]:
    engine = dsjax.init_inference(args.model, dtype="bf16", max_out_tokens=args.prompt_len
                                  + args.new_tokens, progress=False)
    rows = []
    for batch in args.batch:
        prompts = bench.random_prompts(engine.config.vocab_size, batch, args.prompt_len)
        for mode in modes:
            try:
                row = run_mode(engine, mode, prompts, args.new_tokens, args.reps)
            except Exception as e:  # noqa: BLE001  one row's failure is that row's result
                row = {"error": harness.error_line(e)}
            rows.append(dict(row, mode=mode, batch=batch))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def baseline(args) -> list[dict]:
    """The previous commit's plain generate, imported from args.baseline in a subprocess."""
    env = dict(os.environ, DSJAX_BASELINE=str(Path(args.baseline).resolve()))
    cmd = [sys.executable, __file__, "--only-greedy", "--model", args.model, "--batch",
           ",".join(map(str, args.batch)), "--new-tokens", str(args.new_tokens), "--prompt-len",
           str(args.prompt_len), "--reps", str(args.reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if not rows:
        return [{"mode": "greedy (baseline)", "error": out.stderr.strip()[-300:]}]
    return [dict(r, mode="greedy (baseline)") for r in rows]


def markdown(rows: list[dict], env: dict, args) -> str:
    lines = [f"# Generation options: decode ms/token ({env.get('device')}, {args.model} bf16, "
             f"prompt {args.prompt_len}, {args.new_tokens} new tokens)", "",
             "| batch | mode | decode ms/token | ratio to greedy | P50 ms (whole call) | "
             "first token ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('batch', '')} | {r['mode']} | {r['error']} | | | |")
            continue
        base = next((x for x in rows if x.get("batch") == r["batch"] and x["mode"] == "greedy"
                     and "error" not in x), None)
        ratio = r["decode_ms_per_token"] / base["decode_ms_per_token"] if base else float("nan")
        first = r.get("first_chunk_ms", r["ttft_ms"])
        lines.append(f"| {r['batch']} | {r['mode']} | {r['decode_ms_per_token']:.3f} | "
                     f"{ratio:.3f} | {r['latency_ms']['p50']:.1f} | {first:.1f} |")
    lines += ["", "decode ms/token = (P50 T(n) - P50 T(1)) / (n - 1); first token ms: generate's "
              "one-token call (TTFT), or, for stream, the time to the first yielded step. "
              "greedy (baseline): the previous commit's generate in a subprocess, same card, "
              "same run.", "", f"commit {env.get('commit')}, jax {env.get('jax')}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-1.3b")
    p.add_argument("--batch", type=harness.ints, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--baseline", help="a checkout of the previous commit (its greedy generate)")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--name", default="generation", help="results file name (before -<card>)")
    p.add_argument("--only-greedy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only_greedy:
        measure(args, ["greedy"])
        return
    rows = baseline(args) if args.baseline else []
    rows += measure(args, [m for m in args.modes.split(",") if m])
    env = harness.environment()
    card = "h200" if "H200" in str(env.get("device")) else "h100"
    harness.save(f"{args.name}-{card}", {"env": env, "args": vars(args), "rows": rows},
                 markdown(rows, env, args))
    print(markdown(rows, env, args))


if __name__ == "__main__":
    main()
