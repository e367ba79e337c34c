"""The serving engine's host work per step, piece by piece (runs on any machine; the device's
own time is left out).

    python benchmarks/serving_host.py [--seqs 128] [--steps 100] [--decode-steps 1]
        [--name serving_host]
        [--tree DIR]   # another checkout of dsjax (e.g. a git worktree of an older commit)

A ServingEngine on the built-in tiny-llama (fp32) holds `seqs` running requests (prompts of
64-200 tokens, decoding); after a settling period each of `steps` steps is timed in its host
parts, each alone (the device's work is waited for outside the timed parts, so a CPU "device"
does not compete with the host for the cores while they are timed): schedule (the SplitFuse
plan), buffer (packing the step's int32 buffer and, where the engine does, its transfer),
dispatch (the step program's call), advance (the scheduler's bookkeeping) and read (turning
the step's output into each request's RequestOutput). Medians per step, ms; with
--decode-steps K every step is a burst of K decode steps, and the last row is the host's
total per token of a sequence. Streaming
detokenization: the ms one 512-token stream's text costs through IncrementalText, token by
token (a word-level tokenizer made with `tokenizers`). Writes benchmarks/results/NAME.json/.md.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--decode-steps", type=int, default=1, help="the engine's decode bursts")
    p.add_argument("--tree", type=Path, help="import dsjax from this checkout instead")
    p.add_argument("--name", default="serving_host")
    return p.parse_args(argv)


def engine(seqs: int, steps: int, decode_steps: int = 1):
    import numpy as np

    import dsjax
    from dsjax.serving.engine import ServingEngine

    new = 100 + (40 + steps) * decode_steps  # (no request ends during the settling or the
    # timed steps)
    eng = dsjax.init_inference("tiny-llama", dtype="fp32", max_out_tokens=200 + new,
                               progress=False)
    bursts = {"decode_steps": decode_steps} if decode_steps > 1 else {}  # (older trees: none)
    srv = ServingEngine(eng, token_budget=1024, max_seqs=seqs, block_size=16,
                        num_blocks=seqs * (1 + -(-(200 + new) // 16)), **bursts)
    srv.warmup(sampling=False)
    rng = np.random.default_rng(0)
    for _ in range(seqs):
        srv.add_request(rng.integers(0, 500, int(rng.integers(64, 200))).tolist(),
                        max_new_tokens=new, eos_token_id=[])
    for _ in range(40):  # every prompt in, every request decoding
        srv.step()
    return srv


def time_parts(srv, steps: int) -> dict[str, float]:
    """Median ms per step of each host part, timed alone."""
    import jax
    import numpy as np

    times = collections.defaultdict(list)

    def timed(key, f):
        t = time.perf_counter()
        r = f()
        times[key].append(time.perf_counter() - t)
        return r
    buffer, run, read = srv._buffer, srv._run, srv._read
    srv._buffer = lambda plans, layout: timed("buffer", lambda: buffer(plans, layout))
    srv._run = lambda *a: jax.block_until_ready(timed("dispatch", lambda: run(*a)))
    srv._read = lambda flight: timed("read", lambda: read(jax.block_until_ready(flight)))
    if hasattr(srv, "_plan"):  # (bursts: the plan tries one first)
        srv._plan = lambda f=srv._plan: timed("schedule", f)
    for s in srv.scheds:
        if not hasattr(srv, "_plan"):
            s.schedule = lambda f=s.schedule: timed("schedule", f)
        s.advance = lambda c, f=s.advance: timed("advance", lambda: f(c))
    for _ in range(steps):
        srv.step()
    out = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    out["host total"] = sum(out.values())
    return out


def detokenize_ms(tokens: int = 512) -> float:
    """ms of one `tokens`-token stream's text, token by token."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    try:
        IncrementalText = importlib.import_module("dsjax.serving.detokenize").IncrementalText
    except ImportError:  # (older trees kept it in llm.py)
        IncrementalText = importlib.import_module("dsjax.serving.llm").IncrementalText
    words = ["<unk>"] + [f"w{i}" for i in range(256)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = [1 + i % 256 for i in range(tokens)]
    text = IncrementalText(tok, [1, 2, 3])
    t = time.perf_counter()
    for n in range(1, tokens + 1):
        text.delta(ids[:n], final=n == tokens)
    return (time.perf_counter() - t) * 1e3


def main(argv=None) -> None:
    args = parse(argv)
    if args.tree:
        sys.path.insert(0, str(args.tree.resolve()))
    else:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(1, str(ROOT))  # (benchmarks.harness from this tree)
    from benchmarks import harness
    import dsjax

    tree = str(Path(dsjax.__file__).resolve().parents[1])
    tree += " at " + (subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip() or "?")
    parts = time_parts(engine(args.seqs, args.steps, args.decode_steps), args.steps)
    parts["host total per token of a sequence"] = parts["host total"] / args.decode_steps
    parts["detokenize 512-token stream"] = detokenize_ms()
    env = harness.environment()
    res = {"env": env, "tree": tree, "args": {k: str(v) for k, v in vars(args).items()},
           "ms": parts}
    lines = [f"# Serving host work per step ({args.seqs} decoding sequences, tiny-llama fp32, "
             f"{args.decode_steps} decode step(s) per step, {env.get('device')}; dsjax from "
             f"{tree})", "", "| part | ms (median per step) |",
             "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in parts.items()]
    harness.save(args.name, res, "\n".join(lines + ["", harness.versions_line(env)]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
