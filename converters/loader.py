"""Reads checkpoint tensors without torch: safetensors files (one or sharded), memory-mapped.

A checkpoint is untrusted input. Every file is checked to be a regular file before it is opened
(a FIFO or device would block or never end); JSON metadata is read by `read_json` (bounded size,
UTF-8, errors that name the position, never the bytes); an index's shards stay inside the
directory. Each safetensors header is validated (size, JSON, known dtypes, offsets inside the
file, shape x itemsize == byte length, no overlaps) before any tensor is read. Tensors are
returned as numpy views of the mapped file, so a load holds one converted tensor in host memory
at a time. Pickled files (`.bin`, Megatron's `.pt`) need torch and are read with
weights_only=True (`load_pickled`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import stat
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# valid in the safetensors format, but not read by dsjax
UNSUPPORTED_DTYPES = ("F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0", "F6_E2M3",
                      "F6_E3M2", "F4", "U16", "U32", "U64", "C64")
# read only where the checkpoint's quantization_config says how they are scaled (dsjax.formats)
FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}
_MAX_HEADER = 100 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024

log = logging.getLogger("dsjax.converters")


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as asked; the message says why."""


def regular_file(path: Path, what: str = "", max_bytes: int | None = None) -> int:
    """The size of `path` after checking, before any open, that it is a regular file (a FIFO or
    device would block or never end) no larger than `max_bytes`."""
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{label}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{label}: is not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise CheckpointError(f"{label}: {st.st_size} bytes, more than the {max_bytes} allowed")
    return st.st_size


def read_json(path: Path, what: str = "") -> object:
    """The parsed JSON of a checkpoint's metadata file, after checking it is a regular file of a
    bounded size holding UTF-8 JSON; errors name the file and the position, never its bytes."""
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    regular_file(path, what, MAX_JSON_BYTES)
    with open(path, "rb") as f:
        return parse_json(f.read(MAX_JSON_BYTES + 1), label)


def parse_json(raw: bytes, label: str) -> object:
    """UTF-8 JSON bytes parsed; a failure names `label` and the position, never the bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{label}: is not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{label}: is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError):  # an integer of too many digits, too deep a nesting
        raise CheckpointError(f"{label}: is not valid JSON (a number or nesting too large)") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets relative to the data section
    end: int


def read_header(path: Path, fp8: bool = False) -> tuple[int, dict[str, TensorInfo]]:
    """Returns (data section offset, {name: TensorInfo}) after validating the whole header;
    FP8 tensors are refused unless fp8 (a quantization config that scales them)."""
    size = regular_file(path, "safetensors file")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file")
        header = parse_json(f.read(n), f"{path}: header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_size = size - 8 - n
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, entry, data_size, fp8)
    spans = sorted((i.start, i.end, k) for k, i in infos.items())
    for (s0, e0, k0), (s1, _, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {k0!r} and {k1!r} overlap")
    return 8 + n, infos


def _ints(value) -> tuple[int, ...] | None:
    """A JSON list of integers as a tuple (booleans and floats are not integers), else None."""
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


def _tensor_info(path: Path, name: str, entry, data_size: int, fp8: bool = False) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry (not an object)")
    kind = entry.get("dtype")
    known = {**SAFETENSORS_DTYPES, **FP8_DTYPES} if fp8 else SAFETENSORS_DTYPES
    if kind in UNSUPPORTED_DTYPES and kind not in known:
        raise CheckpointError(f"{path}: unsupported dtype {kind} (tensor {name!r}); dsjax reads "
                              f"{', '.join(SAFETENSORS_DTYPES)}")
    shape, offsets = _ints(entry.get("shape")), _ints(entry.get("data_offsets"))
    if kind not in known or shape is None or offsets is None or len(offsets) != 2:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry (it needs a "
                              "safetensors dtype, a list of integer dims and two data_offsets)")
    dtype, (start, end) = np.dtype(known[kind]), offsets
    if any(d < 0 for d in shape) or not 0 <= start <= end <= data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} offsets [{start}, {end}) fall outside the {data_size}-byte data")
    if (end - start) != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {name!r} of shape {shape} {dtype} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes but its offsets span {end - start}")
    return TensorInfo(dtype, shape, start, end)


class SafetensorsFile:
    """One validated safetensors file; `get(name)` is a zero-copy numpy view."""

    def __init__(self, path: str | Path, fp8: bool = False):
        self.path = Path(path)
        self.data_offset, self.infos = read_header(self.path, fp8)
        self._map = None

    def get(self, name: str) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.infos[name]
        raw = self._map[self.data_offset + info.start: self.data_offset + info.end]
        return raw.view(info.dtype).reshape(info.shape)


class TensorSource(Mapping):
    """name -> numpy array, read lazily; `shapes` (and, for safetensors files, `dtypes` and the
    `files` holding each tensor) are known without reading any data."""

    def __init__(self, getters: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple],
                 origin: str, dtypes: dict[str, np.dtype] | None = None,
                 files: dict[str, Path] | None = None):
        self._getters, self.shapes, self.origin = getters, shapes, origin
        self.dtypes, self.files = dtypes, files

    def __getitem__(self, name: str) -> np.ndarray:
        return self._getters[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._getters)

    def __len__(self) -> int:
        return len(self._getters)

    def quantized_kernel(self, transform: str, names: list[str]):
        """The kernel a rule makes from `names` as a dsjax QuantizedWeight, where they are
        stored quantized (dsjax.formats.compressed); None: read them as arrays."""
        return None


def from_safetensors(files: list[Path], origin: str, fp8: bool = False) -> TensorSource:
    getters, shapes, dtypes, where = {}, {}, {}, {}
    for path in files:
        st = SafetensorsFile(path, fp8)
        for name, info in st.infos.items():
            if name in getters:
                raise CheckpointError(f"{origin}: tensor {name!r} appears in more than one shard")
            getters[name] = (lambda st=st, name=name: st.get(name))
            shapes[name], dtypes[name], where[name] = info.shape, info.dtype, path
    return TensorSource(getters, shapes, origin, dtypes, where)


def from_directory(path: str | Path, fp8: bool = False) -> TensorSource:
    """Tensors of an HF checkpoint directory: model.safetensors, a sharded index, or .bin. With
    both a single file and an index, the single file is read, as transformers reads it. FP8
    tensors are read only with fp8 (a quantization config that scales them)."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        if index.exists():
            log.info("%s: reading model.safetensors; model.safetensors.index.json is not read "
                     "(transformers, too, reads the single file when both are present)", path)
        return from_safetensors([single], str(path), fp8)
    if index.exists():
        return _from_index(path, index, fp8)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return from_state_dict(_torch_load(bins), str(path))
    raise CheckpointError(
        f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin found")


def _from_index(path: Path, index: Path, fp8: bool = False) -> TensorSource:
    """The shards an index names, each a file inside the checkpoint directory."""
    weight_map = read_json(index, "the shard index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> shard file name")
    shards = sorted(set(weight_map.values()))
    files = [shard_path(path, index, s) for s in shards]
    missing = [s for s, f in zip(shards, files) if not f.exists()]
    if missing:
        raise CheckpointError(f"{index} names shard files that are missing: {missing}")
    source = from_safetensors(files, str(path), fp8)
    unlisted = set(source) ^ set(weight_map)
    if unlisted:
        raise CheckpointError(
            f"{index}: weight_map and the shard files disagree on {sorted(unlisted)[:5]}")
    return source


def shard_path(directory: Path, index: Path, name: str) -> Path:
    """`directory / name` for a shard an index names: a relative path without `..`, which
    resolves (symlinks followed) inside the directory. A directory of the HF hub cache
    (snapshots/<revision>/) may link its files to the cache's own blobs."""
    rel = Path(name)
    if not rel.parts or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise CheckpointError(f"{index}: shard {name!r} is not a file name inside {directory}")
    root = directory.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    target = (directory / rel).resolve()
    if not target.is_relative_to(root):
        raise CheckpointError(f"{index}: shard {name!r} leads outside {directory} (to {target})")
    return directory / rel


def _torch_load(files: list[Path]) -> dict:
    state = {}
    for f in files:
        if f.name.endswith(".index.json"):
            continue
        state.update(load_pickled(f))
    return state


def load_pickled(path: Path, allowed: tuple = ()):
    """A torch-pickled file read with weights_only=True: tensors and plain containers, plus the
    `allowed` globals (classes or (class, "module.name") pairs), nothing else is built."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path} holds pickled torch weights, which need torch to read; "
                              "install torch or convert the checkpoint to safetensors") from None
    regular_file(path, "pickled checkpoint")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001  any failure of an untrusted file is the file's
        raise _pickle_error(path, e) from None


_GLOBAL = re.compile(r"GLOBAL ([\w.]{1,200})")


def _pickle_error(path: Path, e: Exception) -> CheckpointError:
    """Why torch.load failed, as a sentence: a global the file asks for (it is refused, never
    built), or a file that is not a readable torch checkpoint; never the file's bytes."""
    from pickle import UnpicklingError

    wanted = _GLOBAL.search(str(e)) if isinstance(e, UnpicklingError) else None
    if wanted:
        return CheckpointError(
            f"{path}: refused to load: dsjax reads pickled checkpoints with weights_only=True "
            f"(torch.load), and this file asks to build GLOBAL {wanted.group(1)}, which a "
            "weights-only checkpoint never needs")
    return CheckpointError(
        f"{path}: is corrupt or not a torch checkpoint (torch.load(weights_only=True) failed with "
        f"{type(e).__name__}); save it again, or convert it to safetensors")


def torch_to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy without rounding (bf16 travels as its bits)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_state_dict(state: Mapping, origin: str) -> TensorSource:
    """Tensors of an in-memory torch state dict (values converted lazily)."""
    getters = {k: (lambda t=t: torch_to_numpy(t)) for k, t in state.items()}
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    return TensorSource(getters, shapes, origin)
