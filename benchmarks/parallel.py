"""Tensor and pipeline parallelism of one architecture on 1..4 GPUs, in one run.

    python benchmarks/parallel.py [--arch llama3-8b] [--part latency,throughput,copies]
        [--kernels xla,pallas] [--prompt-len 128] [--new-tokens 32] [--micro-batch 8]

kernels: each layout runs once per kernel set, "xla" (XLA's GEMMs and attention) and "pallas"
  (replace_with_kernel_inject: K-major weight slices, the decode gemv with its RMSNorm fused,
  decode attention); rows of the Pallas set are named "... pallas".
latency: bs-1 decode ms/token at TP 1/2/4 (and the all-reduce overhead per layer it implies).
slices (one GPU is enough): bs-1 decode ms/token of one device's TP-T slice run as a one-device
  model (tensor.local_config: H/T heads, the MLP and vocabulary / T) for T in --tp-sizes: what
  a TP-T token costs a device without any collective, the lower bound of its latency.
throughput: decode tokens/s at PP 2/4 with M = P micro-batches of `micro-batch` sequences,
  against the same pipeline with one micro-batch (of the same size, and of the same total
  batch) and against TP at the same GPU count and total batch.
copies: whether the stage-stacked [P, ...] layer arrays bring back per-step weight copies
  (DESIGN.md): weight-sized copies in the compiled decode program, and the ms/token of a
  one-micro-batch pipeline (which reads the same weights per token as one GPU) against TP1.
Random weights (the built-in architecture, bf16) made once on the host; every layout is an
engine built from them (dsjax.engine.build_engine with the layout and the kernel set's
KernelPolicy), and its logits on a probe prompt are compared with one device's in fp32 (XLA,
full matmul precision). Decode ms/token = (P50 T(n) - P50 T(1)) / (n - 1) (dsjax.bench's
measure). Floors: the bytes one device reads per tick (its weight slices) x ticks per token /
the bf16 GEMV bandwidth measured here.
Writes results/parallel.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsjax  # noqa: E402
from benchmarks import harness  # noqa: E402
from dsjax import presets  # noqa: E402
from dsjax.config import InferenceConfig  # noqa: E402
from dsjax.engine import build_engine  # noqa: E402
from dsjax.parallel import tensor  # noqa: E402
from dsjax.parallel.mesh import Parallel  # noqa: E402
from dsjax.policy import KernelPolicy  # noqa: E402

KERNELS = {"xla": KernelPolicy(), "pallas": KernelPolicy.pallas()}  # --kernels names


def build(cfg, params, par: Parallel, budget: int, kernels: str = "xla", dtype: str = "bfloat16"):
    """An engine of the given layout and kernel set on the shared host weights (params: nested
    host arrays, not consumed; cast to dtype on the device); params=None: random weights of cfg
    made on the device."""
    icfg = InferenceConfig(dtype=dtype, max_out_tokens=budget, kernels=KERNELS[kernels])
    if params is None:
        return dsjax.init_inference(cfg, dtype=icfg.jnp_dtype, max_out_tokens=budget,
                                    kernels=icfg.kernels, progress=False)
    if not par.is_parallel:  # one device: the engine takes its params placed, in its dtype
        params = jax.tree.map(lambda v: jnp.asarray(v, icfg.jnp_dtype), params)
    return build_engine(cfg, params, inference=icfg, parallel=par)


def device_bytes(engine) -> tuple[int, int, int]:
    """Bytes of parameters on the first device (its slices); of those, an untied embedding
    table's (looked up, not read, per step) and the LM head's."""
    dev = jax.devices()[0]
    on_dev = lambda tree: sum(s.data.nbytes for a in jax.tree.leaves(tree)  # noqa: E731
                              for s in getattr(a, "addressable_shards", []) if s.device == dev)
    tied = engine.config.tie_word_embeddings
    table = 0 if tied else on_dev(engine.params["embed"])
    return on_dev(engine.params), table, on_dev(engine.params["embed" if tied else "lm_head"])


def floor_ms(row: dict, bytes_per_s: float) -> float:
    """Each device reads its layer slices once per tick and the LM head on ticks where the last
    stage finishes a micro-batch (every tick with M >= P, M of every P ticks otherwise); a token
    step of the batch takes pp ticks. An untied embedding table is looked up, not read."""
    P, M = row["pp"], row["micro_batches"]
    layers = row["bytes_per_device"] - row["embedding_bytes"] - row["head_bytes"]
    return (P * layers + min(M, P) * row["head_bytes"]) / bytes_per_s * 1e3


def timing(engine, batch: int, prompt_len: int, new_tokens: int, reps: int) -> dict:
    """dsjax.bench's measure after a compiling call; tokens/s of the decode steps alone."""
    prompts = harness.random_prompts(engine.config.vocab_size, batch, prompt_len)
    run = lambda n: engine.generate(prompts, max_new_tokens=n, eos_token_id=[]).tokens  # noqa: E731
    t0 = time.perf_counter()
    run(new_tokens)
    compile_s = time.perf_counter() - t0
    out = harness.timing(harness.time_generate(run, new_tokens, warmup=1, reps=reps), new_tokens)
    out.update(batch=batch, compile_s=compile_s, tokens_per_s=batch / out["decode_ms_per_token"] * 1e3)
    return out


_COPY = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* copy\(")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "s8": 1, "u8": 1, "pred": 1}


def large_copies(engine, min_bytes: int, prompt_len: int) -> list[int]:
    """Sizes of the copies of at least min_bytes in the compiled generate program."""
    sizes = []
    for dtype, dims in _COPY.findall(harness.compiled_generate(engine, prompt_len).as_text()):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) * _BYTES.get(dtype, 4)
        if n >= min_bytes:
            sizes.append(n)
    return sorted(sizes, reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama3-8b")
    p.add_argument("--part", default="latency,throughput,copies")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--kernels", default="xla,pallas", help="kernel sets, each run on every layout")
    p.add_argument("--tp-sizes", default="1,2,4",
                   help="tensor-parallel degrees (latency and slices parts)")
    p.add_argument("--pp-sizes", default="2,4", help="pipeline degrees (throughput part)")
    p.add_argument("--layers", type=int, help="override the architecture's layer count")
    p.add_argument("--suffix", default="")
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    a = p.parse_args()
    parts = a.part.split(",")
    budget = a.prompt_len + a.new_tokens
    env = {**harness.environment(), "gemv_bandwidth": harness.gemv_bandwidth(),
           "devices": jax.device_count(), "nccl_proto": os.environ.get("NCCL_PROTO", "")}
    bw = env["gemv_bandwidth"]["bytes_per_s"]
    cfg = presets.model_config(a.arch)
    if a.layers:  # the same layers, fewer of them: a quicker look at per-layer costs
        cfg = dataclasses.replace(cfg, num_layers=a.layers)
    t0 = time.perf_counter()
    params = harness.host_random_params(cfg)
    print(f"host weights {sum(v.nbytes for v in jax.tree.leaves(params)) / 1e9:.1f} GB in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    probe = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 64))
    with jax.default_matmul_precision("highest"):  # what every layout's bf16 logits approximate
        exact = build(cfg, params, Parallel(), budget, "xla", dtype="float32")
        reference = np.asarray(exact(probe), np.float32)
    del exact
    gc.collect()

    def measure(name, par, batches, kernels, slice_of=None):
        """slice_of=T: one device's TP-T slice as a one-device model (par is then TP1)."""
        try:
            par.check(cfg)
            par.mesh()
        except ValueError as e:
            print(f"skip {name}: {e}", flush=True)
            return None
        t = time.perf_counter()
        if slice_of:
            engine = build(tensor.local_config(cfg, slice_of), None, par, budget, kernels)
        else:
            engine = build(cfg, params, par, budget, kernels)
        wb, table, head = device_bytes(engine)
        print(f"{name}: built in {time.perf_counter() - t:.0f} s, {wb / 1e9:.2f} GB per device",
              flush=True)
        err = None  # a slice is another model: nothing to compare its logits with
        if not slice_of:
            logits = np.asarray(engine(probe), np.float32)
            err = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))
            print(f"  {name}: logits vs one device's in fp32, rel. L2 {err:.4f}", flush=True)
        out = []
        for B in batches:
            r = timing(engine, B, a.prompt_len, a.new_tokens, a.reps)
            r.update(name=name, tp=par.tp, pp=par.pp, micro_batches=par.micro_batches, logits_rel_l2=err,
                     gpus=par.devices, bytes_per_device=wb, embedding_bytes=table, head_bytes=head,
                     kernels=kernels, slice_of=slice_of)
            r["floor_ms"] = floor_ms(r, bw)
            r["floor_ratio"] = r["decode_ms_per_token"] / r["floor_ms"]
            print(f"  {name} B={B}: {r['decode_ms_per_token']:.2f} ms/token "
                  f"({r['floor_ratio']:.2f}x floor), {r['tokens_per_s']:.0f} tok/s, "
                  f"compile {r['compile_s']:.0f} s", flush=True)
            out.append(r)
            rows.append(r)
        return engine, out

    def save():  # after every layout, so that a run cut short keeps what it measured
        md = report(rows, env, a, cfg.num_layers)
        harness.save(f"parallel{a.suffix}", {"env": env, "args": {**vars(a), "out": str(a.out)},
                                             "rows": rows}, md, a.out)
        return md

    b = a.micro_batch
    tps = list(map(int, a.tp_sizes.split(",")))
    layouts = []  # (name, layout, batch sizes, check copies, slice of TP-T)
    if "latency" in parts:
        layouts += [(f"TP{tp}", Parallel(tp=tp), [1] + [tp * b] * (tp > 1 and "throughput" in parts),
                     tp == 1 and "copies" in parts, None) for tp in tps]
    if "slices" in parts:
        layouts += [(f"TP{tp} slice, 1 GPU", Parallel(), [1], False, tp) for tp in tps if tp > 1]
    for P in map(int, a.pp_sizes.split(",")):
        if "throughput" in parts or "copies" in parts:
            layouts.append((f"PP{P} M=1", Parallel(pp=P, micro_batches=1),
                            [b] + [P * b] * ("throughput" in parts), "copies" in parts, None))
        if "throughput" in parts:
            layouts.append((f"PP{P} M={P}", Parallel(pp=P, micro_batches=P), [P * b], False, None))
    for name, par, batches, copies, slice_of in layouts:
        for kernels in a.kernels.split(","):
            label = name + (" pallas" if kernels == "pallas" else "")
            got = measure(label, par, batches, kernels, slice_of)
            if got and copies:
                env[f"copies {label}"] = large_copies(got[0], 8 << 20, a.prompt_len)
            del got
            gc.collect()
            save()
    print(save())


def report(rows, env, a, layers: int) -> str:
    arch = a.arch + (f", {a.layers} of its layers" if getattr(a, "layers", None) else "")
    lines = [f"# Tensor and pipeline parallelism, {arch} (bf16, random weights)", "",
             f"{env.get('device', '')} x {env['devices']}, JAX {env.get('jax')}, commit "
             f"{env.get('git_commit')}, XLA_FLAGS={env.get('xla_flags') or '-'}, NCCL_PROTO="
             f"{env.get('nccl_proto') or '-'}; prompt {a.prompt_len}, {a.new_tokens} new tokens, medians of "
             f"{a.reps}; bf16 GEMV ceiling {env['gemv_bandwidth']['bytes_per_s'] / 1e12:.2f} TB/s.",
             "", "logits rel. L2: a 64-token prompt's bf16 logits against those of one device in "
             "fp32 at full matmul precision, on the same weights (bf16 rounding differs with the "
             "reduction order, so layouts differ a little; a broken layout gives ~1; a slice is "
             "another model: '-').",
             "", "| layout | GPUs | batch | decode ms/token | tokens/s | floor ms | x floor | "
             "GB/device | compile s | logits rel. L2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['gpus']} | {r['batch']} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['floor_ms']:.2f} | {r['floor_ratio']:.2f} | "
                     f"{r['bytes_per_device'] / 1e9:.2f} | {r['compile_s']:.0f} | "
                     f"{'-' if r.get('logits_rel_l2') is None else format(r['logits_rel_l2'], '.4f')} |")
    by = {(r["name"], r["batch"]): r for r in rows}
    lines += ["", "## Ratios", ""]
    ms = lambda name, batch=1: by[(name, batch)]["decode_ms_per_token"] if (name, batch) in by else None  # noqa: E731
    if ms("TP1") and ms("TP1 pallas"):
        lines.append(f"- TP1 pallas / TP1 (XLA): {ms('TP1 pallas') / ms('TP1'):.2f}")
    goals = {2: "0.6", 4: "0.4"}  # the latency goals
    b = a.micro_batch
    for sfx in dict.fromkeys(" pallas" if r.get("kernels") == "pallas" else "" for r in rows):
        tp1 = ms("TP1" + sfx)
        for tp in sorted({r.get("slice_of") or r["tp"] for r in rows}):
            t, sl = ms(f"TP{tp}{sfx}"), ms(f"TP{tp} slice, 1 GPU{sfx}")
            if tp1 and t and tp > 1:
                lines.append(f"- TP{tp}{sfx} bs-1 latency / TP1{sfx}: {t / tp1:.2f} (goal "
                             f"{goals.get(tp, '-')}); time beyond TP1/{tp}, per collective "
                             f"({2 * layers + 2} a token: 2 a layer, embedding, logits): "
                             f"{(t - tp1 / tp) / (2 * layers + 2) * 1e3:.1f} us")
            if tp1 and sl:
                lines.append(f"- TP{tp}{sfx} slice on one GPU / TP1{sfx}: {sl / tp1:.2f} (a TP{tp} "
                             f"token's cost to one device without collectives; goal for TP{tp} "
                             f"with them: {goals.get(tp, '-')})")
            if t and sl:
                lines.append(f"- TP{tp}{sfx} minus its slice: {(t - sl) * 1e3:.0f} us a token "
                             "(collectives and the waits for the slowest device)")
        for P in sorted({r["pp"] for r in rows if r["pp"] > 1}):
            mb, m1, m1big, tpP = (by.get((f"PP{P} M={P}{sfx}", P * b)), by.get((f"PP{P} M=1{sfx}", b)),
                                  by.get((f"PP{P} M=1{sfx}", P * b)), by.get((f"TP{P}{sfx}", P * b)))
            if mb and m1:
                lines.append(f"- PP{P}{sfx}, M={P} x {b} vs one micro-batch of {b}: "
                             f"{mb['tokens_per_s'] / m1['tokens_per_s']:.2f}x tokens/s (goal at PP4: 3x)")
            if mb and m1big:
                lines.append(f"- PP{P}{sfx}, M={P} x {b} vs one micro-batch of {P * b} (same batch): "
                             f"{mb['tokens_per_s'] / m1big['tokens_per_s']:.2f}x tokens/s")
            if mb and tpP:
                lines.append(f"- PP{P}{sfx} micro-batched vs TP{P}, batch {P * b}: "
                             f"{mb['tokens_per_s'] / tpP['tokens_per_s']:.2f}x tokens/s")
    for key in sorted(k for k in env if k.startswith("copies")):
        lines.append(f"- weight-sized copies (>= 8 MiB) in the compiled generate program, "
                     f"{key[7:]}: {len(env[key])} {[round(x / 2**20) for x in env[key][:6]]} MiB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
