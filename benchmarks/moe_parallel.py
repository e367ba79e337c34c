"""MoE decode over several GPUs: expert parallelism (EP), tensor parallelism (TP) and both,
against the one-device engine of the same run and against each device's active-bytes floor.

    python benchmarks/moe_parallel.py [--part check,decode,profile] [--arch mixtral-8l,qwen3-30b-a3b]
        [--layouts ep2,tp2] [--batch 1,8,64,256] [--deadline UNIX_TIME] [--smoke]

Architectures (random weights, bf16): Mixtral-8x7B's layer shape with 8 of its 32 layers (as
benchmarks/moe.py runs it), and Qwen3-30B-A3B's shape (128 experts, top-8) with 12 of its 48
layers by default: the whole shape (about 61 GB of bf16 weights) fits one 80 GB GPU, but every
batch size of every layout compiles the unrolled layers again, and a quarter of them leaves a
part room to finish within a 10-minute call (the per-layer costs, collectives included, are the
same; `--arch qwen3-30b-a3b:48` runs all of them).
The weights are made on the default device a few layers at a time and kept on the host; each
layout is an engine built from them (benchmarks/parallel.py's build: XLA kernels by default).
Layouts (`--layouts`; default by device count): on 2 devices EP2 and TP2, on 4 EP2, EP4, EP2xTP2
and TP4. EPn is expert_parallel={"ep_size": n}: the experts spread over n data-parallel
replicas, each decoding its share of the batch, rows sent to their experts and back by
all-to-all; TPn slices attention and every expert's width over n devices.

decode: ms/token per batch size, dsjax.bench's measure (P50 T(n) - P50 T(1)) / (n - 1) of greedy
  `generate` calls, the one-device engine first. Floor of one device's decode step: the weights
  it holds outside the experts (an untied embedding table is looked up, not read) + its experts'
  bytes x (1 - (1 - k/E)^B), the expected share of them that B tokens' top-k picks reach when
  routing is uniform (benchmarks/moe.py's distinct-experts formula, per device) + its KV share
  (its replica's sequences, its KV heads, mean context), / the bf16 GEMV bandwidth measured here.
profile (layouts of several devices): jax.profiler traces of generate(n) and generate(1),
  summarised by benchmarks/decode_profile.py (kernel_summary, per_step: the difference / (n - 1)
  on GPU 0): per decode step, the time and count of the all-to-all kernels (NCCL send/recv), the
  all-reduces (TP's psum), the all-gathers, and the GPU span. A collective kernel's time includes
  its wait for the slowest peer. On the CPU (--smoke) device 0's host XLA ops stand in.
check: 8 prompts of --check-prompt-len tokens, models of --check-layers layers (fp32 must fit one
  device): each layout's 16 greedy tokens and last-position logits in fp32 (full matmul precision)
  against the one-device engine's in fp32; in bf16, the logits' relative L2 distance to that fp32
  reference (as benchmarks/parallel.py measures it) and the tokens.
--deadline: a row starts only if the longest row so far (an engine's first includes its build)
fits before it with time left for the report; rows left out say so. Writes
benchmarks/results/NAME.{json,md} (+ $OUT) after every row. --smoke: tiny architectures of 8
experts on simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8
JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import converters  # noqa: E402
from benchmarks import decode_profile, harness, moe, parallel  # noqa: E402
from dsjax.model import abstract_model, flatten, random_params  # noqa: E402
from dsjax.parallel.mesh import Parallel  # noqa: E402
from dsjax.weights import is_experts  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {**moe.ARCHS,  # name -> (HF class, HF config); the tiny ones: --smoke
         "tiny-mixtral": ("MixtralForCausalLM", dict(
             TINY, model_type="mixtral", intermediate_size=64, num_local_experts=8,
             num_experts_per_tok=2)),
         "tiny-qwen3": ("Qwen3MoeForCausalLM", dict(
             TINY, model_type="qwen3_moe", intermediate_size=128, moe_intermediate_size=32,
             head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
             tie_word_embeddings=False))}
LAYERS = {"qwen3-30b-a3b": 12}  # the default layer count where it is not the config's own
LAYOUTS = {2: "ep2,tp2", 4: "ep2,ep4,ep2tp2,tp4"}  # the default --layouts by device count
PARTS = ("check", "decode", "profile")
SMOKE = dict(arch="tiny-mixtral,tiny-qwen3", batch=[1, 8], prompt_len=16, new_tokens=8, reps=2,
             check_layers=2, check_prompt_len=8,  # (not a result: written to the temp dir)
             name=os.path.join(tempfile.gettempdir(), "moe_parallel-smoke"))
RESERVE_S = 20  # kept at the deadline for writing the report
FIRST_ROW_S = 60  # what a row is taken to need before one has been timed
COLLECTIVES = {  # kind -> kernel name pattern (the first that matches names a kernel's kind)
    "all_to_all": re.compile(r"all.?to.?all|send.?recv|p2p", re.I),
    "all_reduce": re.compile(r"all.?reduce|psum|reduce.?scatter|one.?shot", re.I),
    "all_gather": re.compile(r"all.?gather", re.I),
    "other_collective": re.compile(r"nccl|collective", re.I)}


# ----------------------------------------------------------------------------- models, layouts

def model_config(spec: str, layers: int | None = None):
    """'name' or 'name:L' -> (label, ModelConfig with L layers: L, else `layers`, else the
    default of LAYERS or the config's own)."""
    name, _, count = spec.partition(":")
    hf = ARCHS[name][1]
    cfg = converters.policy_for(hf).make_config(hf)
    L = int(count or layers or LAYERS.get(name, cfg.num_layers))
    label = name if L == cfg.num_layers else f"{name} ({L} of {cfg.num_layers} layers)"
    return label, dataclasses.replace(cfg, num_layers=L)


def layout(name: str) -> tuple[str, Parallel]:
    """'ep2', 'tp4', 'ep2tp2', '1' -> (label, Parallel)."""
    m = re.fullmatch(r"(?:ep(\d+))?(?:tp(\d+))?|1", name)
    if not m:
        raise ValueError(f"layout {name!r}: expected epN, tpN, epNtpM or 1")
    ep, tp = int(m[1] or 1), int(m[2] or 1)
    label = "x".join(f"{k}{n}" for k, n in (("EP", ep), ("TP", tp)) if n > 1) or "1 device"
    return label, Parallel.parse(tensor_parallel=tp, expert_parallel=ep)


def host_params(cfg, dtypes: tuple[str, ...], seed: int = 0, chunk_bytes: float = 8e9) -> dict:
    """dtype -> random weights as nested host arrays (the same values, rounded to each dtype),
    made in float32 on the default device a few layers at a time (each chunk its own seed)
    and copied to the host: a GPU makes them in seconds where the CPU takes minutes."""
    one = dataclasses.replace(cfg, num_layers=1)
    layer_bytes = sum(s.size * 4 for p, s in abstract_model(one, jnp.float32)[1].items()
                      if p.startswith("layers."))
    alike = cfg.moe.layers is None and cfg.local_layers is None  # every layer the same shape
    n = max(1, int(chunk_bytes // layer_bytes)) if alike else cfg.num_layers
    out = {d: None for d in dtypes}
    for c, start in enumerate(range(0, cfg.num_layers, n)):
        part = random_params(dataclasses.replace(cfg, num_layers=min(n, cfg.num_layers - start)),
                             jnp.float32, seed + c)
        for d in dtypes:
            host = jax.device_get(jax.tree.map(lambda x, d=d: x.astype(d), part))
            out[d] = out[d] or {**host, "layers": {}}
            out[d]["layers"].update({start + j: v for j, v in host["layers"].items()})
        del part
    return out


def device_bytes(engine) -> dict:
    """Bytes of parameters on the first device: its experts, the weights a step reads besides
    (its slices, replicated weights whole) and tables that are only looked up."""
    dev = jax.devices()[0]
    tables = {"pos_embed.embedding", "type_embed.embedding"}
    if not engine.config.tie_word_embeddings:
        tables.add("embed.embedding")
    out = {"experts": 0, "read": 0, "tables": 0}
    for path, w in flatten(engine.params).items():
        n = sum(s.data.nbytes for a in jax.tree.leaves(w) for s in a.addressable_shards
                if s.device == dev)
        out["experts" if is_experts(path) else "tables" if path in tables else "read"] += n
    return out


def floor_ms(held: dict, cfg, par: Parallel, batch: int, context: float, bw: float) -> float:
    """One device's decode step: its non-expert weights, its experts' bytes x the chance that
    one of B tokens picks a given expert (uniform top-k routing), its KV share; / bandwidth."""
    E, k = cfg.moe.num_experts, cfg.moe.top_k
    active = held["experts"] * (1 - (1 - k / E) ** batch)
    kv = harness.kv_bytes_per_step(cfg, -(-batch // par.dp), context) / min(par.tp, cfg.kv_heads)
    return (held["read"] + active + kv) / bw * 1e3


# ----------------------------------------------------------------------------- profile

def trace_summary(trace_dir: Path) -> dict:
    """decode_profile.kernel_summary (GPU 0's kernels); without GPU events (the CPU), the
    host's XLA ops run for device 0, in the same form."""
    got = decode_profile.kernel_summary(trace_dir)
    if "error" not in got:
        return got
    path = next(trace_dir.rglob("*.trace.json.gz"))
    ops = [e for e in json.loads(gzip.open(path).read())["traceEvents"]
           if e.get("ph") == "X" and e.get("args", {}).get("device_ordinal") == "0"
           and "hlo_op" in e["args"]]
    if not ops:
        return got
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in ops:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
    return {"gpu": "CPU device 0 (host XLA ops)", "by_name": by_name,
            "span_us": max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)}


def collectives(step: dict) -> dict:
    """decode_profile.per_step's kernels of one decode step, summed by collective kind."""
    out = {"span_us": step["span_us"], "busy_us": step["busy_us"]}
    for kind in COLLECTIVES:
        out[f"{kind}_us"] = out[f"{kind}_count"] = 0.0
    names = []
    for k in step["all"]:
        kind = next((kind for kind, pattern in COLLECTIVES.items() if pattern.search(k["name"])), None)
        if kind:
            out[f"{kind}_us"] += k["us"]
            out[f"{kind}_count"] += k["per_step"]
            names.append(k)
    out["collective_kernels"] = names[:8]
    return out


def profile(engine, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Collective time per decode step: traces of generate(new_tokens) and generate(1)."""
    prompts = harness.random_prompts(engine.config.vocab_size, batch, prompt_len)
    run = lambda n: engine.generate(prompts, max_new_tokens=n, eos_token_id=[]).tokens  # noqa: E731
    run(new_tokens)  # compiled before the trace starts
    traces = {}
    for n in (1, new_tokens):
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d, create_perfetto_trace=True)
            run(n)
            jax.profiler.stop_trace()
            traces[n] = trace_summary(Path(d))
    if "error" in traces[1] or "error" in traces[new_tokens]:
        return {"error": traces[1].get("error") or traces[new_tokens]["error"]}
    step = decode_profile.per_step(traces[new_tokens], traces[1], new_tokens - 1)
    return dict(collectives(step), device=traces[1]["gpu"])


# ----------------------------------------------------------------------------- the run

class Bench:
    """The rows of one run, saved after each; the deadline's bookkeeping."""

    def __init__(self, args, env: dict):
        self.args, self.env, self.rows, self.longest = args, env, [], 0.0
        self.bw = env["gemv_bandwidth"]["bytes_per_s"]

    def left(self) -> float:
        return math.inf if self.args.deadline is None else self.args.deadline - time.time()

    def fits(self) -> bool:
        return self.left() > (self.longest or FIRST_ROW_S) + RESERVE_S

    def add(self, row: dict, started: float) -> None:
        self.longest = max(self.longest, time.perf_counter() - started)
        self.rows.append(row)
        print({k: v for k, v in row.items() if k != "profile"}, flush=True)
        self.save()

    def skip(self, **row) -> None:
        self.rows.append(dict(row, error=f"skipped: {self.left():.0f} s left before the deadline"))
        self.save()

    def save(self) -> None:
        payload = {"env": self.env, "args": {**vars(self.args), "out": str(self.args.out)},
                   "rows": self.rows}
        harness.save(self.args.name, payload, markdown(self.rows, self.env, self.args),
                     self.args.out)

    def engine(self, cfg, params, par: Parallel, budget: int, dtype: str = "bfloat16"):
        par.check(cfg)
        return parallel.build(cfg, params, par, budget, self.args.kernels, dtype)

    def decode(self, spec: str) -> None:
        a = self.args
        label, cfg = model_config(spec)
        params = host_params(cfg, ("bfloat16",))["bfloat16"]
        for name in ["1"] * ("decode" in a.part) + a.layouts:  # (a profile needs collectives)
            lname, par = layout(name)
            base = dict(part="decode", arch=label, layout=lname, ep=par.ep, tp=par.tp,
                        devices=par.devices)
            if not self.fits():
                self.skip(**base, batch=",".join(map(str, a.batch)))
                continue
            t0, engine = time.perf_counter(), None
            try:
                engine = self.engine(cfg, params, par, a.prompt_len + a.new_tokens)
                held = device_bytes(engine)
            except Exception as e:  # noqa: BLE001 (the row says so)
                self.add(dict(base, batch="build", error=harness.error_line(e)), t0)
            for i, batch in enumerate(a.batch if engine is not None else []):
                if not self.fits():
                    self.skip(**base, batch=",".join(map(str, a.batch[i:])))
                    break
                t0 = t0 if i == 0 else time.perf_counter()  # the first row counts the build
                self.add({**base, "batch": batch, **self.decode_row(engine, cfg, par, held, batch)}, t0)
            del engine
            gc.collect()

    def decode_row(self, engine, cfg, par: Parallel, held: dict, batch: int) -> dict:
        a, row = self.args, {}
        try:
            if "decode" in a.part:
                row = parallel.timing(engine, batch, a.prompt_len, a.new_tokens, a.reps)
                fl = floor_ms(held, cfg, par, batch, a.prompt_len + a.new_tokens / 2, self.bw)
                row.update(floor_ms=fl, floor_ratio=row["decode_ms_per_token"] / fl)
            if "profile" in a.part and par.is_parallel:
                row["profile"] = profile(engine, batch, a.prompt_len, a.new_tokens)
        except Exception as e:  # noqa: BLE001
            row["error"] = harness.error_line(e)
        return dict(row, bytes_per_device=sum(held.values()), expert_bytes=held["experts"])

    def check(self, spec: str) -> None:
        """fp32 and bf16 engines of every layout against the one-device engine in fp32."""
        a = self.args
        label, cfg = model_config(spec.partition(":")[0], a.check_layers)
        params = host_params(cfg, ("float32", "bfloat16"))
        budget, reference = a.check_prompt_len + 16, None
        for name in ["1"] + a.layouts:
            lname, par = layout(name)
            row = dict(part="check", arch=label, layout=lname, ep=par.ep, tp=par.tp,
                       devices=par.devices)
            if not self.fits():
                self.skip(**row)
                continue
            t0 = time.perf_counter()
            try:
                for dtype in ("float32", "bfloat16"):
                    engine = self.engine(cfg, params[dtype], par, budget, dtype)
                    with jax.default_matmul_precision("highest" if dtype == "float32" else None):
                        got = moe.check(engine, cfg.vocab_size, a.check_prompt_len)
                    del engine
                    gc.collect()
                    if name == "1" and dtype == "float32":
                        reference = got
                    if reference is None:
                        raise RuntimeError("no reference: the one-device fp32 engine failed")
                    row[dtype] = agreement(got, reference)
            except Exception as e:  # noqa: BLE001
                row["error"] = harness.error_line(e)
            self.add(row, t0)


def agreement(got, want) -> dict:
    """moe.agreement (largest logit difference / largest logit, argmax agreement, greedy tokens
    agreeing) + the logits' relative L2 distance and whether every token is equal."""
    (lg, tg), (lw, tw) = got, want
    return dict(moe.agreement(got, want), tokens_equal=bool(np.array_equal(tg, tw)),
                rel_l2=float(np.linalg.norm(lg - lw) / np.linalg.norm(lw)))


# ----------------------------------------------------------------------------- report

def markdown(rows: list[dict], env: dict, a) -> str:
    bw = env["gemv_bandwidth"]
    lines = [f"# MoE expert and tensor parallelism (random weights, XLA kernels: {a.kernels})", "",
             f"{env.get('device')} x {env.get('device_count')}, JAX {env.get('jax')}, commit "
             f"{env.get('git_commit')}, XLA_FLAGS={env.get('xla_flags') or '-'}; prompt "
             f"{a.prompt_len}, {a.new_tokens} new tokens, medians of {a.reps}; bf16 GEMV ceiling "
             f"{bw['bytes_per_s'] / 1e12:.3f} TB/s {bw['shape']}.", ""]
    for part, table in (("decode", decode_table), ("check", check_table)):
        chosen = [r for r in rows if r["part"] == part]
        lines += table(chosen) if chosen else []
    return "\n".join(lines + ["", harness.versions_line(env) + " What each column means: "
                              "benchmarks/moe_parallel.py."]) + "\n"


def decode_table(rows: list[dict]) -> list[str]:
    """Decode rows; 'x 1 device': this layout's speed-up over the one-device engine."""
    one = {(r["arch"], r["batch"]): r["decode_ms_per_token"] for r in rows
           if r["devices"] == 1 and "decode_ms_per_token" in r}
    lines = ["## Decode (bf16)", "", "all-to-all / all-reduce: GPU 0's collective kernel time "
             "per decode step (kernels per step) from a profile; span: the step's GPU time there.",
             "", "| arch | layout | devices | batch | decode ms/token | tokens/s | x 1 device | "
             "floor ms | x floor | all-to-all us (n) | all-reduce us (n) | span us | GB/device | "
             "compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['arch']} | {r['layout']} | {r['devices']} | {r['batch']} |"
        if "decode_ms_per_token" not in r and "profile" not in r:
            lines.append(f"{head} {r.get('error', '-')} |" + " |" * 9)
            continue
        ms = r.get("decode_ms_per_token")
        base = one.get((r["arch"], r["batch"]))
        p = r.get("profile", {})
        cells = [f"{ms:.3f}" if ms else r.get("error", "-"),
                 f"{r['tokens_per_s']:.0f}" if ms else "-",
                 f"{base / ms:.2f}x" if ms and base else "-",
                 f"{r['floor_ms']:.3f}" if ms else "-", f"{r['floor_ratio']:.2f}" if ms else "-",
                 collective(p, "all_to_all"), collective(p, "all_reduce"),
                 f"{p['span_us']:.0f}" if "span_us" in p else p.get("error", "-"),
                 f"{r['bytes_per_device'] / 1e9:.2f}", f"{r['compile_s']:.0f}" if ms else "-"]
        lines.append(f"{head} " + " | ".join(cells) + " |")
    return lines + [""]


def collective(p: dict, kind: str) -> str:
    return f"{p[kind + '_us']:.0f} ({p[kind + '_count']:.0f})" if kind + "_us" in p else "-"


def check_table(rows: list[dict]) -> list[str]:
    lines = ["## Correctness", "", "Against the one-device engine in fp32 (full matmul "
             "precision), 8 prompts: greedy tokens (16 each) equal, and agreeing before each "
             "row's first difference; last-position logits: largest difference / largest logit "
             "(fp32), relative L2 distance (bf16).", "",
             "| arch | layout | fp32 tokens equal | fp32 logit diff | bf16 logits rel. L2 | "
             "bf16 same argmax | bf16 tokens agreeing |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['arch']} | {r['layout']} |"
        if "float32" not in r or "bfloat16" not in r:
            lines.append(f"{head} {r.get('error', '-')} | | | | |")
            continue
        f, b = r["float32"], r["bfloat16"]
        lines.append(f"{head} {'yes' if f['tokens_equal'] else 'NO'} ({f['tokens_agreeing']}) | "
                     f"{f['logit_diff']:.1e} | {b['rel_l2']:.4f} | {b['same_argmax']:.2f} | "
                     f"{b['tokens_agreeing']} |")
    return lines + [""]


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default=",".join(PARTS), help=f"comma-separated, from {PARTS}")
    p.add_argument("--arch", default="mixtral-8l,qwen3-30b-a3b",
                   help="comma-separated NAME or NAME:LAYERS, from " + ", ".join(ARCHS))
    p.add_argument("--layouts", default=None, help="epN, tpN, epNtpM (default: by device count, "
                   f"{LAYOUTS}); the one-device engine always runs first")
    p.add_argument("--batch", type=harness.ints, default=[1, 8, 64, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--check-layers", type=int, default=4, help="layers of the check's models")
    p.add_argument("--check-prompt-len", type=int, default=32)
    p.add_argument("--kernels", default="xla", choices=tuple(parallel.KERNELS))
    p.add_argument("--deadline", type=float, default=None,
                   help="UNIX time to finish by: rows it leaves no time for say so")
    p.add_argument("--smoke", action="store_true", help="tiny architectures (a CPU run)")
    p.add_argument("--name", default=None, help="results file name (default moe_parallel-PARTS-ARCHS)")
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE)
    a = p.parse_args(argv)
    a.part, a.arch = ([x for x in text.split(",") if x] for text in (a.part, a.arch))
    unknown = (set(a.part) - set(PARTS)) | ({s.partition(":")[0] for s in a.arch} - set(ARCHS))
    if unknown or not a.part:
        p.error(f"unknown {sorted(unknown)}; parts: {', '.join(PARTS)}; archs: {', '.join(ARCHS)}")
    n = jax.device_count()
    default = LAYOUTS[4] if n >= 4 else LAYOUTS[2] if n >= 2 else ""
    a.layouts = [x for x in (a.layouts or default).split(",") if x]
    a.name = a.name or "moe_parallel-{}-{}".format(
        "_".join(a.part), "_".join(s.replace(":", "-L") for s in a.arch))
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    env = {**harness.environment(), "gemv_bandwidth": harness.gemv_bandwidth(),
           "nccl": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}
    bench, t0 = Bench(a, env), time.perf_counter()
    print(f"{env['device']} x {env['device_count']}; layouts {a.layouts}; parts {a.part}",
          flush=True)
    for spec in a.arch:
        if "check" in a.part:
            bench.check(spec)
        if "decode" in a.part or "profile" in a.part:
            bench.decode(spec)
    bench.save()
    print(markdown(bench.rows, env, a), f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
