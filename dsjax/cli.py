"""`dsjax demo | generate | convert`: the command line.

    dsjax demo                                  # built-in GPT-2 (random weights) vs HF transformers
    dsjax convert HF_DIR OUT_DIR --dtype bf16   # HF checkpoint -> dsjax (orbax) checkpoint
    dsjax generate --model DIR --prompt "Hello" --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

DTYPES = ("bf16", "fp16", "fp32")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (greedy unless --do-sample)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy argmax")
    g.add_argument("--temperature", type=float, default=1.0, help="divide logits by this before sampling")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample within the smallest set of tokens whose probability reaches p (1: off)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling and random weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsjax", description="DeepSpeed-Inference on JAX: run HF checkpoints with jitted generate.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results, no log lines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the built-in default job: no download needed",
                       description="Builds a built-in architecture with random weights, generates, "
                       "prints its speed and, when torch is installed, its token agreement with HF "
                       "transformers running the same weights.")
    p.add_argument("--arch", default="gpt2", help="built-in architecture (see dsjax.presets; default gpt2)")
    p.add_argument("--prompt", default="DeepSpeed-Inference, rebuilt on JAX.", help="prompt text (byte-level tokens)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")

    p = sub.add_parser("generate", help="generate text from a checkpoint",
                       description="Generates from an HF checkpoint directory, a dsjax checkpoint or "
                       "a built-in architecture name, with the checkpoint's tokenizer.")
    p.add_argument("--model", required=True, help="HF directory, dsjax checkpoint or built-in name")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag for a batch of prompts")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--max-out-tokens", type=int, default=1024,
                   help="token budget per sequence: prompt + new tokens (default 1024)")
    p.add_argument("--logprobs", action="store_true", help="print each new token's log-probability")
    _sampling_flags(p)

    p = sub.add_parser("convert", help="convert an HF checkpoint into a dsjax checkpoint",
                       description="Reads an HF checkpoint directory (safetensors, no torch needed) "
                       "and writes an orbax checkpoint + dsjax.json + tokenizer files to OUT_DIR.")
    p.add_argument("hf_dir", help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="stored dtype (default bf16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s")
    return {"demo": demo, "generate": generate, "convert": convert}[args.command](args)


def convert(args) -> int:
    from dsjax.engine import convert_checkpoint

    out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype)
    print(f"wrote dsjax checkpoint {out}")
    return 0


def generate(args) -> int:
    import jax

    import dsjax

    engine = dsjax.init_inference(args.model, dtype=args.dtype, max_out_tokens=args.max_out_tokens,
                                  seed=args.seed)
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in args.prompt]
    out = engine.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          prng_key=jax.random.key(args.seed), return_logprobs=args.logprobs)
    for i, (ids, new) in enumerate(zip(prompts, out.sequences)):
        print(f"[{i}] {tok.decode(list(ids) + new)}")
        if args.logprobs:
            print("    logprobs: " + " ".join(f"{x:.3f}" for x in out.logprobs[i, : len(new)]))
    return 0


def demo(args) -> int:
    import jax

    import dsjax
    from dsjax import presets

    hf_model = None
    if not args.no_hf:
        try:
            hf_model = presets.hf_torch_model(args.arch, seed=args.seed)
        except ImportError:
            print("torch is not installed: skipping the HF transformers comparison "
                  "(pip install -e '.[torch]' to enable it)")
    budget = 256
    source = hf_model if hf_model is not None else args.arch
    engine = dsjax.init_inference(source, dtype=args.dtype, max_out_tokens=budget, seed=args.seed)
    tok = presets.ByteTokenizer()
    prompt = tok.encode(args.prompt)
    n = args.max_new_tokens
    print(f"dsjax demo: {args.arch} ({engine.num_params() / 1e6:.1f}M params, random weights, "
          f"{args.dtype}) on {jax.devices()[0].device_kind}, JAX {jax.__version__}")

    t0 = time.perf_counter()
    out = engine.generate([prompt], max_new_tokens=n)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = engine.generate([prompt], max_new_tokens=n)
        times.append(time.perf_counter() - t0)
    ours = out.sequences[0]
    ms = statistics.median(times) * 1e3
    print(f"prompt: {len(prompt)} tokens; generated {len(ours)} tokens")
    print(f"dsjax: first call {compile_s:.1f} s (compile), then median {ms:.1f} ms "
          f"= {ms / len(ours):.2f} ms/token over {args.runs} runs")
    print(f"text (byte tokenizer; random weights make noise): {tok.decode(ours)!r}")
    if hf_model is None:
        return 0
    theirs, hf_ms = _hf_generate(hf_model, prompt, n, engine.pad_token_id)
    same = sum(a == b for a, b in zip(ours, theirs))
    agree = ours == theirs
    print(f"HF transformers (torch, eager): {hf_ms:.1f} ms = {hf_ms / max(len(theirs), 1):.2f} ms/token")
    print(f"token agreement with HF: {'identical' if agree else 'DIFFERENT'} "
          f"({same}/{max(len(ours), len(theirs))} positions equal)")
    return 0 if agree else 1


def _hf_generate(model, prompt: list[int], n: int, pad: int) -> tuple[list[int], float]:
    import torch

    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        ms = (time.perf_counter() - t0) * 1e3
    return out[0, len(prompt):].tolist(), ms


if __name__ == "__main__":
    sys.exit(main())
