"""BERT (BertModel / BertForMaskedLM / BertForSequenceClassification): post-LN encoder blocks,
token-type embeddings, an embedding LayerNorm, a tanh pooler, MLM and classification heads."""

from __future__ import annotations

from converters.hf_config import activation, reject
from converters.policy import (TRANSPOSE, Policy, Rule, fused_linear_rules, layer_norm_rules,
                               linear_rules, qkv_widths)
from dsjax.config import EncoderConfig, ModelConfig

# HF class -> (pooler, head). BertForMaskedLM is built without the pooler.
HEADS = {
    "BertModel": ("tanh", "none"),
    "BertForMaskedLM": ("none", "mlm"),
    "BertForSequenceClassification": ("tanh", "classifier"),
}
QKV = ("query", "key", "value")


def architecture(hf: dict, default: str) -> str:
    """The HF class a checkpoint was saved from (its first `architectures` entry)."""
    archs = hf.get("architectures") or [default]
    return archs[0]


def num_labels(hf: dict) -> int:
    return len(hf.get("id2label") or {}) or int(hf.get("num_labels") or 2)


def make_config(hf: dict) -> ModelConfig:
    reject(hf, is_decoder=True, add_cross_attention=True,
           position_embedding_type=lambda v: v not in (None, "absolute"))
    pooler, head = HEADS[architecture(hf, "BertModel")]
    return ModelConfig(
        family="bert",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=activation(hf.get("hidden_act", "gelu")),
        type_vocab_size=hf.get("type_vocab_size", 2),
        **post_ln_encoder(hf, pooler, head),
    )


def post_ln_encoder(hf: dict, pooler: str, head: str) -> dict:
    """The ModelConfig fields BERT and DistilBERT share: bidirectional post-LN blocks after an
    embedding LayerNorm, learned positions, and their heads."""
    return dict(
        norm="layernorm", norm_position="post", final_norm=False, embedding_norm=True,
        positions="learned", causal=False,
        # only the MLM head reads the vocabulary matrix: its own one if untied
        tie_word_embeddings=hf.get("tie_word_embeddings", True) if head == "mlm" else True,
        encoder=EncoderConfig(pooler=pooler, head=head,
                              num_labels=num_labels(hf) if head == "classifier" else 0))


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, hf = "body.layers.{i}.", "encoder.layer.{i}."
    attn = hf + "attention."
    rules = [
        Rule("body.embed.embedding", ("embeddings.word_embeddings.weight",)),
        Rule("body.pos_embed.embedding", ("embeddings.position_embeddings.weight",)),
        Rule("body.type_embed.embedding", ("embeddings.token_type_embeddings.weight",)),
        *layer_norm_rules("body.embed_norm", "embeddings.LayerNorm"),
        *fused_linear_rules(layer + "attn.qkv", tuple(f"{attn}self.{p}" for p in QKV),
                            qkv_widths(cfg), cfg.hidden_size),
        *linear_rules(layer + "attn.out", attn + "output.dense"),
        *layer_norm_rules(layer + "attn_norm", attn + "output.LayerNorm"),
        *linear_rules(layer + "mlp.up", hf + "intermediate.dense"),
        *linear_rules(layer + "mlp.down", hf + "output.dense"),
        *layer_norm_rules(layer + "mlp_norm", hf + "output.LayerNorm"),
    ]
    enc = cfg.encoder
    if enc.pooler == "tanh":
        rules += linear_rules("pooler.dense", "pooler.dense")
    if enc.head == "mlm":
        rules += [*linear_rules("mlm.dense", "cls.predictions.transform.dense"),
                  *layer_norm_rules("mlm.norm", "cls.predictions.transform.LayerNorm")]
        if cfg.tie_word_embeddings:  # decoder.bias is cls.predictions.bias
            rules.append(Rule("mlm.bias", ("cls.predictions.bias",)))
        else:  # HF's untied decoder adds its own bias; cls.predictions.bias goes unused
            rules += [Rule("body.lm_head.kernel", ("cls.predictions.decoder.weight",), TRANSPOSE),
                      Rule("mlm.bias", ("cls.predictions.decoder.bias",))]
    if enc.head == "classifier":
        rules += linear_rules("classifier", "classifier")
    return tuple(rules)


POLICY = Policy(
    name="bert",
    model_types=("bert",),
    architectures=tuple(HEADS),
    prefix="bert.",
    make_config=make_config,
    make_rules=make_rules,
    ignore=(
        r"embeddings\.(position_ids|token_type_ids)",  # buffers
        r"cls\.predictions\.(bias|decoder\.weight|decoder\.bias)",  # tied copies / unused bias
        # what BertForPreTraining saved and BertForMaskedLM drops, as HF drops them
        r"pooler\.dense\.(weight|bias)", r"cls\.seq_relationship\.(weight|bias)",
    ),
    renames=((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias")),
)
