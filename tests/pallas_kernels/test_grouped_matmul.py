"""The MoE grouped GEMM (interpret mode) against XLA's expert op: experts with and without
rows, every row on one expert, a padded layout, the gated and routing-weight epilogues, int8
and int4 expert weights (dequantized tile by tile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import ops, pallas_ops
from dsjax.policy import KernelPolicy, Unsupported
from dsjax.quant import QuantSpec, dequantize
from dsjax.quant.weights import quantize_any
from dsjax.weights import QuantizedWeight
from pallas_kernels.grouped_matmul import BlockSizes, expert_layout, grouped_matmul


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


def test_bf16_experts_round_as_the_xla_op():
    """In bf16 each pick's scaled output stays float32 until the picks are summed, as in the XLA
    op, so the two round alike: (nearly) every output equal, where rounding each pick to bf16
    first left a third of them a bf16 step apart."""
    N, k, D, I, E = 64, 2, 64, 96, 8
    picks = np.random.default_rng(3).integers(0, E, (N, k))
    x, up, down, picks, w = _case(N, k, D, I, E, picks, dtype=jnp.bfloat16, seed=3)
    got, want = (f(x, up, down, picks, w.astype(x.dtype), activation="silu", policy=p)
                 for f, p in ((pallas_ops.experts, KernelPolicy.pallas(interpret=True)),
                              (ops.experts, KernelPolicy())))
    assert got.dtype == want.dtype == jnp.bfloat16
    assert np.mean(np.asarray(got, np.float32) == np.asarray(want, np.float32)) > 0.99


@pytest.mark.parametrize("bits, group, symmetric, I", [
    (8, 16, True, 48),  # int8 groups of 16: two K steps of one group each
    (4, 16, True, 32),  # packed 4-bit: K steps in the low, then the high nibbles
    (4, 32, False, 32),  # with zero points
])
def test_quantized_experts_equal_xla(bits, group, symmetric, I):
    """Quantized expert stacks (dsjax.quant, each expert on its own): the grouped GEMM
    dequantizes tile by tile what the XLA op dequantizes whole; experts idle and rows with no
    expert included."""
    N, k, D, E = 19, 2, 32, 6
    rng = np.random.default_rng(2)
    picks = np.where(rng.uniform(size=(N, k)) < 0.2, -1, rng.integers(0, E - 2, (N, k)))
    x, up, down, picks, w = _case(N, k, D, I, E, picks)
    spec = QuantSpec(bits=bits, group_size=group, symmetric=symmetric)
    up, down = quantize_any(up, spec), quantize_any(down, spec)
    assert up.values.shape[0] == E and up.scales.shape == (E, D // group, 2 * I)
    pallas = KernelPolicy.pallas(interpret=True)
    got = pallas_ops.experts(x, up, down, picks, w, activation="silu", policy=pallas)
    want = ops.experts(x, up, down, picks, w, activation="silu", policy=KernelPolicy())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    dense = ops.experts(x, *(jnp.stack([dequantize(jax.tree.map(lambda a: a[e], q))
                                        for e in range(E)]) for q in (up, down)),
                        picks, w, activation="silu", policy=KernelPolicy())
    np.testing.assert_allclose(np.asarray(want), np.asarray(dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_split_k_equals_one_pass(bits):
    """K split into 2 and 4 slices summed after the kernel equals one pass over K (float,
    int8 groups and packed 4-bit codes, whose slices cross from the low to the high nibbles),
    idle experts and rows with no expert included; so does the gated GEMM, its activation
    then applied to the summed [gate | up]."""
    N, k, D, I, E = 5, 2, 32, 64, 4
    picks = np.asarray([[0, 2], [2, -1], [0, 0], [2, 0], [-1, 2]])
    x, up, down, picks, w = _case(N, k, D, I, E, picks)
    if bits:
        down = quantize_any(down, QuantSpec(bits=bits, group_size=16))
    slot, block_expert = expert_layout(picks, E, 16)
    h = jnp.zeros((block_expert.shape[0] * 16, I), jnp.float32).at[slot].set(
        jnp.asarray(np.random.default_rng(4).normal(size=(N * k, I)), jnp.float32), mode="drop")
    scale = jnp.zeros(h.shape[0], jnp.float32).at[slot].set(w.reshape(-1), mode="drop")
    one, *split = (grouped_matmul(h, down, block_expert, scale, interpret=True,
                                  block_sizes=BlockSizes(block_k=16, split_k=s)) for s in (1, 2, 4))
    assert float(jnp.abs(one).max()) > 0
    for got in split:
        np.testing.assert_allclose(np.asarray(got), np.asarray(one), rtol=1e-5, atol=1e-5)
    xs = h[:, :D].astype(jnp.float32)
    one, two = (grouped_matmul(xs, up, block_expert, activation="silu", interpret=True,
                               block_sizes=BlockSizes(block_k=16, split_k=s)) for s in (1, 2))
    assert float(jnp.abs(one).max()) > 0
    np.testing.assert_allclose(np.asarray(two), np.asarray(one), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="split_k"):
        grouped_matmul(h, down, block_expert, interpret=True, block_sizes=BlockSizes(block_k=16, split_k=3))


def test_decode_rows_split_the_second_gemm():
    """A decode step's few rows (Mixtral: top-2 of one token, two blocks with rows) split K
    so that enough programs run; prompt-sized steps do not."""
    bs = BlockSizes()
    split = bs.for_rows(2, 8, 14336, 4096, gated=False).split_k
    assert split > 1 and 2 * (4096 // bs.block_n) * split <= 1024
    assert bs.for_rows(8, 128, 2048, 768, gated=True).split_k > 1  # Qwen3-30B-A3B: top-8 of 128
    assert bs.for_rows(2048, 8, 14336, 4096, gated=False).split_k == 1


def test_quantized_groups_the_kernel_cannot_step_are_unsupported():
    x, up, down, picks, w = _case(4, 1, 32, 32, 2, np.zeros((4, 1)))
    q = QuantSpec(bits=4, group_size=8)  # K steps of 8: under tl.dot's 16
    with pytest.raises(Unsupported, match="K steps of 16"):
        pallas_ops.experts(x, quantize_any(up, q), quantize_any(down, q), picks, w,
                           activation="silu", policy=KernelPolicy.pallas(interpret=True))


def test_layout_gives_each_block_one_expert():
    picks = jnp.asarray([[2, 0], [2, 2], [0, 5]], jnp.int32)  # experts 1, 3, 4 idle
    slot, block_expert = expert_layout(picks, 6, 4)
    flat = np.asarray(picks).reshape(-1)
    assert len(set(np.asarray(slot).tolist())) == flat.size  # no two rows share a slot
    for row, s in enumerate(np.asarray(slot)):
        assert np.asarray(block_expert)[s // 4] == flat[row]
    assert np.asarray(block_expert).tolist() == [0, 2, 5] + [-1] * 5  # ceil(6 / 4) + 6 blocks
    # many experts, few rows (a decode step of top-8 of 128): ceil(8 / 16) + 8 blocks, not + 128
    picks = jnp.asarray([[3, 77, 5, 127, 0, 64, 9, 100]], jnp.int32)
    slot, block_expert = expert_layout(picks, 128, 16)
    assert block_expert.shape == (9,)
    assert np.asarray(block_expert)[np.asarray(slot) // 16].tolist() == np.asarray(picks)[0].tolist()


def test_quantized_kernel_lowers_for_cuda():
    """The GPU kernel (not its interpreter) lowers to Triton with int4 codes and zero points:
    nibble selection by K step, per-group scales (this machine has no GPU)."""
    sd = jax.ShapeDtypeStruct
    E, K, N, M, G = 4, 64, 128, 64, 32
    w = QuantizedWeight(sd((E, K // 2, N), jnp.uint8), sd((E, K // G, N), jnp.float32),
                        sd((E, K // G, N), jnp.float32), 4, G)
    fn = jax.jit(lambda x, w, b: grouped_matmul(x, w, b, activation="silu"))
    try:
        exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            sd((M, K), jnp.bfloat16), w, sd((M // 16,), jnp.int32))
    except RuntimeError as e:  # JAX 0.11's Triton lowering asks the GPU for its compute capability
        if "No supported GPU devices found" not in str(e):
            raise
        pytest.skip(f"this JAX ({jax.__version__}) lowers Triton kernels only with a GPU present")
    assert 'name = "grouped_matmul"' in exported.mlir_module()


def test_kernel_injection_runs_the_grouped_gemm():
    """replace_with_kernel_inject runs the grouped GEMM with every other kernel (its bf16
    disagreement with the XLA op in a model was the routing's rounding, not the kernel:
    docs/decisions.md#expert-layers-in-xla)."""
    assert KernelPolicy.pallas().experts == "pallas"
    assert KernelPolicy.parse(None, inject=True).experts == "pallas"
    assert KernelPolicy.parse({"experts": "xla"}, inject=True).experts == "xla"
    assert KernelPolicy.pallas().describe() == "pallas"