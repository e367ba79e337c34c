"""Attention kernels on one GPU (issue 5): decode attention in TB/s of KV read, plus the prefill
rows of benchmarks/attention_prefill.py.

    python3 benchmarks/attention_kernels.py [--contexts 1024,4096] [--batches 1,16] [--sweep]
                                            [--no-check] [--no-prefill]

Decode: one query per sequence at position context - 1 over a bf16 cache [B, KVH=8, context,
Dh=128] with H=32 query heads. TB/s = bytes of K and V up to the context / time per call; the
ceiling is a device copy measured in the same run ((read + write bytes) / time). Compared: the
dsjax Pallas kernel (pallas_kernels.decode_attention), the XLA path (dsjax.ops.attention_xla on
the same cache) and JAX's Pallas `decode_attention.gqa` (which takes [B, S, KVH, Dh]: it gets
swapaxes views that its own swapaxes cancels inside the jit). Several independent caches run
inside one jit, enough to exceed the 60 MB L2 and hide dispatch; combinations over 40 GB of KV
are skipped. --check compares the compiled kernels (decode and rotary + cache write) with their
references first; --sweep times a grid of BlockSizes at a few shapes. Writes
results/attention_kernels.{json,md} (and copies under $OUT when set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

H, KVH, DH = 32, 8, 128
KV_LIMIT = 40e9  # bytes of K + V
L2_MARGIN = 256e6  # bytes of distinct caches per timed jit (the H200's L2 is 60 MB)
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 4, 16, 64)


def kv_bytes(batch: int, context: int, itemsize: int = 2) -> int:
    return 2 * batch * KVH * context * DH * itemsize


def best_time(run, reps: int = 10, min_s: float = 5e-3) -> float:
    """Seconds per run(): the fastest of `reps` timings, each over enough back-to-back calls
    (dispatched without waiting) to last about min_s, so dispatch and sync overheads cancel."""
    import jax

    jax.block_until_ready(run())
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    calls = max(1, min(200, int(min_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return min(times)


def copy_ceiling(nbytes: int = 4 << 30, warm_s: float = 1.0) -> dict:
    """Device copy bandwidth, (read + write bytes) / time, over nbytes, after warm_s of copying
    (the clocks idle low until the GPU is busy): the best of an XLA copy (a device memcpy), a
    bf16 and a float32 elementwise kernel, each recorded."""
    import jax
    import jax.numpy as jnp

    x16 = jnp.ones((nbytes // 2,), jnp.bfloat16)
    x32 = jnp.ones((nbytes // 4,), jnp.float32)
    kinds = {"copy": (jax.jit(lambda x: x.copy()), x16), "bf16_x2": (jax.jit(lambda x: x * 2), x16),
             "f32_plus1": (jax.jit(lambda x: x + 1), x32)}
    t_end = time.perf_counter() + warm_s
    while time.perf_counter() < t_end:
        kinds["bf16_x2"][0](x16).block_until_ready()
    out = {"bytes": nbytes}
    for name, (f, x) in kinds.items():
        out[name] = 2 * nbytes / best_time(lambda: f(x))
    # a copy XLA elided would read as faster than HBM (4.8 TB/s on the datasheet): not a ceiling
    out["bytes_per_s"] = max(out[k] for k in kinds if out[k] < 5e12)
    return out


def make_caches(batch: int, context: int, copies: int, dtype="bfloat16", seed: int = 0):
    """`copies` independent (k, v) caches [B, KVH, context, Dh] (bf16, or int8 + scales)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.decode_attention import quantize_kv

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
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu.decode_attention import gqa

    from dsjax.ops import attention_xla
    from pallas_kernels.decode_attention import decode_attention

    scale = DH ** -0.5

    def xla(q, cache, q_pos):
        k, v = cache
        B = q.shape[0]
        k_pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (B, context))
        out = attention_xla(q[:, None], k, v, q_pos[:, None], k_pos, jnp.ones((B, context), bool),
                            scale=scale, causal=True, window=None, alibi_slopes=None)
        return out[:, 0]

    def jax_gqa(q, cache, q_pos):
        k, v = (x.swapaxes(1, 2) for x in cache)
        return gqa(q, k, v, kv_seq_len=q_pos + 1, sm_scale=scale).reshape(q.shape[0], -1)

    def dsjax(q, cache, q_pos, block_sizes=None):
        if len(cache) == 4:
            k, ks, v, vs = cache
            return decode_attention(q, k, v, q_pos, scale=scale, k_scale=ks, v_scale=vs,
                                    block_sizes=block_sizes)
        return decode_attention(q, *cache, q_pos, scale=scale, block_sizes=block_sizes)

    return {"dsjax": dsjax, "xla": xla, "jax_gqa": jax_gqa}


def time_decode(fn, q, caches, q_pos, reps: int = 10):
    """(seconds per call of fn over the distinct caches, all inside one jit; first output)."""
    import jax

    run = jax.jit(lambda q, caches, q_pos: [fn(q, c, q_pos) for c in caches])
    first = jax.block_until_ready(run(q, caches, q_pos))[0]
    return best_time(lambda: run(q, caches, q_pos), reps) / len(caches), first


def _err(e: Exception) -> str:
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
        return "out of memory"
    return f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"


def decode_row(context: int, batch: int, ceiling: float, impls, dtype="bfloat16") -> dict:
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np

    nbytes = kv_bytes(batch, context, 1 if dtype == "int8" else 2)
    if dtype == "int8":
        nbytes += 2 * batch * KVH * context * 4  # the float32 scales
    copies = max(1, min(32, int(-(-L2_MARGIN // nbytes))))
    caches = make_caches(batch, context, copies, dtype)
    q = jax.random.normal(jax.random.key(1), (batch, H, DH), jnp.bfloat16)
    q_pos = jnp.full((batch,), context - 1, jnp.int32)
    fns = decode_fns(context)
    row = {"context": context, "batch": batch, "dtype": dtype, "kv_bytes": nbytes,
           "copies": copies, "us": {}, "tbps": {}, "pct": {}, "errors": {}}
    outs = {}
    for name in impls:
        try:
            t, out = time_decode(fns[name], q, caches, q_pos)
            outs[name] = np.asarray(out, np.float32)
            row["us"][name], row["tbps"][name] = t * 1e6, nbytes / t / 1e12
            row["pct"][name] = 100 * nbytes / t / ceiling
        except Exception as e:  # noqa: BLE001  (record and go on: a failure is a result)
            row["errors"][name] = _err(e)
        gc.collect()
    if "dsjax" in outs and "xla" in outs:
        row["max_abs_vs_xla"] = float(np.max(np.abs(outs["dsjax"] - outs["xla"])))
        row["speedup_vs_xla"] = row["us"]["xla"] / row["us"]["dsjax"]
    del caches
    gc.collect()
    return row


# ----------------------------------------------------------------------------- checks, sweep

def check_decode() -> list[dict]:
    """Compiled decode kernel against its float32 reference (unwritten slots hold NaN)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import decode_attention as da

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
            (k, ks), (v, vs) = da.quantize_kv(k), da.quantize_kv(v)
            kw.update(k_scale=ks, v_scale=vs)
            k_in, v_in = k, v
        else:
            k_in, v_in = (jnp.where(written, x, jnp.nan).astype(dtype) for x in (k, v))
        name = f"decode H{Hc} KVH{Kc} Dh{Dc} {jnp.dtype(dtype).name} w={window} alibi={alibi}"
        rows.append(_compare(name + (" int8" if int8 else ""),
                             lambda: da.decode_attention(q, k_in, v_in, q_pos, **kw),
                             lambda: da.decode_attention_reference(q, k, v, q_pos, **kw),
                             tol=2e-5 if dtype == jnp.float32 else 2e-2))
    return rows


def check_rotary() -> list[dict]:
    """Compiled rotary + cache-write kernel against its reference and the model's XLA path."""
    import jax
    import jax.numpy as jnp

    from dsjax import ops
    from pallas_kernels import rotary_cache as rc
    from pallas_kernels.decode_attention import quantize_kv

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
        rows.append(_compare(name + (" int8" if int8 else ""),
                             lambda: rc.rotary_cache_write(qkv, kc.copy(), vc.copy(), pos, wat,
                                                           **kw, **{k: x.copy() for k, x in scales.items()}),
                             lambda: ref(qkv, kc, vc, pos, wat),
                             tol=1.0 if int8 else 0.0 if dtype == jnp.float32 else 1e-2))
        if not int8:
            rot = ops.Rotary(inv, rd, layout) if rd else None
            model = jax.jit(lambda *a: ops.write_kv_xla(*a, heads=(Hc, Kc, Dc), rotary=rot))
            rows.append(_compare(name + " vs model path",
                                 lambda: rc.rotary_cache_write(qkv, kc.copy(), vc.copy(), pos, wat, **kw),
                                 lambda: jax.tree.leaves(model(qkv, (kc, vc), pos, wat)),
                                 tol=1e-6 if dtype == jnp.float32 else 1e-2))
    return rows


def _compare(name: str, got_fn, want_fn, tol: float) -> dict:
    import jax
    import numpy as np

    try:
        got, want = jax.tree.leaves(got_fn()), jax.tree.leaves(want_fn())
        err = max(float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32))))
                  for g, w in zip(got, want))
        finite = all(bool(np.all(np.isfinite(np.asarray(g, np.float32)))) for g in got)
        row = {"case": name, "max_abs_err": err, "ok": finite and err <= tol, "tol": tol}
    except Exception as e:  # noqa: BLE001
        row = {"case": name, "error": _err(e), "ok": False}
    print(f"check {row}", flush=True)
    return row


SWEEP_SHAPES = ((4096, 1), (32768, 1), (16384, 4), (4096, 16), (32768, 16), (4096, 64))


def sweep(shapes=SWEEP_SHAPES, reps: int = 5) -> list[dict]:
    """Times BlockSizes variants of the dsjax kernel (block_k x num_stages x num_splits around
    the default's) at a few (context, batch) shapes; the default runs first and last (noise)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.decode_attention import BlockSizes, num_splits_for

    rows = []
    for context, batch in shapes:
        nbytes = kv_bytes(batch, context)
        caches = make_caches(batch, context, max(1, min(32, int(-(-L2_MARGIN // nbytes)))))
        q = jax.random.normal(jax.random.key(1), (batch, H, DH), jnp.bfloat16)
        q_pos = jnp.full((batch,), context - 1, jnp.int32)
        fn = decode_fns(context)["dsjax"]
        base = num_splits_for(batch, KVH, context, 64)
        splits = sorted({max(1, base * f // 8) for f in (1, 2, 4, 8, 16)})
        configs = [None] + [BlockSizes(block_k=bk, num_splits=ns, num_warps=4, num_stages=st)
                            for bk in (64, 128) for st in (2, 3) for ns in splits] + [None]
        for bs in configs:
            try:
                t, _ = time_decode(lambda q, c, p: fn(q, c, p, block_sizes=bs), q, caches, q_pos,
                                   reps)
                row = {"us": t * 1e6, "tbps": nbytes / t / 1e12}
            except Exception as e:  # noqa: BLE001
                row = {"error": _err(e)}
            rows.append({"context": context, "batch": batch,
                         "block_sizes": bs and dataclasses.asdict(bs), **row})
            print(f"sweep {rows[-1]}", flush=True)
        del caches
    return rows


# ----------------------------------------------------------------------------- output

def _f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


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


def prefill_table(rows) -> str:
    names = sorted({k for r in rows for k in r.get("ms", {})})
    lines = ["Prefill (benchmarks/attention_prefill.py), causal, B=1 H=32 Dh=128 bf16, ms "
             "(TFLOP/s)", "", "| T | KVH | " + " | ".join(names) + " |",
             "|" + "---|" * (2 + len(names))]
    for r in rows:
        cells = [f"{_f(r['ms'].get(n), '.3f')} ({_f(r.get('tflops', {}).get(n), '.0f')})"
                 for n in names]
        lines.append(f"| {r.get('T')} | {r.get('kv_heads')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(payload) -> str:
    md = ["# Attention kernels", "", f"{payload['env']}", ""]
    if payload.get("checks"):
        bad = [c for c in payload["checks"] if not c["ok"]]
        md += [f"GPU checks (compiled kernels vs references): "
               f"{len(payload['checks']) - len(bad)}/{len(payload['checks'])} ok", ""]
        md += [f"- FAILED {c}" for c in bad] + ([""] if bad else [])
    if payload.get("decode"):
        md += [decode_table(payload["decode"], payload["ceiling_bytes_per_s"]), ""]
    if payload.get("prefill"):
        md += [prefill_table(payload["prefill"]), ""]
    if payload.get("prefill_missing"):
        md += [f"Prefill rows missing: {payload['prefill_missing']}", ""]
    return "\n".join(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--impls", default="dsjax,xla,jax_gqa")
    p.add_argument("--int8", default="4096:1,16384:16,32768:16", help="context:batch int8 rows")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--render", action="store_true", help="rewrite the .md from results' .json")
    args = p.parse_args()
    if args.render:
        payload = json.loads((common.RESULTS / "attention_kernels.json").read_text())
        (common.RESULTS / "attention_kernels.md").write_text(markdown(payload))
        return
    t0 = time.perf_counter()
    env = common.environment()
    ceiling = copy_ceiling()
    print(f"{env}\ncopy ceiling {ceiling}", flush=True)
    payload = {"env": env, "args": vars(args), "copy_ceiling": ceiling,
               "ceiling_bytes_per_s": ceiling["bytes_per_s"]}
    outs = [common.RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])

    def save():  # after every section: a run cut short still leaves its results
        payload["wall_s"] = time.perf_counter() - t0
        common.write("attention_kernels", payload, markdown(payload), outs)

    if not args.no_check:
        payload["checks"] = check_decode() + check_rotary()
        save()
    if args.sweep:
        payload["sweep"] = sweep()
        save()
    rows = payload["decode"] = []
    specs = [(c, b, "bfloat16") for c in map(int, args.contexts.split(","))
             for b in map(int, args.batches.split(",")) if kv_bytes(b, c) <= KV_LIMIT]
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
    if not args.no_prefill:
        try:
            from benchmarks.attention_prefill import prefill_rows
            payload["prefill"] = prefill_rows()
        except ImportError as e:
            payload["prefill_missing"] = _err(e)
        save()
    print("\n" + markdown(payload).split("\n", 4)[-1])


if __name__ == "__main__":
    main()
