"""init_inference(): option checking (before any weight is read) and the checkpoint round trip."""

import json

import numpy as np
import pytest

import dsjax
from dsjax import KernelPolicy, checkpoint
from dsjax.config import ModelConfig
from dsjax.parallel.mesh import Parallel
from tests.conftest import gpt2_model, llama_model, prompt

TINY = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                   num_kv_heads=2, intermediate_size=32, norm="rmsnorm", positions="rotary",
                   gated_mlp=True, activation="silu")


@pytest.mark.parametrize("kwargs,err,match", [
    ({"dtype": "int3"}, ValueError, "unsupported dtype"),
    ({"dtype": "int3"}, ValueError, "int8 / int4"),
    ({"tensor_parallel": {"tp_size": 3}}, ValueError, "does not divide the 4 attention heads"),
    ({"tensor_parallel": {"tp_size": 4}, "data_parallel": {"dp_size": 4}}, ValueError,
     "needs 16 devices"),
    ({"tensor_parallel": {"tp_sise": 2}}, ValueError, "unknown tensor_parallel keys"),
    ({"mp_size": 2, "tensor_parallel": {"tp_size": 4}}, ValueError, "contradicts"),
    ({"pipeline_parallel": {"pp_size": 2}}, ValueError, "does not divide the 1 layers"),
    ({"pipeline_parallel": {"pp_size": 2, "micro_batches": 0}}, ValueError, "micro_batches must"),
    ({"quant": {"bits": 3}}, ValueError, "bits must be 8 or 4"),
    ({"quant": {"bitz": 8}}, ValueError, "unknown quant keys"),
    ({"quant": {"bits": 8, "group_size": 12}}, ValueError, "group_size=12 does not divide"),
    ({"quant": {"bits": 4, "group_size": 24}}, ValueError, "does not divide K/2=16"),
    ({"dtype": "int8", "quant": {"bits": 4}}, ValueError, "contradicts"),
    ({"quant": {"enabled": True, "weight": {"num_bits": 8, "q_groups": 4}}}, ValueError, "q_groups"),
    ({"quant": {"enabled": True, "activation": {"enabled": True}}}, NotImplementedError,
     "activation quantization"),
    ({"max_out_tokens": 1}, ValueError, "max_out_tokens"),
    ({"kv_cache_dtype": "fp8"}, ValueError, "kv_cache_dtype='fp8' is not one of"),
    ({"kernels": {"lineer": "xla"}}, ValueError, r"unknown kernels keys \['lineer'\]"),
    ({"kernels": {"linear": "cuda"}}, ValueError, "kernels\\['linear'\\]='cuda'"),
    ({"config": {"max_tokens": 5}}, ValueError, "unknown init_inference config key 'max_tokens'"),
])
def test_bad_options(kwargs, err, match):
    with pytest.raises(err, match=match):
        dsjax.init_inference(TINY, **kwargs)


def test_build_engine_checks_the_plan_as_init_inference_does():
    """build_engine takes params a caller holds: the budget, degrees and devices are checked
    before anything is placed, as init_inference checks them before any weight is read."""
    cfg = dsjax.init_inference(gpt2_model(n_positions=64), dtype="fp32", progress=False).config
    with pytest.raises(ValueError, match="exceeds the 64 learned positions"):
        dsjax.build_engine(cfg, {}, inference=dsjax.InferenceConfig(dtype="fp32",
                                                                    max_out_tokens=100))
    with pytest.raises(ValueError, match="needs 16 devices"):
        dsjax.build_engine(TINY, {}, parallel=Parallel(tp=4, dp=4))
    with pytest.raises(ValueError, match="does not divide the 4 attention heads"):
        dsjax.build_engine(TINY, {}, parallel=Parallel(tp=3))


def test_kernel_policy_bounds_and_contradictions():
    from pallas_kernels.gemv import MAX_ROWS

    assert KernelPolicy.pallas(gemv_rows=MAX_ROWS).gemv_rows == MAX_ROWS
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        KernelPolicy.pallas(gemv_rows=MAX_ROWS + 1)
    with pytest.raises(ValueError, match="at most"):
        KernelPolicy(int8_gemv_rows=MAX_ROWS + 1)
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        KernelPolicy(min_split_keys=-1)
    with pytest.raises(ValueError, match="pass one"):
        dsjax.init_inference(TINY, replace_with_kernel_inject=True, kernels=KernelPolicy())
    with pytest.raises(ValueError, match=r"another policy \(xla_gemm_rows=0\)"):  # names what differs
        KernelPolicy.parse(KernelPolicy.pallas(xla_gemm_rows=0), inject=True)
    assert KernelPolicy.parse(KernelPolicy.pallas(), inject=True) == KernelPolicy.pallas()
    assert KernelPolicy.parse({"linear": "xla"}, inject=True) == KernelPolicy.pallas(linear="xla")


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="enable_magic"):
        dsjax.init_inference(TINY, enable_magic=True)


def test_deepspeed_config_dict():
    engine = dsjax.init_inference(TINY, config={"dtype": "fp16", "max_out_tokens": 64})
    assert engine.inference_config.dtype == "float16"
    assert engine.inference_config.max_out_tokens == 64


def test_budget_beyond_learned_positions(tmp_path):
    gpt2_model(n_positions=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exceeds the 64 learned positions"):
        dsjax.init_inference(tmp_path, max_out_tokens=100)


def test_unknown_reference():
    with pytest.raises(FileNotFoundError, match="neither a directory nor a built-in"):
        dsjax.init_inference("no/such/dir")


def test_builtin_architecture_random_weights():
    engine = dsjax.init_inference("tiny-llama", dtype="fp32", max_out_tokens=32)
    assert engine.config.num_kv_heads == 2
    assert engine.generate([[1, 2, 3]], max_new_tokens=4).tokens.shape == (1, 4)


@pytest.mark.parametrize("make", [gpt2_model, llama_model])
def test_convert_restore_round_trip(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path / "hf")
    out = dsjax.engine.convert_checkpoint(tmp_path / "hf", tmp_path / "ds", dtype="fp32", progress=False)
    assert checkpoint.is_checkpoint(out)
    restored = dsjax.init_inference(out, dtype="fp32", max_out_tokens=64)
    direct = dsjax.init_inference(tmp_path / "hf", dtype="fp32", max_out_tokens=64, progress=False)
    ids = [prompt(30, 12)]
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(direct(ids)))
    assert restored.config == direct.config
    # stored fp32, restored as bf16: cast on restore
    half = dsjax.init_inference(out, dtype="bf16", max_out_tokens=64)
    assert {str(x.dtype) for x in half.params["layers"][0]["attn"]["qkv"].values()} == {"bfloat16"}


def test_restore_refuses_mismatched_config(tmp_path):
    engine = dsjax.init_inference(TINY, dtype="fp32")
    engine.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "dsjax.json").read_text())
    meta["model"]["intermediate_size"] = 40
    (tmp_path / "ck" / "dsjax.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="stored as"):
        dsjax.init_inference(tmp_path / "ck")


def test_save_refuses_non_empty_directory(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        dsjax.init_inference(TINY).save(tmp_path)


def test_tokenizer_is_never_guessed(tmp_path):
    assert dsjax.init_inference(TINY).tokenizer.encode("hi") == [104, 105]  # random: bytes
    model = gpt2_model()
    with pytest.raises(ValueError, match="came without a directory"):
        dsjax.init_inference(model, max_out_tokens=64, progress=False).tokenizer
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer files"):
        dsjax.init_inference(tmp_path, max_out_tokens=64, progress=False).tokenizer


def test_build_engine_casts_float_weights_to_the_inference_dtype(caplog):
    """float32 arrays under a bf16 inference config run as bf16 weights (on one device and over
    a mesh): the same logits as the arrays cast first, and the log says so."""
    import jax
    import jax.numpy as jnp

    from dsjax import presets
    from dsjax.config import InferenceConfig
    from dsjax.engine import build_engine
    from dsjax.model import random_params

    cfg = presets.model_config("tiny-llama")
    fp32 = jax.tree.map(np.asarray, random_params(cfg, jnp.float32, 0))
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), fp32)
    icfg = InferenceConfig(dtype="bf16", max_out_tokens=64)
    p = [prompt(5, 9, cfg.vocab_size)]
    for par in (None, Parallel(tp=2)):
        caplog.clear()
        with caplog.at_level("INFO", logger="dsjax"):
            got = build_engine(cfg, fp32, inference=icfg, parallel=par)
        assert {str(a.dtype) for a in jax.tree.leaves(got.params)} == {"bfloat16"}
        assert "weights cast to the engine's dtypes" in caplog.text
        want = build_engine(cfg, bf16, inference=icfg, parallel=par)
        np.testing.assert_array_equal(np.asarray(got(p), np.float32), np.asarray(want(p), np.float32))
