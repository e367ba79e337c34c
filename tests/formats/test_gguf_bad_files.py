"""GGUF files that are malformed or describe what dsjax cannot run: each refused before any
tensor is used, with an error naming the file (files written as in test_gguf.py, then broken)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import dsjax  # noqa: E402
from converters.loader import CheckpointError  # noqa: E402
from tests.formats.test_gguf import T, gguf_tensors, hf_model, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    model = hf_model("llama", seed=3)
    return model, write_gguf(tmp_path_factory.mktemp("good") / "good.gguf", model, "llama", T.Q8_0)


def test_bad_magic_and_truncation(good_file, tmp_path):
    _, path = good_file
    raw = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + raw[4:])
    with pytest.raises(CheckpointError, match=r"bad\.gguf: is not a GGUF file"):
        dsjax.init_inference(str(bad), progress=False)
    for keep in (20, 2000, len(raw) - 100):  # inside the header, the metadata, the tensor data
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(raw[:keep])
        with pytest.raises(CheckpointError, match=rf"cut{keep}\.gguf: .*truncated"):
            dsjax.init_inference(str(cut), progress=False)


def test_unsupported_type_is_named(good_file, tmp_path):
    model, _ = good_file
    kind = T.Q8_1  # a type gguf.quants cannot dequantize
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = np.zeros((128, 64 // block * size), np.uint8)
    path = write_gguf(tmp_path / "u.gguf", model, "llama", raw={"blk.1.ffn_up.weight": (raw, kind)})
    with pytest.raises(CheckpointError, match=r"u\.gguf: tensor 'blk\.1\.ffn_up\.weight' is stored "
                                              r"as Q8_1"):
        dsjax.init_inference(str(path), progress=False)


def test_missing_tensor_and_shape_mismatch(good_file, tmp_path):
    model, _ = good_file
    path = write_gguf(tmp_path / "m.gguf", model, "llama", skip=("blk.1.attn_k.weight",))
    with pytest.raises(CheckpointError, match=r"m\.gguf: .*missing, e\.g\. 'blk\.1\.attn_k\."):
        dsjax.init_inference(str(path), progress=False)
    path = write_gguf(tmp_path / "s.gguf", model, "llama", meta={"feed_forward_length": 96})
    with pytest.raises(CheckpointError, match=r"s\.gguf: .*ffn_gate\.weight.*shape"):
        dsjax.init_inference(str(path), progress=False)


def test_unknown_architecture_and_block_count(good_file, tmp_path):
    model, path = good_file
    raw = path.read_bytes()
    other = tmp_path / "a.gguf"  # "llama" -> "llamb" everywhere: architecture and its keys
    other.write_bytes(raw.replace(b"llama", b"llamb"))
    with pytest.raises(CheckpointError, match=r"a\.gguf: general\.architecture 'llamb' is not"):
        dsjax.init_inference(str(other), progress=False)
    # blk.0.ffn_up [ne0=64, ne1=128] Q8_0 -> ne0 = 48: not a whole number of 32-value blocks
    name = b"blk.0.ffn_up.weight"
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4
    assert struct.unpack("<Q", raw[at:at + 8])[0] == 64
    odd = tmp_path / "b.gguf"
    odd.write_bytes(raw[:at] + struct.pack("<Q", 48) + raw[at + 8:])
    with pytest.raises(CheckpointError, match=r"b\.gguf: .*(blocks|multiple)"):
        dsjax.init_inference(str(odd), progress=False)


def test_non_finite_scale_is_named(good_file, tmp_path):
    model, _ = good_file
    x = gguf_tensors(model, "llama")["blk.1.ffn_down.weight"]
    blocks = gguf.quants.quantize(x, T.Q8_0).reshape(x.shape[0], -1, 34)
    blocks[3, 1, :2] = np.array([np.inf], np.float16).view(np.uint8)  # one block's d
    path = write_gguf(tmp_path / "n.gguf", model, "llama", T.Q8_0,
                      raw={"blk.1.ffn_down.weight": (blocks.reshape(x.shape[0], -1), T.Q8_0)})
    with pytest.raises(ValueError, match=r"n\.gguf: weight 'layers\.1\.mlp\.down\.kernel'"):
        dsjax.init_inference(str(path), progress=False)


def test_metadata_of_the_wrong_type_is_named(good_file, tmp_path):
    model, _ = good_file
    for key, value, field in [("embedding_length", "64", "hidden_size"),
                              ("attention.head_count", 4.0, "num_attention_heads")]:
        path = write_gguf(tmp_path / "t.gguf", model, "llama", meta={key: value})
        with pytest.raises(CheckpointError, match=rf"t\.gguf: field '{field}' has the wrong type"):
            dsjax.init_inference(str(path), progress=False)
    path = write_gguf(tmp_path / "c.gguf", model, "llama",
                      meta={"rope.scaling.original_context_length": "x"},
                      extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(CheckpointError, match=r"c\.gguf: llama\.rope\.scaling\.original_context"):
        dsjax.init_inference(str(path), progress=False)


def test_huge_or_overrunning_metadata_is_refused_before_parsing(good_file, tmp_path):
    """A metadata array declaring more items than are read, or more bytes than the file holds,
    is an error naming the key before gguf's reader builds an object per item."""
    from dsjax.formats import gguf_header

    _, path = good_file
    raw = path.read_bytes()

    def count_at(key):  # the item count's offset: past the key, its type (array), the item type
        return raw.index(key) + len(key) + 4 + 4
    for key, count, match in ((b"tokenizer.ggml.tokens", gguf_header.MAX_ITEMS + 1, "declares"),
                              (b"tokenizer.ggml.tokens", 1 << 40, "declares"),
                              (b"tokenizer.ggml.token_type", gguf_header.MAX_ITEMS,
                               "past the end")):
        at, bad = count_at(key), tmp_path / f"count{count}.gguf"
        bad.write_bytes(raw[:at] + struct.pack("<Q", count) + raw[at + 8:])
        with pytest.raises(CheckpointError, match=f"count{count}.gguf.*{match}"):
            dsjax.init_inference(str(bad), progress=False)
    gguf_header.check_metadata(path)  # the good file passes
