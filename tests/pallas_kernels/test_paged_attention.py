"""Paged attention kernel (interpret mode) against dsjax.ops.paged_attention_xla and its own
reference, on shuffled block pools holding several sequences (decode tokens, prompt chunks and
padding tokens in one flat batch); and the serving engine's greedy tokens under the kernel."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import numerics, ops, pallas_ops
from dsjax.ops import paged_attention_xla
from dsjax.policy import KernelPolicy, Unsupported
from dsjax.serving.engine import ServingEngine
from dsjax.serving.paged import PagedLayer, StepMeta
from pallas_kernels.paged_attention import (BlockSizes, paged_attention,
                                            paged_attention_reference)
from tests.conftest import llama_model, prompt

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# several key steps per sequence at these lengths; programs of one token, and tiles of 4
# (the 9- and 5-token chunks split into several, the last one partial)
SIZES = (BlockSizes(block_q=1, block_k=16), BlockSizes(block_q=4, block_k=16))
# Sequences of lengths 1, 9, 23 and 6; the step holds the last `chunk` tokens of each: a
# decode token of a one-token sequence, a whole first prompt chunk, a middle chunk (its keys
# before it written by earlier steps) and a decode token; then 3 padding tokens.
LENGTHS, CHUNKS, PADDING = (1, 9, 23, 6), (1, 9, 5, 1), 3
quantize_kv = jax.jit(numerics.quantize_kv)


def make_step(H, KVH, Dh, bs, dtype, *, seed=0, num_blocks=24, max_blocks=8):
    """A step over shuffled pools (numpy, on the host: no compiles): q [N, H, Dh], positions,
    StepMeta, and pools [NB, KVH, bs, Dh] whose unwritten slots (past each sequence's length,
    unowned blocks, block 0 which pads the tables) hold 0 ('clean') or NaN ('dirty': a kernel
    that reads or weighs them shows it)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((len(LENGTHS), max_blocks), np.int32)
    written = np.zeros((num_blocks, bs), bool)
    pos, seq, slots, used = [], [], [], 0
    for s, (length, chunk) in enumerate(zip(LENGTHS, CHUNKS)):
        n = -(-length // bs)
        tables[s, :n], used = ids[used:used + n], used + n
        p = np.arange(length)
        written[tables[s, p // bs], p % bs] = True
        p = p[length - chunk:]
        pos += list(p)
        seq += [s] * chunk
        slots += list(tables[s, p // bs] * bs + p % bs)
    pos, seq, slots = (np.array(x + [f] * PADDING, np.int32) for x, f in
                       ((pos, 0), (seq, 0), (slots, -1)))
    q = rng.standard_normal((len(pos), H, Dh)).astype(np.float32)
    k, v = rng.standard_normal((2, num_blocks, KVH, bs, Dh)).astype(np.float32)
    mask = written[:, None, :, None]
    clean = [jnp.asarray(np.where(mask, x, 0), dtype) for x in (k, v)]
    dirty = [jnp.asarray(np.where(mask, x, np.nan), dtype) for x in (k, v)]
    meta = StepMeta(jnp.asarray(slots), jnp.asarray(seq), jnp.asarray(tables))
    return jnp.asarray(q, dtype), jnp.asarray(pos), meta, clean, dirty, written


def quantize(clean, written):
    """int8 pools of the clean ones, and their scales with NaN in the unwritten slots."""
    (k8, ks), (v8, vs) = quantize_kv(clean[0]), quantize_kv(clean[1])
    nan = jnp.asarray(written)[:, None, :]
    return (k8, v8, ks, vs), (jnp.where(nan, ks, jnp.nan), jnp.where(nan, vs, jnp.nan))


@functools.partial(jax.jit, static_argnames=("scale", "window"))
def run(q, pos, meta, clean, dirty, slopes, *, scale, window):
    """(kernel over the dirty pools [one output per SIZES], its reference,
    ops.paged_attention_xla), one program: op-by-op dispatch would compile every small op of
    the interpreter on its own."""
    kw = dict(scale=scale, window=window, alibi_slopes=slopes)
    named = lambda scales: dict(zip(("k_scale", "v_scale"), scales))  # noqa: E731
    k, v, *scales = clean
    kd, vd, *dirty_scales = dirty
    out = [paged_attention(q, kd, vd, pos, meta.token_seq, meta.block_tables, meta.slots >= 0,
                           **kw, **named(dirty_scales), block_sizes=b, interpret=True)
           for b in SIZES]
    ref = paged_attention_reference(q, k, v, pos, meta.token_seq, meta.block_tables, **kw,
                                    **named(scales))
    layer = PagedLayer(k, v, *(scales or (None, None)), meta)
    via_xla = paged_attention_xla(q[None], layer, pos[None], **kw)[0]
    return out, ref, via_xla


def check(outs, want, dtype, tol_scale=1.0):
    """Each output's tokens equal want's; its padding tokens are 0."""
    for out in outs if isinstance(outs, list) else [outs]:
        assert out.dtype == want.dtype == dtype
        out, ref = np.asarray(out, np.float32), np.asarray(want, np.float32)
        assert np.all(np.isfinite(out))
        tol = TOL[dtype] * tol_scale
        if isinstance(outs, list):  # the kernel: padding rows are 0
            assert (out[-PADDING:] == 0).all()
            out, ref = out[:-PADDING], ref[:-PADDING]
        np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("H, KVH, Dh, bs, dtype", [
    (8, 2, 32, 4, jnp.float32),  # GQA ratio 4, 4-slot blocks: 4 blocks per key step
    (4, 1, 80, 3, jnp.bfloat16),  # MQA; a head dim and block size that are not powers of two
])
def test_matches_xla_and_reference(H, KVH, Dh, bs, dtype):
    q, pos, meta, clean, dirty, _ = make_step(H, KVH, Dh, bs, dtype)
    out, ref, via_xla = run(q, pos, meta, clean, dirty, None, scale=Dh**-0.5, window=None)
    check(out, ref, dtype)
    check(out, via_xla, dtype, tol_scale=2)


def test_window_and_alibi():
    """A window of 6 with ALiBi, fp32, GQA ratio 2, 16-slot blocks (a block spans a key step;
    the middle chunk's windows start inside one)."""
    H, KVH, Dh = 4, 2, 64
    q, pos, meta, clean, dirty, _ = make_step(H, KVH, Dh, 16, jnp.float32, seed=1)
    slopes = jnp.linspace(0.05, 1.0, H)
    out, ref, via_xla = run(q, pos, meta, clean, dirty, slopes, scale=Dh**-0.5, window=6)
    check(out, ref, jnp.float32)
    check(out, via_xla, jnp.float32)


def test_int8_pools():
    """int8 pools with per-slot scales (NaN in the unwritten slots), bf16 queries, a window
    and ALiBi; against the reference on the same codes and the XLA op (which dequantizes to
    bf16 first: rounding, hence the wider bound)."""
    H, KVH, Dh = 8, 2, 64
    q, pos, meta, clean, _, written = make_step(H, KVH, Dh, 4, jnp.bfloat16, seed=2)
    (k8, v8, ks, vs), (ks_nan, vs_nan) = quantize(clean, written)
    slopes = jnp.linspace(0.1, 0.9, H)
    out, ref, via_xla = run(q, pos, meta, (k8, v8, ks, vs), (k8, v8, ks_nan, vs_nan), slopes,
                            scale=Dh**-0.5, window=9)
    check(out, ref, jnp.bfloat16)
    check(out, via_xla, jnp.bfloat16, tol_scale=2)


def test_lowers_for_cuda():
    """The GPU kernel (not its interpreter) lowers to Triton: gathered K/V rows and block ids,
    int8 pools with a window and ALiBi (this machine has no GPU)."""
    sd = jax.ShapeDtypeStruct
    N, H, KVH, Dh, NB, bs = 16, 8, 2, 80, 32, 4
    pool, scale = sd((NB, KVH, bs, Dh), jnp.int8), sd((NB, KVH, bs), jnp.float32)
    fn = jax.jit(functools.partial(paged_attention, scale=0.1, window=7))
    try:
        exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            sd((N, H, Dh), jnp.bfloat16), pool, pool, sd((N,), jnp.int32), sd((N,), jnp.int32),
            sd((4, 8), jnp.int32), alibi_slopes=sd((H,), jnp.float32), k_scale=scale,
            v_scale=scale)
    except RuntimeError as e:  # JAX 0.11's Triton lowering asks the GPU for its compute capability
        if "No supported GPU devices found" not in str(e):
            raise
        pytest.skip(f"this JAX ({jax.__version__}) lowers Triton kernels only with a GPU present")
    assert 'name = "paged_attention"' in exported.mlir_module()


def test_policy_and_unsupported_calls(caplog):
    """KernelPolicy.pallas() selects the kernel; a call it cannot take raises Unsupported in the
    adapter, and the seam then runs the XLA implementation with a warning that says why."""
    policy = KernelPolicy.pallas()
    assert policy.paged_attention == "pallas" and policy.describe() == "pallas"
    zeros = jnp.zeros(2, jnp.int32)
    meta = StepMeta(zeros, zeros, jnp.zeros((1, 1), jnp.int32))
    fp8, fp32 = (jnp.zeros((2, 1, 4, 16), d) for d in (jnp.float8_e4m3fn, jnp.float32))
    kw = dict(scale=1.0, window=None, alibi_slopes=None)
    for batch, pool, why in ((1, fp8, "float8_e4m3fn pools"), (2, fp32, "a batch of 2")):
        with pytest.raises(Unsupported, match=why):
            pallas_ops.paged_attention(jnp.zeros((batch, 2, 2, 16)), PagedLayer(
                pool, pool, None, None, meta), jnp.zeros((batch, 2), jnp.int32), **kw,
                policy=policy)
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        out = jax.jit(lambda q, layer: ops.paged_attention(q, layer, zeros[None], **kw,
                                                           policy=policy))(
            jnp.ones((1, 2, 2, 16)), PagedLayer(fp8, fp8, None, None, meta))
    assert out.shape == (1, 2, 32)
    assert ("ops.paged_attention: 'pallas' cannot run it (float8_e4m3fn pools (it reads "
            "bfloat16, float16, float32, int8)): falling back to 'xla'") in caplog.text


def test_serving_engine_tokens_equal_xla(caplog):
    """The serving engine with every Pallas kernel (one-layer LLaMA, GQA, fp32): chunked
    prompts and decode steps give the XLA serving engine's greedy tokens."""
    hf = llama_model(num_hidden_layers=1)
    kw = dict(dtype="fp32", max_out_tokens=64, progress=False)
    engines = [dsjax.init_inference(hf, **kw),
               dsjax.init_inference(hf, kernels=KernelPolicy.pallas(interpret=True), **kw)]
    prompts = [prompt(11, 3), prompt(12, 13), prompt(13, 6)]
    outs = []
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        for engine in engines:
            srv = ServingEngine(engine, block_size=4, num_blocks=24, token_budget=16, max_seqs=4)
            outs.append(srv.generate(prompts, max_new_tokens=5, eos_token_id=[]))
    assert "ops.paged_attention runs the 'pallas' implementation" in caplog.text
    for xla, pallas in zip(*outs):
        assert pallas.token_ids == xla.token_ids
        np.testing.assert_allclose(pallas.logprobs, xla.logprobs, atol=2e-4)
