"""Sparse-expert (MoE) families against HF transformers' torch models, every parameter (router,
experts, shared expert and its gate) perturbed: the decoder families' tests (imported below, run
here on these models: logits, 32 greedy tokens with their log-probabilities, padded batches, a
saved checkpoint directory, whose experts are stored one tensor each, through the CLI), the
serving engine, the expert op against a plain loop, and the clear refusals."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import dsjax
from dsjax import ops
from dsjax.policy import KernelPolicy
from dsjax.quant import QuantSpec, dequantize
from dsjax.quant.weights import quantize_any
from dsjax.weights import QuantizedWeight, is_weight
from dsjax.serving.engine import ServingEngine
from tests.conftest import hf_greedy, hf_logits, prompt
from tests.converters import test_decoder_families as families
from tests.converters.test_decoder_families import (  # noqa: F401 (collected here)
    SMALL, V, test_32_greedy_tokens_through_the_cache, test_checkpoint_directory_and_cli_generate,
    test_family_is_recognised, test_left_padded_batch_equals_each_prompt,
    test_left_padded_logits_match_hf, test_logits_match_hf)

BASE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, **SMALL)
CASES = {
    # softmax top-2 of 4 experts, renormalized
    "mixtral_top2_of_4": (tf.MixtralForCausalLM, tf.MixtralConfig, dict(
        BASE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    # top-3 of 6 without renormalization, a sigmoid-gated shared expert, layer 1 dense
    "qwen2_moe_shared_dense_layer": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig, dict(
        BASE, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36,
        num_experts=6, num_experts_per_tok=3, mlp_only_layers=[1])),
    # q/k RMSNorm per head, renormalized top-2 of 4, every other layer sparse
    "qwen3_moe_qk_norm_sparse_step_2": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, dict(
        BASE, intermediate_size=40, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2)),
    # q/k RMSNorm over the whole projections, top-2 of 4 not renormalized
    "olmoe_full_qk_norm": (tf.OlmoeForCausalLM, tf.OlmoeConfig, dict(
        BASE, intermediate_size=24, num_experts=4, num_experts_per_tok=2)),
}


build = functools.partial(families.build, cases=CASES)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    return families.make_pair(request.param, CASES)


def test_config_reads_the_routing(pair):
    name, _, engine = pair
    moe = engine.config.moe
    want = {"mixtral": (4, 2, True, 0, None, "none"), "qwen2_moe": (6, 3, False, 36, (0, 2), "none"),
            "qwen3_moe": (4, 2, True, 0, (1,), "head"), "olmoe": (4, 2, False, 0, None, "full")}
    got = (moe.num_experts, moe.top_k, moe.norm_topk, moe.shared_size, moe.layers,
           engine.config.qk_norm)
    assert got == want[engine.config.family]


def test_serving_engine_equals_generate(pair):
    _, _, engine = pair
    prompts = [prompt(20 + i, 3 + 4 * i, V) for i in range(4)]
    outs = ServingEngine(engine, block_size=4, num_blocks=64, token_budget=16).generate(
        prompts, max_new_tokens=8, eos_token_id=[])
    for out, p in zip(outs, prompts):
        want = engine.generate([p], max_new_tokens=8, eos_token_id=[], return_logprobs=True)
        assert out.token_ids == want.sequences[0]
        np.testing.assert_allclose(out.logprobs, want.logprobs[0][:8], atol=1e-4)  # (fp32 sums
        # of expert outputs: a one-row generate and the flat batch round apart by ~2e-5)


def test_expert_op_equals_a_loop_over_tokens():
    """ops.experts against each token's picks computed one by one, with an expert that gets no
    token, and with every token on one expert."""
    rng = np.random.default_rng(0)
    N, D, I, E, k = 7, 8, 6, 4, 2
    x = rng.normal(size=(N, D)).astype(np.float32)
    up, down = rng.normal(size=(E, D, 2 * I)), rng.normal(size=(E, I, D))
    up, down = up.astype(np.float32), down.astype(np.float32)
    w = rng.uniform(size=(N, k)).astype(np.float32)

    def loop(picks):
        out = np.zeros((N, D))
        for n in range(N):
            for j in range(k):
                if picks[n, j] < 0:
                    continue
                h = x[n] @ up[picks[n, j]]
                g, u = h[:I], h[I:]
                out[n] += w[n, j] * ((g / (1 + np.exp(-g))) * u) @ down[picks[n, j]]
        return out
    spread = np.array([[0, 2], [2, 0], [1, 2], [0, 1], [2, 1], [1, 0], [0, 2]])  # expert 3 idle
    pile = np.zeros((N, k), np.int64)  # every pick on expert 0 (twice per token)
    none = np.where(spread == 2, -1, spread)  # -1: a row no expert takes (contributes 0)
    for picks in (spread, pile, none):
        for policy in (KernelPolicy(), KernelPolicy(expert_slice_rows=N * k)):  # ragged, sliced
            got = ops.experts(jnp.asarray(x), jnp.asarray(up), jnp.asarray(down),
                              jnp.asarray(picks), jnp.asarray(w), activation="silu",
                              policy=policy)
            np.testing.assert_allclose(np.asarray(got), loop(picks), rtol=2e-5, atol=2e-5)


def test_sliced_experts_take_quantized_stacks_and_bf16():
    """The per-row sliced path equals ragged_dot's for int4 stacks (sliced part by part, then
    dequantized) and in bf16."""
    rng = np.random.default_rng(1)
    N, D, I, E, k = 3, 32, 16, 4, 2
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    up = jnp.asarray(rng.normal(size=(E, D, 2 * I)) / 6, jnp.float32)
    down = jnp.asarray(rng.normal(size=(E, I, D)) / 4, jnp.float32)
    picks, w = jnp.asarray([[3, 1], [1, -1], [0, 3]]), jnp.asarray(rng.uniform(size=(N, k)))
    q = QuantSpec(bits=4, group_size=8, symmetric=False)
    cases = [(x, quantize_any(up, q), quantize_any(down, q), 1e-5),
             (x.astype(jnp.bfloat16), up.astype(jnp.bfloat16), down.astype(jnp.bfloat16), 2e-2)]
    for xs, us, ds, tol in cases:
        want = ops.experts_xla(xs, us, ds, picks, w.astype(xs.dtype), activation="silu")
        got = ops.experts_sliced(xs, us, ds, picks, w.astype(xs.dtype), activation="silu")
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tol, atol=tol)


EIGHT = {"mixtral_top2_of_8": (tf.MixtralForCausalLM, tf.MixtralConfig, dict(
    CASES["mixtral_top2_of_4"][2], num_local_experts=8))}


@pytest.mark.parametrize("name, opts", [
    ("mixtral_top2_of_4", dict(expert_parallel=2)),
    ("mixtral_top2_of_4", dict(moe={"ep_size": 4, "moe_experts": [4]})),  # DeepSpeed's spelling
    ("mixtral_top2_of_8", dict(expert_parallel=8)),
    ("mixtral_top2_of_4", dict(tensor_parallel=2)),  # every expert sliced over 2 devices
    ("qwen2_moe_shared_dense_layer", dict(expert_parallel=2, tensor_parallel=2)),
], ids=["ep2", "ep4", "ep8", "tp2", "qwen2_moe_ep2xtp2"])
def test_expert_parallel_equals_hf(name, opts):
    """Experts spread over the replicas (all-to-all), sliced over tensor slices, or both, on
    simulated devices: HF's greedy tokens for a batch of two, HF's logits."""
    model = families.build(name, cases={**CASES, **EIGHT})
    mesh = dsjax.init_inference(model, dtype="fp32", max_out_tokens=64, progress=False, **opts)
    ep = mesh.plan.par.ep
    up = mesh.params["layers"][0]["mlp"]["experts_up"]
    assert up.addressable_shards[0].data.shape[1] == mesh.config.moe.num_experts // ep
    prompts = [prompt(3, 11, V), prompt(4, 5, V)]
    assert mesh.generate(prompts, max_new_tokens=8, eos_token_id=[]).sequences == [
        hf_greedy(model, p, 8) for p in prompts]
    np.testing.assert_allclose(np.asarray(mesh(prompts[:1])), hf_logits(model, prompts[:1]),
                               atol=1e-4, rtol=1e-4)
    if ep == 2 and mesh.plan.par.tp == 1:  # the serving engine over the same mesh
        fn, args, kw = mesh.greedy_program(prompts, 8)  # (no collective over the 1-device tp)
        assert "replica_groups={{0},{1}}" not in fn.lower(*args, **kw).compile().as_text()
        outs = ServingEngine(mesh, block_size=4, num_blocks=32, token_budget=16).generate(
            prompts, max_new_tokens=8, eos_token_id=[])
        assert [o.token_ids for o in outs] == [hf_greedy(model, p, 8) for p in prompts]


def test_unsupported_combinations_are_refused():
    model = build("mixtral_top2_of_4")
    dense = families.build("qwen2_qkv_bias_gqa")
    refused = [(model, dict(quant={"bits": 8}, expert_parallel=2), "quantized on one device"),
               (model, dict(expert_parallel=3), "does not divide the 4 experts"),
               (model, dict(expert_parallel=2, data_parallel=4), "must equal dp_size"),
               (model, dict(pipeline_parallel=2), "pipeline stages"),
               (model, dict(moe={"ep_size": 2, "moe_experts": [8]}), "moe_experts"),
               (dense, dict(expert_parallel=2), "has no experts")]
    for hf, opts, match in refused:
        with pytest.raises(ValueError, match=match):
            dsjax.init_inference(hf, dtype="fp32", progress=False, **opts)
    with pytest.raises(ValueError, match="top_k"):
        dsjax.config.MoEConfig(num_experts=2, top_k=3, expert_size=4)


@pytest.mark.parametrize("pair", ["mixtral_top2_of_4"], indirect=True)  # (one family: the
@pytest.mark.parametrize("kernels, logged", [({"experts": "pallas"}, "grouped GEMM"),
                                             ({"expert_slice_rows": 2}, "expert's slice")])
def test_other_expert_paths_equal_xla(pair, kernels, logged, caplog):  # kernel does not depend on it)
    """The grouped GEMM (interpreted on the CPU), and the per-row expert slices on decode steps
    (2 rows: one token's top-2), give the ragged_dot path's greedy tokens and
    log-probabilities, and the log says they ran."""
    _, model, engine = pair
    with caplog.at_level("INFO", logger="dsjax"):
        other = dsjax.init_inference(model, dtype="fp32", max_out_tokens=64, progress=False,
                                     kernels=kernels)
        p = prompt(30, 9, V)
        got = other.generate([p], max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    want = engine.generate([p], max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    assert got.sequences == want.sequences
    np.testing.assert_allclose(got.logprobs[0][:6], want.logprobs[0][:6], atol=2e-4)
    assert any(logged in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("pair", ["qwen2_moe_shared_dense_layer"], indirect=True)
def test_quantized_experts_equal_their_dequantized_weights(pair, tmp_path):
    """quant= quantizes the experts too (each expert its own groups; the router and the shared
    expert stay in the weights' dtype): an asymmetric int4 engine gives the logits and
    greedy tokens of an fp32 engine of their weights dequantized, in generate and serving; a
    saved quantized checkpoint loads back the same."""
    _, model, _ = pair
    ids = [prompt(40, 12, V), prompt(41, 7, V)]
    for quant in ({"bits": 4, "group_size": 4, "symmetric": False},):  # (int8 experts: the
        # kernel tests and test_pallas_quantized_experts_equal_xla)
        q = dsjax.init_inference(model, dtype="fp32", max_out_tokens=64, progress=False,
                                 quant=quant)
        stored = q.runner.stored_params()
        flat = dsjax.model.flatten(stored)
        assert isinstance(flat["layers.0.mlp.experts_up"], QuantizedWeight)
        assert not isinstance(flat["layers.0.mlp.router.kernel"], QuantizedWeight)
        dense = dsjax.build_engine(
            q.config, jax.tree.map(lambda w: dequantize(w) if isinstance(w, QuantizedWeight)
                                   else w, stored, is_leaf=is_weight),
            inference=dataclasses.replace(q.inference_config, quant=None))
        np.testing.assert_allclose(np.asarray(q(ids[:1])), np.asarray(dense(ids[:1])),
                                   atol=1e-4, rtol=1e-4)
        want = [dense.generate([p], max_new_tokens=8, eos_token_id=[]).sequences[0] for p in ids]
        assert [q.generate([p], max_new_tokens=8, eos_token_id=[]).sequences[0]
                for p in ids] == want
    outs = ServingEngine(q, block_size=4, num_blocks=32, token_budget=16).generate(
        ids, max_new_tokens=8, eos_token_id=[])
    assert [o.token_ids for o in outs] == want
    back = dsjax.init_inference(q.save(tmp_path / "int4"), dtype="fp32", max_out_tokens=64,
                                progress=False)
    np.testing.assert_array_equal(np.asarray(back(ids[:1])), np.asarray(q(ids[:1])))


@pytest.mark.parametrize("pair", ["mixtral_top2_of_4"], indirect=True)
def test_pallas_quantized_experts_equal_xla(pair, caplog):
    """int8 experts through the grouped GEMM (interpreted) give the XLA path's greedy tokens."""
    _, model, _ = pair
    kw = dict(dtype="fp32", max_out_tokens=64, progress=False, quant={"bits": 8, "group_size": 16})
    p = prompt(42, 9, V)
    with caplog.at_level("INFO", logger="dsjax"):
        got = dsjax.init_inference(model, kernels={"experts": "pallas"}, **kw).generate(
            [p], max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    want = dsjax.init_inference(model, **kw).generate([p], max_new_tokens=6, eos_token_id=[],
                                                      return_logprobs=True)
    assert got.sequences == want.sequences
    np.testing.assert_allclose(got.logprobs[0][:6], want.logprobs[0][:6], atol=2e-4)
    assert any("grouped GEMM over 4 experts (int8 groups of 16" in r.getMessage()
               for r in caplog.records)
