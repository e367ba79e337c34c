"""End-to-end decode of one architecture served several ways, in the same run, on a GPU:
XLA path vs Pallas kernels (replace_with_kernel_inject), bf16 vs INT8 / INT4 weights.

    python benchmarks/decode_variants.py [--arch llama3-8b] [--batch-sizes 1,8]
        [--variants bf16-xla,bf16-pallas,int8-xla,int8-pallas,int4-pallas] [--prompt-len 128]

Random weights (the built-in architecture); decode ms/token = (T(n) - T(1)) / (n - 1), medians.
Each variant's floor is the bytes one step must read (its own weights, and K/V up to the mean
context at its cache's bytes per element) / the bf16 GEMV bandwidth measured in the same run. Speedups are against the first variant; greedy tokens are compared with it too
(quantized weights change the model, so they are expected to drift; the kernel path on the same
weights should not). Writes results/decode_variants[-SUFFIX].{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.decode_latency import kv_bytes_per_step, weight_bytes_per_step  # noqa: E402

VARIANTS = {  # name -> init_inference keywords
    "bf16-xla": {},
    "bf16-pallas": {"replace_with_kernel_inject": True},
    "int8-xla": {"quant": {"bits": 8}},
    "int8-pallas": {"quant": {"bits": 8}, "replace_with_kernel_inject": True},
    "int8g128-pallas": {"quant": {"bits": 8, "group_size": 128}, "replace_with_kernel_inject": True},
    "int4-pallas": {"quant": {"bits": 4, "group_size": 128}, "replace_with_kernel_inject": True},
    "attn-pallas": {"replace_with_kernel_inject": True, "kernels": {"linear": "xla"}},
    "attn-pallas-kv8": {"replace_with_kernel_inject": True, "kernels": {"linear": "xla"},
                        "kv_cache_dtype": "int8"},
    "int8-xla-attn-pallas": {"quant": {"bits": 8}, "replace_with_kernel_inject": True,
                             "kernels": {"linear": "xla"}},
    "bf16-pallas-kv8": {"replace_with_kernel_inject": True, "kv_cache_dtype": "int8"},
    "int8-pallas-kv8": {"quant": {"bits": 8}, "replace_with_kernel_inject": True,
                        "kv_cache_dtype": "int8"},
    # int8-pallas with one-row steps on the int8 gemv instead of quant_matmul (an experiment:
    # sets dsjax.pallas_ops.INT8_GEMV_ROWS for this variant only)
    "int8-pallas-gemv1": {"quant": {"bits": 8}, "replace_with_kernel_inject": True,
                          "_int8_gemv_rows": 1},
    # bf16-pallas with the LayerNorm fused into the one-row gemv too (an experiment: sets
    # dsjax.pallas_ops.GEMV_FUSED_NORMS for this variant only)
    "bf16-pallas-lnfused": {"replace_with_kernel_inject": True,
                            "_gemv_fused_norms": ("rmsnorm", "layernorm")},
    # bf16-pallas with decode-attention splits of at least 256 cache slots (an experiment: sets
    # pallas_kernels.decode_attention.MIN_SPLIT_KEYS; a 256-slot cache then runs one split,
    # normalized in the kernel, no combine)
    "bf16-pallas-split256": {"replace_with_kernel_inject": True, "_min_split_keys": 256},
    "bf16-pallas-ln-split256": {"replace_with_kernel_inject": True, "_min_split_keys": 256,
                                "_gemv_fused_norms": ("rmsnorm", "layernorm")},
}


_ROUTING_DEFAULTS: dict = {}  # each constant's value as the module set it, read before any change


def _routing_constants() -> dict:
    """Variant key -> (module, name) of the routing constant it sets for that variant alone."""
    from dsjax import pallas_ops
    from pallas_kernels import decode_attention

    return {"_int8_gemv_rows": (pallas_ops, "INT8_GEMV_ROWS"),
            "_gemv_fused_norms": (pallas_ops, "GEMV_FUSED_NORMS"),
            "_min_split_keys": (decode_attention, "MIN_SPLIT_KEYS")}


def bench_variant(arch, name, batch_sizes, prompt_len, new_tokens, reps, bandwidth,
                  first=None) -> list[dict]:
    """One variant's rows; each printed as it is measured, against `first` ({batch: row} of the
    first variant), so that a run cut short still shows its ratios and token agreement."""
    import jax

    import dsjax

    kw = dict(VARIANTS[name])
    jax.clear_caches()  # the routing constants are read while tracing: trace afresh
    for key, (module, attr) in _routing_constants().items():
        default = _ROUTING_DEFAULTS.setdefault(key, getattr(module, attr))
        setattr(module, attr, kw.pop(key, default))
    engine = dsjax.init_inference(arch, dtype="bf16", max_out_tokens=prompt_len + new_tokens,
                                  progress=False, **kw)
    wbytes = weight_bytes_per_step(engine)
    rows = []
    for bs in batch_sizes:
        prompts = np.random.default_rng(bs).integers(0, engine.config.vocab_size,
                                                     (bs, prompt_len)).tolist()

        def run(n):
            return engine.generate(prompts, max_new_tokens=n, eos_token_id=[])

        t0 = time.perf_counter()
        tokens = run(new_tokens).tokens
        compile_s = time.perf_counter() - t0
        timing = common.decode_timing(run, new_tokens, reps)
        # the K/V a step must read: the mean context, at the cache's bytes per element
        itemsize = 1 + 4 / engine.config.dim_head if "kv_cache_dtype" in VARIANTS[name] else 2
        kv = kv_bytes_per_step(engine.config, bs, prompt_len + new_tokens // 2, itemsize)
        rows.append({"variant": name, "arch": arch, "batch": bs, "prompt_len": prompt_len,
                     "new_tokens": new_tokens, "weight_bytes": wbytes, "kv_bytes_per_step": kv,
                     "floor_ms": (wbytes + kv) / bandwidth * 1e3, "compile_s": compile_s, **timing,
                     "tokens": np.asarray(tokens).tolist()})
        print(_line(rows[-1], (first or {}).get(bs, rows[-1])), flush=True)
    engine = None  # free the weights before the next variant
    gc.collect()
    jax.clear_caches()
    return rows


HEADER = ("| variant | batch | decode ms/token | weight GB | KV GB | floor ms | over floor | speedup vs "
          "first | tokens equal to first (before first difference) | prefill+1 ms | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _line(r: dict, base: dict) -> str:
    same = np.asarray(r["tokens"]) == np.asarray(base["tokens"])
    agree = [int(np.argmin(x)) if not x.all() else len(x) for x in same]
    return (f"| {r['variant']} | {r['batch']} | {r['decode_ms_per_token']:.3f} | "
            f"{r['weight_bytes'] / 1e9:.2f} | {r['kv_bytes_per_step'] / 1e9:.3f} | {r['floor_ms']:.3f} | "
            f"{r['decode_ms_per_token'] / r['floor_ms']:.2f}x | "
            f"{base['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x | {agree} | "
            f"{r['t_prefill_s'] * 1e3:.1f} | {r['compile_s']:.1f} |")


def report(args, env: dict, bw: dict, rows: list[dict], batch_sizes) -> str:
    ok = [r for r in rows if "error" not in r]
    base = {b: next((r for r in ok if r["batch"] == b), None) for b in batch_sizes}
    lines = [_line(r, base[r["batch"]]) for b in batch_sizes for r in ok if r["batch"] == b]
    lines += [f"| {r['variant']} | FAILED: {r['error'][:200]} |" for r in rows if "error" in r]
    end = bw.get("bytes_per_s_at_end")
    return (f"# End-to-end decode: {args.arch}, XLA vs Pallas kernels, bf16 vs quantized weights\n\n"
            f"{env['device']}, JAX {env['jax']}, commit {env['git_commit']}, {env['date']}. "
            f"Random weights, bf16 compute, {args.prompt_len} prompt + {args.new_tokens} new tokens, "
            f"greedy. Decode ms/token = (T({args.new_tokens}) - T(1)) / {args.new_tokens - 1}, "
            f"medians of {args.reps}. Floor = (the variant's weight bytes + K/V bytes at the mean "
            f"context) / {bw['bytes_per_s'] / 1e12:.2f} TB/s (bf16 GEMV measured at the start; "
            + (f"{end / 1e12:.2f} at the end" if end else "the run did not reach its end")
            + f").\n\nCommand: `python benchmarks/decode_variants.py --arch {args.arch} --variants "
            f"{args.variants} --batch-sizes {args.batch_sizes} --prompt-len {args.prompt_len}"
            f"{f' --suffix {args.suffix}' if args.suffix else ''}`\n\n{HEADER}\n"
            + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama3-8b")
    p.add_argument("--variants", default="bf16-xla,bf16-pallas,int8-xla,int8-pallas,int4-pallas")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--suffix", default="", help="results/decode_variants-SUFFIX.{json,md}")
    args = p.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    env = common.environment()
    bw = common.gemv_bandwidth()
    print(f"{env}\nbf16 GEMV ceiling: {bw['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    print(HEADER, flush=True)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    name = "decode_variants" + (f"-{args.suffix}" if args.suffix else "")
    outs = [common.RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    rows = []

    def save() -> str:
        md = report(args, env, bw, rows, batch_sizes)
        common.write(name, {"env": env, "gemv_bandwidth": bw, "args": vars(args), "rows": rows},
                     md, outs)
        return md

    for variant in args.variants.split(","):
        try:
            first = {}
            for r in rows:
                if "error" not in r:
                    first.setdefault(r["batch"], r)
            rows += bench_variant(args.arch, variant, batch_sizes, args.prompt_len,
                                  args.new_tokens, args.reps, bw["bytes_per_s"], first)
        except Exception as e:  # record the failure, keep the other variants
            print(f"{variant} FAILED: {type(e).__name__}: {e}", flush=True)
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {e}"})
        save()  # after each variant: a run cut short keeps what it measured
    bw["bytes_per_s_at_end"] = common.gemv_bandwidth()["bytes_per_s"]
    print("\n" + save())


if __name__ == "__main__":
    main()
