"""Bad checkpoints raise errors that name the problem, before any weight is converted."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dsjax
from converters import CheckpointError
from tests.conftest import edit_safetensors_header, gpt2_model


@pytest.fixture()
def gpt2_dir(tmp_path):
    gpt2_model().save_pretrained(tmp_path)
    return tmp_path


def _edit(directory, fn):
    tensors = load_file(directory / "model.safetensors")
    fn(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="unknown architecture: model_type 'mamba'"):
        dsjax.init_inference(tmp_path)


def test_unsupported_head_class(gpt2_dir):
    cfg = json.loads((gpt2_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2ForSequenceClassification"]
    (gpt2_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GPT2ForSequenceClassification"):
        dsjax.init_inference(gpt2_dir)


def test_unsupported_config_option(gpt2_dir):
    cfg = json.loads((gpt2_dir / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (gpt2_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        dsjax.init_inference(gpt2_dir)


def test_missing_tensor(gpt2_dir):
    _edit(gpt2_dir, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing.*transformer\.h\.1\.mlp\.c_fc\.bias"):
        dsjax.init_inference(gpt2_dir, progress=False)


def test_unexpected_tensor(gpt2_dir):
    _edit(gpt2_dir, lambda t: t.update({"transformer.h.0.attn.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"does not know.*transformer\.h\.0\.attn\.extra\.weight"):
        dsjax.init_inference(gpt2_dir, progress=False)


def test_misshaped_tensor(gpt2_dir):
    _edit(gpt2_dir, lambda t: t.update({"transformer.h.0.attn.c_proj.weight": np.zeros((32, 31), np.float32)}))
    with pytest.raises(CheckpointError, match=r"c_proj\.weight gives shape \(32, 31\).*\(32, 32\)"):
        dsjax.init_inference(gpt2_dir, progress=False)


def test_missing_shard(tmp_path):
    gpt2_model().save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        dsjax.init_inference(tmp_path, progress=False)


def _moved_to_start(header, name):
    """name's byte span moved to offset 0, where another tensor lives: same length, overlapping."""
    start, end = header[name]["data_offsets"]
    assert start > 0
    return [0, end - start]


@pytest.mark.parametrize("mutate,match", [
    (lambda h: h["transformer.wte.weight"].update(data_offsets=[0, 10 ** 12]), "outside"),
    (lambda h: h["transformer.wte.weight"].update(shape=[96, 33]), "needs .* bytes"),
    (lambda h: h["transformer.wte.weight"].update(dtype="F128"), "malformed"),
    (lambda h: h["transformer.wpe.weight"].update(data_offsets=_moved_to_start(h, "transformer.wpe.weight")),
     "overlap"),
])
def test_corrupt_safetensors_header(gpt2_dir, mutate, match):
    edit_safetensors_header(gpt2_dir / "model.safetensors", mutate)
    with pytest.raises(CheckpointError, match=match):
        dsjax.init_inference(gpt2_dir, progress=False)


def test_truncated_file(gpt2_dir):
    (gpt2_dir / "model.safetensors").write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        dsjax.init_inference(gpt2_dir, progress=False)


def test_pickled_bin_is_read_weights_only(tmp_path):
    import torch

    model = gpt2_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    engine = dsjax.init_inference(tmp_path, dtype="fp32", max_out_tokens=64, progress=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    np.testing.assert_allclose(np.asarray(engine(ids.numpy())), ref, atol=1e-4, rtol=1e-4)
