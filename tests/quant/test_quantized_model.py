"""Quantized models end to end: closeness to the full-precision model, orbax round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import checkpoint
from dsjax.quant import QuantizedWeight
from tests.conftest import gpt2_model, llama_model, torch


def _metrics(hf, quant, ids):
    """(relative RMS logit error, teacher-forced top-1 agreement, generated-token agreement) of
    the quantized model against the fp32 one, both computing in fp32."""
    base = dsjax.init_inference(hf, dtype="fp32", progress=False)
    q = dsjax.init_inference(hf, dtype="fp32", quant=quant, progress=False)
    lf, lq = np.asarray(base(ids)), np.asarray(q(ids))
    rel = float(np.sqrt(((lq - lf) ** 2).mean()) / lf.std())
    top1 = float((lq.argmax(-1) == lf.argmax(-1)).mean())
    rows = ids.tolist()
    gen = float((q.generate(rows, max_new_tokens=8).tokens
                 == base.generate(rows, max_new_tokens=8).tokens).mean())
    return rel, top1, gen


@pytest.mark.parametrize("make", [gpt2_model, llama_model], ids=["gpt2", "llama"])
def test_int8_stays_close_and_int4_further(make, capsys):
    hf, ids = make(), np.random.default_rng(0).integers(0, 96, (4, 24))
    int8 = _metrics(hf, {"bits": 8}, ids)
    int4 = _metrics(hf, {"bits": 4, "group_size": 16}, ids)
    with capsys.disabled():
        print(f"\n{make.__name__}: int8 rel logit err {int8[0]:.4f}, top-1 {int8[1]:.3f}, "
              f"greedy {int8[2]:.3f}; int4/g16 {int4[0]:.4f}, {int4[1]:.3f}, {int4[2]:.3f}")
    assert int8[0] < 0.05 and int8[1] >= 0.9 and int8[2] >= 0.6
    assert int8[0] < int4[0] < 0.5


def test_dtype_int8_is_bf16_compute_with_int8_weights():
    engine = dsjax.init_inference(llama_model(), dtype=torch.int8, progress=False)
    assert engine.inference_config.dtype == "bfloat16"
    assert engine.inference_config.quant.bits == 8
    qkv = engine.params["layers"][0]["attn"]["qkv"]["kernel"]
    assert isinstance(qkv, QuantizedWeight) and qkv.values.dtype == np.int8
    assert engine.params["embed"]["embedding"].dtype == np.dtype("bfloat16")
    full = dsjax.init_inference(llama_model(), dtype="bf16", progress=False)
    assert engine.weight_bytes() < 0.7 * full.weight_bytes()


def test_bf16_group_quantized_runs_on_the_cpu():
    """Groups of 16 in bf16: the per-group partial products are float32 (the CPU's dot has no
    bf16 x bf16 = f32: its operands go up first), close to fp32 compute of the same codes."""
    hf, ids = llama_model(), np.random.default_rng(1).integers(0, 96, (2, 12))
    bf16 = dsjax.init_inference(hf, dtype="bf16", quant={"bits": 4, "group_size": 16},
                                progress=False)
    same = jax.tree.map(lambda a: a.astype(np.float32) if a.dtype == jnp.bfloat16 else a,
                        bf16.runner.stored_params())  # (bf16 -> fp32: exact)
    fp32 = dsjax.build_engine(bf16.config, same, inference=dataclasses.replace(
        bf16.inference_config, dtype="float32"))
    got, want = np.asarray(bf16(ids), np.float32), np.asarray(fp32(ids))
    assert np.isfinite(got).all()
    assert np.sqrt(((got - want) ** 2).mean()) < 0.05 * want.std()


def test_quantized_checkpoint_round_trip(tmp_path):
    hf = llama_model()
    quant = {"bits": 4, "group_size": 16, "symmetric": False}
    engine = dsjax.init_inference(hf, dtype="fp32", quant=quant, progress=False)
    engine.save(tmp_path / "q")
    back = dsjax.init_inference(tmp_path / "q", dtype="fp32", progress=False)
    assert back.inference_config.quant == engine.inference_config.quant
    kernel = back.params["layers"][1]["mlp"]["down"]["kernel"]
    assert kernel.values.dtype == np.uint8 and kernel.zeros is not None
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    np.testing.assert_array_equal(back.generate(prompts, max_new_tokens=6).tokens,
                                  engine.generate(prompts, max_new_tokens=6).tokens)
    with pytest.raises(ValueError, match="cannot be re-quantized"):
        dsjax.init_inference(tmp_path / "q", quant={"bits": 8}, progress=False)
    # converting it again keeps (and records) its format, or refuses another one
    again = dsjax.convert_checkpoint(tmp_path / "q", tmp_path / "again", dtype="fp32",
                                     progress=False)
    assert checkpoint.stored_quant(checkpoint.load_meta(again)[1]) == back.inference_config.quant
    with pytest.raises(ValueError, match="cannot be re-quantized"):
        dsjax.convert_checkpoint(tmp_path / "q", tmp_path / "int8", quant={"bits": 8},
                                 progress=False)


def test_convert_stores_quantized_weights(tmp_path):
    hf = gpt2_model()
    dsjax.convert_checkpoint(hf, tmp_path / "c", dtype="int8", progress=False)
    restored = dsjax.init_inference(tmp_path / "c", progress=False)
    direct = dsjax.init_inference(hf, dtype="int8", progress=False)
    prompts = [[1, 2, 3, 4]]
    np.testing.assert_array_equal(restored.generate(prompts, max_new_tokens=6).tokens,
                                  direct.generate(prompts, max_new_tokens=6).tokens)


def test_fp8_weights_equal_their_dequantized_model_and_save(tmp_path, caplog):
    """quant={"fp8": True}: e4m3 codes with float32 group scales (W = q s) run through XLA's
    dot exactly as an fp32 engine of the dequantized weights does; the Pallas GEMM kernels,
    which read integer codes, decline them (XLA runs, logged); a save loads back the same."""
    from dsjax.quant import dequantize
    from dsjax.weights import is_weight

    hf = llama_model()
    quant = {"bits": 8, "fp8": True, "group_size": 16}
    engine = dsjax.init_inference(hf, dtype="fp32", quant=quant, progress=False)
    stored = engine.runner.stored_params()
    kernel = stored["layers"][1]["mlp"]["down"]["kernel"]
    assert kernel.values.dtype == jnp.float8_e4m3fn and kernel.group_size == 16
    dense = dsjax.build_engine(engine.config, jax.tree.map(
        lambda w: dequantize(w) if isinstance(w, QuantizedWeight) else w, stored,
        is_leaf=is_weight), inference=dataclasses.replace(engine.inference_config, quant=None))
    ids = [[5, 6, 7, 8, 9, 10]]
    np.testing.assert_allclose(np.asarray(engine(ids)), np.asarray(dense(ids)), atol=1e-4,
                               rtol=1e-4)
    with caplog.at_level("WARNING", logger="dsjax"):
        pallas = dsjax.init_inference(hf, dtype="fp32", quant=quant, progress=False,
                                      replace_with_kernel_inject=True)
        np.testing.assert_allclose(np.asarray(pallas(ids)), np.asarray(engine(ids)), atol=1e-4,
                                   rtol=1e-4)
    assert any("integer codes" in r.getMessage() for r in caplog.records)
    engine.save(tmp_path / "fp8")
    back = dsjax.init_inference(tmp_path / "fp8", dtype="fp32", progress=False)
    assert back.params["layers"][1]["mlp"]["down"]["kernel"].values.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(engine(ids)))
    with pytest.raises(ValueError, match="fp8 codes are 8 bits and symmetric"):
        dsjax.init_inference(hf, quant={"bits": 4, "fp8": True}, progress=False)
