"""ONE generic transformer (Flax NNX) for every family; ModelConfig says which quirks apply.

Shapes: B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads, Dh head dim.
Each layer owns its arrays (`layers` is a list of Blocks, looped over in Python inside the jit),
since XLA copies a stacked [layers, ...] array's slice on every step
(docs/decisions.md#per-layer-arrays); each Block runs as a nested jit that the blocks of one
structure share, so a program traces and lowers one layer of each kind
(docs/decisions.md#one-traced-layer-per-kind). The KernelPolicy every module holds is part of
the graphdef, so it is static under jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax import cache as kv_cache
from dsjax import ops
from dsjax.config import ModelConfig
from dsjax.parallel.tensor import EXPERT_AXIS, Shard
from dsjax.serving.paged import PagedLayer
from dsjax.policy import KernelPolicy, announced_by_trace
from dsjax.positions import alibi_slopes, rope_inv_freq
from dsjax.weights import DenseWeight

_INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype)


class Linear(nnx.Module):
    """x @ kernel + bias, with the fusions ops.linear offers (a norm in front; activation,
    gating and residual behind). The kernel is a stored [K, N] array or a weight of
    dsjax.weights (quantized, or K-major for the kernels): ops decides how to multiply, this code
    does not branch on precision or layout.

    A row-parallel Linear (`reduce`, tensor parallelism) holds a slice of the input rows: its
    partial products are summed over the devices, then the bias and residual are added once.
    partial=True returns the partial product alone (the caller sums it, see Block)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs, policy,
                 reduce: Shard | None = None):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), dtype))  # [in, out]
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        self.policy, self.reduce = policy, reduce

    def __call__(self, x, *, norm: ops.NormSpec | None = None, activation: str | None = None,
                 gated: bool = False, residual=None, partial: bool = False):
        bias = None if self.bias is None else self.bias[...]
        if self.reduce is None:
            return ops.linear(x, self.kernel.get_value(), bias, residual, norm=norm,
                              activation=activation, gated=gated, policy=self.policy)
        y = ops.linear(x, self.kernel.get_value(), norm=norm, activation=activation, gated=gated,
                       policy=self.policy)
        return y if partial else self.add_bias(self.reduce.psum(y), residual)

    def add_bias(self, y, residual=None):
        y = y if self.bias is None else y + self.bias[...]
        return y if residual is None else y + residual


class Norm(nnx.Module):
    def __init__(self, cfg: ModelConfig, dim: int, *, dtype, policy):
        self.scale = nnx.Param(jnp.full((dim,), 0.0 if cfg.norm_plus_one else 1.0, dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if cfg.norm == "layernorm" else None
        self.kind, self.eps, self.plus_one = cfg.norm, cfg.norm_eps, cfg.norm_plus_one
        self.policy = policy

    def spec(self) -> ops.NormSpec:
        bias = None if self.bias is None else self.bias[...]
        return ops.NormSpec(self.scale[...], bias, kind=self.kind, eps=self.eps,
                            plus_one=self.plus_one)

    def __call__(self, x):
        return ops.norm(x, self.spec(), policy=self.policy)


class Embed(nnx.Module):
    """A lookup table; with `shard` it holds a slice of the vocabulary (tensor parallelism)."""

    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs, shard: Shard | None = None):
        self.embedding = nnx.Param(_normal(rngs, (num, dim), dtype))  # [num, D]
        self.shard = shard

    def __call__(self, ids):
        if self.shard is not None:
            return self.shard.embed(self.embedding[...], ids)
        return jnp.take(self.embedding[...], ids, axis=0)


# ----------------------------------------------------------------------------- positions

def rotary(cfg: ModelConfig) -> ops.Rotary | None:
    if cfg.positions != "rotary":
        return None
    return ops.Rotary(rope_inv_freq(cfg), cfg.rot_dim, cfg.rotary_layout)


# ----------------------------------------------------------------------------- blocks

class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, policy,
                 shard: Shard | None = None):
        self.cfg, self.window, self.policy, self.shard = cfg, cfg.layer_window(layer), policy, shard
        H, K, Dh = cfg.num_heads, cfg.kv_heads, cfg.dim_head
        self.qkv = Linear(cfg.hidden_size, (H + 2 * K) * Dh, bias=cfg.qkv_bias, dtype=dtype,
                          rngs=rngs, policy=policy)  # columns [q heads | k heads | v heads]
        self.out = Linear(H * Dh, cfg.hidden_size, bias=cfg.out_bias, dtype=dtype, rngs=rngs,
                          policy=policy, reduce=shard)
        per_head = cfg.qk_norm == "head"  # "full": over the whole q / k projection
        self.q_norm, self.k_norm = ((None, None) if cfg.qk_norm == "none" else
                                    (Norm(cfg, Dh if per_head else H * Dh, dtype=dtype, policy=policy),
                                     Norm(cfg, Dh if per_head else K * Dh, dtype=dtype, policy=policy)))

    def normed_qk(self, qkv):
        """qkv [..., (H + 2K) Dh] with q and k normed (Qwen3's per-head RMSNorm, OLMoE's over
        the projection), before the rotary embedding as HF applies them."""
        H, K, Dh = self.cfg.num_heads, self.cfg.kv_heads, self.cfg.dim_head
        q, k, v = jnp.split(qkv, [H * Dh, (H + K) * Dh], axis=-1)
        if self.cfg.qk_norm == "head":
            q = self.q_norm(q.reshape(*q.shape[:-1], H, Dh)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:-1], K, Dh)).reshape(k.shape)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        return jnp.concatenate([q, k, v], axis=-1)

    def slopes(self):
        """This layer's ALiBi slopes (its tensor slice of them), or None."""
        if self.cfg.positions != "alibi":
            return None
        if self.shard is None:
            return alibi_slopes(self.cfg.num_heads)
        return self.shard.local_heads(alibi_slopes(self.shard.num_heads))

    def __call__(self, x, positions, kv, write_at, key_mask, *, norm=None, residual=None,
                 partial=False, from_start=False):
        """x [B, T, D] (normed first when `norm` is given) -> out(attention) + residual, and
        the layer's kv: its updated cache (KVCache.layer), or this block's own keys without one.
        from_start: the tokens are their sequences' first (ops.cache_attention)."""
        cfg = self.cfg
        heads = (cfg.num_heads, cfg.kv_heads, cfg.dim_head)
        attn = dict(scale=cfg.scale, window=self.window, policy=self.policy,
                    alibi_slopes=self.slopes())
        qkv = self.qkv(x, norm=norm)  # [B, T, (H + 2K) Dh]
        if self.q_norm is not None:
            qkv = self.normed_qk(qkv)
        if kv is None:  # attend within this block
            q, k, v = ops.split_heads(qkv, positions, heads=heads, rotary=rotary(cfg))
            o = ops.attention(q, k, v, positions, positions, key_mask, causal=cfg.causal, **attn)
            kv = (k, v)
        elif isinstance(kv, PagedLayer):  # a flat batch of many sequences over block pools
            q, kv = ops.paged_write_kv(qkv, kv, positions, heads=heads, rotary=rotary(cfg),
                                       policy=self.policy)
            o = ops.paged_attention(q, kv, positions, **attn)
        else:  # write into the cache (slot index == position), attend over all of it
            q, kv = ops.write_kv(qkv, kv, positions, write_at, heads=heads, rotary=rotary(cfg),
                                 policy=self.policy)
            o = ops.cache_attention(q, kv, positions, from_start=from_start, **attn)
        return self.out(o, residual=residual, partial=partial), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, policy,
                 shard: Shard | None = None, width: int | None = None):
        width = width or cfg.intermediate_size  # (a MoE's shared expert has its own)
        up = width * (2 if cfg.gated_mlp else 1)  # gated: [gate | up]
        self.up = Linear(cfg.hidden_size, up, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs,
                         policy=policy)
        self.down = Linear(width, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype,
                           rngs=rngs, policy=policy, reduce=shard)
        self.act, self.gated = cfg.activation, cfg.gated_mlp

    def __call__(self, x, *, norm=None, residual=None, partial=False):
        h = self.up(x, norm=norm, activation=self.act, gated=self.gated)
        return self.down(h, residual=residual, partial=partial)


class MoE(nnx.Module):
    """A sparse MLP: the router's softmax picks top_k experts per token (their weights
    renormalized with norm_topk), ops.experts runs them; a shared expert, scaled by a sigmoid
    gate, adds to every token (ModelConfig.moe). Under `shard` each device holds its tensor
    slice of every expert's width (partial outputs summed over the slices) and, with expert
    parallelism, only its replica's experts: rows go to the replica holding their expert and
    come back by all-to-all over the replicas, dropless (every buffer holds all N x k rows)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, policy,
                 shard: Shard | None = None):
        moe, D = cfg.moe, cfg.hidden_size
        E, I = moe.num_experts // (shard.experts if shard else 1), moe.expert_size
        self.router = Linear(D, moe.num_experts, bias=False, dtype=dtype, rngs=rngs, policy=policy)
        self.experts_up = nnx.Param(_normal(rngs, (E, D, 2 * I), dtype))  # [gate | up] each
        self.experts_down = nnx.Param(_normal(rngs, (E, I, D), dtype))
        self.shared = (MLP(cfg, dtype=dtype, rngs=rngs, policy=policy, width=moe.shared_size)
                       if moe.shared_size else None)  # (whole on every device)
        self.shared_gate = (Linear(D, 1, bias=False, dtype=dtype, rngs=rngs, policy=policy)
                            if moe.shared_size else None)
        self.moe, self.act, self.policy, self.shard = moe, cfg.activation, policy, shard

    def __call__(self, x, *, norm=None, residual=None, partial=False):
        if partial:
            raise NotImplementedError("MoE layers in parallel-residual blocks")
        h = x if norm is None else ops.norm(x, norm, policy=self.policy)
        flat = h.reshape(-1, h.shape[-1])
        probs = jax.nn.softmax(self.router(flat).astype(jnp.float32), axis=-1)
        weights, picks = jax.lax.top_k(probs, self.moe.top_k)
        if self.moe.norm_topk:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights.astype(flat.dtype)
        if self.shard is not None and self.shard.experts > 1:
            y = self._exchanged(flat, picks, weights)
        else:
            y = ops.experts(flat, self.experts_up.get_value(), self.experts_down.get_value(),
                            picks, weights, activation=self.act, policy=self.policy)
        if self.shard is not None:
            y = self.shard.psum(y)  # the tensor slices' partial sums
        if self.shared is not None:
            y = y + self.shared(flat) * jax.nn.sigmoid(self.shared_gate(flat))
        y = y.reshape(x.shape)
        return y if residual is None else y + residual

    def _exchanged(self, flat, picks, weights):
        """Expert parallelism: each (token, pick) row to the replica holding its expert, run
        there, back by all-to-all, weighted and summed per token."""
        ep, E = self.shard.experts, self.experts_up.shape[0]
        (N, k), D = picks.shape, flat.shape[-1]
        dest, local = (picks // E).reshape(-1), (picks % E).reshape(-1)
        to = dest[None, :] == jnp.arange(ep)[:, None]  # [ep, N k]: row r goes to replica d
        rows = jnp.where(to[..., None], flat[jnp.arange(N * k) // k][None], 0)
        swap = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0)  # noqa: E731
        got, expert = swap(rows), swap(jnp.where(to, local[None], -1))  # from each replica
        out = ops.experts(got.reshape(-1, D), self.experts_up.get_value(),
                          self.experts_down.get_value(), expert.reshape(-1, 1),
                          jnp.ones((expert.size, 1), flat.dtype),
                          activation=self.act, policy=self.policy)  # (-1: another's row)
        back = swap(out.reshape(ep, N * k, D)).sum(0)  # each row's result, from its replica
        return jnp.sum(back.reshape(N, k, D) * weights[..., None], axis=1)


class Block(nnx.Module):
    """Pre-norm blocks hand their norms to the next matmul (ops may fuse them) and their
    residuals to the projection that ends each branch."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, policy,
                 shard: Shard | None = None):
        self.cfg, self.shard = cfg, shard
        self.attn_norm = Norm(cfg, cfg.hidden_size, dtype=dtype, policy=policy)
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs, policy=policy, shard=shard)
        self.mlp_norm = (None if cfg.shared_norm else
                         Norm(cfg, cfg.hidden_size, dtype=dtype, policy=policy))
        self.mlp = (MoE(cfg, dtype=dtype, rngs=rngs, policy=policy, shard=shard)
                    if cfg.moe is not None and cfg.moe.sparse(layer) else
                    MLP(cfg, dtype=dtype, rngs=rngs, policy=policy, shard=shard))

    def __call__(self, x, positions, kv, write_at, key_mask, from_start=False):
        cfg, at = self.cfg, dict(from_start=from_start)
        if cfg.norm_position == "post":
            x, kv = self.attn(x, positions, kv, write_at, key_mask, residual=x, **at)
            x = self.attn_norm(x)
            return self.mlp_norm(self.mlp(x, residual=x)), kv
        attn_norm = self.attn_norm.spec()
        mlp_norm = attn_norm if cfg.shared_norm else self.mlp_norm.spec()
        if cfg.parallel_residual and self.shard is not None:  # one psum for both branches
            a, kv = self.attn(x, positions, kv, write_at, key_mask, norm=attn_norm, partial=True,
                              **at)
            m = self.mlp(x, norm=mlp_norm, partial=True)
            return self.mlp.down.add_bias(self.attn.out.add_bias(self.shard.psum(a + m), x)), kv
        a, kv = self.attn(x, positions, kv, write_at, key_mask, norm=attn_norm, residual=x, **at)
        if cfg.parallel_residual:  # x + attn(norm1(x)) + mlp(norm2(x))
            return self.mlp(x, norm=mlp_norm, residual=a), kv
        return self.mlp(a, norm=mlp_norm, residual=a), kv


def run_block(block: Block, x, positions, kv, write_at, key_mask, from_start=False):
    """block(...) as a nested jit: blocks of the same structure and shapes share one traced and
    lowered program (XLA inlines it), so tracing and lowering a model cost one layer's worth;
    a program that reuses a trace still logs its kernels (policy.announced_by_trace)."""
    graphdef, state = nnx.split(block)
    args = (state, x, positions, kv, write_at, key_mask)
    leaves, tree = jax.tree.flatten(args)
    shapes = tuple((jnp.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves)
    key = (graphdef, from_start, tree, shapes)
    return announced_by_trace(key, lambda: _block_program(graphdef, from_start, *args))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block_program(graphdef, from_start, state, x, positions, kv, write_at, key_mask):
    return nnx.merge(graphdef, state)(x, positions, kv, write_at, key_mask, from_start)


class Transformer(nnx.Module):
    """Embeddings -> blocks -> final norm; `logits()` applies the (tied or own) LM head.

    With `shard` (tensor parallelism inside shard_map) cfg is one device's slice
    (dsjax.parallel.tensor.local_config): its heads, MLP width and vocabulary rows."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 policy: KernelPolicy | None = None, shard: Shard | None = None):
        policy = policy or KernelPolicy()
        self.cfg, self.shard = cfg, shard
        D = cfg.hidden_size
        E = cfg.embed_proj_dim or D
        # vocab_size 0: an image tower, fed only through inputs_embeds
        self.embed = (Embed(cfg.vocab_size, E, dtype=dtype, rngs=rngs, shard=shard)
                      if cfg.vocab_size else None)
        self.project_in = (Linear(E, D, bias=False, dtype=dtype, rngs=rngs, policy=policy)
                           if cfg.embed_proj_dim else None)
        self.project_out = (Linear(D, E, bias=False, dtype=dtype, rngs=rngs, policy=policy)
                            if cfg.embed_proj_dim else None)
        self.pos_embed = (Embed(cfg.max_position_embeddings + cfg.position_offset, D, dtype=dtype,
                                rngs=rngs) if cfg.positions == "learned" else None)
        self.type_embed = (Embed(cfg.type_vocab_size, D, dtype=dtype, rngs=rngs)
                           if cfg.type_vocab_size else None)
        self.embed_norm = Norm(cfg, D, dtype=dtype, policy=policy) if cfg.embedding_norm else None
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs, policy=policy, shard=shard)
                                for i in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, D, dtype=dtype, policy=policy) if cfg.final_norm else None
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(E, cfg.vocab_size, bias=cfg.lm_head_bias, dtype=dtype, rngs=rngs,
                               policy=policy))
        self.policy = policy

    def __call__(self, tokens, positions, cache: kv_cache.KVCache | None = None, key_mask=None,
                 token_types=None, inputs_embeds=None, from_start=False):
        """tokens, positions: [B, T] -> hidden [B, T, D], updated cache.

        With a cache, the T tokens of sequence b are written at slots cache.lengths[b] ...
        (lengths themselves are left to the caller) and attend over the cache. Without one, they
        attend among themselves; key_mask [B, T] marks real tokens. inputs_embeds [B, T, D]
        replaces the token embedding (image patches, say); tokens then only give the shape.
        from_start (static): the tokens are their sequences' first, positions 0..T-1 in every
        row of an empty cache (a prompt's phase: ops.cache_attention).
        """
        x = self.embed_inputs(tokens, positions, token_types, inputs_embeds)
        if cache is None and key_mask is None:
            key_mask = jnp.ones(tokens.shape, bool)
        x, cache = self.blocks(x, positions, cache, key_mask, from_start)
        return self.finish(x), cache

    def embed_inputs(self, tokens, positions, token_types=None, inputs_embeds=None):
        """tokens, positions [B, T] -> the first block's input [B, T, D]."""
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
        return x

    def blocks(self, x, positions, cache: kv_cache.KVCache | None, key_mask, from_start=False):
        """x [B, T, D] through every layer (see __call__ for the cache and from_start)."""
        new_kv = []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i)
            x, kv = run_block(layer, x, positions, kv, None if cache is None else cache.lengths,
                              key_mask, from_start)
            new_kv.append(kv)
        return x, None if cache is None else cache.with_layers(new_kv)

    def finish(self, x):
        """The last block's output -> the hidden state the LM head reads."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def logits(self, hidden):
        """hidden [..., D] -> float32 logits [..., V]."""
        if self.lm_head is None:
            table = DenseWeight(self.embed.embedding[...], k_major=True)  # [V, D]: an [N, K] weight
            out = ops.linear(hidden, table, policy=self.policy)
        else:
            out = self.lm_head(hidden)
        if self.shard is not None:
            out = self.shard.gather_vocab(out)
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


def abstract_model(cfg: ModelConfig, dtype=jnp.float32, policy: KernelPolicy | None = None,
                   module: type[nnx.Module] = Transformer, **kwargs):
    """(graphdef, {path: ShapeDtypeStruct}) of `module` (the Transformer, or a family wrapper
    around it such as dsjax.encoders.Encoder) without allocating any weights."""
    model = nnx.eval_shape(lambda: module(cfg, dtype=dtype, rngs=nnx.Rngs(0), policy=policy, **kwargs))
    graphdef, state = nnx.split(model)
    return graphdef, flatten(nnx.to_pure_dict(state))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _random_params(module: type[nnx.Module], cfg: ModelConfig, dtype, key):
    return nnx.to_pure_dict(nnx.state(module(cfg, dtype=dtype, rngs=nnx.Rngs(params=key))))


def random_params(cfg: ModelConfig, dtype=jnp.float32, seed: int = 0,
                  module: type[nnx.Module] = Transformer) -> dict:
    """Randomly initialised weights (std 0.02 kernels, unit norms), made on the device."""
    return _random_params(module, cfg, jnp.dtype(dtype), jax.random.key(seed))
