"""Where a model comes from: one small class per kind of source, each giving the model's
config, its generation defaults, its tokenizer directory, and its weights on request.

  HFSource           an HF checkpoint directory or an in-memory transformers model (converters/)
  CheckpointSource   a dsjax checkpoint directory (`dsjax convert`, engine.save())
  RandomSource       a ModelConfig or a built-in architecture name: random weights
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax

from dsjax import checkpoint, presets
from dsjax.config import ModelConfig
from dsjax.encoders import module_for
from dsjax.model import random_params, unflatten
from dsjax.quant import QuantSpec, abstract_quantized


class Source:
    """What every source gives. `load(expected, dtype, seed=, progress=, host=)` returns nested
    params shaped like `expected` ({path: ShapeDtypeStruct}), on the default device, or as host
    arrays with host=True (to be sliced over a mesh: a model larger than one device is never
    made on one)."""

    config: ModelConfig
    generation: dict  # eos_token_id / pad_token_id defaults
    tokenizer_dir: Path | None = None
    random_weights: bool = False
    stored_quant: QuantSpec | None = None  # the checkpoint's stored weight format

    def load(self, expected: dict, dtype, *, seed: int, progress: bool, host: bool = False) -> dict:
        raise NotImplementedError


class RandomSource(Source):
    random_weights = True

    def __init__(self, config: ModelConfig, generation: dict | None = None):
        self.config, self.generation = config, generation or {}

    def load(self, expected, dtype, *, seed, progress, host=False):
        where = jax.default_device(jax.devices("cpu")[0]) if host else contextlib.nullcontext()
        with where:
            return random_params(self.config, dtype, seed, module=module_for(self.config))


class CheckpointSource(Source):
    def __init__(self, path: Path):
        self.path = self.tokenizer_dir = path
        self.config, meta = checkpoint.load_meta(path)
        self.generation = meta["generation"]
        self.stored_quant = checkpoint.stored_quant(meta)

    def load(self, expected, dtype, *, seed, progress, host=False):
        if self.stored_quant is not None:
            expected = abstract_quantized(expected, self.stored_quant)
        return checkpoint.restore(self.path, expected, dtype,
                                  device=jax.devices("cpu")[0] if host else None)


class HFSource(Source):
    def __init__(self, model):
        import converters

        self.hf = converters.open_hf(model)
        self.config, self.tokenizer_dir = self.hf.config, self.hf.directory
        self.generation = generation_defaults(self.hf.hf_config, self.hf.directory)

    def load(self, expected, dtype, *, seed, progress, host=False):
        import converters

        flat = converters.convert(self.hf.policy, self.hf.config, self.hf.tensors, expected, dtype,
                                  progress, put=(lambda path, x: x) if host else None)
        return unflatten(flat)


def open_source(model) -> Source:
    """A Source for init_inference's `model` argument (see its docstring for the forms)."""
    if isinstance(model, ModelConfig):
        return RandomSource(model)
    if isinstance(model, (str, Path)):
        path = Path(model)
        if checkpoint.is_checkpoint(path):
            return CheckpointSource(path)
        if not path.exists() and str(model) in presets.PRESETS:
            hf_config = presets.hf_config(str(model))
            return RandomSource(presets.model_config(str(model)),
                                generation_defaults(hf_config, None))
        if not path.exists():
            raise FileNotFoundError(f"{model!r} is neither a directory nor a built-in architecture "
                                    f"({', '.join(presets.PRESETS)})")
    return HFSource(model)


def generation_defaults(hf_config: dict, directory: Path | None) -> dict:
    """eos/pad token ids from generation_config.json, else config.json."""
    gen_cfg = {}
    if directory is not None and (directory / "generation_config.json").exists():
        gen_cfg = json.loads((directory / "generation_config.json").read_text())
    pick = lambda k: gen_cfg.get(k, hf_config.get(k))  # noqa: E731
    return {"eos_token_id": pick("eos_token_id"), "pad_token_id": pick("pad_token_id")}
