"""GGUF files (llama.cpp's format), written here with the gguf package's own GGUFWriter and
quantizers the way llama.cpp's converter writes them, loaded by dsjax and checked against the
torch models they came from, against the same weights dequantized by gguf, and against
transformers loading the same file."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import dsjax  # noqa: E402
from converters.loader import CheckpointError  # noqa: E402
from dsjax import cli  # noqa: E402
from dsjax.model import flatten  # noqa: E402
from dsjax.quant import dequantize  # noqa: E402
from dsjax.weights import QuantizedWeight  # noqa: E402
from tests.conftest import (INIT, hf_greedy, hf_logits, perturb, prompt,  # noqa: E402
                            torch, transformers)

T = gguf.GGMLQuantizationType
VOCAB = 300
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
# HF names (after "model.") -> llama.cpp's
NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def hf_model(arch: str, hidden=64, ffn=128, seed=0, **overrides):
    """A tiny random model, every parameter perturbed (norms and biases too)."""
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=INIT,
                  bos_token_id=256 + 4, eos_token_id=256 + 5, pad_token_id=256 + 6, **overrides)
    cls, cfg = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **common, tie_word_embeddings=False)),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **common, tie_word_embeddings=True)),
        "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig(
            **common, head_dim=hidden // 4, hidden_activation="gelu_pytorch_tanh")),
    }[arch]
    torch.manual_seed(seed)
    return perturb(cls(cfg), INIT)


def gguf_name(hf: str) -> str:
    hf = hf.removeprefix("model.")
    for ours, theirs in NAMES.items():
        if hf.startswith("layers."):
            _, i, rest = hf.split(".", 2)
            if rest.startswith(ours + "."):
                return f"blk.{i}.{theirs}.{rest[len(ours) + 1:]}"
        elif hf.startswith(ours + "."):
            return theirs + hf[len(ours):]
    raise KeyError(hf)


def permute(w, heads, kv_heads):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    if kv_heads is not None and heads != kv_heads:
        heads = kv_heads
    rows = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
    return rows.swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str) -> dict:
    """{GGUF name: float32 array} as llama.cpp's converter makes them from an HF model."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = t.detach().float().numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            x = permute(x, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            x = permute(x, cfg.num_attention_heads, cfg.num_key_value_heads)
        if arch == "gemma" and name.endswith("norm.weight"):
            x = x + 1
        out[gguf_name(name)] = x
    return out


def add_tokenizer(w) -> None:
    """A byte-level BPE vocabulary of VOCAB tokens, a few merges, three specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens = [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    tokens += ["<s>", "</s>", "<pad>"]
    types = [1] * len(tokens[:-3]) + [3, 3, 3]
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    types += [5] * (VOCAB - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(260)
    w.add_eos_token_id(261)
    w.add_pad_token_id(262)
    w.add_chat_template(TEMPLATE)


def write_gguf(path, model, arch: str, qtype=T.F32, raw: dict | None = None, skip=(),
               meta: dict | None = None, extra: dict | None = None):
    """model as a GGUF file: 2-D weights (the embedding too) in qtype, norms and biases F32;
    raw {name: (uint8 bytes, type)} replaces tensors; meta overrides {key: value} (ints, floats,
    strings);
    extra {name: float32 array} adds tensors."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    meta = {"block_count": cfg.num_hidden_layers, "context_length": 256,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads,
            "attention.head_count_kv": cfg.num_key_value_heads, **(meta or {})}
    for key, value in meta.items():
        add = {str: w.add_string, float: w.add_float32}.get(type(value), w.add_uint32)
        add(f"{arch}.{key}", value)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if arch == "gemma":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    else:
        w.add_rope_dimension_count(head_dim)
    add_tokenizer(w)
    for name, x in {**gguf_tensors(model, arch), **(extra or {})}.items():
        if name in skip:
            continue
        if raw and name in raw:
            data, kind = raw[name]
            w.add_tensor(name, data, raw_dtype=kind)
        elif x.ndim == 2 and qtype != T.F32:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized_model(model, path, arch: str):
    """A copy of model holding the file's weights as gguf dequantizes them (Q/K permuted back,
    Gemma's norms - 1): the reference for a quantized file."""
    import copy

    ref = copy.deepcopy(model)
    cfg = ref.config
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    state = {}
    for name in ref.state_dict():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = tensors[gguf_name(name)]
        x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if arch == "llama" and ".q_proj." in name:
            x = unpermute(x, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            x = unpermute(x, cfg.num_key_value_heads)
        if arch == "gemma" and name.endswith("norm.weight"):
            x = x - 1
        state[name] = torch.from_numpy(np.array(x))
    ref.load_state_dict(state, strict=False)
    return ref


def unpermute(w, heads):
    rows = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
    return rows.swapaxes(1, 2).reshape(w.shape)


IDS = [prompt(s, 8, VOCAB) for s in (1, 2)]


# ----------------------------------------------------------------------------- F32: the HF model

@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma"])
def f32_case(request, tmp_path_factory):
    arch = request.param
    model = hf_model(arch)
    path = write_gguf(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", model, arch)
    return arch, model, path, dsjax.init_inference(str(path), dtype="fp32", progress=False)


def test_f32_file_matches_the_hf_model(f32_case):
    arch, model, _, engine = f32_case
    np.testing.assert_allclose(np.asarray(engine(np.array(IDS))), hf_logits(model, IDS),
                               atol=1e-4, rtol=1e-4)
    assert engine.config.family == arch
    assert engine.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_tokenizer_and_special_tokens_come_through(f32_case):
    _, _, path, engine = f32_case
    tok = engine.tokenizer
    assert tok.convert_ids_to_tokens(tok.encode(" the thin")) == ["Ġthe", "Ġt", "h", "in"]
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(path.parent),
                                                                  gguf_file=path.name)
    assert tok.encode("in the thing") == theirs.encode("in the thing")
    assert tok.chat_template == TEMPLATE
    assert "<s>user: hi</s>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                        tokenize=False)
    assert engine.eos_token_id == [261] and engine.pad_token_id == 262


def llama3_factors(cfg) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it for a llama3 rope scaling."""
    rs, dim = cfg.rope_parameters, cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (rs["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old = rs["original_max_position_embeddings"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    out = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(rs["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_factors(tmp_path):
    model = hf_model("llama", seed=4, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192, rope_theta=10000.0))
    factors = llama3_factors(model.config)
    assert 1 < len(set(factors.tolist())) < len(factors)  # kept, scaled and in between
    path = write_gguf(tmp_path / "l3.gguf", model, "llama", extra={"rope_freqs.weight": factors})
    engine = dsjax.init_inference(str(path), dtype="fp32", progress=False)
    assert engine.config.rope_scaling.kind == "llama3" and engine.config.rope_scaling.factor == 8
    np.testing.assert_allclose(np.asarray(engine(np.array(IDS))), hf_logits(model, IDS),
                               atol=1e-4, rtol=1e-4)
    path = write_gguf(tmp_path / "long.gguf", model, "llama",
                      extra={"rope_freqs.weight": np.ones(4096, np.float32)})
    with pytest.raises(CheckpointError, match=r"long\.gguf: rope_freqs\.weight has shape \[4096\]"):
        dsjax.init_inference(str(path), progress=False)
    factors[0] = 3.0  # no Llama 3 scaling gives this
    path = write_gguf(tmp_path / "bad.gguf", model, "llama", extra={"rope_freqs.weight": factors})
    with pytest.raises(CheckpointError, match=r"bad\.gguf: rope_freqs\.weight holds rotary"):
        dsjax.init_inference(str(path), progress=False)


def test_linear_rope_factor_without_its_type(tmp_path):
    """llama.cpp reads a missing {arch}.rope.scaling.type as "linear": a factor alone (or under
    the older key rope.scale_linear) scales the positions; type "none" turns it off."""
    model = hf_model("llama", seed=5, rope_scaling=dict(rope_type="linear", factor=4.0,
                                                        rope_theta=10000.0))
    for key in ("rope.scaling.factor", "rope.scale_linear"):
        path = write_gguf(tmp_path / f"{key}.gguf", model, "llama", meta={key: 4.0})
        engine = dsjax.init_inference(str(path), dtype="fp32", progress=False)
        assert engine.config.rope_scaling.kind == "linear", key
        assert engine.config.rope_scaling.factor == 4, key
        np.testing.assert_allclose(np.asarray(engine(np.array(IDS))), hf_logits(model, IDS),
                                   atol=1e-4, rtol=1e-4, err_msg=key)
    path = write_gguf(tmp_path / "none.gguf", model, "llama",
                      meta={"rope.scaling.type": "none", "rope.scaling.factor": 4.0})
    engine = dsjax.init_inference(str(path), dtype="fp32", progress=False)
    assert engine.config.rope_scaling is None
    path = write_gguf(tmp_path / "both.gguf", model, "llama", meta={"rope.scaling.factor": 4.0},
                      extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(CheckpointError, match=r"both\.gguf: .*rope_freqs\.weight"):
        dsjax.init_inference(str(path), progress=False)


# ----------------------------------------------------------------------------- quantized files

QUANTS = {T.Q8_0: (8, True), T.Q4_0: (4, True), T.Q4_1: (4, False)}
# Gemma: a tied head (the dequantized embedding), norms stored + 1; transformers reads no Gemma
# GGUF, so there the reference is the HF model holding gguf's dequantized weights alone
CASES = [("llama", T.Q8_0), ("llama", T.Q4_0), ("llama", T.Q4_1), ("gemma", T.Q4_0)]


@pytest.fixture(scope="module")
def quant_cases(tmp_path_factory):
    """(arch, qtype) -> (arch, qtype, model, file, engine), each made once."""
    made = {}

    def case(arch, qtype):
        if (arch, qtype) not in made:
            model = hf_model(arch, seed=1)
            path = tmp_path_factory.mktemp(f"{arch}-{qtype.name}") / "m.gguf"
            write_gguf(path, model, arch, qtype)
            engine = dsjax.init_inference(str(path), dtype="fp32", progress=False)
            made[arch, qtype] = arch, qtype, model, path, engine
        return made[arch, qtype]
    return case


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1].name}")
def quant_case(request, quant_cases):
    return quant_cases(*request.param)


def test_quantized_file_matches_its_dequantized_weights(quant_case):
    arch, qtype, model, path, engine = quant_case
    ref = dequantized_model(model, path, arch)
    ours = np.asarray(engine(np.array(IDS)))
    # Q4_1's (u - z) d rounds apart from gguf's u d + m by an ulp of some weights, which these
    # wide random weights amplify to ~1e-5 of the logits' range
    tol = dict(atol=1e-4 if QUANTS[qtype][1] else 3e-4, rtol=1e-4)
    np.testing.assert_allclose(ours, hf_logits(ref, IDS), **tol)
    if arch != "gemma":
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        np.testing.assert_allclose(ours, hf_logits(hf, IDS), **tol)
    p = IDS[0]
    ours = engine.generate([p], max_new_tokens=12, eos_token_id=[]).sequences[0]
    assert ours == hf_greedy(ref, p, 12)


def test_quantized_layers_stay_quantized(quant_case):
    arch, qtype, _, _, engine = quant_case
    bits, symmetric = QUANTS[qtype]
    flat = flatten(engine.runner.stored_params())
    paths = ["layers.0.attn.qkv.kernel", "layers.1.mlp.up.kernel", "layers.1.mlp.down.kernel"]
    for path in paths + (["lm_head.kernel"] if arch == "llama" else []):
        w = flat[path]
        assert isinstance(w, QuantizedWeight), path
        assert (w.bits, w.group_size, w.symmetric) == (bits, 32, symmetric), path
    assert not isinstance(flat["embed.embedding"], QuantizedWeight)


def test_q4_1_zero_points_are_fractional(quant_cases):
    """W = q d + m is (q - z) d with z = -m / d, which is no integer: dsjax's dequantize (and
    matmuls: tests/pallas_kernels/test_quant_matmul.py) take it as it is."""
    _, _, _, path, engine = quant_cases("llama", T.Q4_1)
    w = flatten(engine.runner.stored_params())["layers.0.mlp.down.kernel"]
    assert np.any(np.asarray(w.zeros) % 1)
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    want = gguf.quants.dequantize(t.data, t.tensor_type).T
    np.testing.assert_allclose(np.asarray(dequantize(w)), want, rtol=1e-6, atol=1e-6)


def test_convert_round_trip(quant_cases, tmp_path):
    _, _, _, path, engine = quant_cases("llama", T.Q4_1)
    out = tmp_path / "ds"
    assert cli.main(["-q", "convert", str(path), str(out), "--dtype", "fp32"]) == 0
    back = dsjax.init_inference(str(out), dtype="fp32", progress=False)
    ours, theirs = flatten(engine.runner.stored_params()), flatten(back.runner.stored_params())
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        for a, b in zip(jax.tree.leaves(ours[k]), jax.tree.leaves(theirs[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
        assert type(ours[k]) is type(theirs[k])
    np.testing.assert_array_equal(np.asarray(back(np.array(IDS))),
                                  np.asarray(engine(np.array(IDS))))
    assert back.tokenizer.chat_template == TEMPLATE
    assert back.tokenizer.encode("the thin") == engine.tokenizer.encode("the thin")
    with pytest.raises(ValueError, match="cannot be re-quantized"):
        dsjax.init_inference(str(out), quant={"bits": 8}, progress=False)


def test_quant_and_parallelism_are_refused(quant_cases):
    _, _, _, path, _ = quant_cases("llama", T.Q8_0)
    with pytest.raises(ValueError, match="cannot be re-quantized"):
        dsjax.init_inference(str(path), quant={"bits": 8}, progress=False)
    with pytest.raises(ValueError, match="cannot be re-quantized"):
        dsjax.init_inference(str(path), dtype="int8", progress=False)
    with pytest.raises(ValueError, match="stores quantized weights"):
        dsjax.init_inference(str(path), tensor_parallel={"tp_size": 2}, progress=False)


# ----------------------------------------------------------------------------- K-quants

def random_blocks(kind, rows: int, cols: int, seed=0) -> np.ndarray:
    """Random bytes of `kind` blocks for a [rows, cols] weight, each fp16 scale small and finite."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = {T.Q6_K: [size - 2], T.Q4_K: [0, 2]}[kind]  # where each block keeps its fp16s
    for at in halves:
        raw[..., at:at + 2] = rng.uniform(0.001, 0.01, raw.shape[:2] + (1,)).astype(
            np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def test_k_quants_are_dequantized_exactly(tmp_path, caplog):
    model = hf_model("llama", hidden=256, ffn=256, seed=2)
    v = random_blocks(T.Q6_K, 128, 256)
    down = random_blocks(T.Q4_K, 256, 256, seed=1)
    path = write_gguf(tmp_path / "k.gguf", model, "llama", T.Q8_0,
                      raw={"blk.0.attn_v.weight": (v, T.Q6_K),
                           "blk.1.ffn_down.weight": (down, T.Q4_K)})
    with caplog.at_level(logging.INFO, logger="dsjax"):
        engine = dsjax.init_inference(str(path), dtype="fp32", progress=False)
    lines = [r.getMessage() for r in caplog.records if "dequantized" in r.getMessage()]
    assert len(lines) == 1
    assert "blk.*.attn_v.weight (Q6_K)" in lines[0] and "blk.*.ffn_down.weight (Q4_K)" in lines[0]
    assert "token_embd.weight (Q8_0): the embedding lookup reads a dense table" in lines[0]
    flat = flatten(engine.runner.stored_params())
    qkv, down_w = flat["layers.0.attn.qkv.kernel"], flat["layers.1.mlp.down.kernel"]
    assert not isinstance(qkv, QuantizedWeight) and not isinstance(down_w, QuantizedWeight)
    np.testing.assert_array_equal(np.asarray(qkv)[:, 256 + 128:],
                                  gguf.quants.dequantize(v, T.Q6_K).T)
    np.testing.assert_array_equal(np.asarray(down_w), gguf.quants.dequantize(down, T.Q4_K).T)
    assert isinstance(flat["layers.1.attn.qkv.kernel"], QuantizedWeight)
