"""dsjax: DeepSpeed-Inference rebuilt on JAX/XLA (and Pallas kernels).

    engine = dsjax.init_inference("path/to/hf-checkpoint", dtype="bf16", max_out_tokens=1024)
    out = engine.generate([[15496, 11, 995]], max_new_tokens=32)

The public names load their modules on first use, so that `from dsjax import numerics` (which
the Pallas kernels do) does not load the engine, flax or the converters.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_HOMES = {
    "CLIPOutput": "encoders", "EmbeddingOutput": "encoders",
    "EncoderConfig": "config", "ImageConfig": "config", "InferenceConfig": "config",
    "ModelConfig": "config", "RopeScaling": "config",
    "build_engine": "engine", "convert_checkpoint": "engine", "init_inference": "engine",
    "DecoderEngine": "engines", "EncoderEngine": "engines", "GenerationOutput": "engines",
    "InferenceEngine": "engines",
    "KernelPolicy": "policy", "QuantSpec": "quant",
    "LLM": "serving.llm", "ServingEngine": "serving.engine",
}
__all__ = sorted(_HOMES)

if TYPE_CHECKING:
    from dsjax.config import (EncoderConfig, ImageConfig, InferenceConfig, ModelConfig,
                              RopeScaling)
    from dsjax.encoders import CLIPOutput, EmbeddingOutput
    from dsjax.engine import build_engine, convert_checkpoint, init_inference
    from dsjax.engines import DecoderEngine, EncoderEngine, GenerationOutput, InferenceEngine
    from dsjax.policy import KernelPolicy
    from dsjax.quant import QuantSpec
    from dsjax.serving.engine import ServingEngine
    from dsjax.serving.llm import LLM


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"dsjax.{_HOMES[name]}"), name)
    try:  # a submodule: dsjax.engine, dsjax.ops, ...
        return importlib.import_module(f"dsjax.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"dsjax.{name}":  # the submodule exists but needs a missing package
            raise
        raise AttributeError(f"module 'dsjax' has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
