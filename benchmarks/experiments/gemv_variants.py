"""Which Pallas-Triton loop reads a decode GEMV's weights fastest (one GPU, M = 1).

    python benchmarks/experiments/gemv_variants.py [--shapes gate_up,qkv,down] [--budget-s 420]

An experiment, not a benchmark of the library: its candidate kernels below are the prototypes
from which pallas_kernels/gemv.py was written (the library kernel is timed by
benchmarks/gemm_kernels.py). Kept to reproduce results/gemv_variants*.md.

The GEMM kernels of pallas_kernels/ read int8 weights at ~2e12 elements/s whatever their width
(results/gemm_kernels.md), short of XLA's bf16 GEMV at M = 1. This script times candidate loop
forms side by side with XLA and the current kernels, on LLaMA-3-8B shapes, in bf16 and INT8
(per-channel scales):

  fma_kn  weight [K, N] as stored; per program `bn` columns over all of K in steps of `bk` rows;
          float32 [bk, bn] products summed once after the loop (no split-K, no second kernel);
          `depth` tiles loaded ahead of the one being multiplied (software pipelining by hand:
          Triton pipelines only loads that feed a dot)
  fma_nk  the same over a [N, K] (transposed) weight: `bn` rows of K-contiguous bytes
  tc      tensor cores, x padded to 16 rows by a masked load, Triton's pipelining (num_stages);
          int8 codes turned into bfloat16 through float32 2^23 + u (prmt), not cvt

  fma_nkb / fma_knb  fma_nk / fma_kn with x loaded by a broadcast index straight into the
          weight tile's register layout, and one fma.rn.f32 (inline PTX) per product

Every candidate is first checked against a float32 reference on the GPU. Times: each op runs on
8 distinct weights in one jit (none stays in L2), 4 jits queued, median of 5. All candidates are
compiled up front on a thread pool. Writes results/gemv_variants[SUFFIX].{json,md} (and
under $OUT). `--only xla,pallas_now,gemv --m 2` times the library kernel (pallas_kernels/gemv.py)
against XLA and the [K, N] kernels at M rows.

What the runs of 2026-12-04 showed (H200; results/gemv_variants.md: the nk forms and tensor
cores, results/gemv_variants-kn.md: the kn forms with broadcast x; the candidate lists changed
between runs, the script keeps the last):
- [K, N] loops load x as one element a thread, store it to shared memory and read it back
  behind two barriers every K step (ncu: 40% of warp stalls there; SASS has FMUL + FADD, no
  FFMA); a [N, K] loop with x loaded in the weight's layout avoids both.
- INT8 at M = 1 (int8 bytes/s): fma_nkb 2.7-3.0 TB/s, 1.5x XLA's bf16 GEMV on gate_up / down
  and 1.6x on 8192x28672 (the [K, N] kernel of quant_matmul: 1.06-1.36x); still issue-bound
  at ~4.4 instructions a weight (prmt, fadd, ffma, x convert), short of the 1.8x goal.
- bf16 at M = 1: fma_nkb 0.99-1.15x of XLA on every shape (tensor-core form 1.01-1.05x).
- [K, N] loops with the broadcast x stay slow (few programs without split-K).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import elapsed  # noqa: E402
from dsjax import ops  # noqa: E402
from dsjax.weights import QuantizedWeight  # noqa: E402
from pallas_kernels import fusion  # noqa: E402
from pallas_kernels import gemv as gv_lib  # noqa: E402
from pallas_kernels import matmul as mm  # noqa: E402
from pallas_kernels import quant_matmul as qm  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "out": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096), "ceiling": (8192, 28672)}  # ceiling: DESIGN.md's GEMV shape
BF16, F32 = jnp.bfloat16, jnp.float32


@dataclasses.dataclass(frozen=True)
class Cand:
    form: str  # fma_kn | fma_nk | tc
    bn: int
    bk: int
    warps: int
    depth: int = 1  # fma: tiles in flight ahead of the multiply; tc: num_stages
    asm: bool = True

    @property
    def name(self):
        return f"{self.form} n{self.bn} k{self.bk} w{self.warps} d{self.depth}" + (
            "" if self.asm else " cvt")


# ----------------------------------------------------------------------------- kernels

def _floats(w, int8: bool, asm: bool):
    """A weight tile as float32 (int8: the exact code value)."""
    if not int8:
        return fusion.to_float32(w, asm=asm)
    return fusion.int8_floats(w, asm=asm)


def _pipelined(steps: int, depth: int, load, compute, init):
    """compute(acc, load(i)) for i < steps, with `depth` loads issued ahead of each compute."""
    if depth == 0:
        return lax.fori_loop(0, steps, lambda i, a: compute(a, load(i)), init)
    depth = min(depth, steps)
    ahead = tuple(load(i) for i in range(depth))

    def body(i, carry):
        acc, tiles = carry
        new = load(i + depth)
        return compute(acc, tiles[0]), (*tiles[1:], new)

    acc, tiles = lax.fori_loop(0, steps - depth, body, (init, ahead))
    for t in tiles:
        acc = compute(acc, t)
    return acc


def _fma_kernel(x_ref, w_ref, s_ref, o_ref, *, c: Cand, steps: int, int8: bool, nk: bool):
    n0 = pl.multiple_of(pl.program_id(0) * c.bn, c.bn)
    row = jnp.asarray(0, jnp.int32)  # M = 1 (a Python int index breaks interpret mode)
    # fma_nkb / fma_knb: x loaded in the weight tile's own layout (no shuffle through smem)
    bx = c.form in ("fma_nkb", "fma_knb")
    if bx:
        shape = (c.bn, c.bk) if nk else (c.bk, c.bn)
        zeros = jnp.zeros(shape, jnp.int32)
        cols = lax.broadcasted_iota(jnp.int32, shape, 1 if nk else 0)  # the k of each element

    def load(i):
        k0 = i * c.bk if isinstance(i, int) else pl.multiple_of(i * c.bk, c.bk)
        view = w_ref.at[pl.ds(n0, c.bn), pl.ds(k0, c.bk)] if nk else \
            w_ref.at[pl.ds(k0, c.bk), pl.ds(n0, c.bn)]
        xv = plgpu.load(x_ref.at[zeros, cols + k0]) if bx else plgpu.load(
            x_ref.at[row, pl.ds(k0, c.bk)])
        return plgpu.load(view, eviction_policy="evict_first"), xv

    def compute(acc, t):
        w, xv = t
        xf = xv.astype(F32)
        if not bx:
            xf = xf[None, :] if nk else xf[:, None]
        if bx:
            return fusion.fma_f32(xf, _floats(w, int8, c.asm), acc, asm=c.asm)
        return acc + xf * _floats(w, int8, c.asm)

    zero = jnp.zeros((c.bn, c.bk) if nk else (c.bk, c.bn), F32)
    y = _pipelined(steps, c.depth, load, compute, zero).sum(1 if nk else 0)  # [bn]
    if s_ref is not None:
        y = y * plgpu.load(s_ref.at[row, pl.ds(n0, c.bn)])
    plgpu.store(o_ref.at[row, pl.ds(n0, c.bn)], y.astype(o_ref.dtype))


def _tc_kernel(x_ref, w_ref, s_ref, o_ref, *, c: Cand, steps: int, int8: bool):
    n0 = pl.multiple_of(pl.program_id(0) * c.bn, c.bn)
    M = x_ref.shape[0]
    rows = jnp.arange(16)
    row_ok = rows < M

    def body(i, acc):
        k0 = pl.multiple_of(i * c.bk, c.bk)
        x = plgpu.load(x_ref.at[pl.ds(0, 16), pl.ds(k0, c.bk)], mask=row_ok[:, None], other=0)
        w = plgpu.load(w_ref.at[pl.ds(k0, c.bk), pl.ds(n0, c.bn)])
        w = _floats(w, True, c.asm).astype(BF16) if int8 else w
        return acc + jnp.dot(x, w, preferred_element_type=F32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((16, c.bn), F32))
    if s_ref is not None:
        acc = acc * plgpu.load(s_ref.at[jnp.asarray(0, jnp.int32), pl.ds(n0, c.bn)])[None, :]
    plgpu.store(o_ref.at[pl.ds(0, 16), pl.ds(n0, c.bn)], acc.astype(o_ref.dtype),
                mask=row_ok[:, None])


def gemv(x, w, scales, c: Cand, *, interpret=False):
    """x [M, K] @ W -> [M, N]; W = w [K, N] (fma_nk: w [N, K]) [* scales [1, N] for int8]."""
    M, K = x.shape
    N = w.shape[0] if c.form in ("fma_nk", "fma_nkb") else w.shape[1]
    assert K % c.bk == 0 and N % c.bn == 0, (K, N, c)
    int8 = w.dtype == jnp.int8
    steps = K // c.bk
    if c.form == "tc":
        kern = functools.partial(_tc_kernel, c=c, steps=steps, int8=int8)
        params = plgpu.CompilerParams(num_warps=c.warps, num_stages=c.depth)
    else:
        assert M == 1
        kern = functools.partial(_fma_kernel, c=c, steps=steps, int8=int8,
                                 nk=c.form in ("fma_nk", "fma_nkb"))  # else fma_kn, fma_knb
        params = plgpu.CompilerParams(num_warps=c.warps, num_stages=1)
    args = [x, w] + ([scales] if int8 else [])
    if not int8:
        kern = functools.partial(lambda k, x_ref, w_ref, o_ref: k(x_ref, w_ref, None, o_ref),
                                 kern)
    return pl.pallas_call(kern, grid=(N // c.bn,), out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
                          compiler_params=params, interpret=interpret, name="gemv")(*args)


# ----------------------------------------------------------------------------- candidates

def candidates() -> list[Cand]:
    out = [Cand("fma_nkb", *t) for t in ((8, 512, 8, 0), (4, 512, 4, 0), (4, 512, 4, 1),
                                         (2, 1024, 4, 0), (4, 1024, 8, 0))]
    for bn, bk, w in ((32, 128, 4), (32, 256, 8), (64, 64, 4), (64, 128, 8), (128, 32, 4),
                      (128, 64, 8), (256, 32, 8), (256, 16, 4)):
        for d in (0, 1):
            out.append(Cand("fma_knb", bn, bk, w, d))
    out += [Cand("tc", *t) for t in ((64, 256, 4, 3), (64, 128, 4, 3))]
    return out


def parse(name: str) -> Cand:
    """'fma_nk 16 256 8 0' (or the n16 k256 w8 d0 spelling of Cand.name) -> Cand."""
    form, *nums = name.split()
    asm = nums[-1] != "cvt"
    nums = [int(v.lstrip("nkwd")) for v in nums if v != "cvt"]
    return Cand(form, *nums, asm=asm)


# ----------------------------------------------------------------------------- timing

CALLS = 8


def make_weights(kind: str, K: int, N: int, n: int):
    """n distinct (w [K, N], scales [1, N] | None) of a kind (bf16 | int8)."""
    out = []
    for i in range(n):
        k1, k2 = jax.random.split(jax.random.key(7 * i + len(kind)))
        if kind == "bf16":
            out.append((jax.random.normal(k1, (K, N), BF16) * K ** -0.5, None))
        else:
            out.append((jax.random.randint(k1, (K, N), -127, 128, jnp.int8),
                        jax.random.uniform(k2, (1, N), F32, 0.5, 1.5) / (64 * K ** 0.5)))
    return out


def reference(x, w, s):
    y = x.astype(F32) @ w.astype(F32)
    return y if s is None else y * s


def op(c, kind):
    """fn(x, w, s) for a candidate or a named baseline; weights as stored ([K, N])."""
    if c == "xla":
        if kind == "bf16":
            return lambda x, w, s: x @ w
        return lambda x, w, s: ops.qmatmul_xla(
            x, QuantizedWeight(w, s, None, bits=8, group_size=w.shape[0]))
    if c == "gemv":  # the library kernel (pallas_kernels/gemv.py, default blocks), w [N, K]
        return lambda x, wt, s: gv_lib.gemv(x, wt, None if s is None else s[0])
    if c == "pallas_now":
        if kind == "bf16":
            return lambda x, w, s: mm.matmul(x, w)
        return lambda x, w, s: qm.quant_matmul(x, w, s, bits=8, group_size=w.shape[0])
    if c.form in ("fma_nk", "fma_nkb"):  # the transpose is made outside the timed jit (Bench)
        return lambda x, wt, s: gemv(x, wt, s, c)
    return lambda x, w, s: gemv(x, w, s, c)


class Bench:
    def __init__(self, shape: str, kind: str, m: int = 1):
        self.K, self.N = SHAPES[shape]
        self.shape, self.kind = shape, kind
        self.ws = make_weights(kind, self.K, self.N, CALLS)
        self.wts = None
        self.xs = [jax.random.normal(jax.random.key(100 + i), (m, self.K), BF16)
                   for i in range(CALLS)]
        self.bytes = self.K * self.N * (2 if kind == "bf16" else 1)

    def weights(self, c):
        if c == "gemv" or c not in ("xla", "pallas_now") and c.form in ("fma_nk", "fma_nkb"):
            if self.wts is None:
                self.wts = [(jnp.asarray(w.T), s) for w, s in self.ws]
            return self.wts
        return self.ws

    def compile(self, c):
        fn = op(c, self.kind)
        f = jax.jit(lambda xs, ws: [fn(x, w, s) for x, (w, s) in zip(xs, ws)])
        return f.lower(self.xs, self.weights(c)).compile()

    def run(self, c, compiled, reps=5, inner=4) -> dict:
        ws = self.weights(c)
        got = compiled(self.xs, ws)[0]
        want = reference(self.xs[0], *self.ws[0])
        err = float(jnp.linalg.norm(got.astype(F32) - want) / jnp.linalg.norm(want))

        def go():
            jax.block_until_ready([compiled(self.xs, ws) for _ in range(inner)])
        t, times = harness.median_time(go, reps, warmup=1)
        us = t / (inner * CALLS) * 1e6
        return dict(us=us, tb_s=self.bytes / us / 1e6, rel_err=err)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="gate_up,qkv,down")
    p.add_argument("--kinds", default="bf16,int8")
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--m", type=int, default=1, help="rows of x (the loop forms take M = 1)")
    p.add_argument("--suffix", default="", help="results/gemv_variants-SUFFIX.{json,md}")
    p.add_argument("--only", default="", help="comma-separated: xla, pallas_now, gemv")
    p.add_argument("--one", nargs=2, metavar=("KIND", "CAND"), action="append",
                   help="only run CAND (xla, pallas_now or 'form bn bk warps depth') on KIND a "
                        "few times, for a profiler (repeatable)")
    a = p.parse_args()
    if a.one:
        for kind, name in a.one:
            shape = a.shapes.split(",")[0]
            b = Bench(shape, kind)
            c = name if name in ("xla", "pallas_now", "gemv") else parse(name)
            compiled = b.compile(c)
            for _ in range(3):
                jax.block_until_ready(compiled(b.xs, b.weights(c)))
            print(shape, kind, name, b.run(c, compiled, reps=1, inner=1))
        return
    payload = dict(env=harness.environment(), rows=[])
    payload["ceiling"] = harness.gemv_bandwidth()
    print(f"[{elapsed():.0f}s] {payload['env']}\nceiling {payload['ceiling']}", flush=True)
    cands = a.only.split(",") if a.only else ["xla", "pallas_now", "gemv"] + candidates()
    pool = concurrent.futures.ThreadPoolExecutor(a.threads)
    for shape in a.shapes.split(","):
        for kind in a.kinds.split(","):
            if elapsed() > a.budget_s:
                break
            b = Bench(shape, kind, a.m)
            futs = {c: pool.submit(b.compile, c) for c in cands}
            concurrent.futures.wait(futs.values())  # no timing while compiling: the host is busy
            for c, fut in futs.items():
                row = dict(shape=shape, kind=kind, m=a.m,
                           cand=c if isinstance(c, str) else c.name)
                if elapsed() > a.budget_s:
                    row["error"] = "budget"
                else:
                    try:
                        row.update(b.run(c, fut.result()))
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        traceback.print_exc(limit=2)
                payload["rows"].append(row)
                print(f"[{elapsed():.0f}s] {row}", flush=True)
            del b
            harness.save("gemv_variants" + a.suffix, payload, markdown(payload))
    print(markdown(payload, best_only=True), flush=True)


def markdown(payload, best_only=False) -> str:
    rows = [r for r in payload["rows"] if "us" in r]
    ms = sorted({r.get("m", 1) for r in payload["rows"]}) or [1]
    lines = [f"# Decode GEMV loop forms (M = {', '.join(map(str, ms))}), LLaMA-3-8B shapes", "",
             f"{payload['env']}", "",
             f"bf16 GEMV ceiling: {payload['ceiling']['bytes_per_s'] / 1e12:.2f} TB/s", "",
             "| shape | kind | candidate | us | TB/s | vs XLA bf16 | rel. err |",
             "|---|---|---|---|---|---|---|"]
    base = {(r["shape"]): r["us"] for r in rows if r["cand"] == "xla" and r["kind"] == "bf16"}
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["kind"], r["cand"].split()[0]), []).append(r)
    for (shape, kind, form), rs in groups.items():
        show = sorted(rs, key=lambda r: r["us"])[:3] if best_only else rs
        for r in show:
            ratio = f"{base[shape] / r['us']:.2f}x" if shape in base else "-"
            lines.append(f"| {shape} | {kind} | {r['cand']} | {r['us']:.1f} | {r['tb_s']:.2f} | "
                         f"{ratio} | {r['rel_err']:.1e} |")
    errs = [r for r in payload["rows"] if "error" in r]
    if errs:
        lines += ["", f"{len(errs)} candidates failed: " + "; ".join(
            f"{r['shape']} {r['kind']} {r['cand']}: {r['error'][:80]}" for r in errs[:8])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
