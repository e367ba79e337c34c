"""The device mesh: axes ("dp", "pp", "tp") from DeepSpeed-style options, checked against the
model and the devices before any weight is read.

tp: Megatron tensor slicing (dsjax.parallel.tensor); pp: pipeline stages with micro-batched
decode (dsjax.parallel.pipeline); dp: replicas, each serving its own slice of the batch. tp is the
innermost axis, so a tensor-parallel group sits on neighbouring devices.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from dsjax.config import ModelConfig
from dsjax.parallel import tensor

AXES = ("dp", "pp", "tp")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """tp, pp, dp: degrees; micro_batches: how many pieces the batch is cut into for the
    pipeline (default pp; with fewer micro-batches than stages some stages idle on each tick,
    and the count must divide pp);
    offload_kv: keep the KV caches of micro-batches not computing in pinned host memory."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batches: int = 1
    offload_kv: bool = False
    ep: int = 1  # MoE experts spread over the dp replicas (ep == dp), tokens sent by all-to-all
    moe_experts: tuple[int, ...] | None = None  # DeepSpeed's per-layer expert counts, checked

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "micro_batches", "ep"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        M, P = self.micro_batches, self.pp
        if self.offload_kv and M < 2:
            raise ValueError("offload_kv keeps the caches of micro-batches not computing in host "
                             "memory: it needs micro_batches >= 2")
        if self.ep > 1 and self.ep != self.dp:
            raise ValueError(f"ep_size={self.ep}: the experts are spread over the data-parallel "
                             f"replicas, so ep_size must equal dp_size (got {self.dp}; leave "
                             "data_parallel unset and it follows ep_size)")
        if M < P and P % M:
            raise ValueError(f"micro_batches={M} must divide pp_size={P} or be at least pp_size "
                             f"(e.g. {P}): the decode schedule cycles micro-batches through the "
                             "stages")

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def is_parallel(self) -> bool:
        return self.devices > 1 or self.micro_batches > 1 or self.offload_kv

    def cache_shards(self, cfg: ModelConfig) -> int:
        """Into how many parts one device's share cuts a KV cache, at least: the batch over
        replicas, layers over stages, KV heads over tensor slices (replicated beyond the KV
        heads), and with offload_kv only the computing micro-batch stays on the device."""
        return (self.dp * self.pp * min(self.tp, cfg.kv_heads)
                * (self.micro_batches if self.offload_kv else 1))

    @classmethod
    def parse(cls, tensor_parallel=None, mp_size=None, pipeline_parallel=None,
              data_parallel=None, expert_parallel=None, moe=None) -> Parallel:
        """DeepSpeed's spellings: tensor_parallel={"tp_size": N} or an int (mp_size=N, its old
        name); pipeline_parallel={"pp_size": P, "micro_batches": M, "offload_kv": bool} or an
        int; data_parallel={"dp_size": R} or an int; expert_parallel={"ep_size": E} or an int,
        or DeepSpeed-MoE's moe={"ep_size": E, "moe_experts": [...]} (data_parallel follows
        ep_size when unset)."""
        ep, experts = _expert_degree(expert_parallel, moe)
        if data_parallel is None and ep > 1:
            data_parallel = ep
        tp = _degree("tensor_parallel", tensor_parallel, "tp_size")
        if mp_size not in (None, 1) and tp not in (1, mp_size):
            raise ValueError(f"mp_size={mp_size} contradicts tensor_parallel tp_size={tp}")
        tp = mp_size if tp == 1 and mp_size else tp
        pp_opts, micro, offload = pipeline_parallel, None, False
        if isinstance(pipeline_parallel, dict):
            pp_opts = dict(pipeline_parallel)
            micro = pp_opts.pop("micro_batches", None)
            offload = pp_opts.pop("offload_kv", False)
            if not isinstance(offload, bool):
                raise ValueError(f"pipeline_parallel offload_kv must be True or False, got {offload!r}")
            if not pp_opts.get("enabled", True):
                micro, offload = None, False
        pp = _degree("pipeline_parallel", pp_opts, "pp_size")
        return cls(tp=tp, pp=pp, dp=_degree("data_parallel", data_parallel, "dp_size"),
                   micro_batches=pp if micro is None else micro, offload_kv=offload, ep=ep,
                   moe_experts=experts)

    def check_devices(self, devices=None) -> list:
        """The devices to use (default jax.devices()); too few is an error."""
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) < self.devices:
            raise ValueError(f"dp x pp x tp = {self.dp} x {self.pp} x {self.tp} needs "
                             f"{self.devices} devices; {len(devices)} available "
                             f"({devices[0].platform}). On a CPU, simulate more with "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=N")
        return devices

    def check_processes(self, devices=None) -> list:
        """check_devices, and over several processes (jax.distributed): the mesh takes every
        device of every process, and no host-driven schedule (offload_kv) runs."""
        devices = self.check_devices(devices)
        if jax.process_count() == 1:
            return devices
        if len(devices) != self.devices:
            raise ValueError(f"over {jax.process_count()} processes the mesh takes all "
                             f"{len(devices)} devices (each process drives its own): "
                             f"dp x pp x tp = {self.dp} x {self.pp} x {self.tp} = "
                             f"{self.devices}; choose degrees whose product is {len(devices)}")
        if self.offload_kv:
            raise ValueError("offload_kv runs its ticks from one host: it is not available "
                             "over several processes")
        return devices

    def check(self, cfg: ModelConfig) -> None:
        """Model-side errors: heads, MLP width or layers that the degrees do not divide."""
        if not self.is_parallel:
            return
        if cfg.encoder is not None:
            raise ValueError(f"tensor/pipeline parallelism serves decoders (generate); this "
                             f"{cfg.family} encoder fits one device: drop tensor_parallel / "
                             "pipeline_parallel")
        tensor.check(cfg, self.tp)
        if cfg.moe is not None:
            tensor.check_experts(cfg, self.tp, self.ep, self.pp)
            if self.moe_experts and set(self.moe_experts) != {cfg.moe.num_experts}:
                raise ValueError(f"moe_experts={list(self.moe_experts)}: this model has "
                                 f"{cfg.moe.num_experts} experts in each MoE layer")
        elif self.ep > 1:
            raise ValueError(f"ep_size={self.ep}: this {cfg.family} model has no experts")
        if cfg.qk_norm == "full" and self.tp > 1:
            raise ValueError(f"this {cfg.family} model norms q and k over all heads, which "
                             "tensor slices split: drop tensor_parallel")
        L, P = cfg.num_layers, self.pp
        if L % P:
            raise ValueError(f"pp_size={P} does not divide the {L} layers; choose one of "
                             f"{[d for d in range(1, L + 1) if L % d == 0]}")
        Lp = L // P
        for j in range(Lp):
            windows = {cfg.layer_window(s * Lp + j) for s in range(P)}
            if len(windows) > 1:
                raise ValueError(f"pp_size={P} gives stages with different local-attention "
                                 f"layer patterns (layer {j} of a stage: windows {windows}); "
                                 "choose a pp_size that keeps the pattern per stage")

    def mesh(self, devices=None) -> Mesh:
        devices = self.check_devices(devices)
        grid = np.array(devices[: self.devices]).reshape(self.dp, self.pp, self.tp)
        return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def _degree(name: str, value, key: str) -> int:
    if value is None or value is False:
        return 1
    if isinstance(value, dict):
        unknown = set(value) - {key, "enabled"}
        if unknown:
            raise ValueError(f"unknown {name} keys {sorted(unknown)}; known: {key}, enabled"
                             + (", micro_batches, offload_kv" if key == "pp_size" else ""))
        return value.get(key, 1) if value.get("enabled", True) else 1
    return value


def _expert_degree(expert_parallel, moe) -> tuple[int, tuple[int, ...] | None]:
    ep = _degree("expert_parallel", expert_parallel, "ep_size")
    if moe is None:
        return ep, None
    if not isinstance(moe, dict):
        raise ValueError(f"moe must be a dict like {{'ep_size': 2}}, got {moe!r}")
    unknown = set(moe) - {"ep_size", "moe_experts", "enabled", "type"}
    if unknown:
        raise ValueError(f"unknown moe keys {sorted(unknown)}; known: ep_size, moe_experts, "
                         "enabled, type")
    if moe.get("type", "standard") != "standard":
        raise ValueError(f"moe type {moe['type']!r}: only 'standard' (the checkpoint's own "
                         "routing) is served")
    other = moe.get("ep_size", 1) if moe.get("enabled", True) else 1
    if ep > 1 and other not in (1, ep):
        raise ValueError(f"expert_parallel ep_size={ep} contradicts moe ep_size={other}")
    experts = moe.get("moe_experts")
    experts = None if experts is None else tuple(
        [experts] if isinstance(experts, int) else experts)
    return max(ep, other), experts
