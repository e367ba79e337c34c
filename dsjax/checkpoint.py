"""dsjax checkpoints: an orbax tree of the parameters + dsjax.json (ModelConfig, dtype, special
tokens, a checksum of every stored file) + the source's tokenizer files. Restored straight into
the target shardings.

A save checks its output path before any work, writes into a hidden sibling directory and
renames it into place at the end: an interrupted save leaves nothing at the output path. A
restore verifies every stored file against its CRC32 before orbax reads it, so a flipped bit is
an error naming the file, not wrong logits. dsjax.json is untrusted input: every field is checked
by name before it is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import types
import typing
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from converters.loader import CheckpointError, read_json
from dsjax.config import ModelConfig
from dsjax.model import flatten, unflatten
from dsjax.quant import QuantizedWeight, QuantSpec

log = logging.getLogger("dsjax")

META_FILE = "dsjax.json"
# 2: one zarr directory per array, and a CRC32 of every file under params/ in dsjax.json.
# 1 (OCDBT, no checksums) still restores, unverified, with a warning.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json",
                   "chat_template.jinja")
_READ_BYTES = 1 << 24


def is_checkpoint(path) -> bool:
    return (Path(path) / META_FILE).exists()


# ----------------------------------------------------------------------------- the output path

def writable_dir(path) -> Path:
    """The nearest existing directory at or above `path`, which must be writable (the missing
    part below it is created later): checked before any work, so a run never fails at its end."""
    path = probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{probe} is not a directory, so {path} cannot be created there")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{probe} is not writable, so {path} cannot be written")
    return probe


def check_output(path) -> Path:
    """The absolute checkpoint directory, after checking that it is absent or an empty directory
    and that its parent is writable."""
    path = Path(path).absolute()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory; choose a new output "
                                     "directory")
        if any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    writable_dir(path.parent)
    return path


# ----------------------------------------------------------------------------- save

def save(path, cfg: ModelConfig, params: dict, *, generation: dict | None = None,
         tokenizer_dir: Path | None = None, quant: QuantSpec | None = None) -> Path:
    """Writes OUT/params (orbax), OUT/dsjax.json and copies tokenizer files from tokenizer_dir,
    atomically. Quantized weights are stored as their parts (`<path>.values`, `.scales`,
    `.zeros`) with the QuantSpec in dsjax.json; without one, quantized weights (each in its own
    format, as a GGUF file holds them) are listed with theirs under "quant_layout". Host (numpy)
    arrays are written as they are."""
    path = check_output(path)
    flat = flatten(params)
    dtype = next(jnp.dtype(v.dtype).name for v in flat.values() if not isinstance(v, QuantizedWeight))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        absl = logging.getLogger("absl")
        absl.addFilter(_no_ocdbt_merge)
        try:
            with _writer() as ckpt:
                ckpt.save(tmp / "params", args=ocp.args.PyTreeSave(_parts(flat)))
        finally:
            absl.removeFilter(_no_ocdbt_merge)
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, tmp / name)
        meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "generation": generation or {},
                "model": json.loads(cfg.to_json()),
                "quant": None if quant is None else dataclasses.asdict(quant),
                "files": checksums(tmp)}
        layout = _layout(flat) if quant is None else {}
        if layout:
            meta["quant_layout"] = layout
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _writer() -> ocp.Checkpointer:
    """A synchronous orbax checkpointer that writes one zarr directory per array (OCDBT holds
    every written chunk in memory until the end) and numpy arrays in place (no defensive copy:
    nothing changes them during a save). why: docs/decisions.md#streaming-convert"""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False,
                                                        type_handler_registry=registry))


def _no_ocdbt_merge(record: logging.LogRecord) -> bool:
    """Drops orbax's warning that it found no OCDBT files to merge: none are written on purpose."""
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


def _move_into_place(tmp: Path, path: Path) -> None:
    """Renames the finished directory onto `path` (absent, or an empty directory)."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} appeared while the checkpoint was written; it is left "
                                  "as it is") from None
        raise e


def _parts(flat: dict) -> dict:
    """QuantizedWeight leaves -> their arrays under `<path>.values` / `.scales` / `.zeros`."""
    out = {}
    for k, v in flat.items():
        if isinstance(v, QuantizedWeight):
            out.update({f"{k}.{f}": getattr(v, f) for f in ("values", "scales", "zeros")
                        if getattr(v, f) is not None})
        else:
            out[k] = v
    return out


def _layout(flat: dict) -> dict:
    """{path: QuantSpec fields} of every quantized weight (G = K: one group per channel)."""
    return {k: {"bits": v.bits, "group_size": v.group_size, "symmetric": v.zeros is None,
                "fp8": bool(jnp.issubdtype(v.values.dtype, jnp.floating))}
            for k, v in flat.items() if isinstance(v, QuantizedWeight)}


# ----------------------------------------------------------------------------- checksums

def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def _crc32s(files: list[Path]) -> list[str]:
    """Each file's CRC32 as 8 hex digits, read in parallel (zlib releases the GIL)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return [f"{c:08x}" for c in pool.map(_crc32, files)]


def checksums(root: Path) -> dict:
    """{path relative to root: {"size", "crc32"}} of every file under root/params; CRC32 finds
    any flipped bit or torn write (it is no defence against deliberate edits, which could
    rewrite dsjax.json too)."""
    files = sorted(p for p in (root / "params").rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "crc32": c}
            for p, c in zip(files, _crc32s(files))}


def verify(path, meta: dict) -> None:
    """The files under params/ are those dsjax.json lists, each with its size and CRC32; a
    format-1 checkpoint (no checksums) is restored unverified, with a warning."""
    path = Path(path).absolute()
    files = meta.get("files")
    if files is None:
        log.warning("%s: a format-%s dsjax checkpoint carries no checksums; its arrays are "
                    "restored unverified (re-run dsjax convert to add them)", path,
                    meta["format_version"])
        return
    on_disk = {p.relative_to(path).as_posix() for p in (path / "params").rglob("*") if p.is_file()}
    unlisted = sorted(on_disk - set(files))  # orbax would read them unchecked
    if unlisted:
        raise CheckpointError(f"{path / unlisted[0]} is not in dsjax.json's checksums: the "
                              "checkpoint changed after it was saved; re-run dsjax convert")
    for rel, want in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete; re-run dsjax "
                                  "convert")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{f} is corrupt: {size} bytes, dsjax.json records "
                                  f"{want['size']}; re-run dsjax convert")
    names = sorted(files)
    for name, crc in zip(names, _crc32s([path / n for n in names])):
        if crc != files[name]["crc32"]:
            raise CheckpointError(f"{path / name} is corrupt: checksum mismatch; re-run dsjax "
                                  "convert")


# ----------------------------------------------------------------------------- dsjax.json

def load_meta(path) -> tuple[ModelConfig, dict]:
    """The checkpoint's ModelConfig and its dsjax.json, every field checked: a malformed file
    names the file, a missing or mistyped field names the field."""
    file = Path(path) / META_FILE
    meta = read_json(file, "dsjax checkpoint metadata")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: is not a JSON object")
    version = _field(meta, "format_version", int, file)
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{file}: dsjax checkpoint format {version} is not one this dsjax "
                              f"reads ({', '.join(map(str, READABLE_VERSIONS))}); re-run dsjax "
                              "convert")
    _field(meta, "dtype", str, file)
    for key, value in _field(meta, "generation", dict, file).items():
        _check_value(value, int | list[int] | None, f"generation.{key}", file)
    if _field(meta, "quant", dict | None, file) is not None:
        _check_fields(meta["quant"], QuantSpec, "quant", file)
        try:
            stored_quant(meta)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: field 'quant' is not a valid QuantSpec ({e})") from None
    layout = _field(meta, "quant_layout", dict, file) if "quant_layout" in meta else {}
    for path, spec in layout.items():  # weights stored each in its own format
        _check_fields(spec, QuantSpec, f"quant_layout[{path!r}]", file)
        try:
            QuantSpec(**spec)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: field 'quant_layout[{path!r}]' is not a valid "
                                  f"QuantSpec ({e})") from None
    if version >= 2:
        for name, entry in _field(meta, "files", dict, file).items():
            if not _FILE_NAME.fullmatch(name):
                raise CheckpointError(f"{file}: field 'files' names {name!r}, which is not a "
                                      "file under params/")
            _check_fields(entry, _FileEntry, f"files[{name!r}]", file)
            if not re.fullmatch(r"[0-9a-f]{8}", entry["crc32"]) or entry["size"] < 0:
                raise CheckpointError(f"{file}: field 'files[{name!r}]' is not a size and a CRC32")
    _check_fields(_field(meta, "model", dict, file), ModelConfig, "model", file)
    try:
        return ModelConfig.from_json(json.dumps(meta["model"])), meta
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: field 'model' is not a valid model config ({e})") from None


_FILE_NAME = re.compile(r"params/(?!(.*/)?\.\.(/|$))[^\0\\]+")


@dataclasses.dataclass(frozen=True)
class _FileEntry:
    """One stored file's record in dsjax.json."""

    size: int
    crc32: str


def _field(meta: dict, name: str, hint, file: Path):
    if name not in meta:
        raise CheckpointError(f"{file}: field {name!r} is missing")
    _check_value(meta[name], hint, name, file)
    return meta[name]


def _check_fields(data, cls, name: str, file: Path) -> None:
    """A JSON object holds the dataclass's required fields, no unknown ones, each of its type."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: field {name!r} must be an object, got {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise CheckpointError(f"{file}: field '{name}.{key}' is not a {cls.__name__} field")
    for key, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if key not in data and required:
            raise CheckpointError(f"{file}: field '{name}.{key}' is missing")
        if key in data:
            _check_value(data[key], hints[key], f"{name}.{key}", file)


def _check_value(value, hint, name: str, file: Path) -> None:
    """value (parsed JSON) fits the type hint: ints are not bools, tuples are lists, a
    dataclass is an object of its fields, an X | None may be null."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        arms = [a for a in args if a is not type(None)]
        if value is None and len(arms) < len(args):
            return None
        if len(arms) == 1:  # X | None: X's own error, which may name a nested field
            return _check_value(value, arms[0], name, file)
        for arm in arms:
            try:
                return _check_value(value, arm, name, file)
            except CheckpointError:
                pass
        raise CheckpointError(f"{file}: field {name!r} must be "
                              f"{' or '.join(map(_name, args))}, got {_kind(value)}")
    if dataclasses.is_dataclass(hint):
        return _check_fields(value, hint, name, file)
    if origin is typing.Literal:
        if value not in args:
            raise CheckpointError(f"{file}: field {name!r} must be one of {list(args)}, got {value!r}")
        return None
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise CheckpointError(f"{file}: field {name!r} must be a list, got {_kind(value)}")
        for i, item in enumerate(value):
            _check_value(item, args[0], f"{name}[{i}]", file)
        return None
    ok = {type(None): value is None, bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), dict: isinstance(value, dict)}.get(origin or hint, True)
    if not ok:
        raise CheckpointError(f"{file}: field {name!r} must be {_name(hint)}, got {_kind(value)}")
    return None


def _kind(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _name(hint) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def stored_quant(meta: dict) -> QuantSpec | None:
    return None if meta.get("quant") is None else QuantSpec(**meta["quant"])


def stored_layout(meta: dict) -> dict[str, QuantSpec] | None:
    """{param path: QuantSpec} of weights stored each in its own format (absent before it)."""
    layout = meta.get("quant_layout")
    return None if not layout else {k: QuantSpec(**v) for k, v in layout.items()}


# ----------------------------------------------------------------------------- restore

def _join(parts: dict, expected: dict) -> dict:
    """Inverse of _parts, guided by the expected tree."""
    out = {}
    for k, v in expected.items():
        if isinstance(v, QuantizedWeight):
            zeros = parts[f"{k}.zeros"] if v.zeros is not None else None
            out[k] = QuantizedWeight(parts[f"{k}.values"], parts[f"{k}.scales"], zeros, v.bits,
                                     v.group_size)
        else:
            out[k] = parts[k]
    return out


def restore(path, expected: dict, dtype, shardings=None, device=None,
            meta: dict | None = None) -> dict:
    """Parameters restored directly as `dtype` arrays (quantized parts keep their own dtypes)
    with the given shardings ({path: Sharding}, default: `device`, or the first device), after
    verifying every stored file's checksum against `meta` (the checkpoint's checked dsjax.json,
    read here when not given).
    expected: {path: ShapeDtypeStruct or QuantizedWeight of them}."""
    path = Path(path).absolute()
    verify(path, load_meta(path)[1] if meta is None else meta)
    device = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    kinds = {k: v.dtype for k, v in _parts({k: v for k, v in expected.items()
                                            if isinstance(v, QuantizedWeight)}).items()}
    target = {k: jax.ShapeDtypeStruct(v.shape, kinds.get(k, dtype),
                                      sharding=(shardings or {}).get(k, device))
              for k, v in _parts(expected).items()}
    with ocp.StandardCheckpointer() as ckpt:
        stored = ckpt.metadata(path / "params")
        stored = getattr(stored, "item_metadata", stored)
        keys = set(stored.keys() if hasattr(stored, "keys") else stored)
        if keys != set(target):
            diff = sorted(keys ^ set(target))[:5]
            raise ValueError(f"{path}: stored parameters do not match the config, e.g. {diff}")
        for k, meta in stored.items():
            if tuple(meta.shape) != tuple(target[k].shape):
                raise ValueError(f"{path}: {k} is stored as {tuple(meta.shape)}, "
                                 f"the config implies {tuple(target[k].shape)}")
        flat = ckpt.restore(path / "params", target)
    return unflatten(_join(flat, expected))
