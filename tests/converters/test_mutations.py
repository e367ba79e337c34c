"""The parity check itself catches a wrongly mapped tensor: the perturbed tiny model converted
faithfully meets the fp32 tolerance of the parity tests, while the same model converted with
two norm scales swapped or a bias zeroed (what a converter bug would do) is far outside it.
HF's own init (biases 0, norm scales 1) would hide each of these mistakes."""

import copy

import numpy as np
import pytest

import dsjax
from tests.conftest import gpt2_model, hf_logits, llama_model, prompt, torch, transformers

TOL = dict(atol=1e-4, rtol=1e-4)  # the parity tests' fp32 tolerance
IDS = [prompt(1, 20), prompt(2, 20)]  # test_gpt2.test_logits_match_hf's shapes
LLAMA_BIASES = dict(attention_bias=True, mlp_bias=True)


def _swap(a, b):
    t = a.detach().clone()
    a.copy_(b)
    b.copy_(t)


def _gpt2_norms(m):  # layer 0's ln_1 / ln_2 scales swapped
    _swap(m.transformer.h[0].ln_1.weight, m.transformer.h[0].ln_2.weight)


def _gpt2_attn_out_bias(m):  # layer 0's attention output bias dropped
    m.transformer.h[0].attn.c_proj.bias.zero_()


def _llama_o_proj_bias(m):
    m.model.layers[0].self_attn.o_proj.bias.zero_()


def _llama_gate_up_biases(m):  # gate | up biases concatenated in the wrong order
    mlp = m.model.layers[1].mlp
    _swap(mlp.gate_proj.bias, mlp.up_proj.bias)


MODELS = {"gpt2": (gpt2_model, {}), "llama_biases": (llama_model, LLAMA_BIASES)}
MUTATIONS = {  # name: (model, what the wrong conversion does to the weights)
    "gpt2_layer0_norm_scales_swapped": ("gpt2", _gpt2_norms),
    "gpt2_layer0_attn_out_bias_zeroed": ("gpt2", _gpt2_attn_out_bias),
    "llama_layer0_o_proj_bias_zeroed": ("llama_biases", _llama_o_proj_bias),
    "llama_layer1_gate_up_biases_swapped": ("llama_biases", _llama_gate_up_biases),
}


def _engine(model):
    return dsjax.init_inference(model, dtype="fp32", max_out_tokens=64, progress=False)


@pytest.fixture(scope="module", params=list(MODELS))
def reference(request):
    make, overrides = MODELS[request.param]
    model = make(**overrides)
    return request.param, model, hf_logits(model, IDS)


def test_faithful_conversion_is_within_tolerance(reference):
    _, model, ref = reference
    np.testing.assert_allclose(np.asarray(_engine(model)(IDS)), ref, **TOL)


@pytest.mark.parametrize("reference,name", [(m, n) for n, (m, _) in MUTATIONS.items()],
                         indirect=["reference"])
def test_mutated_conversion_is_caught(reference, name):
    _, model, ref = reference
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        MUTATIONS[name][1](wrong)
    ours = np.asarray(_engine(wrong)(IDS))  # same config and shapes: the compiled forward is reused
    # dsjax follows the mutated weights exactly, so the difference below is the mutation's alone
    np.testing.assert_allclose(ours, hf_logits(wrong, IDS), **TOL)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        np.testing.assert_allclose(ours, ref, **TOL)
    assert np.abs(ours - ref).max() > 1e-2  # far outside the tolerance, not a near miss


def test_hf_init_hides_these_mutations():
    """Why the reference models are perturbed: under HF's init each mutated pair of tensors is
    equal (norm scales 1) or already zero (biases), so the wrong conversion gives the same
    weights and the same logits."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4))
    block = gpt2.transformer.h[0]
    assert torch.equal(block.ln_1.weight, block.ln_2.weight)
    assert not block.attn.c_proj.bias.any()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        **LLAMA_BIASES))
    layer = llama.model.layers[0]
    assert not layer.self_attn.o_proj.bias.any()
    assert torch.equal(layer.mlp.gate_proj.bias, layer.mlp.up_proj.bias)
