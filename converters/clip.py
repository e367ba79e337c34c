"""CLIP (CLIPModel; CLIPTextModel / CLIPVisionModel and their *WithProjection variants).

The text tower: causal pre-LN blocks, learned positions, a final LayerNorm, pooled at the EOS
token. The image tower: a stride-patch conv (a linear map of flattened patches), a class token,
learned positions, `pre_layrnorm` on the embeddings, no final norm, `post_layernorm` on the
pooled class token. Quick-GELU MLPs; bias-free projections; a learned logit scale.
"""

from __future__ import annotations

from converters.bert import architecture
from converters.hf_config import activation
from converters.loader import CheckpointError
from converters.policy import (CONV_AS_LINEAR, TRANSPOSE, Policy, Rule, fused_linear_rules,
                               layer_norm_rules, linear_rules, qkv_widths)
from dsjax.config import EncoderConfig, ImageConfig, ModelConfig

ARCHITECTURES = ("CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
                 "CLIPVisionModelWithProjection")
_DEFAULT = {"clip": "CLIPModel", "clip_text_model": "CLIPTextModel",
            "clip_vision_model": "CLIPVisionModel"}


def _tower(hf: dict, **overrides) -> ModelConfig:
    fields = dict(
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        activation=activation(hf.get("hidden_act", "quick_gelu")),
        positions="learned",
    )
    return ModelConfig(**fields | overrides)


def text_config(hf: dict, projection_dim: int, vision: ModelConfig | None = None) -> ModelConfig:
    eos = hf.get("eos_token_id")
    if not isinstance(eos, int):
        raise CheckpointError(f"CLIP text config eos_token_id={eos!r}: pooling needs one int id")
    # HF pools at the largest id for the legacy eos_token_id == 2 configs (before PR #24773)
    pooler = "argmax" if eos == 2 else "eos"
    return _tower(hf, family="clip", vocab_size=hf["vocab_size"],
                  max_position_embeddings=hf.get("max_position_embeddings", 77), causal=True,
                  encoder=EncoderConfig(pooler=pooler, eos_token_id=eos,
                                        projection_dim=projection_dim, vision=vision))


def vision_config(hf: dict, projection_dim: int) -> ModelConfig:
    image = ImageConfig(hf["image_size"], hf["patch_size"], hf.get("num_channels", 3))
    return _tower(hf, family="clip_vision", vocab_size=0,
                  max_position_embeddings=image.num_patches + 1, causal=False,
                  embedding_norm=True, final_norm=False,  # pre_layrnorm; no final norm
                  encoder=EncoderConfig(pooler="class", image=image, projection_dim=projection_dim))


def make_config(hf: dict) -> ModelConfig:
    arch = architecture(hf, _DEFAULT.get(hf.get("model_type"), "CLIPModel"))
    nested = hf.get("model_type") == "clip"  # a CLIPConfig: text_config + vision_config
    text = (hf.get("text_config") or {}) if nested else hf
    vision = (hf.get("vision_config") or {}) if nested else hf
    if arch == "CLIPModel":
        if not nested:
            raise CheckpointError(f"CLIPModel needs a 'clip' config, got {hf.get('model_type')!r}")
        P = hf["projection_dim"]
        return text_config(text, P, vision_config(vision, P))
    projected = arch.endswith("WithProjection")
    if arch.startswith("CLIPText"):
        return text_config(text, text.get("projection_dim", 512) if projected else 0)
    return vision_config(vision, vision.get("projection_dim", 512) if projected else 0)


def tower_rules(ours: str, theirs: str, cfg: ModelConfig) -> list[Rule]:
    """One tower's table, layers written out (CLIP's two towers differ in depth)."""
    rules = []
    for i in range(cfg.num_layers):
        layer, hf = f"{ours}body.layers.{i}.", f"{theirs}encoder.layers.{i}."
        attn = hf + "self_attn."
        rules += [
            *layer_norm_rules(layer + "attn_norm", hf + "layer_norm1"),
            *fused_linear_rules(layer + "attn.qkv", tuple(f"{attn}{p}_proj" for p in "qkv"),
                                qkv_widths(cfg), cfg.hidden_size),
            *linear_rules(layer + "attn.out", attn + "out_proj"),
            *layer_norm_rules(layer + "mlp_norm", hf + "layer_norm2"),
            *linear_rules(layer + "mlp.up", hf + "mlp.fc1"),
            *linear_rules(layer + "mlp.down", hf + "mlp.fc2"),
        ]
    emb = theirs + "embeddings."
    rules.append(Rule(ours + "body.pos_embed.embedding", (emb + "position_embedding.weight",)))
    if cfg.takes_images:
        rules += [Rule(ours + "patches.class_embedding", (emb + "class_embedding",)),
                  Rule(ours + "patches.proj.kernel", (emb + "patch_embedding.weight",), CONV_AS_LINEAR),
                  *layer_norm_rules(ours + "body.embed_norm", theirs + "pre_layrnorm"),
                  *layer_norm_rules(ours + "pooler.norm", theirs + "post_layernorm")]
    else:
        rules += [Rule(ours + "body.embed.embedding", (emb + "token_embedding.weight",)),
                  *layer_norm_rules(ours + "body.final_norm", theirs + "final_layer_norm")]
    if cfg.encoder.projection_dim:
        name = "visual_projection" if cfg.takes_images else "text_projection"
        rules.append(Rule(ours + "projection.kernel", (name + ".weight",), TRANSPOSE))
    return rules


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    vision = cfg.encoder.vision
    if vision is None:  # one tower: prefix_for strips its text_model. / vision_model.
        return tuple(tower_rules("", "", cfg))
    rules = tower_rules("", "text_model.", cfg) + tower_rules("vision.", "vision_model.", vision)
    return tuple(rules + [Rule("logit_scale", ("logit_scale",))])


def prefix_for(cfg: ModelConfig) -> str:
    """CLIPModel names carry both towers' prefixes; a one-tower checkpoint's names may carry its
    own (transformers 4, *WithProjection) or none (transformers 5 CLIPTextModel/VisionModel)."""
    if cfg.encoder.vision is not None:
        return ""
    return "vision_model." if cfg.takes_images else "text_model."


POLICY = Policy(
    name="clip",
    model_types=tuple(_DEFAULT),
    architectures=ARCHITECTURES,
    prefix="",
    make_config=make_config,
    make_rules=make_rules,
    ignore=(r"((text|vision)_model\.)?embeddings\.position_ids",),
    prefix_for=prefix_for,
)
