"""OPT: learned positions at an offset of 2, pre-LN or (350m) post-LN blocks with the embeddings
projected in and out of a narrower width, ReLU, tied LM head."""

from __future__ import annotations

from converters.hf_config import activation, reject
from converters.policy import (Policy, Rule, fused_linear_rules, layer_norm_rules, linear_rules,
                               lm_head_rules, qkv_widths)
from dsjax.config import ModelConfig


def make_config(hf: dict) -> ModelConfig:
    reject(hf, layer_norm_elementwise_affine=False, enable_bias=False)
    D = hf["hidden_size"]
    pre = hf.get("do_layer_norm_before", True)
    proj = hf.get("word_embed_proj_dim") or D
    return ModelConfig(
        family="opt", vocab_size=hf["vocab_size"], hidden_size=D, num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["ffn_dim"],
        max_position_embeddings=hf["max_position_embeddings"], position_offset=2,
        norm_position="pre" if pre else "post",
        final_norm=pre and not hf.get("_remove_final_layer_norm", False),
        activation=activation(hf.get("activation_function", "relu")),
        embed_proj_dim=proj if proj != D else None,
        tie_word_embeddings=hf.get("tie_word_embeddings", True))


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "layers.{i}.", "decoder.layers.{i}."
    attn = hf + "self_attn."
    rules = [Rule("embed.embedding", ("decoder.embed_tokens.weight",)),
             Rule("pos_embed.embedding", ("decoder.embed_positions.weight",)),
             *layer_norm_rules(layer + "attn_norm", hf + "self_attn_layer_norm"),
             *layer_norm_rules(layer + "mlp_norm", hf + "final_layer_norm"),
             *fused_linear_rules(layer + "attn.qkv", tuple(f"{attn}{p}_proj" for p in "qkv"),
                                 qkv_widths(cfg), cfg.hidden_size),
             *linear_rules(layer + "attn.out", attn + "out_proj"),
             *linear_rules(layer + "mlp.up", hf + "fc1"),
             *linear_rules(layer + "mlp.down", hf + "fc2")]
    if cfg.final_norm:
        rules += layer_norm_rules("final_norm", "decoder.final_layer_norm")
    if cfg.embed_proj_dim:
        rules += [*linear_rules("project_in", "decoder.project_in", bias=False),
                  *linear_rules("project_out", "decoder.project_out", bias=False)]
    rules += lm_head_rules(cfg)
    return tuple(rules)


POLICY = Policy(name="opt", model_types=("opt",), architectures=("OPTForCausalLM", "OPTModel"),
                prefix="model.", make_config=make_config, make_rules=make_rules,
                ignore=(r"lm_head\.weight",))
