"""Plots of benchmarks/compare.py results (matplotlib, imported when a plot is made).

    python benchmarks/plot_compare.py [benchmarks/results/compare-*.json] [--out DIR]

For each results file, compare-MODEL.png: decode ms/token against batch size per system with
the weight-read floor, and the bs-1 latency of a full generate per system. With the files of
several models, compare.png: bs-1 ms/token per system, grouped by model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def ok_rows(payload: dict) -> list[dict]:
    return [r for r in payload["rows"] if r["status"] == "ok"]


def series(payload: dict) -> dict[str, list[tuple[int, float]]]:
    """label -> [(batch, decode ms/token)], batches ascending, systems in run order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in ok_rows(payload):
        out.setdefault(r["label"], []).append((r["batch"], r["decode_ms_per_token"]))
    return {k: sorted(v) for k, v in out.items()}


def floor_series(payload: dict) -> list[tuple[int, float]]:
    return sorted({r["batch"]: r["floor_ms"] for r in ok_rows(payload) if r.get("floor_ms")}.items())


def bs1_latency(payload: dict, key: str = "p50") -> dict[str, float]:
    """label -> the bs-1 latency (ms) of a full generate, for systems that ran at bs 1."""
    return {r["label"]: r["latency_ms"][key] for r in ok_rows(payload) if r["batch"] == 1}


def bs1_failed(payload: dict) -> list[str]:
    """Labels of the systems that failed (or were skipped) at bs 1."""
    return [r["label"] for r in payload["rows"] if r["batch"] == 1 and r["status"] != "ok"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(payload: dict) -> str:
    env, a = payload["env"], payload["args"]
    return (f"{a['model']}, {a['dtype']}, {a['prompt_len']} + {a['new_tokens']} tokens; "
            f"{env.get('torch_device') or env['device']}, commit {env['git_commit']}")


def plot_model(payload: dict, path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    for label, points in series(payload).items():
        left.plot([b for b, _ in points], [t for _, t in points], marker="o", label=label)
    floor = floor_series(payload)
    if floor:
        left.plot([b for b, _ in floor], [t for _, t in floor], "k--", marker="_", markersize=14,
                  label="weight + KV read floor")
    batches = sorted({r["batch"] for r in ok_rows(payload)})
    left.set_xscale("log", base=2)
    left.set_xticks(batches, [str(b) for b in batches])
    left.minorticks_off()
    left.set_ylim(bottom=0)
    left.set(xlabel="batch size", ylabel="decode ms/token (one step of the whole batch)",
             title="decode ms per token")
    if left.lines:
        left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    left.grid(True, alpha=0.3)
    bars = bs1_latency(payload)
    if bars:
        names = list(bars)
        right.barh(names, [bars[n] for n in names], color="tab:blue")
        for i, n in enumerate(names):
            right.text(bars[n], i, f" {bars[n]:.0f}" if bars[n] >= 100 else f" {bars[n]:.3g}",
                       va="center", fontsize=8)
        right.invert_yaxis()
    right.set(xlabel="ms (P50 of a full generate)", title="batch 1 latency")
    fig.suptitle(_title(payload), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_models(payloads: list[dict], path) -> Path:
    """bs-1 ms/token per system, one group of bars per model."""
    plt = _pyplot()
    per_model = {p["args"]["model"]: {k: v / p["args"]["new_tokens"] for k, v in bs1_latency(p).items()}
                 for p in payloads}
    failed = {p["args"]["model"]: bs1_failed(p) for p in payloads}
    labels = list(dict.fromkeys([k for d in per_model.values() for k in d]
                                + [k for f in failed.values() for k in f]))
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(per_model)), 5))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [j + i * width for j, d in enumerate(per_model.values()) if label in d]
        ys = [d[label] for d in per_model.values() if label in d]
        ax.bar(xs, ys, width, label=label, color=f"C{i}")
        for j, model in enumerate(per_model):
            if label in failed[model]:
                ax.text(j + i * width, 0, " failed", rotation=90, ha="center", va="bottom", fontsize=8,
                        color=f"C{i}")
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(per_model))], list(per_model))
    ax.set(ylabel="ms/token (P50 / new tokens)", title="batch 1, full generate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: beside each results file")
    args = p.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("compare-*.json"))
    payloads = [json.loads(f.read_text()) for f in files]
    for f, payload in zip(files, payloads):
        print(plot_model(payload, (args.out or f.parent) / f"{f.stem}.png"))
    if files:
        print(plot_models(payloads, (args.out or files[0].parent) / "compare.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
