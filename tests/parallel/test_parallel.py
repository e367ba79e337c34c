"""Tensor and pipeline parallelism on 8 simulated CPU devices (tests/conftest.py sets them up):
greedy tokens equal HF transformers' own (and the one-device engine's) for TP 2/8, PP 4,
TP2xPP2, TP4xPP2 and data parallelism, on padded batches, for a GQA family (KV heads
replicated when fewer than tp), a parallel-residual family and every decoder family; weights
really sliced; bad degrees are clear errors before any weight is read."""

import jax
import numpy as np
import pytest
import transformers as tf

import dsjax
from dsjax.parallel.mesh import Parallel
from tests.conftest import hf_greedy, hf_logits, llama_model, prompt
from tests.converters import test_decoder_families as families

if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX starts",
                allow_module_level=True)

V = 96
ROWS = [prompt(1, 9, V), prompt(2, 3, V), prompt(3, 14, V)]  # a padded batch of three lengths
N = 10


def gqa_llama(layers=4):  # 8 query heads, 2 KV heads: replicated on 2 (tp 4) or 4 (tp 8) devices
    return llama_model(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                       num_hidden_layers=layers, intermediate_size=96)


def neox_parallel_residual():
    cls, config_cls, cfg = families.CASES["gpt_neox_parallel_rotary_quarter"]
    model = cls(config_cls(**dict(cfg, hidden_size=64, num_attention_heads=8, num_hidden_layers=2)))
    return families.perturb(model)


# (tp, pp): KV heads split (tp 2) or replicated (tp 8 on 4 devices each, tp 4 on 2 under PP);
# stages alone at PP4 (PP2 alone: test_offload.py's plain PP2 engine makes HF's tokens); NeoX's
# parallel residual under TP and PP together (its TP4 forward, at PP1, is tested below)
DEGREES = [(2, 1), (8, 1), (1, 4), (2, 2), (4, 2)]
CASES = [("llama_gqa", tp, pp) for tp, pp in DEGREES] + [("neox_parallel_residual", 4, 2)]
# llama_gqa_1l, llama_gqa_2l: the same widths in one layer a stage (PP1, PP2), for the forward,
# data-parallel, quantized-slice, int8-cache and Pallas-over-a-mesh tests (a stage's layer loop
# adds nothing there; the four-layer model's four stages run above; NeoX has one layer a stage
# at PP2): a program of more layers compiles longer, an interpreted Pallas one much longer
MODELS = {"llama_gqa": gqa_llama, "llama_gqa_1l": lambda: gqa_llama(1),
          "llama_gqa_2l": lambda: gqa_llama(2), "neox_parallel_residual": neox_parallel_residual}
_REFERENCES = {}


def one_layer_a_stage(pp: int) -> str:
    """The GQA model with one layer in each of pp stages."""
    return "llama_gqa" if pp == 4 else f"llama_gqa_{pp}l"


def reference(name):
    """The HF model and its one-device engine (built once)."""
    if name not in _REFERENCES:
        hf = MODELS[name]()
        _REFERENCES[name] = hf, dsjax.init_inference(hf, dtype="fp32", max_out_tokens=32,
                                                     progress=False)
    return _REFERENCES[name]


_GREEDY = {}


def hf_tokens(name, rows, n=N):
    """HF's greedy tokens for each row of the reference model `name` (each row computed once)."""
    hf = reference(name)[0]
    for r in rows:
        if (name, tuple(r), n) not in _GREEDY:
            _GREEDY[name, tuple(r), n] = hf_greedy(hf, r, n)
    return [_GREEDY[name, tuple(r), n] for r in rows]


def _engine(hf, tp=1, pp=1, **kw):
    return dsjax.init_inference(hf, dtype="fp32", max_out_tokens=32, progress=False,
                                tensor_parallel={"tp_size": tp},
                                pipeline_parallel={"pp_size": pp, **kw.pop("pipe", {})}, **kw)


@pytest.mark.parametrize("name,tp,pp", CASES, ids=[f"{n}-tp{t}xpp{p}" for n, t, p in CASES])
def test_greedy_tokens_equal_hf_and_one_device(name, tp, pp):
    hf, single = reference(name)
    out = _engine(hf, tp, pp).generate(ROWS, max_new_tokens=N, eos_token_id=[],
                                       return_logprobs=True)
    assert out.sequences == hf_tokens(name, ROWS)
    ref = single.generate(ROWS, max_new_tokens=N, eos_token_id=[], return_logprobs=True)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


@pytest.mark.parametrize("name,tp,pp", [("llama_gqa_2l", 2, 2), ("neox_parallel_residual", 4, 1)])
def test_forward_logits_equal_hf(name, tp, pp):
    hf, single = reference(name)
    ids = np.stack([prompt(4, 12, V), prompt(5, 12, V)])
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    got = np.asarray(_engine(hf, tp, pp)(ids, mask))
    np.testing.assert_allclose(got[0], hf_logits(hf, ids[:1])[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, np.asarray(single(ids, mask)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pipe", [{"micro_batches": 1}, {"micro_batches": 2}, {"micro_batches": 6}],
                         ids=["m1_unbatched", "m2_divides_pp4", "m6_more_than_pp"])
def test_micro_batch_counts(pipe):
    """M < P (idle ticks), M = P (the default, tested above) and M > P give the same tokens.
    (With log-probabilities: at M 2, test_offload.py's plain PP4 engine runs the same program.)"""
    hf = reference("llama_gqa")[0]
    rows = ROWS + [prompt(6, 5, V), prompt(7, 1, V)]
    out = _engine(hf, 1, 4, pipe=pipe).generate(rows, max_new_tokens=N, eos_token_id=[],
                                                return_logprobs=True)
    assert out.sequences == hf_tokens("llama_gqa", rows)


def test_data_parallel_replicas_and_eos():
    """Five rows over dp 2 x M 2 (rows 4.. on the second replica), each stopping at its own
    first occurrence of a token; sampling draws different tokens for the same prompt on either
    replica. (Two layers: one a stage.)"""
    hf = reference("llama_gqa_2l")[0]
    rows = ROWS + [prompt(9, 4, V), prompt(10, 7, V)]
    expected = hf_tokens("llama_gqa_2l", rows)
    stop = expected[4][3]
    engine = _engine(hf, 2, 2, data_parallel={"dp_size": 2})
    out = engine.generate(rows, max_new_tokens=N, eos_token_id=stop)
    assert out.sequences == [e[: e.index(stop) + 1] if stop in e else e for e in expected]
    same = [ROWS[0]] * 8  # rows 0-3 on replica 0, rows 4-7 on replica 1
    sampled = engine.generate(same, max_new_tokens=N, eos_token_id=[], do_sample=True,
                              prng_key=jax.random.key(1)).sequences
    assert sampled[0] != sampled[4] and sampled[1] != sampled[5]


# every decoder family at TP2 x PP2 (its 2-layer test config: one layer a stage); families whose
# stages would get different local-attention patterns run at TP2 alone (and error at PP2, below).
# GPT-2 and LLaMA have their own tests here; NeoX's parallel residual is in the matrix above; the
# second OPT and Qwen2 configs add nothing that tensor slicing sees.
PATTERNED = ("gpt_neo_local_window_3",)
SEEN = ("gpt_neox_parallel_rotary_quarter", "opt_pre_ln", "qwen2_sliding_top_layer")


@pytest.mark.parametrize("name", [n for n in families.CASES if n not in SEEN])
def test_every_family(name):
    hf = families.build(name)
    pp = 1 if name in PATTERNED else 2
    out = _engine(hf, 2, pp).generate(ROWS[:2], max_new_tokens=8, eos_token_id=[])
    assert out.sequences == [hf_greedy(hf, r, 8) for r in ROWS[:2]]


def test_gpt2_tied_vocab_padded_to_tp():
    """97 tokens over tp 4: the vocabulary slices are padded and the padding never sampled."""
    from tests.conftest import gpt2_model

    hf = gpt2_model(vocab_size=97)  # two layers: one a stage
    out = _engine(hf, 4, 2).generate(ROWS, max_new_tokens=N, eos_token_id=[])
    assert out.sequences == [hf_greedy(hf, r, N) for r in ROWS]


@pytest.mark.parametrize("quant", [{"bits": 8, "group_size": 16}, {"bits": 4, "group_size": 8}],
                         ids=["int8_g16", "int4_g8"])
def test_quantized_slices_equal_one_device(quant):
    """Groups that sit inside each device's rows quantize identically on one device and on TP
    (one layer: every layer's weights are sliced and quantized alike)."""
    hf = reference("llama_gqa_1l")[0]
    single = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=32, progress=False, quant=quant)
    engine = _engine(hf, 2, 1, quant=quant)
    out = engine.generate(ROWS, max_new_tokens=N, eos_token_id=[])
    assert out.sequences == single.generate(ROWS, max_new_tokens=N, eos_token_id=[]).sequences
    assert engine.num_params() == single.num_params()


def test_int8_kv_cache_and_kernel_injection():
    """The int8 cache and Pallas attention, one device and TP2 x PP2 (one layer a stage)."""
    hf = reference("llama_gqa_2l")[0]
    kw = dict(kv_cache_dtype="int8", replace_with_kernel_inject=True, kernels={"linear": "xla"})
    single = dsjax.init_inference(hf, dtype="fp32", max_out_tokens=32, progress=False, **kw)
    out = _engine(hf, 2, 2, **kw).generate(ROWS[:2], max_new_tokens=3, eos_token_id=[])
    assert out.sequences == single.generate(ROWS[:2], max_new_tokens=3, eos_token_id=[]).sequences


@pytest.mark.parametrize("tp,pp,quant", [(2, 2, None), (4, 1, {"bits": 8})],
                         ids=["tp2xpp2", "tp4_int8_kv_heads_replicated"])
def test_pallas_kernels_over_a_mesh(tp, pp, quant):
    """All-Pallas (interpret mode) over a mesh: each device transposes its own weight slice to
    the K-major layout the decode gemv reads (a column-parallel [K, N/T] slice becomes
    [N/T, K], a row-parallel [K/T, N] one [N, K/T]), one sequence runs the gemv and the decode
    attention kernel, and the tokens are HF's (int8: the XLA mesh engine's on the same codes).
    One layer a stage: each layer's slices are laid out alike."""
    from dsjax.weights import DenseWeight, QuantizedWeight
    from tests.programs import generate_kernels

    model = one_layer_a_stage(pp)
    hf = reference(model)[0]
    rows = [ROWS[0]]
    engine = _engine(hf, tp, pp, replace_with_kernel_inject=True, quant=quant)
    qkv_columns = tp * (8 // tp + 2 * max(2 // tp, 1)) * 8  # KV heads replicated at tp 4
    for name, (k, n), axis in (("attn.qkv", (64, qkv_columns), 0), ("mlp.down", (96, 64), 1)):
        w = engine.params["layers"][0][name.split(".")[0]][name.split(".")[1]]["kernel"]
        assert isinstance(w, (DenseWeight, QuantizedWeight)) and w.k_major
        assert w.values.shape == (pp, n, k)
        local = [n, k]
        local[axis] //= tp
        assert {s.data.shape for s in w.values.addressable_shards} == {(1, *local)}
    out = engine.generate(rows, max_new_tokens=N, eos_token_id=[])
    kernels = generate_kernels(engine, rows)
    assert kernels["gemv" if quant is None else "quant8_matmul"] and kernels["decode_attention"]
    if quant is None:  # HF's own tokens
        assert out.sequences == hf_tokens(model, rows)
    else:  # the XLA engine over the same per-slice int8 codes (a row-parallel slice has scales
        # of its own, so the one-device int8 engine rounds differently)
        xla = _engine(hf, tp, pp, quant=quant)
        assert out.sequences == xla.generate(rows, max_new_tokens=N, eos_token_id=[]).sequences


def test_pallas_generate_lowers_for_cuda_over_a_mesh():
    """The multi-GPU program with the GPU kernels (not their interpreter) lowers for CUDA: the
    Triton kernels inside shard_map, gemv and decode attention among them (this machine has no
    GPU; the kernels' GPU runs are in benchmarks/)."""
    import re

    engine = dsjax.init_inference("tiny-llama", dtype="bf16", max_out_tokens=32, progress=False,
                                  kernels=dsjax.KernelPolicy.pallas(interpret=False),
                                  tensor_parallel={"tp_size": 2}, pipeline_parallel={"pp_size": 2})
    fn, args, kw = engine.greedy_program([np.arange(5)], 4)
    try:
        exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args, **kw)
    except RuntimeError as e:  # JAX 0.11's Triton lowering asks the GPU for its compute capability
        if "No supported GPU devices found" not in str(e):
            raise
        pytest.skip(f"this JAX ({jax.__version__}) lowers Triton kernels only with a GPU present")
    assert exported.platforms == ("cuda",) and exported.nr_devices == 4
    names = set(re.findall(r'name = "(\w+)"', exported.mlir_module()))
    assert {"gemv", "decode_attention", "flash_attention", "rotary_cache_write"} <= names


# ----------------------------------------------------------------------------- layout

def _layer_kernels(engine):
    return {k: v for k, v in dsjax.model.flatten(engine.params).items()
            if k.startswith("layers.") and k.endswith("kernel")}


def test_each_device_holds_its_slice_of_the_weights():
    """MHA at tp 4: every layer kernel's shard is 1/4 of it, on 4 different devices; at pp 2
    each stage's layers live only on that stage's devices."""
    hf, single = reference("neox_parallel_residual")
    engine = _engine(hf, 4, 2)
    full = {k: v for k, v in dsjax.model.flatten(single.params).items()
            if k.startswith("layers.") and k.endswith("kernel")}
    per_device = {}
    for path, arr in _layer_kernels(engine).items():
        assert arr.shape[0] == 2  # [stages, ...]
        for shard in arr.addressable_shards:
            assert shard.data.shape[0] == 1
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    total = sum(v.nbytes for v in full.values())
    assert len(per_device) == 8
    assert all(b * 8 == total for b in per_device.values())  # 1/(tp * pp) of the layer kernels
    qkv = engine.params["layers"][0]["attn"]["qkv"]["kernel"]
    stage_devices = [{s.device for s in qkv.addressable_shards if s.index[0].start == st}
                     for st in (0, 1)]
    assert not stage_devices[0] & stage_devices[1]


def test_stage_stacked_arrays_keep_per_layer_weights():
    """Stage-local layer j is one [P, ...] array per weight (never [layers, ...])."""
    engine = _engine(reference("llama_gqa")[0], 1, 4)
    assert set(engine.params["layers"]) == {0}
    assert engine.params["layers"][0]["mlp"]["up"]["kernel"].shape == (4, 64, 192)


# ----------------------------------------------------------------------------- errors

ERRORS = [
    (dict(tensor_parallel={"tp_size": 3}), "does not divide the 8 attention heads"),
    (dict(tensor_parallel={"tp_size": 16}), "does not divide the 8 attention heads"),
    (dict(pipeline_parallel={"pp_size": 3}), "does not divide the 4 layers"),
    (dict(pipeline_parallel={"pp_size": 4, "micro_batches": 3}), "must divide pp_size=4"),
    (dict(tensor_parallel={"tp_size": 4}, pipeline_parallel={"pp_size": 4}), "needs 16 devices"),
    (dict(pipeline_parallel={"pp_size": 2, "stages": 2}), "unknown pipeline_parallel keys"),
    (dict(tensor_parallel=0), "tp must be a positive integer"),
    (dict(mp_size=2, tensor_parallel={"tp_size": 4}), "contradicts"),
    (dict(pipeline_parallel={"pp_size": 2, "micro_batches": 1, "offload_kv": True}),
     "needs micro_batches >= 2"),
]


@pytest.mark.parametrize("kw,message", ERRORS, ids=[m for _, m in ERRORS])
def test_bad_degrees_are_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        dsjax.init_inference(_cfg(), **kw)


def _cfg():
    from dsjax.config import ModelConfig

    return ModelConfig(family="llama", vocab_size=V, hidden_size=64, num_layers=4, num_heads=8,
                       num_kv_heads=2, intermediate_size=96, norm="rmsnorm", activation="silu",
                       gated_mlp=True, positions="rotary")


def test_kv_heads_that_do_not_divide_and_layer_patterns():
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=12,
                                            num_key_value_heads=4))
    with pytest.raises(ValueError, match="6 and the 4 KV heads do not divide"):
        _engine(hf, 6, 1)
    with pytest.raises(ValueError, match="different local-attention layer patterns"):
        _engine(families.build("gpt_neo_local_window_3"), 1, 2)
    bert = tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="encoder fits one device"):
        _engine(bert, 2, 1)


def test_parse_spellings():
    assert Parallel.parse(2, None, 2) == Parallel(tp=2, pp=2, micro_batches=2)
    assert Parallel.parse(None, 4, {"pp_size": 2, "micro_batches": 8}) == Parallel(
        tp=4, pp=2, micro_batches=8)
    assert Parallel.parse({"tp_size": 8, "enabled": False}) == Parallel()
    assert Parallel.parse(None, None, {"pp_size": 4, "micro_batches": 4, "offload_kv": True,
                                       "enabled": False}) == Parallel()
    with pytest.raises(ValueError, match="offload_kv must be True or False"):
        Parallel.parse(None, None, {"pp_size": 2, "offload_kv": "false"})


def test_cli_bench_over_a_mesh(tmp_path, monkeypatch):
    """`dsjax bench --tp --pp` runs; at TP2 its floor counts the bytes device 0 holds."""
    import json

    from dsjax import bench, cli

    # a fixed GEMV bandwidth: no figure here depends on it (test_bench.py measures it)
    monkeypatch.setattr(bench, "gemv_bandwidth", lambda: {"shape": [1, 1024, 4096],
                                                          "us_per_gemv": 1e3, "bytes_per_s": 8.4e9})
    args = ["-q", "bench", "--model", "tiny-llama", "--tp", "2", "--batch-sizes", "2",
            "--prompt-len", "4", "--new-tokens", "2", "--reps", "1", "--warmup", "1",
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "bench-tiny-llama-bf16-tp2.json").read_text())
    engine = dsjax.init_inference("tiny-llama", tensor_parallel=2, progress=False)
    dev = jax.devices()[0]
    on_dev = sum(s.data.nbytes for k, a in dsjax.model.flatten(engine.params).items()
                 if k != "embed.embedding" for s in a.addressable_shards if s.device == dev)
    assert report["rows"][0]["weight_bytes"] == on_dev
