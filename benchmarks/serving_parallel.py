"""Serving over several GPUs: the continuous-batching engine on one architecture (random weights,
bf16) at TP1, TP2, TP4 and dp2 x TP2 (those the device count allows), the same TP2 run with one
process per GPU (jax.distributed), and the bs-1 decode latency with the Pallas kernels.

    python benchmarks/serving_parallel.py [--model llama3-8b] [--part tp1,tp2,tp4,dp2tp2,latency,mp]
        [--deadline EPOCH_S] [--name NAME]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/serving_parallel.py --smoke      (tiny-llama, 8 simulated devices)

Parts:
  tp1, tp2, tp4, dp2tp2  one process drives the layout's devices. serving.py's trace (seeded
      prompts of uniform lengths in --prompt-len, log-uniform output lengths in --output-len,
      random ids, no stop token) is served all at once (output and total tokens/s; the interval
      between steps and how often the host found the device still busy), then its first
      --poisson-requests arriving as a Poisson process at --rates x the layout's own request
      throughput (or at --rates-per-s): TTFT, TPOT, ITL and E2E percentiles (serving_systems.serve,
      dsjax.serving.metrics). The engine's warm-up compiles every greedy step shape first. Its
      KV pool (--num-blocks, default: the whole trace at once) never runs out, so no request is
      preempted and every layout runs the same steps.
  latency  bs-1 decode ms/token with the Pallas kernels (KernelPolicy.pallas(), what
      replace_with_kernel_inject=True selects) at each degree of --latency-tp: dsjax.bench's
      measure, (P50 T(n) - P50 T(1)) / (n - 1), against the bytes one device reads per step
      over the bf16 GEMV bandwidth measured in the run.
  mp  the TP2 row with two processes of one GPU each (on the CPU: one simulated device each,
      gloo), joined by jax.distributed through the variables `dsjax launch` sets
      (DSJAX_COORDINATOR, DSJAX_NUM_PROCESSES, DSJAX_PROCESS_ID) and init_inference(...,
      distributed=True); each process's JAX takes only its own GPU (jax_cuda_visible_devices),
      and neither uses the persistent compilation cache (as the tests run them). It runs first,
      before this process touches a device; the one-process TP2 row runs after it when the
      results lack one. Its greedy tokens of the all-at-once run are compared with the
      one-process TP2 run's: equal, or the first difference. Under Poisson arrivals every step
      first broadcasts process 0's count of arrived requests, so that both processes add the
      same requests before the same step (the engine needs that; a small collective per step
      that the one-process row does not pay).
Weights are made once on the host (harness.host_random_params: the values init_inference(...,
distributed=True) makes in each process) and placed per layout (dsjax.engine.build_engine).
Serving kernels: --serving-kernels (default Pallas attention with XLA GEMMs, as serving.py).
Writes NAME.json/.md (serving_parallel_report.py) into --out (benchmarks/results) and $OUT
after every row; the rows of earlier calls on the same trace found there are kept, so that the
parts can run in separate calls. --deadline (epoch seconds): a row starts only while the time
left before deadline - --reserve-s exceeds what the last row of its kind took (a Poisson rate:
its arrivals' span); the two processes are stopped at deadline - --reserve-s / 2.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness, serving_systems as systems  # noqa: E402
from benchmarks.serving import make_trace, overlap  # noqa: E402
from benchmarks.serving_parallel_report import MP, markdown, tokens_check  # noqa: E402
from dsjax import bench, presets  # noqa: E402
from dsjax.bench_serve import arrivals  # noqa: E402
from dsjax.launch import free_port  # noqa: E402
from dsjax.parallel.mesh import Parallel  # noqa: E402
from dsjax.policy import KernelPolicy  # noqa: E402

LAYOUTS = {"tp1": ("TP1", Parallel()), "tp2": ("TP2", Parallel(tp=2)),
           "tp4": ("TP4", Parallel(tp=4)), "dp2tp2": ("dp2 x TP2", Parallel(tp=2, dp=2))}
PARTS = (*LAYOUTS, "latency", "mp")
KERNELS = {"xla": KernelPolicy(), "attention": harness.ATTENTION, "pallas": harness.PALLAS}
SAME_TRACE = ("model", "requests", "prompt_len", "output_len", "seed", "serving_kernels",
              "token_budget", "max_seqs", "block_size", "num_blocks")
SMOKE = dict(model="tiny-llama", requests=6, prompt_len=[8, 40], output_len=[4, 12],
             token_budget=32, max_seqs=8, block_size=8, poisson_requests=4, latency_prompt=16,
             latency_new=4, reps=2, name="serving_parallel-smoke",
             out=Path(tempfile.gettempdir()) / "serving_parallel-smoke")


# ----------------------------------------------------------------------------- the runs

class Recording:
    """A ServingEngine whose step() also keeps each finished request's tokens."""

    def __init__(self, srv):
        self.srv, self.tokens = srv, {}

    def step(self):
        outs = self.srv.step()
        self.tokens.update({o.request_id: o.token_ids for o in outs if o.finished})
        return outs

    def __getattr__(self, name):
        return getattr(self.srv, name)


class Synced(Recording):
    """One of several processes' engines under timed arrivals: serve() adds a request when this
    process's clock says so, but every process must add the same requests before the same step.
    add_request() only counts; step() adds, in arrival order, up to process 0's count."""

    def __init__(self, srv, trace, times):
        super().__init__(srv)
        self.trace, self.order = trace, sorted(range(len(trace)), key=lambda i: times[i])
        self.arrived = self.added = 0

    def add_request(self, *_, **__):
        self.arrived += 1  # serve() adds in arrival order

    def has_unfinished(self):
        return self.arrived > self.added or self.srv.has_unfinished()

    def step(self):
        count = int(shared(self.arrived))
        for i in self.order[self.added:count]:
            self.srv.add_request(self.trace[i]["prompt"], request_id=str(i),
                                 max_new_tokens=self.trace[i]["max_new"], eos_token_id=[])
        self.added = max(self.added, count)
        return super().step()


def shared(value):
    """Process 0's value on every process (the value itself in one process; no device is
    touched then, so the parent of the mp row may call it before its children start)."""
    if not jax.distributed.is_initialized():
        return value
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(np.asarray(value)).item()


def time_ok(args, need: float = 0.0) -> bool:
    """Whether a row that takes `need` seconds may still start (the same answer on every
    process)."""
    left = math.inf if not args.deadline else args.deadline - args.reserve_s - time.time()
    return bool(shared(int(left > need)))


def figures(fig: dict) -> dict:
    """serve()'s figures with its steps replaced by their overlap summary."""
    return dict(fig, overlap=overlap(fig.pop("steps")))


def serve_rows(args, engine, trace, row: dict, save, keep_tokens: bool) -> None:
    """Warm-up, the trace all at once, then at Poisson rates, into row (saved after each)."""
    from dsjax.serving.engine import ServingEngine

    srv = ServingEngine(engine, block_size=args.block_size, num_blocks=args.num_blocks,
                        token_budget=args.token_budget, max_seqs=args.max_seqs)
    t = time.perf_counter()
    row["warmup"] = {"programs": srv.warmup(sampling=False), "seconds": time.perf_counter() - t}
    rec = Recording(srv)
    row["offline"] = figures(systems.serve(rec, trace))
    tokens = [" ".join(map(str, rec.tokens[str(i)])) for i in range(len(trace))]
    row["digests"] = [hashlib.sha1(text.encode()).hexdigest()[:12] for text in tokens]
    if keep_tokens:
        row["tokens"] = tokens
    print(f"{row['layout']}: {row['offline']['output_tokens_per_s']:.0f} output tok/s", flush=True)
    sub, row["poisson"] = trace[:args.poisson_requests], []
    save()
    for frac in args.rates_per_s or args.rates:
        rate = frac if args.rates_per_s else frac * row["offline"]["request_throughput"]
        rate = float(shared(rate))  # (process 0's measure)
        if not time_ok(args, need=len(sub) / rate):  # (the arrivals' span)
            row["poisson"].append({"skipped": "deadline"})
            save()
            break
        times = arrivals(len(sub), rate, 1.0, args.seed)
        fig = systems.serve(Synced(srv, sub, times) if row["processes"] > 1 else srv, sub, times)
        row["poisson"].append(dict(figures(fig), rate=rate,
                                   fraction=None if args.rates_per_s else frac))
        print(f"{row['layout']} at {rate:.2f} req/s: TTFT P95 {fig['ttft_ms']['p95']:.0f} ms, "
              f"TPOT P95 {fig['tpot_ms']['p95']:.1f} ms", flush=True)
        save()


def build(args, params, par: Parallel, policy: KernelPolicy, budget: int):
    """An engine of the layout on the shared host weights (not consumed), the preset's
    generation defaults included (as init_inference gives them)."""
    import jax.numpy as jnp

    from dsjax.config import InferenceConfig
    from dsjax.engine import build_engine
    from dsjax.sources import open_source

    icfg = InferenceConfig(dtype="bfloat16", max_out_tokens=budget, kernels=policy)
    if not par.is_parallel:  # one device: placed as they are, in the engine's dtype
        params = jax.tree.map(lambda v: jnp.asarray(v, icfg.jnp_dtype), params)
    source = open_source(args.model)
    return build_engine(source.config, params, inference=icfg, parallel=par, source=source)


def layout_row(args, part: str, params, trace, res: dict, save, need: float) -> float:
    """The layout's row, unless the deadline leaves less than `need` seconds; returns the
    seconds its build, warm-up and all-at-once run took (what the next row needs)."""
    label, par = LAYOUTS[part]
    row = {"layout": label, "tp": par.tp, "dp": par.dp, "gpus": par.devices, "processes": 1,
           "env": res["env"]}
    if not time_ok(args, need):
        keep(res, label, dict(row, skipped="deadline"))
        return need
    res["rows"][label] = row
    t = time.perf_counter()
    try:
        engine = build(args, params, par, KERNELS[args.serving_kernels], budget(args))
        row["build_s"] = time.perf_counter() - t
        serve_rows(args, engine, trace, row, save, keep_tokens=part == "tp2")
        need = row["build_s"] + row["warmup"]["seconds"] + row["offline"]["duration_s"]
    except Exception as e:  # noqa: BLE001 (a row of the report; the other rows still run)
        traceback.print_exc()
        row["error"] = harness.error_line(e)
    engine = None
    gc.collect()
    save()
    return need


def latency_rows(args, params, res: dict, save) -> None:
    bw = res["gemv_bandwidth"] = harness.gemv_bandwidth()
    need = 0.0  # seconds the last row took
    for tp in args.latency_tp:
        label = f"TP{tp}"
        if tp > jax.device_count():
            print(f"latency {label}: skipped, {jax.device_count()} devices here")
            continue
        if not time_ok(args, need):
            keep(res, label, {"skipped": "deadline"}, "latency")
            continue
        t = time.perf_counter()
        try:
            engine = build(args, params, Parallel(tp=tp), harness.PALLAS,
                           args.latency_prompt + args.latency_new)
            row = bench.run(engine, [1], args.latency_prompt, args.latency_new, reps=args.reps,
                            warmup=2, progress=False, bandwidth=bw)[0]
            print(f"latency {label}: {row['decode_ms_per_token']:.2f} ms/token", flush=True)
            need = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = {"error": harness.error_line(e)}
        engine = None
        gc.collect()
        res["latency"][label] = dict(row, env=res["env"])
        save()


# ----------------------------------------------------------------------------- two processes

def mp_child(args) -> None:
    """One of the two processes of the mp row; process 0 writes the row to args.mp_child."""
    import dsjax

    if not os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # this process's GPU alone: what jax.distributed.initialize(local_device_ids=[rank])
        # sets, which dsjax's initialize leaves at JAX's default (every local GPU)
        jax.config.update("jax_cuda_visible_devices", os.environ["DSJAX_PROCESS_ID"])
    engine = dsjax.init_inference(args.model, dtype="bf16", max_out_tokens=budget(args),
                                  kernels=KERNELS[args.serving_kernels], tensor_parallel=2,
                                  seed=0, distributed=True, progress=False)
    row = {"layout": MP, "tp": 2, "dp": 1, "gpus": jax.device_count(),
           "processes": jax.process_count(), "env": harness.environment()}
    path = Path(args.mp_child)

    def save():
        if jax.process_index() == 0:
            bench.write(path.parent, path.stem, row, "")

    try:
        serve_rows(args, engine, trace_of(args), row, save, keep_tokens=True)
    except Exception as e:  # the row says what failed; the exit status stops the other
        row["error"] = harness.error_line(e)
        save()
        raise


def child_env(rank: int, port: int) -> dict:
    env = dict(os.environ, DSJAX_COORDINATOR=f"127.0.0.1:{port}", DSJAX_NUM_PROCESSES="2",
               DSJAX_PROCESS_ID=str(rank), DSJAX_COMPILATION_CACHE="0", PYTHONUNBUFFERED="1")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):  # one simulated device each
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
    return env


def run_pair(args, argv: list[str], res: dict, save) -> None:
    """The mp row: this script twice (--mp-child), rank 0's output here, rank 1's in a log."""
    if not time_ok(args):
        return keep(res, MP, {"layout": MP, "skipped": "deadline"})
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "row.json", open(Path(tmp) / "rank1.log", "w+")
        port = free_port()
        procs = [subprocess.Popen([sys.executable, __file__, *argv, "--mp-child", str(out)],
                                  env=child_env(r, port), stdout=log if r else None,
                                  stderr=subprocess.STDOUT) for r in range(2)]
        codes = wait(procs, args.deadline - time.time() - args.reserve_s / 2
                     if args.deadline else None)
        row = json.loads(out.read_text()) if out.exists() else {"layout": MP}
        if codes != [0, 0]:
            log.seek(0)
            print("rank 1:\n" + log.read()[-3000:], flush=True)
            row.setdefault("error", f"exit codes {codes} (None: stopped at the deadline)")
        log.close()
    res["rows"][MP] = row
    save()


def wait(procs, timeout: float | None) -> list[int | None]:
    """Exit codes; when one fails, or at the timeout, the others are stopped (None)."""
    end = None if timeout is None else time.monotonic() + timeout
    while end is None or time.monotonic() < end:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(codes):
            break
        time.sleep(0.5)
    codes = [p.poll() for p in procs]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes


# ----------------------------------------------------------------------------- results

def trace_of(args) -> list[dict]:
    vocab = presets.hf_config(args.model)["vocab_size"]
    return make_trace(args.requests, vocab, args.prompt_len, args.output_len, args.seed)


def budget(args) -> int:
    return args.prompt_len[1] + args.output_len[1]


def keep(res: dict, label: str, row: dict, table: str = "rows") -> None:
    """A skipped row, unless an earlier call measured it."""
    res[table].setdefault(label, row)


def previous(args) -> dict:
    """The results file of earlier calls on the same trace, else a new one."""
    path = Path(args.out) / f"{args.name}.json"
    same = {k: v for k, v in vars(args).items() if k in SAME_TRACE}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("trace_args") == same:
            print(f"keeping the rows of {path}", flush=True)
            return dict(old, env=None)
        print(f"{path}: another trace; its rows are replaced", flush=True)
    return {"trace_args": same, "rows": {}, "latency": {}, "env": None}


# ----------------------------------------------------------------------------- main

def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--part", default=",".join(PARTS), help=f"comma-separated, from {PARTS}")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=harness.ints, default=[64, 2048])
    ap.add_argument("--output-len", type=harness.ints, default=[16, 512])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serving-kernels", choices=KERNELS, default="attention")
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--max-seqs", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, help="per replica (default: the whole trace)")
    ap.add_argument("--rates", type=floats, default=[0.3, 0.6, 0.9])
    ap.add_argument("--rates-per-s", type=floats, help="absolute rates instead of --rates")
    ap.add_argument("--poisson-requests", type=int, default=64)
    ap.add_argument("--latency-tp", type=harness.ints, default=[1, 2, 4])
    ap.add_argument("--latency-prompt", type=int, default=128)
    ap.add_argument("--latency-new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--deadline", type=float, help="epoch seconds to have written the report by")
    ap.add_argument("--reserve-s", type=float, default=30, help="left for the report")
    ap.add_argument("--name")
    ap.add_argument("--out", type=Path, default=harness.RESULTS)
    ap.add_argument("--smoke", action="store_true", help="tiny-llama, a few short requests (CPU)")
    ap.add_argument("--mp-child", help=argparse.SUPPRESS)
    if "--smoke" in argv:
        ap.set_defaults(**SMOKE)
    args = ap.parse_args(argv)
    args.part = [p for p in args.part.split(",") if p]
    if set(args.part) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(args.part) - set(PARTS))}; known: {PARTS}")
    args.name = args.name or f"serving_parallel-{args.model}"
    if args.num_blocks is None:  # every request's blocks at once, and a spare per sequence
        args.num_blocks = args.max_seqs + sum(
            -(-(len(r["prompt"]) + r["max_new"]) // args.block_size) for r in trace_of(args))
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.mp_child:
        return mp_child(args)
    trace, res = trace_of(args), previous(args)
    res.update(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               command=shlex.join(["python", "benchmarks/serving_parallel.py", *argv]),
               kernels=KERNELS[args.serving_kernels].describe(),
               trace={"requests": len(trace), "prompt_tokens": sum(len(r["prompt"]) for r in trace),
                      "output_tokens": sum(r["max_new"] for r in trace)})

    def save():
        res["tokens_check"] = tokens_check(res["rows"])
        harness.save(args.name, res, markdown(res), args.out)

    parts = list(args.part)
    if "mp" in parts:  # before this process touches a device
        gpus = harness.nvidia_smi("count")
        if gpus is not None and int(gpus) < 2:
            print(f"mp: skipped, {gpus} GPU here", flush=True)
        else:
            run_pair(args, argv, res, save)
        if "tokens" not in res["rows"].get("TP2", {}) and "tp2" not in parts:
            parts.append("tp2")  # the one-process run its tokens are compared with
    res["env"] = harness.environment()
    layouts = [p for p in LAYOUTS if p in parts and LAYOUTS[p][1].devices <= jax.device_count()]
    for p in set(parts) & set(LAYOUTS) - set(layouts):
        print(f"{p}: skipped, {LAYOUTS[p][1].devices} devices needed, {jax.device_count()} here")
    if layouts or "latency" in parts:
        t = time.perf_counter()
        params = harness.host_random_params(presets.model_config(args.model))
        print(f"host weights in {time.perf_counter() - t:.0f} s", flush=True)
        need = 0.0
        for part in layouts:
            need = layout_row(args, part, params, trace, res, save, need)
        if "latency" in parts:
            latency_rows(args, params, res, save)
    save()
    print(markdown(res), flush=True)


if __name__ == "__main__":
    main()
