"""The KV cache: an explicit pytree passed into and returned from the jitted step functions.

Each layer's K and V are arrays of their own, [batch, kv_heads, capacity, head_dim], so that
per-layer writes update in place. `lengths[b]` counts the tokens of sequence b already written;
sequence b's next token goes to slot `lengths[b]` (slot index == token position).
An int8 cache (an option beyond DeepSpeed) holds K and V as int8 with a float32 scale per
token and head (`k_scale`, `v_scale` [batch, kv_heads, capacity]): half the bytes to read.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from dsjax.config import InferenceConfig, ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, KVH, S, Dh]
    v: tuple[jax.Array, ...]  # per layer [B, KVH, S, Dh]
    lengths: jax.Array  # [B] int32
    k_scale: tuple[jax.Array, ...] | None = None  # per layer [B, KVH, S] float32 (int8 cache)
    v_scale: tuple[jax.Array, ...] | None = None

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, capacity: int, dtype, *,
               quantized: bool = False) -> KVCache:
        shape = (batch, cfg.kv_heads, capacity, cfg.dim_head)
        L = cfg.num_layers
        zeros = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in range(L))  # noqa: E731
        if not quantized:
            return cls(zeros(shape, dtype), zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))
        return cls(zeros(shape, jnp.int8), zeros(shape, jnp.int8), jnp.zeros((batch,), jnp.int32),
                   zeros(shape[:3], jnp.float32), zeros(shape[:3], jnp.float32))

    def layer(self, i: int) -> tuple[jax.Array, ...]:
        """Layer i's (k, v), or (k, v, k_scale, v_scale) for an int8 cache."""
        if self.k_scale is None:
            return self.k[i], self.v[i]
        return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]

    def with_layers(self, layers: list[tuple[jax.Array, ...]]) -> KVCache:
        parts = list(zip(*layers))
        scales = {} if self.k_scale is None else {"k_scale": parts[2], "v_scale": parts[3]}
        return self.replace(k=parts[0], v=parts[1], **scales)

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


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype, *, quantized: bool) -> int:
    """Bytes of a KV cache of `batch` sequences x `capacity` tokens (int8: plus float32 scales)."""
    per_token = 2 * cfg.kv_heads * (cfg.dim_head * (1 if quantized else jnp.dtype(dtype).itemsize)
                                    + (4 if quantized else 0))
    return cfg.num_layers * batch * capacity * per_token


def device_memory(device) -> tuple[int, int]:
    """(bytes the device can hold, bytes in use): an accelerator's allocator limit, or for the
    CPU the machine's physical memory and what is in use of it."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    return total, total - os.sysconf("SC_AVPHYS_PAGES") * page


def check_cache_fits(cfg: ModelConfig, icfg: InferenceConfig, rows: int, shards: int, device, *,
                     free: bool) -> None:
    """Raises, before anything is allocated, when one device's share (1/shards) of the KV cache
    of `rows` packed sequences at the token budget exceeds what the device holds: its capacity
    (free=False, the smallest batch, checked before any weight is read) or what is free now
    (free=True, each generate call's batch)."""
    total = cache_bytes(cfg, rows, icfg.max_out_tokens, icfg.jnp_dtype,
                        quantized=icfg.kv_cache_dtype == "int8")
    need = -(-total // shards)
    limit, used = device_memory(device)
    room = limit - used if free else limit
    if need > room:
        what = (f"a batch of {rows} packed rows x max_out_tokens={icfg.max_out_tokens}" if free
                else f"max_out_tokens={icfg.max_out_tokens} for the smallest batch ({rows} rows)")
        raise ValueError(
            f"{what} needs {need:,} bytes of KV cache on {device.platform}:{device.id}, which "
            f"{'has' if free else 'holds'} {room:,} bytes{' free' if free else ''}; lower "
            "max_out_tokens or the batch (or use kv_cache_dtype='int8', tensor/pipeline "
            "parallelism)")
