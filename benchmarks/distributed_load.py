"""What each process reads and holds when several processes load one checkpoint (CPU): bytes
read from the checkpoint and peak host memory per process, one process of 8 devices against
two processes of 4 (gloo), both tensor-parallel over the 8 devices.

    python benchmarks/distributed_load.py [--layers 6] [--name distributed_load]  (~1 min, 2 cores)

The model: convert_memory.py's random LLaMA-shaped one (transformers' save_pretrained, bf16
safetensors), loaded with init_inference(dtype="bf16", tensor_parallel=8) in fresh processes,
each measuring over its baseline after JAX started: the bytes its lazy tensors read
(Source.read), the peak RSS (VmHWM: the device buffers of the simulated CPU devices, and the
checkpoint's memory-mapped pages it touched) and the peak anonymous memory (sampled).
Writes results/NAME.{json,md} (and $OUT/ when set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.convert_memory import AnonPeak, build_sources, status_kib  # noqa: E402


def child(src: str, processes: int) -> dict:
    """Loads src over 8 devices in this process (one of `processes`); its figures."""
    import jax

    import dsjax
    from dsjax.parallel import distributed
    from dsjax.sources import open_source

    if processes > 1:
        distributed.initialize()
    jax.devices()
    base = status_kib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    sampler = AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    source = open_source(src)
    dsjax.init_inference(source, dtype="bf16", tensor_parallel=8, max_out_tokens=64,
                         progress=False, distributed=processes > 1)
    seconds = time.perf_counter() - t0
    anon, end = sampler.stop(), status_kib()
    return {"process": jax.process_index(), "bytes_read": source.read.bytes_read,
            "peak_rss_bytes": (end["VmHWM"] - base["VmRSS"]) * 1024,
            "peak_anon_bytes": (anon - base["RssAnon"]) * 1024, "seconds": seconds}


def run(src: Path, processes: int) -> list[dict]:
    from dsjax.launch import free_port

    port, procs = free_port(), []
    for rank in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", DSJAX_COMPILATION_CACHE="0",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
        if processes > 1:
            env.update(DSJAX_COORDINATOR=f"127.0.0.1:{port}", DSJAX_NUM_PROCESSES=str(processes),
                       DSJAX_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", str(src), str(processes)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"a loading process failed:\n{err[-3000:]}")
        rows.append({"processes": processes, **json.loads(out.strip().splitlines()[-1])})
    return rows


def markdown(rows: list[dict], env: dict, model: dict, weights: int, command: str) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = ["# Several processes loading one checkpoint: bytes read and host memory", "",
             f"{env['device']}, JAX {env['jax']}, commit {env['git_commit']}, {env['date']}. "
             f"Random LLaMA-shaped model, {model['params'] / 1e6:.1f}M parameters "
             f"({model['config']}), bf16 safetensors of {mib(weights)} MiB of weights, loaded "
             "tensor-parallel over 8 simulated CPU devices in fresh processes. Figures per "
             "process, over its baseline after JAX started; x = multiple of the weights' bytes. "
             "Peak RSS holds the process's device buffers (host memory here) and the "
             "checkpoint pages it touched.", "", f"Command: `{command}`", "",
             "| processes | process | bytes read MiB | x | peak RSS MiB | x | peak anon MiB | x "
             "| load s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['process']} | {mib(r['bytes_read'])} | "
                     f"{r['bytes_read'] / weights:.2f} | {mib(r['peak_rss_bytes'])} | "
                     f"{r['peak_rss_bytes'] / weights:.2f} | {mib(r['peak_anon_bytes'])} | "
                     f"{r['peak_anon_bytes'] / weights:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (default 6)")
    parser.add_argument("--name", default="distributed_load", help="results file name")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    from benchmarks import harness

    with tempfile.TemporaryDirectory(prefix="distributed-load-") as tmp:
        model = build_sources(Path(tmp), args.layers)
        weights = model["params"] * 2
        rows = run(Path(tmp) / "bf16", 1) + run(Path(tmp) / "bf16", 2)
    env = harness.environment()
    command = f"python benchmarks/distributed_load.py --layers {args.layers} --name {args.name}"
    md = markdown(rows, env, model, weights, command)
    paths = harness.save(args.name, {"env": env, "model": model, "weights_bytes": weights,
                                     "rows": rows, "command": command}, md)
    print(md + f"\nwrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
