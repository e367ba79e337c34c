"""Pre-quantized HF checkpoints (dsjax.formats.compressed) against the formats' own code.

compressed-tensors checkpoints are written by the compressed-tensors package (its
calculate_qparams for the scales, ModelCompressor to compress, save_pretrained + update_config),
from one tiny LLaMA whose every parameter is perturbed; the reference is the same package's
decompression (ModelCompressor.decompress_model) loaded into the HF torch model in fp32. HF block
FP8 has no writer besides the models' producers: it is written with torch float8_e4m3fn tensors
and safetensors, and its reference is the definition W = fp8 * scale_inv per block.
"""

import copy
import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from converters.loader import CheckpointError
from dsjax.integrity import NonFiniteWeights
from dsjax.model import flatten
from dsjax.weights import QuantizedWeight
from tests.conftest import hf_greedy, hf_logits, llama_model, prompt

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: E402
    pack_to_int32, unpack_from_int32)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig, apply_quantization_config, preset_name_to_scheme)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
VOCAB = 96
PROMPTS = [prompt(1, 12), prompt(2, 12)]


@pytest.fixture(scope="module")
def base():
    return llama_model(**SHAPE)


def _observe(w, args):
    """(min, max) of a weight [N, K] per the scheme's strategy (what an observer records)."""
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    g = w.unflatten(-1, (w.shape[1] // args.group_size, args.group_size))
    return g.amin(-1), g.amax(-1)


def compressed(base, preset: str, directory):
    """Writes `base` quantized with the preset scheme (lm_head ignored) by compressed-tensors;
    returns the HF model holding the package's own decompression of it."""
    model = copy.deepcopy(base)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None:
                scale, zero = calculate_qparams(*_observe(module.weight, scheme.weights),
                                                scheme.weights)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    compressor.decompress_model(model)
    reference = copy.deepcopy(base)
    state = reference.state_dict()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if k in state})
    return reference


def act_order(base, directory):
    """An int4 act-order checkpoint: the package's int4 g128 codes with each Linear's input
    columns permuted, g_idx giving each column its group (compressed-tensors' earlier
    actorder='group' layout; the package no longer writes it). Reference: the definition,
    W'[:, k] = W[:, P[k]]."""
    reference = compressed(base, "W4A16", directory)
    tensors = load_file(directory / "model.safetensors")
    state = reference.state_dict()
    rng = np.random.default_rng(0)
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        module = name[: -len(".weight_packed")]
        shape = tensors[f"{module}.weight_shape"]
        perm = torch.from_numpy(rng.permutation(int(shape[1])))
        codes = unpack_from_int32(tensors[name], 4, shape)[:, perm].contiguous()
        tensors[name] = pack_to_int32(codes, 4)
        tensors[f"{module}.weight_g_idx"] = (perm // 128).to(torch.int32)
        state[f"{module}.weight"] = state[f"{module}.weight"][:, perm]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    _edit_config(directory, lambda q: q["config_groups"]["group_0"]["weights"].update(
        actorder="group"))
    reference.load_state_dict(state)
    return reference


def block_fp8(base, directory, block=(128, 128)):
    """An HF block-FP8 checkpoint (DeepSeek-V3 / Qwen3 FP8 layout): every Linear but lm_head as
    float8_e4m3fn [N, K] with float32 weight_scale_inv [ceil(N/bn), ceil(K/bk)]; the reference
    holds W = fp8 * scale_inv per bn x bk block (the last ones partial where they do not divide)."""
    (bn, bk), reference = block, copy.deepcopy(base)
    base.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    state = reference.state_dict()
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        w = tensors[name]
        (N, K), nb, kb = w.shape, -(-w.shape[0] // bn), -(-w.shape[1] // bk)
        padded = torch.zeros(nb * bn, kb * bk)
        padded[:N, :K] = w.abs()
        scale = padded.reshape(nb, bn, kb, bk).amax(dim=(1, 3)) / 448.0
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:N, :K]
        fp8 = (w / full).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = fp8, scale.float()
        state[name] = fp8.float() * full
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    _edit_config(directory, lambda q: None, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                             "weight_block_size": [bn, bk]})
    reference.load_state_dict(state)
    return reference


def _edit_config(directory, edit, replace=None):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if replace is not None:
        config["quantization_config"] = replace
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


# name -> (writer, the QuantizedWeight (bits, group size, symmetric, codes dtype) each layer
# kernel holds; None: dequantized at load, dense)
FP8 = np.dtype(jnp.float8_e4m3fn)
CASES = {
    "int4_g128": (lambda b, d: compressed(b, "W4A16", d), (4, 128, True, np.uint8)),
    "int4_g128_asym": (lambda b, d: compressed(b, "W4A16_ASYM", d), (4, 128, False, np.uint8)),
    "int4_act_order": (act_order, None),
    "int8_channel": (lambda b, d: compressed(b, "W8A8", d), (8, "K", True, np.int8)),
    "fp8_channel": (lambda b, d: compressed(b, "FP8_DYNAMIC", d), (8, "K", True, FP8)),
    "fp8_block_hf": (block_fp8, (8, 128, True, FP8)),
    "fp8_blocks_not_dividing_k": (lambda b, d: block_fp8(b, d, (128, 192)), None),
}


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            directory = tmp_path_factory.mktemp(name)
            made[name] = directory, CASES[name][0](base, directory)
        return made[name]
    return get


def _engine(directory):
    return dsjax.init_inference(directory, dtype="fp32", max_out_tokens=64, progress=False)


@pytest.mark.parametrize("name", CASES)
def test_matches_the_formats_own_dequantization(name, checkpoint, caplog):
    directory, reference = checkpoint(name)
    with caplog.at_level(logging.INFO, logger="dsjax"):
        engine = _engine(directory)
    params = flatten(engine.params)
    kernels = {k: v for k, v in params.items() if k.startswith("layers.") and k.endswith("kernel")}
    layout = CASES[name][1]
    for path, w in kernels.items():
        if layout is None:
            assert not isinstance(w, QuantizedWeight) and w.dtype == np.float32, path
        else:
            bits, group, symmetric, codes = layout
            assert isinstance(w, QuantizedWeight), path
            assert (w.bits, w.group_size, w.symmetric, w.values.dtype) == (
                bits, w.shape[0] if group == "K" else group, symmetric, codes), path
    assert not isinstance(params["lm_head.kernel"], QuantizedWeight)  # the config ignores it
    want = hf_logits(reference, PROMPTS)
    got = np.asarray(engine(PROMPTS))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    ours = engine.generate([PROMPTS[0]], max_new_tokens=12, eos_token_id=[]).sequences[0]
    assert ours == hf_greedy(reference, PROMPTS[0], 12)
    if name == "fp8_blocks_not_dividing_k":  # (K = 256 and 512: blocks of 192 columns)
        assert "FP8 layers" in caplog.text and "dequantized to float32" in caplog.text
    if name == "int4_act_order":
        assert "act-order layers" in caplog.text
    if name in ("int8_channel", "fp8_channel"):
        assert "quantizes input activations" in caplog.text


@pytest.mark.parametrize("name", ["int4_g128", "fp8_block_hf"])
def test_transformers_reads_the_same_weights(name, checkpoint):
    """transformers' own loading of the same directory on the CPU (it decompresses int4 and
    dequantizes FP8 there) agrees. It cannot load asymmetric int4 with compressed-tensors 0.20
    (the packed zero points' shape is refused), and for W8A8 and FP8 compressed-tensors
    checkpoints it also quantizes activations, which dsjax does not: those are compared with the
    package's decompression only."""
    directory, _ = checkpoint(name)
    want = hf_logits(transformers_model(directory), PROMPTS)
    np.testing.assert_allclose(np.asarray(_engine(directory)(PROMPTS)), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_contiguous_g_idx_maps_directly(checkpoint, tmp_path):
    """A g_idx that is k // G is contiguous grouping: the layers stay int4 QuantizedWeight."""
    def add_g_idx(tensors):
        for name in [n for n in tensors if n.endswith(".weight_packed")]:
            K = int(tensors[name.replace("_packed", "_shape")][1])
            tensors[name.replace("_packed", "_g_idx")] = (torch.arange(K) // 128).to(torch.int32)

    directory = _variant(checkpoint, tmp_path, config=lambda q: q["config_groups"]["group_0"][
        "weights"].update(actorder="group"), tensors=add_g_idx)
    layout = dsjax.sources.open_source(directory).stored_layout
    assert len(layout) == 8 and {(s.bits, s.group_size) for s in layout.values()} == {(4, 128)}


def transformers_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- bad checkpoints

def _variant(checkpoint, tmp_path, name="int4_g128", config=None, tensors=None):
    """A copy of a made checkpoint with its quantization_config and/or tensors edited."""
    src, _ = checkpoint(name)
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    if config is not None:
        _edit_config(tmp_path, config)
    if tensors is not None:
        state = load_file(tmp_path / "model.safetensors")
        tensors(state)
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


Q = "model.layers.0.self_attn.q_proj"
BAD = {
    "scale_shape": (None, lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:, :1].contiguous()}),
                    rf"{Q}.weight_scale' is float32 \(256, 1\), expected .*\(256, 2\)"),
    "weight_shape": (None, lambda t: t.update({f"{Q}.weight_shape": torch.tensor([256, -8])}),
                     rf"{Q}.weight_shape' gives the weight shape \[256, -8\]"),
    "missing_scale": (None, lambda t: t.pop(f"{Q}.weight_scale"),
                      rf"{Q}.weight_scale' is missing"),
    "format": (lambda q: q["config_groups"]["group_0"].update(format="marlin-24"), None,
               "format is 'marlin-24'"),
    "strategy": (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="token"), None,
                 "strategy is 'token'"),
    "bits": (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3), None,
             "num_bits is 3"),
    "field": (lambda q: q.update(sparsity_scheme={}), None, "sparsity_scheme: a field dsjax"),
    "method": (lambda q: q.update(quant_method="gptq"), None, "quant_method 'gptq'"),
    "ignored_but_quantized": (lambda q: q["ignore"].append(Q), None,
                              f"quantizes {Q}, which quantization_config does not"),
    "stray_codes": (None, lambda t: t.update({"model.norm.weight": torch.zeros(256, dtype=torch.int8)}),
                    "holds int8 values, but quantization_config gives it no scale"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_are_refused_before_any_weight_is_read(case, checkpoint, tmp_path):
    config, tensors, message = BAD[case]
    directory = _variant(checkpoint, tmp_path, config=config, tensors=tensors)
    with pytest.raises(CheckpointError, match=message):
        dsjax.sources.open_source(directory)


def test_fp8_without_a_quantization_config_is_refused(checkpoint, tmp_path):
    directory = _variant(checkpoint, tmp_path, name="fp8_block_hf")
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported dtype F8_E4M3"):
        dsjax.sources.open_source(directory)


def test_a_nan_fp8_code_is_named(checkpoint, tmp_path):
    """FP8 codes are floats: one NaN code (e4m3 has no inf; 0x7F is its NaN, while all-ones
    exponents with other mantissas are finite) is refused naming the weight, not NaN logits."""
    directory = _variant(checkpoint, tmp_path, name="fp8_block_hf")
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    codes = tensors[name].view(torch.uint8).clone()
    codes[3, 5] = 0x7F
    tensors[name] = codes.view(torch.float8_e4m3fn)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeights, match="layers.0.mlp.down"):
        _engine(directory)


def test_in_memory_compressed_model_names_the_way_to_read_it(checkpoint):
    """transformers keeps a compressed-tensors model compressed until its first forward pass:
    its state dict holds the stored parts, which dsjax reads from the directory instead."""
    directory, _ = checkpoint("int8_channel")
    with pytest.raises(CheckpointError, match="pass the directory"):
        dsjax.sources.open_source(transformers_model(directory))
