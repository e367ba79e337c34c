"""Bad HF and Megatron checkpoints, one table row each: the error names the problem and comes
before the expensive step (no tensor read, no model built), and never echoes the bytes of a file
that is not a checkpoint. Two look-alike layouts that transformers loads in its own way (a tied
config with a head of its own; a single file beside a sharded index) load here as it loads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import converters
import dsjax
import dsjax.engine
from converters import CheckpointError, loader
from tests.conftest import edit_safetensors_header, gpt2_model, hf_logits, llama_model

OPTIONS = dict(max_out_tokens=128, progress=False)
MARKER = "NOT-A-CHECKPOINT-7f3a"  # planted in bytes that no error may echo
IDS = [[3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """Small good checkpoints, saved once: gpt2 (tied head) and llama (GQA, untied head)."""
    root = tmp_path_factory.mktemp("good")
    gpt2_model().save_pretrained(root / "gpt2")
    llama_model().save_pretrained(root / "llama")
    return root


# ------------------------------------------------------------------ builders of bad directories

def _save(tensors: dict, path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return build


def edit_tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        tensors = load_file(d / "model.safetensors")
        fn(tensors)
        _save(tensors, d / "model.safetensors")
    return build


def edit_header(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    """The safetensors header JSON edited in place, the data section kept."""
    def build(d: Path) -> None:
        edit_safetensors_header(d / "model.safetensors", fn)
    return build


def write_shards(d: Path, tensors: dict) -> list[Path]:
    """tensors in two shard files and their model.safetensors.index.json, as HF writes them."""
    names = sorted(tensors)
    files = [d / f"model-0000{k}-of-00002.safetensors" for k in (1, 2)]
    weight_map = {}
    for part, path in zip((names[: len(names) // 2], names[len(names) // 2:]), files):
        _save({n: tensors[n] for n in part}, path)
        weight_map.update(dict.fromkeys(part, path.name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def sharded(fn: Callable[[Path, dict], None] = lambda d, index: None) -> Callable[[Path], None]:
    """The single file split into two shards; then `fn(directory, index)` edits the index."""
    def build(d: Path) -> None:
        write_shards(d, load_file(d / "model.safetensors"))
        (d / "model.safetensors").unlink()
        index_path = d / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        fn(d, index)
        index_path.write_text(json.dumps(index))
    return build


def rename_shard(new: str) -> Callable[[Path, dict], None]:
    def edit(d: Path, index: dict) -> None:
        wm = index["weight_map"]
        old = sorted(set(wm.values()))[0]
        index["weight_map"] = {k: (new if v == old else v) for k, v in wm.items()}
    return edit


def shard_links_outside(d: Path, index: dict) -> None:
    shard = d / sorted(set(index["weight_map"].values()))[0]
    outside = d.parent / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)


def as_bin(write: Callable[[Path, dict], None]) -> Callable[[Path], None]:
    """model.safetensors replaced by a pytorch_model.bin that `write(path, state_dict)` makes."""
    def build(d: Path) -> None:
        state = {k: torch.from_numpy(v.copy()) for k, v in load_file(d / "model.safetensors").items()}
        (d / "model.safetensors").unlink()
        write(d / "pytorch_model.bin", state)
    return build


def truncated_zip(path: Path, state: dict) -> None:
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path, state: dict) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(2000) + MARKER.encode() * 4)


class RunsACommand:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hostile(path: Path, state: dict) -> None:
    torch.save({**state, "x": RunsACommand(f"touch {path.parent / 'EXECUTED'}")}, path)


def hostile_megatron(d: Path) -> None:
    """A Megatron-LM layout whose rank file asks to run a command."""
    for f in list(d.iterdir()):
        f.unlink()
    (d / "latest_checkpointed_iteration.txt").write_text("release")
    rank = d / "release" / "mp_rank_00"
    rank.mkdir(parents=True)
    torch.save({"args": None, "x": RunsACommand(f"touch {d / 'EXECUTED'}")},
               rank / "model_optim_rng.pt")


def megatron_tracker(d: Path) -> None:
    for f in list(d.iterdir()):
        f.unlink()
    (d / "release" / "mp_rank_00").mkdir(parents=True)
    (d / "latest_checkpointed_iteration.txt").write_text(MARKER)


def replace(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        (d / name).unlink(missing_ok=True)
        make(d / name)
    return build


def then(*builds: Callable[[Path], None]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        for b in builds:
            b(d)
    return build


def sparse(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)
    return make


def swap(a: str, b: str) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        t[a], t[b] = t[b], t[a]
    return fn


def scaled(name: str, value: float) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        t[name] = t[name].copy()
        t[name][0, 0] = value
    return fn


def to_fp8(d: Path) -> None:
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    tensors = load_torch(d / "model.safetensors")
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"].to(torch.float8_e4m3fn)
    save_torch(tensors, d / "model.safetensors", metadata={"format": "pt"})


# ------------------------------------------------------------------------------------ the table

@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    base: str  # the good directory copied
    build: Callable[[Path], None]
    error: type
    match: str
    before_reading: bool = True  # no tensor read and no model built before the error
    dtype: str = "fp32"


Q0, K0 = (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qk")
ROWS = [
    # a config whose sizes contradict the file (absurd layer counts fail from the names alone)
    Row("absurd_layer_count", "llama", edit_config(lambda c: c.update(num_hidden_layers=5000)),
        CheckpointError, r"config says 5000 layers, the checkpoint holds layers 0\.\.1"),
    Row("fewer_layers_than_the_file", "gpt2", edit_config(lambda c: c.update(n_layer=1)),
        CheckpointError, r"config says 1 layers, the checkpoint holds layers 0\.\.1.*unexpected"),
    # fused parts checked one by one: q and k swapped keep the fused width
    Row("q_and_k_swapped", "llama", edit_tensors(swap(Q0, K0)), CheckpointError,
        r"q_proj\.weight has shape \(16, 32\), but the config implies \(32, 32\)"),
    # config fields missing, mistyped or out of range
    Row("field_missing", "gpt2", edit_config(lambda c: c.pop("n_embd")), CheckpointError,
        r"config\.json: field 'n_embd' is missing"),
    Row("field_mistyped", "gpt2", edit_config(lambda c: c.update(n_layer="two")), CheckpointError,
        r"config\.json: field 'n_layer' has the wrong type \('two'; expected an integer\)"),
    Row("layers_negative", "gpt2", edit_config(lambda c: c.update(n_layer=-1)), CheckpointError,
        r"field 'n_layer' is -1"),
    # a count some families build tables from before the names can refute it
    Row("layers_beyond_any_model", "gpt2", edit_config(lambda c: c.update(n_layer=10**9)),
        CheckpointError, r"field 'n_layer' is 1000000000; it must be a positive integer <= 65536"),
    Row("heads_zero", "gpt2", edit_config(lambda c: c.update(n_head=0)), CheckpointError,
        r"field 'n_head' is 0"),
    Row("vocab_zero", "gpt2", edit_config(lambda c: c.update(vocab_size=0)), CheckpointError,
        r"field 'vocab_size' is 0"),
    Row("kv_heads_zero", "llama", edit_config(lambda c: c.update(num_key_value_heads=0)),
        CheckpointError, r"field 'num_key_value_heads' is 0"),
    Row("flag_as_string", "gpt2", edit_config(lambda c: c.update(tie_word_embeddings="false")),
        CheckpointError, r"field 'tie_word_embeddings' has the wrong type \('false'"),
    # metadata files: regular, bounded, UTF-8 JSON, errors without their bytes
    Row("config_invalid_json", "gpt2",
        replace("config.json", lambda p: p.write_text('{"model_type": "gpt2",\n ' + MARKER)),
        CheckpointError, r"config\.json \(the model config\): is not valid JSON \(.* line 2, column 2"),
    Row("config_not_utf8", "gpt2",
        replace("config.json", lambda p: p.write_bytes(MARKER.encode() + b"\xff\xfe")),
        CheckpointError, r"config\.json \(the model config\): is not UTF-8 text"),
    Row("config_too_large", "gpt2", replace("config.json", sparse(65 * 2**20)), CheckpointError,
        r"config\.json \(the model config\): 68157440 bytes, more than"),
    Row("config_is_a_fifo", "gpt2", replace("config.json", os.mkfifo), CheckpointError,
        r"config\.json \(the model config\): is not a regular file"),
    Row("config_is_a_device", "gpt2", replace("config.json", lambda p: p.symlink_to("/dev/zero")),
        CheckpointError, r"config\.json \(the model config\): is not a regular file"),
    Row("safetensors_is_a_fifo", "gpt2", replace("model.safetensors", os.mkfifo), CheckpointError,
        r"model\.safetensors \(safetensors file\): is not a regular file"),
    Row("index_is_a_fifo", "gpt2", then(sharded(), replace("model.safetensors.index.json", os.mkfifo)),
        CheckpointError, r"index\.json \(the shard index\): is not a regular file"),
    Row("shard_is_a_fifo", "gpt2",
        then(sharded(), replace("model-00002-of-00002.safetensors", os.mkfifo)),
        CheckpointError, r"model-00002-of-00002\.safetensors \(safetensors file\): is not a regular"),
    Row("bin_is_a_fifo", "gpt2", as_bin(lambda p, s: os.mkfifo(p)), CheckpointError,
        r"pytorch_model\.bin \(pickled checkpoint\): is not a regular file"),
    # shard paths stay inside the directory
    Row("shard_path_climbs_out", "gpt2", sharded(rename_shard("../model-00001-of-00002.safetensors")),
        CheckpointError, r"shard '\.\./model-00001-of-00002\.safetensors' is not a file name inside"),
    Row("shard_path_absolute", "gpt2", sharded(rename_shard("/etc/hostname")), CheckpointError,
        r"shard '/etc/hostname' is not a file name inside"),
    Row("shard_links_outside", "gpt2", sharded(shard_links_outside), CheckpointError,
        r"shard 'model-00001-of-00002\.safetensors' leads outside"),
    # safetensors headers: valid but unsupported dtypes named, broken entries not echoed
    Row("dtype_f8", "gpt2", to_fp8, CheckpointError,
        r"unsupported dtype F8_E4M3 \(tensor 'transformer\.wte\.weight'\)"),
    Row("dtype_u16", "gpt2",
        edit_tensors(lambda t: t.update({"transformer.wpe.weight": np.zeros((128, 32), np.uint16)})),
        CheckpointError, r"unsupported dtype U16 \(tensor 'transformer\.wpe\.weight'\)"),
    Row("dtype_unknown", "gpt2", edit_header(lambda h: h["transformer.wte.weight"].update(dtype="F128")),
        CheckpointError, r"tensor 'transformer\.wte\.weight' has a malformed header entry"),
    Row("header_entry_garbage", "gpt2",
        edit_header(lambda h: h["transformer.wte.weight"].update(shape=[MARKER])),
        CheckpointError, r"tensor 'transformer\.wte\.weight' has a malformed header entry"),
    Row("header_not_json", "gpt2",
        replace("model.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 24) + b"{" + MARKER.encode()
                                                            + b"\xff" * 40)),
        CheckpointError, r"model\.safetensors: header: is not (UTF-8 text|valid JSON)"),
    # pickles: corrupt files said to be corrupt, hostile ones refused (and never run)
    Row("bin_truncated_zip", "gpt2", as_bin(truncated_zip), CheckpointError,
        r"pytorch_model\.bin: is corrupt or not a torch checkpoint"),
    Row("bin_random_bytes", "gpt2", as_bin(random_bytes), CheckpointError,
        r"pytorch_model\.bin: is corrupt or not a torch checkpoint"),
    Row("bin_runs_a_command", "gpt2", as_bin(hostile), CheckpointError,
        r"pytorch_model\.bin: refused to load: .*asks to build GLOBAL (os|posix)\.system, which a "
        r"weights-only checkpoint never needs"),
    Row("megatron_runs_a_command", "gpt2", hostile_megatron, CheckpointError,
        r"model_optim_rng\.pt: refused to load: .*asks to build GLOBAL (os|posix)\.system"),
    Row("megatron_tracker_garbage", "gpt2", megatron_tracker, CheckpointError,
        r"latest_checkpointed_iteration\.txt: holds neither an iteration number nor 'release'"),
    # fp16: finite values beyond its range are refused while converting
    Row("fp16_overflow", "gpt2", edit_tensors(scaled("transformer.wte.weight", 1e5)), CheckpointError,
        r"transformer\.wte\.weight holds values up to \|x\| = 100000, beyond float16's range",
        before_reading=False, dtype="fp16"),
]


@contextlib.contextmanager
def fifos_unblocked(directory: Path):
    """Opens each FIFO under `directory` for writing whenever a reader waits on it, so code that
    wrongly reads one sees an empty file and fails its test instead of hanging it."""
    done = threading.Event()

    def watch():
        while not done.wait(0.2):
            for p in directory.rglob("*"):
                with contextlib.suppress(OSError):
                    if p.is_fifo():
                        os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _guard(fn, name: str, allowed: bool):
    """fn, or where the row's error must come first, a stand-in that fails the test at once (a
    model of 5000 layers would otherwise be built before the test could tell)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} was called before the checkpoint was refused")
    return fn if allowed else refuse


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_checkpoint_is_refused_early(row, good, tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    shutil.copytree(good / row.base, directory)
    row.build(directory)
    allowed = not row.before_reading
    monkeypatch.setattr(loader.SafetensorsFile, "get",
                        _guard(loader.SafetensorsFile.get, "SafetensorsFile.get", allowed))
    to_numpy = _guard(loader.torch_to_numpy, "torch_to_numpy", allowed)
    monkeypatch.setattr(loader, "torch_to_numpy", to_numpy)
    monkeypatch.setattr(converters.megatron, "torch_to_numpy", to_numpy)  # imported by name
    monkeypatch.setattr(dsjax.engine, "abstract_model",
                        _guard(dsjax.engine.abstract_model, "abstract_model", allowed))
    with fifos_unblocked(directory), pytest.raises(row.error, match=row.match) as err:
        dsjax.init_inference(directory, dtype=row.dtype, **OPTIONS)
    assert MARKER not in str(err.value)
    assert not (directory / "EXECUTED").exists()


# ------------------------------------------------------------ look-alikes that load as HF loads

def test_tied_config_with_a_different_head_keeps_the_head(good, tmp_path, caplog):
    directory = tmp_path / "ckpt"
    shutil.copytree(good / "gpt2", directory)
    head = np.random.default_rng(1).normal(0, 0.5, (96, 32)).astype(np.float32)
    edit_tensors(lambda t: t.update({"lm_head.weight": head}))(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert hf.config.tie_word_embeddings
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), head)  # transformers untied it
    with caplog.at_level("WARNING", logger="dsjax.converters"):
        engine = dsjax.init_inference(directory, dtype="fp32", **OPTIONS)
    assert "lm_head.weight" in caplog.text and "tie_word_embeddings" in caplog.text
    np.testing.assert_allclose(np.asarray(engine(np.array(IDS))), hf_logits(hf, IDS),
                               atol=1e-4, rtol=1e-4)


def test_tied_config_with_an_equal_head_stays_tied(good, tmp_path, caplog):
    directory = tmp_path / "ckpt"
    shutil.copytree(good / "gpt2", directory)
    edit_tensors(lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].copy()}))(directory)
    with caplog.at_level("WARNING", logger="dsjax.converters"):
        assert converters.open_hf(directory).config.tie_word_embeddings
    assert "lm_head" not in caplog.text


def test_single_file_is_read_before_an_index(tmp_path, caplog):
    """Both layouts present, holding different models: transformers reads model.safetensors."""
    single, other = gpt2_model(seed=0), gpt2_model(seed=1)
    single.save_pretrained(tmp_path)
    write_shards(tmp_path, {k: v.numpy() for k, v in other.state_dict().items()
                            if k != "lm_head.weight"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(hf_logits(hf, IDS), hf_logits(single, IDS))
    assert not np.allclose(hf_logits(other, IDS), hf_logits(single, IDS), atol=1e-2)
    with caplog.at_level("INFO", logger="dsjax.converters"):
        engine = dsjax.init_inference(tmp_path, dtype="fp32", **OPTIONS)
    assert "model.safetensors.index.json is not read" in caplog.text
    np.testing.assert_allclose(np.asarray(engine(np.array(IDS))), hf_logits(hf, IDS),
                               atol=1e-4, rtol=1e-4)


def test_hub_cache_snapshot_may_link_to_its_blobs(good, tmp_path):
    """The HF hub cache links snapshots/<revision>/<file> to ../../blobs/<hash>: not an escape."""
    snapshot, blobs = tmp_path / "models--tiny" / "snapshots" / "abc123", tmp_path / "models--tiny" / "blobs"
    shutil.copytree(good / "gpt2", snapshot)
    sharded()(snapshot)
    blobs.mkdir()
    for i, shard in enumerate(sorted(snapshot.glob("model-*.safetensors"))):
        shutil.move(shard, blobs / f"blob{i}")
        shard.symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    assert converters.open_hf(snapshot).config.num_layers == 2
