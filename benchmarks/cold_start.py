"""Cold start: the first generate of a fresh process, without the persistent compilation cache,
with it empty (the process writes it), and with it filled by the process before.

    python benchmarks/cold_start.py [--model gpt2] [--dtype fp32] [--new-tokens 32] [--reps 2]

Each figure is a new Python process (random weights, a 16-token prompt): the seconds to build
the engine and the seconds of its first generate call (tracing, compiling or reading the
compiled program, running). Writes benchmarks/results/cold_start-NAME.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import dsjax
model, dtype, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = dsjax.init_inference(model, dtype=dtype, max_out_tokens=64 + n, progress=False)
t1 = time.perf_counter()
engine.generate([list(range(1, 17))], max_new_tokens=n, eos_token_id=[]).tokens
t2 = time.perf_counter()
engine.generate([list(range(1, 17))], max_new_tokens=n, eos_token_id=[]).tokens
t3 = time.perf_counter()
print(json.dumps({"build_s": t1 - t0, "first_s": t2 - t1, "second_s": t3 - t2}))
"""


def child(args, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, args.model, args.dtype,
                           str(args.new_tokens)], env=env, capture_output=True, text=True,
                          timeout=1200)
    if done.returncode:
        raise RuntimeError(done.stderr[-1500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--name")
    args = p.parse_args(argv)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COMPILATION_CACHE", "DSJAX_COMPILATION_CACHE"))}
    rows = {}
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(base, DSJAX_CACHE_DIR=cache)
            runs = {"no cache": child(args, dict(base, DSJAX_COMPILATION_CACHE="0")),
                    "empty cache": child(args, env), "filled cache": child(args, env)}
        for k, v in runs.items():
            rows.setdefault(k, []).append(v)
        print(rep, json.dumps(runs), flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in rows.items()}
    env = harness.environment()
    lines = [f"# Cold start: {args.model} ({args.dtype}, {args.new_tokens} new tokens), "
             f"{env.get('device')}", "",
             "| process | engine built (s) | first generate (s) | second generate (s) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['build_s']:.2f} | {v['first_s']:.2f} | {v['second_s']:.3f} |"
              for k, v in med.items()]
    lines += ["", f"Medians of {args.reps} fresh processes each. " + harness.versions_line(env)]
    name = args.name or f"cold_start-{args.model}"
    harness.save(name, {"env": env, "args": vars(args), "runs": rows, "median": med},
                 "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
