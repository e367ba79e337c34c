"""flash_attention (interpret mode, CPU) against its jnp reference and dsjax.ops.attention_xla.

Shapes are small and deliberately ragged (T, S not multiples of the 16-wide blocks); every case
checks the kernel against both references and that its output is finite.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.ops import attention_xla
from pallas_kernels.flash_attention import (SMEM_BUDGET, BlockSizes, flash_attention,
                                            flash_attention_reference)

SMALL = BlockSizes(block_q=16, block_k=16, num_warps=4, num_stages=2)
# Interpret mode is compile-bound on the CPU: skip XLA's expensive backend passes in the tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    T: int = 37
    S: int = 37
    H: int = 4
    KVH: int = 2
    Dh: int = 64
    dtype: type = jnp.float32
    causal: bool = True
    window: int | None = None
    alibi: bool = False
    B: int = 2


def _inputs(case: Case, seed: int = 0):
    """q [B, T, H, Dh]; k, v [B, KVH, S, Dh]; alibi slopes [H] or None."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (case.B, case.T, case.H, case.Dh), case.dtype)
    k = jax.random.normal(kk, (case.B, case.KVH, case.S, case.Dh), case.dtype)
    v = jax.random.normal(kv, (case.B, case.KVH, case.S, case.Dh), case.dtype)
    slopes = 2.0 ** (-jnp.arange(1, case.H + 1, dtype=jnp.float32)) if case.alibi else None
    return q, k, v, slopes


def _check(case: Case, q_pos, k_pos=None, k_valid=None, block_sizes=SMALL, seed=0):
    """Kernel vs reference and vs attention_xla, the three in one program compiled with
    FAST_COMPILE; returns the kernel output [B, T, H*Dh] as float32 numpy."""
    q, k, v, slopes = _inputs(case, seed)
    kw = dict(scale=case.Dh ** -0.5, causal=case.causal, window=case.window)
    full_pos = k_pos if k_pos is not None else jnp.broadcast_to(
        jnp.arange(case.S, dtype=jnp.int32), (case.B, case.S))
    full_valid = k_valid if k_valid is not None else jnp.ones((case.B, case.S), bool)

    def run(q, k, v, q_pos, k_pos, k_valid, full_pos, full_valid, slopes):
        return (flash_attention(q, k, v, q_pos, k_pos, k_valid, alibi_slopes=slopes,
                                block_sizes=block_sizes, interpret=True, **kw),
                flash_attention_reference(q, k, v, q_pos, k_pos, k_valid, alibi_slopes=slopes,
                                          **kw),
                attention_xla(q, k, v, q_pos, full_pos, full_valid, alibi_slopes=slopes, **kw))

    args = (q, k, v, q_pos, k_pos, k_valid, full_pos, full_valid, slopes)
    raw, ref, xla = jax.jit(run).lower(*args).compile(FAST_COMPILE)(*args)
    assert raw.shape == (case.B, case.T, case.H * case.Dh) and raw.dtype == case.dtype
    out, ref, xla = (np.asarray(x, np.float32) for x in (raw, ref, xla))
    assert np.isfinite(out).all()
    tol = TOL[case.dtype]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    np.testing.assert_allclose(out, xla, atol=2 * tol, rtol=2 * tol)
    return out


def _prefill_pos(case: Case, starts=(0, 5)):
    """Query positions of a (chunked) prefill into the cache: start_b + arange(T)."""
    return jnp.asarray(starts, jnp.int32)[:, None] + jnp.arange(case.T, dtype=jnp.int32)


def _padding_positions(mask):
    """Positions as generate.forward computes them: cumsum of the mask - 1, floored at 0."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


# Cache case (k_pos None, S = capacity > T): head dims x GQA ratios x dtypes, block skipping.
@pytest.mark.parametrize("case", [
    Case(T=37, S=100, H=4, KVH=4, Dh=64, dtype=jnp.bfloat16),
    Case(T=37, S=100, H=8, KVH=2, Dh=80, dtype=jnp.float16),
    Case(T=21, S=70, H=8, KVH=1, Dh=96, dtype=jnp.float32),
    Case(T=37, S=100, H=8, KVH=1, Dh=128, dtype=jnp.bfloat16),
    Case(T=20, S=50, H=4, KVH=1, Dh=256, dtype=jnp.float32),
    Case(T=37, S=100, H=4, KVH=1, Dh=64, window=10),
    Case(T=37, S=100, H=4, KVH=2, Dh=64, window=20, alibi=True, dtype=jnp.bfloat16),
], ids=str)
def test_cache_prefill(case):
    _check(case, _prefill_pos(case))


def test_cache_empty_row_is_uniform_average():
    """A row whose keys are all invalid sees nothing: like attention_xla, its output is the
    mean of V over all S slots (the skipped blocks included), never NaN."""
    case = Case(T=20, S=90, H=4, KVH=2, Dh=64)
    k_valid = jnp.ones((case.B, case.S), bool).at[1].set(False)
    out = _check(case, _prefill_pos(case, (0, 0)), k_valid=k_valid)
    _, _, v, _ = _inputs(case)
    mean = np.asarray(v[1].mean(axis=1))  # [KVH, Dh]
    expect = np.repeat(mean, case.H // case.KVH, axis=0).reshape(-1)
    np.testing.assert_allclose(out[1], np.broadcast_to(expect, out[1].shape), atol=1e-5)


def test_cache_window_hides_everything_before_it():
    """Queries far past the written keys with a short window: no visible key in the cache."""
    case = Case(T=16, S=48, H=2, KVH=1, Dh=64, window=4)
    _check(case, _prefill_pos(case, (60, 10)))


def test_cache_length_one_rows():
    case = Case(T=1, S=45, H=8, KVH=1, Dh=128, dtype=jnp.bfloat16)
    _check(case, _prefill_pos(case, (0, 44)))


# Self-attention over the block (k_pos given), padding on either side, as generate.forward.
@pytest.mark.parametrize("case", [
    Case(T=29, S=29, H=4, KVH=4, Dh=64, alibi=True),
    Case(T=29, S=29, H=8, KVH=1, Dh=96, alibi=True, dtype=jnp.bfloat16),
    Case(T=29, S=29, H=8, KVH=2, Dh=80, causal=False),
], ids=str)
def test_left_padded_self_attention(case):
    lengths = jnp.array([case.T - 9, 1, 0][: case.B])
    mask = jnp.arange(case.T)[None, :] >= case.T - lengths[:, None]  # left padding
    pos = _padding_positions(mask)
    _check(case, pos, k_pos=pos, k_valid=mask)


@pytest.mark.parametrize("case", [
    Case(T=29, S=29, H=4, KVH=4, Dh=64, B=3),
    Case(T=29, S=29, H=8, KVH=1, Dh=64, alibi=True, B=3, window=5),
], ids=str)
def test_right_padded_rows_and_empty_row(case):
    """Lengths T-3, 1 (a length-1 row) and 0 (every key invalid: the uniform average)."""
    lengths = jnp.array([case.T - 3, 1, 0])
    mask = jnp.arange(case.T)[None, :] < lengths[:, None]
    pos = _padding_positions(mask)
    _check(case, pos, k_pos=pos, k_valid=mask)


def test_bidirectional_encoder():
    """Non-causal attention with key padding (BERT-style), keys by slot."""
    case = Case(T=37, S=37, H=4, KVH=4, Dh=64, causal=False, dtype=jnp.bfloat16)
    mask = jnp.arange(case.T)[None, :] < jnp.array([[30], [37]])
    _check(case, _padding_positions(mask), k_valid=mask)


def test_non_causal_cache_no_mask_at_all():
    """No mask of any kind: the unmasked path plus the ragged last key block."""
    case = Case(T=20, S=41, H=4, KVH=2, Dh=64, causal=False)
    _check(case, _prefill_pos(case))


@pytest.mark.parametrize("block_sizes", [
    BlockSizes(block_q=32, block_k=16, num_warps=4, num_stages=2),
    None,  # the defaults, shrunk to the problem
], ids=str)
def test_block_sizes(block_sizes):
    case = Case(T=50, S=120, H=4, KVH=1, Dh=64, window=33, alibi=True)
    _check(case, _prefill_pos(case, (3, 40)), block_sizes=block_sizes)


def test_shuffled_key_positions():
    """k_pos need not be sorted: the mask follows positions, not slots."""
    case = Case(T=24, S=24, H=4, KVH=2, Dh=64, window=6, alibi=True)
    perm = jax.random.permutation(jax.random.key(1), case.S).astype(jnp.int32)
    k_pos = jnp.broadcast_to(perm, (case.B, case.S))
    _check(case, _prefill_pos(case, (0, 3)), k_pos=k_pos)


def test_block_sizes_defaults_and_validation():
    for dh in (64, 80, 96, 128, 256):
        for dtype in (jnp.bfloat16, jnp.float32):
            bs = BlockSizes.get_default(dh, dtype)
            assert bs.block_q >= 16 and bs.block_k >= 16
            assert bs.smem_bytes(dh, jnp.dtype(dtype).itemsize) <= SMEM_BUDGET
    with pytest.raises(dataclasses.FrozenInstanceError):
        SMALL.block_q = 32
    q = jnp.zeros((2, 37, 3, 64))
    k = v = jnp.zeros((2, 2, 37, 64))
    with pytest.raises(ValueError):
        flash_attention(q, k, v, jnp.zeros((2, 37), jnp.int32), scale=1.0, causal=True,
                        interpret=True)
