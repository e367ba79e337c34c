"""`dsjax bench serve`: a load generator for any OpenAI-compatible server (dsjax serve,
transformers serve, vLLM, ...), measuring what its clients see.

    dsjax bench serve --url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4 \\
        [--burstiness 1] [--dataset random|FILE.jsonl] [--input-len 64,2048] \\
        [--output-len 16,512] [--max-concurrency 64] [--slo-ttft-ms 500 --slo-tpot-ms 50]

Requests go to /v1/completions with stream: true and usage in the last chunk; arrivals are a
gamma process of the given rate (burstiness 1: Poisson; below 1 burstier; --request-rate inf:
all at once), at most --max-concurrency in flight. The random dataset sends prompts of token ids
(below 256, valid for any vocabulary) of uniformly drawn lengths and asks for log-uniformly drawn
output lengths with ignore_eos; a JSONL file gives {"prompt": ..., "max_tokens": n} per line.
Reports dsjax.serving.metrics' figures (TTFT, TPOT, ITL, E2E at P50/P90/P95/P99, request and
token throughput, FastGen's effective throughput) and goodput under the SLOs given, as
NAME.json + NAME.md in --out, and NAME.png (the TTFT, TPOT and ITL distributions) where
matplotlib is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from dsjax.serving.metrics import RequestTiming, summarize


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsjax bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="the served model id (default: the server's first)")
    p.add_argument("--api-key")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, or inf")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1: Poisson)")
    p.add_argument("--dataset", default="random",
                   help="random (token-id prompts), random-text (prompts of random words, for "
                        "servers that take only text), or a JSONL file")
    p.add_argument("--input-len", type=_pair, default=(64, 2048), help="LO,HI prompt tokens")
    p.add_argument("--output-len", type=_pair, default=(16, 512), help="LO,HI output tokens")
    p.add_argument("--no-ignore-eos", action="store_true", help="let answers end at EOS")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    p.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT at most this")
    p.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT at most this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--name", default="bench-serve")
    return p


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: want LO,HI with 1 <= LO <= HI")
    return lo, hi


def random_requests(n: int, input_len, output_len, seed: int, vocab: int = 256) -> list[dict]:
    """n requests {"prompt": ids, "max_tokens": m}: prompt lengths uniform in input_len
    (LO, HI), output lengths log-uniform in output_len, ids in [10, vocab) (below 256: valid
    for any vocabulary)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(input_len[0], input_len[1] + 1, n)
    lo, hi = np.log(output_len[0]), np.log(output_len[1])
    outs = np.exp(rng.uniform(lo, hi, n)).round().astype(int)
    return [{"prompt": rng.integers(10, vocab, int(p)).tolist(), "max_tokens": int(o)}
            for p, o in zip(lens, outs)]


def dataset(args) -> list[dict]:
    """[{"prompt": text or ids, "max_tokens": n}] * num_prompts."""
    if args.dataset not in ("random", "random-text"):
        rows = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line.strip()]
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or "prompt" not in r]
        if bad:
            raise ValueError(f"{args.dataset}: line {bad[0] + 1} has no 'prompt'")
        return [dict(rows[i % len(rows)]) for i in range(args.num_prompts)]
    rows = random_requests(args.num_prompts, args.input_len, args.output_len, args.seed)
    if args.dataset == "random-text":  # one word per intended token (the server counts them)
        rows = [dict(r, prompt=" ".join(f"w{i}" for i in r["prompt"])) for r in rows]
    return rows


def arrivals(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start: a gamma process (shape burstiness, mean gap 1/rate)."""
    if rate == float("inf"):
        return [0.0] * n
    gaps = np.random.default_rng(seed + 1).gamma(burstiness, 1.0 / (rate * burstiness), n)
    return list(np.cumsum(gaps) - gaps[0])


async def one(client, args, model: str, row: dict, t: RequestTiming, start: float) -> str | None:
    """Streams one request into t (chunk times, usage); returns an error line or None."""
    body = dict(row, model=model, stream=True, stream_options={"include_usage": True})
    if args.dataset == "random" and not args.no_ignore_eos:
        body["ignore_eos"] = True
    try:
        async with client.stream("POST", f"{args.url}/v1/completions", json=body,
                                 timeout=args.timeout) as r:
            if r.status_code != 200:
                return f"{r.status_code}: {(await r.aread()).decode()[:200]}"
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("choices"):
                    t.token_times.append(time.perf_counter() - start)
                if chunk.get("usage"):
                    t.output_tokens = chunk["usage"]["completion_tokens"]
                    t.prompt_tokens = chunk["usage"].get("prompt_tokens") or t.prompt_tokens
    except Exception as e:  # noqa: BLE001 (counted as a failed request)
        return f"{type(e).__name__}: {e}"
    return None


async def run(args) -> dict:
    import httpx2 as httpx  # the HTTP client the openai package itself uses

    rows = dataset(args)
    when = arrivals(len(rows), args.request_rate, args.burstiness, args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency or len(rows))
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout,
                                 limits=httpx.Limits(max_connections=None)) as client:
        model = args.model or (await client.get(f"{args.url}/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        timings = [RequestTiming(a, _prompt_len(r)) for a, r in zip(when, rows)]

        async def fire(i):
            await asyncio.sleep(max(0.0, when[i] - (time.perf_counter() - start)))
            async with limit:
                timings[i].arrival = time.perf_counter() - start
                return await one(client, args, model, rows[i], timings[i], start)
        errors = await asyncio.gather(*[fire(i) for i in range(len(rows))])
    ok = [t for t, e in zip(timings, errors) if e is None and t.token_times]
    last = max((t.token_times[-1] for t in ok), default=time.perf_counter() - start)
    figures = summarize(ok, max(last, 1e-9))
    figures.update(requests=len(rows), failed=[e for e in errors if e][:10],
                   failures=sum(e is not None for e in errors), model=model,
                   goodput=_goodput(ok, args, last))
    figures["samples_ms"] = {  # every request's TTFT and TPOT, every ITL: for the plot
        "ttft": [t.ttft * 1e3 for t in ok], "tpot": [t.tpot * 1e3 for t in ok if t.tpot],
        "itl": [x * 1e3 for t in ok for x in t.itls]}
    return figures


def _prompt_len(row: dict) -> int:
    p = row["prompt"]
    return len(p) if isinstance(p, list) else len(p.split())  # text: words, as an estimate


def _goodput(ok: list[RequestTiming], args, duration: float) -> float | None:
    """Requests/s meeting both SLOs given (None without SLOs)."""
    if args.slo_ttft_ms is None and args.slo_tpot_ms is None:
        return None
    good = [t for t in ok if (args.slo_ttft_ms is None or t.ttft * 1e3 <= args.slo_ttft_ms)
            and (args.slo_tpot_ms is None or (t.tpot or 0) * 1e3 <= args.slo_tpot_ms)]
    return len(good) / max(duration, 1e-9)


def markdown(fig: dict, args) -> str:
    row = lambda name, d: f"| {name} | " + " | ".join(  # noqa: E731
        "-" if d[k] is None else f"{d[k]:.1f}" for k in ("mean", "p50", "p90", "p95", "p99")) + " |"
    return "\n".join([
        f"# dsjax bench serve: {fig['model']} at {args.url}", "",
        f"{fig['completed']}/{fig['requests']} requests ({fig['failures']} failed), rate "
        f"{args.request_rate} req/s, burstiness {args.burstiness}, concurrency "
        f"{args.max_concurrency or 'unlimited'}, dataset {args.dataset}.", "",
        f"Request throughput {fig['request_throughput']:.2f} req/s; output "
        f"{fig['output_tokens_per_s']:.1f} tok/s; total {fig['total_tokens_per_s']:.1f} tok/s; "
        f"goodput {fig['goodput'] if fig['goodput'] is not None else '-'}; effective throughput "
        f"(FastGen SLA 2/4/6 tok/s) " + " / ".join(f"{v:.2f}" for v in fig["effective_throughput"].values()), "",
        "| ms | mean | P50 | P90 | P95 | P99 |", "| --- | --- | --- | --- | --- | --- |",
        row("TTFT", fig["ttft_ms"]), row("TPOT", fig["tpot_ms"]), row("ITL", fig["itl_ms"]),
        row("E2E", fig["e2e_ms"]), ""])


def plot(fig: dict, path: Path) -> bool:
    """The empirical CDFs of TTFT, TPOT and ITL (ms); False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = plt.subplots(1, 3, figsize=(12, 3.5))[1]
    for ax, (name, values) in zip(axes, fig["samples_ms"].items()):
        v = np.sort(values)
        ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1))
        ax.set_xlabel(f"{name.upper()} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{fig['model']}: {fig['completed']} requests")
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close()
    return True


def main(argv: list[str]) -> int:
    from dsjax.bench import write

    args = parser().parse_args(argv)
    fig = asyncio.run(run(args))
    text = markdown(fig, args)
    write(args.out, args.name, dict(fig, args={k: str(v) for k, v in vars(args).items()}), text)
    plot(fig, Path(args.out) / f"{args.name}.png")
    print(text)
    return 0 if fig["completed"] else 1
