"""quant_matmul (interpret mode on the CPU) against its dequantize-then-matmul reference, and
the reference against dsjax.quant (quantize / dequantize) and the unfused XLA path.

Weights are random integers in the documented format (every code value occurs), with ragged
M and N, small blocks, and split-K, over int8/int4, symmetric/asymmetric and group sizes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import numerics, ops
from dsjax.numerics import NormSpec
from dsjax.quant import QuantizedWeight, QuantSpec, dequantize, quantize
from pallas_kernels.quant_matmul import (quant_matmul,
                                         quant_matmul_reference, random_weight)
from tests.pallas_kernels.test_matmul import FMA1, FMA4, SMALL, SPLIT, TOL, assert_close


def _weight(K, N, bits, sym, G, rng):
    return random_weight(rng, K, N, bits=bits, symmetric=sym, group_size=G)


CASES = [
    # M, K, N, dtype, bits, sym, G (None: per channel), options, blocks
    (1, 128, 96, jnp.bfloat16, 8, True, None, {}, FMA1),
    (3, 128, 144, jnp.bfloat16, 8, True, 32, dict(bias=True, activation="gelu"), SMALL),
    (3, 128, 144, jnp.float16, 8, True, 32, dict(bias=True, activation="gelu"), FMA4),
    (16, 192, 80, jnp.float16, 8, False, 64, dict(residual=True), SMALL),
    (70, 128, 48, jnp.float32, 8, False, 128, dict(bias=True, activation="silu"),
     dataclasses.replace(SMALL, block_m=32)),
    (2, 96, 2 * 40, jnp.bfloat16, 8, True, 32, dict(gated=True, activation="silu"), SMALL),
    (1, 100, 72, jnp.float32, 8, False, None, dict(bias=True, residual=True), SPLIT),
    (1, 100, 72, jnp.float32, 8, False, None, dict(bias=True, residual=True),
     dataclasses.replace(FMA1, split_k=2)),
    (1, 256, 96, jnp.bfloat16, 4, True, 128, {}, dataclasses.replace(FMA1, unroll=4)),
    (16, 256, 96, jnp.bfloat16, 4, True, 128, {}, SMALL),
    (3, 128, 144, jnp.float16, 4, True, 32, dict(bias=True, activation="gelu_tanh"), SPLIT),
    (16, 256, 80, jnp.bfloat16, 4, False, 64, dict(residual=True, activation="relu"), SMALL),
    (5, 128, 48, jnp.float32, 4, False, 32, dict(gated=True, activation="quick_gelu",
                                                bias=True), SPLIT),
    (1, 100, 64, jnp.float32, 4, True, None, dict(activation="silu"), SPLIT),
    (4, 96, 2 * 24, jnp.bfloat16, 4, False, None, dict(gated=True, activation="gelu",
                                                      residual=True), FMA4),
    (2, 128, 96, jnp.bfloat16, 8, True, 64, dict(norm="rmsnorm"), FMA4),
    (2, 128, 96, jnp.bfloat16, 8, False, 64, dict(norm="layernorm"), SMALL),
    (3, 128, 2 * 40, jnp.float32, 4, False, 32, dict(norm="layernorm", gated=True,
                                                     activation="silu"), SPLIT),
    # transpose_w: 8-bit values stored [N, K] (K-major, dsjax.weights), both forms
    (20, 128, 2 * 40, jnp.bfloat16, 8, True, None, dict(gated=True, activation="silu",
                                                       transpose=True), SMALL),
    (16, 192, 80, jnp.float16, 8, False, 64, dict(residual=True, transpose=True), SPLIT),
    (3, 100, 72, jnp.float32, 8, True, None, dict(bias=True, norm="rmsnorm", transpose=True),
     FMA4),
    (1, 128, 96, jnp.float32, 8, False, 32, dict(transpose=True), FMA1),
    (16, 256, 96, jnp.bfloat16, 4, True, 64, dict(bias=True, transpose=True), SMALL),
    (3, 128, 2 * 40, jnp.float32, 4, False, 32, dict(gated=True, activation="silu",
                                                     transpose=True), FMA4),
]


@pytest.mark.parametrize("M,K,N,dtype,bits,sym,G,opts,blocks", CASES)
def test_quant_matmul(M, K, N, dtype, bits, sym, G, opts, blocks):
    rng = np.random.default_rng(M * 1000 + K + N)
    G = G or K
    values, scales, zeros = _weight(K, N, bits, sym, G, rng)
    gated = opts.get("gated", False)
    n_out = N // 2 if gated else N
    x = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
    bias = jnp.asarray(rng.standard_normal(N, np.float32), dtype) if opts.get("bias") else None
    res = (jnp.asarray(rng.standard_normal((M, n_out), np.float32), dtype)
           if opts.get("residual") else None)
    norm = None
    if opts.get("norm"):
        nscale = jnp.asarray(1 + 0.3 * rng.standard_normal(K, np.float32), dtype)
        nbias = jnp.asarray(0.3 * rng.standard_normal(K, np.float32), dtype)
        norm = NormSpec(nscale, nbias if opts["norm"] == "layernorm" else None,
                        kind=opts["norm"], eps=1e-5, plus_one=opts["norm"] == "rmsnorm")
    kw = dict(bits=bits, group_size=G, bias=bias, residual=res, gated=gated,
              activation=opts.get("activation"), norm=norm, transpose_w=opts.get("transpose", False))
    if kw["transpose_w"]:
        values = values.T

    @jax.jit  # one compile for both
    def run(x, values, scales, zeros):
        return (quant_matmul(x, values, scales, zeros, block_sizes=blocks, interpret=True, **kw),
                quant_matmul_reference(x, values, scales, zeros, **kw))
    y, want = run(x, values, scales, zeros)
    assert y.shape == (M, n_out) and y.dtype == dtype
    assert_close(y, want, TOL[dtype])


@pytest.mark.parametrize("bits,sym,G", [(8, True, None), (8, False, 32), (4, True, 64),
                                        (4, False, None)])
def test_reference_matches_dsjax_quant(bits, sym, G):
    """dequantize() inverts quantize() to its rounding, and quant_matmul_reference equals the XLA
    path (group-wise partial products, never a dequantized W) on a quantize()d weight."""
    rng = np.random.default_rng(bits + G if G else bits)
    K, N = 128, 96
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05)
    qw = quantize(w, QuantSpec(bits=bits, group_size=G, symmetric=sym))
    assert isinstance(qw, QuantizedWeight)
    args = (qw.values, qw.scales, qw.zeros)
    kw = dict(bits=bits, group_size=qw.group_size)
    assert float(jnp.abs(dequantize(qw) - w).max()) < 0.05 * 4 / (2 ** bits - 2) * 4
    x = jnp.asarray(rng.standard_normal((3, K), np.float32))
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(K, np.float32))
    norm = NormSpec(scale, None, kind="rmsnorm", eps=1e-6)
    bias = jnp.asarray(rng.standard_normal(N, np.float32))
    want = ops.linear_xla(x, qw, bias, norm=norm, activation="silu", gated=True)
    got = quant_matmul_reference(x, *args, **kw, bias=bias, activation="silu", gated=True,
                                 norm=norm)
    assert_close(got, want, 2e-5)


def test_dequantize_by_hand():
    """Byte 0x2A holds row 0 (low nibble 10) and row K/2 = 1 (high nibble 2); symmetric 4-bit
    codes are u - 8: W = [(10 - 8) * 0.5, (2 - 8) * 0.5]. Asymmetric 8-bit: (q - z) * s."""
    w4 = numerics.dequantize(jnp.asarray([[0x2A]], jnp.uint8), jnp.asarray([[0.5]]), bits=4,
                             group_size=2)
    np.testing.assert_array_equal(w4, [[1.0], [-3.0]])
    w8 = numerics.dequantize(jnp.asarray([[200], [3], [7], [9]], jnp.uint8),
                             jnp.asarray([[0.25], [2.0]]), jnp.asarray([[100.0], [5.0]]), bits=8,
                             group_size=2)
    np.testing.assert_array_equal(w8, [[25.0], [-24.25], [4.0], [8.0]])


def test_bad_arguments():
    rng = np.random.default_rng(0)
    values, scales, _ = _weight(128, 64, 8, True, 32, rng)
    x = jnp.zeros((2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not match"):
        quant_matmul(x[:, :64], values, scales, bits=8, group_size=32)
    with pytest.raises(ValueError, match="must be uint8"):
        quant_matmul(x, values, scales, scales, bits=8, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        quant_matmul(x, values, scales, bits=8, group_size=48)
    with pytest.raises(ValueError, match="scales must be"):
        quant_matmul(x, values, scales[:2], bits=8, group_size=32)
    values, scales, _ = _weight(160, 64, 8, True, 40, rng)
    with pytest.raises(ValueError, match="does not match"):  # [K, N] values given as [N, K]
        quant_matmul(x, values, scales, bits=8, group_size=32, transpose_w=True)
    with pytest.raises(ValueError, match="power-of-two"):
        quant_matmul(jnp.zeros((2, 160), jnp.bfloat16), values, scales, bits=8, group_size=40)


@pytest.mark.parametrize("M,bits,blocks", [(3, 4, FMA4), (1, 8, FMA1), (16, 4, SMALL)])
def test_fractional_zero_points(M, bits, blocks):
    """Zero points that are no integers (GGUF's Q4_1: z = -m / d) in both forms."""
    rng = np.random.default_rng(M + bits)
    K, N, G = 128, 48, 32
    values, scales, zeros = _weight(K, N, bits, False, G, rng)
    zeros = zeros + jnp.asarray(rng.uniform(0, 1, zeros.shape).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((M, K), np.float32))
    y = quant_matmul(x, values, scales, zeros, bits=bits, group_size=G, block_sizes=blocks,
                     interpret=True)
    assert_close(y, quant_matmul_reference(x, values, scales, zeros, bits=bits, group_size=G),
                 TOL[jnp.float32])
