"""The same workload, in the same run, through every system that serves an HF decoder, and
through dsjax engine variants (kernel policies, quantized weights, INT8 KV caches):

    python benchmarks/compare.py --model gpt2-1.3b --batch-sizes 1,8 [--systems hf-eager,dsjax-xla,...]
        [--prompt-len 128 --new-tokens 128 --reps 10 --warmup 2] [--device auto|cpu|cuda]
        [--own-floor] [--logits] [--name NAME] [--deepspeed-site DIR] [--deadline UNIX_TIME]
        [--out benchmarks/results]

With an HF or DeepSpeed system among --systems (or --logits), one HF torch model of a built-in
architecture (dsjax.presets) with seeded random weights is the source of every system's
weights: HF transformers runs it as it is (eager, and with a static cache, whose decode step HF
compiles with torch.compile on CUDA); dsjax converts it in memory (init_inference(hf_model,
...)); DeepSpeed-Inference (kernel injection) loads it from a safetensors directory saved from
it, in a subprocess with its own PYTHONPATH (--deepspeed-site: DeepSpeed 0.19.x needs
transformers 4.46.x; this process keeps transformers 5). With dsjax variants alone, no torch is
needed: each variant makes the preset's random weights itself (the same seed, so the same
weights). The dsjax variants (benchmarks/harness.py DSJAX_VARIANTS) are named init_inference
keywords, each with its KernelPolicy; decode_variants.py's former names are accepted too.

Every system gets the same random prompts (fixed seed) and generates greedily with no stop
token, so every call makes exactly --new-tokens tokens; each system's tokens are compared with
the reference's: HF eager when it runs, else the first system listed.

Per system and batch size: after the compiling call (its time: compile_s in the JSON),
`warmup` untimed calls, `reps` timed calls of the full generate (P50/P95/mean), then `reps`
one-token calls (TTFT: their median). ms/token = P50 / new tokens; decode ms/token = (P50 -
TTFT) / (new tokens - 1) (dsjax.bench, the measure `dsjax bench` uses), against the floor of a
decode step: the bytes of the weights and K/V over the mean context / the bf16 GEMV bandwidth
measured in this run (again at its end). The floor counts the unquantized weights for every row;
with --own-floor each dsjax variant's floor counts its own weights and K/V cache as stored.
--logits: one prompt's logits of HF in bf16 and of every dsjax variant against HF in float32
(relative L2 of the centred logits, argmax agreement). A system that fails is a row with the
exception's type and first line; one the deadline leaves no time for is a row that says so.
DeepSpeed's op JIT-compiles (nvcc, minutes) in the background while the other systems build and
compile; nothing is timed until it has finished. Writes OUT/NAME.{json,md,png} (NAME: --name,
default compare-MODEL) after every system (the PNG needs matplotlib), and into $OUT when set.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- DeepSpeed's process
# Above the imports of dsjax and jax: `compare.py --deepspeed-worker MODE [SPEC]` runs it and exits
# before them (the op build needs neither, and fails at once where deepspeed is not importable).

def deepspeed_worker(mode: str, spec_path: str | None) -> int:
    """`build`: JIT-builds (or loads) DeepSpeed's transformer_inference op. `measure SPEC`: loads
    the saved weights into transformers 4.46 (the preset's config, not the saved config.json,
    which transformers 5 writes in its own format), injects DeepSpeed's kernels, times generate
    per batch size; writes SPEC.out.json after each step, errors included."""
    if mode == "build":
        t0 = time.perf_counter()
        from deepspeed.ops.op_builder import InferenceBuilder  # (which imports torch)

        InferenceBuilder().load()
        seconds = time.perf_counter() - t0
        log(f"deepspeed: transformer_inference op ready in {seconds:.0f} s")
        print(json.dumps({"deepspeed_build_s": seconds}), flush=True)  # read by DeepSpeedBuild.finish
        return 0
    import torch

    from benchmarks.harness import error_line, random_prompts, time_generate  # (and jax)

    spec = json.loads(Path(spec_path).read_text())
    out, result = Path(spec_path).with_suffix(".out.json"), {"rows": {}, "versions": {}}
    try:
        engine = _deepspeed_engine(spec, result["versions"])
    except Exception as e:  # noqa: BLE001  the row records it
        out.write_text(json.dumps(dict(result, error=error_line(e))))
        raise
    device = torch.device(spec["device"])

    def generate(prompts, n):
        ids = torch.as_tensor(prompts, device=device)
        with torch.no_grad():
            o = engine.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                do_sample=False, pad_token_id=0)
        return o[:, ids.shape[1]:].cpu().numpy()

    for bs in spec["batch_sizes"]:
        prompts = random_prompts(spec["vocab"], bs, spec["prompt_len"], spec["seed"])
        try:
            t0 = time.perf_counter()
            generate(prompts, spec["new_tokens"])  # the first call, as the other systems' compile
            first_s = time.perf_counter() - t0
            measured = time_generate(lambda n, p=prompts: generate(p, n), spec["new_tokens"],
                                     spec["warmup"], spec["reps"])  # as measure() below
            result["rows"][str(bs)] = dict(measured, compile_s=first_s)
        except Exception as e:  # noqa: BLE001
            result["rows"][str(bs)] = {"error": error_line(e)}
            log(f"deepspeed bs {bs}: {error_line(e)}")
        out.write_text(json.dumps(result))
    return 0


def _deepspeed_engine(spec: dict, versions: dict):
    import torch
    import transformers

    versions.update(torch=torch.__version__, transformers=transformers.__version__)
    import deepspeed

    versions["deepspeed"] = deepspeed.__version__
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec["dtype"]]
    config = transformers.AutoConfig.for_model(**spec["hf_config"])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], config=config, torch_dtype=dtype, output_loading_info=True)
    wrong = {k: v for k, v in info.items() if v}
    if wrong:
        raise RuntimeError(f"transformers {transformers.__version__} loaded the weights with {wrong}")
    model.generation_config.eos_token_id = None  # exactly new_tokens tokens, as everywhere
    return deepspeed.init_inference(model.to(spec["device"]), dtype=dtype, replace_with_kernel_inject=True,
                                    tensor_parallel={"tp_size": 1})


if __name__ == "__main__" and sys.argv[1:2] == ["--deepspeed-worker"]:
    sys.exit(deepspeed_worker(sys.argv[2], (sys.argv[3:] or [None])[0]))

import dsjax  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import error_line  # noqa: E402
from dsjax import presets  # noqa: E402

ROOT = harness.ROOT
RESULTS = harness.RESULTS

SYSTEMS = {  # name -> (label, options); the reference (HF eager when it runs) always runs first
    "hf-eager": ("HF transformers eager", {}),
    "hf-compile": ("HF static cache + torch.compile", {"cache_implementation": "static"}),
    "deepspeed": ("DeepSpeed-Inference kernel inject", {"dtype": None}),  # None: --dtype
    "deepspeed-fp16": ("DeepSpeed-Inference kernel inject, fp16", {"dtype": "fp16"}),
    **harness.DSJAX_VARIANTS,  # init_inference keywords
}
DEFAULT_SYSTEMS = "hf-eager,hf-compile,deepspeed,dsjax-xla,dsjax-kernels,dsjax-pallas,dsjax-int8"
NEEDS_S = {"hf-compile": 90, "deepspeed": 60, "deepspeed-fp16": 60}  # least time left to start one
NEEDS_DEFAULT_S = 30
MEASURE_S = 20  # least time left to time a prepared system
LOAD_S_PER_GB = 10  # DeepSpeed's process loads the saved weights again
RESERVE_S = 20  # kept at the deadline for writing the results
LOGITS_SEED = 123  # the --logits probe prompt


make_prompts = harness.random_prompts  # (vocab, batch, prompt_len, seed): the same for every system


def measure(generate, prompts: np.ndarray, new_tokens: int, warmup: int, reps: int) -> dict:
    """generate(prompts, n) -> host tokens [B, n]: dsjax.bench.time_generate on these prompts."""
    return harness.time_generate(lambda n: generate(prompts, n), new_tokens, warmup, reps)


def first_differences(tokens, reference) -> list[int]:
    """Per row, the index of the first token that differs (the row's length where none does)."""
    a, b = np.asarray(tokens), np.asarray(reference)
    if a.shape != b.shape:
        raise ValueError(f"token shapes differ: {a.shape} vs {b.shape}")
    return [int(np.argmin(r)) if not r.all() else len(r) for r in a == b]


def timing_row(measured: dict, new_tokens: int, reference=None) -> dict:
    """A result row's figures from measure()'s times (dsjax.bench.timing); reference: the
    reference system's tokens for the same prompts (None: not compared). The key keeps its
    first name, tokens_equal_hf, whichever system the reference is."""
    row = {"status": "ok", **harness.timing(measured, new_tokens), "tokens_equal_hf": None}
    if reference is not None:
        row["first_difference"] = first_differences(measured["tokens"], reference)
        row["tokens_equal_hf"] = all(d == new_tokens for d in row["first_difference"])
    return row


def add_floor(row: dict, floor: dict) -> None:
    """floor: a dsjax.bench.roofline(); the row's decode ms/token over it."""
    row.update(floor, over_floor=row["decode_ms_per_token"] / floor["floor_ms"])


def logit_error(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Relative L2 of the centred logits, and argmax agreement, against float32 logits."""
    centred = np.linalg.norm(reference - reference.mean(-1, keepdims=True))
    return {"rel_l2_vs_fp32": float(np.linalg.norm(logits - reference) / centred),
            "argmax_agreement_vs_fp32": float((logits.argmax(-1) == reference.argmax(-1)).mean())}


# ----------------------------------------------------------------------------- systems

class System:
    """prepare(batch_sizes) builds and compiles (untimed); generate(prompts, n) -> host tokens."""

    def __init__(self, name: str, ctx: dict):
        self.name, self.ctx = name, ctx
        self.label, self.options = SYSTEMS[name]
        self.notes: list[str] = []
        self.compile_s: dict[int, float] = {}  # batch -> the first call's seconds

    def prepare(self, batch_sizes) -> None:
        c = self.ctx
        for bs in batch_sizes:  # the compiling call of each batch size
            t0 = time.perf_counter()
            self.generate(make_prompts(c["vocab"], bs, c["prompt_len"], c["seed"]), c["new_tokens"])
            self.compile_s[bs] = time.perf_counter() - t0

    def close(self) -> None:
        pass


class HFSystem(System):
    def generate(self, prompts, n):
        import torch

        model = self.ctx["hf_model"]
        ids = torch.as_tensor(prompts, device=model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=0, **self.options)
        return out[:, ids.shape[1]:].cpu().numpy()

    def prepare(self, batch_sizes) -> None:
        super().prepare(batch_sizes)
        if self.options.get("cache_implementation") == "static":
            compiled = getattr(self.ctx["hf_model"], "_compiled_call", None) is not None
            self.notes.append("decode step compiled by HF (torch.compile)" if compiled else
                              "static cache, not compiled (HF compiles it only on CUDA)")


class DsjaxSystem(System):
    """An engine of one variant: the HF model converted in memory, or the preset's random
    weights; its floor (config, weight bytes per step, K/V bytes per element) is recorded."""

    def prepare(self, batch_sizes) -> None:
        c = self.ctx
        self.engine = dsjax.init_inference(c.get("hf_model", c["model"]), dtype=c["dtype"],
                                           seed=c["seed"], progress=False,
                                           max_out_tokens=c["prompt_len"] + c["new_tokens"],
                                           **self.options)
        e = self.engine
        c["floors"][self.name] = (e.config, harness.weight_bytes_per_step(e), harness.kv_itemsize(e))
        if "floor" not in c and not self.options.get("quant") and "kv_cache_dtype" not in self.options:
            c["floor"] = c["floors"][self.name]  # the unquantized weights: every row's floor
        if "logits" in c:
            c["logits"]["systems"][self.name] = logit_error(
                np.asarray(e(c["logits"]["probe"]), np.float32)[0], c["logits"]["reference"])
        super().prepare(batch_sizes)

    def generate(self, prompts, n):
        return self.engine.generate(prompts, max_new_tokens=n, eos_token_id=[]).tokens

    def close(self) -> None:
        self.engine = None


class DeepSpeedSystem(System):
    """Runs in a subprocess (deepspeed_worker); prepare() saves the weights for it."""

    def prepare(self, batch_sizes) -> None:
        c = self.ctx
        if "model_dir" not in c:
            c["model_dir"] = str(Path(c["work_dir"]) / "hf_model")
            c["hf_model"].save_pretrained(c["model_dir"])

    def run_worker(self, batch_sizes, timeout: float) -> dict:
        """{"versions", "rows": {batch: measure() or {"error"}}} or {"error"}."""
        c = self.ctx
        spec = {k: c[k] for k in ("model_dir", "hf_config", "prompt_len", "new_tokens", "warmup",
                                  "reps", "seed", "vocab", "device")}
        spec.update(batch_sizes=list(batch_sizes), dtype=self.options["dtype"] or c["dtype"])
        path = Path(c["work_dir"]) / f"{self.name}.json"
        path.write_text(json.dumps(spec))
        try:
            proc = subprocess.run(worker_command("measure", path), env=worker_env(c), timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired as e:
            sys.stdout.write(str(e.stdout or "") + str(e.stderr or ""))
            raise
        sys.stdout.write(proc.stdout + proc.stderr)
        out = path.with_suffix(".out.json")
        if not out.exists():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"DeepSpeed's process exited with {proc.returncode}: {tail}")
        return json.loads(out.read_text())


def make_system(name: str, ctx: dict) -> System:
    if name.startswith("deepspeed"):
        return DeepSpeedSystem(name, ctx)
    return (HFSystem if name.startswith("hf-") else DsjaxSystem)(name, ctx)


def needs_torch(systems) -> bool:
    return any(s.startswith(("hf-", "deepspeed")) for s in systems)


# ----------------------------------------------------------------------------- starting DeepSpeed's process

def worker_command(mode: str, spec: Path | None = None) -> list[str]:
    """This script in worker mode: deepspeed_worker() at the top, before jax and dsjax load."""
    return [sys.executable, str(Path(__file__).resolve()), "--deepspeed-worker", mode] + (
        [str(spec)] if spec else [])


def worker_env(ctx: dict) -> dict:
    """Its own site directory first (transformers 4.46.x for DeepSpeed 0.19.x), a one-process
    'distributed' setup, the GPU's arch for the JIT build."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    env.setdefault("MASTER_PORT", "29517")
    paths = [p for p in (ctx.get("deepspeed_site"), str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if ctx.get("cuda_arch"):
        env.setdefault("TORCH_CUDA_ARCH_LIST", ctx["cuda_arch"])
        env.setdefault("DS_ACCELERATOR", "cuda")
    return env


class DeepSpeedBuild:
    """The op's JIT build in the background: it runs while the other systems prepare."""

    def __init__(self, ctx: dict):
        self.log = Path(ctx["work_dir"]) / "deepspeed-build.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(worker_command("build"), env=worker_env(ctx), stdout=f,
                                         stderr=subprocess.STDOUT)
        self.started, self.error, self.seconds = time.time(), None, None  # seconds: once finished
        log(f"deepspeed: building its op in the background (pid {self.proc.pid})")

    def running(self) -> bool:
        return self.seconds is None and self.proc.poll() is None

    def finish(self, timeout: float) -> str | None:
        """Waits (at most timeout s, then stops it); None once built, else what went wrong."""
        if self.seconds is not None:
            return self.error
        try:
            rc = self.proc.wait(timeout=None if math.isinf(timeout) else max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            self.error = f"op build stopped after {time.time() - self.started:.0f} s (deadline)"
        text = self.log.read_text()
        sys.stdout.write(text)
        lines = [ln for ln in text.splitlines() if ln.strip()] or [f"op build exited with {rc}"]
        if rc != 0 and self.error is None:
            self.error = lines[-1]
        reported = [json.loads(ln) for ln in lines if ln.startswith('{"deepspeed_build_s"')]
        self.seconds = reported[-1]["deepspeed_build_s"] if reported else time.time() - self.started
        return self.error


# ----------------------------------------------------------------------------- the run

class Run:
    """One model: its systems in order, their rows, the report written after every system."""

    def __init__(self, args, env: dict):
        self.args, self.env = args, env
        self.rows: list[dict] = []
        self.reference: dict[int, list] = {}  # batch -> the reference system's tokens
        self.notes: dict[str, list[str]] = {}
        self.build: DeepSpeedBuild | None = None
        self.ctx: dict = {"floors": {}}

    def left(self) -> float:
        return float("inf") if self.args.deadline is None else self.args.deadline - time.time()

    def need(self, system: System) -> float:
        """Seconds a system needs at least (its compile or build, loading the weights again)."""
        extra = 0
        if isinstance(system, DeepSpeedSystem):
            params = self.ctx["hf_model"].parameters()
            extra = LOAD_S_PER_GB * sum(p.numel() * p.element_size() for p in params) / 1e9
        return NEEDS_S.get(system.name, NEEDS_DEFAULT_S) + extra + RESERVE_S

    def record(self, system: System, batch: int, **fields) -> dict:
        row = {"system": system.name, "label": system.label, "batch": batch,
               "prompt_len": self.args.prompt_len, "new_tokens": self.args.new_tokens, **fields}
        self.rows.append(row)
        return row

    def fail_all(self, system: System, status: str, error: str) -> None:
        log(f"{system.name}: {status}: {error}")
        for bs in self.args.batch_sizes:
            self.record(system, bs, status=status, error=error)

    def add_floors(self) -> None:
        """The floor of each measured row: the unquantized weights' (counted by the first dsjax
        engine that holds them), or with --own-floor a dsjax row's own engine's."""
        a = self.args
        for r in self.rows:
            own = self.ctx["floors"].get(r["system"]) if a.own_floor else None
            floor = own or self.ctx.get("floor")
            if r["status"] == "ok" and "floor_ms" not in r and floor:
                cfg, wbytes, itemsize = floor
                kv = harness.kv_bytes_per_step(cfg, r["batch"], a.prompt_len + a.new_tokens // 2, itemsize)
                add_floor(r, harness.roofline(wbytes, kv, self.env["gemv_bandwidth"]["bytes_per_s"]))

    def add(self, system: System, bs: int, measured: dict) -> None:
        if system.name == self.args.reference:
            self.reference[bs] = measured["tokens"]
        row = self.record(system, bs, **timing_row(measured, self.args.new_tokens, self.reference.get(bs)),
                          compile_s=measured.get("compile_s", system.compile_s.get(bs)))
        log(f"{system.name} bs {bs}: P50 {row['latency_ms']['p50']:.1f} ms, {row['ms_per_token']:.3f} "
            f"ms/token, decode {row['decode_ms_per_token']:.3f}, tokens = {self.args.reference}: "
            f"{row['tokens_equal_hf']}")

    def measure(self, system: System) -> None:
        a = self.args
        if isinstance(system, DeepSpeedSystem):
            return self.measure_deepspeed(system)
        for bs in a.batch_sizes:
            prompts = make_prompts(self.ctx["vocab"], bs, a.prompt_len, a.seed)
            try:
                self.add(system, bs, measure(system.generate, prompts, a.new_tokens, a.warmup, a.reps))
            except Exception as e:  # noqa: BLE001  the row records it
                self.record(system, bs, status="failed", error=error_line(e))
                log(f"{system.name} bs {bs}: failed: {error_line(e)}")

    def measure_deepspeed(self, system: DeepSpeedSystem) -> None:
        error = self.build.finish(self.left() - self.need(system)) if self.build else "op never built"
        if error:
            return self.fail_all(system, "failed", error)
        self.env["deepspeed_build_s"] = self.build.seconds
        if self.left() < self.need(system):
            return self.fail_all(system, "skipped", f"{self.left():.0f} s left before the deadline")
        try:
            timeout = None if self.args.deadline is None else max(self.left() - RESERVE_S, 1)
            result = system.run_worker(self.args.batch_sizes, timeout)
        except Exception as e:  # noqa: BLE001
            return self.fail_all(system, "failed", error_line(e))
        if result.get("versions", {}).get("deepspeed"):
            self.env["deepspeed_process"] = result["versions"]
        if "error" in result:
            return self.fail_all(system, "failed", result["error"])
        for bs in self.args.batch_sizes:
            got = result["rows"].get(str(bs), {"error": "no result (its process stopped)"})
            if "error" in got:
                self.record(system, bs, status="failed", error=got["error"])
            else:
                self.add(system, bs, got)

    def run(self) -> dict:
        a = self.args
        device = a.device
        self.ctx.update(prompt_len=a.prompt_len, new_tokens=a.new_tokens, warmup=a.warmup,
                        reps=a.reps, seed=a.seed, dtype=a.dtype, model=a.model,
                        deepspeed_site=a.deepspeed_site, hf_config=presets.hf_config(a.model),
                        work_dir=tempfile.mkdtemp(prefix="compare-"), cuda_arch=None)
        if needs_torch(a.systems) or a.logits:
            import torch

            device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            if device == "cuda":
                self.ctx["cuda_arch"] = "%d.%d" % torch.cuda.get_device_capability()
        self.ctx["device"] = device
        try:
            if any(n.startswith("deepspeed") for n in a.systems):
                self.build = DeepSpeedBuild(self.ctx)
            self.run_systems(device)
            self.env["gemv_bandwidth_at_end"] = harness.gemv_bandwidth()
        finally:
            if self.build is not None and self.build.running():
                self.build.finish(0)  # stops it
            shutil.rmtree(self.ctx["work_dir"], ignore_errors=True)
            self.write()
        return self.payload()

    def run_systems(self, device: str) -> None:
        a, c = self.args, self.ctx
        if needs_torch(a.systems) or a.logits:
            import torch

            log(f"{a.model}: building the HF torch model (seed {a.seed}, {a.dtype}, {device})")
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
            c["hf_model"] = presets.hf_torch_model(a.model, seed=a.seed, dtype=dtype, device=device)
            c["hf_model"].generation_config.eos_token_id = None  # no early stop anywhere
        c["vocab"] = c["hf_config"]["vocab_size"]
        if a.logits:
            self.logits_reference()
        pending = []  # prepared, measured once the DeepSpeed build (if any) no longer runs
        for system in [make_system(n, c) for n in a.systems]:
            if self.left() < self.need(system):
                self.fail_all(system, "skipped", f"{self.left():.0f} s left before the deadline")
                continue
            log(f"{system.name}: preparing ({system.label})")
            try:
                system.prepare(a.batch_sizes)
                pending.append(system)
            except Exception as e:  # noqa: BLE001
                self.fail_all(system, "failed", error_line(e))
            if self.build is None or not self.build.running():
                pending = self.measure_all(pending)
        if self.build is not None and self.build.running():  # nothing is timed while it builds
            self.build.finish(self.left() - RESERVE_S - MEASURE_S * len(pending))
        self.measure_all(pending)

    def logits_reference(self) -> None:
        """One probe prompt's float32 logits from a float32 copy of the HF model (the model
        itself stays as it is: casting it there and back would round its fp32 buffers), and
        HF's own logits at --dtype against them."""
        import torch

        model, a = self.ctx["hf_model"], self.args
        probe = make_prompts(self.ctx["vocab"], 1, a.prompt_len, LOGITS_SEED)
        ids = torch.as_tensor(probe, device=model.device)
        with torch.no_grad():
            ours = model(ids).logits[0].float().cpu().numpy()
            exact = model if a.dtype == "fp32" else copy.deepcopy(model).float()
            reference = exact(ids).logits[0].cpu().numpy()
        del exact
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        top2 = np.sort(reference, axis=-1)[:, -2:]
        spread = (reference - reference.mean(-1, keepdims=True)).std(-1)
        self.ctx["logits"] = {"probe": probe, "reference": reference, "systems": {
            "hf-eager": logit_error(ours, reference)} if a.dtype != "fp32" else {},
            "median_top2_gap_over_logit_std": float(np.median((top2[:, 1] - top2[:, 0]) / spread))}

    def measure_all(self, systems) -> list:
        for system in systems:
            if self.left() < RESERVE_S + MEASURE_S:
                self.fail_all(system, "skipped", f"{self.left():.0f} s left before the deadline")
            else:
                self.measure(system)
            if system.notes:
                self.notes[system.name] = system.notes
            system.close()
            gc.collect()
            self.write()
        return []

    def payload(self) -> dict:
        self.add_floors()
        settings = {k: v for k, v in vars(self.args).items() if k != "deepspeed_worker"}
        out = {"env": self.env, "args": dict(settings, command=command_line(self.args)),
               "variants": {n: harness.describe(SYSTEMS[n][1]) for n in self.args.systems
                            if n in harness.DSJAX_VARIANTS},
               "notes": self.notes, "rows": self.rows}
        if "logits" in self.ctx:
            out["logits"] = {k: v for k, v in self.ctx["logits"].items() if k not in ("probe", "reference")}
        return out

    def write(self) -> None:
        payload, name = self.payload(), self.args.name or f"compare-{self.args.model}"
        harness.save(name, payload, report_markdown(payload), self.args.out)
        try:
            from benchmarks import plot_compare

            plot_compare.plot_model(payload, Path(self.args.out) / f"{name}.png")
        except ImportError as e:
            log(f"no plot: {error_line(e)}")


# ----------------------------------------------------------------------------- reports

COLUMNS = ("system", "batch", "P50 ms", "P95 ms", "mean ms", "ms/token", "decode ms/token", "TTFT ms",
           "floor ms/token", "decode / floor", "P50 vs HF eager", "tokens = HF eager")


def _short(system: str) -> str:
    return "HF eager" if system == "hf-eager" else system


def _equal_cell(r: dict) -> str:
    if r.get("tokens_equal_hf") is None:
        return "n/a"
    if r["tokens_equal_hf"]:
        return "yes"
    diffs = r["first_difference"]
    same = sum(d == r["new_tokens"] for d in diffs)
    return f"no: from token {min(diffs) + 1}; {same}/{len(diffs)} rows equal"


def _cells(r: dict, ref_p50: float | None) -> list[str]:
    if r["status"] != "ok":
        error = " ".join(r["error"].split())
        return [r["label"], str(r["batch"]), f"{r['status']}: {error}"] + ["-"] * (len(COLUMNS) - 3)
    lat, floor = r["latency_ms"], r.get("floor_ms")
    return [r["label"], str(r["batch"]), f"{lat['p50']:.2f}", f"{lat['p95']:.2f}", f"{lat['mean']:.2f}",
            f"{r['ms_per_token']:.3f}", f"{r['decode_ms_per_token']:.3f}", f"{r['ttft_ms']:.2f}",
            "n/a" if floor is None else f"{floor:.3f}", "n/a" if floor is None else f"{r['over_floor']:.2f}x",
            f"{ref_p50 / lat['p50']:.2f}x" if ref_p50 else "n/a", _equal_cell(r)]


def report_markdown(payload: dict) -> str:
    env, a, rows = payload["env"], payload["args"], payload["rows"]
    ref = a.get("reference", "hf-eager")
    ref_p50 = {r["batch"]: r["latency_ms"]["p50"] for r in rows if r["system"] == ref and r["status"] == "ok"}
    bw, end, ds = env["gemv_bandwidth"], env.get("gemv_bandwidth_at_end"), env.get("deepspeed_process")
    versions = ", ".join([f"JAX {env['jax']}"] + [f"{k} {env[k]}" for k in ("torch", "transformers")
                                                   if env.get(k) and needs_torch(a["systems"])])
    if ds:
        versions += f"; DeepSpeed {ds['deepspeed']} with transformers {ds['transformers']} in its own process"
    ceiling = (f"{bw['bytes_per_s'] / 1e12:.3f} TB/s (bf16 GEMV {bw['shape']} measured in this run"
               + (f"; {end['bytes_per_s'] / 1e12:.3f} at its end)" if end else ")"))
    counted = ("each dsjax variant's own weights and K/V cache as stored (other systems: the "
               "unquantized weights)" if a.get("own_floor") else "the unquantized weights")
    order = {name: i for i, name in enumerate(a["systems"])}
    rows = sorted(rows, key=lambda r: (order.get(r["system"], len(order)), r["batch"]))
    title = ("HF transformers, DeepSpeed-Inference and dsjax" if needs_torch(a["systems"])
             else "dsjax variants")
    lines = [
        f"# {a['model']}: {title} on the same workload", "",
        f"{env.get('torch_device') or env['device']}, commit {env['git_commit']}, {env['date']}. "
        f"{versions}.", "",
        f"{a['dtype']}, the same random weights in every system (seed {a['seed']}), random prompts of "
        f"{a['prompt_len']} tokens, {a['new_tokens']} new tokens, greedy, no early stop; after the "
        f"compiling call, {a['warmup']} warm-up and {a['reps']} timed runs of the full generate per "
        "batch size.", "",
        f"ms/token = P50 / new tokens. Decode ms/token = (P50 - TTFT) / {a['new_tokens'] - 1}, TTFT = "
        f"median of {a['reps']} one-token generates. Floor = bytes one decode step reads ({counted}, "
        f"K/V over the mean context) / {ceiling}. Tokens = {_short(ref)}: every row of the batch "
        f"equal to {_short(ref)}'s greedy tokens, or the first token that differs (with random weights "
        "the top logits are nearly tied, so bf16 rounding in another kernel order flips some of them).",
        "", f"Command: `{a['command']}`", "",
        "| " + " | ".join(c.replace("HF eager", _short(ref)) for c in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r, ref_p50.get(r["batch"]))) + " |" for r in rows]
    lines += _logits_lines(payload.get("logits"))
    notes = [f"- {SYSTEMS[k][0] if k in SYSTEMS else k}: {'; '.join(v)}"
             for k, v in payload.get("notes", {}).items()]
    if env.get("deepspeed_build_s"):
        notes.append(f"- DeepSpeed's op JIT build (or its load from the cache) took "
                     f"{env['deepspeed_build_s']:.0f} s, in the background while the other systems "
                     "compiled; nothing was timed during it")
    notes += [f"- Correction: {c}" for c in payload.get("corrections", [])]
    return "\n".join(lines + [""] * bool(notes) + notes) + "\n"


def _logits_lines(logits: dict | None) -> list[str]:
    if not logits:
        return []
    lines = ["", "One prompt's logits against HF transformers in float32 (same weights): relative "
             "L2 of the centred logits, argmax agreement; the median gap between the two top "
             f"float32 logits is {logits['median_top2_gap_over_logit_std']:.3f} logit standard "
             "deviations.", "", "| system | rel. L2 vs fp32 | argmax agreement |", "|---|---|---|"]
    for name, e in logits["systems"].items():
        label = SYSTEMS[name][0] + (" (bf16)" if name == "hf-eager" else "")
        lines.append(f"| {label} | {e['rel_l2_vs_fp32']:.4f} | {e['argmax_agreement_vs_fp32']:.2f} |")
    return lines


def command_line(a) -> str:
    words = ["--model", a.model, "--batch-sizes", ",".join(map(str, a.batch_sizes)), "--systems",
             ",".join(a.systems), "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens),
             "--reps", str(a.reps), "--warmup", str(a.warmup), "--dtype", a.dtype]
    words += (["--seed", str(a.seed)] * (a.seed != 0) + ["--own-floor"] * a.own_floor
              + ["--logits"] * a.logits + ["--name", a.name] * bool(a.name))
    return "python benchmarks/compare.py " + " ".join(map(shlex.quote, words))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-1.3b", help="built-in architecture (dsjax.presets)")
    p.add_argument("--batch-sizes", type=harness.ints, default=[1, 8])
    p.add_argument("--systems", type=lambda s: [harness.FORMER_NAMES.get(x, x) for x in s.split(",")],
                   default=DEFAULT_SYSTEMS.split(","),
                   help=f"comma-separated, from: {', '.join(SYSTEMS)} (default {DEFAULT_SYSTEMS})")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="torch's device")
    p.add_argument("--own-floor", action="store_true",
                   help="each dsjax variant's floor counts its own (quantized) weights and K/V cache")
    p.add_argument("--logits", action="store_true",
                   help="one prompt's logits of HF bf16 and every dsjax variant against HF fp32")
    p.add_argument("--name", default=None, help="results file name (default compare-MODEL)")
    p.add_argument("--deepspeed-site", default=os.environ.get("DSJAX_DEEPSPEED_SITE"),
                   help="a pip --target directory with deepspeed and transformers 4.46.x, first on "
                   "the DeepSpeed process's PYTHONPATH (default $DSJAX_DEEPSPEED_SITE)")
    p.add_argument("--deadline", type=float, default=None,
                   help="UNIX time to finish by: systems it leaves no time for are 'skipped' rows")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--deepspeed-worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    if args.new_tokens < 2 or args.reps < 1 or args.prompt_len < 1 or min(args.batch_sizes) < 1:
        p.error("needs --new-tokens >= 2, --reps >= 1, --prompt-len >= 1 and batch sizes >= 1")
    if "hf-eager" in args.systems:  # its tokens are the reference
        args.systems = ["hf-eager"] + [s for s in args.systems if s != "hf-eager"]
    args.reference = args.systems[0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.deepspeed_worker:
        return deepspeed_worker(args.deepspeed_worker[0], (args.deepspeed_worker[1:] or [None])[0])
    env = dict(harness.environment(), gemv_bandwidth=harness.gemv_bandwidth())
    log(str(env))
    payload = Run(args, env).run()
    print(report_markdown(payload), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
