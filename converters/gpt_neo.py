"""GPT-Neo: alternating global/local attention (a window on the local layers), no attention
scaling, separate bias-free q/k/v projections, learned positions, tied LM head."""

from __future__ import annotations

from converters.hf_config import activation
from converters.loader import CheckpointError
from converters.policy import (Policy, Rule, fused_linear_rules, layer_norm_rules, linear_rules,
                               lm_head_rules, qkv_widths)
from dsjax.config import ModelConfig


def _layer_kinds(hf: dict) -> list[str]:
    kinds = hf.get("attention_layers") or [k for kinds, n in hf["attention_types"] for _ in range(n)
                                           for k in kinds]
    unknown = set(kinds) - {"global", "local"}
    if unknown or len(kinds) != hf["num_layers"]:
        raise CheckpointError(f"GPT-Neo attention layers {kinds} do not give one of global/local "
                              f"for each of the {hf['num_layers']} layers")
    return kinds


def make_config(hf: dict) -> ModelConfig:
    D = hf["hidden_size"]
    kinds = _layer_kinds(hf)
    return ModelConfig(
        family="gpt_neo", vocab_size=hf["vocab_size"], hidden_size=D, num_layers=hf["num_layers"],
        num_heads=hf["num_heads"], intermediate_size=hf.get("intermediate_size") or 4 * D,
        max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation(hf.get("activation_function", "gelu_new")), attn_scale=1.0,
        sliding_window=hf["window_size"],
        local_layers=tuple(i for i, k in enumerate(kinds) if k == "local"),
        qkv_bias=False, tie_word_embeddings=hf.get("tie_word_embeddings", True))


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "layers.{i}.", "h.{i}."
    attn = hf + "attn.attention."
    rules = [Rule("embed.embedding", ("wte.weight",)), Rule("pos_embed.embedding", ("wpe.weight",)),
             *layer_norm_rules("final_norm", "ln_f"),
             *layer_norm_rules(layer + "attn_norm", hf + "ln_1"),
             *layer_norm_rules(layer + "mlp_norm", hf + "ln_2"),
             *fused_linear_rules(layer + "attn.qkv", tuple(f"{attn}{p}_proj" for p in "qkv"),
                                 qkv_widths(cfg), cfg.hidden_size, bias=False),
             *linear_rules(layer + "attn.out", attn + "out_proj"),
             *linear_rules(layer + "mlp.up", hf + "mlp.c_fc"),
             *linear_rules(layer + "mlp.down", hf + "mlp.c_proj")]
    rules += lm_head_rules(cfg)
    return tuple(rules)


POLICY = Policy(name="gpt_neo", model_types=("gpt_neo",),
                architectures=("GPTNeoForCausalLM", "GPTNeoModel"), prefix="transformer.",
                make_config=make_config, make_rules=make_rules,
                ignore=(r"h\.\d+\.attn\.attention\.(masked_)?bias", r"lm_head\.weight"))
