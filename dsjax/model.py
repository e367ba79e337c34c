"""ONE generic transformer (Flax NNX) for every family; ModelConfig says which quirks apply.

Shapes: B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads, Dh head dim.
Each layer owns its arrays (`layers` is a list of Blocks, looped over in Python inside the jit):
stacked [layers, ...] arrays made XLA copy each layer's weights on every decode step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax import cache as kv_cache
from dsjax import ops
from dsjax.config import ModelConfig

_INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype)


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs, impl):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), dtype))  # [in, out]
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        self.impl = impl

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        return ops.linear(x, self.kernel[...], bias, impl=self.impl)


class Norm(nnx.Module):
    def __init__(self, cfg: ModelConfig, dim: int, *, dtype, impl):
        self.scale = nnx.Param(jnp.full((dim,), 0.0 if cfg.norm_plus_one else 1.0, dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if cfg.norm == "layernorm" else None
        self.kind, self.eps, self.plus_one, self.impl = cfg.norm, cfg.norm_eps, cfg.norm_plus_one, impl

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        return ops.norm(x, self.scale[...], bias, kind=self.kind, eps=self.eps,
                        plus_one=self.plus_one, impl=self.impl)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (num, dim), dtype))  # [num, D]

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


# ----------------------------------------------------------------------------- positions

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[rot_dim / 2] float32 inverse frequencies, with HF's rope_scaling rules applied."""
    rd = cfg.rot_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, rd, 2, dtype=np.float32) / rd))
    rs = cfg.rope_scaling
    if rs is None or rs.kind == "default":
        return inv.astype(np.float32)
    if rs.kind == "linear":
        return (inv / rs.factor).astype(np.float32)
    # llama3: wavelengths longer than old_len/low_freq_factor are divided by factor, shorter
    # than old_len/high_freq_factor kept, and the band between interpolated smoothly.
    wavelen = 2 * math.pi / inv
    low_wl = rs.original_max_position / rs.low_freq_factor
    high_wl = rs.original_max_position / rs.high_freq_factor
    scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(is_mid, mid, scaled).astype(np.float32)


def apply_rotary(x, positions, cfg: ModelConfig):
    """Rotates the first rot_dim features of x [B, T, N, Dh] by position [B, T]."""
    rd = cfg.rot_dim
    ang = positions[..., None].astype(jnp.float32) * rope_inv_freq(cfg)  # [B, T, rd/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xr = x[..., :rd].astype(jnp.float32)
    if cfg.rotary_layout == "half":
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:  # interleaved pairs (x0, x1), (x2, x3), ... as in GPT-J
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out.astype(x.dtype), x[..., rd:]], axis=-1)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes (Press et al.; BLOOM's rule for head counts not a power of 2)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return np.asarray(slopes, np.float32)


_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


# ----------------------------------------------------------------------------- blocks

class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, impl):
        self.cfg, self.window, self.impl = cfg, cfg.layer_window(layer), impl
        H, K, Dh = cfg.num_heads, cfg.kv_heads, cfg.dim_head
        self.qkv = Linear(cfg.hidden_size, (H + 2 * K) * Dh, bias=cfg.qkv_bias, dtype=dtype,
                          rngs=rngs, impl=impl)  # columns [q heads | k heads | v heads]
        self.out = Linear(H * Dh, cfg.hidden_size, bias=cfg.out_bias, dtype=dtype, rngs=rngs,
                          impl=impl)

    def __call__(self, x, positions, kv, write_at, key_mask):
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, Dh = cfg.num_heads, cfg.kv_heads, cfg.dim_head
        qkv = self.qkv(x)  # [B, T, (H + 2K) Dh]
        q = qkv[..., : H * Dh].reshape(B, T, H, Dh)
        k = qkv[..., H * Dh: (H + K) * Dh].reshape(B, T, K, Dh)
        v = qkv[..., (H + K) * Dh:].reshape(B, T, K, Dh)
        if cfg.positions == "rotary":
            q, k = apply_rotary(q, positions, cfg), apply_rotary(k, positions, cfg)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
        if kv is None:  # attend within this block
            k_pos, k_valid = positions, key_mask
        else:  # write into the cache, attend over all of it (slot index == position)
            k, v = kv_cache.write(kv[0], k, write_at), kv_cache.write(kv[1], v, write_at)
            k_pos = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), (B, k.shape[2]))
            k_valid = jnp.ones(k_pos.shape, bool)
        slopes = alibi_slopes(H) if cfg.positions == "alibi" else None
        o = ops.attention(q, k, v, positions, k_pos, k_valid, scale=cfg.scale, causal=cfg.causal,
                          window=self.window, alibi_slopes=slopes, impl=self.impl)
        return self.out(o), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, impl):
        width = cfg.intermediate_size * (2 if cfg.gated_mlp else 1)  # gated: [gate | up]
        self.up = Linear(cfg.hidden_size, width, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs, impl=impl)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype,
                           rngs=rngs, impl=impl)
        self.act, self.gated = cfg.activation, cfg.gated_mlp

    def __call__(self, x):
        h = self.up(x)
        if self.gated:
            gate, up = jnp.split(h, 2, axis=-1)
            h = _ACTIVATIONS[self.act](gate) * up
        else:
            h = _ACTIVATIONS[self.act](h)
        return self.down(h)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, impl):
        self.cfg = cfg
        self.attn_norm = Norm(cfg, cfg.hidden_size, dtype=dtype, impl=impl)
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs, impl=impl)
        self.mlp_norm = None if cfg.shared_norm else Norm(cfg, cfg.hidden_size, dtype=dtype, impl=impl)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, impl=impl)

    def __call__(self, x, positions, kv, write_at, key_mask):
        cfg = self.cfg
        if cfg.norm_position == "post":
            a, kv = self.attn(x, positions, kv, write_at, key_mask)
            x = self.attn_norm(x + a)
            return self.mlp_norm(x + self.mlp(x)), kv
        h = self.attn_norm(x)
        a, kv = self.attn(h, positions, kv, write_at, key_mask)
        if cfg.parallel_residual:
            m = self.mlp(h if cfg.shared_norm else self.mlp_norm(x))
            return x + a + m, kv
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class Transformer(nnx.Module):
    """Embeddings -> blocks -> final norm; `logits()` applies the (tied or own) LM head."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 impl: Sequence[str] = ("xla",)):
        impl = tuple(impl)
        self.cfg = cfg
        D = cfg.hidden_size
        E = cfg.embed_proj_dim or D
        # vocab_size 0: an image tower, fed only through inputs_embeds
        self.embed = Embed(cfg.vocab_size, E, dtype=dtype, rngs=rngs) if cfg.vocab_size else None
        self.project_in = (Linear(E, D, bias=False, dtype=dtype, rngs=rngs, impl=impl)
                           if cfg.embed_proj_dim else None)
        self.project_out = (Linear(D, E, bias=False, dtype=dtype, rngs=rngs, impl=impl)
                            if cfg.embed_proj_dim else None)
        self.pos_embed = (Embed(cfg.max_position_embeddings + cfg.position_offset, D, dtype=dtype,
                                rngs=rngs) if cfg.positions == "learned" else None)
        self.type_embed = (Embed(cfg.type_vocab_size, D, dtype=dtype, rngs=rngs)
                           if cfg.type_vocab_size else None)
        self.embed_norm = Norm(cfg, D, dtype=dtype, impl=impl) if cfg.embedding_norm else None
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs, impl=impl)
                                for i in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, D, dtype=dtype, impl=impl) if cfg.final_norm else None
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(E, cfg.vocab_size, bias=cfg.lm_head_bias, dtype=dtype, rngs=rngs,
                               impl=impl))
        self.impl = impl

    def __call__(self, tokens, positions, cache: kv_cache.KVCache | None = None, key_mask=None,
                 token_types=None, inputs_embeds=None):
        """tokens, positions: [B, T] -> hidden [B, T, D], updated cache.

        With a cache, the T tokens of sequence b are written at slots cache.lengths[b] ...
        (lengths themselves are left to the caller) and attend over the cache. Without one, they
        attend among themselves; key_mask [B, T] marks real tokens. inputs_embeds [B, T, D]
        replaces the token embedding (image patches, say); tokens then only give the shape.
        """
        cfg = self.cfg
        if inputs_embeds is None and self.embed is None:
            raise ValueError("this body has no token embedding (vocab_size=0): pass inputs_embeds")
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds
        if cfg.embed_scale != 1.0:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + cfg.position_offset)
        if self.type_embed is not None:
            x = x + self.type_embed(jnp.zeros_like(tokens) if token_types is None else token_types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if cache is None and key_mask is None:
            key_mask = jnp.ones(tokens.shape, bool)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, (k, v) = layer(x, positions, kv, None if cache is None else cache.lengths, key_mask)
            new_k.append(k)
            new_v.append(v)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if cache is not None:
            cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
        return x, cache

    def logits(self, hidden):
        """hidden [..., D] -> float32 logits [..., V]."""
        if self.lm_head is None:
            out = ops.linear(hidden, self.embed.embedding[...], kernel_nk=True, impl=self.impl)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)


# ----------------------------------------------------------------------------- params

def flatten(params: dict, prefix: str = "") -> dict[str, jax.Array]:
    """Nested param dict -> {'layers.0.attn.qkv.kernel': array, ...}."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[str, jax.Array]) -> dict:
    """Inverse of flatten; numeric path parts become int keys (nnx.List indices)."""
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def abstract_model(cfg: ModelConfig, dtype=jnp.float32, impl: Sequence[str] = ("xla",),
                   module: type[nnx.Module] = Transformer):
    """(graphdef, {path: ShapeDtypeStruct}) of `module` (the Transformer, or a family wrapper
    around it such as dsjax.encoders.Encoder) without allocating any weights."""
    model = nnx.eval_shape(lambda: module(cfg, dtype=dtype, rngs=nnx.Rngs(0), impl=impl))
    graphdef, state = nnx.split(model)
    return graphdef, flatten(nnx.to_pure_dict(state))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _random_params(module: type[nnx.Module], cfg: ModelConfig, dtype, key):
    return nnx.to_pure_dict(nnx.state(module(cfg, dtype=dtype, rngs=nnx.Rngs(params=key))))


def random_params(cfg: ModelConfig, dtype=jnp.float32, seed: int = 0,
                  module: type[nnx.Module] = Transformer) -> dict:
    """Randomly initialised weights (std 0.02 kernels, unit norms), made on the device."""
    return _random_params(module, cfg, jnp.dtype(dtype), jax.random.key(seed))
