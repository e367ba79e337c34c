"""GEMM kernels on one GPU: Pallas dense / norm-fused / INT8 / INT4 against XLA, LLaMA-3-8B shapes.

    python benchmarks/gemm_kernels.py [--ms 1,4,16,64,256] [--shapes qkv,out,gate_up,down]
                                      [--sweep | --explore] [--budget-s 380]

For each weight shape and batch rows M: medians of XLA bf16 (jnp.dot), XLA int8 (dsjax's XLA
path, ops.qmatmul_xla: the int8 -> bf16 convert fused into the dot, scales on its output; an
earlier form that scaled the weight before the dot ran 2-3x slower), the Pallas dense kernel, Pallas INT8 (per
channel and group 128), Pallas INT4 (group 128), RMSNorm + GEMM (Pallas norm_matmul vs XLA norm
then dot in one jit; for gate_up also with the gated SiLU epilogue), and at M=1 the FMA form
without its inline-PTX conversions (*_cvt). For M <= 8 also the decode GEMV over K-major
weights (pallas_kernels/gemv.py; the K-major layout dsjax.weights gives a kernel-injected engine):
gemv_bf16, gemv_int8 (per channel), gemv_norm (RMSNorm fused), gemv_norm_gated, and
LayerNorm + GEMM (xla_ln vs gemv_ln, with the norm's bias); and quant_matmul over K-major int8
codes (pallas_int8_pc_t; also grouped int8 and int4, *_g128_t), the kernels dsjax.weights'
layout runs. Each timing runs the op on 16 distinct weights in
one jit (L2 never holds the next weight; XLA can merge nothing), queues 4 such jits and divides.
Effective bandwidth = bytes of weights (+ scales) / time, against a bf16 GEMV ceiling measured
in the same run. A correctness check of every kernel against its reference (compiled, on the
GPU) runs first. --sweep times block-size candidates first and benchmarks with the winners;
--explore times them after the benchmark (which then uses the defaults). Writes
results/gemm_kernels[-SUFFIX].{json,md} (+ .png when matplotlib exists), also under $OUT when set, and
prints a short M=1 table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import elapsed  # noqa: E402
from dsjax import ops  # noqa: E402
from dsjax.numerics import NormSpec, apply_norm  # noqa: E402
from dsjax.weights import QuantizedWeight  # noqa: E402
from pallas_kernels import gemv as gv  # noqa: E402
from pallas_kernels import matmul as mm  # noqa: E402
from pallas_kernels import quant_matmul as qm  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "out": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
NORMED = ("qkv", "gate_up")  # the GEMMs a norm precedes in a LLaMA block
BF16 = jnp.bfloat16


# ----------------------------------------------------------------------------- ops under test

def RMS(g, plus_one=False):  # noqa: N802
    return NormSpec(g, None, "rmsnorm", 1e-5, plus_one)


def LN(g, b):  # noqa: N802
    return NormSpec(g, b, "layernorm", 1e-5)


def rms(x, g):
    return apply_norm(x, RMS(g))


def ln(x, g, b):
    return apply_norm(x, LN(g, b))


def op_for(name: str, K: int, bs=None):
    """name -> (fn(x, *weights), weight kind)."""
    q = functools.partial(qm.quant_matmul, block_sizes=bs)

    def nm(x, g, w, **kw):  # RMSNorm + GEMM in one kernel
        return mm.norm_matmul(x, RMS(g), w, block_sizes=bs, **kw)
    table = {
        "xla_bf16": (lambda x, w: x @ w, "bf16"),
        "pallas_bf16": (lambda x, w: mm.matmul(x, w, block_sizes=bs), "bf16"),
        "xla_int8": (lambda x, v, s: ops.qmatmul_xla(x, QuantizedWeight(v, s, None, bits=8,
                                                                        group_size=K)),
                     "int8_pc"),
        "pallas_int8_pc": (lambda x, v, s: q(x, v, s, bits=8, group_size=K), "int8_pc"),
        "pallas_int8_g128": (lambda x, v, s: q(x, v, s, bits=8, group_size=128), "int8_g128"),
        "pallas_int4_g128": (lambda x, v, s: q(x, v, s, bits=4, group_size=128), "int4_g128"),
        "xla_norm": (lambda x, g, w: rms(x, g) @ w, "norm"),
        "pallas_norm": (lambda x, g, w: nm(x, g, w), "norm"),
        "xla_norm_gated": (lambda x, g, w: _xla_gated(rms(x, g) @ w), "norm"),
        "pallas_norm_gated": (lambda x, g, w: nm(x, g, w, gated=True, activation="silu"), "norm"),
        "xla_ln": (lambda x, g, b, w: ln(x, g, b) @ w, "ln"),
        # K-major weights (kind *_t): the decode GEMV, and quant_matmul over [N, K] codes
        "gemv_bf16": (lambda x, wt: gv.gemv(x, wt), "bf16_t"),
        "gemv_int8": (lambda x, vt, s: gv.gemv(x, vt, s), "int8_pc_t"),
        "gemv_norm": (lambda x, g, wt: gv.gemv(x, wt, norm=RMS(g)), "norm_t"),
        "gemv_norm_gated": (lambda x, g, wt: gv.gemv(x, wt, norm=RMS(g), gated=True, activation="silu"),
                            "norm_t"),
        "gemv_ln": (lambda x, g, b, wt: gv.gemv(x, wt, norm=LN(g, b)), "ln_t"),
        "pallas_int8_pc_t": (lambda x, vt, s: q(x, vt, s[None, :], bits=8, group_size=K,
                                                transpose_w=True), "int8_pc_t"),
        "pallas_bf16_t": (lambda x, wt: mm.matmul(x, wt, transpose_w=True, block_sizes=bs),
                          "bf16_t"),
        "pallas_int8_g128_t": (lambda x, vt, s: q(x, vt, s, bits=8, group_size=128,
                                                  transpose_w=True), "int8_g128_t"),
        "pallas_int4_g128_t": (lambda x, vt, s: q(x, vt, s, bits=4, group_size=128,
                                                  transpose_w=True), "int4_g128_t"),
        "pallas_norm_t": (lambda x, g, wt: nm(x, g, wt, transpose_w=True), "norm_t"),
        "pallas_ln_t": (lambda x, g, b, wt: mm.norm_matmul(x, LN(g, b), wt, transpose_w=True,
                                                           block_sizes=bs), "ln_t"),
    }
    return table[name]


def _xla_gated(h):
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up


def weight_bytes(kind: str, K: int, N: int) -> int:
    return {"bf16": 2 * K * N, "norm": 2 * K * N + 2 * K, "ln": 2 * K * N + 4 * K,
            "int8_pc": K * N + 4 * N, "int8_g128": K * N + 4 * N * K // 128,
            "int4_g128": K * N // 2 + 4 * N * K // 128}[kind.removesuffix("_t")]


class Pool:
    """Distinct random weights of one shape, made lazily per kind."""

    def __init__(self, K: int, N: int):
        self.K, self.N, self.kinds = K, N, {}

    def get(self, kind: str, n: int):
        have = self.kinds.setdefault(kind, [])
        while len(have) < n:
            have.append(self._make(kind, len(have)))
        return have[:n]

    def _make(self, kind, i):
        K, N = self.K, self.N
        k1, k2, k3 = jax.random.split(jax.random.key(1000 * len(kind) + i), 3)
        if kind.endswith("_t"):  # K-major: the same weights transposed
            base = self.get(kind[:-2], i + 1)[i]
            if kind == "int8_pc_t":  # (values [K, N], scales [1, N]) -> codes [N, K], [N]
                return base[0].T, base[1][0]
            if kind.startswith("int"):  # grouped: values [N, K] ([N, K/2]), scales [K/G, N]
                return base[0].T, base[1]
            return (*base[:-1], base[-1].T)  # (norm vectors..., w)
        if kind == "norm":  # the bf16 weights with a norm scale
            return (1 + 0.1 * jax.random.normal(k2, (K,), BF16), self.get("bf16", i + 1)[i][0])
        if kind == "ln":  # the bf16 weights with a LayerNorm scale and bias
            return (1 + 0.1 * jax.random.normal(k2, (K,), BF16),
                    0.1 * jax.random.normal(k3, (K,), BF16), self.get("bf16", i + 1)[i][0])
        if kind == "bf16":
            return (jax.random.normal(k1, (K, N), BF16) * (K ** -0.5),)
        if kind.startswith("int8"):
            v = (jax.random.randint(k1, (K, N), -127, 128, jnp.int8) if kind == "int8_pc"
                 else self.get("int8_pc", i + 1)[i][0])  # the same values, grouped scales
            G = K if kind == "int8_pc" else 128
        else:
            v = jax.random.randint(k1, (K // 2, N), 0, 256, jnp.int32).astype(jnp.uint8)
            G = 128
        return v, jax.random.uniform(k3, (K // G, N), jnp.float32, 0.5, 1.5) / (64 * K ** 0.5)


def time_op(fn, weights, M: int, K: int) -> tuple[float, float]:
    """(median, min) seconds per op (harness.time_in_jit: one jit over all the distinct weights,
    each with its own x [M, K], 4 jits queued, 7 reps)."""
    xs = [jax.random.normal(jax.random.key(i), (M, K), BF16) for i in range(len(weights))]
    return harness.time_in_jit(fn, [(x, *w) for x, w in zip(xs, weights)])


CALLS = 16  # ops (and distinct weights) per timed jit


# ----------------------------------------------------------------------------- correctness

def _err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max() / max(1e-6, np.abs(want).max()))


def correctness(ms) -> dict:
    """Compiled kernels (default block sizes) vs their references on ragged and real shapes."""
    rng = np.random.default_rng(0)
    arr = lambda *s, sc=1.0: jnp.asarray(sc * rng.standard_normal(s, np.float32), BF16)  # noqa
    out = {}
    for M in ms:
        for K, N in ((1000, 1100), (4096, 1536)):
            x, w, b, r = arr(M, K), arr(K, N, sc=K ** -0.5), arr(N), arr(M, N // 2)
            g, nb = arr(K, sc=0.2) + 1, arr(K, sc=0.2)
            cases = {
                "matmul_bias_gelu": (lambda: mm.matmul(x, w, b, activation="gelu"),
                                     lambda: mm.matmul_reference(x, w, b, activation="gelu")),
                "matmul_gated_res": (
                    lambda: mm.matmul(x, w, b, r, activation="silu", gated=True),
                    lambda: mm.matmul_reference(x, w, b, r, activation="silu", gated=True)),
                "matmul_transposed": (lambda: mm.matmul(x, w.T, transpose_w=True),
                                      lambda: mm.matmul_reference(x, w.T, transpose_w=True)),
                "norm_matmul_ln": (
                    lambda: mm.norm_matmul(x, LN(g, nb), w, return_normed=True),
                    lambda: mm.norm_matmul_reference(x, LN(g, nb), w, return_normed=True)),
            }
            if M <= gv.MAX_ROWS:  # the decode GEMV over K-major weights
                qt = qm.random_weight(rng, K, N, bits=8, symmetric=True, group_size=K)
                vt, st = qt[0].T, qt[1][0]
                ln_norm = LN(g, nb)
                cases["gemv_ln_bias_gelu"] = (
                    lambda: gv.gemv(x, w.T, None, b, norm=ln_norm, activation="gelu"),
                    lambda: gv.gemv_reference(x, w.T, None, b, norm=ln_norm, activation="gelu"))
                cases["gemv_int8_rms_gated_res"] = (
                    lambda: gv.gemv(x, vt, st, b, r, norm=RMS(g, True), gated=True, activation="silu"),
                    lambda: gv.gemv_reference(x, vt, st, b, r, norm=RMS(g, True), gated=True,
                                              activation="silu"))
                cases["int8_sym_k_major"] = (
                    lambda: qm.quant_matmul(x, vt, st[None], bits=8, group_size=K,
                                            transpose_w=True),
                    lambda: qm.quant_matmul_reference(x, vt, st[None], bits=8, group_size=K,
                                                      transpose_w=True))
            quant = ((8, True, K), (8, False, K), (4, True, K), (4, False, K)) if K == 1000 \
                else ((8, True, K), (8, False, 128), (4, True, 128), (4, False, 64))
            for bits, sym, G in quant:
                vals, sc, zs = qm.random_weight(rng, K, N, bits=bits, symmetric=sym, group_size=G)
                kw = dict(bits=bits, group_size=G, bias=b, activation="silu", gated=True,
                          norm=RMS(g, True))
                cases[f"int{bits}_{'sym' if sym else 'asym'}_g{G}"] = (
                    functools.partial(qm.quant_matmul, x, vals, sc, zs, **kw),
                    functools.partial(qm.quant_matmul_reference, x, vals, sc, zs, **kw))
                if K != 1000:  # the same codes K-major ([N, K] / [N, K/2])
                    kt = dict(kw, transpose_w=True)
                    cases[f"int{bits}_{'sym' if sym else 'asym'}_g{G}_k_major"] = (
                        functools.partial(qm.quant_matmul, x, vals.T, sc, zs, **kt),
                        functools.partial(qm.quant_matmul_reference, x, vals.T, sc, zs, **kt))
            for name, (kernel, ref) in cases.items():
                key = f"{name} M={M} K={K} N={N}"
                try:
                    got, want = jax.jit(kernel)(), jax.jit(ref)()
                    errs = [_err(a, b) for a, b in zip(jax.tree.leaves(got),
                                                       jax.tree.leaves(want))]
                    out[key] = max(errs)
                except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
                    out[key] = f"ERROR {type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
    bad = {k: v for k, v in out.items() if isinstance(v, str) or v > 2e-2}
    print(f"[{elapsed():.0f}s] correctness: {len(out) - len(bad)}/{len(out)} within 2e-2; "
          f"bad: {bad}", flush=True)
    return out


# ----------------------------------------------------------------------------- sweep

def _bs(kernel, **kw):
    return (qm if "int" in kernel else mm).BlockSizes(**kw)


FMA1 = [dict(block_m=1, block_n=128, block_k=32, num_warps=4, num_stages=1, unroll=4),
        dict(block_m=1, block_n=128, block_k=64, num_warps=8, num_stages=1, unroll=2),
        dict(block_m=1, block_n=256, block_k=32, num_warps=8, num_stages=1, unroll=4),
        dict(block_m=1, block_n=64, block_k=64, num_warps=4, num_stages=1, unroll=4),
        dict(block_m=1, block_n=128, block_k=32, num_warps=4, num_stages=1, unroll=8)]
MMA16 = [dict(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4),
         dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3),
         dict(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)]
FMA4 = [dict(block_m=4, block_n=64, block_k=16, num_warps=4, num_stages=1, unroll=4),
        dict(block_m=4, block_n=128, block_k=16, num_warps=8, num_stages=1, unroll=2),
        dict(block_m=4, block_n=64, block_k=32, num_warps=8, num_stages=1, unroll=2)]
SWEEP = ([(1, k, FMA1) for k in ("pallas_bf16", "pallas_int8_pc", "pallas_int8_g128",
                                 "pallas_int4_g128")]
         + [(1, k, MMA16) for k in ("pallas_bf16_t", "pallas_int8_pc_t", "pallas_int8_g128_t",
                                    "pallas_int4_g128_t")]  # K-major: tensor cores from M = 1
         + [(16, "pallas_bf16", MMA16), (16, "pallas_int8_pc", MMA16[:2])]
         + [(4, k, FMA4) for k in ("pallas_bf16", "pallas_int8_pc", "pallas_int4_g128")])


def block_sizes(kernel: str, cand: dict, M: int, K: int, N: int):
    """The candidate with split_k raised to fill the GPU (4 programs per SM for the FMA form,
    2 for tensor cores)."""
    bs = _bs(kernel, **cand)
    rows = K // 2 if "int4" in kernel else K
    return type(bs).split(bs, rows, N, programs=(4 if bs.block_m < 16 else 2) * 132)


def sweep(shapes, budget_s: float, kernels=None) -> tuple[list[dict], dict]:
    """Times the candidates (of `kernels`, default all); returns the rows and the fastest
    BlockSizes per (shape, M, kernel)."""
    rows, best = [], {}
    for shape in shapes:
        K, N = SHAPES[shape]
        pool = Pool(K, N)
        for M, kernel, cands in SWEEP:
            if kernels and kernel not in kernels:
                continue
            kind = op_for(kernel, K)[1]
            for cand in cands:
                if elapsed() > budget_s:
                    return rows, best
                bs = block_sizes(kernel, cand, M, K, N)
                row = dict(shape=shape, M=M, kernel=kernel, blocks=dataclasses.asdict(bs))
                try:
                    t, t_min = time_op(op_for(kernel, K, bs)[0], pool.get(kind, CALLS), M, K)
                    row.update(us=t * 1e6, us_min=t_min * 1e6,
                               tb_s=weight_bytes(kind, K, N) / t / 1e12)
                    key = (shape, M, kernel)
                    if key not in best or t < best[key][0]:
                        best[key] = (t, bs)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(f"[{elapsed():.0f}s] sweep {row}", flush=True)
        del pool
    return rows, {k: bs for k, (t, bs) in best.items()}


# ----------------------------------------------------------------------------- benchmark

VARIANTS = ["xla_bf16", "pallas_bf16", "pallas_bf16_t", "gemv_bf16", "xla_int8",
            "pallas_int8_pc", "pallas_int8_pc_t", "gemv_int8", "pallas_int8_g128",
            "pallas_int8_g128_t", "pallas_int4_g128", "pallas_int4_g128_t", "xla_norm", "pallas_norm", "pallas_norm_t", "gemv_norm",
            "xla_norm_gated", "pallas_norm_gated", "gemv_norm_gated", "xla_ln", "pallas_ln_t",
            "gemv_ln", "pallas_bf16_cvt", "pallas_int8_pc_cvt",
            "pallas_int4_g128_cvt"]  # _cvt: M=1 only, the FMA form without its inline-PTX
# conversions (to show what they buy); gemv_*: M <= gv.MAX_ROWS


def runs(v: str, shape: str, M: int) -> bool:
    """Whether variant v is timed at (shape, M)."""
    if ("norm" in v or "_ln" in v) and shape not in NORMED:
        return False
    if "gated" in v and shape != "gate_up":
        return False
    return not (v.endswith("_cvt") and M != 1 or v.startswith("gemv") and M > gv.MAX_ROWS)


def twin(v: str) -> str:
    """The XLA op a Pallas variant replaces."""
    return ("xla_" + v.split("_", 1)[1]).removesuffix("_t").replace("_pc", "").replace(
        "_g128", "")


def default_blocks(v: str, M: int, K: int, N: int):
    if not v.startswith("pallas"):
        return None
    t = v.endswith("_t")  # K-major weights
    if "int" in v:
        return qm.BlockSizes.for_shape(M, K // 2 if "int4" in v else K, N, t)
    return mm.BlockSizes.for_shape(M, K, N // 2 if "gated" in v else N, t)


def bench(shapes, ms, budget_s: float, ceiling: float, sink, tuned=None,
          variants=VARIANTS) -> list[dict]:
    """Every variant at every (shape, M); Pallas variants use `tuned` block sizes where the
    sweep measured them (else their defaults)."""
    rows, tuned = [], tuned or {}
    for shape in shapes:
        K, N = SHAPES[shape]
        pool = Pool(K, N)
        for M in ms:
            for v in variants:
                if not runs(v, shape, M):
                    continue
                if elapsed() > budget_s:
                    print(f"[{elapsed():.0f}s] time budget spent; stopping", flush=True)
                    return rows
                base = v.removesuffix("_cvt")
                bs = tuned.get((shape, M, base.replace("_norm_gated", "_bf16")
                                .replace("_norm", "_bf16")))
                used = bs or default_blocks(base, M, K, N)
                if v.endswith("_cvt"):
                    used = dataclasses.replace(used, inline_asm=False)
                fn, kind = op_for(base, K, used)
                row = dict(shape=shape, K=K, N=N, M=M, variant=v, tuned=bs is not None,
                           blocks=dataclasses.asdict(used) if used else None)
                try:
                    t, t_min = time_op(fn, pool.get(kind, CALLS), M, K)
                    bw = weight_bytes(kind, K, N) / t
                    row.update(us=t * 1e6, us_min=t_min * 1e6, tb_s=bw / 1e12,
                               of_ceiling=bw / ceiling)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                rows.append(row)
                print(f"[{elapsed():.0f}s] {row}", flush=True)
            sink(rows)
        del pool
    return rows


# ----------------------------------------------------------------------------- report

def speedups(rows) -> list[dict]:
    """Per (shape, M): each variant's time against XLA bf16 and the XLA counterpart."""
    by = {(r["shape"], r["M"], r["variant"]): r.get("us") for r in rows}
    out = []
    for (shape, M, v), us in by.items():
        if us is None or v.startswith("xla"):
            continue
        base = by.get((shape, M, "xla_bf16"))
        same = by.get((shape, M, twin(v)))
        out.append(dict(shape=shape, M=M, variant=v, us=us,
                        vs_xla_bf16=base / us if base else None,
                        vs_xla_same=same / us if same and "int4" not in v else None))
    return out


def goals(rows) -> dict:
    by = {(r["shape"], r["M"], r["variant"]): r for r in rows if "us" in r}
    g = {}
    for shape in SHAPES:
        base = by.get((shape, 1, "xla_bf16"))
        for v, want in (("pallas_int8_pc", 1.8), ("gemv_int8", 1.8), ("pallas_int8_g128", 1.8),
                        ("pallas_int4_g128", 3.0)):
            r = by.get((shape, 1, v))
            if base and r:
                g[f"{shape} M=1 {v}"] = dict(speedup=base["us"] / r["us"], want=want,
                                             tb_s=r["tb_s"], ok=base["us"] / r["us"] >= want)
        for M in sorted({r["M"] for r in rows if r["M"] <= 16}):
            # the best fused norm + GEMM candidate at M rows (norm_matmul over [K, N] or
            # [N, K], the gemv; whichever dsjax routes) against XLA's norm then GEMM. The
            # label names the winner; dsjax.pallas_ops routes by these numbers, and runs the
            # norm in XLA first where no fused candidate wins
            for fused, xla in (("norm", "xla_norm"), ("norm_gated", "xla_norm_gated"),
                               ("ln", "xla_ln")):
                mine = [by[k] for k in ((shape, M, f"pallas_{fused}"), (shape, M, f"pallas_{fused}_t"),
                                    (shape, M, f"gemv_{fused}")) if k in by]
                rb = by.get((shape, M, xla))
                if mine and rb:
                    best = min(mine, key=lambda r: r["us"])
                    g[f"{shape} M={M} {fused} ({best['variant']})"] = dict(
                        ratio=rb["us"] / best["us"], want=1.0, ok=best["us"] <= rb["us"] * 1.02)
    return g


def summary(payload, M: int = 1) -> str:
    """The short table: per shape at M, microseconds and speedup over XLA bf16."""
    by = {(r["shape"], r["variant"]): r.get("us") for r in payload["rows"] if r["M"] == M}
    cols = ["xla_bf16", "pallas_bf16", "gemv_bf16", "xla_int8", "pallas_int8_pc", "gemv_int8",
            "pallas_int4_g128", "xla_norm", "gemv_norm"]
    lines = [f"| M={M} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for shape in SHAPES:
        base = by.get((shape, "xla_bf16"))
        if not base:
            continue
        cells = ["-" if by.get((shape, c)) is None else
                 f"{by[(shape, c)]:.1f} us ({base / by[(shape, c)]:.2f}x)" for c in cols]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(payload) -> str:
    lines = ["# GEMM kernels (Pallas-Triton vs XLA), LLaMA-3-8B shapes", "",
             f"{payload['env']}", "",
             f"bf16 GEMV ceiling: {payload['ceiling']['us_per_gemv']:.1f} us, "
             f"{payload['ceiling']['bytes_per_s'] / 1e12:.2f} TB/s", "",
             "Medians per op (16 distinct weights per jit, 4 jits queued, 7 reps); TB/s = "
             "weight (+ scale) bytes / time; (Nx) = speedup over XLA bf16.", "",
             "## Summary (M=1)", "", summary(payload)]
    rows = payload["rows"]
    for shape in SHAPES:
        sub = [r for r in rows if r["shape"] == shape]
        if not sub:
            continue
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in sub)]
        lines += [f"## {shape} {SHAPES[shape][0]}x{SHAPES[shape][1]}: us (TB/s)", "",
                  "| M | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for M in sorted({r["M"] for r in sub}):
            cells = []
            for v in variants:
                r = next((r for r in sub if r["M"] == M and r["variant"] == v), None)
                cells.append("-" if r is None else "err" if "error" in r
                             else f"{r['us']:.1f} ({r['tb_s']:.2f})")
            lines.append(f"| {M} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Goals", "", "| check | value | want | ok |", "|---|---|---|---|"]
    for k, v in payload["goals"].items():
        val = v.get("speedup", v.get("ratio"))
        extra = f", {v['tb_s']:.2f} TB/s" if "tb_s" in v else ""
        lines.append(f"| {k} | {val:.2f}x{extra} | >= {v['want']}x | {v['ok']} |")
    bad = {k: v for k, v in payload["correctness"].items() if isinstance(v, str) or v > 2e-2}
    lines += ["", f"Correctness (compiled, vs references): {len(payload['correctness'])} cases, "
              f"{len(bad)} outside 2e-2 relative" + (f": {bad}" if bad else ""), ""]
    if payload.get("sweep"):
        lines += ["## Block-size sweep", "", "| shape | M | kernel | blocks | us | TB/s |",
                  "|---|---|---|---|---|---|"]
        for r in payload["sweep"]:
            b = r["blocks"]
            desc = (f"m{b['block_m']} n{b['block_n']} k{b['block_k']} s{b['split_k']} "
                    f"w{b['num_warps']} st{b['num_stages']} u{b['unroll']}") if b else "-"
            val = ("err", "") if "error" in r else (f"{r['us']:.1f}", f"{r['tb_s']:.2f}")
            lines.append(f"| {r['shape']} | {r['M']} | {r['kernel']} | {desc} | "
                         f"{val[0]} | {val[1]} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(5 * len(SHAPES), 4), squeeze=False)
    for ax, shape in zip(axes[0], SHAPES):
        for v in VARIANTS:
            pts = sorted((r["M"], r["tb_s"]) for r in rows
                         if r["shape"] == shape and r["variant"] == v and "tb_s" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        ax.set(xscale="log", xlabel="M", ylabel="TB/s of weights read", title=shape)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,2,4,8,16,64,256")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--suffix", default="", help="results/gemm_kernels-SUFFIX.{json,md,png}")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--sweep", action="store_true", help="tune first; the benchmark uses winners")
    p.add_argument("--explore", action="store_true",
                   help="after the benchmark (defaults), time the sweep candidates too")
    p.add_argument("--check-ms", default="1,3,16,70,256",
                   help="M of the correctness check ('' skips it)")
    p.add_argument("--budget-s", type=float, default=380)
    p.add_argument("--sweep-budget-s", type=float, default=200)
    p.add_argument("--sweep-kernels", default="", help="only these kernels' candidates")
    a = p.parse_args()
    shapes, ms = a.shapes.split(","), [int(m) for m in a.ms.split(",")]
    name = "gemm_kernels" + (f"-{a.suffix}" if a.suffix else "")
    payload = dict(env=harness.environment(), correctness={}, rows=[], sweep=[], goals={})
    payload["env"]["nvidia_smi"] = harness.nvidia_smi(
        "clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,memory.used")
    print(payload["env"], flush=True)
    if a.check_ms:
        payload["correctness"] = correctness([int(m) for m in a.check_ms.split(",")])
    payload["ceiling"] = harness.gemv_bandwidth()
    ceiling = payload["ceiling"]["bytes_per_s"]
    print(f"[{elapsed():.0f}s] ceiling {payload['ceiling']}", flush=True)

    def sink(rows):
        payload["rows"], payload["goals"] = rows, goals(rows)
        payload["speedups"] = speedups(rows)
        harness.save(name, payload, markdown(payload))

    tuned = None
    if a.sweep:
        payload["sweep"], tuned = sweep(shapes, a.sweep_budget_s,
                                        [k for k in a.sweep_kernels.split(",") if k])
    sink(bench(shapes, ms, a.budget_s, ceiling, sink, tuned, a.variants.split(",")))
    if a.explore:
        payload["sweep"], _ = sweep(shapes, a.sweep_budget_s)
        sink(payload["rows"])
    for d in dict.fromkeys(p.parent for p in harness.save(name, payload, markdown(payload))):
        plot(payload["rows"], d / f"{name}.png")
    print(markdown(payload), flush=True)
    print(summary(payload), flush=True)


if __name__ == "__main__":
    main()
