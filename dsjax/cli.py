"""`dsjax demo | generate | embed | convert | bench`: the command line.

    dsjax demo                                  # built-in GPT-2 (random weights) vs HF transformers
    dsjax convert HF_DIR OUT_DIR --dtype bf16   # HF checkpoint (or GGUF file) -> dsjax checkpoint
    dsjax generate --model DIR --prompt "Hello" --max-new-tokens 32 [--quant int8] [--kernels pallas]
    dsjax embed --model DIR --text "Hello" [--text ...] [--image PIXELS.npy ...]   # encoders
    dsjax bench --model llama3-8b --batch-sizes 1,8 [--quant int8] [--kernels on]  # latency report
    dsjax serve MODEL [--port 8000] [--max-num-seqs 64] [--api-key KEY]  # OpenAI-compatible server
    dsjax bench serve --url http://127.0.0.1:8000 --num-prompts 100 --request-rate 4  # its load

An expected error (a bad flag value, a missing or malformed checkpoint, an output path that
cannot be written) is one line `dsjax <command>: <message>` on stderr and exit status 2, raised
before any weight is read where the arguments and configs can tell; `dsjax --debug ...` shows the
traceback instead. Importing this module (and `--help`) does not import JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from dsjax import cli_embed, cli_serve

DTYPES = cli_embed.DTYPES


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (unset: the checkpoint's generation_config.json, else "
                             "transformers' defaults; greedy unless --do-sample)")
    g.add_argument("--max-new-tokens", type=int, help="tokens to generate per prompt (default 20)")
    g.add_argument("--do-sample", action="store_true", default=None,
                   help="sample instead of greedy argmax")
    g.add_argument("--temperature", type=float, help="divide logits by this before sampling")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 50; 0: off)")
    g.add_argument("--top-p", type=float,
                   help="sample within the smallest set of tokens whose probability reaches p (1: off)")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, help="transformers' repetition penalty (1: off)")
    g.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size")
    g.add_argument("--min-new-tokens", type=int, help="no end-of-sequence before this many tokens")
    g.add_argument("--num-beams", type=int, help="beam search with this many beams")
    g.add_argument("--stop", action="append", dest="stop_strings",
                   help="stop when the text contains this string (repeat the flag for more)")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling and random weights")


GENERATION_FLAGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                    "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "num_beams",
                    "stop_strings")


def _quant_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weight-only quantization of the GEMM weights")
    g.add_argument("--quant", choices=("int8", "int4"), help="quantize the GEMM weights (compute stays in --dtype)")
    g.add_argument("--group-size", type=int, help="rows of K per scale (default: one scale per output channel)")
    g.add_argument("--asymmetric", action="store_true", help="zero points as well as scales")


def _parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-device (a dp x pp x tp mesh over jax.devices())")
    g.add_argument("--tp", type=_at_least(1), default=1, help="tensor-parallel degree (default 1)")
    g.add_argument("--pp", type=_at_least(1), default=1, help="pipeline stages (default 1)")
    g.add_argument("--dp", type=_at_least(1), default=1, help="data-parallel replicas (default 1)")
    g.add_argument("--micro-batches", type=_at_least(1),
                   help="pipeline micro-batches the batch is cut into (default: --pp)")


def _parallel(args) -> dict:
    """init_inference's keyword arguments for the parallel flags."""
    pipe = {"pp_size": args.pp}
    if args.micro_batches is not None:
        pipe["micro_batches"] = args.micro_batches
    return dict(tensor_parallel={"tp_size": args.tp}, pipeline_parallel=pipe,
                data_parallel={"dp_size": args.dp},
                distributed=bool(os.environ.get("DSJAX_COORDINATOR")))  # under dsjax launch


def _quant(args) -> dict | None:
    if args.quant is None:
        if args.group_size or args.asymmetric:
            raise ValueError("--group-size / --asymmetric need --quant int8|int4")
        return None
    return {"bits": int(args.quant[3:]), "group_size": args.group_size,
            "symmetric": not args.asymmetric}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsjax", description="DeepSpeed-Inference on JAX: run HF checkpoints with jitted generate.")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only print results: no log lines, no progress bars")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="compile every program anew (DSJAX_COMPILATION_CACHE=0; default: "
                             "programs compiled before are read from ~/.cache/dsjax/jax)")
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
    p.add_argument("--max-out-tokens", type=_at_least(2), default=None,
                   help="token budget per sequence: prompt + new tokens (default 1024, or the "
                   "model's learned positions if fewer)")
    p.add_argument("--logprobs", action="store_true", help="print each new token's log-probability")
    p.add_argument("--kernels", choices=("xla", "pallas"), default="xla",
                   help="pallas: run matmuls and attention through the Pallas kernels "
                   "(replace_with_kernel_inject=True); default xla")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="int8: K/V cached as int8 with per-token scales (default auto: --dtype)")
    _quant_flags(p)
    _parallel_flags(p)
    _sampling_flags(p)

    cli_embed.add_parser(sub)
    cli_serve.add_parser(sub)
    sub.add_parser("launch", add_help=False,  # run by dsjax.launch, listed here for --help
                   help="N local processes of one dsjax command over one mesh "
                   "(dsjax launch -n N -- generate ...; see dsjax launch -h)")
    _bench_parser(sub)

    p = sub.add_parser("convert", help="convert an HF checkpoint into a dsjax checkpoint",
                       description="Reads an HF checkpoint directory (safetensors, no torch needed) "
                       "or a GGUF file (its quantized weights kept as they are) and writes an orbax checkpoint + dsjax.json (with a checksum of every "
                       "stored file) + tokenizer files to OUT_DIR, whole or not at all.")
    p.add_argument("hf_dir", help="HF checkpoint directory (config.json + *.safetensors) or a "
                   ".gguf file")
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="stored dtype (default bf16)")
    _quant_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; an expected error is one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "serve"]:  # the load generator: a client, its own flags
        from dsjax import bench_serve

        return bench_serve.main(argv[2:])
    if argv[:1] == ["launch"]:  # N processes of one command (jax.distributed): its own flags
        from dsjax import launch

        return launch.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.no_compilation_cache:
        os.environ["DSJAX_COMPILATION_CACHE"] = "0"
    commands = {"demo": demo, "generate": generate, "embed": cli_embed.embed, "convert": convert,
                "bench": bench, "serve": cli_serve.serve}
    with _log_to_stderr(args.quiet):
        try:
            return commands[args.command](args)
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"dsjax {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if args.debug or not isinstance(e, _expected_errors()):
                raise
            print(f"dsjax {args.command}: {_one_line(e)}", file=sys.stderr)
            return 2


def _expected_errors() -> tuple:
    """What a user's input or environment causes (converters.CheckpointError is a ValueError;
    OSError covers missing, existing, unwritable paths and full disks); anything else is a bug
    and keeps its traceback."""
    errors = (ValueError, TypeError, OSError, NotImplementedError)
    policy = sys.modules.get("dsjax.policy")  # loaded whenever it can have raised
    return errors + ((policy.Unsupported,) if policy else ())


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:  # raised by the OS itself
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def _log_to_stderr(quiet: bool):
    """The "dsjax" loggers print their lines (INFO, or WARNING with -q) to stderr for the
    command's duration. A handler of its own: orbax's absl logging configures the root logger
    at import, so logging.basicConfig would do nothing."""
    log = logging.getLogger("dsjax")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = log.level, log.propagate
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.addHandler(handler)
    log.propagate = False  # the root's handler would print each line twice
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


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

    _check_report_dir(args.out)
    engine = dsjax.init_inference(
        _decoder_source(args.model), dtype=args.dtype, max_out_tokens=args.prompt_len + args.new_tokens,
        seed=args.seed, quant=_quant(args), replace_with_kernel_inject=args.kernels == "on",
        kv_cache_dtype=args.kv_cache_dtype, progress=not args.quiet, **_parallel(args))
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


def _check_report_dir(out: str) -> None:
    """--out must be a directory (or not exist yet) that can be written, checked before the run."""
    from dsjax.checkpoint import writable_dir

    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    writable_dir(out)


def _decoder_source(model: str):
    """The model's source, opened without reading its weights: generate and bench need a
    decoder."""
    from dsjax.sources import open_source

    source = open_source(model)
    if source.config.encoder is not None:
        raise ValueError(f"{model} is an encoder ({source.config.family}); use dsjax embed")
    return source


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

    out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, quant=_quant(args),
                             progress=not args.quiet)
    print(f"wrote dsjax checkpoint {out}")
    return 0


def generate(args) -> int:
    import jax

    import dsjax

    from dsjax.sources import load_tokenizer

    source = _decoder_source(args.model)
    tok = load_tokenizer(source.tokenizer_dir, source.random_weights)  # before any weight
    prompts = [tok.encode(p) for p in args.prompt]
    engine = dsjax.init_inference(source, dtype=args.dtype, max_out_tokens=args.max_out_tokens,
                                  seed=args.seed, quant=_quant(args),
                                  replace_with_kernel_inject=args.kernels == "pallas",
                                  kv_cache_dtype=args.kv_cache_dtype, progress=not args.quiet,
                                  **_parallel(args))
    options = {k: getattr(args, k) for k in GENERATION_FLAGS if getattr(args, k) is not None}
    key = jax.random.key(args.seed)
    if args.stream:
        if len(prompts) != 1 or args.logprobs:
            raise ValueError("--stream prints one prompt's text (and no --logprobs)")
        return _stream(engine, tok, prompts[0], key, options)
    out = engine.generate(prompts, prng_key=key, return_logprobs=args.logprobs, **options)
    for i, new in enumerate(out.sequences):
        print(f"[{i}] {tok.decode(list(prompts[i // (len(out.sequences) // len(prompts))]) + new)}")
        if args.logprobs:
            print("    logprobs: " + " ".join(f"{x:.3f}" for x in out.logprobs[i, : len(new)]))
    return 0


def _stream(engine, tok, prompt, key, options) -> int:
    """Prints the prompt, then the text each step adds (whole characters only)."""
    from dsjax.serving.detokenize import IncrementalText

    text, made = IncrementalText(tok, prompt), []
    print(tok.decode(list(prompt)), end="", flush=True)
    for new in engine.stream(list(prompt), prng_key=key, **options):
        made += new
        print(text.delta(made), end="", flush=True)
    print(text.delta(made, final=True), flush=True)
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
    engine = dsjax.init_inference(source, dtype=args.dtype, max_out_tokens=budget, seed=args.seed,
                                  progress=not args.quiet)
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
    theirs, hf_ms = _hf_generate(hf_model, prompt, n, engine.pad_token_id, args.runs)
    same = sum(a == b for a, b in zip(ours, theirs))
    agree = ours == theirs
    print(f"HF transformers (torch, eager): median {hf_ms:.1f} ms = "
          f"{hf_ms / max(len(theirs), 1):.2f} ms/token over {args.runs} runs")
    print(f"token agreement with HF: {'identical' if agree else 'DIFFERENT'} "
          f"({same}/{max(len(ours), len(theirs))} positions equal)")
    return 0 if agree else 1


def _hf_generate(model, prompt: list[int], n: int, pad: int, runs: int) -> tuple[list, float]:
    """HF's greedy tokens and median ms over `runs` timed calls after a warm-up (as dsjax's)."""
    import torch

    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad,
                  attention_mask=torch.ones_like(ids))
    times = []
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up
        for _ in range(max(runs, 1)):
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            times.append((time.perf_counter() - t0) * 1e3)
    return out[0, len(prompt):].tolist(), statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
