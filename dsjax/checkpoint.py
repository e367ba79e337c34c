"""dsjax checkpoints: an orbax tree of the parameters + dsjax.json (ModelConfig, dtype, special
tokens) + the source's tokenizer files. Restored straight into the target shardings."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dsjax.config import ModelConfig
from dsjax.model import flatten, unflatten
from dsjax.quant import QuantizedWeight, QuantSpec

META_FILE = "dsjax.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def is_checkpoint(path) -> bool:
    return (Path(path) / META_FILE).exists()


def save(path, cfg: ModelConfig, params: dict, *, generation: dict | None = None,
         tokenizer_dir: Path | None = None, quant: QuantSpec | None = None) -> Path:
    """Writes OUT/params (orbax), OUT/dsjax.json and copies tokenizer files from tokenizer_dir.
    Quantized weights are stored as their parts (`<path>.values`, `.scales`, `.zeros`) with the
    QuantSpec in dsjax.json."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    path.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    dtype = next(jnp.dtype(v.dtype).name for v in flat.values() if not isinstance(v, QuantizedWeight))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", _parts(flat))  # flat string keys: orbax-friendly, explicit
    meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "generation": generation or {},
            "model": json.loads(cfg.to_json()),
            "quant": None if quant is None else dataclasses.asdict(quant)}
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, path / name)
    return path


def load_meta(path) -> tuple[ModelConfig, dict]:
    meta = json.loads((Path(path) / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: dsjax checkpoint format {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}; re-run `dsjax convert`")
    return ModelConfig.from_json(json.dumps(meta["model"])), meta


def stored_quant(meta: dict) -> QuantSpec | None:
    return None if meta.get("quant") is None else QuantSpec(**meta["quant"])


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


def restore(path, expected: dict, dtype, shardings=None, device=None) -> dict:
    """Parameters restored directly as `dtype` arrays (quantized parts keep their own dtypes)
    with the given shardings ({path: Sharding}, default: `device`, or the first device).
    expected: {path: ShapeDtypeStruct or QuantizedWeight of them}."""
    device = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    kinds = {k: v.dtype for k, v in _parts({k: v for k, v in expected.items()
                                            if isinstance(v, QuantizedWeight)}).items()}
    target = {k: jax.ShapeDtypeStruct(v.shape, kinds.get(k, dtype),
                                      sharding=(shardings or {}).get(k, device))
              for k, v in _parts(expected).items()}
    with ocp.StandardCheckpointer() as ckpt:
        stored = ckpt.metadata(Path(path).absolute() / "params")
        stored = getattr(stored, "item_metadata", stored)
        keys = set(stored.keys() if hasattr(stored, "keys") else stored)
        if keys != set(target):
            diff = sorted(keys ^ set(target))[:5]
            raise ValueError(f"{path}: stored parameters do not match the config, e.g. {diff}")
        for k, meta in stored.items():
            if tuple(meta.shape) != tuple(target[k].shape):
                raise ValueError(f"{path}: {k} is stored as {tuple(meta.shape)}, "
                                 f"the config implies {tuple(target[k].shape)}")
        flat = ckpt.restore(Path(path).absolute() / "params", target)
    return unflatten(_join(flat, expected))
