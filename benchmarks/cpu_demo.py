"""The README's main job on the CPU: `dsjax demo`'s model (GPT-2 124M, random weights, fp32,
greedy) through dsjax's generate against HF transformers' eager generate on the same weights,
in one process, their runs interleaved (dsjax, HF, dsjax, HF, ...) so that both see the same
machine state.

    python benchmarks/cpu_demo.py [--rounds 7] [--new-tokens 32] [--name cpu_demo]

Reports each system's median ms/token over the rounds (one warm-up call each first), the ratio
HF / dsjax (> 1: dsjax is faster), whether the tokens agree, the CPU's model name, the cores JAX
and torch use. Writes benchmarks/results/NAME.json/.md (+ $OUT).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import harness  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    tokens = fn()
    return tokens, (time.perf_counter() - t0) * 1e3


def systems(arch: str, dtype: str, n: int, seed: int = 0):
    """(dsjax's and HF's generate of the demo prompt: each returns its new tokens)."""
    import torch

    import dsjax
    from dsjax import presets

    hf = presets.hf_torch_model(arch, seed=seed)
    engine = dsjax.init_inference(hf, dtype=dtype, max_out_tokens=256, seed=seed, progress=False)
    prompt = presets.ByteTokenizer().encode("DeepSpeed-Inference, rebuilt on JAX.")
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=engine.pad_token_id,
                  attention_mask=torch.ones_like(ids))

    def ours():
        return list(engine.generate([prompt], max_new_tokens=n).sequences[0])

    def theirs():
        with torch.no_grad():
            return hf.generate(ids, **kwargs)[0, len(prompt):].tolist()

    return ours, theirs


def run(args) -> dict:
    import jax
    import torch

    ours, theirs = systems(args.arch, args.dtype, args.new_tokens)
    first = {"dsjax": timed(ours)[1], "hf": timed(theirs)[1]}  # (compile / warm-up)
    ms = {"dsjax": [], "hf": []}
    for _ in range(args.rounds):
        a, t = timed(ours)
        ms["dsjax"].append(t / len(a))
        b, t = timed(theirs)
        ms["hf"].append(t / len(b))
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "jax_devices": len(jax.devices()), "first_call_ms": first, "ms_per_token": ms,
            "median_ms_per_token": med, "hf_over_dsjax": med["hf"] / med["dsjax"],
            "tokens_equal": a == b, "new_tokens": len(a)}


def markdown(r: dict, env: dict, args) -> str:
    med = r["median_ms_per_token"]
    spread = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in r["ms_per_token"].items()}
    return "\n".join([
        f"# `dsjax demo`'s job on the CPU ({r['cpu']}, {r['cores']} cores; {args.arch} "
        f"{args.dtype}, {r['new_tokens']} new tokens, {args.rounds} interleaved rounds)", "",
        "| system | median ms/token | range | first call ms |", "|---|---|---|---|",
        f"| dsjax (XLA) | {med['dsjax']:.2f} | {spread['dsjax']} | "
        f"{r['first_call_ms']['dsjax']:.0f} |",
        f"| HF transformers eager (torch, {r['torch_threads']} threads) | {med['hf']:.2f} | "
        f"{spread['hf']} | {r['first_call_ms']['hf']:.0f} |", "",
        f"HF / dsjax: **{r['hf_over_dsjax']:.2f}x** (> 1: dsjax faster); tokens "
        f"{'identical' if r['tokens_equal'] else 'DIFFERENT'}.", "",
        harness.versions_line(env)]) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="gpt2")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--name", default="cpu_demo")
    args = p.parse_args(argv)
    env = harness.environment()
    r = run(args)
    md = markdown(r, env, args)
    harness.save(args.name, {"env": env, "args": vars(args), "result": r}, md)
    print(md)


if __name__ == "__main__":
    main()
