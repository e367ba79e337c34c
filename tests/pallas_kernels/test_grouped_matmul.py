"""The MoE grouped GEMM (interpret mode) against XLA's expert op: experts with and without
rows, every row on one expert, a padded layout, the gated and routing-weight epilogues."""

import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import ops, pallas_ops
from dsjax.policy import KernelPolicy
from pallas_kernels.grouped_matmul import expert_layout


def _case(N, k, D, I, E, picks, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, D)), dtype)
    up = jnp.asarray(rng.normal(size=(E, D, 2 * I)) / np.sqrt(D), dtype)
    down = jnp.asarray(rng.normal(size=(E, I, D)) / np.sqrt(I), dtype)
    w = jnp.asarray(rng.uniform(size=(N, k)), jnp.float32)
    return x, up, down, jnp.asarray(picks, jnp.int32), w


@pytest.mark.parametrize("how", ["spread_with_idle_experts", "all_on_one", "random",
                                 "some_rows_with_no_expert"])
def test_grouped_gemm_equals_xla(how):
    N, k, D, I, E = 19, 2, 32, 48, 6
    rng = np.random.default_rng(1)
    picks = {"spread_with_idle_experts": np.stack([np.arange(N) % 3, (np.arange(N) + 1) % 3], 1),
             "all_on_one": np.full((N, k), 4),
             "random": rng.integers(0, E, (N, k)),
             "some_rows_with_no_expert": np.where(rng.uniform(size=(N, k)) < 0.4, -1,
                                                  rng.integers(0, E, (N, k)))}[how]
    x, up, down, picks, w = _case(N, k, D, I, E, picks)
    pallas = KernelPolicy.pallas(interpret=True)  # (called directly: no fallback possible)
    got = pallas_ops.experts(x, up, down, picks, w.astype(x.dtype), activation="silu",
                             policy=pallas)
    want = ops.experts(x, up, down, picks, w.astype(x.dtype), activation="silu",
                       policy=KernelPolicy())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_layout_gives_each_block_one_expert():
    picks = jnp.asarray([[2, 0], [2, 2], [0, 5]], jnp.int32)  # experts 1, 3, 4 idle
    slot, block_expert = expert_layout(picks, 6, 4)
    flat = np.asarray(picks).reshape(-1)
    assert len(set(np.asarray(slot).tolist())) == flat.size  # no two rows share a slot
    for row, s in enumerate(np.asarray(slot)):
        assert np.asarray(block_expert)[s // 4] == flat[row]
    assert np.asarray(block_expert).tolist() == [0, 2, 5] + [-1] * 5  # ceil(6 / 4) + 6 blocks
