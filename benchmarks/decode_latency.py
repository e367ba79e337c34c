"""Decode latency of dsjax (XLA path) against HF transformers eager, in the same run, on a GPU.

    python benchmarks/decode_latency.py [--archs gpt2-1.3b,llama3-8b] [--batch-sizes 1,8]

For each architecture the HF torch model is built on the GPU with random bf16 weights and
converted into dsjax through the in-memory converter, so both run the SAME weights. Each system
generates `prompt-len` + `new-tokens` greedily (no early stop); the decode time per token is
(T(new_tokens) - T(1)) / (new_tokens - 1), which removes the prompt phase, and is compared with
the weight-read floor: bytes of the weights one decode step reads / the measured bf16 GEMV
bandwidth. Writes results/decode_latency.{json,md} (and copies under $OUT when set).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from dsjax.bench import kv_bytes_per_step, weight_bytes_per_step  # noqa: E402, F401


def time_dsjax(engine, prompts, new_tokens: int, reps: int) -> dict:
    import time

    def run(n):
        return engine.generate(prompts, max_new_tokens=n, eos_token_id=[])

    t0 = time.perf_counter()
    run(new_tokens)
    compile_s = time.perf_counter() - t0
    return {"compile_s": compile_s, **common.decode_timing(run, new_tokens, reps),
            "tokens": run(new_tokens).tokens}


def time_hf(model, prompts, new_tokens: int, reps: int) -> dict:
    import torch

    ids = torch.tensor(np.asarray(prompts), device=model.device)

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return {**common.decode_timing(run, new_tokens, reps),
            "tokens": run(new_tokens)[:, ids.shape[1]:].cpu().numpy()}


def compare_logits(engine, hf_model, prompt_len: int) -> dict:
    """dsjax bf16 and HF bf16 logits for one prompt, each against HF in float32 (relative L2 of
    the centred logits, argmax agreement). With random weights the top logits are nearly tied,
    so bf16 rounding alone flips greedy tokens: what matters is that dsjax is as close to the
    float32 reference as HF's own bf16 run is. Leaves hf_model in float32."""
    import torch

    ids = np.random.default_rng(123).integers(0, engine.config.vocab_size, (1, prompt_len))
    tids = torch.tensor(ids, device=hf_model.device)
    ours = np.asarray(engine(ids))[0]
    with torch.no_grad():
        hf_bf16 = hf_model(tids).logits[0].float().cpu().numpy()
        ref = hf_model.float()(tids).logits[0].cpu().numpy()
    centred = np.linalg.norm(ref - ref.mean(-1, keepdims=True))
    top2 = np.sort(ref, axis=-1)[:, -2:]
    out = {"median_top2_gap_over_logit_std": float(np.median(
        (top2[:, 1] - top2[:, 0]) / (ref - ref.mean(-1, keepdims=True)).std(-1)))}
    for name, x in (("dsjax_bf16", ours), ("hf_bf16", hf_bf16)):
        out[name] = {"rel_l2_vs_fp32": float(np.linalg.norm(x - ref) / centred),
                     "argmax_agreement_vs_fp32": float((x.argmax(-1) == ref.argmax(-1)).mean())}
    return out


def bench_arch(arch: str, batch_sizes, prompt_len: int, new_tokens: int, reps: int, hf_reps: int,
               bandwidth: float, skip_hf: bool) -> list[dict]:
    import torch

    import dsjax
    from dsjax import presets

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of this script
    hf_model = presets.hf_torch_model(arch, seed=0, dtype=torch.bfloat16, device=device)
    engine = dsjax.init_inference(hf_model, dtype="bf16", max_out_tokens=prompt_len + new_tokens,
                                  progress=False)
    cfg = engine.config
    wbytes = weight_bytes_per_step(engine)
    rows = []
    for bs in batch_sizes:
        rng = np.random.default_rng(bs)
        prompts = rng.integers(0, cfg.vocab_size, (bs, prompt_len)).tolist()
        ours = time_dsjax(engine, prompts, new_tokens, reps)
        floor_ms = wbytes / bandwidth * 1e3
        kv = kv_bytes_per_step(cfg, bs, engine.inference_config.max_out_tokens)
        row = {"arch": arch, "batch": bs, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "weight_bytes": wbytes, "kv_bytes_per_step": kv, "floor_ms": floor_ms,
               "floor_with_kv_ms": (wbytes + kv) / bandwidth * 1e3,
               "dsjax": {k: v for k, v in ours.items() if k != "tokens"}}
        row["dsjax_over_floor"] = ours["decode_ms_per_token"] / floor_ms
        if not skip_hf:
            theirs = time_hf(hf_model, prompts, new_tokens, hf_reps)
            row["hf_eager"] = {k: v for k, v in theirs.items() if k != "tokens"}
            row["speedup_vs_hf"] = theirs["decode_ms_per_token"] / ours["decode_ms_per_token"]
            row["hf_over_floor"] = theirs["decode_ms_per_token"] / floor_ms
            same = np.asarray(ours["tokens"]) == theirs["tokens"]
            first_diff = [int(np.argmin(r)) if not r.all() else new_tokens for r in same]
            row["tokens_equal_to_hf"] = bool(same.all())
            row["tokens_agree_before_first_difference"] = first_diff
        rows.append(row)
        print(_line(row), flush=True)
    check = compare_logits(engine, hf_model, prompt_len)  # last: it turns hf_model to float32
    for row in rows:
        row["prompt_logits_vs_fp32"] = check
        print(f"{arch} bs {row['batch']}: prompt logits vs HF float32: {check}", flush=True)
    del engine, hf_model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def _line(r: dict) -> str:
    hf = r.get("hf_eager", {}).get("decode_ms_per_token", float("nan"))
    return (f"| {r['arch']} | {r['batch']} | {r['dsjax']['decode_ms_per_token']:.3f} | {hf:.3f} | "
            f"{r.get('speedup_vs_hf', float('nan')):.2f}x | {r['floor_ms']:.3f} | "
            f"{r['dsjax_over_floor']:.3f}x | {r['dsjax']['t_prefill_s'] * 1e3:.1f} | "
            f"{r['dsjax']['compile_s']:.1f} | {r.get('tokens_agree_before_first_difference', '-')} |")


HEADER = ("| arch | batch | dsjax decode ms/token | HF eager ms/token | speedup | weight-read floor ms "
          "| dsjax / floor | dsjax prefill+1 ms | dsjax compile s | tokens equal to HF before first difference |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _logits_table(rows: list[dict]) -> str:
    lines = ["\nPrompt logits against HF transformers in float32 (same weights, one "
             "prompt): relative L2 of the centred logits / argmax agreement.\n",
             "| arch | dsjax bf16 | HF bf16 | median top-2 gap / logit std |", "|---|---|---|---|"]
    for r in {r["arch"]: r for r in rows if "prompt_logits_vs_fp32" in r}.values():
        c = r["prompt_logits_vs_fp32"]
        cell = lambda k: f"{c[k]['rel_l2_vs_fp32']:.4f} / {c[k]['argmax_agreement_vs_fp32']:.2f}"  # noqa: E731
        lines.append(f"| {r['arch']} | {cell('dsjax_bf16')} | {cell('hf_bf16')} | "
                     f"{c['median_top2_gap_over_logit_std']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="gpt2-1.3b,llama3-8b")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hf-reps", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()

    env = common.environment()
    bw = common.gemv_bandwidth()
    print(f"{env}\nbf16 GEMV ceiling: {bw['bytes_per_s'] / 1e12:.2f} TB/s ({bw['us_per_gemv']:.1f} us)", flush=True)
    print(HEADER, flush=True)
    rows = []
    for arch in args.archs.split(","):
        rows += bench_arch(arch, [int(b) for b in args.batch_sizes.split(",")], args.prompt_len,
                           args.new_tokens, args.reps, args.hf_reps, bw["bytes_per_s"], args.skip_hf)
    bw_end = common.gemv_bandwidth()
    print(f"bf16 GEMV at the end: {bw_end['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    bw["bytes_per_s_at_end"] = bw_end["bytes_per_s"]
    md = (f"# Decode latency: dsjax (XLA path) vs HF transformers eager\n\n"
          f"{env['device']}, JAX {env['jax']}, commit {env['git_commit']}, {env['date']}. "
          f"bf16, random weights (the same in both systems), {args.prompt_len} prompt + "
          f"{args.new_tokens} new tokens, greedy. Decode ms/token = (T({args.new_tokens}) - T(1)) / "
          f"{args.new_tokens - 1}, medians of {args.reps} (dsjax) / {args.hf_reps} (HF) runs. "
          f"Floor = weight bytes per step / {bw['bytes_per_s'] / 1e12:.2f} TB/s (bf16 GEMV "
          f"1x8192 @ 8192x28672 measured at the start of this run; "
          f"{bw['bytes_per_s_at_end'] / 1e12:.2f} TB/s at its end).\n\nCommand: `python benchmarks/decode_latency.py --archs {args.archs} "
          f"--batch-sizes {args.batch_sizes}`\n\n{HEADER}\n" + "\n".join(_line(r) for r in rows) + "\n"
          + _logits_table(rows))
    outs = [common.RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    common.write("decode_latency", {"env": env, "gemv_bandwidth": bw, "args": vars(args), "rows": rows},
                 md, outs)
    print("\n" + md)


if __name__ == "__main__":
    main()
