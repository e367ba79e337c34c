"""Host memory of `dsjax convert` (CPU): how many copies of the converted weights does
`convert_checkpoint` hold at its peak?

    python benchmarks/convert_memory.py [--layers 6] [--name convert_memory]   (~1 min on 2 cores)

Builds a random LLaMA-shaped model with transformers (torch), saves it with save_pretrained in
float32 and in bfloat16 (safetensors), then converts each in a fresh subprocess: fp32 -> fp32,
bf16 -> bf16 and fp32 -> int8 (weight-only, per channel; once more with one malloc arena).
The subprocess imports everything and starts JAX first (the baseline), resets the kernel's
peak-RSS mark (/proc/self/clear_refs), then converts while a thread samples /proc/self/status
every few milliseconds. Reported, each minus its baseline and as a multiple of the converted
weights' bytes (what the checkpoint stores):
  - peak RSS (VmHWM): everything resident, including the pages of the memory-mapped source
    file, which the kernel can drop at any time;
  - peak anonymous memory (sampled RssAnon): the copies convert itself allocates, and what the
    C allocator keeps of the memory convert freed.
Writes results/NAME.{json,md} (and $OUT/ when set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (source, stored dtype, quant, environment): int8 stores bf16 with int8 GEMM weights; the last
# case limits glibc to one malloc arena, so memory freed by one thread (numpy, the main thread)
# is reused by another (XLA's, which quantizes), to show what the allocator keeps
CASES = (("fp32", "fp32", None, {}), ("bf16", "bf16", None, {}), ("fp32", "int8", {"bits": 8}, {}),
         ("fp32", "int8", {"bits": 8}, {"MALLOC_ARENA_MAX": "1"}))


def status_kib() -> dict:
    """/proc/self/status's memory lines, in KiB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines)
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


class AnonPeak(threading.Thread):
    """Samples RssAnon until stopped; `peak` is the largest value seen (KiB)."""

    def __init__(self, every_s: float = 0.002):
        super().__init__(daemon=True)
        self.every_s, self.peak, self.done = every_s, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, status_kib()["RssAnon"])
            time.sleep(self.every_s)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, status_kib()["RssAnon"])


def child(src: str, out: str, dtype: str, quant: dict | None) -> dict:
    """Converts src -> out in this process; the memory figures, in bytes over the baseline."""
    import jax

    from dsjax import engine

    jax.devices()  # the backend's own allocations belong to the baseline
    base = status_kib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    sampler = AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    engine.convert_checkpoint(src, out, dtype=dtype, quant=quant, progress=False)
    seconds = time.perf_counter() - t0
    anon = sampler.stop()
    end = status_kib()
    return {"converted_bytes": stored_bytes(Path(out) / "params"),
            "peak_rss_bytes": (end["VmHWM"] - base["VmRSS"]) * 1024,
            "peak_anon_bytes": (anon - base["RssAnon"]) * 1024,
            "baseline_rss_bytes": base["VmRSS"] * 1024, "seconds": seconds}


def stored_bytes(params_dir: Path) -> int:
    """Bytes of the arrays a checkpoint stores (their shapes and dtypes, not the files' sizes)."""
    import math

    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(params_dir)
    meta = getattr(meta, "item_metadata", meta)
    return sum(math.prod(m.shape) * np.dtype(m.dtype).itemsize for m in meta.values())


def build_sources(root: Path, layers: int) -> dict:
    """save_pretrained of one random LLaMA-shaped model in float32 and bfloat16."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816,
                                   num_hidden_layers=layers, num_attention_heads=16,
                                   num_key_value_heads=8, max_position_embeddings=1024,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "fp32")
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    return {"params": sum(p.numel() for p in model.parameters()),
            "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size",
                                                    "intermediate_size", "num_hidden_layers")}}


def run_case(root: Path, source: str, dtype: str, quant: dict | None, env: dict) -> dict:
    out = root / f"out-{source}-{dtype}-{len(env)}"
    args = json.dumps([str(root / source), str(out), dtype, quant])
    proc = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True,
                          text=True, check=False, env={**os.environ, **env})
    if proc.returncode:
        raise RuntimeError(f"convert {source} -> {dtype} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in ("peak_rss", "peak_anon"):
        row[f"{k}_x"] = row[f"{k}_bytes"] / row["converted_bytes"]
    return {"source": source, "dtype": dtype, "quant": quant, "env": env, **row}


def markdown(rows: list[dict], env: dict, model: dict, command: str) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = ["# convert_checkpoint: peak host memory", "",
             f"{env['device']}, JAX {env['jax']}, commit {env['git_commit']}, {env['date']}. "
             f"Random LLaMA-shaped model, {model['params'] / 1e6:.1f}M parameters "
             f"({model['config']}), saved by transformers' save_pretrained; each conversion in a "
             "fresh process. Figures are over the process's baseline after imports; x = multiple "
             "of the converted weights' bytes. Peak RSS includes the memory-mapped source "
             "file's pages; peak anonymous memory (sampled) is what convert allocates.", "",
             f"Command: `{command}`", "",
             "| source | stored | environment | converted MiB | peak RSS MiB | x "
             "| peak anon MiB | x | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        malloc = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "default"
        lines.append(f"| {r['source']} | {r['dtype']} | {malloc} | {mib(r['converted_bytes'])} | "
                     f"{mib(r['peak_rss_bytes'])} | {r['peak_rss_x']:.2f} | "
                     f"{mib(r['peak_anon_bytes'])} | {r['peak_anon_x']:.2f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (default 6)")
    parser.add_argument("--name", default="convert_memory", help="results file name")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    from benchmarks import harness

    with tempfile.TemporaryDirectory(prefix="convert-memory-") as tmp:
        model = build_sources(Path(tmp), args.layers)
        rows = [run_case(Path(tmp), *case) for case in CASES]
    env = harness.environment()
    command = f"python benchmarks/convert_memory.py --layers {args.layers} --name {args.name}"
    md = markdown(rows, env, model, command)
    paths = harness.save(args.name, {"env": env, "model": model, "rows": rows,
                                     "command": command}, md)
    print(md + f"\nwrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
