"""Pre-quantized checkpoints on one GPU: a LLaMA-3-8B-architecture model (random weights) written
in each format and loaded by dsjax, against dsjax bf16 of the same architecture in the same run.

    python benchmarks/formats.py [--arch llama3-8b] [--formats bf16,q8_0,q4_0,ct-int4,fp8]
                                 [--kernels xla,pallas] [--batch 1,8]

Formats: GGUF Q8_0 and Q4_0 (gguf's GGUFWriter; every 2-D weight in the type, the token
embedding F16), compressed-tensors int4 groups of 128 (`pack-quantized`, symmetric, lm_head
ignored, as llm-compressor's W4A16 writes it), HF block FP8 (`quant_method: fp8`, 128 x 128
blocks). Random codes with small random scales: the same bytes in every layer (each layer
still its own tensor), so writing an 8B file takes seconds. bf16: the built-in architecture's
random weights. Each format is written to a temporary directory, loaded, timed and deleted
before the next. decode ms/token = (P50 T(n) - P50 T(1)) / (n - 1) (dsjax.bench.timing), under
each kernel policy (xla: KernelPolicy(); pallas: KernelPolicy.pallas(), the quantized GEMV
kernels). Two floors per row, each the bytes over the measured GEMV bandwidth (+ the KV cache):
`held`, the weights as the engine holds them (codes and float32 scales); `format`, the
checkpoint's own bytes of the weights a step reads (all but the input embedding). Writes
benchmarks/results/NAME.json/.md (+ $OUT).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from dsjax import bench, presets  # noqa: E402

SMALL = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512,
             hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5,
             rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)  # a CPU smoke run
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GGUF_NAMES = dict(zip(LINEARS, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                "ffn_up", "ffn_down")))


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """Each linear's HF [out, in] shape."""
    D, F, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return dict(zip(LINEARS, ((q, D), (kv, D), (kv, D), (D, q), (F, D), (F, D), (D, F))))


def gguf_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes of Q8_0 / Q4_0 blocks for a [rows, cols] weight, each block's fp16 scale
    (its first two bytes) small and finite."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (rows, cols // block, 1)).astype(np.float16)
    raw[..., :2] = scales.view(np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, cfg: dict, kind: str, rng) -> int:
    """A GGUF file of cfg's architecture; returns the bytes of the weights a step reads."""
    import gguf

    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    w = gguf.GGUFWriter(str(path), "llama")
    keys = dict(block_count="num_hidden_layers", context_length="max_position_embeddings",
                embedding_length="hidden_size", feed_forward_length="intermediate_size",
                vocab_size="vocab_size")
    keys.update({"attention.head_count": "num_attention_heads",
                 "attention.head_count_kv": "num_key_value_heads"})
    for key, field in keys.items():
        w.add_uint32(f"llama.{key}", cfg[field])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    made = {s: gguf_blocks(qtype, *s, rng) for s in set(shapes(cfg).values()) | {(V, D)}}
    w.add_tensor("token_embd.weight", rng.normal(0, 0.02, (V, D)).astype(np.float16))
    w.add_tensor("output.weight", made[(V, D)], raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    read = made[(V, D)].nbytes + 4 * D
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(D, np.float32))
        for name, shape in shapes(cfg).items():
            w.add_tensor(f"blk.{i}.{GGUF_NAMES[name]}.weight", made[shape], raw_dtype=qtype)
            read += made[shape].nbytes
        read += 8 * D
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read


def _linear_tensors(kind: str, out: int, inp: int, gen) -> dict:
    """One quantized linear's tensors (torch) as the format stores them."""
    import torch

    if kind == "ct-int4":  # 8 unsigned 4-bit codes (value + 8) per int32 along K
        scale = torch.rand(out, inp // 128, generator=gen) * 0.01 + 1e-3
        return {"weight_packed": torch.randint(-2**31, 2**31 - 1, (out, inp // 8),
                                               dtype=torch.int32, generator=gen),
                "weight_scale": scale.to(torch.bfloat16),
                "weight_shape": torch.tensor([out, inp], dtype=torch.int64)}
    weight = (torch.randn(out, inp, generator=gen) * 0.5).to(torch.float8_e4m3fn)
    return {"weight": weight,
            "weight_scale_inv": torch.rand(out // 128, inp // 128, generator=gen) * 0.01 + 1e-3}


QUANT_CONFIGS = {
    "ct-int4": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                              "weights": {"num_bits": 4, "type": "int",
                                                          "strategy": "group", "group_size": 128,
                                                          "symmetric": True, "dynamic": False}}}},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
}


def write_hf(path: Path, cfg: dict, kind: str, seed: int) -> int:
    """An HF directory (config.json + model.safetensors) in a quantized format; returns the
    bytes of the weights a step reads."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    made = {s: _linear_tensors(kind, *s, gen) for s in set(shapes(cfg).values())}
    embed = torch.randn(V, D, generator=gen).to(torch.bfloat16) * 0.02
    tensors = {"model.embed_tokens.weight": embed,
               "lm_head.weight": torch.randn(V, D, generator=gen).to(torch.bfloat16) * 0.02,
               "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    read = 2 * V * D + 2 * D
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(D, dtype=torch.bfloat16)
        for name, shape in shapes(cfg).items():
            for part, t in made[shape].items():  # the same values, each its own storage
                tensors[f"model.layers.{i}.{name}.{part}"] = t.clone()
                read += t.numel() * t.element_size() if part != "weight_shape" else 0
        read += 4 * D
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16",
                                                  "quantization_config": QUANT_CONFIGS[kind]}))
    return read


def source_of(kind: str, arch: str, cfg: dict, tmp: Path, rng):
    """(what init_inference takes, bytes a step reads in the format)."""
    if kind == "bf16":
        if arch in presets.PRESETS:
            return arch, None
        return write_hf_bf16(tmp / "bf16", cfg), None
    if kind in ("q8_0", "q4_0"):
        path = tmp / f"{kind}.gguf"
        return path, write_gguf(path, cfg, kind, rng)
    return tmp / kind, write_hf(tmp / kind, cfg, kind, seed=0)


def write_hf_bf16(path: Path, cfg: dict) -> Path:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"}),
        dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


POLICIES = {"xla": {}, "pallas": {"replace_with_kernel_inject": True}}


def measure(source, kind: str, policy: str, args, bw: float, format_bytes) -> list[dict]:
    import dsjax

    engine = dsjax.init_inference(source, dtype="bf16", progress=False, **POLICIES[policy],
                                  max_out_tokens=args.prompt_len + args.new_tokens)
    held = bench.weight_bytes_per_step(engine)
    rows = []
    for batch in args.batch:
        prompts = bench.random_prompts(engine.config.vocab_size, batch, args.prompt_len)

        def gen(n, p=prompts):
            return engine.generate(p, max_new_tokens=n, eos_token_id=[]).tokens
        t = bench.timing(bench.time_generate(gen, args.new_tokens, warmup=1, reps=args.reps),
                         args.new_tokens)
        kv = bench.kv_bytes_per_step(engine.config, batch, args.prompt_len + args.new_tokens / 2)
        ms = t["decode_ms_per_token"]
        row = dict(t, format=kind, kernels=policy, batch=batch, held_bytes=held,
                   held_floor_ms=(held + kv) / bw * 1e3, format_bytes=format_bytes)
        row["held_floor_ratio"] = ms / row["held_floor_ms"]
        if format_bytes:
            row["format_floor_ms"] = (format_bytes + kv) / bw * 1e3
            row["format_floor_ratio"] = ms / row["format_floor_ms"]
        rows.append(row)
        print({k: v for k, v in row.items() if not isinstance(v, dict)}, flush=True)
    return rows


def run(args, bw: float, env: dict) -> list[dict]:
    cfg = SMALL if args.arch == "small" else presets.hf_config(args.arch)
    rng, rows = np.random.default_rng(0), []
    for kind in args.formats:
        tmp = Path(tempfile.mkdtemp(prefix=f"dsjax-formats-{kind}-", dir=args.tmp))
        try:
            t0 = time.perf_counter()
            source, format_bytes = source_of(kind, args.arch, cfg, tmp, rng)
            print(f"{kind}: written in {time.perf_counter() - t0:.0f} s", flush=True)
            for policy in args.kernels:
                try:
                    rows += measure(source, kind, policy, args, bw, format_bytes)
                except Exception as e:  # noqa: BLE001 (the row says so)
                    rows.append({"format": kind, "kernels": policy, "error": harness.error_line(e)})
                    print(rows[-1], flush=True)
                gc.collect()
                harness.save(args.name, {"env": env, "args": vars(args), "bytes_per_s": bw,
                                         "rows": rows}, markdown(rows, env, args))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def markdown(rows: list[dict], env: dict, args) -> str:
    lines = [f"# Pre-quantized checkpoints: decode ms/token ({env.get('device')}, {args.arch}, "
             f"prompt {args.prompt_len}, {args.new_tokens} new tokens)", "",
             "| format | kernels | batch | decode ms/token | vs bf16 (same kernels) | x held floor "
             "| x format floor |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['format']} | {r['kernels']} | | {r['error']} | | | |")
            continue
        base = next((b for b in rows if b.get("format") == "bf16" and "error" not in b
                     and b["kernels"] == r["kernels"] and b["batch"] == r["batch"]), None)
        ms = r["decode_ms_per_token"]
        speed = f"{base['decode_ms_per_token'] / ms:.2f}x" if base else "-"
        fmt = f"{r['format_floor_ratio']:.2f}x" if "format_floor_ratio" in r else "-"
        lines.append(f"| {r['format']} | {r['kernels']} | {r['batch']} | {ms:.3f} | {speed} | "
                     f"{r['held_floor_ratio']:.2f}x | {fmt} |")
    lines += ["", harness.versions_line(env) + " Floors: see benchmarks/formats.py."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama3-8b", help="a built-in architecture, or 'small'")
    p.add_argument("--formats", type=lambda t: t.split(","), default=["bf16", "q8_0", "q4_0",
                                                                         "ct-int4", "fp8"])
    p.add_argument("--kernels", type=lambda t: t.split(","), default=["xla", "pallas"])
    p.add_argument("--batch", type=harness.ints, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tmp", default=None, help="where the checkpoints are written")
    p.add_argument("--name", default="formats")
    args = p.parse_args(argv)
    env, t0 = harness.environment(), time.perf_counter()
    rows = run(args, harness.gemv_bandwidth()["bytes_per_s"], env)
    print(markdown(rows, env, args), f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
