"""Reads checkpoint tensors without torch: safetensors files (one or sharded), memory-mapped.

A checkpoint is untrusted input. Each safetensors header is validated (size, JSON, known dtypes,
offsets inside the file, shape x itemsize == byte length, no overlaps) before any tensor is read.
Tensors are returned as numpy views of the mapped file, so a load holds one converted tensor in
host memory at a time. Pickled files (`.bin`, Megatron's `.pt`) need torch and are read with
weights_only=True (`load_pickled`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
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
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets relative to the data section
    end: int


def read_header(path: Path) -> tuple[int, dict[str, TensorInfo]]:
    """Returns (data section offset, {name: TensorInfo}) after validating the whole header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_size = size - 8 - n
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, entry, data_size)
    spans = sorted((i.start, i.end, k) for k, i in infos.items())
    for (s0, e0, k0), (s1, _, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {k0!r} and {k1!r} overlap")
    return 8 + n, infos


def _tensor_info(path: Path, name: str, entry, data_size: int) -> TensorInfo:
    try:
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        shape = tuple(int(d) for d in entry["shape"])
        start, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
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

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data_offset, self.infos = read_header(self.path)
        self._map = None

    def get(self, name: str) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.infos[name]
        raw = self._map[self.data_offset + info.start: self.data_offset + info.end]
        return raw.view(info.dtype).reshape(info.shape)


class TensorSource(Mapping):
    """name -> numpy array, read lazily; `shapes` is known without reading any data."""

    def __init__(self, getters: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple],
                 origin: str):
        self._getters, self.shapes, self.origin = getters, shapes, origin

    def __getitem__(self, name: str) -> np.ndarray:
        return self._getters[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._getters)

    def __len__(self) -> int:
        return len(self._getters)


def from_safetensors(files: list[Path], origin: str) -> TensorSource:
    getters, shapes = {}, {}
    for path in files:
        st = SafetensorsFile(path)
        for name, info in st.infos.items():
            if name in getters:
                raise CheckpointError(f"{origin}: tensor {name!r} appears in more than one shard")
            getters[name] = (lambda st=st, name=name: st.get(name))
            shapes[name] = info.shape
    return TensorSource(getters, shapes, origin)


def from_directory(path: str | Path) -> TensorSource:
    """Tensors of an HF checkpoint directory: model.safetensors, a sharded index, or .bin."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        source = from_safetensors([path / s for s in shards], str(path))
        unlisted = set(source) ^ set(weight_map)
        if unlisted:
            raise CheckpointError(
                f"{index}: weight_map and the shard files disagree on {sorted(unlisted)[:5]}")
        return source
    if (path / "model.safetensors").exists():
        return from_safetensors([path / "model.safetensors"], str(path))
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return from_state_dict(_torch_load(bins), str(path))
    raise CheckpointError(
        f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin found")


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
    from pickle import UnpicklingError

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except UnpicklingError as e:
        why = re.search(r"Unsupported global: GLOBAL [\w.]+|but got <class '[\w.]+'>", str(e))
        raise CheckpointError(f"{path}: refused to unpickle it with weights_only=True "
                              f"({why.group(0) if why else str(e)[-300:]})") from None


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
