"""GPT-2: logits and greedy tokens against HF transformers' torch model."""

import numpy as np
import pytest

import dsjax
from tests.conftest import gpt2_model, hf_greedy, hf_logits, prompt


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False},
    {"activation_function": "gelu", "scale_attn_weights": False, "n_inner": 48},
])
def test_logits_match_hf(overrides):
    model = gpt2_model(**overrides)
    engine = dsjax.init_inference(model, dtype="fp32", max_out_tokens=64, progress=False)
    ids = [prompt(1, 20), prompt(2, 20)]
    np.testing.assert_allclose(np.asarray(engine(ids)), hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_32_greedy_tokens_match_hf(gpt2_pair):
    model, engine = gpt2_pair
    for seed, length in [(3, 5), (4, 17)]:
        p = prompt(seed, length)
        ours = engine.generate([p], max_new_tokens=32, eos_token_id=[]).sequences[0]
        assert ours == hf_greedy(model, p, 32)
        assert len(set(ours)) > 4  # the reference really varies


@pytest.mark.parametrize("sharded", [False, True])
def test_from_safetensors_directory(tmp_path, sharded):
    model = gpt2_model(tie_word_embeddings=False)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    engine = dsjax.init_inference(tmp_path, dtype="fp32", max_out_tokens=64, progress=False)
    ids = [prompt(5, 12)]
    np.testing.assert_allclose(np.asarray(engine(ids)), hf_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.15), ("fp16", 0.02)])
def test_half_precision_load(tmp_path, dtype, tol):
    model = gpt2_model()
    model.save_pretrained(tmp_path)
    engine = dsjax.init_inference(tmp_path, dtype=dtype, max_out_tokens=64, progress=False)
    want = {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert all(str(x.dtype) == want for x in _leaves(engine.params))
    ids = [prompt(6, 12)]
    ref = hf_logits(model, ids)
    err = np.abs(np.asarray(engine(ids)) - ref).max() / np.abs(ref).max()
    assert err < tol


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
