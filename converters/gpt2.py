"""GPT-2 (GPT2LMHeadModel / GPT2Model): learned positions, pre-LN, fused Conv1D QKV."""

from __future__ import annotations

from converters.hf_config import activation, reject
from converters.policy import (IDENTITY, Policy, Rule, layer_norm_rules, linear_rules, lm_head_rules)
from dsjax.config import ModelConfig


def make_config(hf: dict) -> ModelConfig:
    reject(hf, scale_attn_by_inverse_layer_idx=True, add_cross_attention=True)
    return ModelConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["n_embd"],
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
        max_position_embeddings=hf["n_positions"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation(hf.get("activation_function", "gelu_new")),
        positions="learned",
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    # GPT-2's Conv1D stores weights as [in, out] already: no transpose for the blocks.
    layer, hf = "layers.{i}.", "h.{i}."
    rules = [Rule("embed.embedding", ("wte.weight",)), Rule("pos_embed.embedding", ("wpe.weight",)),
             *layer_norm_rules("final_norm", "ln_f"),
             *layer_norm_rules(layer + "attn_norm", hf + "ln_1"),
             *layer_norm_rules(layer + "mlp_norm", hf + "ln_2")]
    for ours, theirs in [("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                         ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]:
        rules += linear_rules(layer + ours, hf + theirs, IDENTITY)
    rules += lm_head_rules(cfg)
    return tuple(rules)


POLICY = Policy(
    name="gpt2",
    model_types=("gpt2",),
    architectures=("GPT2LMHeadModel", "GPT2Model"),
    prefix="transformer.",
    make_config=make_config,
    make_rules=make_rules,
    # causal-mask buffers of older checkpoints; the LM head when it is tied to wte
    ignore=(r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
)
