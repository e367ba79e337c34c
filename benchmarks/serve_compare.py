"""`dsjax serve` against `transformers serve --continuous-batching` on the same weights, through
the same load generator (`dsjax bench serve`), at the same request rates.

    python benchmarks/serve_compare.py [--arch llama3.2-1b] [--num-prompts 200] [--rates 2,8,inf]

The model: a built-in architecture (dsjax/presets.py) with random weights, saved once as an HF
directory (bf16 safetensors) with a small word-level tokenizer and no EOS token (so every
answer runs to its max_tokens on both servers: random weights have no meaningful end; every
token of the model's vocabulary is a word), which both servers load. Prompts are random words (transformers serve takes only text prompts), one
word per token of the intended length; each server reports the prompt tokens it saw. For each
server: start it on 127.0.0.1, wait until it answers, send a warm-up burst (not reported), run
the load at every rate, stop it.
Writes benchmarks/results/NAME.json/.md (+ $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SERVER_ENV = dict(os.environ)  # the servers' environment: as this script was started
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only sends load: the GPU is the servers'

from benchmarks import harness  # noqa: E402



def words(vocab_size: int) -> list[str]:
    """The word tokenizer's vocabulary: token i + 1 is the word f"w{i}" (bench serve's
    random-text prompts), token 0 "<unk>". It covers the model's whole vocabulary, so that every
    token the model samples is a word of text: a token without text streams nothing, and both
    servers would hold their chunks until a token with text came (tokens then arrive in a few
    bursts, and TTFT and TPOT measure the bursts, not the tokens)."""
    return ["<unk>"] + [f"w{i}" for i in range(vocab_size - 1)]


def model_dir(arch: str, out: Path) -> Path:
    """A random-weight HF checkpoint of `arch` with a word tokenizer and no EOS."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsjax import presets

    hf = {k: v for k, v in presets.hf_config(arch).items() if k not in ("eos_token_id", "bos_token_id")}
    config = transformers.AutoConfig.for_model(**hf)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # (the GPU inits faster)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # (the GPU is the servers')
    vocab = {w: i for i, w in enumerate(words(config.vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out)
    return out


def server_command(system: str, path: Path, port: int, args) -> list[str]:
    if system == "dsjax":
        return [sys.executable, "-m", "dsjax.cli", "serve", str(path), "--port", str(port),
                "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
                "--max-batched-tokens", str(args.max_batched_tokens),
                "--max-model-len", str(args.max_model_len), "--max-waiting", "100000",
                "--num-blocks", str(args.num_blocks or pool_blocks(args))]
    return ["transformers", "serve", str(path), "--continuous-batching", "--port", str(port)]


def pool_blocks(args) -> int:
    """dsjax's KV pool for the comparison: every sequence slot at max_model_len, 16-token blocks
    (the default pool, 0.9 of the free memory, holds far more for a 1B model on a GPU, and
    costs more to allocate)."""
    return args.max_num_seqs * -(-args.max_model_len // 16)


def wait_ready(proc, url: str, system: str, timeout: float) -> None:
    import httpx2 as httpx

    path = "/ready" if system == "dsjax" else "/health"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{system} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    if system == "dsjax":  # its threads' stacks into its log, to say where it stands
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(3)
    raise TimeoutError(f"{system} was not ready within {timeout:.0f} s")


def run_system(system: str, path: Path, args, port: int) -> list[dict]:
    from dsjax import bench_serve

    log_path = Path(os.environ.get("OUT", tempfile.gettempdir())) / f"{system}-server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(server_command(system, path, port, args), stdout=log, env=SERVER_ENV,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url, rows = f"http://127.0.0.1:{port}", []
    try:
        wait_ready(proc, url, system, args.ready_timeout)
        start = next((line.strip() for line in open(log_path)
                      if line.startswith("dsjax: ") and ", on " in line), None)  # (kernels too)
        device = start.rsplit(", on ", 1)[1] if start else None
        for seed, rate in enumerate(["warmup"] + args.rates):  # warmup: a burst, not reported
            load = ["--url", url, "--model", str(path), "--dataset", "random-text",
                    "--no-ignore-eos", "--input-len", args.input_len,
                    "--output-len", args.output_len, "--seed", str(seed),  # (no prompt twice:
                    # dsjax's prefix cache would serve a repeat)
                    "--out", tempfile.gettempdir(), "--name", f"{system}-{rate}",
                    *(["--num-prompts", str(args.warmup), "--request-rate", "inf"]
                      if rate == "warmup" else
                      ["--num-prompts", str(args.num_prompts), "--request-rate", str(rate)])]
            bench_serve.main(load)
            if rate == "warmup":
                continue
            fig = json.loads((Path(tempfile.gettempdir()) / f"{system}-{rate}.json").read_text())
            fig.pop("samples_ms", None)
            rows.append(dict(fig, system=system, rate=rate, server_device=device,
                             server_start=start))
    except Exception as e:  # noqa: BLE001 (the report says so)
        rows.append({"system": system, "error": harness.error_line(e)})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    return rows


def markdown(rows: list[dict], env: dict, args) -> str:
    lines = [f"# dsjax serve vs transformers serve ({env.get('device')}, {args.arch}, "
             f"{args.num_prompts} requests, prompts {args.input_len}, outputs {args.output_len})",
             "", "| system | rate | req/s | out tok/s | TTFT P50/P99 ms | TPOT P50/P99 ms | "
             "ITL P99 ms | failed |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | | {r['error']} | | | | | |")
            continue
        two = lambda d: "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p99"))  # noqa: E731
        name = r["system"] + (f" ({r['server_device']})" if r.get("server_device") else "")
        lines.append(f"| {name} | {r['rate']} | {r['request_throughput']:.2f} | "
                     f"{r['output_tokens_per_s']:.0f} | {two(r['ttft_ms'])} | {two(r['tpot_ms'])} | "
                     f"{r['itl_ms']['p99'] or 0:.1f} | {r['failures']} |")
    lines += ["", harness.versions_line(env)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama3.2-1b")
    p.add_argument("--systems", default="dsjax,transformers")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--rates", type=lambda t: t.split(","), default=["2", "8", "inf"])
    p.add_argument("--input-len", default="64,1024")
    p.add_argument("--output-len", default="16,256")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-batched-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=1536)
    p.add_argument("--num-blocks", type=int, help="dsjax's KV blocks (default: max-num-seqs "
                   "sequences of max-model-len tokens)")
    p.add_argument("--warmup", type=int, default=16, help="requests sent first, not reported "
                   "(the first requests pay one-time costs: CUDA graphs, allocator growth)")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--name", default="serve-compare")
    p.add_argument("--model-dir", help="keep the checkpoint here (written if absent; one "
                   "already there is used as it is, whatever --arch says)")
    args = p.parse_args(argv)
    # a `timeout` stops this script with SIGTERM: exit through the `finally`s that stop servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    env, rows = harness.environment(), []
    env["device"] = harness.nvidia_smi("name") or env["device"]  # (this process runs on the CPU)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model_dir or Path(tmp) / "model")
        if not (path / "config.json").exists():
            model_dir(args.arch, path)
        for i, system in enumerate(args.systems.split(",")):
            rows += run_system(system, path, args, 8400 + i)
            harness.save(args.name, {"env": env, "args": vars(args), "rows": rows},
                         markdown(rows, env, args))
    print(markdown(rows, env, args))


if __name__ == "__main__":
    main()
