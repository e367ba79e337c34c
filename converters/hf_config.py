"""Reading HF config dicts: the helpers every family policy shares."""

from __future__ import annotations

import math
from collections.abc import Callable

from converters.loader import CheckpointError
from dsjax.config import ModelConfig, RopeScaling

# What the HF config fields the families read must hold, under every family's spelling. A size
# is a positive integer (an "optional size" may be null), an epsilon a finite number >= 0, a
# "positive" a finite number > 0, a flag true or false.
_FIELDS = {
    **dict.fromkeys((
        "vocab_size", "hidden_size", "n_embd", "n_embed", "dim", "hidden_dim",
        "num_attention_heads", "n_head", "n_heads",
        "num_heads", "ffn_dim", "max_position_embeddings", "n_positions", "image_size",
        "patch_size", "num_channels"), "size"),
    **dict.fromkeys((  # null: the family's default (GPT-Neo's intermediate_size: 4 x hidden)
        "intermediate_size", "num_key_value_heads", "head_dim", "n_inner", "word_embed_proj_dim",
        "rotary_dim", "sliding_window", "window_size", "projection_dim", "seq_length"),
        "optional size"),
    # layer counts: families that build per-layer tables from the count (CLIP's towers,
    # GPT-Neo's attention_types) do so before the checkpoint's names can refute it
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers"), "layer size"),
    **dict.fromkeys(("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps"), "epsilon"),
    **dict.fromkeys(("rope_theta", "rotary_emb_base", "rotary_pct"), "positive"),
    **dict.fromkeys((
        "tie_word_embeddings", "scale_attn_weights", "use_parallel_residual", "attention_bias",
        "mlp_bias", "use_sliding_window", "do_layer_norm_before"), "flag"),
}
_MAX_SIZE = 2**31 - 1  # beyond any real model; larger counts would only stall the checks
_MAX_LAYERS = 2**16
# a ModelConfig's optional sizes: set, they must be positive (whatever HF field they came from)
_OPTIONAL_SIZES = ("num_kv_heads", "head_dim", "rotary_dim", "sliding_window", "embed_proj_dim")


def build_config(make_config: Callable[[dict], ModelConfig], hf: dict, where: str) -> ModelConfig:
    """A family's make_config(hf), after checking the fields it reads; a field it finds missing
    or of the wrong type is a CheckpointError naming the field and `where` (the file)."""
    if hf.get("use_sliding_window") is False:  # then sliding_window is unused (Qwen2-MoE
        hf = {k: v for k, v in hf.items() if k != "sliding_window"}  # writes 0 there)
    check_fields(hf, where)
    try:
        cfg = make_config(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{where}: field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"{where}: does not describe a valid model: {e}") from None
    for name in _OPTIONAL_SIZES:
        value = getattr(cfg, name)
        if value is not None and not (isinstance(value, int) and 0 < value <= _MAX_SIZE):
            raise CheckpointError(f"{where}: gives {name}={value!r}; it must be a positive integer")
    return cfg


def check_fields(hf: dict, where: str, prefix: str = "") -> None:
    """Each field `_FIELDS` knows holds its kind of value; nested configs (CLIP's text_config
    and vision_config) are checked alike."""
    for key, value in hf.items():
        if isinstance(value, dict) and key.endswith("_config"):
            check_fields(value, where, f"{prefix}{key}.")
        problem = _problem(_FIELDS[key], value) if key in _FIELDS else None
        if problem:
            raise CheckpointError(f"{where}: field {prefix + key!r} {problem}")


def _problem(kind: str, value) -> str | None:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if kind == "flag":
        return None if isinstance(value, bool) else f"has the wrong type ({shown}; expected true or false)"
    if value is None and kind == "optional size":
        return None
    integer = kind.endswith("size")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"has the wrong type ({shown}; expected {'an integer' if integer else 'a number'})"
    top = _MAX_LAYERS if kind == "layer size" else _MAX_SIZE
    if integer and not 0 < value <= top:
        return f"is {shown}; it must be a positive integer" + (f" <= {top}" if value > 0 else "")
    if not integer and not (math.isfinite(value) and (value >= 0 if kind == "epsilon" else value > 0)):
        return f"is {shown}; it must be a finite number {'>= 0' if kind == 'epsilon' else '> 0'}"
    return None

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
