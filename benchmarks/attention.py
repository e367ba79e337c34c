"""Attention kernels on one GPU, decode and prefill:

    python benchmarks/attention.py decode [--contexts 1024,4096] [--batches 1,16] [--impls dsjax,xla,jax_gqa]
        [--int8 4096:1,16384:16] [--sweep] [--no-check] [--prefill] [--suffix S] [--render]
    python benchmarks/attention.py prefill [--seq-lens 512,1024] [--kv-heads 8,32] [--reps 10]
        [--tune] [--check] [--cache] [--suffix S] [--render]

decode: one query per sequence at position context - 1 over a bf16 cache [B, KVH=8, context,
Dh=128] with H=32 query heads. TB/s = bytes of K and V up to the context / time per call; the
ceiling is a device copy measured in the same run ((read + write bytes) / time), at its start and
end. Compared: the dsjax Pallas kernel (pallas_kernels.decode_attention), the XLA path
(dsjax.ops.attention_xla on the same cache) and JAX's Pallas `decode_attention.gqa` (which takes
[B, S, KVH, Dh]: it gets swapaxes views that its own swapaxes cancels inside the jit); --int8
adds the kernel over an int8 cache at context:batch shapes. Several independent caches run
inside one jit, enough to exceed the 60 MB L2 and hide dispatch; time per call = the fastest of
10 reps (harness.best_time); combinations over 40 GB of KV are skipped. The compiled kernels
(decode, and rotary + cache write) are checked against their references first (--no-check: not);
--sweep times a grid of BlockSizes at a few shapes; --prefill adds the prefill rows at their
defaults. Writes results/attention_kernels[-SUFFIX].{json,md} after every section.

prefill: the causal flash kernel against cuDNN, XLA and JAX's own Pallas-Triton `mha`, at B=1,
H=32, Dh=128, bf16, KVH 8 (GQA) and 32 (MHA). Each implementation gets its own best layout,
converted outside the timed region: the Pallas kernel and XLA read K/V as the KV cache stores
them ([B, KVH, S, Dh]); cuDNN reads [B, S, KVH, Dh]; `mha` has no GQA, so it reads K/V repeated
to H heads. Several independent calls run inside one jit so that dispatch overhead does not
dominate the small sizes; time per call = the median over reps. TFLOP/s counts the causal half:
2*2*B*H*T*T*Dh / 2. --tune times a grid of BlockSizes at T=1024 and T=4096 first and uses the
fastest of each for the short and the long prompts; --check compares the compiled kernel with
its reference on a few shapes; --cache times a 512-token prefill into caches of 512, 4096 and
16384 slots. Writes results/attention_prefill[-SUFFIX].{json,md}, rewritten after every row.

--render rewrites a subcommand's .md from its .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.pallas.ops.gpu.attention import mha  # noqa: E402
from jax.experimental.pallas.ops.gpu.decode_attention import gqa  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import error_line  # noqa: E402
from dsjax import ops  # noqa: E402
from dsjax.numerics import quantize_kv  # noqa: E402
from pallas_kernels import decode_attention as da  # noqa: E402
from pallas_kernels import flash_attention as fa  # noqa: E402
from pallas_kernels import rotary_cache as rc  # noqa: E402

H, KVH, DH = 32, 8, 128
KV_LIMIT = 40e9  # bytes of K + V
L2_MARGIN = 256e6  # bytes of distinct caches per timed jit (the H200's L2 is 60 MB)
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 4, 16, 64)
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
PREFILL_IMPLS = ("pallas", "cudnn", "xla", "mha")


def check(name: str, got_fn, want_fn, tol: float) -> dict:
    """A compiled kernel against its reference: max abs error over every output, all finite."""
    try:
        got, want = jax.tree.leaves(got_fn()), jax.tree.leaves(want_fn())
        err = max(float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32))))
                  for g, w in zip(got, want))
        finite = all(bool(np.all(np.isfinite(np.asarray(g, np.float32)))) for g in got)
        row = {"case": name, "max_abs_err": err, "ok": finite and err <= tol, "tol": tol}
    except Exception as e:  # noqa: BLE001
        row = {"case": name, "error": error_line(e), "ok": False}
    print(f"check {row}", flush=True)
    return row


def _f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _checks_md(checks) -> list[str]:
    if not checks:
        return []
    bad = [c for c in checks if not c.get("ok", "error" not in c)]
    return ([f"GPU checks (compiled kernels vs references): {len(checks) - len(bad)}/{len(checks)} ok", ""]
            + [f"- FAILED {c}" for c in bad] + ([""] if bad else []))


# ----------------------------------------------------------------------------- decode

def kv_bytes(batch: int, context: int, itemsize: int = 2) -> int:
    return 2 * batch * KVH * context * DH * itemsize


def copy_ceiling(nbytes: int = 4 << 30, warm_s: float = 1.0) -> dict:
    """Device copy bandwidth, (read + write bytes) / time, over nbytes, after warm_s of copying
    (the clocks idle low until the GPU is busy): the best of an XLA copy (a device memcpy), a
    bf16 and a float32 elementwise kernel, each recorded."""
    x16 = jnp.ones((nbytes // 2,), jnp.bfloat16)
    x32 = jnp.ones((nbytes // 4,), jnp.float32)
    kinds = {"copy": (jax.jit(lambda x: x.copy()), x16), "bf16_x2": (jax.jit(lambda x: x * 2), x16),
             "f32_plus1": (jax.jit(lambda x: x + 1), x32)}
    t_end = time.perf_counter() + warm_s
    while time.perf_counter() < t_end:
        kinds["bf16_x2"][0](x16).block_until_ready()
    out = {"bytes": nbytes}
    for name, (f, x) in kinds.items():
        out[name] = 2 * nbytes / harness.best_time(lambda: f(x))
    # a copy XLA elided would read as faster than HBM (4.8 TB/s on the datasheet): not a ceiling
    out["bytes_per_s"] = max(out[k] for k in kinds if out[k] < 5e12)
    return out


def make_caches(batch: int, context: int, copies: int, dtype="bfloat16", seed: int = 0):
    """`copies` independent (k, v) caches [B, KVH, context, Dh] (bf16, or int8 + scales)."""
    @jax.jit
    def one(key):
        kk, kv, ks = jax.random.split(key, 3)
        base = [jax.random.normal(x, (1, KVH, context, DH), jnp.float32) for x in (kk, kv)]
        rows = 1 + 0.1 * jax.random.uniform(ks, (batch, 1, 1, 1))
        k, v = ((b * rows).astype(jnp.bfloat16) for b in base)
        return (quantize_kv(k) + quantize_kv(v)) if dtype == "int8" else (k, v)

    return [one(jax.random.key(seed * 1000 + i)) for i in range(copies)]


def decode_fns(context: int):
    """name -> fn(q [B, H, Dh], cache tuple, q_pos [B]) -> [B, H * Dh]."""
    scale = DH ** -0.5

    def xla(q, cache, q_pos):
        k, v = cache
        B = q.shape[0]
        k_pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (B, context))
        out = ops.attention_xla(q[:, None], k, v, q_pos[:, None], k_pos, jnp.ones((B, context), bool),
                                scale=scale, causal=True, window=None, alibi_slopes=None)
        return out[:, 0]

    def jax_gqa(q, cache, q_pos):
        k, v = (x.swapaxes(1, 2) for x in cache)
        return gqa(q, k, v, kv_seq_len=q_pos + 1, sm_scale=scale).reshape(q.shape[0], -1)

    def dsjax(q, cache, q_pos, block_sizes=None):
        if len(cache) == 4:
            k, ks, v, vs = cache
            return da.decode_attention(q, k, v, q_pos, scale=scale, k_scale=ks, v_scale=vs,
                                       block_sizes=block_sizes)
        return da.decode_attention(q, *cache, q_pos, scale=scale, block_sizes=block_sizes)

    return {"dsjax": dsjax, "xla": xla, "jax_gqa": jax_gqa}


def time_decode(fn, q, caches, q_pos, reps: int = 10):
    """(seconds per call of fn over the distinct caches, all inside one jit; first output)."""
    run = jax.jit(lambda q, caches, q_pos: [fn(q, c, q_pos) for c in caches])
    first = jax.block_until_ready(run(q, caches, q_pos))[0]
    return harness.best_time(lambda: run(q, caches, q_pos), reps) / len(caches), first


def _decode_inputs(batch: int, context: int, nbytes: int, dtype="bfloat16"):
    caches = make_caches(batch, context, max(1, min(32, int(-(-L2_MARGIN // nbytes)))), dtype)
    q = jax.random.normal(jax.random.key(1), (batch, H, DH), jnp.bfloat16)
    return q, caches, jnp.full((batch,), context - 1, jnp.int32)


def decode_row(context: int, batch: int, ceiling: float, impls, dtype="bfloat16") -> dict:
    nbytes = kv_bytes(batch, context, 1 if dtype == "int8" else 2)
    if dtype == "int8":
        nbytes += 2 * batch * KVH * context * 4  # the float32 scales
    q, caches, q_pos = _decode_inputs(batch, context, nbytes, dtype)
    fns = decode_fns(context)
    row = {"context": context, "batch": batch, "dtype": dtype, "kv_bytes": nbytes,
           "copies": len(caches), "us": {}, "tbps": {}, "pct": {}, "errors": {}}
    outs = {}
    for name in impls:
        try:
            t, out = time_decode(fns[name], q, caches, q_pos)
            outs[name] = np.asarray(out, np.float32)
            row["us"][name], row["tbps"][name] = t * 1e6, nbytes / t / 1e12
            row["pct"][name] = 100 * nbytes / t / ceiling
        except Exception as e:  # noqa: BLE001  (record and go on: a failure is a result)
            row["errors"][name] = error_line(e)
        gc.collect()
    if "dsjax" in outs and "xla" in outs:
        row["max_abs_vs_xla"] = float(np.max(np.abs(outs["dsjax"] - outs["xla"])))
        row["speedup_vs_xla"] = row["us"]["xla"] / row["us"]["dsjax"]
    del caches
    gc.collect()
    return row


def check_decode() -> list[dict]:
    """Compiled decode kernel against its float32 reference (unwritten slots hold NaN)."""
    cases = [  # H, KVH, Dh, dtype, window, alibi, int8
        (32, 8, 128, jnp.bfloat16, None, False, False), (8, 8, 64, jnp.float32, None, False, False),
        (8, 1, 256, jnp.float16, None, True, False), (16, 2, 80, jnp.bfloat16, 50, True, False),
        (12, 4, 96, jnp.bfloat16, 7, False, False), (32, 8, 128, jnp.bfloat16, None, True, True),
        (8, 2, 128, jnp.float32, None, False, False), (4, 1, 256, jnp.float32, 100, True, False)]
    rows = []
    for Hc, Kc, Dc, dtype, window, alibi, int8 in cases:
        S, q_pos = 700, jnp.asarray([699, 0, 333], jnp.int32)
        keys = jax.random.split(jax.random.key(Dc), 3)
        q = jax.random.normal(keys[0], (3, Hc, Dc), jnp.float32).astype(dtype)
        written = (jnp.arange(S)[None, :] <= q_pos[:, None])[:, None, :, None]
        k, v = (jnp.where(written, jax.random.normal(x, (3, Kc, S, Dc)), 0).astype(dtype)
                for x in keys[1:])
        kw = dict(scale=Dc ** -0.5, window=window,
                  alibi_slopes=jnp.linspace(0.05, 1, Hc) if alibi else None)
        if int8:
            (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
            kw.update(k_scale=ks, v_scale=vs)
            k_in, v_in = k, v
        else:
            k_in, v_in = (jnp.where(written, x, jnp.nan).astype(dtype) for x in (k, v))
        name = f"decode H{Hc} KVH{Kc} Dh{Dc} {jnp.dtype(dtype).name} w={window} alibi={alibi}"
        rows.append(check(name + (" int8" if int8 else ""),
                          lambda: da.decode_attention(q, k_in, v_in, q_pos, **kw),
                          lambda: da.decode_attention_reference(q, k, v, q_pos, **kw),
                          tol=2e-5 if dtype == jnp.float32 else 2e-2))
    return rows


def check_rotary() -> list[dict]:
    """Compiled rotary + cache-write kernel against its reference and the model's XLA path."""
    cases = [  # layout, H, K, Dh, rot_dim, T, dtype, int8
        ("half", 32, 8, 128, 128, 1, jnp.bfloat16, False), ("half", 8, 8, 128, 32, 7, jnp.float32, False),
        ("interleaved", 16, 16, 256, 64, 5, jnp.float32, False),
        ("interleaved", 8, 2, 80, 80, 1, jnp.float16, False), ("half", 8, 1, 64, 0, 3, jnp.bfloat16, False),
        ("half", 32, 8, 128, 128, 4, jnp.bfloat16, True)]
    rows = []
    for layout, Hc, Kc, Dc, rd, T, dtype, int8 in cases:
        B, S = 3, 64
        keys = jax.random.split(jax.random.key(rd + T), 3)
        qkv = jax.random.normal(keys[0], (B, T, (Hc + 2 * Kc) * Dc)).astype(dtype)
        kc, vc = (jax.random.normal(x, (B, Kc, S, Dc)).astype(dtype) for x in keys[1:])
        wat = jnp.asarray([S - T, 0, 9], jnp.int32)
        pos = (wat[:, None] + jnp.arange(T) + jnp.asarray([0, 5000, 3])[:, None]).astype(jnp.int32)
        inv = (1.0 / 10000 ** (jnp.arange(0, rd, 2) / rd)).astype(jnp.float32) if rd else None
        kw = dict(num_heads=Hc, kv_heads=Kc, head_dim=Dc, rot_dim=rd, layout=layout, inv_freq=inv)
        scales = {}
        if int8:
            (kc, ks), (vc, vs) = quantize_kv(kc), quantize_kv(vc)
            scales = dict(k_scale=ks, v_scale=vs)
        name = f"rotary {layout} H{Hc} K{Kc} Dh{Dc} rd{rd} T{T} {jnp.dtype(dtype).name}"
        ref = jax.jit(lambda *a: rc.rotary_cache_write_reference(*a, **kw, **scales))
        rows.append(check(name + (" int8" if int8 else ""),
                          lambda: rc.rotary_cache_write(qkv, kc.copy(), vc.copy(), pos, wat,
                                                        **kw, **{k: x.copy() for k, x in scales.items()}),
                          lambda: ref(qkv, kc, vc, pos, wat),
                          tol=1.0 if int8 else 0.0 if dtype == jnp.float32 else 1e-2))
        if not int8:
            rot = ops.Rotary(inv, rd, layout) if rd else None
            model = jax.jit(lambda *a: ops.write_kv_xla(*a, heads=(Hc, Kc, Dc), rotary=rot))
            rows.append(check(name + " vs model path",
                              lambda: rc.rotary_cache_write(qkv, kc.copy(), vc.copy(), pos, wat, **kw),
                              lambda: jax.tree.leaves(model(qkv, (kc, vc), pos, wat)),
                              tol=1e-6 if dtype == jnp.float32 else 1e-2))
    return rows


SWEEP_SHAPES = ((4096, 1), (32768, 1), (16384, 4), (4096, 16), (32768, 16), (4096, 64))


def sweep_decode(shapes=SWEEP_SHAPES, reps: int = 5) -> list[dict]:
    """Times BlockSizes variants of the dsjax kernel (block_k x num_stages x num_splits around
    the default's) at a few (context, batch) shapes; the default runs first and last (noise)."""
    rows = []
    for context, batch in shapes:
        nbytes = kv_bytes(batch, context)
        q, caches, q_pos = _decode_inputs(batch, context, nbytes)
        fn = decode_fns(context)["dsjax"]
        base = da.num_splits_for(batch, KVH, context, 64)
        splits = sorted({max(1, base * f // 8) for f in (1, 2, 4, 8, 16)})
        configs = [None] + [da.BlockSizes(block_k=bk, num_splits=ns, num_warps=4, num_stages=st)
                            for bk in (64, 128) for st in (2, 3) for ns in splits] + [None]
        for bs in configs:
            try:
                t, _ = time_decode(lambda q, c, p: fn(q, c, p, block_sizes=bs), q, caches, q_pos, reps)
                row = {"us": t * 1e6, "tbps": nbytes / t / 1e12}
            except Exception as e:  # noqa: BLE001
                row = {"error": error_line(e)}
            rows.append({"context": context, "batch": batch,
                         "block_sizes": bs and dataclasses.asdict(bs), **row})
            print(f"sweep {rows[-1]}", flush=True)
        del caches
    return rows


def decode_table(rows, ceiling) -> str:
    """The decode rows; % ceil: of the copy ceiling; % peak: of the fastest K+V read any
    implementation reached in the run (XLA's copy can be slower than a streaming read)."""
    peak = max([t for r in rows if r["dtype"] != "int8" for t in r["tbps"].values()] or [1.0])
    lines = [f"Decode, H={H} KVH={KVH} Dh={DH}, one query per sequence at the last slot. TB/s of "
             f"K+V read (int8: + scales). % ceil: of the best device copy of this run, "
             f"{ceiling / 1e12:.2f} TB/s ((read + write) / time); % peak: of the fastest read "
             f"of this run, {peak:.2f} TB/s.",
             "", "| context | batch | cache | KV MB | dsjax us | TB/s | % ceil | % peak | XLA us "
             "| XLA TB/s | vs XLA | JAX gqa us | gqa TB/s |", "|" + "---|" * 13]
    for r in rows:
        us, tb = r["us"], r["tbps"]
        vs = (f"{_f(r.get('speedup_vs_xla'), '.2f')}x" if r["dtype"] != "int8" else
              f"{_f(r.get('speedup_vs_bf16'), '.2f')}x vs bf16")
        ours = tb.get("dsjax")
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['dtype']} | {r['kv_bytes'] / 1e6:.0f} | "
            f"{_f(us.get('dsjax'))} | {_f(ours, '.2f')} | "
            f"{_f(ours and 100 * ours * 1e12 / ceiling, '.0f')} | {_f(ours and 100 * ours / peak, '.0f')} | "
            f"{_f(us.get('xla'))} | {_f(tb.get('xla'), '.2f')} | {vs} | "
            f"{_f(us.get('jax_gqa'))} | {_f(tb.get('jax_gqa'), '.2f')} |")
    errors = [f"- {r['context']}/{r['batch']} {k}: {e}" for r in rows for k, e in r["errors"].items()]
    return "\n".join(lines + ([""] + errors if errors else []))


def decode_markdown(payload) -> str:
    md = ["# Attention kernels", "", f"{payload['env']}", ""] + _checks_md(payload.get("checks"))
    if payload.get("decode"):
        md += [decode_table(payload["decode"], payload["ceiling_bytes_per_s"]), ""]
    if payload.get("prefill"):
        md += prefill_table(payload["prefill"]) + [""]
    return "\n".join(md)


def run_decode(args) -> None:
    t0 = time.perf_counter()
    name = "attention_kernels" + (f"-{args.suffix}" if args.suffix else "")
    ceiling = copy_ceiling()
    payload = {"env": harness.environment(), "args": vars(args), "copy_ceiling": ceiling,
               "ceiling_bytes_per_s": ceiling["bytes_per_s"]}
    print(f"{payload['env']}\ncopy ceiling {ceiling}", flush=True)

    def save():  # after every section: a run cut short still leaves its results
        payload["wall_s"] = time.perf_counter() - t0
        harness.save(name, payload, decode_markdown(payload))

    if not args.no_check:
        payload["checks"] = check_decode() + check_rotary()
        save()
    if args.sweep:
        payload["sweep"] = sweep_decode()
        save()
    rows = payload["decode"] = []
    specs = [(c, b, "bfloat16") for c in args.contexts for b in args.batches if kv_bytes(b, c) <= KV_LIMIT]
    specs += [(*map(int, x.split(":")), "int8") for x in filter(None, args.int8.split(","))]
    for context, batch, dtype in specs:
        impls = args.impls.split(",") if dtype == "bfloat16" else ["dsjax"]
        rows.append(decode_row(context, batch, ceiling["bytes_per_s"], impls, dtype))
        same = [r for r in rows if (r["context"], r["batch"], r["dtype"]) == (context, batch, "bfloat16")]
        if dtype == "int8" and same and "dsjax" in same[0]["us"] and "dsjax" in rows[-1]["us"]:
            rows[-1]["speedup_vs_bf16"] = same[0]["us"]["dsjax"] / rows[-1]["us"]["dsjax"]
        print(f"decode {rows[-1]}", flush=True)
    end = payload["copy_ceiling_end"] = copy_ceiling(warm_s=0.1)
    print(f"copy ceiling at the end {end}", flush=True)
    best = payload["ceiling_bytes_per_s"] = max(ceiling["bytes_per_s"], end["bytes_per_s"])
    for r in rows:
        r["pct"] = {k: 100 * t * 1e12 / best for k, t in r["tbps"].items()}
    save()
    if args.prefill:
        payload["prefill"] = prefill_rows()
        save()
    print("\n" + decode_markdown(payload).split("\n", 4)[-1])


# ----------------------------------------------------------------------------- prefill

def causal_flops(T: int, heads: int = 32, dim: int = 128, batch: int = 1) -> float:
    return 2 * 2 * batch * heads * T * T * dim / 2


def prefill_fns(T: int, kv_heads: int, heads: int, dim: int, block_sizes):
    """name -> (fn(q, k, v) -> out, layout(k) -> k as that implementation reads it)."""
    scale = dim ** -0.5
    q_pos = jnp.arange(T, dtype=jnp.int32)[None]  # [1, T]
    k_valid = jnp.ones((1, T), bool)
    to_bshd = lambda k: k.transpose(0, 2, 1, 3)  # noqa: E731  [B, KVH, S, Dh] -> [B, S, KVH, Dh]
    return {
        "pallas": (lambda q, k, v: fa.flash_attention(q, k, v, q_pos, scale=scale, causal=True,
                                                      block_sizes=block_sizes), lambda k: k),
        "cudnn": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn"), to_bshd),
        "xla": (lambda q, k, v: ops.attention_xla(q, k, v, q_pos, q_pos, k_valid, scale=scale,
                                                  causal=True, window=None, alibi_slopes=None),
                lambda k: k),
        "mha": (lambda q, k, v: mha(q, k, v, None, sm_scale=scale, causal=True),
                lambda k: jnp.repeat(to_bshd(k), heads // kv_heads, axis=2)),
    }


def time_prefill(fn, layout, T: int, kv_heads: int, heads: int = 32, dim: int = 128,
                 reps: int = 10, S: int | None = None, calls: int | None = None) -> float:
    """Median ms per call of fn(q [1, T, H, Dh], k, v [1, KVH, S, Dh]) (bf16; S defaults to
    T), `calls` independent queries per jit (default 32768 // T, within 1..16) so that launch
    overhead and host jitter are amortised over several ms of GPU work."""
    calls = calls or min(16, max(1, 32768 // T))
    keys = jax.random.split(jax.random.key(T), calls + 2)
    k, v = (layout(jax.random.normal(kk, (1, kv_heads, S or T, dim), jnp.bfloat16)) for kk in keys[:2])
    qs = [(jax.random.normal(kk, (1, T, heads, dim), jnp.bfloat16), k, v) for kk in keys[2:]]
    return harness.time_in_jit(fn, qs, reps, inner=1)[0] * 1e3


def prefill_rows(seq_lens=SEQ_LENS, kv_heads=(8, 32), heads: int = 32, dim: int = 128,
                 reps: int = 10, block_sizes=None, on_row=None) -> list[dict]:
    """One row per (T, KVH): ms and TFLOP/s per implementation (None + error when it failed),
    and the Pallas kernel's speed relative to cuDNN (> 1: faster). block_sizes: None (the
    kernel's defaults) or a function T -> BlockSizes; on_row(rows) is called after each row."""
    rows = []
    for kvh, T in itertools.product(kv_heads, seq_lens):
        bs = block_sizes(T) if block_sizes else None
        fns = prefill_fns(T, kvh, heads, dim, bs)
        row = {"T": T, "kv_heads": kvh, "heads": heads, "dim": dim, "ms": {}, "tflops": {},
               "errors": {}, "block_sizes": vars(bs) if bs else "default"}
        for name in PREFILL_IMPLS:
            try:
                calls = 1 if name == "xla" and T >= 8192 else None  # its [T, T] scores are big
                ms = time_prefill(*fns[name], T, kvh, heads, dim, reps, calls=calls)
                row["ms"][name] = ms
                row["tflops"][name] = causal_flops(T, heads, dim) / (ms * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001  (record, keep going: OOM at large T is data)
                row["ms"][name] = row["tflops"][name] = None
                row["errors"][name] = error_line(e)
            gc.collect()
        p, c = row["ms"].get("pallas"), row["ms"].get("cudnn")
        row["pallas_vs_cudnn"] = c / p if p and c else None
        print(f"T={T:>6} KVH={kvh:>2}: " + ", ".join(
            f"{n} {_f(row['ms'][n], '.3f')} ms/{_f(row['tflops'][n])} TF" for n in row["ms"])
            + f"; pallas/cudnn speed {_f(row['pallas_vs_cudnn'], '.2f')}", flush=True)
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


def cache_rows(T: int = 512, capacities=(512, 4096, 16384), kv_heads: int = 8, reps: int = 10) -> list[dict]:
    """Prefill of T tokens into caches of growing capacity (k_pos=None, q_pos = 0..T-1): the
    kernel skips the empty slots, so the time should not grow with the capacity."""
    rows = []
    for S in capacities:
        fn, layout = prefill_fns(T, kv_heads, H, DH, None)["pallas"]
        try:
            row = {"T": T, "S": S, "ms": time_prefill(fn, layout, T, kv_heads, reps=reps, S=S)}
        except Exception as e:  # noqa: BLE001
            row = {"T": T, "S": S, "ms": None, "error": error_line(e)}
        print("cache", row, flush=True)
        rows.append(row)
    return rows


# (block_q, block_k) pairs x num_warps x num_stages tried by --tune, per shape class
TUNE_GRID = {
    "short": ([(64, 64), (64, 128), (32, 64), (128, 64)], (4, 8), (2, 3)),
    "long": ([(128, 64), (128, 128), (128, 32), (64, 64), (64, 128)], (4, 8), (2, 3)),
}


def tune(T: int, grid, kv_heads: int = 8, reps: int = 5, budget_s: float = 90.0):
    """Times the kernel over a grid of BlockSizes at query length T (stopping after budget_s);
    returns (fastest BlockSizes, [(config dict, ms)])."""
    pairs, warps, stages = grid
    results, t0 = [], time.perf_counter()
    for (bq, bk), w, st in itertools.product(pairs, warps, stages):
        bs = fa.BlockSizes(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
        if bs.smem_bytes(DH, 2) > 227 * 1024 or time.perf_counter() - t0 > budget_s:
            continue
        fn, layout = prefill_fns(T, kv_heads, H, DH, bs)["pallas"]
        try:
            ms = time_prefill(fn, layout, T, kv_heads, reps=reps)
        except Exception as e:  # noqa: BLE001  (a config Triton cannot fit is skipped)
            print(f"tune {bs}: {error_line(e)}", flush=True)
            continue
        print(f"tune T={T} KVH={kv_heads} {bs}: {ms:.3f} ms", flush=True)
        results.append((bs, ms))
    best = min(results, key=lambda r: r[1])[0] if results else None
    return best, [({"T": T, **vars(bs)}, ms) for bs, ms in results]


PREFILL_CHECKS = [  # (B, T, S, H, KVH, Dh, dtype, causal, window, alibi, k_pos given, k_valid)
    (2, 300, 1000, 8, 2, 128, "bfloat16", True, None, False, False, False),
    (2, 200, 200, 8, 1, 80, "float16", True, 64, True, True, True),
    (1, 129, 515, 4, 4, 96, "bfloat16", True, 100, False, False, True),
    (2, 100, 100, 4, 2, 256, "float32", False, None, False, True, True),
    (2, 70, 70, 8, 8, 64, "bfloat16", True, None, True, True, True),
    (2, 1000, 1000, 8, 2, 256, "bfloat16", True, None, False, False, False),
]


def check_prefill() -> list[dict]:
    """The compiled flash kernel against its float32 reference. Queries sit at the end of the
    keys (a chunk of prefill); with k_valid, batch row 1 has no valid key at all (its output
    must be the mean of V). fp32: the GPU's dots may run in TF32."""
    rows = []
    for B, T, S, Hc, Kc, Dc, dtype, causal, window, alibi, given, padded in PREFILL_CHECKS:
        ks = jax.random.split(jax.random.key(T), 3)
        q = jax.random.normal(ks[0], (B, T, Hc, Dc), dtype)
        k, v = (jax.random.normal(kk, (B, Kc, S, Dc), dtype) for kk in ks[1:])
        k_valid = jnp.arange(S)[None] < jnp.array([S - 7, 0][:B])[:, None] if padded else None
        q_pos = jnp.arange(T, dtype=jnp.int32)[None].repeat(B, 0) + (0 if given else S - T)
        k_pos = jnp.arange(S, dtype=jnp.int32)[None].repeat(B, 0) if given else None
        slopes = 2.0 ** -jnp.arange(1, Hc + 1, dtype=jnp.float32) if alibi else None
        kw = dict(scale=Dc ** -0.5, causal=causal, window=window, alibi_slopes=slopes)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        rows.append(check(f"prefill {[B, T, S, Hc, Kc, Dc]} {dtype} causal={causal} window={window} "
                          f"alibi={alibi} k_pos={given} k_valid={padded}",
                          lambda: fa.flash_attention(q, k, v, q_pos, k_pos, k_valid, **kw),
                          lambda: fa.flash_attention_reference(*f32, q_pos, k_pos, k_valid, **kw),
                          tol=2e-3 if dtype == "float32" else 2e-2))
    return rows


def prefill_table(rows) -> list[str]:
    lines = ["| T | KVH | " + " | ".join(f"{n} ms | {n} TF/s" for n in PREFILL_IMPLS) + " | speed |",
             "|---|---|" + "---|---|" * len(PREFILL_IMPLS) + "---|"]
    for r in rows:
        cells = []
        for n in PREFILL_IMPLS:
            err = r["errors"].get(n)
            cells += [err or _f(r["ms"].get(n), ".3f"), "" if err else _f(r["tflops"].get(n))]
        lines.append(f"| {r['T']} | {r['kv_heads']} | " + " | ".join(cells)
                     + f" | {_f(r['pallas_vs_cudnn'], '.2f')} |")
    return ["Prefill, causal, B=1 H=32 Dh=128 bf16. Median ms per call and TFLOP/s (causal FLOPs "
            "2*2*B*H*T*T*Dh/2); speed = cuDNN ms / Pallas ms (> 1: Pallas faster).", ""] + lines


def prefill_markdown(payload) -> str:
    env = payload["env"]
    lines = [f"# Causal prefill attention, {env['device']}, JAX {env['jax']}", "",
             f"Pallas block sizes: {payload['block_sizes']}.", ""] + _checks_md(payload.get("checks"))
    lines += prefill_table(payload["rows"])
    tuning = payload.get("tuning") or ()
    for T in sorted({cfg["T"] for cfg, _ in tuning}):
        runs = sorted(((cfg, ms) for cfg, ms in tuning if cfg["T"] == T), key=lambda r: r[1])
        lines += ["", f"Tuning at T={T}, KVH=8, fastest 5 of {len(runs)}:", ""]
        lines += [f"- {cfg}: {ms:.3f} ms" for cfg, ms in runs[:5]]
    if payload.get("cache"):
        lines += ["", "Prefill into a cache of capacity S (k_pos=None: empty slots skipped):", ""]
        lines += [f"- T={r['T']} S={r['S']}: " + (r.get("error") or f"{r['ms']:.3f} ms")
                  for r in payload["cache"]]
    return "\n".join(lines) + "\n"


def run_prefill(args) -> None:
    name = "attention_prefill" + (f"-{args.suffix}" if args.suffix else "")
    payload = {"env": harness.environment(), "args": vars(args)}
    payload["checks"] = check_prefill() if args.check else None
    pick, payload["tuning"] = None, None
    payload["block_sizes"] = (f"T <= {fa.SHORT_PREFILL}: "
                              f"{fa.BlockSizes.get_default(DH, seq_len=fa.SHORT_PREFILL)}; "
                              f"longer: {fa.BlockSizes.get_default(DH)}")
    if args.tune:
        short, tuned_short = tune(fa.SHORT_PREFILL, TUNE_GRID["short"], budget_s=45)
        long, tuned_long = tune(4096, TUNE_GRID["long"], budget_s=75)
        if short and long:
            pick = lambda T: short if T <= fa.SHORT_PREFILL else long  # noqa: E731
            payload["block_sizes"] = f"T <= {fa.SHORT_PREFILL}: {short}; longer: {long}"
        payload["tuning"] = tuned_short + tuned_long
    payload["cache"] = cache_rows() if args.cache else None

    def save(rows):
        payload["rows"] = rows
        harness.save(name, payload, prefill_markdown(payload))

    save(prefill_rows(args.seq_lens, args.kv_heads, reps=args.reps, block_sizes=pick, on_row=save))
    print(prefill_markdown(payload))


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    d = sub.add_parser("decode", help="decode attention: TB/s of KV read (results/attention_kernels)")
    d.add_argument("--contexts", type=harness.ints, default=list(CONTEXTS))
    d.add_argument("--batches", type=harness.ints, default=list(BATCHES))
    d.add_argument("--impls", default="dsjax,xla,jax_gqa")
    d.add_argument("--int8", default="4096:1,16384:16,32768:16", help="context:batch int8 rows")
    d.add_argument("--sweep", action="store_true", help="time a grid of BlockSizes first")
    d.add_argument("--no-check", action="store_true", help="skip the compiled-kernel checks")
    d.add_argument("--prefill", action="store_true", help="add the prefill rows (defaults)")
    f = sub.add_parser("prefill", help="causal flash prefill vs cuDNN, XLA, mha (results/attention_prefill)")
    f.add_argument("--seq-lens", type=harness.ints, default=list(SEQ_LENS))
    f.add_argument("--kv-heads", type=harness.ints, default=[8, 32])
    f.add_argument("--reps", type=int, default=10)
    f.add_argument("--tune", action="store_true", help="pick the Pallas block sizes first")
    f.add_argument("--check", action="store_true", help="compiled kernel vs reference first")
    f.add_argument("--cache", action="store_true", help="time prefill into larger caches")
    for s in (d, f):
        s.add_argument("--suffix", default="", help="results/NAME-SUFFIX.{json,md}")
        s.add_argument("--render", action="store_true", help="rewrite the .md from the results' .json")
    args = p.parse_args(argv)
    if args.render:
        name = {"decode": "attention_kernels", "prefill": "attention_prefill"}[args.part]
        path = harness.RESULTS / (name + (f"-{args.suffix}" if args.suffix else ""))
        render = decode_markdown if args.part == "decode" else prefill_markdown
        path.with_suffix(".md").write_text(render(json.loads(path.with_suffix(".json").read_text())))
        return
    (run_decode if args.part == "decode" else run_prefill)(args)


if __name__ == "__main__":
    main()
