"""benchmarks/serving_parallel.py's report: its markdown tables, and the comparison of the
two-process TP2 run's greedy tokens with the one-process run's."""

from __future__ import annotations

MP = "TP2, 2 processes"  # the two-process row
ORDER = ("TP1", "TP2", "TP4", "dp2 x TP2", MP)  # the rows of a table, in this order


def compare_tokens(one: list[str], two: list[str]) -> dict:
    """Equal, or where the two processes' tokens first differ from one process's."""
    out = {"requests": len(one), "requests_equal": sum(a == b for a, b in zip(one, two))}
    for i, (a, b) in enumerate(zip(one, two)):
        if a != b:
            a, b = a.split(), b.split()
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            at = lambda t: t[j] if j < len(t) else "(ended)"  # noqa: E731
            return dict(out, equal=False, request=i, token=j, one_process=at(a),
                        two_processes=at(b))
    return dict(out, equal=len(one) == len(two))


def tokens_check(rows: dict) -> dict | None:
    one, two = rows.get("TP2", {}).get("tokens"), rows.get(MP, {}).get("tokens")
    return compare_tokens(one, two) if one and two else None


# ----------------------------------------------------------------------------- the report

def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def trio(d: dict) -> str:
    return "/".join(fmt(d[k]) for k in ("p50", "p95", "p99"))


def steps(fig: dict) -> str:
    ov = fig["overlap"]
    waited = ov["waited_fraction"]
    share = fmt(waited if waited is None else 100 * waited, ".0f")
    return f"{fmt(ov['step_ms_p50'], '.2f')} ms, {share}%"


def failed(row: dict) -> str:
    return row.get("error") or f"skipped ({row.get('skipped')})"


def markdown(res: dict) -> str:
    a, t, rows = res["args"], res["trace"], res["rows"]
    env = res.get("env") or next((r["env"] for r in rows.values() if r.get("env")), {})
    lines = [f"# Serving over several devices: {a['model']} (random weights, bf16)", "",
             f"{env.get('device')} x {env.get('device_count')}, jax {env.get('jax')}, commit "
             f"{env.get('git_commit')}, {env.get('date')}. Trace: {t['requests']} requests, "
             f"{t['prompt_tokens']} prompt tokens ({a['prompt_len']}), {t['output_tokens']} output "
             f"tokens ({a['output_len']}), greedy, no stop token. Steps of up to "
             f"{a['token_budget']} tokens and {a['max_seqs']} sequences per replica; KV blocks of "
             f"{a['block_size']} tokens, {a['num_blocks']} per replica (the whole trace); serving "
             f"kernels: {res['kernels']}."]
    envs = [r["env"] for r in [*rows.values(), *res["latency"].values()] if r.get("env")]
    commits, dates = sorted({e.get("git_commit") for e in envs}), sorted(e["date"] for e in envs)
    if len(set(dates)) > 1:
        lines += ["", f"Rows measured from {dates[0]} to {dates[-1]}, at commit "
                      f"{', '.join(map(str, commits))} (each row's `env` in the JSON)."]
    lines += throughput_lines(rows) + poisson_lines(res) + latency_lines(res) + mp_lines(res)
    return "\n".join(lines + ["", f"Command: `{res['command']}`"]) + "\n"


def throughput_lines(rows: dict) -> list[str]:
    base, ref = rows.get("TP1", {}).get("offline"), rows.get("TP1", {}).get("digests")
    lines = ["", "## The trace, all requests at once", "",
             "vs TP1: output tokens/s over TP1's (per GPU: divided by the GPUs). Steps: the step "
             "interval P50, and the share of steady steps in which the host found the previous "
             "step still running (no idle gap). Tokens = TP1: requests whose greedy tokens equal "
             "TP1's (bf16 sums differ with the reduction order).", "",
             "| layout | GPUs | processes | output tok/s | total tok/s | seconds | vs TP1 | "
             "per GPU | steps | warm-up s (programs) | tokens = TP1 |", "|" + "---|" * 11]
    for label in [x for x in ORDER if x in rows]:
        r = rows[label]
        off = r.get("offline")
        if not off:
            lines.append(f"| {label} | {r.get('gpus', '-')} | {r.get('processes', '-')} | "
                         f"{failed(r)} |" + " |" * 7)
            continue
        vs = off["output_tokens_per_s"] / base["output_tokens_per_s"] if base else None
        same = sum(x == y for x, y in zip(r["digests"], ref)) if ref else None
        lines.append(f"| {label} | {r['gpus']} | {r['processes']} | "
                     f"{off['output_tokens_per_s']:.0f} | {off['total_tokens_per_s']:.0f} | "
                     f"{off['duration_s']:.2f} | {fmt(vs, '.2f')} | "
                     f"{fmt(vs and vs / r['gpus'], '.2f')} | {steps(off)} | "
                     f"{r['warmup']['seconds']:.0f} ({r['warmup']['programs']}) | "
                     f"{fmt(same, 'd')}/{len(r['digests'])} |")
    return lines


def poisson_lines(res: dict) -> list[str]:
    a = res["args"]
    rate = ("absolute" if a["rates_per_s"] else
            "fraction x the layout's own request throughput of the all-at-once run")
    lines = ["", "## Poisson arrivals", "",
             f"The first {a['poisson_requests']} requests; rate: {rate}. Milliseconds, "
             "P50/P95/P99; steps as above.", "",
             "| layout | fraction | req/s | out tok/s | TTFT | TPOT | ITL | E2E P50 | steps |",
             "|" + "---|" * 9]
    for label in [x for x in ORDER if x in res["rows"]]:
        r = res["rows"][label]
        for p in r.get("poisson", []):
            if "skipped" in p:
                lines.append(f"| {label} | skipped ({p['skipped']}) |" + " |" * 7)
                continue
            lines.append(f"| {label} | {fmt(p['fraction'], '.2f')} | {p['rate']:.2f} | "
                         f"{p['output_tokens_per_s']:.0f} | {trio(p['ttft_ms'])} | "
                         f"{trio(p['tpot_ms'])} | {trio(p['itl_ms'])} | {fmt(p['e2e_ms']['p50'])} "
                         f"| {steps(p)} |")
        if r.get("error") and r.get("offline"):
            lines.append(f"| {label} | {r['error']} |" + " |" * 7)
    return lines


def latency_lines(res: dict) -> list[str]:
    lat, a = res["latency"], res["args"]
    if not lat:
        return []
    bw = res.get("gemv_bandwidth", {}).get("bytes_per_s")
    base = lat.get("TP1", {}).get("decode_ms_per_token")
    lines = ["", "## bs-1 decode, Pallas kernels", "",
             "KernelPolicy.pallas() (replace_with_kernel_inject=True); a "
             f"{a['latency_prompt']}-token prompt, {a['latency_new']} new tokens, P50 of "
             f"{a['reps']}; decode ms/token = (P50 T({a['latency_new']}) - P50 T(1)) / "
             f"{a['latency_new'] - 1}. Floor: the bytes one device reads per step (its weight "
             "slices, K/V) / the bf16 GEMV's "
             f"{fmt(bw and bw / 1e9, '.0f')} GB/s.", "",
             "| layout | decode ms/token | vs TP1 | floor ms | x floor | TTFT ms | compile s |",
             "|" + "---|" * 7]
    for label, r in lat.items():
        if "decode_ms_per_token" not in r:
            lines.append(f"| {label} | {failed(r)} |" + " |" * 5)
            continue
        ms = r["decode_ms_per_token"]
        lines.append(f"| {label} | {ms:.2f} | {fmt(base and ms / base, '.2f')} | "
                     f"{r['floor_ms']:.2f} | {r['over_floor']:.2f} | {r['ttft_ms']:.1f} | "
                     f"{r['compile_s']:.0f} |")
    return lines


def mp_lines(res: dict) -> list[str]:
    rows, c = res["rows"], res.get("tokens_check")
    if MP not in rows:
        return []
    lines = ["", "## Two processes against one (TP2)", ""]
    if c is None:
        lines.append("- greedy tokens: not compared (the one-process TP2 row or the two-process "
                     "row has no tokens)")
    elif c["equal"]:
        lines.append(f"- greedy tokens of the {c['requests']} requests: **equal**")
    else:
        lines.append(f"- greedy tokens: **differ**, first at request {c['request']}, token "
                     f"{c['token']} (one process {c['one_process']}, two processes "
                     f"{c['two_processes']}); {c['requests_equal']} of {c['requests']} requests "
                     "equal")
    one, two = rows.get("TP2", {}).get("offline"), rows[MP].get("offline")
    if one and two:
        lines.append("- output tokens/s, all requests at once, two processes / one: "
                     f"{two['output_tokens_per_s'] / one['output_tokens_per_s']:.2f} (under "
                     "Poisson arrivals each two-process step also broadcasts process 0's count "
                     "of arrived requests)")
    return lines
