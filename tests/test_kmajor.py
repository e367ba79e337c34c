"""K-major weights (dsjax.weights): the layout conversions, and a kernel-injected engine that
holds its GEMM weights K-major, computes like the XLA engine and saves the stored layout."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

import dsjax
from dsjax import KernelPolicy, ops
from dsjax.model import flatten
from dsjax.quant import QuantizedWeight, QuantSpec, quantize
from dsjax.weights import DenseWeight, to_k_major, to_stored
from tests.conftest import llama_model, prompt
from tests.programs import generate_kernels


def test_conversions_round_trip():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((12, 20)), jnp.float32)
    km = to_k_major(w)
    assert isinstance(km, DenseWeight) and km.k_major and km.values.shape == (20, 12)
    assert km.shape == (12, 20) and km.nbytes == w.nbytes
    np.testing.assert_array_equal(to_stored(km), w)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 12)), jnp.float32)
    b = jnp.linspace(-1, 1, 10).repeat(2)
    # one program per weight layout or spec (as engines run them), not one per eager op
    linear = jax.jit(lambda x, w, b: ops.linear_xla(x, w, b, activation="silu", gated=True))
    quantize_jit = jax.jit(quantize, static_argnums=1)
    for spec in (QuantSpec(bits=8), QuantSpec(bits=8, group_size=4),
                 QuantSpec(bits=8, group_size=6, symmetric=False)):
        q = quantize_jit(w, spec)  # int8 codes [N, K], scales (and zeros) [K/G, N] as they were
        kq = to_k_major(q)
        assert isinstance(kq, QuantizedWeight) and kq.k_major and kq.values.shape == (20, 12)
        assert kq.scales is q.scales and kq.zeros is q.zeros and kq.shape == q.shape
        assert kq.group_size == q.group_size and kq.nbytes == q.nbytes
        back = to_stored(kq)
        assert isinstance(back, QuantizedWeight) and not back.k_major
        assert (back.bits, back.group_size) == (8, q.group_size)
        for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
            np.testing.assert_array_equal(got, want)
        # the XLA fallback contracts K-major codes like the [K, N] QuantizedWeight
        np.testing.assert_allclose(linear(x, kq, b), linear(x, q, b), rtol=1e-5, atol=1e-5)
    q = quantize_jit(w, QuantSpec(bits=4))  # quant_matmul reads int4 [K/2, N]: unchanged
    assert to_k_major(q) is q and to_stored(q) is q


def _assert_saves_stored_layout(pallas, xla, tmp_path, kw):
    """pallas.save() restores to the XLA engine's [K, N] weights (quantized ones as they are)."""
    restored = dsjax.init_inference(pallas.save(tmp_path / "ckpt"), **dict(kw, quant=None))
    for path, w in flatten(xla.params).items():
        for got, want in zip(jax.tree.leaves(flatten(restored.params)[path]),
                             jax.tree.leaves(w)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _k_major_paths(engine):
    return {k for k, v in flatten(engine.params).items() if getattr(v, "k_major", False)}


def test_engine_holds_k_major_weights_and_saves_the_stored_layout(tmp_path):
    hf = llama_model(num_hidden_layers=1)
    kw = dict(dtype="fp32", max_out_tokens=48, progress=False)
    xla = dsjax.init_inference(hf, **kw)
    pallas = dsjax.init_inference(hf, replace_with_kernel_inject=True, **kw)
    assert _k_major_paths(pallas) == {
        "layers.0.attn.qkv.kernel", "layers.0.attn.out.kernel", "layers.0.mlp.up.kernel",
        "layers.0.mlp.down.kernel", "lm_head.kernel"}
    assert not _k_major_paths(xla)
    assert pallas.num_params() == xla.num_params()
    assert pallas.weight_bytes() == xla.weight_bytes()
    ids = np.stack([prompt(1, 12, 96), prompt(2, 12, 96)])  # 24 rows: the GEMM kernels
    np.testing.assert_allclose(np.asarray(pallas(ids)), np.asarray(xla(ids)), atol=2e-4,
                               rtol=2e-4)
    _assert_saves_stored_layout(pallas, xla, tmp_path, kw)
    # int4 layer weights stay [K, N] for quant_matmul; the untied LM head is K-major
    q = dsjax.init_inference(hf, replace_with_kernel_inject=True,
                             quant={"bits": 4, "group_size": 16}, **kw)
    assert _k_major_paths(q) == {"lm_head.kernel"}
    assert isinstance(flatten(q.params)["layers.0.mlp.up.kernel"], QuantizedWeight)


def test_int8_engine_holds_k_major_codes_and_saves_the_stored_layout(tmp_path, caplog):
    """Per-channel int8: K-major codes that quant_matmul reads in place (prompt rows and one-row
    decode steps), or the int8 gemv at one row (int8_gemv_rows=1); tokens and logits as the
    XLA int8 engine's; save() writes [K, N]."""
    hf = llama_model(num_hidden_layers=1)
    kw = dict(dtype="fp32", max_out_tokens=48, progress=False, quant={"bits": 8})
    xla = dsjax.init_inference(hf, **kw)
    pallas = dsjax.init_inference(hf, replace_with_kernel_inject=True, **kw)
    assert len(_k_major_paths(pallas)) == 5
    assert pallas.weight_bytes() == xla.weight_bytes()
    ids = np.stack([prompt(1, 12, 96), prompt(2, 12, 96)])  # 24 rows: quant_matmul
    one = prompt(3, 7, 96)
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        np.testing.assert_allclose(np.asarray(pallas(ids)), np.asarray(xla(ids)), atol=2e-4,
                                   rtol=2e-4)
        got = pallas.generate(one, max_new_tokens=4).tokens  # one row a step
    assert "falling back" not in caplog.text
    kernels = generate_kernels(pallas, [one])  # the float LM head alone runs the gemv
    assert kernels["quant8_matmul"] and kernels["gemv"] == 2  # prompt and loop
    # with log-probabilities: the program of test_kernel_injection's LLaMA int8 XLA engine
    want = xla.generate(one, max_new_tokens=4, return_logprobs=True).tokens
    np.testing.assert_array_equal(got, want)
    gemv_engine = dsjax.init_inference(hf, kernels=KernelPolicy.pallas(int8_gemv_rows=1), **kw)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):  # a new policy: a new program
        np.testing.assert_array_equal(gemv_engine.generate(one, max_new_tokens=4).tokens, want)
    assert "gemv kernel (int8, K-major, RMSNorm fused)" in caplog.text
    assert generate_kernels(gemv_engine, [one])["gemv"] > kernels["gemv"]
    _assert_saves_stored_layout(pallas, xla, tmp_path, kw)


def test_grouped_asymmetric_int8_engine_reads_k_major_codes(tmp_path, caplog):
    """int8 in groups of 16 with zero points: K-major codes through quant_matmul, logits and
    tokens as the XLA engine's over the same [K, N] codes; save() writes them back."""
    hf = llama_model(num_hidden_layers=1)
    kw = dict(dtype="fp32", max_out_tokens=48, progress=False,
              quant={"bits": 8, "group_size": 16, "symmetric": False})
    xla = dsjax.init_inference(hf, **kw)
    pallas = dsjax.init_inference(hf, replace_with_kernel_inject=True, **kw)
    up = flatten(pallas.params)["layers.0.mlp.up.kernel"]
    assert len(_k_major_paths(pallas)) == 5 and up.zeros is not None and up.group_size == 16
    assert pallas.weight_bytes() == xla.weight_bytes()
    ids = np.stack([prompt(1, 12, 96), prompt(2, 12, 96)])
    one = prompt(3, 7, 96)
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        np.testing.assert_allclose(np.asarray(pallas(ids)), np.asarray(xla(ids)), atol=2e-4,
                                   rtol=2e-4)
        got = pallas.generate(one, max_new_tokens=4).tokens
    assert "falling back" not in caplog.text
    kernels = generate_kernels(pallas, [one])
    assert kernels["quant8_matmul"] and kernels["gemv"] == 2  # the float LM head alone
    np.testing.assert_array_equal(got, xla.generate(one, max_new_tokens=4).tokens)
    _assert_saves_stored_layout(pallas, xla, tmp_path, kw)
