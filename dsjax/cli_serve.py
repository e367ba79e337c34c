"""`dsjax serve MODEL`: the OpenAI-compatible server (dsjax.serving.server) on uvicorn.

It listens at once (/health answers), compiles every step shape in the background, and reports
ready (/ready 200, requests served) when that is done. SIGTERM or Ctrl-C: no new connections,
in-flight requests run to their end (up to --drain-timeout seconds), then it exits. SIGUSR1
prints every thread's Python stack to stderr (what a server that seems stuck is doing).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path

from dsjax.cli_embed import DTYPES


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("model", help="HF directory, dsjax checkpoint or built-in name (tiny-llama, ...)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--quant", choices=("int8", "int4"), help="weight-only quantization")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="attention: the Pallas attention and paged-KV kernels with XLA's GEMMs "
                   "(the serving benchmark's fastest); pallas: every Pallas kernel "
                   "(replace_with_kernel_inject); xla: none; auto (default): attention on a GPU, "
                   "xla elsewhere (the CPU interprets Pallas kernels)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    p.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per step (SplitFuse budget)")
    p.add_argument("--max-model-len", type=int, help="prompt + output tokens per request")
    p.add_argument("--kv-cache-memory", type=float, default=0.9,
                   help="fraction of the device memory left after the weights for KV blocks")
    p.add_argument("--num-blocks", type=int, help="KV blocks (instead of --kv-cache-memory)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=1,
                   help="decode steps per step program while every sequence decodes and none "
                   "waits (decode bursts: the host's per-step work once per burst; default 1)")
    p.add_argument("--served-model-name", help="the model id clients send (default: MODEL)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--chat-template", type=Path, help="a Jinja chat template file (default: the tokenizer's)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests waiting for their first token before new ones get 429")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0, help="for random-weight models")


KERNELS = ("auto", "attention", "pallas", "xla")


def kernel_policy(name: str, backend: str):
    """--kernels as a KernelPolicy on `backend` (jax.default_backend())."""
    from dsjax.policy import KernelPolicy

    if name == "auto":
        name = "attention" if backend == "gpu" else "xla"
    attention = KernelPolicy.pallas(linear="xla", experts="xla")  # Pallas attention, XLA GEMMs
    return {"attention": attention, "pallas": KernelPolicy.pallas(),
            "xla": KernelPolicy()}[name]


def serve(args) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # (a load that hangs, too)
    import jax
    import uvicorn

    from dsjax.serving.llm import LLM
    from dsjax.serving.server import create_app

    template = args.chat_template.read_text() if args.chat_template else None
    quant = {"bits": 8 if args.quant == "int8" else 4} if args.quant else None
    options = dict(dtype=args.dtype, progress=False, seed=args.seed, max_seqs=args.max_num_seqs,
                   token_budget=args.max_batched_tokens, block_size=args.block_size,
                   memory_fraction=args.kv_cache_memory, num_blocks=args.num_blocks,
                   decode_steps=args.decode_steps,
                   kernels=kernel_policy(args.kernels, jax.default_backend()))
    if args.max_model_len:
        options.update(max_out_tokens=args.max_model_len, max_model_len=args.max_model_len)
    if args.tp > 1:
        options["tensor_parallel"] = {"tp_size": args.tp}
    if quant:
        options["quant"] = quant
    llm = LLM(args.model, **options)
    app = create_app(llm, args.served_model_name or args.model, api_key=args.api_key,
                     max_waiting=args.max_waiting, chat_template=template, fatal_warmup=True)
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again under the handlers it
    # found: these make that a clean exit (status 0) instead of death by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: _exit(app.state.server))
    print(f"dsjax serve: listening on http://{args.host}:{args.port} (ready when /ready says "
          "so: the step programs compile first)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.drain_timeout)
    return 0


def _exit(srv) -> None:
    """Exits 0. Stopped while warming up, without Python's shutdown: the warm-up thread may be
    inside XLA, and finalizing the interpreter under it aborts the process."""
    if srv.failed is None and not srv.ready.is_set():
        print("dsjax serve: stopped while warming up", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(0)
    sys.exit(0)
