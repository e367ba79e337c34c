"""Reading HF config dicts: the helpers every family policy shares."""

from __future__ import annotations

from collections.abc import Callable

from converters.loader import CheckpointError
from dsjax.config import RopeScaling

# HF ACT2FN names -> dsjax activations (exact formulas; unknown names are errors)
_ACTIVATIONS = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu",
    "quick_gelu": "quick_gelu",
}


def activation(name: str) -> str:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise CheckpointError(
            f"activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}") from None


def reject(hf: dict, **unsupported) -> None:
    """Raises if an HF config option that changes the math is set to a value dsjax lacks.
    Each keyword is a field name with the unsupported value (or a predicate on the value)."""
    for key, bad in unsupported.items():
        value = hf.get(key)
        hit = bad(value) if isinstance(bad, Callable) else value == bad
        if hit:
            raise CheckpointError(f"HF config {key}={value!r} is not supported by dsjax")


def rope_scaling(hf: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling) from either transformers 5 `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]))
    raise CheckpointError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")
