"""DistilBERT (DistilBertModel / DistilBertForMaskedLM / DistilBertForSequenceClassification):
BERT's post-LN blocks without token types, LayerNorm eps fixed at 1e-12, its own layer names;
the classifier pools through a ReLU pre-classifier."""

from __future__ import annotations

from converters.bert import architecture, post_ln_encoder
from converters.hf_config import activation
from converters.policy import (TRANSPOSE, Policy, Rule, fused_linear_rules, layer_norm_rules,
                               linear_rules, qkv_widths)
from dsjax.config import ModelConfig

# HF class -> (pooler, head); DistilBERT has no pooler of its own, only the classifier's.
HEADS = {
    "DistilBertModel": ("none", "none"),
    "DistilBertForMaskedLM": ("none", "mlm"),
    "DistilBertForSequenceClassification": ("relu", "classifier"),
}


def make_config(hf: dict) -> ModelConfig:
    pooler, head = HEADS[architecture(hf, "DistilBertModel")]
    return ModelConfig(
        family="distilbert",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["dim"],
        num_layers=hf["n_layers"],
        num_heads=hf["n_heads"],
        intermediate_size=hf["hidden_dim"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        norm_eps=1e-12,  # hard-coded in HF's DistilBERT
        activation=activation(hf.get("activation", "gelu")),
        # sinusoidal_pos_embds tables are stored like learned ones
        **post_ln_encoder(hf, pooler, head),
    )


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "body.layers.{i}.", "transformer.layer.{i}."
    attn = hf + "attention."
    rules = [
        Rule("body.embed.embedding", ("embeddings.word_embeddings.weight",)),
        Rule("body.pos_embed.embedding", ("embeddings.position_embeddings.weight",)),
        *layer_norm_rules("body.embed_norm", "embeddings.LayerNorm"),
        *fused_linear_rules(layer + "attn.qkv", tuple(f"{attn}{p}_lin" for p in "qkv"),
                            qkv_widths(cfg), cfg.hidden_size),
        *linear_rules(layer + "attn.out", attn + "out_lin"),
        *layer_norm_rules(layer + "attn_norm", hf + "sa_layer_norm"),
        *linear_rules(layer + "mlp.up", hf + "ffn.lin1"),
        *linear_rules(layer + "mlp.down", hf + "ffn.lin2"),
        *layer_norm_rules(layer + "mlp_norm", hf + "output_layer_norm"),
    ]
    enc = cfg.encoder
    if enc.head == "mlm":
        rules += [*linear_rules("mlm.dense", "vocab_transform"),
                  *layer_norm_rules("mlm.norm", "vocab_layer_norm"),
                  Rule("mlm.bias", ("vocab_projector.bias",))]
        if not cfg.tie_word_embeddings:
            rules.append(Rule("body.lm_head.kernel", ("vocab_projector.weight",), TRANSPOSE))
    if enc.head == "classifier":
        rules += [*linear_rules("pooler.dense", "pre_classifier"),
                  *linear_rules("classifier", "classifier")]
    return tuple(rules)


POLICY = Policy(
    name="distilbert",
    model_types=("distilbert",),
    architectures=tuple(HEADS),
    prefix="distilbert.",
    make_config=make_config,
    make_rules=make_rules,
    # the position-id buffer; the vocabulary projection when it is the tied word embedding
    ignore=(r"embeddings\.position_ids", r"vocab_projector\.weight"),
)
