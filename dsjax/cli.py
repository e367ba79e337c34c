"""`dsjax demo | generate | embed | convert | bench`: the command line.

    dsjax demo                                  # built-in GPT-2 (random weights) vs HF transformers
    dsjax convert HF_DIR OUT_DIR --dtype bf16   # HF checkpoint -> dsjax (orbax) checkpoint
    dsjax generate --model DIR --prompt "Hello" --max-new-tokens 32 [--quant int8] [--kernels pallas]
    dsjax embed --model DIR --text "Hello" [--text ...] [--image PIXELS.npy ...]   # encoders
    dsjax bench --model llama3-8b --batch-sizes 1,8 [--quant int8] [--kernels on]  # latency report
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

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


def _quant_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weight-only quantization of the GEMM weights")
    g.add_argument("--quant", choices=("int8", "int4"), help="quantize the GEMM weights (compute stays in --dtype)")
    g.add_argument("--group-size", type=int, help="rows of K per scale (default: one scale per output channel)")
    g.add_argument("--asymmetric", action="store_true", help="zero points as well as scales")


def _parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-device (a dp x pp x tp mesh over jax.devices())")
    g.add_argument("--tp", type=_at_least(1), default=1, help="tensor-parallel degree (default 1)")
    g.add_argument("--pp", type=_at_least(1), default=1, help="pipeline stages (default 1)")
    g.add_argument("--micro-batches", type=_at_least(1),
                   help="pipeline micro-batches the batch is cut into (default: --pp)")


def _parallel(args) -> dict:
    """init_inference's keyword arguments for the parallel flags."""
    pipe = {"pp_size": args.pp}
    if args.micro_batches is not None:
        pipe["micro_batches"] = args.micro_batches
    return dict(tensor_parallel={"tp_size": args.tp}, pipeline_parallel=pipe)


def _quant(args) -> dict | None:
    if args.quant is None:
        if args.group_size or args.asymmetric:
            raise SystemExit("--group-size / --asymmetric need --quant int8|int4")
        return None
    return {"bits": int(args.quant[3:]), "group_size": args.group_size,
            "symmetric": not args.asymmetric}


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
    p.add_argument("--kernels", choices=("xla", "pallas"), default="xla",
                   help="pallas: run matmuls and attention through the Pallas kernels "
                   "(replace_with_kernel_inject=True); default xla")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="int8: K/V cached as int8 with per-token scales (default auto: --dtype)")
    _quant_flags(p)
    _parallel_flags(p)
    _sampling_flags(p)

    _embed_parser(sub)
    _bench_parser(sub)

    p = sub.add_parser("convert", help="convert an HF checkpoint into a dsjax checkpoint",
                       description="Reads an HF checkpoint directory (safetensors, no torch needed) "
                       "and writes an orbax checkpoint + dsjax.json + tokenizer files to OUT_DIR.")
    p.add_argument("hf_dir", help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="stored dtype (default bf16)")
    _quant_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s")
    commands = {"demo": demo, "generate": generate, "embed": embed, "convert": convert,
                "bench": bench}
    return commands[args.command](args)


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embeddings / pooled outputs of an encoder (BERT, DistilBERT, CLIP)",
                       description="Runs an encoder checkpoint on texts (tokenized with the "
                       "checkpoint's tokenizer) and, for CLIP, images; prints each input's pooled "
                       "vector and its head's outputs (classification logits, MLM argmax tokens, "
                       "CLIP image-text logits).")
    p.add_argument("--model", required=True, help="HF directory or dsjax checkpoint of an encoder")
    p.add_argument("--text", action="append", default=[], help="input text; repeat for a batch")
    p.add_argument("--image", action="append", default=[],
                   help="CLIP: a .npy file of pixel values [3, S, S] or [B, 3, S, S], normalized as "
                   "the checkpoint's image processor does; repeat for more")
    p.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto",
                   help="which vector to print: the model's pooler_output, the first token's hidden "
                   "state, or the mean over real tokens; auto (default): CLIP's projected embeds, "
                   "else the pooler, else the mean")
    p.add_argument("--show", type=int, default=8, help="values printed per vector (0: all; default 8)")
    p.add_argument("--save", help="write the vectors (and CLIP logits) to this .npz file")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="compute dtype (default fp32)")


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers")
    return sizes


def _at_least(low: int):
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}")
        return int(text)
    return parse


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="latency report of generate per batch size, against the roofline",
                       description="Times full greedy generate calls on random prompts (no early "
                       "stop) per batch size: P50/P95/mean latency, ms/token, decode ms/token, "
                       "tokens/s, time to first token, compile time, peak device memory, and the "
                       "weight + KV read floor of a decode step at the measured bf16 GEMV bandwidth. "
                       "Writes OUT/NAME.json and OUT/NAME.md.")
    p.add_argument("--model", required=True, help="HF directory, dsjax checkpoint or built-in name "
                   "(random weights: gpt2-1.3b, gptj-6b, llama3-8b, bloom-7b1, ...)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1], help="comma-separated (default 1)")
    p.add_argument("--prompt-len", type=_at_least(1), default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=_at_least(2), default=128, help="tokens generated (default 128)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--kernels", choices=("on", "off"), default="off",
                   help="on: Pallas kernels (replace_with_kernel_inject=True); default off (XLA)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="int8: K/V cached as int8 with per-token scales (default auto: --dtype)")
    p.add_argument("--reps", type=_at_least(1), default=10, help="timed runs per batch size (default 10)")
    p.add_argument("--warmup", type=_at_least(1), default=2,
                   help="untimed runs per batch size, the compiling one included (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and random weights")
    p.add_argument("--out", default="bench_results", help="output directory (default bench_results/)")
    _quant_flags(p)
    _parallel_flags(p)


def bench(args) -> int:
    import jax

    import dsjax
    from dsjax import bench as harness

    try:
        engine = dsjax.init_inference(
            args.model, dtype=args.dtype, max_out_tokens=args.prompt_len + args.new_tokens,
            seed=args.seed, quant=_quant(args), replace_with_kernel_inject=args.kernels == "on",
            kv_cache_dtype=args.kv_cache_dtype, progress=not args.quiet, **_parallel(args))
    except (NotImplementedError, ValueError) as e:  # parallel degrees, quant groups, budget
        print(f"dsjax bench: {e}", file=sys.stderr)
        return 2
    env = {**harness.environment(), "gemv_bandwidth": harness.gemv_bandwidth()}
    rows = harness.run(engine, args.batch_sizes, args.prompt_len, args.new_tokens, reps=args.reps,
                       warmup=args.warmup, progress=not args.quiet, seed=args.seed,
                       bandwidth=env["gemv_bandwidth"])
    settings = {**vars(args), "quant_spec": _quant(args), "command": _bench_command(args),
                "num_params": engine.num_params(), "platform": jax.default_backend()}
    md = harness.report_markdown(rows, env, settings)
    name = "-".join(["bench", Path(args.model).name, args.dtype] + [args.quant] * bool(args.quant)
                    + ["kernels"] * (args.kernels == "on") + [f"tp{args.tp}"] * (args.tp > 1)
                    + [f"pp{args.pp}"] * (args.pp > 1))
    paths = harness.write(args.out, name, {"env": env, "args": settings, "rows": rows}, md)
    print(md + f"\nwrote {paths[0]} and {paths[1]}")
    return 0


def _bench_command(args) -> str:
    """The command line that repeats this run."""
    words = ["dsjax bench --model", args.model, "--batch-sizes", ",".join(map(str, args.batch_sizes))]
    for flag in ("prompt_len", "new_tokens", "dtype", "kernels", "kv_cache_dtype", "tp", "pp",
                 "micro_batches", "reps", "warmup", "seed", "quant", "group_size"):
        if getattr(args, flag) is not None:
            words += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return " ".join(words + ["--asymmetric"] * args.asymmetric)


def convert(args) -> int:
    from dsjax.engine import convert_checkpoint

    out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, quant=_quant(args))
    print(f"wrote dsjax checkpoint {out}")
    return 0


def generate(args) -> int:
    import jax

    import dsjax

    engine = dsjax.init_inference(args.model, dtype=args.dtype, max_out_tokens=args.max_out_tokens,
                                  seed=args.seed, quant=_quant(args),
                                  replace_with_kernel_inject=args.kernels == "pallas",
                                  kv_cache_dtype=args.kv_cache_dtype, **_parallel(args))
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


def embed(args) -> int:
    import numpy as np

    import dsjax

    if not args.text and not args.image:
        raise SystemExit("dsjax embed: give at least one --text or --image")
    engine = dsjax.init_inference(args.model, dtype=args.dtype)
    cfg = engine.config
    if cfg.encoder is None:
        raise SystemExit(f"dsjax embed: {args.model} is a {cfg.family} decoder; use dsjax generate")
    if args.text and cfg.takes_images:
        raise SystemExit(f"dsjax embed: {args.model} is an image tower only; pass --image, not --text")
    if args.image and not (cfg.takes_images or cfg.encoder.vision):
        raise SystemExit(f"dsjax embed: {args.model} ({cfg.family}) has no image tower; drop --image")
    try:
        saved = _embed_inputs(args, engine)
    except ValueError as e:  # bad input for this model (too long, wrong image size): say why
        raise SystemExit(f"dsjax embed: {e}") from None
    if args.save:
        np.savez(args.save, **{k: np.asarray(v) for k, v in saved.items()})
        print(f"wrote {args.save} ({', '.join(saved)})")
    return 0


def _embed_inputs(args, engine) -> dict:
    """Runs and prints the texts, images and CLIP logits; returns the arrays for --save."""
    import numpy as np

    saved = {}
    if args.text:
        tok = engine.tokenizer
        encs = [tok(t) if callable(tok) else {"input_ids": tok.encode(t)} for t in args.text]
        ids = [list(e["input_ids"]) for e in encs]
        types = ([list(e["token_type_ids"]) for e in encs]
                 if engine.config.type_vocab_size and all("token_type_ids" in e for e in encs) else None)
        out = engine.embed(ids, token_type_ids=types)
        text_vecs, how = _pick_vector(out, args.pooling)
        D = out.last_hidden_state.shape[-1]
        for i, text in enumerate(args.text):
            print(f"[{i}] {text!r}: hidden [{len(ids[i])}, {D}]; {how} {_vector(text_vecs[i], args.show)}")
            _print_head(engine, tok, out, i, len(ids[i]))
        saved["text"] = text_vecs
    if args.image:
        pixels = np.concatenate([_load_pixels(f) for f in args.image])
        out = engine.embed_image(pixels)
        image_vecs, how = _pick_vector(out, args.pooling)
        T, D = out.last_hidden_state.shape[1:]
        for i in range(len(pixels)):
            print(f"[image {i}] hidden [{T}, {D}]; {how} {_vector(image_vecs[i], args.show)}")
        saved["image"] = image_vecs
    if args.text and args.image and engine.config.encoder.vision is not None:
        logits = np.asarray(engine.clip_logits(ids, pixels).logits_per_image)  # [images, texts]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        print("logits_per_image (rows: images, columns: texts; softmax over texts):")
        for i, (row, p) in enumerate(zip(logits, probs)):
            print(f"  [image {i}] " + " ".join(f"{x:.4f}" for x in row) + "  probs "
                  + " ".join(f"{x:.3f}" for x in p))
        saved["logits_per_image"] = logits
    return saved


def _pick_vector(out, pooling: str):
    """(vectors [B, X], label) for --pooling."""
    if pooling == "auto":
        pooling = ("embeds" if out.embeds is not None else
                   "pooler" if out.pooler_output is not None else "mean")
    if pooling == "embeds":
        return out.embeds, "projected embeds"
    if pooling == "pooler":
        if out.pooler_output is None:
            raise SystemExit("dsjax embed: this model has no pooler; use --pooling cls or mean")
        return out.pooler_output, "pooler_output"
    if pooling == "cls":
        return out.last_hidden_state[:, 0], "first-token hidden state"
    return out.mean_pooled(), "mean of hidden states"


def _vector(v, show: int) -> str:
    import numpy as np

    v = np.asarray(v)
    shown = v if show <= 0 else v[:show]
    more = " ..." if len(shown) < len(v) else ""
    return (f"[{len(v)}] norm {np.linalg.norm(v):.4f}: "
            + " ".join(f"{x:.4f}" for x in shown) + more)


def _print_head(engine, tok, out, i: int, n: int) -> None:
    import numpy as np

    head = engine.config.encoder.head
    if head == "classifier":
        logits = np.asarray(out.logits[i])
        print(f"    classifier logits: {' '.join(f'{x:.4f}' for x in logits)} "
              f"(argmax {int(logits.argmax())})")
    elif head == "mlm":
        best = np.asarray(out.logits[i, :n]).argmax(-1)
        print(f"    mlm argmax per token: {' '.join(tok.decode([int(t)]) for t in best)}")


def _load_pixels(path: str):
    import numpy as np

    x = np.load(path, allow_pickle=False)
    if x.ndim not in (3, 4):
        raise SystemExit(f"dsjax embed: {path} holds shape {x.shape}; expected [3, S, S] or [B, 3, S, S]")
    return x[None] if x.ndim == 3 else x


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
