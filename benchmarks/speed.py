"""The project's speed goals on one GPU, each against its baseline measured in the same run:

    python benchmarks/speed.py [--parts attention,int8,gpt2,cold] [--deadline UNIX_TIME]
        [--smoke] [--name NAME] [--out benchmarks/results]

attention: prompt attention through ops.cache_attention as generate's prefill calls it
  (from_start), under KernelPolicy.pallas() ("dsjax": prompts of policy.CUDNN_PROMPT_TOKENS or
  more through cuDNN over K/V copied out of the cache's layout, shorter ones through the flash
  kernel) and with the flash kernel at every length ("dsjax-flash"), each route's largest
  output difference given, against cuDNN
  (jax.nn.dot_product_attention(implementation="cudnn"), given K/V in its own [B, S, KVH, Dh]
  layout), causal, B=1, GQA 32/8 heads x 128, bf16, at T = 512, 2048, 8192, 32768, and with a
  sliding window of 4096 keys (cuDNN's local_window_size) where T is at least twice that.
  Timed by attention.py's time_prefill (median per call, several calls per jit). Goal: cuDNN
  ms / dsjax ms >= 1.
int8: LLaMA-3-8B (random weights) decode ms/token at bs 1 and 8 through compare.py (dsjax
  variants only, each floor its own bytes): bf16 (dsjax-xla, dsjax-pallas), INT8
  (dsjax-int8-pallas, dsjax-int8) and INT4 in groups of 128 (dsjax-int4-pallas). The fastest
  variant of each format against the fastest bf16 one. Goals: INT8 >= 1.8x at bs 1, >= 1.6x at
  bs 8; INT4 >= 2.8x at bs 1.
gpt2: GPT-2 1.3B bs 1 decode (dsjax-pallas, dsjax-xla, through compare.py) over its floor: the
  bytes a step reads (weights, K/V at the mean context) / the bf16 GEMV bandwidth measured in
  this run. Goal: the fastest variant <= 1.25x.
cold: cold_start.py for LLaMA-3-8B (bf16): the first generate of a fresh process without the
  persistent compilation cache against one whose cache the process before filled. No target is
  set; the row's check is that the cache helps (> 1x).

Decode ms/token is dsjax.bench's measure: (P50 T(n) - P50 T(1)) / (n - 1). --deadline (as
compare.py's): parts and rows it leaves no time for are 'skipped' rows, so that a run of one
call writes its report in time; the parts run cold first (its fresh processes share the GPU
with this one, which holds least then), then attention, gpt2, int8. --smoke: tiny shapes and
models, XLA's attention as the reference, for a CPU run. Writes OUT/NAME.{json,md} (default
NAME: speed-PARTS) after every part, and into $OUT when set; each decode part's compare.py
report beside it (speed_PART-MODEL), cold_start.py's in benchmarks/results (and $OUT).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import compare  # noqa: E402  (first: it sets XLA_PYTHON_CLIENT_PREALLOCATE)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import attention, cold_start, harness  # noqa: E402
from benchmarks.harness import error_line  # noqa: E402
from dsjax import ops  # noqa: E402

PARTS = ("cold", "attention", "gpt2", "int8")  # the order they run in
ROW_S = 30  # least time left to start an attention row
COLD_PROCESS_S = 90  # least time left per fresh process of the cold part
DECODE = {  # part -> (dsjax variants in the order they run: a deadline skips the last ones, batch sizes)
    "int8": ("dsjax-xla,dsjax-int8-pallas,dsjax-int4-pallas,dsjax-pallas,dsjax-int8", (1, 8)),
    "gpt2": ("dsjax-pallas,dsjax-xla", (1,)),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part measures; SMOKE: tiny shapes and models for a CPU run."""

    seq_lens: tuple[int, ...] = (512, 2048, 8192, 32768)
    window: int = 4096
    heads: tuple[int, int, int] = (32, 8, 128)  # H, KVH, Dh
    attention_reps: int = 10
    attention_calls: int | None = None  # per jit; None: time_prefill's own choice
    reference: str = "cudnn"  # jax.nn.dot_product_attention's implementation
    llama: str = "llama3-8b"
    gpt2: str = "gpt2-1.3b"
    decode: tuple[str, ...] = ("--prompt-len", "128", "--new-tokens", "128", "--reps", "5", "--warmup", "2")
    cold: tuple[str, str, int, int] = ("llama3-8b", "bf16", 32, 1)  # model, dtype, new tokens, reps


FULL = Sizes()
SMOKE = Sizes(seq_lens=(64, 128), window=32, heads=(4, 2, 64), attention_reps=2, attention_calls=1,
              reference="xla", llama="tiny-llama", gpt2="tiny-gpt2",
              decode=("--prompt-len", "16", "--new-tokens", "6", "--reps", "2", "--warmup", "1"),
              cold=("tiny-gpt2", "fp32", 4, 1))


@dataclasses.dataclass(frozen=True)
class Goal:
    """A goal on one ratio: a report row says the ratio measured and whether it met the target."""

    what: str
    target: float
    at_most: bool = False  # met when the ratio is <= target (else >= target)

    def row(self, part: str, ratio: float | None, measured: str) -> dict:
        met = None if ratio is None else ratio <= self.target if self.at_most else ratio >= self.target
        sign = "<=" if self.at_most else ">="
        return {"part": part, "goal": f"{self.what} {sign} {self.target:g}x", "measured": measured,
                "ratio": ratio, "met": met}


QUANT_TARGETS = (("int8", 1, 1.8), ("int8", 8, 1.6), ("int4", 1, 2.8))  # format, batch, speed over bf16
GPT2_TARGET = 1.25  # decode ms/token over the floor, at most
COLD_GOAL = Goal("first generate of a fresh process: no cache s / filled cache s", 1.0)


class Report:
    """The goal rows of one run, each part's figures, written after every part."""

    def __init__(self, args, sizes: Sizes, env: dict):
        self.args, self.sizes, self.env = args, sizes, env
        self.rows: list[dict] = []
        self.details: dict[str, object] = {}

    def left(self) -> float:
        return math.inf if self.args.deadline is None else self.args.deadline - time.time()

    def add(self, part: str, goal: Goal, ratio: float | None, measured: str) -> None:
        self.rows.append(goal.row(part, ratio, measured))
        print(f"[speed] {self.rows[-1]}", flush=True)

    def skip(self, part: str, goal: Goal) -> None:
        self.add(part, goal, None, f"skipped: {self.left():.0f} s left before the deadline")

    def bandwidth(self) -> dict:
        """The bf16 GEMV ceiling of the floors, measured once (after the cold part)."""
        if "gemv_bandwidth" not in self.env:
            self.env["gemv_bandwidth"] = harness.gemv_bandwidth()
        return self.env["gemv_bandwidth"]

    def payload(self) -> dict:
        return {"env": self.env, "args": vars(self.args), "sizes": dataclasses.asdict(self.sizes),
                "rows": self.rows, "details": self.details}

    def save(self) -> None:
        harness.save(self.args.name, self.payload(), markdown(self.payload()), self.args.out)


# ----------------------------------------------------------------------------- attention

def prompt_fns(T: int, window: int | None, sizes: Sizes):
    """name -> (fn(q, k, v), layout(k)) as attention.time_prefill takes them: dsjax's prompt
    attention over K/V as the cache holds them, under KernelPolicy.pallas() ("dsjax") and with
    its cuDNN route off ("dsjax-flash"), and the reference (the last)."""
    _, _, dim = sizes.heads
    scale, q_pos = dim ** -0.5, jnp.arange(T, dtype=jnp.int32)[None]
    left = None if window is None else (window - 1, 0)  # keys left of the query, itself excluded

    def dsjax(policy):
        def fn(q, k, v):  # a prompt's phase, as generate's prefill calls it
            return ops.cache_attention(q, (k, v), q_pos, scale=scale, window=window,
                                       alibi_slopes=None, policy=policy, from_start=True)
        return fn, lambda k: k

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=left,
                                            implementation=sizes.reference)

    return {"dsjax": dsjax(harness.PALLAS),
            "dsjax-flash": dsjax(harness.pallas(cudnn_prompt_tokens=0)),
            sizes.reference: (reference, lambda k: k.transpose(0, 2, 1, 3))}


def attention_row(T: int, window: int | None, sizes: Sizes) -> dict:
    """Median ms per call of each of prompt_fns (None + its error where it failed)."""
    heads, kv_heads, dim = sizes.heads
    row = {"T": T, "window": window, "ms": {}, "errors": {}}
    fns = prompt_fns(T, window, sizes)
    for name, (fn, layout) in fns.items():
        try:
            row["ms"][name] = attention.time_prefill(fn, layout, T, kv_heads, heads, dim,
                                                     sizes.attention_reps, calls=sizes.attention_calls)
        except Exception as e:  # noqa: BLE001  the row records it
            row["ms"][name], row["errors"][name] = None, error_line(e)
        gc.collect()
    if all(ms is not None for ms in row["ms"].values()):
        row["max_abs_diff"] = max_abs_diff(fns, T, kv_heads, heads, dim)
    return row


def max_abs_diff(fns: dict, T: int, kv_heads: int, heads: int, dim: int) -> dict:
    """dsjax route -> the largest |route - reference| over one bf16 prompt's outputs (each
    given K/V in its own layout)."""
    kq, kk, kv = jax.random.split(jax.random.key(T + 1), 3)
    q = jax.random.normal(kq, (1, T, heads, dim), jnp.bfloat16)
    k, v = (jax.random.normal(x, (1, kv_heads, T, dim), jnp.bfloat16) for x in (kk, kv))
    outs = {name: jax.jit(fn)(q, layout(k), layout(v)).reshape(1, T, -1).astype(jnp.float32)
            for name, (fn, layout) in fns.items()}
    ref = outs.pop(list(fns)[-1])
    return {name: float(jnp.max(jnp.abs(out - ref))) for name, out in outs.items()}


def run_attention(report: Report) -> None:
    s = report.sizes
    specs = [(T, None) for T in s.seq_lens] + [(T, s.window) for T in s.seq_lens if T >= 2 * s.window]
    rows = report.details["attention"] = []
    for T, window in specs:
        shape = f"GQA {s.heads[0]}/{s.heads[1]} x {s.heads[2]}, T={T}" + (f", window {window}" * bool(window))
        goal = Goal(f"causal prompt attention {shape}: {s.reference} ms / dsjax ms (the faster route)", 1.0)
        if report.left() < ROW_S:
            report.skip("attention", goal)
            continue
        row = attention_row(T, window, s)
        rows.append(row)
        ref = row["ms"][s.reference]
        ours = min((row["ms"][n] for n in ("dsjax", "dsjax-flash") if row["ms"][n]), default=None)
        measured = "; ".join(f"{n} " + (f"{ms:.3f} ms" if ms is not None else row["errors"][n])
                             for n, ms in row["ms"].items())
        if "max_abs_diff" in row:
            measured += "; |out - reference| <= " + ", ".join(
                f"{n} {d:.2g}" for n, d in row["max_abs_diff"].items())
        report.add("attention", goal, ref / ours if ours and ref else None, measured)


# ----------------------------------------------------------------------------- decode (compare.py)

def weight_format(variant: str) -> str:
    """bf16, int8 or int4: the weights of a harness.DSJAX_VARIANTS variant."""
    quant = harness.DSJAX_VARIANTS[variant][1].get("quant") or {}
    return f"int{quant['bits']}" if quant else "bf16"


def fastest(rows: list[dict], fmt: str, batch: int) -> dict | None:
    """The measured row of that weight format and batch size with the least decode ms/token."""
    ok = [r for r in rows
          if r["status"] == "ok" and r["batch"] == batch and weight_format(r["system"]) == fmt]
    return min(ok, key=lambda r: r["decode_ms_per_token"], default=None)


def run_compare(report: Report, part: str, model: str) -> list[dict]:
    """compare.py's run of DECODE[part]'s variants on `model` (its own report written beside);
    its rows, each with its floor."""
    systems, batch_sizes = DECODE[part]
    a = report.args
    argv = ["--model", model, "--systems", systems, "--batch-sizes", ",".join(map(str, batch_sizes)),
            *report.sizes.decode, "--own-floor", "--name", f"speed_{part}-{model}", "--out", a.out]
    env = dict(report.env, gemv_bandwidth=report.bandwidth())
    args = compare.parse_args(argv + (["--deadline", str(a.deadline)] if a.deadline else []))
    payload = compare.Run(args, env).run()
    report.details[part] = {"report": f"speed_{part}-{model}.md", "rows": payload["rows"]}
    return payload["rows"]


def decode_line(r: dict) -> str:
    return f"{r['system']} {r['decode_ms_per_token']:.3f} ms/token"


def unmeasured(rows: list[dict], fmts, batch: int) -> str:
    """Why no row of these weight formats at this batch size was measured."""
    why = [f"{r['system']} {r['status']}: {r['error']}" for r in rows
           if r["batch"] == batch and weight_format(r["system"]) in fmts and r["status"] != "ok"]
    return "not measured: " + ("; ".join(why) or "no row")


def run_int8(report: Report) -> None:
    model = report.sizes.llama
    rows = run_compare(report, "int8", model)
    for fmt, batch, target in QUANT_TARGETS:
        name = fmt.upper() + " g128" * (fmt == "int4")
        goal = Goal(f"{model} {name} weights, bs {batch}: bf16 ms/token / {name} ms/token", target)
        base, quant = fastest(rows, "bf16", batch), fastest(rows, fmt, batch)
        if base and quant:
            report.add("int8", goal, base["decode_ms_per_token"] / quant["decode_ms_per_token"],
                       f"{decode_line(quant)}; bf16: {decode_line(base)}")
        else:
            report.add("int8", goal, None, unmeasured(rows, ("bf16", fmt), batch))


def run_gpt2(report: Report) -> None:
    model = report.sizes.gpt2
    goal = Goal(f"{model} bs 1: decode ms/token / floor", GPT2_TARGET, at_most=True)
    rows = run_compare(report, "gpt2", model)
    best = fastest(rows, "bf16", 1)
    if best:
        report.add("gpt2", goal, best["over_floor"],
                   f"{decode_line(best)}; floor {best['floor_ms']:.3f} ms/token")
    else:
        report.add("gpt2", goal, None, unmeasured(rows, ("bf16",), 1))


# ----------------------------------------------------------------------------- cold start

def run_cold(report: Report) -> None:
    """cold_start.py's fresh processes (no cache, empty cache, filled cache; its report is
    written to benchmarks/results and $OUT); the first generate without the cache against with
    the filled one."""
    model, dtype, new_tokens, reps = report.sizes.cold
    if report.left() < COLD_PROCESS_S * 3 * reps:
        return report.skip("cold", COLD_GOAL)
    name = f"speed_cold-{model}"
    try:
        cold_start.main(["--model", model, "--dtype", dtype, "--new-tokens", str(new_tokens),
                         "--reps", str(reps), "--name", name])
    except Exception as e:  # noqa: BLE001  the row records it
        return report.add("cold", COLD_GOAL, None, f"failed: {error_line(e)}")
    median = json.loads((harness.RESULTS / f"{name}.json").read_text())["median"]
    report.details["cold"] = {"report": f"{name}.md", "median": median}
    off, on = median["no cache"], median["filled cache"]
    report.add("cold", COLD_GOAL, off["first_s"] / on["first_s"],
               f"{model} {dtype}: no cache {off['first_s']:.2f} s, filled cache {on['first_s']:.2f} s "
               f"(engine built in {off['build_s']:.2f} / {on['build_s']:.2f} s)")


RUNS = {"cold": run_cold, "attention": run_attention, "gpt2": run_gpt2, "int8": run_int8}


# ----------------------------------------------------------------------------- report, command line

def _ratio(r: dict) -> str:
    return "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"


def markdown(payload: dict) -> str:
    env, a = payload["env"], payload["args"]
    met = {True: "yes", False: "no", None: "n/a"}
    bw = env.get("gemv_bandwidth")
    lines = [f"# Speed goals: {', '.join(a['parts'])}, {env['device']}", "",
             f"{env['device']}, commit {env['git_commit']}, {env['date']}, JAX {env['jax']}. Every "
             "baseline measured in the same run." + (" CPU smoke sizes." if a["smoke"] else ""), "",
             f"Command: `{a['command']}`", "",
             "| part | goal | measured | ratio | met |", "|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['goal']} | {r['measured']} | {_ratio(r)} | {met[r['met']]} |"
              for r in payload["rows"]]
    notes = [f"- {part}: `{d['report']}`" for part, d in payload["details"].items()
             if isinstance(d, dict) and "report" in d]
    if bw:
        notes.append(f"- floors: bf16 GEMV {bw['shape']} at {bw['bytes_per_s'] / 1e12:.3f} TB/s, "
                     "measured in this run")
    if notes:
        lines += ["", "Each part's own report and the floors:", ""] + notes
    return "\n".join(lines + ["", harness.versions_line(env)]) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="attention,int8,gpt2,cold", help=f"comma-separated, from {PARTS}")
    p.add_argument("--deadline", type=float, default=None,
                   help="UNIX time to finish by: what it leaves no time for is a 'skipped' row")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and models (a CPU run)")
    p.add_argument("--name", default=None, help="results file name (default speed-PARTS)")
    p.add_argument("--out", default=str(harness.RESULTS))
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        p.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]
    args.name = args.name or "speed-" + "-".join(args.parts)
    args.command = shlex.join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(args, SMOKE if args.smoke else FULL, harness.environment())
    for part in args.parts:
        print(f"[speed {time.strftime('%H:%M:%S')}] {part}", flush=True)
        RUNS[part](report)
        report.save()
    print(markdown(report.payload()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
