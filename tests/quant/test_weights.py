"""Quantize / dequantize: hand-checked layouts and values, round-trip error bounds, specs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.quant import QuantizedWeight, QuantSpec, dequantize, quantizable, quantize

W = np.array([[1.0, -0.6], [-2.3, 0.25], [0.5, 1.0], [4.0, -1.0]], np.float32)  # [K=4, N=2]


def test_int8_symmetric_per_channel_by_hand():
    qw = quantize(jnp.asarray(W), QuantSpec(bits=8))
    # column scales max|w| / 127; values round(w / scale): 31.75, -73.03, 15.9, 127 | -76.2, ..
    np.testing.assert_allclose(qw.scales, [[4 / 127, 1 / 127]], rtol=1e-6)
    np.testing.assert_array_equal(qw.values, [[32, -76], [-73, 32], [16, 127], [127, -127]])
    assert qw.values.dtype == jnp.int8 and qw.zeros is None and qw.group_size == 4


def test_int4_packs_row_r_low_and_row_r_plus_half_high():
    qw = quantize(jnp.asarray(W), QuantSpec(bits=4))
    # column 0: scale 4/7, w/scale = 1.75, -4.03, 0.875, 7 -> 2, -4, 1, 7 -> +8: 10, 4, 9, 15
    assert qw.values.shape == (2, 2) and qw.values.dtype == jnp.uint8
    assert int(qw.values[0, 0]) == 10 | (9 << 4)
    assert int(qw.values[1, 0]) == 4 | (15 << 4)
    assert qw.shape == (4, 2)


def test_int8_asymmetric_by_hand():
    w = jnp.asarray([[0.0, -1.0], [1.0, 0.0], [2.0, 1.0], [3.0, 2.0]])
    qw = quantize(w, QuantSpec(bits=8, symmetric=False))
    np.testing.assert_allclose(qw.scales, [[3 / 255, 3 / 255]], rtol=1e-6)
    np.testing.assert_array_equal(qw.zeros, [[0, 85]])
    np.testing.assert_array_equal(qw.values, [[0, 0], [85, 85], [170, 170], [255, 255]])
    np.testing.assert_allclose(dequantize(qw), w, atol=3 / 255 / 2 + 1e-6)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 32, 64])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, group):
    K, N = 256, 40
    w = jax.random.normal(jax.random.key(bits + group if group else bits), (K, N)) * 0.1
    qw = quantize(w, QuantSpec(bits=bits, group_size=group, symmetric=symmetric))
    G = group or K
    assert qw.scales.shape == (K // G, N)
    err = np.abs(np.asarray(dequantize(qw) - w)).reshape(K // G, G, N)
    step = np.asarray(qw.scales)[:, None, :]
    assert (err <= step * 0.5 + 1e-7).all()
    levels = 2 ** bits - 1
    # the step is the group's range over the code levels (symmetric: 2 * max|w| / (levels - 1))
    wg = np.asarray(w).reshape(K // G, G, N)
    if symmetric:
        expect = np.abs(wg).max(1) / (127 if bits == 8 else 7)
    else:
        expect = (np.maximum(wg.max(1), 0) - np.minimum(wg.min(1), 0)) / levels
    np.testing.assert_allclose(qw.scales, expect, rtol=1e-6)


def test_groups_beat_one_scale_per_channel_on_uneven_rows():
    w = jax.random.normal(jax.random.key(0), (256, 16)) * jnp.repeat(
        jnp.asarray([0.01, 1.0, 0.05, 0.3]), 64)[:, None]
    err = lambda spec: jnp.abs(dequantize(quantize(w, spec)) - w)[:64].mean()  # noqa: E731
    # the small rows get their own scale instead of the channel's largest
    assert err(QuantSpec(bits=4, group_size=64)) < 0.25 * err(QuantSpec(bits=4))


def test_all_zero_columns_quantize_to_zero():
    qw = quantize(jnp.zeros((8, 3)), QuantSpec(bits=4, symmetric=False))
    np.testing.assert_array_equal(dequantize(qw), np.zeros((8, 3)))


def test_quantized_weight_is_a_pytree_with_static_format():
    qw = quantize(jnp.asarray(W), QuantSpec(bits=4, group_size=2, symmetric=False))
    leaves, tree = jax.tree.flatten(qw)
    assert len(leaves) == 3
    back = jax.jit(lambda q: q)(qw)
    assert isinstance(back, QuantizedWeight) and back.bits == 4 and back.group_size == 2
    assert qw.nbytes == 2 * 2 + 2 * (2 * 2 * 4)


@pytest.mark.parametrize("quant,spec", [
    ({"bits": 4, "group_size": 128}, QuantSpec(4, 128)),
    ({"enabled": True, "weight": {"num_bits": 8, "q_type": "asymmetric"}}, QuantSpec(8, None, False)),
    ({"enabled": False}, None),
    (None, None),
])
def test_spec_spellings(quant, spec):
    assert QuantSpec.parse(quant) == spec


@pytest.mark.parametrize("quant,match", [
    ({"bits": 2}, "bits must be 8 or 4"),
    ({"bits": 8, "group_size": 3}, "even integer"),
    ({"weight": {"num_bits": 8, "q_type": "nf4"}}, "q_type"),
    ({"weight": {"num_bits": 8, "rounding": "stochastic"}}, "unsupported DeepSpeed"),
])
def test_bad_specs(quant, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec.parse(quant)


def test_only_gemm_weights_are_quantized():
    spec = QuantSpec()
    assert quantizable("layers.3.attn.qkv.kernel", spec)
    assert quantizable("body.layers.0.mlp.down.kernel", spec)
    assert not quantizable("layers.3.attn.qkv.bias", spec)
    assert not quantizable("embed.embedding", spec)
    assert not quantizable("lm_head.kernel", spec)
    assert quantizable("lm_head.kernel", QuantSpec(lm_head=True))


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, 16, False), QuantSpec(4, 16),
                                  QuantSpec(4, None, False)], ids=str)
def test_xla_quantized_matmul_equals_dequantize_then_matmul(spec):
    from dsjax.ops import qmatmul_xla

    x = jax.random.normal(jax.random.key(1), (3, 5, 64))
    qw = quantize(jax.random.normal(jax.random.key(2), (64, 24)), spec)
    np.testing.assert_allclose(qmatmul_xla(x, qw), x @ dequantize(qw), atol=5e-5, rtol=1e-5)
