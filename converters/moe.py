"""Sparse expert (MoE) layers of the LLaMA-like families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE. The config's
MoE fields, and the rules that stack each layer's per-expert HF Linears into the generic
model's expert arrays (experts_up [E, D, 2I] = [gate | up] per expert, experts_down [E, I, D]).
Checkpoints store one tensor per expert and projection; transformers' in-memory models hold
them fused, and are read through transformers' own conversion back to the stored names
(converters.open_hf)."""

from __future__ import annotations

import numpy as np

from converters.loader import CheckpointError
from converters.policy import Rule, Transform, fused_linear_rules, linear_rules
from dsjax.config import ModelConfig, MoEConfig

# model_type -> (the layer's MoE module, router, expert gate / up / down projection names)
NAMES = {
    "mixtral": ("block_sparse_moe", "gate", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
}


def _experts(hf: dict) -> int | None:
    """The expert count, under either of the names configs use for it (transformers versions
    write one or the other for the same family)."""
    a, b = hf.get("num_experts"), hf.get("num_local_experts")
    if a is not None and b is not None and a != b:
        raise CheckpointError(f"num_experts={a} and num_local_experts={b} disagree")
    return a if a is not None else b


def moe_config(hf: dict) -> MoEConfig | None:
    kind, L, E = hf.get("model_type"), hf["num_hidden_layers"], _experts(hf)
    if kind not in NAMES or not E:
        return None
    if kind in ("mixtral", "olmoe"):
        return MoEConfig(num_experts=E, top_k=hf["num_experts_per_tok"],
                         expert_size=hf["intermediate_size"],
                         norm_topk=kind == "mixtral" or bool(hf.get("norm_topk_prob", False)))
    step, dense = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or ())
    layers = tuple(i for i in range(L) if i not in dense and (i + 1) % step == 0)
    return MoEConfig(num_experts=E, top_k=hf["num_experts_per_tok"],
                     expert_size=hf["moe_intermediate_size"],
                     norm_topk=bool(hf.get("norm_topk_prob", False)),
                     shared_size=hf.get("shared_expert_intermediate_size", 0) or 0,
                     layers=None if len(layers) == L else layers)


def _stack_gate_up(E: int) -> Transform:
    """[gate_0, up_0, gate_1, up_1, ...] HF Linears [I, D] -> [E, D, 2I]."""
    def apply(*xs):
        return np.stack([np.concatenate([xs[2 * e].T, xs[2 * e + 1].T], axis=1) for e in range(E)])

    def shape(*ss):
        return (E, ss[0][1], 2 * ss[0][0]) if all(len(s) == 2 for s in ss) else None
    return Transform(f"stack_gate_up({E})", apply, shape)


def _stack_down(E: int) -> Transform:
    """[down_0, down_1, ...] HF Linears [D, I] -> [E, I, D]."""
    return Transform(f"stack_down({E})", lambda *xs: np.stack([x.T for x in xs]),
                     lambda *ss: (E, ss[0][1], ss[0][0]) if all(len(s) == 2 for s in ss) else None)


def mlp_rules(cfg: ModelConfig, kind: str, layer: int, dense) -> list[Rule]:
    """Layer `layer`'s MLP rules: the dense ones (dense(layer): the family's usual rules) or its
    router, stacked experts and shared expert."""
    moe = cfg.moe
    if moe is None or not moe.sparse(layer):
        return dense(layer)
    module, router, gate, up, down = NAMES[kind]
    hf, ours, D, I, E = f"layers.{layer}.{module}.", f"layers.{layer}.mlp.", cfg.hidden_size, \
        moe.expert_size, moe.num_experts
    expert = [f"{hf}experts.{e}.{{}}.weight" for e in range(E)]
    rules = [*linear_rules(ours + "router", hf + router, bias=False),
             Rule(ours + "experts_up", tuple(x.format(p) for x in expert for p in (gate, up)),
                  _stack_gate_up(E), ((I, D),) * (2 * E)),
             Rule(ours + "experts_down", tuple(x.format(down) for x in expert), _stack_down(E),
                  ((D, I),) * E)]
    if moe.shared_size:
        shared = hf + "shared_expert."
        rules += [*fused_linear_rules(ours + "shared.up", (shared + "gate_proj", shared + "up_proj"),
                                      (moe.shared_size,) * 2, D, bias=False),
                  *linear_rules(ours + "shared.down", shared + "down_proj", bias=False),
                  *linear_rules(ours + "shared_gate", hf + "shared_expert_gate", bias=False)]
    return rules
