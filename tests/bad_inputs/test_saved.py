"""dsjax's own checkpoints as untrusted input, and saves that fail: a damaged checkpoint or
dsjax.json is an error naming the file or the field (never wrong logits); an output path that
cannot be written fails before any weight is read; an interrupted save leaves nothing behind."""

import json
import logging
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import dsjax
from converters.loader import CheckpointError
from dsjax import checkpoint
from dsjax.engine import convert_checkpoint
from tests.conftest import gpt2_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One converted checkpoint (fp32) and its HF source, shared by the module's tests."""
    root = tmp_path_factory.mktemp("saved")
    gpt2_model().save_pretrained(root / "hf")
    convert_checkpoint(root / "hf", root / "ck", dtype="fp32", progress=False)
    return root


@pytest.fixture()
def ck(saved, tmp_path):
    return shutil.copytree(saved / "ck", tmp_path / "ck")


def _largest(ck):
    return max((p for p in (ck / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bit(ck):
    f = _largest(ck)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x04
    f.write_bytes(bytes(data))
    return f


def _truncate(ck):
    f = _largest(ck)
    f.write_bytes(f.read_bytes()[:-1])
    return f


def _remove(ck):
    f = _largest(ck)
    f.unlink()
    return f


def _add_stray(ck):
    f = _largest(ck).parent / "1.0"
    f.write_bytes(b"\0" * 8)
    return f


def _clear_checksums(ck):
    _meta(lambda m: m["files"].clear())(ck)
    return min(p for p in (ck / "params").rglob("*") if p.is_file())


def _meta(change):
    """A damage function that edits dsjax.json's parsed content."""
    def damage(ck):
        meta = json.loads((ck / "dsjax.json").read_text())
        change(meta)
        (ck / "dsjax.json").write_text(json.dumps(meta))
        return ck / "dsjax.json"
    return damage


def _write_meta(text):
    def damage(ck):
        (ck / "dsjax.json").write_text(text)
        return ck / "dsjax.json"
    return damage


def _meta_dir(ck):
    (ck / "dsjax.json").unlink()
    (ck / "dsjax.json").mkdir()
    return ck / "dsjax.json"


# (id, damage(checkpoint dir) -> the file the message must name, exception, message fragment,
#  raised before any weight is read)
DAMAGED = [
    ("flipped_bit", _flip_bit, CheckpointError,
     "is corrupt: checksum mismatch; re-run dsjax convert", False),
    ("truncated", _truncate, CheckpointError, "is corrupt: .* bytes, dsjax.json records", False),
    ("missing_file", _remove, CheckpointError, "is missing: the checkpoint is incomplete", False),
    ("unlisted_file", _add_stray, CheckpointError, "is not in dsjax.json's checksums", False),
    ("no_checksums_listed", _clear_checksums, CheckpointError, "is not in dsjax.json's checksums",
     False),
    ("malformed_json", _write_meta("{\"format_version\": 2,"), CheckpointError,
     "is not valid JSON", True),
    ("not_an_object", _write_meta("[1, 2]"), CheckpointError, "is not a JSON object", True),
    ("meta_is_a_directory", _meta_dir, CheckpointError, "is not a regular file", True),
    ("missing_field", _meta(lambda m: m.pop("model")), CheckpointError,
     "field 'model' is missing", True),
    ("missing_model_field", _meta(lambda m: m["model"].pop("hidden_size")), CheckpointError,
     "field 'model.hidden_size' is missing", True),
    ("mistyped_model_field", _meta(lambda m: m["model"].update(num_layers="two")), CheckpointError,
     "field 'model.num_layers' must be int, got str 'two'", True),
    ("bool_for_int", _meta(lambda m: m["model"].update(num_heads=True)), CheckpointError,
     "field 'model.num_heads' must be int, got bool", True),
    ("unknown_model_field", _meta(lambda m: m["model"].update(wings=2)), CheckpointError,
     "field 'model.wings' is not a ModelConfig field", True),
    ("bad_literal", _meta(lambda m: m["model"].update(norm="batchnorm")), CheckpointError,
     "field 'model.norm' must be one of", True),
    ("invalid_model", _meta(lambda m: m["model"].update(num_layers=0)), CheckpointError,
     "field 'model' is not a valid model config .*num_layers must be >= 1", True),
    ("unknown_version", _meta(lambda m: m.update(format_version=99)), CheckpointError,
     "format 99 is not one this dsjax reads", True),
    ("version_as_string", _meta(lambda m: m.update(format_version="2")), CheckpointError,
     "field 'format_version' must be int", True),
    ("no_checksums_in_v2", _meta(lambda m: m.pop("files")), CheckpointError,
     "field 'files' is missing", True),
    ("file_outside_params", _meta(lambda m: m["files"].update({"params/../../etc/passwd": {
        "size": 1, "crc32": "00000000"}})), CheckpointError, "which is not a file under params/", True),
    ("bad_checksum_entry", _meta(lambda m: m["files"].update({"params/x": {"size": 1, "crc32": 7}})),
     CheckpointError, r"field \"files\['params/x'\].crc32\" must be str", True),
    ("bad_quant", _meta(lambda m: m.update(quant={"bits": 3})), CheckpointError,
     "field 'quant' is not a valid QuantSpec", True),
    ("unknown_quant_field", _meta(lambda m: m.update(quant={"bits": 8, "scheme": "x"})),
     CheckpointError, "field 'quant.scheme' is not a QuantSpec field", True),
    ("generation_type", _meta(lambda m: m["generation"].update(eos_token_id="</s>")), CheckpointError,
     "field 'generation.eos_token_id' must be int or list or null", True),
]


@pytest.mark.parametrize("name,damage,error,match,early", DAMAGED, ids=[r[0] for r in DAMAGED])
def test_damaged_checkpoint_is_an_error_naming_it(ck, name, damage, error, match, early, request):
    named = damage(ck)
    if early:
        request.getfixturevalue("no_weights")
    with pytest.raises(error, match=match) as raised:
        dsjax.init_inference(ck, dtype="fp32", max_out_tokens=128)
    assert str(named) in str(raised.value)


def test_format_1_without_checksums_restores_with_a_warning(ck, caplog):
    meta = json.loads((ck / "dsjax.json").read_text())
    meta["format_version"] = 1
    del meta["files"]
    (ck / "dsjax.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="dsjax"):
        engine = dsjax.init_inference(ck, dtype="fp32", max_out_tokens=128)
    assert engine.config.num_layers == 2
    assert "carries no checksums; its arrays are restored unverified" in caplog.text


def test_convert_checks_the_output_before_reading_weights(saved, tmp_path, no_weights):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out, error, match in [(tmp_path / "full", FileExistsError, "exists and is not empty"),
                              (tmp_path / "file", NotADirectoryError, "is not a directory"),
                              (tmp_path / "file" / "ck", NotADirectoryError, "is not a directory")]:
        with pytest.raises(error, match=match):
            convert_checkpoint(saved / "hf", out, dtype="fp32", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]
    assert (tmp_path / "full" / "keep").read_text() == "mine"


@pytest.mark.parametrize("interruption", [OSError, KeyboardInterrupt])
def test_interrupted_convert_leaves_nothing_and_can_be_rerun(saved, tmp_path, monkeypatch,
                                                            interruption):
    """Out of disk inside orbax's write, or Ctrl-C once the arrays are on disk: nothing is left
    at the output path or beside it."""
    if interruption is OSError:
        real_save = ocp.Checkpointer.save

        def save_then_fail(self, *args, **kwargs):  # the arrays are on disk, the rest is not
            real_save(self, *args, **kwargs)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ocp.Checkpointer, "save", save_then_fail)
    else:
        def interrupt(directory):  # after orbax returned, before dsjax.json is written
            raise KeyboardInterrupt

        monkeypatch.setattr(checkpoint, "checksums", interrupt)
    out = tmp_path / "ck"
    with pytest.raises(interruption):
        convert_checkpoint(saved / "hf", out, dtype="fp32", progress=False)
    assert list(tmp_path.iterdir()) == []  # no checkpoint at out, no partial sibling
    monkeypatch.undo()
    convert_checkpoint(saved / "hf", out, dtype="fp32", progress=False)
    assert checkpoint.is_checkpoint(out) and not [p for p in tmp_path.iterdir() if p != out]


def test_save_into_an_empty_directory_and_refuse_a_full_one(saved, tmp_path):
    engine = dsjax.init_inference(saved / "ck", dtype="fp32", max_out_tokens=128)
    (tmp_path / "empty").mkdir()
    assert engine.save(tmp_path / "empty") == tmp_path / "empty"
    again = dsjax.init_inference(tmp_path / "empty", dtype="fp32", max_out_tokens=128)
    for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        engine.save(tmp_path / "empty")


def test_convert_hands_orbax_host_arrays_only(saved, tmp_path, monkeypatch):
    """Convert keeps the converted weights on the host (no device copy of the model): what orbax
    writes are numpy arrays, and no device array is alive while it writes."""
    real_save, seen = ocp.Checkpointer.save, {}

    def spy(self, directory, *args, **kwargs):
        leaves = jax.tree.leaves(kwargs["args"].item)
        seen.update(kinds={type(x).__name__ for x in leaves}, live=len(jax.live_arrays()))
        return real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.Checkpointer, "save", spy)
    before = len(jax.live_arrays())
    convert_checkpoint(saved / "hf", tmp_path / "q", dtype="fp32", quant={"bits": 8}, progress=False)
    assert seen["kinds"] == {"ndarray"}
    assert seen["live"] == before
