"""LLaMA (MHA, GQA, MQA; tied and untied; rope scaling; biases) against HF transformers."""

import numpy as np
import pytest

import dsjax
from tests.conftest import hf_greedy, hf_logits, llama_model, prompt

VARIANTS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa": {"num_key_value_heads": 1},
    "tied": {"tie_word_embeddings": True},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "head_dim": {"head_dim": 16},
    "llama3_rope": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64}},
    "linear_rope": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_hf(name):
    model = llama_model(**VARIANTS[name])
    engine = dsjax.init_inference(model, dtype="fp32", max_out_tokens=128, progress=False)
    ids = [prompt(1, 100), prompt(2, 100)]  # past the llama3 original length of 64
    np.testing.assert_allclose(np.asarray(engine(ids)), hf_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gqa", "mha", "tied"])
def test_32_greedy_tokens_match_hf(name):
    model = llama_model(**VARIANTS[name])
    engine = dsjax.init_inference(model, dtype="fp32", max_out_tokens=64, progress=False)
    p = prompt(3, 9)
    ours = engine.generate([p], max_new_tokens=32, eos_token_id=[]).sequences[0]
    assert ours == hf_greedy(model, p, 32)
    assert len(set(ours)) > 4


def test_sharded_directory(tmp_path):
    model = llama_model()
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    engine = dsjax.init_inference(tmp_path, dtype="fp32", max_out_tokens=64, progress=False)
    ids = [prompt(4, 10)]
    np.testing.assert_allclose(np.asarray(engine(ids)), hf_logits(model, ids), atol=1e-4, rtol=1e-4)
