"""Every decoder family against HF transformers' torch model, on small random configs that
exercise each family's quirk: logits (fp32, tight tolerance), 32 greedy tokens through the KV
cache, and a left-padded batch equal to each prompt alone."""

import inspect

import numpy as np
import pytest
import torch
import transformers as tf

import dsjax
from dsjax import cli
from tests.conftest import (hf_greedy, hf_greedy_logprobs, hf_logits, perturb, prompt,
                            word_tokenizer)

V = 96
SMALL = dict(vocab_size=V, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, **SMALL)
NEOX = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.25}, **SMALL)
OPT = dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
           max_position_embeddings=128, **SMALL)

CASES = {  # name: (HF class, config class, config) -- the quirk each one exercises
    "bloom_alibi": (tf.BloomForCausalLM, tf.BloomConfig, dict(hidden_size=32, n_layer=2, n_head=4, **SMALL)),
    "gpt_neo_local_window_3": (tf.GPTNeoForCausalLM, tf.GPTNeoConfig, dict(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=3, max_position_embeddings=128, **SMALL)),
    "gpt_neox_parallel_rotary_quarter": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig, NEOX),
    "gpt_neox_sequential": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig, dict(NEOX, use_parallel_residual=False)),
    "gptj_rotary_dim_4_of_8": (tf.GPTJForCausalLM, tf.GPTJConfig, dict(
        n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, **SMALL)),
    "opt_pre_ln": (tf.OPTForCausalLM, tf.OPTConfig, OPT),
    "opt_post_ln_projected": (tf.OPTForCausalLM, tf.OPTConfig, dict(
        OPT, do_layer_norm_before=False, word_embed_proj_dim=16)),
    "mistral_window_5_gqa": (tf.MistralForCausalLM, tf.MistralConfig, dict(LLAMA_LIKE, sliding_window=5)),
    "qwen2_qkv_bias_gqa": (tf.Qwen2ForCausalLM, tf.Qwen2Config, LLAMA_LIKE),
    "qwen2_sliding_top_layer": (tf.Qwen2ForCausalLM, tf.Qwen2Config, dict(
        LLAMA_LIKE, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "gemma_mqa_geglu_plus_one": (tf.GemmaForCausalLM, tf.GemmaConfig, dict(
        LLAMA_LIKE, num_key_value_heads=1, head_dim=16)),
}


def build(name, seed=0, cases=None):
    """The HF model with every parameter perturbed (biases and norm scales too), so that a
    wrongly mapped tensor cannot hide behind HF's zero/one initialisation."""
    cls, config_cls, cfg = (cases or CASES)[name]
    torch.manual_seed(seed)
    return perturb(cls(config_cls(**cfg)))


def make_pair(name, cases=None):
    """(name, the HF model, a dsjax fp32 engine of it): what the tests below take."""
    model = build(name, cases=cases)
    return name, model, dsjax.init_inference(model, dtype="fp32", max_out_tokens=64,
                                             progress=False)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    return make_pair(request.param)


def test_logits_match_hf(pair):
    _, model, engine = pair
    ids = [prompt(1, 20, V), prompt(2, 20, V)]
    np.testing.assert_allclose(np.asarray(engine(ids)), hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_32_greedy_tokens_through_the_cache(pair):
    """Tokens and each step's log-probability: random models often settle into repeating a
    token, so the per-step values are what prove the cache path right."""
    _, model, engine = pair
    p = prompt(3, 13, V)
    out = engine.generate([p], max_new_tokens=32, eos_token_id=[], return_logprobs=True)
    tokens, logprobs = hf_greedy_logprobs(model, p, 32)
    assert out.sequences[0] == tokens
    np.testing.assert_allclose(out.logprobs[0], logprobs, atol=1e-4)


def test_left_padded_batch_equals_each_prompt(pair):
    _, model, engine = pair
    prompts = [prompt(4, 5, V), prompt(5, 14, V), prompt(6, 9, V)]
    T = max(map(len, prompts))
    ids, mask = np.zeros((3, T), np.int64), np.zeros((3, T), np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]).sequences
    assert out == [hf_greedy(model, p, 10) for p in prompts]


def test_family_is_recognised(pair):
    name, _, engine = pair
    assert name.startswith(engine.config.family + "_")


def test_checkpoint_directory_and_cli_generate(pair, tmp_path, capsys):
    """The same family from a saved HF directory (safetensors, no torch) through `dsjax
    generate`, with the checkpoint's tokenizer."""
    _, model, engine = pair
    model.save_pretrained(tmp_path)
    word_tokenizer(tmp_path)
    from_dir = dsjax.init_inference(tmp_path, dtype="fp32", max_out_tokens=64, progress=False)
    ids = [prompt(7, 20, V), prompt(8, 20, V)]  # the shapes of test_logits_match_hf: no new compile
    np.testing.assert_array_equal(np.asarray(from_dir(ids)), np.asarray(engine(ids)))
    if engine.config.family == "qwen2":
        return  # transformers 5 loads Qwen2Tokenizer by model type, which ignores a word-level tokenizer.json
    # --logprobs: the program test_32_greedy_tokens_through_the_cache compiled (one prompt)
    args = ["-q", "generate", "--model", str(tmp_path), "--prompt", "hello deep speed",
            "--max-new-tokens", "4", "--dtype", "fp32", "--max-out-tokens", "64", "--logprobs"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("[0] hello deep speed") and len(out.split("logprobs: ")[1].split()) == 4


def test_left_padded_logits_match_hf(pair):
    """engine(ids, attention_mask) with left padding: positions count real tokens only, as HF
    computes them for generation (passed to HF where its forward takes position_ids)."""
    _, model, engine = pair
    prompts = [prompt(8, 6, V), prompt(9, 15, V)]
    T = max(map(len, prompts))
    ids, mask = np.zeros((2, T), np.int64), np.zeros((2, T), np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    kwargs = {"attention_mask": torch.tensor(mask)}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = torch.tensor(np.maximum(mask.cumsum(1) - 1, 0))
    with torch.no_grad():
        ref = model(torch.tensor(ids), **kwargs).logits.numpy()
    ours = np.asarray(engine(ids, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
