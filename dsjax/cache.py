"""The KV cache: an explicit pytree passed into and returned from the jitted step functions.

Each layer's K and V are arrays of their own, [batch, kv_heads, capacity, head_dim], so that
per-layer writes update in place. `lengths[b]` counts the tokens of sequence b already written;
sequence b's next token goes to slot `lengths[b]` (slot index == token position).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, KVH, S, Dh]
    v: tuple[jax.Array, ...]  # per layer [B, KVH, S, Dh]
    lengths: jax.Array  # [B] int32

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, capacity: int, dtype) -> KVCache:
        shape = (batch, cfg.kv_heads, capacity, cfg.dim_head)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)


def write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new [B, KVH, T, Dh] into cache [B, KVH, S, Dh] at slots start[b] .. start[b]+T."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))(cache, new, start)


def check_budget(prompt_len: int, max_new_tokens: int, budget: int) -> None:
    """Raises before any compute when a request cannot fit the cache."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("every prompt needs at least one token")
    if prompt_len + max_new_tokens > budget:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = "
            f"{prompt_len + max_new_tokens} tokens exceeds the token budget max_out_tokens={budget}; "
            "pass a larger max_out_tokens to init_inference, or shorten the request"
        )
