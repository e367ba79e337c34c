"""MoQ's math: the bit schedule against tables computed by hand from DeepSpeed's rules, the
quantizer on hand-checkable arrays, stochastic rounding statistics, the export's exactness and
the eigenvalue estimate against numpy's eigvalsh of explicit Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.quant import dequantize
from dsjax.quant.moq import (BitSchedule, MoQConfig, WeightPlan, advance_schedule, export_weight,
                             fake_quantize, init_schedule, mix_ratio, moq_weights, period_factors,
                             quantized_step, straight_through, top_eigenvalue)


def _run_schedule(plan, offset, counted, factors=None):
    """Per optimizer step: the bits its forward pass uses, and whether that pass is quantized."""
    def one(state, flag):
        seen = ({p.path: state.bits[p.path] for p in plan}, quantized_step(state, offset) >= 1)
        return advance_schedule(state, plan, offset, flag, factors), seen

    _, (bits, started) = jax.lax.scan(one, init_schedule(plan, offset), jnp.asarray(counted))
    return {k: np.asarray(v).tolist() for k, v in bits.items()}, np.asarray(started).tolist()


def test_bits_drop_at_p_2p_4p_8p_counted_from_the_offset():
    # start 12, target 8, P = 10, offset 0: step s is quantized step q = s, and q is never
    # reset, so steps 10, 20, 40 and 80 are the first at 11, 10, 9 and 8 bits (the seed
    # article's reading would give 10, 30, 70, 150)
    plan = (WeightPlan("w", BitSchedule(12, 8, 10), None),)
    bits, started = _run_schedule(plan, 0, [True] * 100)
    assert bits["w"] == [12] * 9 + [11] * 10 + [10] * 20 + [9] * 40 + [8] * 21  # steps 1..100
    assert all(started)


def test_offset_and_overflowed_steps_are_not_counted():
    # start 6, target 4, P = 3, offset 2; steps 4 and 9 overflow. Counted steps before each of
    # the 12 steps: 0 1 2 3 3 4 5 6 7 7 8 9, so q = c - 2 + 1: -1 0 1 2 2 3 4 5 6 6 7 8;
    # q = 3 (step 6) is the first at 5 bits, q = 6 (step 9) the first at 4
    counted = [True] * 12
    counted[3] = counted[8] = False
    plan = (WeightPlan("w", BitSchedule(6, 4, 3), None),)
    bits, started = _run_schedule(plan, 2, counted)
    assert bits["w"] == [6, 6, 6, 6, 6, 5, 5, 5, 4, 4, 4, 4]
    assert started == [False, False] + [True] * 10


def test_a_period_of_one_drops_before_the_first_step():
    # DeepSpeed quantizes once before its first forward pass: with P = 1 that is a drop
    plan = (WeightPlan("w", BitSchedule(8, 4, 1), None),)
    bits, _ = _run_schedule(plan, 0, [True] * 8)
    assert bits["w"] == [7, 6, 6, 5, 5, 5, 5, 4]  # drops at q = 1, 2, 4, 8


def test_eigenvalue_factors_stretch_each_layers_period():
    # P = 2, 5 -> 2 bits, factors [1, 3]: layer 0 drops at q = 2, 4, 8; layer 1 at q = 2, then
    # its period becomes 2 * 2 * 3 = 12, then 12 * 2 * 3 = 72
    plan = (WeightPlan("a", BitSchedule(5, 2, 2), 0), WeightPlan("b", BitSchedule(5, 2, 2), 1))
    bits, _ = _run_schedule(plan, 0, [True] * 80, factors=jnp.asarray([1, 3]))
    assert bits["a"][:9] == [5, 4, 4, 3, 3, 3, 3, 2, 2]
    assert [bits["b"][q - 1] for q in (1, 2, 11, 12, 71, 72, 80)] == [5, 4, 4, 3, 3, 2, 2]


def test_mixing_ratio_within_one_bit_of_the_target():
    # start 10, target 8, P = 4, change 0.25: at 10 bits no mixing; the drop to 9 at q = 4 resets
    # r to 1, then 0.75, 0.5, 0.25; the drop to 8 at q = 8 resets it again, then down to 0
    cfg = MoQConfig((BitSchedule(10, 8, 4),), mix_change_ratio=0.25)
    p = WeightPlan("w", cfg.schedules[0], None)
    state, ratios, bits = init_schedule((p,), 0), [], []
    advance = jax.jit(lambda state: advance_schedule(state, (p,), 0, True))
    for _ in range(14):  # quantized steps 1..14
        ratios.append(float(mix_ratio(state, p, cfg)))
        bits.append(int(state.bits["w"]))
        state = advance(state)
    assert bits == [10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8, 8, 8, 8]
    assert ratios == [0, 0, 0, 1, 0.75, 0.5, 0.25, 1, 0.75, 0.5, 0.25, 0, 0, 0]
    w = jnp.asarray([[0.3, -1.0], [0.7, 0.2]])
    seen = moq_weights({"w": w}, state, (p,), cfg, jax.random.key(0))["w"]  # r = 0 now
    np.testing.assert_allclose(seen, fake_quantize(w, 8))


# ----------------------------------------------------------------------------- the quantizer

# [K=2, N=4]; with 2 column groups, group A is columns 0-1, group B columns 2-3
W = np.array([[1.0, -0.3, 0.2, 0.8], [0.45, -2.0, -0.1, 0.35]], np.float32)


def test_symmetric_3_bit_groups_by_hand():
    out = np.asarray(fake_quantize(jnp.asarray(W), 3, groups=2))
    # A: s = 2 * 2.0 / 8 = 0.5, w/s = 2, -0.6, 0.9, -4 -> 2, -1, 1, -4
    # B: s = 2 * 0.8 / 8 = 0.2, w/s = 1, 4, -0.5, 1.75 -> 1, 3 (4 clips to 2^2 - 1), -0, 2
    np.testing.assert_allclose(out, [[1.0, -0.5, 0.2, 0.6], [0.5, -2.0, 0.0, 0.4]], atol=1e-6)


def test_asymmetric_3_bit_by_hand():
    out = np.asarray(fake_quantize(jnp.asarray(W), 3, groups=2, symmetric=False))
    # A: s = (1 + 2) / 8 = 0.375, z = -round(-2 / 0.375) = 5; w/s + z = 7.67, 4.2, 6.2, -0.33
    #    -> 7 (clipped), 4, 6, 0 -> (q - 5) s = 0.75, -0.375, 0.375, -1.875
    # B: s = 0.9 / 8 = 0.1125, z = -round(-0.889) = 1; w/s + z = 2.78, 8.11, 0.11, 4.11
    #    -> 3, 7 (clipped), 0, 4 -> 0.225, 0.675, -0.1125, 0.3375
    np.testing.assert_allclose(out, [[0.75, -0.375, 0.225, 0.675],
                                     [0.375, -1.875, -0.1125, 0.3375]], atol=1e-6)


def test_row_groups_get_their_own_scale():
    w = jnp.asarray([[4.0], [1.0], [0.5], [0.25]])  # [K=4, N=1], rows in groups of 2
    # rows 0-1: s = 2 * 4 / 8 = 1 -> 3 (4 clips), 1; rows 2-3: s = 0.125 -> 3 (4 clips), 2
    np.testing.assert_allclose(fake_quantize(w, 3, group_size=2)[:, 0], [3.0, 1.0, 0.375, 0.25])


def test_ternary_and_binary_as_deepspeed_defines_them():
    w = jnp.asarray([[0.1], [-0.5], [0.9], [-0.02]])
    # mean |w| = 0.38, threshold 0.266: -0.5 and 0.9 survive with alpha = 0.7
    np.testing.assert_allclose(fake_quantize(w, 2, lowest_bits=2)[:, 0], [0, -0.7, 0.7, 0],
                               atol=1e-6)
    np.testing.assert_allclose(fake_quantize(w, 1, lowest_bits=1)[:, 0],
                               [0.38, -0.38, 0.38, -0.38], atol=1e-6)
    # traced bits pick the branch inside one compiled function
    traced = jax.jit(lambda b: fake_quantize(w, b, lowest_bits=1))
    np.testing.assert_allclose(traced(jnp.int32(2))[:, 0], [0, -0.7, 0.7, 0], atol=1e-6)
    np.testing.assert_allclose(traced(jnp.int32(3)), fake_quantize(w, 3), atol=1e-7)


def test_stochastic_rounding_is_unbiased_between_the_two_neighbours():
    # 8 bits, max 1.28: s = 0.01, and 0.1234 sits at 12.34 steps: 13 with probability 0.34
    w = jnp.full((4096, 1), 0.1234).at[0, 0].set(1.28)
    out = np.asarray(fake_quantize(w, 8, noise_key=jax.random.key(0)))[1:, 0]
    assert set(np.round(out / 0.01).astype(int).tolist()) == {12, 13}
    assert abs((np.round(out / 0.01) == 13).mean() - 0.34) < 0.03  # sd 0.0074
    assert abs(out.mean() - 0.1234) < 4e-4  # nearest rounding is 0.0034 off
    again = fake_quantize(w, 8, noise_key=jax.random.key(0))
    other = fake_quantize(w, 8, noise_key=jax.random.key(1))
    assert np.array_equal(again, fake_quantize(w, 8, noise_key=jax.random.key(0)))
    assert not np.array_equal(again, other)


def test_gradient_goes_straight_through():
    w = jnp.asarray(W)
    c = jnp.arange(8.0).reshape(2, 4)
    grad = jax.grad(lambda w: jnp.sum(straight_through(w, fake_quantize(w, 3, groups=2)) * c))(w)
    np.testing.assert_array_equal(grad, c)


@pytest.mark.parametrize("bits,symmetric,groups,group_size", [
    (8, True, 4, None), (8, False, 2, 8), (8, False, 1, None),
    (4, True, 2, 8), (4, True, 1, None), (4, False, 4, None)])
def test_export_holds_exactly_the_fake_quantized_weight(bits, symmetric, groups, group_size):
    w = jax.random.normal(jax.random.key(bits), (32, 8)) * 0.1 + (0.0 if symmetric else 0.05)
    fmt = dict(groups=groups, group_size=group_size, symmetric=symmetric)
    qw = jax.jit(lambda w: export_weight(w, bits, **fmt))(w)
    assert qw.bits == bits and qw.group_size == (group_size or 32)
    assert qw.values.dtype == (jnp.int8 if bits == 8 and symmetric else jnp.uint8)
    assert qw.values.shape == ((16 if bits == 4 else 32), 8)
    expect = jax.jit(lambda w: fake_quantize(w, bits, **fmt))(w)
    np.testing.assert_allclose(jax.jit(dequantize)(qw), expect, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- eigenvalues

def _dominant(h: np.ndarray) -> float:
    eig = np.linalg.eigvalsh(h)
    return float(eig[np.argmax(np.abs(eig))])


def test_power_iteration_on_a_quadratic_with_a_known_hessian():
    a = np.diag([3.0, -1.0, 0.5, 2.0]).astype(np.float32)
    a[0, 3] = a[3, 0] = 1.0  # eigenvalues 2.5 +- sqrt(1.25), -1, 0.5
    grad = jax.grad(lambda x: 0.5 * x["v"] @ jnp.asarray(a) @ x["v"])
    x = {"v": jnp.ones(4)}
    eig, used = top_eigenvalue(grad, x, jax.random.key(0), max_iter=200, tol=1e-7)
    assert abs(float(eig) - _dominant(a)) < 1e-4 and used < 200
    _, used = top_eigenvalue(grad, x, jax.random.key(0), max_iter=7, tol=0.0)
    assert int(used) == 7  # max_iter honoured
    _, used_loose = top_eigenvalue(grad, x, jax.random.key(0), max_iter=200, tol=1e-1)
    assert int(used_loose) < 7  # a looser tol stops earlier


def test_power_iteration_on_a_tiny_tanh_layer():
    x = jax.random.normal(jax.random.key(1), (16, 3))
    y = jax.random.normal(jax.random.key(2), (16, 4))
    loss = lambda w: jnp.mean((jnp.tanh(x @ w) - y) ** 2)  # noqa: E731
    w = jax.random.normal(jax.random.key(3), (3, 4))
    hessian = np.asarray(jax.jit(jax.hessian(loss))(w)).reshape(12, 12)
    eig, _ = top_eigenvalue(jax.grad(loss), w, jax.random.key(4), max_iter=300, tol=1e-8)
    np.testing.assert_allclose(float(eig), _dominant(hessian), rtol=1e-3)


def test_period_factors_by_hand():
    # |e| / max |e| = 0.5, 1, (0 counts as 1), 0.25 -> 1 + floor(4 x) = 3, 5, 5, 2
    np.testing.assert_array_equal(period_factors(jnp.asarray([2.0, -4.0, 0.0, 1.0])), [3, 5, 5, 2])
    # compiled, the top layer still gets 5 (0.7 / 0.7 is not 0.99999994 here)
    np.testing.assert_array_equal(jax.jit(period_factors)(jnp.asarray([0.3, 0.7, 0.1])), [2, 5, 1])
