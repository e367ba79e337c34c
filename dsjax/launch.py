"""`dsjax launch -n N [--port P] [--cpu-devices K] -- <dsjax subcommand args>`: N local
processes of one dsjax command joined into one mesh (jax.distributed), for trying several
hosts on one machine. Each child gets DSJAX_COORDINATOR (127.0.0.1:P), DSJAX_NUM_PROCESSES
and DSJAX_PROCESS_ID; its output lines come back prefixed by its rank; the first child to fail
stops the others and its exit status is the launcher's. On a GPU machine the GPUs are split
evenly between the processes (each child's CUDA_VISIBLE_DEVICES), one process per GPU with -n
equal to their count."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsjax launch", description="Starts N local processes of one dsjax command, "
        "joined into one mesh (init_inference(distributed=True)) through DSJAX_COORDINATOR, "
        "DSJAX_NUM_PROCESSES and DSJAX_PROCESS_ID; prefixes each output line with its rank; "
        "stops all when one fails.")
    p.add_argument("-n", "--num-processes", type=int, required=True, help="processes to start")
    p.add_argument("--port", type=int, default=None,
                   help="the coordinator's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="run each process on the CPU with this many simulated devices")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then a dsjax subcommand and its arguments")
    return p


def main(argv: list[str], out=None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    problem = None
    if not command:
        problem = ("give the dsjax command after --, e.g. dsjax launch -n 2 --cpu-devices 4 "
                   "-- generate --model tiny-llama --prompt hi --tp 8")
    elif args.num_processes < 1:
        problem = f"-n must be at least 1, got {args.num_processes}"
    if problem:
        print(f"dsjax launch: {problem}", file=sys.stderr)
        return 2
    env, ranks = {}, None
    if args.cpu_devices:
        env = dict(JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={args.cpu_devices}")
    elif os.environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu":
        try:
            ranks = gpu_shares(args.num_processes, local_gpus())
        except ValueError as e:
            print(f"dsjax launch: {e}", file=sys.stderr)
            return 2
    return run([sys.executable, "-m", "dsjax.cli", *command], args.num_processes,
               port=args.port, env=env, out=out, rank_env=ranks)


def local_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them (its value if set, else
    nvidia-smi's list; none without either)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]  # (not MIG)
    return [str(i) for i in range(len(gpus))] if listed.returncode == 0 else []


def gpu_shares(n: int, gpus: list[str]) -> list[dict] | None:
    """Each rank's CUDA_VISIBLE_DEVICES: the GPUs split evenly, in order (JAX would otherwise
    give every process every GPU); None without GPUs."""
    if not gpus:
        return None
    if len(gpus) % n:
        raise ValueError(f"{n} processes cannot share {len(gpus)} GPUs evenly ({','.join(gpus)});"
                         " set CUDA_VISIBLE_DEVICES to a multiple of -n of them")
    k = len(gpus) // n
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[r * k:(r + 1) * k])} for r in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], n: int, *, port: int | None = None, env: dict | None = None,
        out=None, rank_env: list[dict] | None = None) -> int:
    """Runs argv as N ranks (rank_env: each one's own variables); 0 when all succeed, else the
    first failure's exit status (the others are stopped then)."""
    out = out or sys.stdout
    port = port or free_port()
    procs = []
    for rank in range(n):
        child = dict(os.environ, **(env or {}), **(rank_env[rank] if rank_env else {}),
                     DSJAX_COORDINATOR=f"127.0.0.1:{port}",
                     DSJAX_NUM_PROCESSES=str(n), DSJAX_PROCESS_ID=str(rank),
                     PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(argv, env=child, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    lock = threading.Lock()
    readers = [threading.Thread(target=_forward, args=(p.stdout, f"[{r}] ", out, lock),
                                daemon=True) for r, p in enumerate(procs)]
    for t in readers:
        t.start()
    code = _wait(procs)
    for t in readers:
        t.join(timeout=5)
    return code


def _forward(stream, prefix: str, out, lock) -> None:
    for line in stream:
        with lock:
            out.write(prefix + line)
            out.flush()


def _wait(procs) -> int:
    """0 once every process succeeded; the first failure's status, the rest stopped."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            return failed[0] if failed[0] > 0 else 128 - failed[0]  # killed by a signal
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)
