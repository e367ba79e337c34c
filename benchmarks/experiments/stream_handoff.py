"""What handing a step's outputs from the serving step thread to the server's event loop costs:
one `call_soon_threadsafe` per token (each wakes the loop through its self-pipe) against one
per step (`dsjax.serving.llm._deliver`, what LLM._step does), for N open streams, with the
step thread sleeping `--step-ms` between steps as it waits for the device. Reports the CPU
time of both threads per token delivered (the reader's queue get included) and the wall time
over the steps' own sleep (> 1: the hand-off delayed the step thread).

    python benchmarks/experiments/stream_handoff.py [--streams 96] [--steps 300] [--reps 5]

Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import harness  # noqa: E402
from dsjax.serving.llm import _deliver  # noqa: E402


async def one_run(batched: bool, streams: int, steps: int, step_s: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    queues = [asyncio.Queue() for _ in range(streams)]

    async def reader(q):
        for _ in range(steps):
            await q.get()

    def stepper():
        for s in range(steps):
            if batched:
                loop.call_soon_threadsafe(_deliver, [(q, s) for q in queues])
            else:
                for q in queues:
                    loop.call_soon_threadsafe(q.put_nowait, s)
            time.sleep(step_s)

    readers = [asyncio.create_task(reader(q)) for q in queues]
    cpu, wall = time.process_time(), time.perf_counter()
    thread = threading.Thread(target=stepper)
    thread.start()
    await asyncio.gather(*readers)
    thread.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / (streams * steps) * 1e6, wall / (steps * step_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=96)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--name", default="stream_handoff")
    args = p.parse_args()
    rows = {}
    for name, batched in (("per token", False), ("per step", True)):
        runs = [asyncio.run(one_run(batched, args.streams, args.steps, args.step_ms / 1e3))
                for _ in range(args.reps)]
        rows[name] = {"cpu_us_per_token": statistics.median(r[0] for r in runs),
                      "wall_over_sleep": statistics.median(r[1] for r in runs)}
        print(name, rows[name], flush=True)
    env = harness.environment()
    lines = [f"# Step thread -> event loop hand-off ({env.get('device')})", "",
             f"{args.streams} streams, {args.steps} steps, {args.step_ms} ms sleep per step, "
             f"medians of {args.reps} runs; commit {env.get('git_commit')}, Python {sys.version.split()[0]}, "
             f"{os.cpu_count()} CPU cores ({platform.machine()}).", "",
             "| hand-off | CPU us per token (both threads) | wall / the steps' sleep |", "| --- | --- | --- |"]
    lines += [f"| {n} | {r['cpu_us_per_token']:.2f} | {r['wall_over_sleep']:.2f}x |" for n, r in rows.items()]
    harness.save(args.name, {"args": vars(args), "env": env, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
