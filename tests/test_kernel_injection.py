"""replace_with_kernel_inject=True (the Pallas kernels, interpreted on the CPU) against the XLA
path on the same weights, for every family: forward logits, greedy tokens and their
log-probabilities through the KV cache, a padded batch, encoder outputs, quantized weights."""

import logging

import jax
import numpy as np
import pytest

import dsjax
from dsjax import KernelPolicy, encoders
from tests.conftest import gpt2_model, llama_model, prompt
from tests.programs import generate_kernels, generate_program, pallas_calls, pallas_eqns
from tests.converters import test_bert, test_clip, test_decoder_families, test_distilbert

# one configuration per family (the second configs of NeoX, Qwen2 and OPT add no kernel path
# the others do not take: parallel residual, sliding windows and post-LN are all covered)
SAME_FAMILY = ("gpt_neox_sequential", "qwen2_qkv_bias_gqa", "opt_pre_ln")
# GPT-2 and LLaMA (conftest's models, which no XLA test compiles at this budget) run one layer:
# the layer loop is the same in every family and the eight two-layer families run it; the
# one-layer engines' XLA programs are then shared by the int8-cache, per-op, fused-gemv and log
# tests below (the same budget, batch bucket and log-probabilities)
ONE_LAYER = {"gpt2": lambda: gpt2_model(n_layer=1),
             "llama_gqa": lambda: llama_model(num_hidden_layers=1)}
DECODERS = {**{name: (lambda n=name: test_decoder_families.build(n))
               for name in test_decoder_families.CASES if name not in SAME_FAMILY}, **ONE_LAYER}
BUDGET = 64  # test_decoder_families' max_out_tokens: its XLA engines' programs are these
TOL = dict(atol=2e-4, rtol=2e-4)  # fp32; the kernels sum in another order than XLA


def _pair(hf, policy=None, **kw):
    """An XLA engine and a Pallas one (replace_with_kernel_inject, or `policy`)."""
    kw = dict(dtype="fp32", progress=False, **kw)
    xla = dsjax.init_inference(hf, **kw)
    pallas = dsjax.init_inference(hf, **({"kernels": policy} if policy else
                                         {"replace_with_kernel_inject": True}), **kw)
    return xla, pallas


def _same_generation(xla, pallas, vocab, rows=None):
    rows = rows or [prompt(3, 11, vocab), prompt(4, 4, vocab)]  # a padded batch of two lengths
    a = xla.generate(rows, max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    b = pallas.generate(rows, max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    assert a.sequences == b.sequences
    np.testing.assert_allclose(b.logprobs, a.logprobs, **TOL)
    return rows


# the kernels every all-Pallas generate program runs on two prompts (the GEMMs of two rows are
# the tensor-core kernels; the one-row gemv is tested in test_the_log_names_each_kernel...)
GENERATE_KERNELS = {"flash_attention", "decode_attention", "rotary_cache_write"}


# families whose attention masks differ: the forward (no cache) path is checked on these
MASKS = ("bloom_alibi", "gpt_neo_local_window_3", "mistral_window_5_gqa", "gemma_mqa_geglu_plus_one")


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_family(name):
    hf = DECODERS[name]()
    # the budget and shapes test_decoder_families compiles for the XLA engine of the same model
    # (one prompt's greedy tokens with log-probabilities, [2, 20] logits): compiled once
    xla, pallas = _pair(hf, max_out_tokens=BUDGET)
    V = xla.config.vocab_size
    rows = _same_generation(xla, pallas, V)
    kernels = set(generate_kernels(pallas, rows, return_logprobs=True))  # pre-norms fused
    assert GENERATE_KERNELS | {"matmul"} <= kernels <= GENERATE_KERNELS | {"matmul", "norm_matmul"}
    if name in MASKS:
        ids = np.stack([prompt(1, 20, V), prompt(2, 20, V)])
        mask = np.ones_like(ids)
        mask[1, :5] = 0  # left padding: the flash kernel masks keys and shifts positions
        np.testing.assert_allclose(np.asarray(pallas(ids, mask)), np.asarray(xla(ids, mask)), **TOL)


@pytest.mark.parametrize("quant", [{"bits": 8}, {"bits": 4, "group_size": 16, "symmetric": False}],
                         ids=["int8", "int4_g16_asym"])
@pytest.mark.parametrize("make", [ONE_LAYER["llama_gqa"], ONE_LAYER["gpt2"]], ids=["llama", "gpt2"])
def test_quantized_weights(make, quant):
    """Quantized GEMM weights through the Pallas kernels: XLA's tokens and log-probabilities.
    One layer (the layer loop is the same for every weight format, and the two-layer families
    run it above); LLaMA's int8 engine is test_kmajor's, so it compiles once."""
    xla, pallas = _pair(make(), quant=quant, max_out_tokens=48)
    rows = _same_generation(xla, pallas, xla.config.vocab_size)
    kernels = generate_kernels(pallas, rows, return_logprobs=True)
    assert GENERATE_KERNELS <= set(kernels) and kernels[f"quant{quant['bits']}_matmul"] > 0


FALLBACK = ("ops.cache_attention: 'pallas' cannot run it (flash attention over an int8 cache "
            "(prompt phase)): falling back to 'xla'")
_INT8 = {}


def _int8_cache(name, caplog):
    """ONE_LAYER[name]'s XLA and Pallas engines over an int8 KV cache, their tokens and
    log-probabilities on the padded batch checked equal, once per process: (the model, the
    Pallas engine, the rows, the warnings its program logged as it traced)."""
    if name not in _INT8:
        hf = ONE_LAYER[name]()
        xla, pallas = _pair(hf, max_out_tokens=BUDGET, kv_cache_dtype="int8")
        first = len(caplog.records)
        with caplog.at_level(logging.INFO, logger="dsjax.ops"):  # its own program, traced now
            rows = _same_generation(xla, pallas, 96)
        _INT8[name] = hf, pallas, rows, [r.getMessage() for r in caplog.records[first:]
                                         if r.levelno >= logging.WARNING]
    return _INT8[name]


@pytest.mark.parametrize("name", list(ONE_LAYER), ids=["gpt2", "llama"])
def test_int8_kv_cache(name, caplog):
    """The int8 cache through the decode kernel equals the XLA path on the same int8 cache, and
    stays close to the full-precision cache: the same log-probabilities (0.05) while the tokens
    agree, and a different token only where the full-precision logits nearly tie (< 0.2). One
    layer: each layer's cache is written and read as the two-layer families' float caches are;
    the full-precision engine's program is test_decoder_family's."""
    hf, pallas, rows, _ = _int8_cache(name, caplog)
    full = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=BUDGET, progress=False)
    a = full.generate(rows, max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    b = pallas.generate(rows, max_new_tokens=8, eos_token_id=[], return_logprobs=True)
    for row, want, got, want_lp, got_lp in zip(rows, a.sequences, b.sequences, a.logprobs,
                                               b.logprobs):
        same = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), len(want))
        np.testing.assert_allclose(got_lp[:same], want_lp[:same], atol=0.05)
        if same < len(want):  # a different token only where the full cache nearly ties
            logits = np.asarray(full([row + want[:same]]))[0, -1]
            assert logits[want[same]] - logits[got[same]] < 0.2, (same, want, got)


def test_a_call_no_kernel_takes_falls_back_with_a_warning(caplog):
    """The prompt phase over an int8 cache has no flash kernel: that call runs XLA, and the log
    says so and why (its one warning); the decode steps still run the decode kernel. The program
    is test_int8_kv_cache[llama]'s."""
    _, engine, rows, warnings = _int8_cache("llama_gqa", caplog)
    assert warnings == [FALLBACK]
    kernels = generate_kernels(engine, rows, return_logprobs=True, int8_cache=True)
    assert kernels["decode_attention"] and "flash_attention" not in kernels


def test_gemv_with_layernorm_fused(caplog):
    """A policy that fuses LayerNorm into the one-row gemv too (decode_variants' bf16-pallas-
    lnfused): GPT-2's tokens and log-probabilities as the XLA path's (one layer, as above)."""
    hf = ONE_LAYER["gpt2"]()
    xla = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=BUDGET, progress=False)
    policy = KernelPolicy.pallas(gemv_fused_norms=("rmsnorm", "layernorm"))
    fused = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=BUDGET, progress=False,
                                 kernels=policy)
    assert fused.policy == policy
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):  # one row: the gemv's decode steps
        _same_generation(xla, fused, xla.config.vocab_size, [prompt(3, 11, xla.config.vocab_size)])
    assert "gemv kernel (float32, K-major, LayerNorm fused)" in caplog.text


def test_bf16_within_dtype_tolerance():
    hf = llama_model()
    xla = dsjax.init_inference(hf, dtype="bf16", progress=False)
    pallas = dsjax.init_inference(hf, dtype="bf16", progress=False, replace_with_kernel_inject=True)
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
    """Every GEMM in a Pallas kernel (xla_gemm_rows off: the batch's rows would run XLA's)."""
    xla, pallas = _pair(make(), KernelPolicy.pallas(xla_gemm_rows=0))
    a, b = xla.embed(*inputs()), pallas.embed(*inputs())
    batch = encoders.pack_text(pallas.config, *inputs())
    kernels = pallas_calls(jax.make_jaxpr(lambda *arrays: encoders.encode_text(
        pallas.graphdef, pallas.params, *arrays))(*batch.arrays))
    assert {"matmul", "flash_attention"} <= set(kernels) <= {"matmul", "norm_matmul",
                                                             "flash_attention"}, kernels
    np.testing.assert_allclose(b.last_hidden_state, a.last_hidden_state, **TOL)
    for name in ("pooler_output", "logits", "embeds"):
        if getattr(a, name) is not None:
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), **TOL)
    if make is test_clip.clip:
        pix = test_clip.pixels()
        np.testing.assert_allclose(pallas.embed_image(pix).embeds, xla.embed_image(pix).embeds, **TOL)


def test_the_log_names_each_kernel_and_each_policy_compiles_apart(caplog):
    """Same model, two all-Pallas policies: each engine's program has its own kernels (the gemv
    at one row, or the GEMM kernel under gemv_rows=0), each logs them (replace_with_kernel_inject
    every kernel it runs, with no warning), and each gives the XLA tokens. One layer: the same
    ops (and log lines) as two, half the program to compile; a budget of 44 that no other test
    uses, so these programs are traced (and logged) here; the XLA tokens come from
    test_decoder_family[llama_gqa]'s program (its budget, with log-probabilities)."""
    hf = ONE_LAYER["llama_gqa"]()
    kw = dict(dtype="fp32", max_out_tokens=44, progress=False)
    xla = dsjax.init_inference(hf, **dict(kw, max_out_tokens=BUDGET))
    gemv = dsjax.init_inference(hf, replace_with_kernel_inject=True, **kw)
    no_gemv = dsjax.init_inference(hf, kernels=KernelPolicy.pallas(gemv_rows=0), **kw)
    assert gemv.policy == KernelPolicy.pallas()
    assert gemv.graphdef != no_gemv.graphdef  # the policy is part of the compile key
    rows = [prompt(7, 5, 96)]
    want = xla.generate(rows, max_new_tokens=6, eos_token_id=[], return_logprobs=True).sequences
    logs = {}
    for name, engine in (("no_gemv", no_gemv), ("gemv", gemv)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dsjax.ops"):  # its own program, traced now
            assert engine.generate(rows, max_new_tokens=6, eos_token_id=[]).sequences == want
        logs[name] = caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "gemv kernel" not in logs["no_gemv"] and "matmul kernel" in logs["no_gemv"]
    for kernel in ("matmul kernel (bias/activation/residual epilogue, K-major, norm in XLA first)",
                   "decode_attention kernel", "flash_attention kernel",
                   "write_kv runs the 'pallas'",
                   "gemv kernel (float32, K-major, RMSNorm fused)",  # decode: qkv, mlp.up
                   "gemv kernel (float32, K-major)",  # decode: attn.out, mlp.down, lm_head
                   "ops.norm runs the 'xla' implementation"):  # no Pallas norm: XLA, no warning
        assert kernel in logs["gemv"], kernel
    # the programs themselves: prompt GEMMs, decode gemvs (qkv, out, up, down, LM head; prompt
    # and loop), flash attention over the prompt, decode attention in the loop
    kernels = generate_kernels(gemv, rows)
    assert set(kernels) == {"matmul", "gemv", "flash_attention", "decode_attention",
                            "rotary_cache_write"}, kernels
    assert "gemv" not in generate_kernels(no_gemv, rows)


def test_prompt_gemms_run_xla_above_xla_gemm_rows(caplog):
    """Under replace_with_kernel_inject, GEMMs of more than xla_gemm_rows rows (a prompt of
    20 tokens) run XLA's GEMM over the K-major weights, said in the log; one-row decode steps
    keep the gemv; the tokens and log-probabilities are the XLA engine's."""
    xla, pallas = _pair(ONE_LAYER["llama_gqa"](), max_out_tokens=BUDGET)
    assert pallas.policy.xla_gemm_rows == 16 and pallas.policy.k_major
    rows = [prompt(11, 20, 96)]
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        _same_generation(xla, pallas, 96, rows)
    assert "ops.linear: XLA's GEMM for more than 16 rows" in caplog.text
    kernels = generate_kernels(pallas, rows, return_logprobs=True)
    assert "gemv" in kernels and "matmul" not in kernels and "norm_matmul" not in kernels


def test_per_op_choice(caplog):
    """Pallas attention with XLA GEMMs: each op logs the implementation it runs (one layer, as
    test_int8_kv_cache)."""
    hf = ONE_LAYER["llama_gqa"]()
    xla = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=BUDGET, progress=False)
    mixed = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=BUDGET, progress=False,
                                 replace_with_kernel_inject=True, kernels={"linear": "xla"})
    assert mixed.policy == KernelPolicy.pallas(linear="xla") and not mixed.policy.k_major
    with caplog.at_level(logging.INFO, logger="dsjax.ops"):
        _same_generation(xla, mixed, 96)
    assert "ops.linear runs the 'xla' implementation" in caplog.text
    assert "ops.cache_attention runs the 'pallas' implementation" in caplog.text
    assert "ops.linear: Pallas" not in caplog.text
    assert set(generate_kernels(mixed, [prompt(3, 11, 96)], return_logprobs=True)) == {
        "flash_attention", "decode_attention", "rotary_cache_write"}  # the program traced above


def test_min_split_keys_gives_decode_attention_one_split():
    """300 cache slots are 3 key blocks: 3 splits whose partials a combine step joins (three
    outputs), or, with min_split_keys=512, one split that normalizes itself (one output)."""
    hf = llama_model(num_hidden_layers=1)
    kw = dict(dtype="fp32", max_out_tokens=300, progress=False)

    def decode_outputs(policy):
        engine = dsjax.init_inference(hf, kernels=policy, **kw)
        eqns = pallas_eqns(generate_program(engine, [[1, 2, 3]]))  # traced, not compiled
        return {len(e.outvars) for e in eqns if str(e.params["name"]) == "decode_attention"}

    assert decode_outputs(KernelPolicy.pallas()) == {3}
    assert decode_outputs(KernelPolicy.pallas(min_split_keys=512)) == {1}


def test_kernels_that_do_not_exist_are_refused():
    with pytest.raises(ValueError, match="no Pallas norm kernel"):
        KernelPolicy(norm="pallas")
    with pytest.raises(ValueError, match="unknown kernels keys"):
        dsjax.init_inference("tiny-llama", kernels={"softmax": "pallas"}, progress=False)
    with pytest.raises(ValueError, match="is not one of"):
        KernelPolicy.parse({"linear": "cuda"})
