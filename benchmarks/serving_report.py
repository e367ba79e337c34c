"""benchmarks/serving.py's report: the markdown tables, the plot and the closing summary."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks import harness


def _f(x, fmt=".1f"):
    return "-" if x is None else format(x, fmt)


def _throughput_rows(res: dict) -> list[tuple]:
    rows = []
    off = res.get("serving", {}).get("offline")
    if off:
        rows.append(("dsjax serving engine", off))
    for s in res.get("static", []):
        rows.append((f"dsjax static generate, batch {s['batch']}", s))
    if "hf" in res:
        hf = res["hf"]
        rows.append((f"HF transformers {hf.get('transformers', '')} continuous batching"
                     + (" (timed out: finished requests only)" if hf.get("timed_out") else ""), hf))
    return rows


def best_static(res: dict) -> float | None:
    ok = [s["output_tokens_per_s"] for s in res.get("static", []) if "error" not in s]
    return max(ok) if ok else None


def markdown(res: dict) -> str:
    env, tr = res["env"], res["trace"]
    lines = [f"# Serving: {res['args']['model']}, bf16, {env.get('device')}", "",
             f"commit {env.get('git_commit')}, jax {env.get('jax')}, {env.get('date')}. Trace: "
             f"{tr['requests']} requests, {tr['prompt_tokens']} prompt tokens "
             f"({res['args']['prompt_len']}), {tr['output_tokens']} output tokens "
             f"({res['args']['output_len']}); token budget {res['args']['token_budget']}, up to "
             f"{res['args']['max_seqs']} sequences, blocks of {res['args']['block_size']}, "
             f"decode bursts of {res.get('serving', {}).get('decode_steps', 1)} steps.", "",
             "| system | output tok/s | total tok/s | seconds | output vs best static |",
             "| --- | --- | --- | --- | --- |"]
    best = best_static(res)
    for label, r in _throughput_rows(res):
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | |")
            continue
        ratio = r["output_tokens_per_s"] / best if best else None
        lines.append(f"| {label} | {_f(r['output_tokens_per_s'], '.0f')} | "
                     f"{_f(r['total_tokens_per_s'], '.0f')} | {_f(r['duration_s'], '.2f')} | "
                     f"{_f(ratio, '.2f')}x |")
    lines += _engine_lines(res) + _poisson_lines(res) + _bursts_lines(res)
    if "check" in res:
        lines += ["", "Pallas paged attention against the XLA reference (6 requests x 24 greedy "
                      "tokens, two engines of the same weights):", ""]
        for dtype, c in res["check"].items():
            lines.append(f"- {dtype}: {c['tokens_equal_before_divergence']:.0%} of tokens equal "
                         f"before the first divergence, max |log-prob difference| "
                         f"{c['max_abs_logprob_diff']:.2e} up to it.")
    return "\n".join(lines) + "\n"


def _engine_lines(res: dict) -> list[str]:
    srv = res.get("serving")
    if not srv:
        return []
    off, ceil = srv["offline"], res["ceilings"]
    roof, ov = off["roofline"], off["overlap"]
    return ["", f"Warm-up: {srv['warmup']['programs']} step programs compiled in "
                f"{srv['warmup']['seconds']:.1f} s. Ceilings measured in this run: GEMV "
                f"{ceil['bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {ceil['flops_per_s'] / 1e12:.0f} "
                f"TFLOP/s.", "",
            f"Roofline of the trace over the engine's {ov['steps']} steps: {roof['floor_s']:.2f} s; "
            f"the engine took {off['duration_s']:.2f} s: **{roof['floor_s'] / off['duration_s']:.2f}x "
            f"of the roofline**. Preemptions {off['preemptions']}, prefix-cache blocks "
            f"{off['prefix_hits']}.", "",
            f"Overlap (steady steps): the host waited for the previous step in "
            f"{_f(ov['waited_fraction'] and ov['waited_fraction'] * 100, '.0f')}% of them; host "
            f"preparation P50 {_f(ov['prepare_ms_p50'], '.2f')} ms, step interval P50 "
            f"{_f(ov['step_ms_p50'], '.2f')} ms."]


def _poisson_lines(res: dict) -> list[str]:
    runs = res.get("serving", {}).get("poisson", [])
    if not runs:
        return []
    lines = ["", f"Poisson arrivals ({runs[0]['requests']} requests; rate = fraction x the "
                 "offline request throughput). Milliseconds; effective throughput: requests/s "
                 "meeting FastGen's SLA at 2 / 4 / 6 tokens/s.", "",
             "| fraction | req/s | out tok/s | TTFT P50/P95/P99 | TPOT P50/P95/P99 | "
             "ITL P50/P95/P99 | E2E P50 | effective 2/4/6 | TPOT P95 / decode floor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        trio = lambda d: "/".join(_f(d[k]) for k in ("p50", "p95", "p99"))  # noqa: E731
        eff = "/".join(_f(v, ".2f") for v in r["effective_throughput"].values())
        floor = r["roofline"]["decode_floor_ms_p50"]
        ratio = r["tpot_ms"]["p95"] / floor if floor and r["tpot_ms"]["p95"] else None
        lines.append(f"| {r['fraction']:.2f} | {r['rate']:.2f} | {r['output_tokens_per_s']:.0f} | "
                     f"{trio(r['ttft_ms'])} | {trio(r['tpot_ms'])} | {trio(r['itl_ms'])} | "
                     f"{_f(r['e2e_ms']['p50'])} | {eff} | {_f(ratio, '.2f')}x |")
    return lines


def _bursts_lines(res: dict) -> list[str]:
    """The engine at each --decode-steps value of the run (decode bursts), the first one's
    figures again for comparison."""
    runs = [res["serving"]] + res.get("bursts", []) if "serving" in res else []
    if len(runs) < 2:
        return []
    fractions = [p["fraction"] for p in runs[0]["poisson"]]
    lines = ["", "Decode bursts (the same trace, and the same Poisson arrivals: fractions of "
                 "the first row's request throughput; TPOT P95 over the decode floor):", "",
             "| decode steps | programs | out tok/s | roofline | host waited | step ms P50 | "
             + " | ".join(f"TPOT P95/floor at {f:.2f}" for f in fractions) + " |",
             "| --- " * (6 + len(fractions)) + "|"]
    for run in runs:
        off = run["offline"]
        ratios = []
        for p in run["poisson"]:
            floor = p["roofline"]["decode_floor_ms_p50"]
            ratios.append(p["tpot_ms"]["p95"] / floor if floor and p["tpot_ms"]["p95"] else None)
        ov = off["overlap"]
        lines.append(f"| {run['decode_steps']} | {run['warmup']['programs']} | "
                     f"{off['output_tokens_per_s']:.0f} | "
                     f"{off['roofline']['floor_s'] / off['duration_s']:.2f}x | "
                     f"{_f(ov['waited_fraction'] and ov['waited_fraction'] * 100, '.0f')}% | "
                     f"{_f(ov['step_ms_p50'], '.2f')} | "
                     + " | ".join(f"{_f(r, '.2f')}x" for r in ratios) + " |")
    return lines


def plot(res: dict, name: str) -> None:
    runs = res.get("serving", {}).get("poisson", [])
    if not runs:
        return
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(rates, [r["output_tokens_per_s"] for r in runs], "o-", label="output tokens/s")
    a2 = a.twinx()
    a2.plot(rates, [r["effective_throughput"]["4 tok/s"] for r in runs], "s--", color="C1",
            label="effective req/s (4 tok/s SLA)")
    a.set_xlabel("arrival rate (requests/s)")
    a.set_ylabel("output tokens/s")
    a2.set_ylabel("effective requests/s")
    a.set_title("throughput vs rate")
    for metric, color in (("ttft_ms", "C0"), ("tpot_ms", "C2")):
        for p, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            b.plot(rates, [r[metric][p] for r in runs], style, color=color,
                   label=f"{metric[:4].upper()} {p.upper()}")
    b.set_yscale("log")
    b.set_xlabel("arrival rate (requests/s)")
    b.set_ylabel("ms")
    b.set_title("latency percentiles")
    b.legend(fontsize=7)
    fig.suptitle(f"dsjax serving, {res['args']['model']}, {res['env'].get('device')}")
    fig.tight_layout()
    for d in dict.fromkeys([harness.RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])):
        fig.savefig(Path(d) / f"{name}.png", dpi=110)


def summary(res: dict) -> str:
    best, out = best_static(res), []
    off = res.get("serving", {}).get("offline")
    if off and best:
        out.append(f"serving / best static: {off['output_tokens_per_s'] / best:.2f}x (goal >= 2)")
    if off:
        out.append(f"serving / roofline: {off['roofline']['floor_s'] / off['duration_s']:.2f}x (goal >= 0.6)")
    if "hf" in res and off and "output_tokens_per_s" in res["hf"]:
        out.append(f"serving / HF: {off['output_tokens_per_s'] / res['hf']['output_tokens_per_s']:.1f}x")
    if "check" in res:
        out.append(f"check: {res['check']}")
    return "\n".join(out)
