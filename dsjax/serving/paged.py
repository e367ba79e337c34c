"""The device side of the paged KV cache: per-layer block pools and one step's ragged batch.

Each layer's K and V are pools of their own, [num_blocks, kv_heads, block_size, head_dim] (per
layer arrays: DESIGN.md), int8 with float32 scales [num_blocks, kv_heads, block_size] as an
option. A step runs a flat batch of N tokens from S sequences (decode tokens and prompt chunks
mixed): token i has its sequence row `token_seq[i]`, its position, and the slot its K/V go to
(block * block_size + offset; -1 for padding, which writes nothing). `block_tables[s]` lists
sequence s's blocks in order, so key position p of s lives in block `block_tables[s, p //
block_size]` at offset `p % block_size`; attention is causal by position, so entries past a
sequence's length (padding with block 0) are never read.

`PagedCache` offers the calls the model makes of a cache (`layer`, `with_layers`, `lengths`),
so the one model runs on it unchanged; its layers are `PagedLayer`s, which the attention routes
to the paged ops (dsjax.ops.paged_write_kv / paged_attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax import numerics


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepMeta:
    """Where a step's N tokens go and what they attend to (S sequence rows)."""

    slots: jax.Array  # [N] int32: block * block_size + offset, -1 for padding tokens
    token_seq: jax.Array  # [N] int32: the block-table row of each token
    block_tables: jax.Array  # [S, max_blocks] int32 (0-padded)


def slots_of(block_tables, token_seq, positions, block_size: int):
    """Each token's slot (block * block_size + offset) from its sequence's block table row and
    its position: numpy on the host (a step's buffer), jax.numpy inside a step alike."""
    return block_tables[token_seq, positions // block_size] * block_size + positions % block_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLayer:
    """One layer's pools and the step's meta, as the attention sees them."""

    k: jax.Array  # [NB, KVH, bs, Dh]
    v: jax.Array
    k_scale: jax.Array | None  # [NB, KVH, bs] float32 (int8 pools)
    v_scale: jax.Array | None
    meta: StepMeta


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    k: tuple[jax.Array, ...]  # per layer [NB, KVH, bs, Dh]
    v: tuple[jax.Array, ...]
    k_scale: tuple[jax.Array, ...] | None = None  # per layer [NB, KVH, bs] (int8)
    v_scale: tuple[jax.Array, ...] | None = None
    meta: StepMeta | None = None  # the step being run (None between steps)

    @classmethod
    def create(cls, cfg, num_blocks: int, block_size: int, dtype, *, quantized: bool = False,
               kv_heads: int | None = None) -> PagedCache:
        shape = (num_blocks, kv_heads or cfg.kv_heads, block_size, cfg.dim_head)
        L = cfg.num_layers
        zeros = lambda s, d: tuple(jnp.zeros(s, d) for _ in range(L))  # noqa: E731
        if not quantized:
            return cls(zeros(shape, dtype), zeros(shape, dtype))
        return cls(zeros(shape, jnp.int8), zeros(shape, jnp.int8), zeros(shape[:3], jnp.float32),
                   zeros(shape[:3], jnp.float32))

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def lengths(self):
        """What the model passes as write positions: the step's slots (see module docstring)."""
        return self.meta.slots

    def layer(self, i: int) -> PagedLayer:
        q = self.k_scale is not None
        return PagedLayer(self.k[i], self.v[i], self.k_scale[i] if q else None,
                          self.v_scale[i] if q else None, self.meta)

    def with_layers(self, layers: list[PagedLayer]) -> PagedCache:
        q = self.k_scale is not None
        return dataclasses.replace(
            self, k=tuple(x.k for x in layers), v=tuple(x.v for x in layers),
            k_scale=tuple(x.k_scale for x in layers) if q else None,
            v_scale=tuple(x.v_scale for x in layers) if q else None)

    def at_step(self, meta: StepMeta | None) -> PagedCache:
        return dataclasses.replace(self, meta=meta)


def _scatter(pool, new, slots):
    """pool [NB, KVH, bs, ...] with new [N, KVH, ...] written at flat slots [N] (-1: nowhere)."""
    NB, bs = pool.shape[0], pool.shape[2]
    block = jnp.where(slots >= 0, slots // bs, NB)  # out of range: dropped
    return pool.at[block, :, slots % bs].set(new.astype(pool.dtype), mode="drop")


def write_xla(layer: PagedLayer, k, v) -> PagedLayer:
    """k, v [N, KVH, Dh] written at the step's slots (quantized per token and head into int8
    pools)."""
    slots = layer.meta.slots
    if layer.k_scale is None:
        return dataclasses.replace(layer, k=_scatter(layer.k, k, slots),
                                   v=_scatter(layer.v, v, slots))
    (kq, ks), (vq, vs) = numerics.quantize_kv(k), numerics.quantize_kv(v)
    return dataclasses.replace(layer, k=_scatter(layer.k, kq, slots), v=_scatter(layer.v, vq, slots),
                               k_scale=_scatter(layer.k_scale, ks, slots),
                               v_scale=_scatter(layer.v_scale, vs, slots))


def gather_keys(layer: PagedLayer, dtype):
    """Each token's sequence's keys and values, [N, KVH, max_blocks * bs, Dh], key index ==
    position (dequantized from int8 pools). The reference's layout: one copy per token."""
    def seq(pool, scale):
        x = pool[layer.meta.block_tables]  # [S, MB, KVH, bs, ...]
        if scale is not None:
            x = x.astype(jnp.float32) * scale[layer.meta.block_tables][..., None]
        S, MB, KVH, bs = x.shape[:4]
        x = jnp.moveaxis(x, 2, 1).reshape(S, KVH, MB * bs, *x.shape[4:])
        return x[layer.meta.token_seq].astype(dtype)
    return seq(layer.k, layer.k_scale), seq(layer.v, layer.v_scale)
