"""LLaMA and its descendants with the same tensor names: Mistral (sliding window), Qwen2 (QKV
bias), Gemma (scaled embeddings, GeGLU, RMSNorm with +1, tied head), and their sparse-expert
kin Mixtral, Qwen2-MoE, Qwen3-MoE (q/k RMSNorm per head) and OLMoE (q/k RMSNorm over the
projections) (converters/moe.py). RMSNorm, rotary (half layout), gated MLP,
GQA/MQA."""

from __future__ import annotations

import math

from converters.hf_config import activation, reject, rope_scaling
from converters import moe
from converters.loader import CheckpointError
from converters.policy import (Policy, Rule, fused_linear_rules, layer_norm_rules, linear_rules,
                               lm_head_rules, qkv_widths)
from dsjax.config import ModelConfig

# what each model type fixes beyond the shared LLaMA fields
_QUIRKS = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True, "out_bias": False},
    "gemma": {"norm_plus_one": True, "tie_word_embeddings": True},
    "mixtral": {},
    "qwen2_moe": {"qkv_bias": True, "out_bias": False},
    "qwen3_moe": {"qk_norm": "head"},
    "olmoe": {"qk_norm": "full"},
}


def _windows(hf: dict) -> tuple[int | None, tuple[int, ...] | None]:
    """(sliding_window, local layers or None for all) from `layer_types` / `sliding_window`."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if (hf.get("model_type") in ("qwen2", "qwen2_moe", "qwen3_moe")
            and not hf.get("use_sliding_window", False)):
        window = None
    if window is None:
        return None, None
    if types is None:
        return window, None
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise CheckpointError(f"layer_types {sorted(unknown)} are not supported")
    local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (window, local) if local else (None, None)


def make_config(hf: dict) -> ModelConfig:
    reject(hf, pretraining_tp=lambda v: v not in (None, 1), clip_qkv=lambda v: v is not None)
    kind = hf.get("model_type", "llama")
    quirks = _QUIRKS[kind]
    theta, scaling = rope_scaling(hf)
    window, local = _windows(hf)
    bias = bool(hf.get("attention_bias", False))
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    return ModelConfig(
        family=kind,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_plus_one=quirks.get("norm_plus_one", False),
        activation=activation(act),
        gated_mlp=True,
        positions="rotary",
        rotary_layout="half",
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        local_layers=local,
        qkv_bias=quirks.get("qkv_bias", bias),
        out_bias=quirks.get("out_bias", bias),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", quirks.get("tie_word_embeddings", False))),
        embed_scale=math.sqrt(hf["hidden_size"]) if kind == "gemma" else 1.0,
        qk_norm=quirks.get("qk_norm", "none"),
        moe=moe.moe_config(hf),
    )


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "layers.{i}.", "layers.{i}."
    attn, mlp = hf + "self_attn.", hf + "mlp."
    rules = [
        Rule("embed.embedding", ("embed_tokens.weight",)),
        *layer_norm_rules("final_norm", "norm", bias=False),
        *layer_norm_rules(layer + "attn_norm", hf + "input_layernorm", bias=False),
        *layer_norm_rules(layer + "mlp_norm", hf + "post_attention_layernorm", bias=False),
        *fused_linear_rules(layer + "attn.qkv", tuple(f"{attn}{p}_proj" for p in "qkv"),
                            qkv_widths(cfg), cfg.hidden_size, bias=cfg.qkv_bias),
        *linear_rules(layer + "attn.out", attn + "o_proj", bias=cfg.out_bias),
    ]
    if cfg.qk_norm != "none":
        rules += [*layer_norm_rules(layer + "attn.q_norm", attn + "q_norm", bias=False),
                  *layer_norm_rules(layer + "attn.k_norm", attn + "k_norm", bias=False)]
    if cfg.moe is None:
        rules += _dense_mlp(cfg, layer, mlp)
    else:  # layer by layer: sparse and dense layers may alternate
        for i in range(cfg.num_layers):
            dense = lambda j: _dense_mlp(cfg, f"layers.{j}.", f"layers.{j}.mlp.")  # noqa: E731
            rules += moe.mlp_rules(cfg, cfg.family, i, dense)
    rules += lm_head_rules(cfg)
    return tuple(rules)


def _dense_mlp(cfg: ModelConfig, ours: str, theirs: str) -> list[Rule]:
    return [*fused_linear_rules(ours + "mlp.up", (theirs + "gate_proj", theirs + "up_proj"),
                                (cfg.intermediate_size,) * 2, cfg.hidden_size, bias=cfg.mlp_bias),
            *linear_rules(ours + "mlp.down", theirs + "down_proj", bias=cfg.mlp_bias)]


POLICY = Policy(
    name="llama",
    model_types=tuple(_QUIRKS),
    architectures=tuple(f"{name}{head}" for name in ("Llama", "Mistral", "Qwen2", "Gemma",
                                                     "Mixtral", "Qwen2Moe", "Qwen3Moe", "Olmoe")
                        for head in ("ForCausalLM", "Model")),
    prefix="model.",
    make_config=make_config,
    make_rules=make_rules,
    ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"),
)
