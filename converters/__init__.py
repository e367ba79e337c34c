"""HF and Megatron-LM checkpoints -> dsjax ModelConfig + parameters.

`open_hf(model)` accepts an HF checkpoint directory, an in-memory transformers model, or a
Megatron-LM GPT checkpoint directory (see converters.megatron; `MegatronCheckpoint(dir,
vocab_size=N)` where the checkpoint does not record its true vocab size).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

from converters.hf_config import build_config
from converters.loader import CheckpointError, TensorSource, from_state_dict, read_json
from converters.megatron import MegatronCheckpoint
from converters.megatron import is_checkpoint as is_megatron
from converters.megatron import open_checkpoint as open_megatron
from converters.policy import Policy, convert, match, untie_if_head_differs
from dsjax.config import ModelConfig
from dsjax.formats.compressed import open_tensors, refuse_compressed_in_memory


def _discover() -> dict[str, Policy]:
    """Every module of this package that defines POLICY is a family (one file per family)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        policy = getattr(module, "POLICY", None)
        if isinstance(policy, Policy):
            found[policy.name] = policy
    return dict(sorted(found.items()))


POLICIES: dict[str, Policy] = _discover()


def policy_for(hf_config: dict) -> Policy:
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"field 'architectures' has the wrong type ({type(archs).__name__}; "
                              "expected a list of class names)")
    for policy in POLICIES.values():
        if model_type in policy.model_types:
            foreign = [a for a in archs if a not in policy.architectures]
            if foreign:
                raise CheckpointError(
                    f"architecture {foreign[0]!r} (model_type {model_type!r}) is not supported; "
                    f"the {policy.name} policy accepts {', '.join(policy.architectures)}")
            return policy
    known = sorted(t for p in POLICIES.values() for t in p.model_types)
    raise CheckpointError(
        f"unknown architecture: model_type {model_type!r} "
        f"(architectures {hf_config.get('architectures')}); dsjax converts {', '.join(known)}")


@dataclasses.dataclass(frozen=True)
class HFSource:
    """What a checkpoint says before any weight is read."""

    hf_config: dict
    config: ModelConfig
    policy: Policy
    tensors: TensorSource
    directory: Path | None  # tokenizer files live here, if any


def open_hf(model) -> HFSource:
    """An HF checkpoint directory, an in-memory transformers model or a Megatron-LM checkpoint
    directory, opened lazily. A Megatron source has no HF config: `hf_config` holds its args.
    The config and the checkpoint's tensor names (and fused parts' shapes) are checked here,
    before any model is built."""
    if isinstance(model, MegatronCheckpoint) or (
            isinstance(model, (str, Path)) and is_megatron(model)):
        return _checked(*open_megatron(model), None)
    if isinstance(model, (str, Path)):
        directory = Path(model)
        cfg_path = directory / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{directory}: no config.json; is this an HF checkpoint directory?")
        hf_config = read_json(cfg_path, "the model config")
        if not isinstance(hf_config, dict):
            raise CheckpointError(f"{cfg_path}: holds a JSON {type(hf_config).__name__}, not an object")
        policy = _policy_for(hf_config, str(cfg_path))  # before touching any weight file
        config = build_config(policy.make_config, hf_config, str(cfg_path))
        # a quantization_config (compressed-tensors, FP8) is read and checked before any header
        tensors = open_tensors(hf_config, directory, str(cfg_path))
        return _checked(hf_config, config, policy, tensors, directory)
    if not (hasattr(model, "state_dict") and hasattr(model, "config")):
        raise TypeError(f"expected an HF checkpoint directory or a transformers model, got {type(model)}")
    hf_config = model.config.to_dict()
    hf_config.setdefault("architectures", None)
    hf_config["architectures"] = [type(model).__name__]
    policy = policy_for(hf_config)
    config = build_config(policy.make_config, hf_config, f"{type(model).__name__}.config")
    tensors = from_state_dict(_stored_names(model), type(model).__name__)
    refuse_compressed_in_memory(hf_config, tensors)
    return _checked(hf_config, config, policy, tensors, None)


def _stored_names(model) -> dict:
    """The model's state dict under the names its checkpoints store: transformers 5 holds some
    weights in memory in another form than it saves them (e.g. MoE experts fused into one
    tensor, which checkpoints keep one per expert) and reverts that itself when saving."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions
        return state
    return revert_weight_conversion(model, state)


def _policy_for(hf_config: dict, where: str) -> Policy:
    try:
        return policy_for(hf_config)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _checked(hf_config: dict, config: ModelConfig, policy: Policy, tensors: TensorSource,
             directory: Path | None) -> HFSource:
    """The source, once its LM head is tied or not as transformers would decide and its names
    match the policy's table (convert() checks them again, with the model's shapes)."""
    config = untie_if_head_differs(policy, config, tensors)
    match(policy, config, tensors)
    return HFSource(hf_config, config, policy, tensors, directory)


__all__ = ["POLICIES", "CheckpointError", "HFSource", "MegatronCheckpoint", "convert", "open_hf",
           "policy_for"]
