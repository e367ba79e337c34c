"""K-major weights (dsjax.kmajor): the layout conversions, and a kernel-injected engine that
holds its GEMM weights K-major, computes like the XLA engine and saves the stored layout."""

import jax.numpy as jnp
import numpy as np

import dsjax
from dsjax import kmajor
from dsjax.kmajor import KMajorWeight
from dsjax.model import flatten
from dsjax.quant import QuantizedWeight, QuantSpec, dequantize, quantize
from tests.conftest import llama_model, prompt


def test_conversions_round_trip():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((12, 20)), jnp.float32)
    km = kmajor.to_k_major(w)
    assert isinstance(km, KMajorWeight) and km.values.shape == (20, 12) and km.shape == (12, 20)
    np.testing.assert_array_equal(kmajor.to_k_n(km), w)
    q = quantize(w, QuantSpec(bits=8))  # per channel, symmetric: kept as codes, transposed
    kq = kmajor.to_k_major(q)
    assert kq.values.dtype == jnp.int8 and kq.scales.shape == (20,)
    assert kq.nbytes == q.nbytes
    back = kmajor.to_k_n(kq)
    assert isinstance(back, QuantizedWeight)
    np.testing.assert_array_equal(dequantize(back), dequantize(q))
    x = jnp.ones((3, 12), jnp.float32)
    np.testing.assert_allclose(kmajor.matmul_xla(x, kq), x @ dequantize(q), rtol=1e-5, atol=1e-5)
    for other in (QuantSpec(bits=8, group_size=4), QuantSpec(bits=8, symmetric=False),
                  QuantSpec(bits=4)):  # their kernel reads [K, N]: unchanged
        qo = quantize(w, other)
        assert kmajor.to_k_major(qo) is qo


def test_engine_holds_k_major_weights_and_saves_the_stored_layout(tmp_path):
    hf = llama_model(num_hidden_layers=1)
    kw = dict(dtype="fp32", max_out_tokens=48, progress=False)
    xla = dsjax.init_inference(hf, **kw)
    pallas = dsjax.init_inference(hf, replace_with_kernel_inject=True, **kw)
    flat = flatten(pallas.params)
    k_major = {k for k, v in flat.items() if isinstance(v, KMajorWeight)}
    assert k_major == {"layers.0.attn.qkv.kernel", "layers.0.attn.out.kernel",
                       "layers.0.mlp.up.kernel", "layers.0.mlp.down.kernel", "lm_head.kernel"}
    assert pallas.num_params() == xla.num_params()
    assert pallas.weight_bytes() == xla.weight_bytes()
    ids = np.stack([prompt(1, 12, 96), prompt(2, 12, 96)])  # 24 rows: the GEMM kernels
    np.testing.assert_allclose(np.asarray(pallas(ids)), np.asarray(xla(ids)), atol=2e-4,
                               rtol=2e-4)
    restored = dsjax.init_inference(pallas.save(tmp_path / "ckpt"), **kw)
    for path, w in flatten(xla.params).items():
        np.testing.assert_array_equal(np.asarray(flatten(restored.params)[path]), np.asarray(w))
