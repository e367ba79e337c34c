"""dsjax checkpoints: an orbax tree of the parameters + dsjax.json (ModelConfig, dtype, special
tokens) + the source's tokenizer files. Restored straight into the target shardings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dsjax.config import ModelConfig
from dsjax.model import flatten, unflatten

META_FILE = "dsjax.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def is_checkpoint(path) -> bool:
    return (Path(path) / META_FILE).exists()


def save(path, cfg: ModelConfig, params: dict, *, generation: dict | None = None,
         tokenizer_dir: Path | None = None) -> Path:
    """Writes OUT/params (orbax), OUT/dsjax.json and copies tokenizer files from tokenizer_dir."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    path.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    dtype = jnp.dtype(next(iter(flat.values())).dtype).name
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", flat)  # flat string keys: orbax-friendly, layer keys explicit
    meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "generation": generation or {},
            "model": json.loads(cfg.to_json())}
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


def restore(path, expected: dict[str, jax.ShapeDtypeStruct], dtype, shardings=None) -> dict:
    """Parameters restored directly as `dtype` arrays with the given shardings
    ({path: Sharding}, default: the first device)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(v.shape, dtype,
                                      sharding=(shardings or {}).get(k, device))
              for k, v in expected.items()}
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
    return unflatten(flat)
