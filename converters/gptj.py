"""GPT-J: rotary on the first rotary_dim features in interleaved pairs, attention and MLP in
parallel off one LayerNorm, bias-free q/k/v/out, an LM head with a bias."""

from __future__ import annotations

from converters.hf_config import activation
from converters.policy import (Policy, Rule, fused_linear_rules, layer_norm_rules, linear_rules,
                               lm_head_rules, qkv_widths)
from dsjax.config import ModelConfig


def make_config(hf: dict) -> ModelConfig:
    D = hf["n_embd"]
    return ModelConfig(
        family="gptj", vocab_size=hf["vocab_size"], hidden_size=D, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * D,
        max_position_embeddings=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation(hf.get("activation_function", "gelu_new")), positions="rotary",
        rotary_dim=hf.get("rotary_dim"), rotary_layout="interleaved",
        parallel_residual=True, shared_norm=True, qkv_bias=False, out_bias=False,
        lm_head_bias=not hf.get("tie_word_embeddings", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False))


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "layers.{i}.", "h.{i}."
    rules = [Rule("embed.embedding", ("wte.weight",)),
             *layer_norm_rules("final_norm", "ln_f"),
             *layer_norm_rules(layer + "attn_norm", hf + "ln_1"),
             *fused_linear_rules(layer + "attn.qkv", tuple(f"{hf}attn.{p}_proj" for p in "qkv"),
                                 qkv_widths(cfg), cfg.hidden_size, bias=False),
             *linear_rules(layer + "attn.out", hf + "attn.out_proj", bias=False),
             *linear_rules(layer + "mlp.up", hf + "mlp.fc_in"),
             *linear_rules(layer + "mlp.down", hf + "mlp.fc_out")]
    rules += lm_head_rules(cfg)
    return tuple(rules)


POLICY = Policy(name="gptj", model_types=("gptj",), architectures=("GPTJForCausalLM", "GPTJModel"),
                prefix="transformer.", make_config=make_config, make_rules=make_rules,
                ignore=(r"h\.\d+\.attn\.(masked_bias|bias|embed_positions)",))
