"""Megatron tensor slicing: which slice of each weight a device holds, and the collectives the
model runs on those slices inside `shard_map`.

Shapes: D hidden, H query heads, K kv heads, Dh head dim, I MLP width, V vocabulary, T = tp size.
A device d of T holds
  attn.qkv   columns: its H/T query heads, then its K/T key and value heads ([q | k | v] regrouped
             per device); with K < T each KV head is replicated on T/K consecutive devices
  mlp.up     columns: its I/T of the MLP width ([gate | up] regrouped per device when gated)
  attn.out, mlp.down   rows (the matching heads / MLP slice); their partial products are summed
             over the devices (`psum`) and the bias and residual added once, after the sum
  embed, lm_head       vocabulary-parallel: V/T rows (padded to a multiple of T with zero rows)
  the rest (norms, learned positions, small projections) replicated.
So each layer runs with two all-reduces (one for parallel-residual families, whose attention and
MLP partial sums are added before one psum), one for the embedding lookup and one all-gather of
the logits per forward.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig

AXIS = "tp"
EXPERT_AXIS = "dp"  # expert parallelism spreads the experts over the data-parallel replicas


@dataclasses.dataclass(frozen=True)
class Shard:
    """What a module needs to run its slice of a tensor-parallel model inside shard_map."""

    size: int  # T
    vocab_size: int  # the whole vocabulary: gathered logits are cut back to it
    num_heads: int  # all query heads (ALiBi slopes belong to global heads)
    axis: str = AXIS
    experts: int = 1  # the MoE experts are spread over this many replicas (axis EXPERT_AXIS)

    def index(self):
        return jax.lax.axis_index(self.axis)

    def psum(self, x):
        """The sum over the tp axis (none when it has one device: expert parallelism alone)."""
        return x if self.size == 1 else jax.lax.psum(x, self.axis)

    def embed(self, table, ids):
        """Vocabulary-parallel lookup: table [V/T, E] holds rows index*V/T ...; ids [...]."""
        rows = table.shape[0]
        local = ids - self.index() * rows
        hit = (local >= 0) & (local < rows)
        x = jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0)
        return self.psum(jnp.where(hit[..., None], x, jnp.zeros((), x.dtype)))

    def gather_vocab(self, logits):
        """[..., V/T] local logits -> [..., V]."""
        full = logits if self.size == 1 else jax.lax.all_gather(
            logits, self.axis, axis=logits.ndim - 1, tiled=True)
        return full[..., : self.vocab_size]

    def local_heads(self, values: np.ndarray):
        """This device's slice of a per-query-head array (ALiBi slopes)."""
        per = self.num_heads // self.size
        return jax.lax.dynamic_slice_in_dim(jnp.asarray(values), self.index() * per, per)


def check(cfg: ModelConfig, tp: int) -> None:
    """Errors say what does not divide and what would."""
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    if cfg.num_heads % tp:
        raise ValueError(f"tp_size={tp} does not divide the {cfg.num_heads} attention heads; "
                         f"choose one of {divisors(cfg.num_heads)}")
    K = cfg.kv_heads
    if K % tp and tp % K:
        raise ValueError(f"tp_size={tp} and the {K} KV heads do not divide each other (KV heads "
                         f"are split, or replicated when fewer than tp_size); choose one of "
                         f"{[d for d in divisors(cfg.num_heads) if K % d == 0 or d % K == 0]}")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tp_size={tp} does not divide the MLP width {cfg.intermediate_size}")


def check_experts(cfg: ModelConfig, tp: int, ep: int, pp: int) -> None:
    """MoE layers over a mesh: experts whole per replica group, sliced by tensor slice."""
    E, I = cfg.moe.num_experts, cfg.moe.expert_size
    if E % ep:
        raise ValueError(f"ep_size={ep} does not divide the {E} experts; choose one of "
                         f"{[d for d in range(1, E + 1) if E % d == 0]}")
    if I % tp:
        raise ValueError(f"tp_size={tp} does not divide the expert width {I}")
    if pp > 1:
        raise ValueError("MoE models run tensor and expert parallelism; pipeline stages are "
                         "not supported for them yet: drop pipeline_parallel")


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of one device's slice (the module it runs inside shard_map): its heads, MLP
    width, vocabulary rows and expert width (the expert count stays the whole model's: the
    router scores them all)."""
    if tp == 1:
        return cfg
    moe = cfg.moe and dataclasses.replace(cfg.moe, expert_size=cfg.moe.expert_size // tp)
    return dataclasses.replace(
        cfg, num_heads=cfg.num_heads // tp, num_kv_heads=max(cfg.kv_heads // tp, 1),
        head_dim=cfg.dim_head, intermediate_size=cfg.intermediate_size // tp,
        vocab_size=-(-cfg.vocab_size // tp), moe=moe)


def shard_for(cfg: ModelConfig, tp: int, ep: int = 1) -> Shard | None:
    return Shard(tp, cfg.vocab_size, cfg.num_heads, experts=ep) if tp > 1 or ep > 1 else None


# ----------------------------------------------------------------------------- weight slices

@dataclasses.dataclass(frozen=True)
class Slicing:
    """How one parameter is cut: along `axis` into T pieces (None: replicated). sections:
    (units, unit width) runs of the axis, each cut into T parts (a run of fewer units than T
    gives unit d // (T / units) to device d); pad: the axis padded to a multiple of T first."""

    axis: int | None
    sections: tuple[tuple[int, int], ...] | None = None
    pad: bool = False
    experts: bool = False  # axis 0 lists experts: spread over the replicas with expert parallelism


def slicing(path: str, cfg: ModelConfig) -> Slicing:
    """The table: parameter path (without the `layers.N.` prefix) -> how it is cut."""
    name = re.sub(r"^layers\.\d+\.", "", path)
    H, K, Dh, I = cfg.num_heads, cfg.kv_heads, cfg.dim_head, cfg.intermediate_size
    if name in ("attn.qkv.kernel", "attn.qkv.bias"):
        return Slicing(-1, ((H, Dh), (K, Dh), (K, Dh)))
    if name in ("mlp.up.kernel", "mlp.up.bias"):
        return Slicing(-1, ((I, 1),) * (2 if cfg.gated_mlp else 1))
    if name in ("attn.out.kernel", "mlp.down.kernel"):
        return Slicing(0)
    if name == "mlp.experts_up":  # [E, D, gate | up]: each expert's columns, as mlp.up's
        return Slicing(-1, ((cfg.moe.expert_size, 1),) * 2, experts=True)
    if name == "mlp.experts_down":  # [E, I, D]: the matching rows
        return Slicing(1, experts=True)
    if name == "embed.embedding":
        return Slicing(0, pad=True)
    if name in ("lm_head.kernel", "lm_head.bias"):
        return Slicing(-1, pad=True)
    return Slicing(None)


def pieces(x: np.ndarray, how: Slicing, tp: int) -> list[np.ndarray]:
    """The T slices of a full parameter, device order."""
    if how.axis is None:
        return [x] * tp
    axis = how.axis % x.ndim
    if how.pad and x.shape[axis] % tp:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, -x.shape[axis] % tp)
        x = np.pad(x, widths)
    if how.sections is None:
        return np.split(x, tp, axis=axis)
    out = [[] for _ in range(tp)]
    start = 0
    for units, width in how.sections:
        run = np.split(np.take(x, np.arange(start, start + units * width), axis=axis), units, axis)
        start += units * width
        for d in range(tp):
            if units >= tp:
                part = run[d * units // tp: (d + 1) * units // tp]
            else:
                part = [run[d // (tp // units)]]
            out[d].extend(part)
    return [np.concatenate(p, axis=axis) for p in out]
