"""GPT-NeoX (Pythia, ...): rotary on a fraction of each head (half layout), parallel or
sequential residual, fused QKV stored per head, untied output embedding."""

from __future__ import annotations

from converters.hf_config import activation, rope_scaling
from converters.policy import (Policy, Rule, fused_qkv_rules, layer_norm_rules, linear_rules,
                               lm_head_rules)
from dsjax.config import ModelConfig


def make_config(hf: dict) -> ModelConfig:
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = rope_scaling({"rope_theta": hf.get("rotary_emb_base", 10000.0), **hf})
    params = hf.get("rope_parameters") or {}
    fraction = params.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))
    bias = hf.get("attention_bias", True)
    return ModelConfig(
        family="gpt_neox", vocab_size=hf["vocab_size"], hidden_size=D,
        num_layers=hf["num_hidden_layers"], num_heads=H, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("layer_norm_eps", 1e-5), activation=activation(hf.get("hidden_act", "gelu")),
        positions="rotary", rotary_dim=int(D // H * fraction), rotary_layout="half",
        rope_theta=theta, rope_scaling=scaling,
        parallel_residual=hf.get("use_parallel_residual", True), qkv_bias=bias, out_bias=bias,
        tie_word_embeddings=hf.get("tie_word_embeddings", False))


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "layers.{i}.", "layers.{i}."
    rules = [Rule("embed.embedding", ("embed_in.weight",)),
             *layer_norm_rules("final_norm", "final_layer_norm"),
             *layer_norm_rules(layer + "attn_norm", hf + "input_layernorm"),
             *layer_norm_rules(layer + "mlp_norm", hf + "post_attention_layernorm"),
             *fused_qkv_rules(layer + "attn.qkv", hf + "attention.query_key_value", cfg, cfg.qkv_bias),
             *linear_rules(layer + "attn.out", hf + "attention.dense", bias=cfg.out_bias),
             *linear_rules(layer + "mlp.up", hf + "mlp.dense_h_to_4h"),
             *linear_rules(layer + "mlp.down", hf + "mlp.dense_4h_to_h")]
    rules += lm_head_rules(cfg)
    return tuple(rules)


POLICY = Policy(name="gpt_neox", model_types=("gpt_neox",),
                architectures=("GPTNeoXForCausalLM", "GPTNeoXModel"), prefix="gpt_neox.",
                make_config=make_config, make_rules=make_rules,
                ignore=(r"layers\.\d+\.attention\.(masked_bias|bias|rotary_emb\.inv_freq)",),
                renames=((r"^embed_out\.weight$", "lm_head.weight"),))  # transformers < 5 name
