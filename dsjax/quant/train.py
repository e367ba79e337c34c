"""MoQ fine-tuning of any dsjax model with optax, configured by DeepSpeed's own JSON, and its
export to the quantized-weight pytrees that init_inference serves (saved with orbax).

    trainer = MoQTrainer(model_config, ds_config, optax.adamw(1e-4), num_steps=2000)
    state = trainer.init(params)
    for tokens in batches:
        state, loss = trainer.step(state, tokens)   # one jitted step, no host sync
    trainer.save(state, "out")
    engine = dsjax.init_inference("out")           # int8 / int4 weights, MoQ's own grid

ds_config holds DeepSpeed's `quantize_training` block (its MoQ tutorial's form) or
`compression_training.weight_quantization`; see dsjax.quant.moq for the rules. Weights are the
block GEMM kernels (QuantSpec's choice; the LM head too with lm_head=True). The optimizer sees
every parameter; a step whose gradients are not finite is skipped and not counted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsjax import checkpoint
from dsjax.config import ModelConfig
from dsjax.encoders import module_for
from dsjax.model import abstract_model, flatten, unflatten
from dsjax.quant.moq import (BitSchedule, EigenvalueSchedule, MoQConfig, WeightPlan,
                             advance_schedule, drops_due, export_weight, init_schedule,
                             moq_weights, period_factors, top_eigenvalue)
from dsjax.quant.weights import QuantSpec, quantizable

# ----------------------------------------------------------------------------- DeepSpeed JSON

_QUANTIZE_TRAINING = {"enabled", "quantize_verbose", "quantizer_kernel", "quantize_type",
                      "quantize_algo", "quantize_bits", "quantize_schedule", "quantize_groups",
                      "fp16_mixed_quantize", "eigenvalue"}
_SHARED = {"enabled", "quantizer_kernel", "schedule_offset", "quantize_groups", "quantize_verbose",
           "quantization_type", "rounding", "quantize_weight_in_forward", "fp16_mixed_quantize"}
_COMPRESSION = {"weight_quantization", "activation_quantization", "sparse_pruning", "row_pruning",
                "head_pruning", "channel_pruning", "layer_reduction"}
_EIGENVALUE = {"enabled", "verbose", "max_iter", "tol", "stability", "gas_boundary_resolution",
               "layer_name", "layer_num"}
_HINTS = {"quantize-algo": "quantize_algo", "q_type": "quantize_algo.q_type",
          "quantize_period": "quantize_schedule.quantize_period",
          "schedule_offset": "quantize_schedule.schedule_offset",
          "start_bits": "quantize_bits.start_bits", "target_bits": "quantize_bits.target_bits"}


def _known(block, keys: set, where: str) -> dict:
    if not isinstance(block, dict):
        raise ValueError(f"{where} must be a JSON object, got {block!r}")
    unknown = sorted(set(block) - keys)
    if unknown:
        hints = "".join(f"; {k!r} belongs at {_HINTS[k]!r}" for k in unknown if k in _HINTS)
        raise ValueError(f"unknown keys {unknown} in {where}{hints}; known: {sorted(keys)}")
    return block


def _choice(value, choices: tuple, where: str):
    if value not in choices:
        raise ValueError(f"{where}={value!r}: choose one of {', '.join(map(repr, choices))}")
    return value


def parse_deepspeed_config(config, *, group_size: int | None = None,
                           lm_head: bool = False) -> MoQConfig | None:
    """A DeepSpeed config (dict, or the path of its JSON file) -> MoQConfig, or None when its
    block says enabled: false. Other top-level DeepSpeed keys (optimizer, fp16, ...) are not
    MoQ's and are ignored; unknown keys inside the MoQ blocks are errors. quantizer_kernel
    (DeepSpeed's CUDA quantizer) and eigenvalue.verbose / layer_name are accepted and change
    nothing. group_size and lm_head are dsjax's additions (see MoQConfig)."""
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    blocks = [k for k in ("quantize_training", "compression_training") if k in config]
    if len(blocks) != 1:
        raise ValueError("a MoQ config needs exactly one of 'quantize_training' or "
                         f"'compression_training' (with weight_quantization); found {blocks}")
    parse = _quantize_training if blocks[0] == "quantize_training" else _compression_training
    cfg = parse(config[blocks[0]])
    return None if cfg is None else dataclasses.replace(cfg, group_size=group_size, lm_head=lm_head)


def _mixing(block, where: str) -> float | None:
    block = _known(block or {}, {"enabled", "quantize_change_ratio"}, where)
    return block.get("quantize_change_ratio", 0.001) if block.get("enabled", False) else None


def _quantize_training(block: dict) -> MoQConfig | None:
    """DeepSpeed's quantize_training block. Defaults as DeepSpeed's parser: start 16 bits, period 1000, offset 1000."""
    block = _known(block, _QUANTIZE_TRAINING, "quantize_training")
    if not block.get("enabled", False):
        return None
    bits = _known(block.get("quantize_bits", {}), {"start_bits", "target_bits"},
                  "quantize_training.quantize_bits")
    if "target_bits" not in bits:
        raise ValueError("quantize_training.quantize_bits.target_bits is required (e.g. 8)")
    when = _known(block.get("quantize_schedule", {}), {"quantize_period", "schedule_offset"},
                  "quantize_training.quantize_schedule")
    algo = _known(block.get("quantize_algo", {}), {"q_type", "rounding"},
                  "quantize_training.quantize_algo")
    q_types = {v for v in (block.get("quantize_type"), algo.get("q_type")) if v is not None}
    if len(q_types) > 1:
        raise ValueError(f"quantize_type and quantize_algo.q_type disagree: {sorted(q_types)}")
    q_type = _choice(q_types.pop() if q_types else "symmetric", ("symmetric", "asymmetric"),
                     "quantize_training quantize_type")
    rounding = _choice(algo.get("rounding", "nearest"), ("nearest", "stochastic"),
                       "quantize_training.quantize_algo.rounding")
    schedule = BitSchedule(bits.get("start_bits", 16), bits["target_bits"],
                           when.get("quantize_period", 1000))
    return MoQConfig((schedule,), schedule_offset=when.get("schedule_offset", 1000),
                     quantize_groups=block.get("quantize_groups", 1),
                     symmetric=q_type == "symmetric", stochastic=rounding == "stochastic",
                     mix_change_ratio=_mixing(block.get("fp16_mixed_quantize"),
                                              "quantize_training.fp16_mixed_quantize"),
                     eigenvalue=_eigenvalue(block.get("eigenvalue", {})),
                     verbose=bool(block.get("quantize_verbose", False)))


def _eigenvalue(block: dict) -> EigenvalueSchedule | None:
    """layer_name is DeepSpeed's module path of the blocks: dsjax's are always its `layers`."""
    block = _known(block, _EIGENVALUE, "quantize_training.eigenvalue")
    if not block.get("enabled", False):
        return None
    return EigenvalueSchedule(**{k: block[k] for k in ("max_iter", "tol", "stability",
                                                       "gas_boundary_resolution", "layer_num")
                                 if k in block})


def _compression_training(block: dict) -> MoQConfig | None:
    block = _known(block, _COMPRESSION, "compression_training")
    for name, method in block.items():
        if not isinstance(method, dict):
            raise ValueError(f"compression_training.{name} must be a JSON object, got {method!r}")
        on = method.get("enabled") or method.get("shared_parameters", {}).get("enabled")
        if name != "weight_quantization" and on:
            raise ValueError(f"compression_training.{name} is not supported (dsjax's MoQ is "
                             "weight quantization only): disable it")
    where = "compression_training.weight_quantization"
    wq = _known(block.get("weight_quantization", {}), {"shared_parameters", "different_groups"},
                where)
    shared = _known(wq.get("shared_parameters", {}), _SHARED, f"{where}.shared_parameters")
    if not shared.get("enabled", False):
        return None
    if shared.get("quantize_weight_in_forward", False):
        raise ValueError("quantize_weight_in_forward is DeepSpeed's other path (fixed target "
                         "bits, no schedule); dsjax's MoQ always quantizes in the forward pass "
                         "with the schedule: set it false (start_bits = target_bits is plain QAT)")
    groups = wq.get("different_groups") or {}
    if not groups:
        raise ValueError(f"{where}.different_groups needs at least one group with params "
                         "{start_bits, target_bits, quantization_period} and modules")
    rounding = _choice(shared.get("rounding", "nearest"), ("nearest", "stochastic"),
                       f"{where}.shared_parameters.rounding")
    q_type = _choice(shared.get("quantization_type", "symmetric"), ("symmetric", "asymmetric"),
                     f"{where}.shared_parameters.quantization_type")
    return MoQConfig(tuple(_group(f"{where}.different_groups.{n}", g) for n, g in groups.items()),
                     schedule_offset=shared.get("schedule_offset", 0),
                     quantize_groups=shared.get("quantize_groups", 1),
                     symmetric=q_type == "symmetric", stochastic=rounding == "stochastic",
                     mix_change_ratio=_mixing(shared.get("fp16_mixed_quantize"),
                                              f"{where}.shared_parameters.fp16_mixed_quantize"),
                     verbose=bool(shared.get("quantize_verbose", False)))


def _group(where: str, group: dict) -> BitSchedule:
    group = _known(group, {"params", "modules", "related_modules"}, where)
    params = _known(group.get("params", {}), {"start_bits", "target_bits", "quantization_period"},
                    f"{where}.params")
    missing = sorted({"start_bits", "target_bits"} - set(params))
    if missing:
        raise ValueError(f"{where}.params needs {missing}")
    if group.get("related_modules"):
        raise ValueError(f"{where}.related_modules is for pruning, not weight quantization")
    modules = group.get("modules", ["*"])
    return BitSchedule(params["start_bits"], params["target_bits"],
                       params.get("quantization_period", 1),
                       (modules,) if isinstance(modules, str) else tuple(modules))


# ----------------------------------------------------------------------------- the weights

_LAYER = re.compile(r"^(.*?)layers\.(\d+)\.")


def layer_prefixes(paths) -> list[str]:
    """The blocks' path prefixes ('layers.0.', ..., per tower for two-tower models), in order."""
    found = {m.group(0): (m.group(1), int(m.group(2))) for m in map(_LAYER.match, paths) if m}
    return sorted(found, key=found.get)


def weight_plan(cfg: MoQConfig, shapes: dict[str, tuple]) -> tuple[WeightPlan, ...]:
    """The quantizable weights each group takes, checked against the groups' shapes."""
    spec, layers = QuantSpec(lm_head=cfg.lm_head), layer_prefixes(shapes)
    plan, used = [], set()
    for path, shape in shapes.items():
        if not quantizable(path, spec):
            continue
        K, N = shape  # checked for every quantizable weight: the export quantizes them all
        if N % cfg.quantize_groups or K % (cfg.group_size or K):
            raise ValueError(f"{path} [{K}, {N}]: quantize_groups={cfg.quantize_groups} must "
                             f"divide its {N} output columns and group_size={cfg.group_size} its "
                             f"{K} input rows; choose divisors of every such weight's widths")
        hits = [i for i, s in enumerate(cfg.schedules) if s.matches(path)]
        if len(hits) > 1:
            raise ValueError(f"{path} is in {len(hits)} weight-quantization groups; put each "
                             "weight in one")
        if not hits:
            continue
        used.add(hits[0])
        m = _LAYER.match(path)
        plan.append(WeightPlan(path, cfg.schedules[hits[0]],
                               layers.index(m.group(0)) if m else None))
    for i, s in enumerate(cfg.schedules):
        if i not in used:
            raise ValueError(f"modules {list(s.modules)} match no quantizable weight; dsjax's are "
                             "layers.N.attn.qkv.kernel, layers.N.attn.out.kernel, "
                             "layers.N.mlp.up.kernel, layers.N.mlp.down.kernel (and "
                             "lm_head.kernel with lm_head=True)")
    return tuple(plan)


def layer_eigenvalues(loss_of, params: dict, prefixes: list[str], key,
                      eigen: EigenvalueSchedule):
    """[len(prefixes)] top Hessian eigenvalues of loss_of(params), each in the parameters of
    one layer (the flat paths under one of `prefixes`, see layer_prefixes). The power iteration
    is traced once per tower and mapped over its layers, which share their shapes."""
    flat = flatten(params)
    out = []
    for _, tower in itertools.groupby(prefixes, key=lambda p: p.rsplit("layers.", 1)[0]):
        tower = list(tower)
        names = [k[len(tower[0]):] for k in flat if k.startswith(tower[0])]

        def with_layer(index, layer):  # params with this tower's layer `index` replaced
            swapped = {p + n: jnp.where(index == i, layer[n], flat[p + n])
                       for i, p in enumerate(tower) for n in names}
            return unflatten({**flat, **swapped})

        def top(args):
            index, layer = args
            grad_fn = jax.grad(lambda lp: loss_of(with_layer(index, lp)))
            return top_eigenvalue(grad_fn, layer, jax.random.fold_in(key, index),
                                  max_iter=eigen.max_iter, tol=eigen.tol,
                                  stability=eigen.stability)[0]

        stacked = {n: jnp.stack([flat[p + n] for p in tower]) for n in names}
        out.append(jax.lax.map(top, (jnp.arange(len(tower)), stacked)))
    return jnp.concatenate(out)


def next_token_loss(model, tokens):
    """Mean cross-entropy of each next token of tokens [B, T] int32 (a causal LM)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    hidden, _ = model(inputs, positions)
    return optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden), targets).mean()


# ----------------------------------------------------------------------------- training

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: dict  # nested full-precision parameters (the optimizer's master weights)
    opt_state: Any
    schedule: Any  # moq.ScheduleState, or None without MoQ
    step: jax.Array  # [] int32 optimizer steps taken, overflowed ones included
    key: jax.Array  # stochastic rounding and the eigenvalue start vectors
    eigenvalues: Any = None  # [layers] float32 last measured (0: not yet); eigenvalue schedule only


def _step_keys(state: TrainState):
    """(stochastic rounding key, eigenvalue start-vector key) of the state's next step."""
    return jax.random.split(jax.random.fold_in(state.key, state.step))


class MoQTrainer:
    """Fine-tunes a dsjax model with MoQ (moq: MoQConfig, DeepSpeed's JSON, or None for plain
    full-precision training). num_steps must let every group reach its target bits.
    loss_fn(model, batch) -> scalar; the default is a causal LM's next-token loss."""

    def __init__(self, model: ModelConfig, moq, optimizer: optax.GradientTransformation, *,
                 num_steps: int, loss_fn=next_token_loss, dtype=jnp.float32):
        self.config, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.moq = moq if moq is None or isinstance(moq, MoQConfig) else parse_deepspeed_config(moq)
        module = module_for(model)
        self.graphdef, abstract = abstract_model(model, dtype, module=module)
        shapes = {k: tuple(v.shape) for k, v in abstract.items()}
        self.layers = layer_prefixes(shapes)
        self.plan = () if self.moq is None else weight_plan(self.moq, shapes)
        if self.moq is not None:
            self.moq.check_steps(num_steps)
            self._check_eigenvalue_layers()
            if {s.target_bits for s in self.moq.schedules} <= {8, 4}:
                self._check_export(shapes)  # before training, so that export cannot fail on it
        self._step = jax.jit(self._train_step, donate_argnums=0)

    def init(self, params: dict, seed: int = 0) -> TrainState:
        params = jax.tree.map(jnp.copy, params)  # step() donates the state's buffers
        schedule = (None if self.moq is None
                    else init_schedule(self.plan, self.moq.schedule_offset))
        eigenvalues = (jnp.zeros((len(self.layers),), jnp.float32)
                       if self.moq is not None and self.moq.eigenvalue is not None else None)
        return TrainState(params, self.optimizer.init(params), schedule, jnp.int32(0),
                          jax.random.key(seed), eigenvalues)

    def step(self, state: TrainState, batch) -> tuple[TrainState, jax.Array]:
        """One optimizer step; returns the new state and this step's loss (on the device)."""
        return self._step(state, batch)

    def forward_params(self, state: TrainState) -> dict:
        """The parameters as the training forward pass sees them at this state (what the
        served model must reproduce once every weight is at its target bits)."""
        if self.moq is None:
            return state.params
        flat = moq_weights(flatten(state.params), state.schedule, self.plan, self.moq,
                           _step_keys(state)[0])
        return unflatten(flat)

    def model(self, params: dict):
        return nnx.merge(self.graphdef, params)

    def _loss(self, params, schedule, key, batch):
        if self.moq is not None:
            params = unflatten(moq_weights(flatten(params), schedule, self.plan, self.moq, key))
        return self.loss_fn(nnx.merge(self.graphdef, params), batch)

    def _train_step(self, state: TrainState, batch):
        key, eigen_key = _step_keys(state)
        loss_of = lambda params: self._loss(params, state.schedule, key, batch)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_of)(state.params)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)

        def keep(new, old):  # an overflowed step changes nothing
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        params = keep(optax.apply_updates(state.params, updates), state.params)
        schedule, factors, eigenvalues = state.schedule, None, state.eigenvalues
        if self.moq is not None:
            if self.moq.eigenvalue is not None:
                factors, eigenvalues = self._layer_sensitivity(loss_of, state, eigen_key)
            schedule = advance_schedule(schedule, self.plan, self.moq.schedule_offset, finite,
                                        factors)
            if self.moq.verbose:
                self._report_drops(state.schedule, schedule)
        return TrainState(params, keep(opt_state, state.opt_state), schedule, state.step + 1,
                          state.key, eigenvalues), loss

    # ------------------------------------------------------------------------- eigenvalues

    def _check_eigenvalue_layers(self) -> None:
        e = self.moq.eigenvalue
        if e is not None and e.layer_num > len(self.layers):
            raise ValueError(f"eigenvalue layer_num={e.layer_num} exceeds the model's "
                             f"{len(self.layers)} layers; use 0 (all) or fewer")

    def _layer_sensitivity(self, loss_of, state: TrainState, key):
        """(period factors [layers] for this step's drops, eigenvalues [layers]): measured
        every gas_boundary_resolution steps when a drop is due; otherwise factors 1 (as in
        DeepSpeed) and the last eigenvalues. Layers past layer_num keep factor 1."""
        e, L = self.moq.eigenvalue, len(self.layers)
        count = e.layer_num or L
        due = jnp.any(jnp.stack(list(drops_due(state.schedule, self.plan,
                                               self.moq.schedule_offset).values())))
        now = due & ((state.step + 1) % e.gas_boundary_resolution == 0)

        def measure():
            eig = layer_eigenvalues(loss_of, state.params, self.layers[:count], key, e)
            rest = L - count
            return (jnp.concatenate([period_factors(eig), jnp.ones((rest,), jnp.int32)]),
                    jnp.concatenate([eig, jnp.zeros((rest,), jnp.float32)]))

        return jax.lax.cond(now, measure, lambda: (jnp.ones((L,), jnp.int32), state.eigenvalues))

    def _report_drops(self, before, after) -> None:
        """quantize_verbose: one line per step with a drop (a host callback only then)."""
        paths = [p.path for p in self.plan]
        dropped = jnp.any(jnp.stack([before.bits[p] != after.bits[p] for p in paths]))
        bits = jnp.stack([after.bits[p] for p in paths])
        periods = jnp.stack([after.period[p] for p in paths])
        jax.lax.cond(dropped, lambda: jax.debug.print(
            "MoQ: counted step {s}: bits {b}, next drops at quantized steps {p}",
            s=after.steps, b=bits, p=periods), lambda: None)

    # ------------------------------------------------------------------------- export

    def export_spec(self) -> QuantSpec:
        """The served weight format: MoQ's target bits, groups and symmetry."""
        targets = sorted({s.target_bits for s in self.moq.schedules}) if self.moq else []
        if len(targets) != 1 or targets[0] not in (8, 4):
            raise ValueError(f"init_inference serves one weight format of 8 or 4 bits; this MoQ "
                             f"config targets {targets or 'nothing (MoQ is off)'}")
        return QuantSpec(bits=targets[0], group_size=self.moq.group_size,
                         symmetric=self.moq.symmetric, lm_head=self.moq.lm_head)

    def _check_export(self, shapes: dict) -> None:
        spec = self.export_spec()
        for path, shape in shapes.items():
            if quantizable(path, spec):
                spec.groups(shape[0])

    def export(self, state: TrainState) -> tuple[dict, QuantSpec]:
        """(params with QuantizedWeight leaves, QuantSpec): each trained weight holds exactly its
        training forward's grid at the target (nearest rounding; any mixed full-precision share
        dropped). Quantizable weights no group trained are rounded on the same grid."""
        spec = self.export_spec()
        bits = jax.device_get(state.schedule.bits)
        behind = {p: int(b) for p, b in bits.items() if b != spec.bits}
        if behind:
            path, b = next(iter(behind.items()))
            raise ValueError(f"{len(behind)} weights have not reached {spec.bits} bits yet (e.g. "
                             f"{path} at {b}): train longer, or lower quantize_period or "
                             "start_bits")
        flat = flatten(state.params)
        for path, w in flat.items():
            if quantizable(path, spec):
                flat[path] = export_weight(w, spec.bits, groups=self.moq.quantize_groups,
                                           group_size=self.moq.group_size,
                                           symmetric=self.moq.symmetric)
        return unflatten(flat), spec

    def save(self, state: TrainState, path, *, generation: dict | None = None,
             tokenizer_dir: Path | None = None) -> Path:
        """Writes a dsjax checkpoint (orbax) of the exported model: init_inference(path)."""
        params, spec = self.export(state)
        return checkpoint.save(path, self.config, params, generation=generation,
                               tokenizer_dir=tokenizer_dir, quant=spec)
