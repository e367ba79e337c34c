"""gemv (interpret mode on the CPU) against its jnp reference, and the reference against the
unfused XLA path (dsjax.ops.linear_xla on the [K, N] weight: norm, einsum, epilogue).

Small ragged shapes with small blocks: several K steps, a masked last K step and masked rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import ops
from dsjax.numerics import NormSpec
from dsjax.weights import DenseWeight, QuantizedWeight
from dsjax.quant import QuantSpec, quantize
from pallas_kernels.gemv import MAX_ROWS, BlockSizes, gemv, gemv_reference
from tests.pallas_kernels.test_matmul import assert_close

SMALL = BlockSizes(block_n=4, block_k=32)
TOL = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 2e-2}


def _arrays(M, K, N, dtype, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *shape, s=1.0, c=0.0: jnp.asarray(  # noqa: E731
        c + s * rng.standard_normal(shape, np.float32), dtype)
    return arr(M, K), arr(N, K, s=K ** -0.5), arr(N), arr(M, N), arr(K, s=0.3, c=1.0)


# norm: None; "rms" / "rms+1" (Gemma's stored scale - 1); "ln" (with bias), "ln-nobias",
# "ln-offset" (x with mean 300, std 1: a naive one-pass variance would cancel)
CASES = [
    # M, K, N, dtype, int8, bias, residual, activation, gated, norm
    (1, 96, 40, jnp.float32, False, False, False, None, False, None),  # ragged K and N
    (2, 64, 32, jnp.bfloat16, False, True, True, None, False, None),
    (3, 80, 24, jnp.float16, False, True, False, "gelu", False, "rms"),
    (8, 64, 48, jnp.float32, False, True, False, "silu", True, "rms"),  # gated, 8 rows
    (1, 128, 40, jnp.bfloat16, True, False, True, None, False, None),  # int8, ragged N
    (2, 72, 32, jnp.float32, True, True, False, "silu", True, "rms+1"),  # int8, Gemma norm
    (1, 80, 36, jnp.float32, False, True, False, "gelu", False, "ln"),  # GPT-2's c_fc
    (3, 64, 24, jnp.bfloat16, False, False, True, None, False, "ln-nobias"),
    (2, 96, 40, jnp.float32, True, True, False, "relu", False, "ln-offset"),  # int8
    (1, 64, 2 * 16, jnp.float16, False, False, False, "silu", True, "ln"),  # gated
]


@pytest.mark.parametrize("M, K, N, dtype, int8, bias, res, act, gated, norm", CASES)
def test_matches_reference_and_xla(M, K, N, dtype, int8, bias, res, act, gated, norm):
    x, w, b, r, g = _arrays(M, K, N, dtype)
    nb = (jnp.asarray(0.3 * np.random.default_rng(1).standard_normal(K, np.float32), dtype)
          if norm in ("ln", "ln-offset") else None)
    if norm == "ln-offset":
        x = x + 300.0
    n_out = N // 2 if gated else N
    b, r = (b if bias else None), (r[:, :n_out] if res else None)
    scales = None
    if int8:  # the kernel's format is dsjax.quant's per-channel int8, transposed
        qw = quantize(w.T, QuantSpec(bits=8))
        w, scales = qw.values.T, qw.scales[0]
    spec = None if norm is None else NormSpec(
        g, nb, kind="layernorm" if norm.startswith("ln") else "rmsnorm", eps=1e-5,
        plus_one=norm == "rms+1")
    kw = dict(norm=spec, activation=act, gated=gated)

    @jax.jit
    def run(x, w, scales, b, r):
        kernel = gemv(x, w, scales, b, r, block_sizes=SMALL, interpret=True, **kw)
        ref = gemv_reference(x, w, scales, b, r, **kw)
        k_major = DenseWeight(w, k_major=True) if scales is None else QuantizedWeight(
            w, scales[None, :], None, bits=8, group_size=K, k_major=True)
        via_xla = ops.linear_xla(x, k_major, b, r, norm=spec, activation=act, gated=gated)
        return kernel, ref, via_xla

    got, ref, via_xla = run(x, w, scales, b, r)
    assert got.shape == (M, n_out) and got.dtype == dtype
    # mean 300: x - mean and the statistics round at 300 ulp(1) (~1e-4 relative); a naive
    # one-pass variance would be off by ~3% (and the outputs by ~1.5%)
    assert_close(got, ref, 1e-3 if norm == "ln-offset" else TOL[dtype])
    # the XLA path rounds the normed x and its products to the dtype in between
    assert_close(ref, via_xla, 2e-5 if dtype == jnp.float32 and norm is None else 3e-2)


def test_default_block_sizes_and_leading_dims():
    # bf16, default blocks (K = 300: one ragged step of 512), x [2, 1, K]
    x, w, b, _, g = _arrays(2, 300, 20, jnp.bfloat16, seed=3)
    x = x.reshape(2, 1, 300)
    norm = NormSpec(g, None, kind="rmsnorm", eps=1e-6)
    run = jax.jit(lambda x, w, b: (gemv(x, w, bias=b, norm=norm, interpret=True),
                                   gemv_reference(x, w, bias=b, norm=norm)))
    got, want = run(x, w, b)
    assert got.shape == (2, 1, 20)
    assert_close(got, want, TOL[jnp.bfloat16])


def test_block_sizes_keep_accumulators_small():
    assert BlockSizes.for_shape(1, 4096, 1) == BlockSizes(block_n=4, block_k=512)
    for m in range(1, MAX_ROWS + 1):
        for parts in (1, 2):
            bs = BlockSizes.for_shape(m, 14336, parts)
            assert m * parts * bs.block_n * bs.block_k <= 64 * 32 * bs.num_warps


def test_bad_calls_say_what_is_wrong():
    x, w, *_ = _arrays(2, 64, 32, jnp.float32)
    with pytest.raises(ValueError, match="at most 8 rows"):
        gemv(jnp.zeros((9, 64)), w, interpret=True)
    with pytest.raises(ValueError, match="does not match"):
        gemv(x, w[:, :32], interpret=True)
    with pytest.raises(ValueError, match="scales"):
        gemv(x, w.astype(jnp.int8), interpret=True)
    with pytest.raises(ValueError, match="norm kind"):
        gemv(x, w, norm=NormSpec(jnp.ones(64), None, kind="batchnorm", eps=1e-5), interpret=True)
    with pytest.raises(ValueError, match="even row count"):
        gemv(x, w[:31], gated=True, activation="silu", interpret=True)
