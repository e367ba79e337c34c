"""BLOOM: ALiBi, LayerNorm after the embedding, fused QKV stored per head, tied LM head."""

from __future__ import annotations

from converters.hf_config import reject
from converters.policy import (Policy, Rule, fused_qkv_rules, layer_norm_rules, linear_rules,
                               lm_head_rules)
from dsjax.config import ModelConfig


def make_config(hf: dict) -> ModelConfig:
    reject(hf, apply_residual_connection_post_layernorm=True,
           pretraining_tp=lambda v: v not in (None, 1) and hf.get("slow_but_exact"))
    D = hf.get("hidden_size") or hf["n_embed"]
    return ModelConfig(
        family="bloom", vocab_size=hf["vocab_size"], hidden_size=D, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], intermediate_size=4 * D,
        max_position_embeddings=hf.get("seq_length") or 2048,
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), embedding_norm=True,
        activation="gelu_tanh", positions="alibi",
        tie_word_embeddings=hf.get("tie_word_embeddings", True))


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "layers.{i}.", "h.{i}."
    rules = [Rule("embed.embedding", ("word_embeddings.weight",)),
             *layer_norm_rules("embed_norm", "word_embeddings_layernorm"),
             *layer_norm_rules("final_norm", "ln_f"),
             *layer_norm_rules(layer + "attn_norm", hf + "input_layernorm"),
             *layer_norm_rules(layer + "mlp_norm", hf + "post_attention_layernorm"),
             *fused_qkv_rules(layer + "attn.qkv", hf + "self_attention.query_key_value", cfg)]
    for ours, theirs in [("attn.out", "self_attention.dense"), ("mlp.up", "mlp.dense_h_to_4h"),
                         ("mlp.down", "mlp.dense_4h_to_h")]:
        rules += linear_rules(layer + ours, hf + theirs)
    rules += lm_head_rules(cfg)
    return tuple(rules)


POLICY = Policy(name="bloom", model_types=("bloom",), architectures=("BloomForCausalLM", "BloomModel"),
                prefix="transformer.", make_config=make_config, make_rules=make_rules,
                ignore=(r"lm_head\.weight",))
