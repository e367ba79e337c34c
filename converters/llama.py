"""LLaMA (LlamaForCausalLM / LlamaModel): RMSNorm, rotary (half layout), gated SiLU, GQA."""

from __future__ import annotations

from converters.hf_config import activation, reject, rope_scaling
from converters.policy import CONCAT, CONCAT_TRANSPOSED, TRANSPOSE, Policy, Rule
from dsjax.config import ModelConfig


def make_config(hf: dict) -> ModelConfig:
    reject(hf, pretraining_tp=lambda v: v not in (None, 1))
    theta, scaling = rope_scaling(hf)
    return ModelConfig(
        family="llama",
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
        activation=activation(hf.get("hidden_act", "silu")),
        gated_mlp=True,
        positions="rotary",
        rotary_layout="half",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bool(hf.get("attention_bias", False)),
        out_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "layers.{i}.", "layers.{i}."
    attn, mlp = hf + "self_attn.", hf + "mlp."
    rules = [
        Rule("embed.embedding", ("embed_tokens.weight",)),
        Rule("final_norm.scale", ("norm.weight",)),
        Rule(layer + "attn_norm.scale", (hf + "input_layernorm.weight",)),
        Rule(layer + "mlp_norm.scale", (hf + "post_attention_layernorm.weight",)),
        Rule(layer + "attn.qkv.kernel", tuple(f"{attn}{p}_proj.weight" for p in "qkv"), CONCAT_TRANSPOSED),
        Rule(layer + "attn.out.kernel", (attn + "o_proj.weight",), TRANSPOSE),
        Rule(layer + "mlp.up.kernel", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), CONCAT_TRANSPOSED),
        Rule(layer + "mlp.down.kernel", (mlp + "down_proj.weight",), TRANSPOSE),
    ]
    if cfg.qkv_bias:
        rules.append(Rule(layer + "attn.qkv.bias", tuple(f"{attn}{p}_proj.bias" for p in "qkv"), CONCAT))
    if cfg.out_bias:
        rules.append(Rule(layer + "attn.out.bias", (attn + "o_proj.bias",)))
    if cfg.mlp_bias:
        rules += [Rule(layer + "mlp.up.bias", (mlp + "gate_proj.bias", mlp + "up_proj.bias"), CONCAT),
                  Rule(layer + "mlp.down.bias", (mlp + "down_proj.bias",))]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.kernel", ("lm_head.weight",), TRANSPOSE))
    return tuple(rules)


POLICY = Policy(
    name="llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM", "LlamaModel"),
    prefix="model.",
    make_config=make_config,
    make_rules=make_rules,
    ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"),
)
