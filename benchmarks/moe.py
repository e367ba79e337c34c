"""MoE decode on one GPU: dsjax with XLA's expert op and with the Pallas grouped GEMM, against HF
transformers eager on the same random weights, and against the active-bytes floor.

    python benchmarks/moe.py [--arch mixtral-8l,qwen3-30b-a3b-12l] [--batch 1,8,64] [--new-tokens 64]
        [--variants dsjax-fp32,dsjax-xla,...]

Variants (--variants): dsjax-xla (ragged_dot), dsjax-xla-sliced (up to 16 (token, pick) rows,
each row against its own expert sliced from the stacks: bs 1 and 8 of top-2), the grouped GEMM
in bf16 (XLA elsewhere, or with every other kernel: dsjax-pallas-grouped-gemm) and int8.
Architectures (random weights, bf16): Mixtral-8x7B's layer shape with 8 of its 32 layers (the
whole model does not fit one H100 in bf16 next to HF's copy), and Qwen3-30B-A3B's whole shape
(48 layers, 128 experts, top-8) or 12 of its layers (qwen3-30b-a3b-12l). Order per architecture: the HF model is made on
the GPU, timed (eager, greedy, `generate`), checked, moved to the CPU and converted by
init_inference (so both run the same weights), then each dsjax variant is checked and timed.
decode ms/token = (P50 T(n) - P50 T(1)) / (n - 1) (dsjax.bench.timing) for both. Floor of a
decode step at batch B: (the weights outside the experts + the experts routed to + the KV
cache) / the measured GEMV bandwidth, with the experts routed to taken as the expected number
of distinct experts that B tokens x top-k picks reach when routing is uniform,
E (1 - (1 - k/E)^B), per layer (random routers route near-uniformly). Check of each variant
against the first of --variants and against HF on 8 prompts: the last position's logits
(largest difference over the largest logit) and 16 greedy tokens (how many agree before the
first that differs, of 8 x 16). With dsjax-fp32 first (the same weights in float32, checked,
not timed) that is each one's distance to float32, HF's bf16 included: in bf16 a random
router's near-ties round differently in every implementation, so bf16 variants part from each
other and from HF's bf16 by expert choices, not by errors (docs/decisions.md#expert-layers-in-xla). Writes
benchmarks/results/NAME.json/.md (+ $OUT).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from dsjax import bench  # noqa: E402

ARCHS = {
    "mixtral-8l": ("MixtralForCausalLM", dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=False)),
    "tiny": ("MixtralForCausalLM", dict(  # a CPU smoke run of this script
        model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)),
}
# Qwen3-30B-A3B's layer shape with 12 of its 48 layers (a run builds the model for HF and again
# for each dsjax variant: the whole model takes minutes a copy)
ARCHS["qwen3-30b-a3b-12l"] = ("Qwen3MoeForCausalLM", dict(ARCHS["qwen3-30b-a3b"][1], num_hidden_layers=12))
VARIANTS = {"dsjax-fp32": {"dtype": "fp32"}, "dsjax-xla": {}, "dsjax-xla-sliced": {"kernels": {"expert_slice_rows": 16}},
            "dsjax-grouped-gemm": {"kernels": {"experts": "pallas"}},
            # every kernel (the gemv, the Pallas attention) and the grouped GEMM
            "dsjax-pallas-grouped-gemm": {"replace_with_kernel_inject": True,
                                          "kernels": {"experts": "pallas"}},
            "dsjax-grouped-gemm-int8": {"kernels": {"experts": "pallas"},
                                        "quant": {"bits": 8, "group_size": 128}}}


def hf_model(arch: str, device: str):
    import torch
    import transformers

    cls_name, cfg = ARCHS[arch]
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device(device):
        model = getattr(transformers, cls_name)(config).to(torch.bfloat16).eval()
    return model


def time_hf(model, prompts, n_new: int, reps: int) -> dict:
    import torch

    ids = torch.tensor(np.asarray(prompts), device=model.device)

    def gen(n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out[:, ids.shape[1]:].cpu().numpy()
    return bench.timing(bench.time_generate(gen, n_new, warmup=1, reps=reps), n_new)


def floor_ms(engine, batch: int, context: int, bw: float) -> float:
    import jax

    from dsjax.model import flatten
    from dsjax.weights import is_experts

    cfg, moe = engine.config, engine.config.moe
    E, k = moe.num_experts, moe.top_k
    sparse = cfg.num_layers if moe.layers is None else len(moe.layers)
    experts = sum(a.size * a.dtype.itemsize for path, w in flatten(engine.params).items()
                  if is_experts(path) for a in jax.tree.leaves(w))  # (int8: codes + scales)
    per_expert = experts / (sparse * E)
    active = sparse * E * (1 - (1 - k / E) ** batch) * per_expert
    kv = bench.kv_bytes_per_step(cfg, batch, context)
    return (bench.weight_bytes_per_step(engine) - experts + active + kv) / bw * 1e3


def check(engine, vocab: int, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The last position's logits and 16 greedy tokens of 8 random prompts."""
    prompts = bench.random_prompts(vocab, 8, prompt_len, seed=1)
    logits = np.asarray(engine(prompts)[:, -1], np.float32)
    tokens = np.asarray(engine.generate(prompts, max_new_tokens=16, eos_token_id=[]).tokens)
    return logits, tokens


def check_hf(model, vocab: int, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """check() of the HF model (the same prompts)."""
    import torch

    ids = torch.tensor(bench.random_prompts(vocab, 8, prompt_len, seed=1), device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[:, -1].float().cpu().numpy()
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             pad_token_id=0)
    return logits, out[:, ids.shape[1]:].cpu().numpy()


def agreement(got, want) -> dict:
    (lg, tg), (lw, tw) = got, want
    same = np.cumprod(tg == tw, axis=1).sum()  # tokens equal before each row's first difference
    return {"logit_diff": float(np.abs(lg - lw).max() / np.abs(lw).max()),
            "same_argmax": float((lg.argmax(-1) == lw.argmax(-1)).mean()),
            "tokens_agreeing": f"{int(same)}/{tw.size}"}


def run_arch(arch: str, args, bw: float) -> list[dict]:
    import jax

    import dsjax

    device = "cuda" if args.hf_device == "cuda" else "cpu"
    model = hf_model(arch, device)
    rows = []
    for batch in args.batch:
        prompts = bench.random_prompts(ARCHS[arch][1]["vocab_size"], batch, args.prompt_len)
        try:
            rows.append(dict(time_hf(model, prompts, args.new_tokens, args.reps), system="hf-eager",
                             batch=batch))
        except Exception as e:  # noqa: BLE001 (the row says so)
            rows.append({"system": "hf-eager", "batch": batch, "error": harness.error_line(e)})
        print(rows[-1], flush=True)
    hf = check_hf(model, ARCHS[arch][1]["vocab_size"], args.prompt_len)
    model.to("cpu")
    gc.collect()
    if device == "cuda":  # torch's cache gives its GPU memory back, for JAX to take
        import torch
        torch.cuda.empty_cache()
    reference = None
    for name in args.variants:
        opts, engine = dict(VARIANTS[name]), None
        dtype = opts.pop("dtype", "bf16")
        try:
            engine = dsjax.init_inference(model, dtype=dtype, progress=False, **opts,
                                          max_out_tokens=args.prompt_len + max(args.new_tokens, 16))
            # a float32 engine is the reference: its dots in float32, not TF32
            with jax.default_matmul_precision("highest" if dtype == "fp32" else None):
                got = check(engine, engine.config.vocab_size, args.prompt_len)
            if name == args.variants[0]:  # the reference: none other stands in for it
                reference = got
                rows.append(dict(agreement(hf, reference), system="hf-eager", batch="check",
                                 hf=agreement(hf, hf)))
            rows.append(dict(agreement(got, reference), system=name, batch="check",
                             hf=agreement(got, hf)) if reference else
                        dict(system=name, batch="check", error=f"no reference: {args.variants[0]} failed"))
        except Exception as e:  # noqa: BLE001
            rows.append({"system": name, "batch": "check", "error": harness.error_line(e)})
        print(rows[-1], flush=True)
        for batch in args.batch if engine is not None and dtype == "bf16" else []:
            prompts = bench.random_prompts(engine.config.vocab_size, batch, args.prompt_len)
            try:
                def gen(n, e=engine, p=prompts):
                    return e.generate(p, max_new_tokens=n, eos_token_id=[]).tokens
                t = bench.timing(bench.time_generate(gen, args.new_tokens, warmup=1,
                                                     reps=args.reps), args.new_tokens)
                fl = floor_ms(engine, batch, args.prompt_len + args.new_tokens / 2, bw)
                rows.append(dict(t, system=name, batch=batch, floor_ms=fl,
                                 floor_ratio=t["decode_ms_per_token"] / fl))
            except Exception as e:  # noqa: BLE001
                rows.append({"system": name, "batch": batch, "error": harness.error_line(e)})
            print(rows[-1], flush=True)
        del engine
        gc.collect()
    return [dict(r, arch=arch) for r in rows]


def markdown(rows: list[dict], env: dict, args) -> str:
    lines = [f"# MoE decode ms/token ({env.get('device')}, bf16, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens)", "",
             "| arch | batch | system | decode ms/token | x floor | HF eager / this |",
             "|---|---|---|---|---|---|"]
    checks = [r for r in rows if r["batch"] == "check"]
    for r in rows:
        if r in checks:
            continue
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['batch']} | {r['system']} | {r['error']} | | |")
            continue
        hf = next((x for x in rows if x["arch"] == r["arch"] and x["batch"] == r["batch"]
                   and x["system"] == "hf-eager" and "error" not in x), None)
        ms = r["decode_ms_per_token"]
        floor = f"{r['floor_ratio']:.2f}x" if "floor_ratio" in r else "-"
        speed = f"{hf['decode_ms_per_token'] / ms:.2f}x" if hf else "-"
        lines.append(f"| {r['arch']} | {r['batch']} | {r['system']} | {ms:.3f} | {floor} | "
                     f"{speed} |")
    lines += ["", f"Against {args.variants[0]} / HF eager on 8 prompts: |logit difference| / largest |logit| "
              "at the last position, argmax agreement, greedy tokens equal before each row's "
              "first difference.", "", "| arch | system | logit diff | same argmax | "
              "tokens agreeing |", "|---|---|---|---|---|"]
    both = lambda r, k, f: f"{f(r[k])} / {f(r['hf'][k])}"  # noqa: E731
    lines += [f"| {r['arch']} | {r['system']} | {r['error']} | | |" if "error" in r else
              f"| {r['arch']} | {r['system']} | {both(r, 'logit_diff', '{:.2e}'.format)} | "
              f"{both(r, 'same_argmax', '{:.2f}'.format)} | {both(r, 'tokens_agreeing', str)} |"
              for r in checks]
    lines += ["", harness.versions_line(env) + " Floor: see benchmarks/moe.py."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mixtral-8l,qwen3-30b-a3b-12l")  # (each fits one H100 with HF's copy)
    p.add_argument("--batch", type=harness.ints, default=[1, 8, 64])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hf-device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                   help=f"dsjax variants, of {', '.join(VARIANTS)} (the first: the others' reference)")
    p.add_argument("--name", default="moe")
    args = p.parse_args(argv)
    if set(args.variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(set(args.variants) - set(VARIANTS))}")
    env, t0 = harness.environment(), time.perf_counter()
    bw = harness.gemv_bandwidth()["bytes_per_s"]
    rows = []
    for arch in args.arch.split(","):
        rows += run_arch(arch, args, bw)
        harness.save(args.name, {"env": env, "args": vars(args), "bytes_per_s": bw,
                                 "rows": rows}, markdown(rows, env, args))
    print(markdown(rows, env, args), f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
