"""replace_with_kernel_inject=True (the Pallas kernels, interpreted on the CPU) against the XLA
path on the same weights, for every family: forward logits, greedy tokens and their
log-probabilities through the KV cache, a padded batch, encoder outputs, quantized weights."""

import logging

import numpy as np
import pytest

import dsjax
from tests.conftest import gpt2_model, llama_model, prompt
from tests.converters import test_bert, test_clip, test_decoder_families, test_distilbert

# one configuration per family (the second configs of NeoX, Qwen2 and OPT add no kernel path
# the others do not take: parallel residual, sliding windows and post-LN are all covered)
SAME_FAMILY = ("gpt_neox_sequential", "qwen2_qkv_bias_gqa", "opt_pre_ln")
DECODERS = {**{name: (lambda n=name: test_decoder_families.build(n))
               for name in test_decoder_families.CASES if name not in SAME_FAMILY},
            "gpt2": gpt2_model, "llama_gqa": llama_model}
TOL = dict(atol=2e-4, rtol=2e-4)  # fp32; the kernels sum in another order than XLA


def _pair(hf, **kw):
    kw = dict(dtype="fp32", progress=False, **kw)
    xla = dsjax.init_inference(hf, **kw)
    pallas = dsjax.init_inference(hf, replace_with_kernel_inject=True, **kw)
    return xla, pallas


def _same_generation(xla, pallas, vocab, rows=None):
    rows = rows or [prompt(3, 11, vocab), prompt(4, 4, vocab)]  # a padded batch of two lengths
    a = xla.generate(rows, max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    b = pallas.generate(rows, max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    assert a.sequences == b.sequences
    np.testing.assert_allclose(b.logprobs, a.logprobs, **TOL)


# families whose attention masks differ: the forward (no cache) path is checked on these
MASKS = ("bloom_alibi", "gpt_neo_local_window_3", "mistral_window_5_gqa", "gemma_mqa_geglu_plus_one")


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_family(name):
    hf = DECODERS[name]()
    xla, pallas = _pair(hf, max_out_tokens=48)
    V = xla.config.vocab_size
    _same_generation(xla, pallas, V)
    if name in MASKS:
        ids = np.stack([prompt(1, 12, V), prompt(2, 12, V)])
        mask = np.ones_like(ids)
        mask[1, :5] = 0  # left padding: the flash kernel masks keys and shifts positions
        np.testing.assert_allclose(np.asarray(pallas(ids, mask)), np.asarray(xla(ids, mask)), **TOL)


@pytest.mark.parametrize("quant", [{"bits": 8}, {"bits": 4, "group_size": 16, "symmetric": False}],
                         ids=["int8", "int4_g16_asym"])
@pytest.mark.parametrize("make", [llama_model, gpt2_model], ids=["llama", "gpt2"])
def test_quantized_weights(make, quant):
    xla, pallas = _pair(make(), quant=quant, max_out_tokens=48)
    _same_generation(xla, pallas, xla.config.vocab_size)


@pytest.mark.parametrize("make", [llama_model, gpt2_model], ids=["llama", "gpt2"])
def test_int8_kv_cache(make):
    """The int8 cache through the decode kernel equals the XLA path on the same int8 cache, and
    stays close to the full-precision cache."""
    hf = make()
    xla, pallas = _pair(hf, max_out_tokens=48, kv_cache_dtype="int8")
    _same_generation(xla, pallas, 96)
    full = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=48, progress=False)
    rows = [prompt(3, 11, 96), prompt(4, 4, 96)]
    a = full.generate(rows, max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    b = pallas.generate(rows, max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    assert a.sequences == b.sequences
    np.testing.assert_allclose(b.logprobs, a.logprobs, atol=0.05)


def test_gemv_with_layernorm_fused(monkeypatch, caplog):
    """The routing experiment decode_variants' bf16-pallas-lnfused times: GPT-2's LayerNorms
    fused into the one-row gemv give the XLA path's tokens and log-probabilities."""
    from dsjax import ops, pallas_ops

    monkeypatch.setattr(pallas_ops, "GEMV_FUSED_NORMS", ("rmsnorm", "layernorm"))
    ops._ANNOUNCED.clear()
    xla, pallas = _pair(gpt2_model(), max_out_tokens=48)
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):  # one row: the gemv's decode steps
        _same_generation(xla, pallas, xla.config.vocab_size, [prompt(3, 11, xla.config.vocab_size)])
    assert "gemv kernel (float32, K-major, LayerNorm fused)" in caplog.text


def test_bf16_within_dtype_tolerance():
    xla = dsjax.init_inference(llama_model(), dtype="bf16", progress=False)
    pallas = dsjax.init_inference(llama_model(), dtype="bf16", progress=False,
                                  replace_with_kernel_inject=True)
    ids = np.stack([prompt(5, 16, 96)])
    a, b = np.asarray(xla(ids)), np.asarray(pallas(ids))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


@pytest.mark.parametrize("make,inputs", [
    (lambda: test_bert.bert("BertForMaskedLM"), lambda: test_bert.batch()),
    (lambda: test_distilbert.distilbert("DistilBertForSequenceClassification"),
     lambda: test_distilbert.batch()),
    (test_clip.clip, lambda: test_clip.texts()),
], ids=["bert", "distilbert", "clip"])
def test_encoder_family(make, inputs):
    xla, pallas = _pair(make())
    a, b = xla.embed(*inputs()), pallas.embed(*inputs())
    np.testing.assert_allclose(b.last_hidden_state, a.last_hidden_state, **TOL)
    for name in ("pooler_output", "logits", "embeds"):
        if getattr(a, name) is not None:
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), **TOL)
    if make is test_clip.clip:
        pix = test_clip.pixels()
        np.testing.assert_allclose(pallas.embed_image(pix).embeds, xla.embed_image(pix).embeds, **TOL)


def test_the_log_names_each_kernel_and_every_fallback(caplog):
    from dsjax import ops

    ops._ANNOUNCED.clear()
    # one layer: the same ops (and log lines) as two, half the program to compile
    xla, pallas = _pair(llama_model(num_hidden_layers=1), max_out_tokens=48)
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        pallas.generate([[1, 2, 3]], max_new_tokens=2)
    text = caplog.text
    for kernel in ("norm in XLA before a K-major GEMM", "matmul kernel",  # prompt: 3 rows
                   "decode_attention kernel",
                   "flash_attention kernel", "write_kv runs the 'pallas'",
                   "gemv kernel (float32, K-major, RMSNorm fused)",  # decode: qkv, mlp.up
                   "gemv kernel (float32, K-major)"):  # decode: attn.out, mlp.down, lm_head
        assert kernel in text, kernel
    assert "ops.norm: 'pallas' has no norm kernel: falling back to 'xla'" in text


def test_per_op_choice(caplog):
    """Pallas attention with XLA GEMMs: each op logs the implementation it runs."""
    from dsjax import ops

    ops._ANNOUNCED.clear()
    hf = llama_model()
    xla = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=48, progress=False)
    mixed = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=48, progress=False,
                                 replace_with_kernel_inject=True, kernels={"linear": "xla"})
    assert mixed.inference_config.impl == (("*", ("pallas", "xla")), ("linear", ("xla",)))
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        _same_generation(xla, mixed, 96)
    assert "ops.linear runs the 'xla' implementation" in caplog.text
    assert "ops.cache_attention runs the 'pallas' implementation" in caplog.text
    assert "ops.linear: Pallas" not in caplog.text


def test_unsupported_call_falls_back_with_a_warning(caplog):
    from dsjax import ops

    def picky(*args, **kwargs):
        raise ops.Unsupported("shape class not tuned")

    ops.register("probe", "pallas", picky)
    ops.register("probe", "xla", lambda x: x + 1)
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        assert ops.run("probe", ("pallas", "xla"), 1) == 2
    assert "ops.probe: 'pallas' cannot run it (shape class not tuned): falling back to 'xla'" in caplog.text
    with pytest.raises(NotImplementedError, match="none of"):
        ops.run("probe", ("pallas",), 1)
