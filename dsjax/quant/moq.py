"""MoQ (Mixture-of-Quantization): DeepSpeed's quantization-aware training with a bit schedule,
as pure, jit-compatible functions of the schedule state (no host sync per step).

The rules (DeepSpeed's deepspeed/runtime/quantize.py and compression scheduler; DeepSpeed's MoQ
tutorial and the DeepSpeed-Inference paper describe them):

* Bits. Each quantized weight starts at `start_bits` and loses one bit whenever q, the index of
  the quantized step, reaches its current period; the period starts at `quantize_period` P and
  doubles after every drop, until `target_bits`. DeepSpeed counts q from the offset and never
  resets it, so the drops fall at q = P, 2P, 4P, 8P, ...: quantized step P is the first one at
  start_bits - 1, step 2P the first at start_bits - 2. A reading of the period as the time
  *between* drops ("P steps, drop, then 2P more, ...") would put them at P, 3P, 7P,
  15P; dsjax follows DeepSpeed's code.
* Offset. The first `schedule_offset` counted steps train in full precision; quantized step 1
  is the next one. (DeepSpeed: with offset 0 it quantizes once before the first forward pass,
  exactly so; with an offset O >= 1 its scheduler lets one more full-precision step through,
  its first quantized forward pass being step O + 2. dsjax reads every offset the same way.)
* Overflow. A step whose gradients are not finite (DeepSpeed: an fp16 overflow, which its
  optimizer skips) is not counted. (DeepSpeed counts it anyway when the eigenvalue schedule is
  on; dsjax does not.)
* Quantizer, per group. DeepSpeed reshapes a torch weight [out, in] to [groups, -1]: blocks of
  out/groups output channels. dsjax kernels are [in, out] = [K, N], so a group is N/groups
  columns over all K rows; `group_size` (dsjax's own, as in QuantSpec) also cuts K into groups
  of G rows. With u = 0 (nearest) or uniform in [-1/2, 1/2) (stochastic rounding):
    bits >= 3, symmetric:  s = max|w| / 2^(b-1), q = clip(round(w/s + u), -2^(b-1), 2^(b-1)-1),
                           w' = q s (the positive end loses a step, as in DeepSpeed);
    bits >= 3, asymmetric: s = (max w - min w) / 2^b, z = -round(min w / s),
                           q = clip(round(w/s + z + u), 0, 2^b - 1), w' = (q - z) s;
    2 bits, ternary:       t = 0.7 mean|w|, a = mean of |w| over |w| > t, w' = a sign(w) [|w| > t];
    1 bit, binary:         w' = mean|w| sign(w).
  Ternary and binary are symmetric with nearest rounding only (DeepSpeed asserts the same).
  Gradients go straight through (dw'/dw = 1): DeepSpeed quantizes the fp16 copy after each step
  while the fp32 master weights take the gradient, which is the same thing.
* Mixing (`fp16_mixed_quantize`): w'' = r w + (1 - r) w' while the weight's bits are within one
  of the target, r = max(0, 1 - c (q - q_drop)) with c = `quantize_change_ratio` and q_drop the
  quantized step of the weight's last drop (0 before any): 1 at a drop, then c less per
  quantized step. DeepSpeed's test reads `bits >= target - 1`, which always
  holds, so it mixes at every width; dsjax follows the documented intent (the issue's rule).
  DeepSpeed keeps one ratio reset by any weight's drop; dsjax keeps one per weight (the same
  unless the eigenvalue schedule puts layers out of step).
* Eigenvalue schedule. The top eigenvalue of each layer's Hessian (of the loss at the weights
  the forward pass sees, in that layer's parameters; power iteration on Hessian-vector products, stopped after `max_iter` products or
  when the estimate's relative change is under `tol`) is taken in magnitude and divided by the
  largest over layers (0 counts as 1); at a drop the layer's next period is 2 * period *
  (1 + floor(4 * that)): up to 5x longer for the most sensitive layers. As in DeepSpeed it is
  computed every `gas_boundary_resolution` steps when a drop is due, and a drop on any other
  step uses factor 1. DeepSpeed's shipped code rejects this switch ("temporarily disabled").
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from dsjax.quant.weights import QuantizedWeight, pack_int4

MAX_BITS = 24  # float32 carries 24 significant bits: more is no quantization at all


@dataclasses.dataclass(frozen=True)
class BitSchedule:
    """One DeepSpeed weight-quantization group: the weights whose dsjax parameter path matches
    one of `modules` (regular expressions searched in the path; "*" matches every weight) go
    from start_bits down to target_bits, the first drop after `period` quantized steps."""

    start_bits: int
    target_bits: int
    period: int
    modules: tuple[str, ...] = ("*",)

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        for name in ("start_bits", "target_bits", "period"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.target_bits < 1:
            raise ValueError(f"target_bits must be >= 1 (2: ternary, 1: binary), got "
                             f"{self.target_bits}")
        if self.target_bits > self.start_bits:
            raise ValueError(f"target_bits ({self.target_bits}) is above start_bits "
                             f"({self.start_bits}): MoQ only lowers precision; set start_bits >= "
                             "target_bits (equal: plain QAT at target_bits)")
        if self.start_bits > MAX_BITS:
            raise ValueError(f"start_bits={self.start_bits}: above {MAX_BITS} bits float32 "
                             f"weights are not quantized at all; use at most {MAX_BITS}")
        if self.period < 1:
            raise ValueError(f"quantize_period must be >= 1 step, got {self.period}")
        if not self.modules:
            raise ValueError("a weight-quantization group needs modules (use ['*'] for all)")

    @property
    def steps_to_target(self) -> int:
        """Quantized steps until the last drop (eigenvalue factors can only stretch it)."""
        drops = self.start_bits - self.target_bits
        return self.period * 2 ** (drops - 1) if drops else 0

    def matches(self, path: str) -> bool:
        return any(m == "*" or re.search(m, path) for m in self.modules)


@dataclasses.dataclass(frozen=True)
class EigenvalueSchedule:
    """DeepSpeed's `eigenvalue` block (layer_num 0: every layer of the model)."""

    max_iter: int = 100
    tol: float = 1e-2
    stability: float = 1e-6
    gas_boundary_resolution: int = 1
    layer_num: int = 0

    def __post_init__(self):
        if self.max_iter < 1 or self.gas_boundary_resolution < 1:
            raise ValueError(f"eigenvalue max_iter and gas_boundary_resolution must be >= 1, got "
                             f"{self.max_iter} and {self.gas_boundary_resolution}")
        if self.tol < 0 or self.stability < 0 or self.layer_num < 0:
            raise ValueError(f"eigenvalue tol, stability and layer_num must be >= 0, got "
                             f"{self.tol}, {self.stability}, {self.layer_num}")


@dataclasses.dataclass(frozen=True)
class MoQConfig:
    """Everything MoQ needs; train.parse_deepspeed_config builds it from DeepSpeed's JSON.

    mix_change_ratio: fp16_mixed_quantize's quantize_change_ratio (None: no mixing).
    group_size (dsjax): rows of K per scale, as QuantSpec.group_size. lm_head (dsjax): also
    quantize an untied LM head, as QuantSpec.lm_head."""

    schedules: tuple[BitSchedule, ...]
    schedule_offset: int = 0
    quantize_groups: int = 1
    symmetric: bool = True
    stochastic: bool = False
    mix_change_ratio: float | None = None
    eigenvalue: EigenvalueSchedule | None = None
    group_size: int | None = None
    lm_head: bool = False
    verbose: bool = False

    def __post_init__(self):
        object.__setattr__(self, "schedules", tuple(self.schedules))
        if not self.schedules:
            raise ValueError("MoQ needs at least one weight-quantization group")
        if self.schedule_offset < 0:
            raise ValueError(f"schedule_offset must be >= 0 steps, got {self.schedule_offset}")
        if self.quantize_groups < 1:
            raise ValueError(f"quantize_groups must be >= 1, got {self.quantize_groups}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 rows (or None), got {self.group_size}")
        if self.mix_change_ratio is not None and not 0 < self.mix_change_ratio <= 1:
            raise ValueError(f"quantize_change_ratio must be in (0, 1], got "
                             f"{self.mix_change_ratio}")
        if self.lowest_bits <= 2 and (not self.symmetric or self.stochastic):
            raise ValueError("2-bit (ternary) and 1-bit (binary) weights are symmetric with "
                             "nearest rounding (as in DeepSpeed): use quantization_type "
                             "'symmetric' and rounding 'nearest', or target_bits >= 3")

    @property
    def lowest_bits(self) -> int:
        return min(s.target_bits for s in self.schedules)

    def check_steps(self, num_steps: int) -> None:
        """Every group must reach its target within num_steps counted steps."""
        for s in self.schedules:
            last = self.schedule_offset + s.steps_to_target
            if last > num_steps:
                drops = s.start_bits - s.target_bits
                fit = (num_steps - self.schedule_offset) // 2 ** (drops - 1)
                raise ValueError(
                    f"{s.start_bits} -> {s.target_bits} bits takes {drops} drops, the last at step "
                    f"schedule_offset + period * 2^{drops - 1} = {last} > {num_steps} training "
                    f"steps: use quantize_period <= {fit} (drops fall at P, 2P, 4P, ... after "
                    "the offset), fewer start_bits, or train longer")


# ----------------------------------------------------------------------------- the quantizer

def _blocks(w, groups: int, group_size: int | None):
    """w [K, N] -> [K/G, G, groups, N/groups]: one scale per (row group, column group)."""
    K, N = w.shape
    G = group_size or K
    return w.reshape(K // G, G, groups, N // groups)


def _integer_codes(b, bits, symmetric: bool, noise):
    """Blocks -> (codes q, scales s, zeros z) with w' = (q - z) s; bits may be traced."""
    levels = jnp.exp2(jnp.asarray(bits, jnp.float32))
    if symmetric:
        s = jnp.max(jnp.abs(b), axis=(1, 3), keepdims=True) * 2 / levels
        s = jnp.where(s > 0, s, 1.0)
        q = jnp.clip(jnp.round(b / s + noise), -levels / 2, levels / 2 - 1)
        return q, s, jnp.zeros_like(s)
    lo, hi = jnp.min(b, axis=(1, 3), keepdims=True), jnp.max(b, axis=(1, 3), keepdims=True)
    s = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
    z = -jnp.round(lo / s)
    return jnp.clip(jnp.round(b / s + z + noise), 0, levels - 1), s, z


def _grid(b, bits, symmetric, noise):
    q, s, z = _integer_codes(b, bits, symmetric, noise)
    return (q - z) * s


def _ternary(b):
    mag = jnp.abs(b)
    keep = mag > 0.7 * jnp.mean(mag, axis=(1, 3), keepdims=True)
    alpha = (jnp.sum(mag * keep, axis=(1, 3), keepdims=True)
             / jnp.maximum(jnp.sum(keep, axis=(1, 3), keepdims=True), 1))
    return alpha * jnp.sign(b) * keep


def _binary(b):
    return jnp.sign(b) * jnp.mean(jnp.abs(b), axis=(1, 3), keepdims=True)


def fake_quantize(w, bits, *, groups: int = 1, group_size: int | None = None,
                  symmetric: bool = True, noise_key=None, lowest_bits: int = 3):
    """w [K, N] -> the same values on DeepSpeed's `bits`-bit grid (bits may be a traced int;
    lowest_bits: the fewest bits it will take, static: >= 3 leaves out the ternary and binary
    branches). noise_key: stochastic rounding with this key; None: round to nearest."""
    b = _blocks(w.astype(jnp.float32), groups, group_size)
    noise = 0.0 if noise_key is None else jax.random.uniform(noise_key, b.shape, jnp.float32,
                                                             -0.5, 0.5)
    grid = lambda b: _grid(b, bits, symmetric, noise)  # noqa: E731
    if lowest_bits >= 3:
        out = grid(b)
    else:
        out = jax.lax.switch(jnp.clip(bits, 1, 3) - 1, [_binary, _ternary, grid], b)
    return out.reshape(w.shape).astype(w.dtype)


def straight_through(w, w_quantized):
    """w_quantized in the forward pass, the identity in the backward pass."""
    return w + jax.lax.stop_gradient(w_quantized - w)


def export_weight(w, bits: int, *, groups: int = 1, group_size: int | None = None,
                  symmetric: bool = True) -> QuantizedWeight:
    """w [K, N] -> the QuantizedWeight (dsjax.quant.weights layout) holding exactly
    fake_quantize(w, bits) (nearest rounding); bits 8 or 4. Column groups share a scale, so
    the per-column scales of QuantSpec(group_size) repeat it."""
    K, N = w.shape
    G = group_size or K
    q, s, z = _integer_codes(_blocks(w.astype(jnp.float32), groups, group_size), bits,
                             symmetric, 0.0)

    def per_column(a):  # [K/G, 1, groups, 1] -> [K/G, N]: each column group's value repeated
        return jnp.broadcast_to(a, (K // G, 1, groups, N // groups)).reshape(K // G, N)

    q = q.reshape(K, N)
    if symmetric:  # codes in [-2^(b-1), 2^(b-1)): int8, or 4-bit offset by 8 as dsjax stores it
        values, zeros = (q.astype(jnp.int8) if bits == 8 else (q + 8).astype(jnp.uint8)), None
    else:
        values, zeros = q.astype(jnp.uint8), per_column(z)
    if bits == 4:
        values = pack_int4(values)
    return QuantizedWeight(values, per_column(s), zeros, bits, G)


# ----------------------------------------------------------------------------- the schedule

@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """A quantized weight: its parameter path, its group's schedule, its layer (None outside
    the blocks: no eigenvalue factor)."""

    path: str
    schedule: BitSchedule
    layer: int | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScheduleState:
    steps: jax.Array  # [] int32: counted optimizer steps (overflowed ones excluded)
    bits: dict  # {path: [] int32}: current bits
    period: dict  # {path: [] int32}: quantized step of the next drop
    last_drop: dict  # {path: [] int32}: quantized step of the last drop (0: none yet)


def quantized_step(state: ScheduleState, offset: int):
    """q of the coming forward pass: 1 for the first quantized step (the one after `offset`
    counted steps), 2 for the next, ...; below 1 while still in the offset."""
    return state.steps - offset + 1


def _due(state: ScheduleState, plan, q) -> dict:
    return {p.path: (q >= 1) & (state.bits[p.path] > p.schedule.target_bits)
            & (q >= state.period[p.path]) for p in plan}


def _apply_drops(state: ScheduleState, plan, drop: dict, q, factors, steps) -> ScheduleState:
    bits, period, last = dict(state.bits), dict(state.period), dict(state.last_drop)
    for p in plan:
        factor = 1 if factors is None or p.layer is None else factors[p.layer]
        bits[p.path] = bits[p.path] - drop[p.path].astype(jnp.int32)
        period[p.path] = jnp.where(drop[p.path], _grow(period[p.path], factor), period[p.path])
        last[p.path] = jnp.where(drop[p.path], q, last[p.path])
    return ScheduleState(steps, bits, period, last)


def _grow(period, factor):
    """2 * factor * period, saturating instead of overflowing int32 (5^k 2^k grows fast)."""
    return jnp.where(period > 2 ** 26, 2 ** 30, period * 2 * factor)


def init_schedule(plan: tuple[WeightPlan, ...], offset: int) -> ScheduleState:
    """The state before the first step. With offset 0 that step is quantized step 1, which
    already drops a bit when P = 1 (DeepSpeed quantizes once before its first forward pass)."""
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    state = ScheduleState(i32(0), {p.path: i32(p.schedule.start_bits) for p in plan},
                          {p.path: i32(p.schedule.period) for p in plan},
                          {p.path: i32(0) for p in plan})
    q = 1 - offset
    drop = {k: jnp.asarray(d, bool) for k, d in _due(state, plan, q).items()}
    return _apply_drops(state, plan, drop, q, None, state.steps)


def drops_due(state: ScheduleState, plan, offset: int) -> dict:
    """{path: bool}: the weight drops a bit for the next step if this one is counted."""
    return _due(state, plan, quantized_step(state, offset) + 1)


def advance_schedule(state: ScheduleState, plan, offset: int, counted,
                     factors=None) -> ScheduleState:
    """The state after one optimizer step; counted: False for an overflowed step.
    factors: [layers] int32 period factors of this step (None: all 1)."""
    counted = jnp.asarray(counted, bool)
    q = quantized_step(state, offset) + 1
    drop = {k: d & counted for k, d in _due(state, plan, q).items()}
    return _apply_drops(state, plan, drop, q, factors, state.steps + counted.astype(jnp.int32))


def mix_ratio(state: ScheduleState, p: WeightPlan, cfg: MoQConfig):
    """The full-precision share r of the weight this step (mixing on)."""
    q = quantized_step(state, cfg.schedule_offset)
    r = jnp.clip(1.0 - (q - state.last_drop[p.path]) * cfg.mix_change_ratio, 0.0, 1.0)
    return jnp.where(state.bits[p.path] <= p.schedule.target_bits + 1, r, 0.0)


def moq_weights(flat: dict, state: ScheduleState, plan, cfg: MoQConfig, key) -> dict:
    """{path: array} -> the same with each planned weight as the forward pass sees it this step
    (full precision before the offset; fake-quantized, optionally mixed; straight-through)."""
    started = quantized_step(state, cfg.schedule_offset) >= 1
    out = dict(flat)
    for i, p in enumerate(plan):
        w = flat[p.path]
        wq = fake_quantize(w, state.bits[p.path], groups=cfg.quantize_groups,
                           group_size=cfg.group_size, symmetric=cfg.symmetric,
                           noise_key=jax.random.fold_in(key, i) if cfg.stochastic else None,
                           lowest_bits=p.schedule.target_bits)
        if cfg.mix_change_ratio is not None:
            r = mix_ratio(state, p, cfg)
            wq = r * w + (1 - r) * wq
        out[p.path] = straight_through(w, jnp.where(started, wq, w))
    return out


# ----------------------------------------------------------------------------- eigenvalues

def _normalize(v, stability: float):
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(v))) + stability
    return jax.tree.map(lambda x: jnp.nan_to_num(x / norm, nan=0.0, posinf=0.0, neginf=0.0), v)


def top_eigenvalue(grad_fn, x, key, *, max_iter: int, tol: float, stability: float = 0.0):
    """The dominant eigenvalue of the Hessian of a scalar function at x (a pytree), given its
    gradient function, by power iteration on Hessian-vector products (jax.jvp of grad_fn).
    Stops after max_iter products or once |new - old| < tol |new| (DeepSpeed's rule).
    Returns (eigenvalue [] float32, products used [] int32)."""
    leaves, tree = jax.tree.flatten(x)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype)
                                  for k, a in zip(keys, leaves)])

    def going(c):
        i, new, old, _ = c
        return (i < max_iter) & (new != 0) & (jnp.abs(new - old) >= tol * jnp.abs(new))

    def power_step(c):
        i, new, _, v = c
        hv = jax.tree.map(jnp.nan_to_num, jax.jvp(grad_fn, (x,), (v,))[1])
        estimate = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(hv), jax.tree.leaves(v)))
        return i + 1, estimate.astype(jnp.float32), new, _normalize(hv, stability)

    start = (jnp.int32(0), jnp.float32(1.0), jnp.float32(0.0), _normalize(v, stability))
    i, eigenvalue, _, _ = jax.lax.while_loop(going, power_step, start)
    return eigenvalue, i


def period_factors(eigenvalues):
    """[layers] eigenvalues -> [layers] int32 factors 1 + floor(4 |e| / max |e|) (0 counts as
    the largest: DeepSpeed's treatment of layers whose estimate failed). Counted by comparison,
    not division: XLA may divide as a multiply by a reciprocal, giving the top layer 4, not 5."""
    mag = jnp.abs(jnp.nan_to_num(eigenvalues, nan=0.0, posinf=0.0, neginf=0.0))
    top = jnp.max(mag)
    quarters = sum((4 * mag >= k * top).astype(jnp.int32) for k in range(1, 5))
    return jnp.where(mag > 0, 1 + quarters, 5).astype(jnp.int32)
