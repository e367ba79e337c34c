"""matmul / norm_matmul (interpret mode on the CPU) against their jnp references, and the
references against the unfused XLA path (dsjax.ops.linear_xla: norm, einsum, epilogue).

Shapes are small and ragged (M, K, N not multiples of the blocks) with small blocks, so every
masked edge and the split-K path run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

from dsjax import numerics, ops
from dsjax.numerics import NormSpec
from dsjax.weights import DenseWeight
from pallas_kernels import fusion
from pallas_kernels.matmul import (BlockSizes, matmul, matmul_reference, norm_matmul,
                                   norm_matmul_reference)

SMALL = BlockSizes(block_m=16, block_n=32, block_k=32, split_k=1, num_warps=4, num_stages=2)
SPLIT = dataclasses.replace(SMALL, split_k=3)
FMA1 = dataclasses.replace(SMALL, block_m=1)  # block_m < 16: the FMA GEMV form
FMA4 = dataclasses.replace(SMALL, block_m=4, split_k=3, unroll=2)
TOL = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 2e-2}
XLA_TOL = {jnp.float32: 2e-5, jnp.float16: 1e-2, jnp.bfloat16: 5e-2}  # XLA rounds in between


def assert_close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol)


def _arrays(M, K, N, dtype, seed=0, lead=()):
    """numpy-generated inputs (eager jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    arr = lambda *shape, s=1.0, c=0.0: jnp.asarray(  # noqa: E731
        c + s * rng.standard_normal(shape, np.float32), dtype)
    x = arr(*lead, M, K)  # [..., M, K]
    w = arr(K, N, s=K ** -0.5)  # [K, N]
    return x, w, arr(N), arr(*lead, M, N), arr(K, s=0.3, c=1.0), arr(K, s=0.3)


def test_activations_match_ops():
    x = jnp.linspace(-9.0, 9.0, 4001, dtype=jnp.float32)
    assert float(jnp.abs(fusion.erf(x) - erf(x)).max()) < 5e-7  # 1.5e-7 + float32 rounding
    for name, fn in numerics.ACTIVATIONS.items():
        np.testing.assert_allclose(fusion.ACTIVATIONS[name](x), fn(x), atol=3e-7, rtol=1e-6)
    assert set(fusion.ACTIVATIONS) == set(numerics.ACTIVATIONS)


MATMUL_CASES = [
    # M, K, N, dtype, bias, residual, activation, gated, transpose_w, blocks
    (1, 64, 64, jnp.float32, False, False, None, False, False, SMALL),
    (3, 96, 144, jnp.bfloat16, True, False, "gelu", False, False, SMALL),  # GQA-like N
    (16, 100, 80, jnp.float16, True, True, "relu", False, False, SMALL),
    (70, 72, 48, jnp.float32, True, True, "silu", False, False,
     dataclasses.replace(SMALL, block_m=32)),
    (5, 96, 2 * 40, jnp.bfloat16, True, False, "silu", True, False, SMALL),
    (5, 96, 2 * 40, jnp.float32, True, True, "gelu_tanh", True, False, SPLIT),
    (1, 200, 100, jnp.bfloat16, True, True, "quick_gelu", False, False, SPLIT),
    (1, 200, 100, jnp.bfloat16, True, True, "gelu", False, False, FMA1),
    (1, 64, 1000, jnp.bfloat16, False, False, None, False, True,  # tied LM head
     dataclasses.replace(FMA1, block_n=128, unroll=3)),
    (4, 80, 72, jnp.float16, True, False, "gelu", False, True, SPLIT),
    (3, 80, 72, jnp.float32, True, False, "gelu", False, True, FMA4),
    (3, 64, 2 * 24, jnp.float32, False, False, "relu", True, True, SMALL),
    (2, 96, 2 * 40, jnp.bfloat16, True, True, "silu", True, False, FMA4),
]


@pytest.mark.parametrize("M,K,N,dtype,bias,residual,act,gated,transpose_w,blocks", MATMUL_CASES)
def test_matmul(M, K, N, dtype, bias, residual, act, gated, transpose_w, blocks):
    x, w, b, r, _, _ = _arrays(M, K, N, dtype)
    n_out = N // 2 if gated else N
    b = b if bias else None
    r = r[..., :n_out] if residual else None
    w = w.T if transpose_w else w
    kw = dict(activation=act, gated=gated, transpose_w=transpose_w)

    @jax.jit  # one compile for all three
    def run(x, w, b, r):
        return (matmul(x, w, b, r, block_sizes=blocks, interpret=True, **kw),
                matmul_reference(x, w, b, r, **kw),
                ops.linear_xla(x, DenseWeight(w, k_major=transpose_w), b, r, activation=act,
                               gated=gated))
    y, want, xla = run(x, w, b, r)
    assert y.shape == (M, n_out) and y.dtype == dtype
    assert_close(y, want, TOL[dtype])
    assert_close(want, xla, XLA_TOL[dtype])


NORM_CASES = [
    # M, K, N, dtype, kind, plus_one, norm_bias, activation, gated, return_normed, transpose_w,
    # blocks
    (1, 64, 96, jnp.float32, "rmsnorm", False, False, None, False, True, False, FMA1),
    (3, 100, 72, jnp.bfloat16, "layernorm", False, True, "gelu", False, True, False, SMALL),
    (16, 96, 2 * 40, jnp.bfloat16, "rmsnorm", True, False, "silu", True, False, True, SMALL),
    (70, 64, 48, jnp.float16, "layernorm", True, True, None, False, True, False,
     dataclasses.replace(SMALL, block_m=32)),
    (2, 200, 2 * 24, jnp.float32, "rmsnorm", False, False, "gelu_tanh", True, True, False, FMA4),
    (5, 200, 2 * 24, jnp.bfloat16, "rmsnorm", True, False, "silu", True, False, False, SPLIT),
    (1, 130, 100, jnp.bfloat16, "layernorm", False, True, "quick_gelu", False, False, True,
     SPLIT),
]


@pytest.mark.parametrize("M,K,N,dtype,kind,plus_one,nbias,act,gated,ret,tw,blocks", NORM_CASES)
def test_norm_matmul(M, K, N, dtype, kind, plus_one, nbias, act, gated, ret, tw, blocks):
    x, w, b, _, scale, nb = _arrays(M, K, N, dtype, seed=1)
    x = x * 3 + 2  # a mean that dwarfs nothing, but is there
    nb = nb if nbias else None
    kw = dict(activation=act, gated=gated, return_normed=ret, transpose_w=tw)

    @jax.jit  # one compile for all
    def run(x, scale, nb, w, b):
        spec = NormSpec(scale, nb, kind=kind, eps=1e-5, plus_one=plus_one)
        stored = w.T if tw else w  # transpose_w: the kernel reads w [N, K]
        return (norm_matmul(x, spec, stored, b, block_sizes=blocks, interpret=True, **kw),
                norm_matmul_reference(x, spec, stored, b, **kw),
                ops.linear_xla(x, DenseWeight(w), b, norm=spec, activation=act, gated=gated))
    out, want, xla = run(x, scale, nb, w, b)
    y, y_want = (out[0], want[0]) if ret else (out, want)
    assert y.dtype == dtype
    assert_close(y, y_want, TOL[dtype])
    assert_close(y_want, xla, XLA_TOL[dtype])
    if ret:
        assert out[1].dtype == dtype
        assert_close(out[1], want[1], TOL[dtype])


def test_leading_dims_and_default_blocks():
    x, w, b, r, scale, nb = _arrays(3, 64, 48, jnp.float32, lead=(2,))  # x [2, 3, 64]

    @jax.jit
    def run(x, w, b, r):
        return (matmul(x, w, b, r, activation="silu", interpret=True),
                matmul_reference(x, w, b, r, activation="silu"))
    y, want = run(x, w, b, r)
    assert y.shape == (2, 3, 48)
    assert_close(y, want, TOL[jnp.float32])
    spec = NormSpec(scale, nb, kind="layernorm", eps=1e-6)
    shapes = jax.eval_shape(lambda x: norm_matmul(x, spec, w, return_normed=True, interpret=True), x)
    assert shapes[0].shape == (2, 3, 48) and shapes[1].shape == x.shape


def test_bad_arguments():
    x, w, *_ = _arrays(2, 64, 48, jnp.float32)
    with pytest.raises(ValueError, match="does not match"):
        matmul(x, w.T, interpret=True)
    with pytest.raises(ValueError, match="unknown activation"):
        matmul(x, w, activation="swish", interpret=True)
    with pytest.raises(ValueError, match="even column count"):
        matmul(x, w[:, :47], gated=True, activation="silu", interpret=True)
    with pytest.raises(ValueError, match="norm kind"):
        norm_matmul(x, NormSpec(x[0], None, kind="batchnorm", eps=1e-5), w)
