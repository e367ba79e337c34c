"""Encoders (BERT, DistilBERT, CLIP): the ONE generic Transformer run bidirectionally (or causal,
for CLIP's text tower), plus the small family-specific modules around it.

An `Encoder` owns one body (`dsjax.model.Transformer`) and, as its ModelConfig.encoder says, a
patch embedding (image towers), a pooler, an MLM or classification head, a projection, and a
second `Encoder` for images beside a text tower (CLIPModel) with the pair's logit scale.

Shapes: B batch, T tokens, D hidden, V vocabulary, L labels, P projection, N patches,
C channels, S image side, p patch side.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.config import ImageConfig, ModelConfig
from dsjax.model import Linear, Norm, Transformer, _normal
from dsjax.policy import ONCE, KernelPolicy
from dsjax.prompts import bucket, row_mask, token_rows

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature (HF logit_scale_init_value)


class PatchEmbed(nnx.Module):
    """Images [B, C, S, S] -> [class token | patch embeddings] [B, 1 + N, D]."""

    def __init__(self, image: ImageConfig, dim: int, *, dtype, rngs: nnx.Rngs, policy):
        p = image.patch_size
        self.image = image
        self.proj = Linear(image.num_channels * p * p, dim, bias=False, dtype=dtype, rngs=rngs,
                           policy=policy)  # the stride-p conv as a map of flattened [C, p, p] patches
        self.class_embedding = nnx.Param(_normal(rngs, (dim,), dtype))  # [D]

    def __call__(self, pixels):
        B, C = pixels.shape[:2]
        p = self.image.patch_size
        g = self.image.image_size // p  # patches per side; the conv drops leftover pixels
        x = pixels[:, :, : g * p, : g * p].reshape(B, C, g, p, g, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)  # [B, N, C p p], row-major
        x = self.proj(x.astype(self.proj.kernel.dtype))  # [B, N, D]
        cls = jnp.broadcast_to(self.class_embedding[...], (B, 1, x.shape[-1]))  # [B, 1, D]
        return jnp.concatenate([cls, x], axis=1)


class Pooler(nnx.Module):
    """hidden [B, T, D] (and per-row token index [B]) -> pooler_output [B, D]; see
    EncoderConfig.pooler for the kinds."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, policy):
        self.kind = cfg.encoder.pooler
        D = cfg.hidden_size
        dense = self.kind in ("tanh", "relu")
        self.dense = Linear(D, D, bias=True, dtype=dtype, rngs=rngs, policy=policy) if dense else None
        self.norm = Norm(cfg, D, dtype=dtype, policy=policy) if self.kind == "class" else None

    def __call__(self, hidden, index):
        if self.kind in ("eos", "argmax"):
            return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
        first = hidden[:, 0]  # [B, D]
        if self.norm is not None:
            return self.norm(first)
        y = self.dense(first)
        return jnp.tanh(y) if self.kind == "tanh" else jax.nn.relu(y)


class MLMHead(nnx.Module):
    """BERT's and DistilBERT's masked-LM head: dense, activation, LayerNorm, then the body's
    vocabulary matrix (tied embedding or its own) plus a bias."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, policy):
        D = cfg.hidden_size
        self.dense = Linear(D, D, bias=True, dtype=dtype, rngs=rngs, policy=policy)
        self.norm = Norm(cfg, D, dtype=dtype, policy=policy)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), dtype))  # [V]
        self.act = cfg.activation

    def __call__(self, hidden, body: Transformer):
        h = self.norm(self.dense(hidden, activation=self.act))  # [B, T, D]
        return body.logits(h) + self.bias[...].astype(jnp.float32)  # [B, T, V] float32


class Encoder(nnx.Module):
    """A body and the family modules ModelConfig.encoder asks for (None where absent)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 policy: KernelPolicy | None = None):
        enc, D, policy = cfg.encoder, cfg.hidden_size, policy or KernelPolicy()
        if enc is None:
            raise ValueError(f"{cfg.family}: ModelConfig.encoder is None; build a Transformer")
        kw = dict(dtype=dtype, rngs=rngs, policy=policy)
        self.cfg = cfg
        self.body = Transformer(cfg, **kw)
        self.patches = PatchEmbed(enc.image, D, **kw) if enc.image else None
        self.pooler = Pooler(cfg, **kw) if enc.pooler != "none" else None
        self.mlm = MLMHead(cfg, **kw) if enc.head == "mlm" else None
        self.classifier = (Linear(D, enc.num_labels, bias=True, **kw)
                           if enc.head == "classifier" else None)
        self.projection = (Linear(D, enc.projection_dim, bias=False, **kw)
                           if enc.projection_dim else None)
        self.vision = Encoder(enc.vision, **kw) if enc.vision else None
        self.logit_scale = (nnx.Param(jnp.asarray(LOGIT_SCALE_INIT, dtype))  # [] (log scale)
                            if enc.vision else None)

    def encode_text(self, tokens, key_mask, token_types, pool_index) -> dict:
        """tokens, key_mask (True = real token), token_types: [B, T]; pool_index [B]: the
        token each row pools ('eos'/'argmax' poolers). Positions are 0..T-1, as in HF."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        hidden, _ = self.body(tokens, positions, None, key_mask=key_mask, token_types=token_types)
        return self._outputs(hidden, pool_index)

    def encode_image(self, pixels) -> dict:
        """pixels [B, C, S, S] -> outputs over the 1 + N class and patch tokens."""
        x = self.patches(pixels)  # [B, 1 + N, D]
        shape = x.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
        hidden, _ = self.body(jnp.zeros(shape, jnp.int32), positions, None,
                              key_mask=jnp.ones(shape, bool), inputs_embeds=x)
        return self._outputs(hidden, jnp.zeros(shape[:1], jnp.int32))

    def _outputs(self, hidden, pool_index) -> dict:
        f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
        pooled = None if self.pooler is None else self.pooler(hidden, pool_index)  # [B, D]
        logits = None
        if self.mlm is not None:
            logits = self.mlm(hidden, self.body)  # [B, T, V]
        elif self.classifier is not None:
            logits = self.classifier(pooled)  # [B, L]
        embeds = None if self.projection is None else self.projection(pooled)  # [B, P]
        return {"last_hidden_state": f32(hidden), "pooler_output": f32(pooled),
                "logits": f32(logits), "embeds": f32(embeds)}


def module_for(cfg: ModelConfig) -> type[nnx.Module]:
    """Encoders (BERT, DistilBERT, CLIP) wrap the Transformer body with their own heads."""
    return Encoder if cfg.encoder else Transformer


# ----------------------------------------------------------------------------- jitted calls

@functools.partial(jax.jit, static_argnames=("graphdef",))
def encode_text(graphdef, params, tokens, key_mask, token_types, pool_index) -> dict:
    """The text tower's outputs (float32); see Encoder.encode_text."""
    ONCE.new_program()
    return nnx.merge(graphdef, params).encode_text(tokens, key_mask, token_types, pool_index)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def encode_image(graphdef, params, pixels) -> dict:
    """The image tower's outputs (float32): the model itself, or its `vision` tower."""
    ONCE.new_program()
    model = nnx.merge(graphdef, params)
    return (model if model.patches is not None else model.vision).encode_image(pixels)


# ----------------------------------------------------------------------------- outputs

@dataclasses.dataclass(frozen=True)
class EmbeddingOutput:
    """What an encoder tower computes for a batch (float32; rows and tokens as given).

    last_hidden_state: [B, T, D] (text) or [B, 1 + N, D] (images: class token first).
    pooler_output: [B, D] from the model's pooler (EncoderConfig.pooler), None without one.
    logits: MLM [B, T, V] or classification [B, L]; None without a head.
    embeds: [B, P] the projected pooler_output (CLIP's get_text/image_features; unnormalized).
    attention_mask: [B, T] int32, 1 at real tokens (all ones for images). Hidden states at
      padded positions are computed but carry no meaning.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None
    logits: jax.Array | None
    embeds: jax.Array | None
    attention_mask: np.ndarray

    def mean_pooled(self) -> jax.Array:
        """[B, D]: the mean of last_hidden_state over each row's real tokens."""
        m = jnp.asarray(self.attention_mask, jnp.float32)[..., None]  # [B, T, 1]
        return (self.last_hidden_state * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


@dataclasses.dataclass(frozen=True)
class CLIPOutput:
    """HF CLIPModel's outputs. Embeds are L2-normalized projections; the logits are
    exp(logit_scale) times their cosine similarities."""

    logits_per_image: jax.Array  # [I, N]
    logits_per_text: jax.Array  # [N, I]
    text_embeds: jax.Array  # [N, P]
    image_embeds: jax.Array  # [I, P]


def clip_output(text_embeds, image_embeds, logit_scale) -> CLIPOutput:
    """Unnormalized projections [N, P], [I, P] and the log scale [] -> CLIPOutput."""
    t = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    i = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    per_text = jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * (t @ i.T)  # [N, I]
    return CLIPOutput(per_text.T, per_text, t, i)


def output(raw: dict, rows: int, tokens: int, mask: np.ndarray) -> EmbeddingOutput:
    """Cuts the bucket padding off a jitted call's outputs."""
    cut = lambda x: None if x is None else x[:rows, :tokens] if x.ndim == 3 else x[:rows]  # noqa: E731
    return EmbeddingOutput(cut(raw["last_hidden_state"]), cut(raw["pooler_output"]),
                           cut(raw["logits"]), cut(raw["embeds"]), mask)


# ----------------------------------------------------------------------------- host-side inputs

@dataclasses.dataclass(frozen=True)
class TextBatch:
    """A text batch right-padded to bucketed [B', T'] (so that new sizes inside a bucket do not
    recompile); `rows` x `tokens` is the caller's part, `mask` its attention mask."""

    arrays: tuple  # (tokens [B', T'], key_mask [B', T'], token_types [B', T'] | None, pool_index [B'])
    rows: int
    tokens: int
    mask: np.ndarray  # [rows, tokens] int32


def pool_index(cfg: ModelConfig, rows: list[np.ndarray]) -> np.ndarray:
    """[B] the token each row pools, by HF CLIPTextModel's rule: the first eos_token_id (row 0
    if none), or, for the legacy eos_token_id == 2 configs, the first largest id."""
    kind = cfg.encoder.pooler
    if kind == "eos":
        return np.asarray([int(np.argmax(r == cfg.encoder.eos_token_id)) for r in rows], np.int32)
    if kind == "argmax":
        return np.asarray([int(np.argmax(r)) for r in rows], np.int32)
    return np.zeros((len(rows),), np.int32)


def pack_text(cfg: ModelConfig, input_ids, attention_mask=None, token_type_ids=None) -> TextBatch:
    """Checks and pads an encoder's text inputs; see EncoderEngine.embed for the forms."""
    rows = token_rows(input_ids, "input_ids")
    B, T = len(rows), max(r.size for r in rows)
    if attention_mask is None:
        mask = np.zeros((B, T), np.int32)
        for b, r in enumerate(rows):
            mask[b, : r.size] = 1
    else:
        mask = row_mask(rows, attention_mask).astype(np.int32)
    cfg.check_length(T)
    cfg.check_ids(np.concatenate(rows))
    limit = cfg.max_position_embeddings if cfg.positions == "learned" else None
    Bp, Tp = bucket(B, minimum=1), bucket(T, minimum=8)
    Tp = min(Tp, limit) if limit is not None else Tp
    tokens, key_mask = np.zeros((Bp, Tp), np.int32), np.zeros((Bp, Tp), bool)
    for b, r in enumerate(rows):
        tokens[b, : r.size] = r
    key_mask[:B, :T] = mask.astype(bool)
    types = _token_types(cfg, token_type_ids, rows, (Bp, Tp))
    index = np.zeros((Bp,), np.int32)
    index[:B] = pool_index(cfg, rows)
    arrays = (jnp.asarray(tokens), jnp.asarray(key_mask),
              None if types is None else jnp.asarray(types), jnp.asarray(index))
    return TextBatch(arrays, B, T, mask)


def _token_types(cfg: ModelConfig, token_type_ids, rows, shape) -> np.ndarray | None:
    if token_type_ids is None:
        return None
    if not cfg.type_vocab_size:
        raise ValueError(f"this {cfg.family} model has no token types; drop token_type_ids")
    types = token_rows(token_type_ids, "token_type_ids")
    if [t.size for t in types] != [r.size for r in rows]:
        raise ValueError("token_type_ids must have the shape of input_ids")
    flat = np.concatenate(types)
    if flat.min() < 0 or flat.max() >= cfg.type_vocab_size:
        raise ValueError(f"token_type_ids must lie in [0, {cfg.type_vocab_size}); "
                         f"got [{flat.min()}, {flat.max()}]")
    out = np.zeros(shape, np.int32)
    for b, t in enumerate(types):
        out[b, : t.size] = t
    return out


def pack_pixels(image: ImageConfig, pixel_values) -> tuple[jax.Array, int]:
    """[B, C, S, S] or [C, S, S] pixel values (already normalized, as HF's image processor
    gives them) -> (float32 [B', C, S, S] padded to a bucketed batch, B)."""
    x = np.asarray(pixel_values)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"pixel_values must be numbers, got {x.dtype} values")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("pixel_values hold NaN or inf")
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be [batch, channels, height, width], got {x.shape}")
    B, C, H, W = x.shape
    S = image.image_size
    if C != image.num_channels:
        raise ValueError(f"pixel_values have {C} channels; the model takes {image.num_channels}")
    if (H, W) != (S, S):
        raise ValueError(f"input image size ({H}*{W}) doesn't match the model's ({S}*{S}); "
                         "resize and crop as the checkpoint's image processor does")
    padded = np.zeros((bucket(B, minimum=1), C, S, S), np.float32)
    padded[:B] = x
    return jnp.asarray(padded), B
