"""The serving warm-up of `dsjax serve`'s engine, run in the main thread, with every thread's
stack printed each --dump-every seconds: where the warm-up spends its time (or waits) on a GPU.

    python benchmarks/experiments/serve_warmup.py MODEL_DIR [--max-num-seqs 128]
        [--max-batched-tokens 1024] [--max-model-len 1536] [--num-blocks 12288]

The engine options are those benchmarks/serve_compare.py gives `dsjax serve`.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-batched-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=1536)
    p.add_argument("--num-blocks", type=int, default=12288)
    p.add_argument("--dump-every", type=float, default=60)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from dsjax.serving.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(args.model, dtype="bf16", progress=False, max_seqs=args.max_num_seqs,
              token_budget=args.max_batched_tokens, num_blocks=args.num_blocks,
              max_out_tokens=args.max_model_len, max_model_len=args.max_model_len)
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    faulthandler.dump_traceback_later(args.dump_every, repeat=True)
    t0 = time.perf_counter()
    n = llm.serving.warmup()
    faulthandler.cancel_dump_traceback_later()
    print(f"warm-up: {n} programs in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
