"""The one conversion engine: a family policy is a table of rules, run here.

A Rule maps one or more HF tensor names (with `{i}` for the layer index) to one dsjax parameter
path through a named transform. Every checkpoint tensor must be consumed by a rule or matched by
an explicit ignore pattern (buffers such as GPT-2's causal mask); every model parameter must be
produced; every produced shape must equal the model's, and each tensor a rule fuses with others
must have its own shape. Anything else raises CheckpointError naming the tensor, before any
weight is converted. `match` runs the checks that need no model (names, fused parts) when a
checkpoint is opened; `convert` runs them again with the shapes, then converts.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from converters.loader import CheckpointError, TensorSource
from dsjax.config import ModelConfig
from dsjax.lazy import Lazy, Mapped, ReadCounter, Stored

log = logging.getLogger("dsjax.converters")


# Transforms: explicit per rule, never guessed from tensor rank. HF Linear weights are [out, in];
# dsjax kernels are [in, out]. Each transform also states its output shape, so that every shape
# is checked from the headers before any tensor is read.
@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[..., np.ndarray]
    shape: Callable[..., tuple]


IDENTITY = Transform("identity", lambda x: x, lambda s: tuple(s))
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda s: tuple(s[::-1]))
# separate [out_j, in] Linear weights -> one fused [in, sum out_j] kernel (QKV, gate|up)
CONCAT_TRANSPOSED = Transform(
    "concat_transposed", lambda *xs: np.concatenate([x.T for x in xs], axis=1),
    lambda *ss: (ss[0][1], sum(s[0] for s in ss)) if all(len(s) == 2 for s in ss) else None)
CONCAT = Transform("concat", lambda *xs: np.concatenate(xs, axis=0),
                   lambda *ss: (sum(s[0] for s in ss),) + tuple(ss[0][1:]))
# a Conv2d weight [out, in, kh, kw] whose stride equals its kernel (ViT/CLIP patches) -> the
# kernel [in * kh * kw, out] of a linear map of patches flattened in (in, kh, kw) order
CONV_AS_LINEAR = Transform(
    "conv_as_linear", lambda x: x.reshape(x.shape[0], -1).T,
    lambda s: (s[1] * s[2] * s[3], s[0]) if len(s) == 4 else None)


def qkv_per_head(num_heads: int) -> Transform:
    """A fused QKV Linear stored per head, rows [H, 3, Dh] (BLOOM, GPT-NeoX, Megatron), ->
    dsjax's [in, q heads | k heads | v heads] kernel; 1-D biases are reordered the same way."""

    def apply(x):  # rows [H, 3, Dh] -> [3, H, Dh], as a gather (which lazy tensors take)
        rows = np.arange(x.shape[0]).reshape(num_heads, 3, -1).swapaxes(0, 1).reshape(-1)
        y = np.take(x, rows, axis=0)
        return y.T if y.ndim == 2 else y

    def shape(s):
        if s[0] % (3 * num_heads):
            return None  # reported as a shape mismatch
        return tuple(s[::-1])

    return Transform(f"qkv_per_head({num_heads})", apply, shape)


@dataclasses.dataclass(frozen=True)
class Rule:
    target: str  # dsjax parameter path, e.g. "layers.{i}.attn.qkv.kernel"
    sources: tuple[str, ...]  # HF names relative to the policy prefix, e.g. "h.{i}.attn.c_attn.weight"
    transform: Transform = IDENTITY
    # each source's own shape, stated by a rule that fuses several: their fused shape alone would
    # let two of them trade places (q_proj and k_proj of a GQA model) unnoticed
    parts: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if len(self.sources) > 1 and (self.parts is None or len(self.parts) != len(self.sources)):
            raise TypeError(f"the rule for {self.target} fuses {len(self.sources)} tensors: "
                            "it states each one's shape (parts=)")


def layer_norm_rules(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    """A norm's scale (and bias): HF `theirs.weight` -> dsjax `ours.scale`."""
    rules = [Rule(f"{ours}.scale", (f"{theirs}.weight",))]
    return rules + [Rule(f"{ours}.bias", (f"{theirs}.bias",))] if bias else rules


def linear_rules(ours: str, theirs: str, transform: Transform = TRANSPOSE,
                 bias: bool = True) -> list[Rule]:
    """A Linear's kernel (HF [out, in] -> [in, out] by default) and optional bias."""
    rules = [Rule(f"{ours}.kernel", (f"{theirs}.weight",), transform)]
    return rules + [Rule(f"{ours}.bias", (f"{theirs}.bias",))] if bias else rules


def lm_head_rules(cfg: ModelConfig, theirs: str = "lm_head") -> list[Rule]:
    """The output projection, when it is not tied to the input embedding."""
    if cfg.tie_word_embeddings:
        return []
    return linear_rules("lm_head", theirs, bias=cfg.lm_head_bias)


def qkv_widths(cfg: ModelConfig) -> tuple[int, int, int]:
    """The output widths of separate q, k and v projections (GQA/MQA: k and v narrower)."""
    q, kv = cfg.num_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    return q, kv, kv


def fused_linear_rules(ours: str, theirs: tuple[str, ...], widths: tuple[int, ...], in_dim: int,
                       bias: bool = True) -> list[Rule]:
    """Separate HF Linears (each [width, in_dim]) fused into one dsjax Linear [in_dim, sum of
    widths] (QKV, gate|up); each part's shape is stated, so it is checked on its own."""
    rules = [Rule(f"{ours}.kernel", tuple(f"{t}.weight" for t in theirs), CONCAT_TRANSPOSED,
                  tuple((w, in_dim) for w in widths))]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), CONCAT,
                          tuple((w,) for w in widths)))
    return rules


def fused_qkv_rules(ours: str, theirs: str, cfg: ModelConfig, bias: bool = True) -> list[Rule]:
    """A QKV Linear fused per head ([H, 3, Dh] rows), with its bias reordered alike."""
    t = qkv_per_head(cfg.num_heads)
    rules = [Rule(f"{ours}.kernel", (f"{theirs}.weight",), t)]
    return rules + [Rule(f"{ours}.bias", (f"{theirs}.bias",), t)] if bias else rules


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    model_types: tuple[str, ...]  # HF config `model_type` values served
    architectures: tuple[str, ...]  # HF classes accepted
    prefix: str  # the base model's prefix in *ForCausalLM checkpoints ("transformer.", "model.")
    make_config: Callable[[dict], ModelConfig]
    make_rules: Callable[[ModelConfig], tuple[Rule, ...]]
    ignore: tuple[str, ...] = ()  # regexes of HF names that hold no weights
    # (regex, replacement) pairs applied to checkpoint names first: legacy spellings
    renames: tuple[tuple[str, str], ...] = ()
    # a prefix that depends on the config (CLIP: the one tower a one-tower model holds)
    prefix_for: Callable[[ModelConfig], str] | None = None


def expand(rules: tuple[Rule, ...], num_layers: int) -> list[Rule]:
    out = []
    for rule in rules:
        layers = range(num_layers) if "{i}" in rule.target else [None]
        for i in layers:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            out.append(dataclasses.replace(rule, target=fmt(rule.target),
                                           sources=tuple(fmt(s) for s in rule.sources)))
    return out


def _resolve_names(policy: Policy, cfg: ModelConfig, source: TensorSource) -> tuple[str, dict]:
    """(prefix, {policy-relative name: checkpoint name}). Base-model checkpoints lack the
    prefix; head tensors (lm_head.*) live outside it in both."""
    prefix = policy.prefix_for(cfg) if policy.prefix_for else policy.prefix
    mapping = {}
    for name in source:
        rel = name[len(prefix):] if name.startswith(prefix) else name
        for pattern, replacement in policy.renames:
            rel = re.sub(pattern, replacement, rel)
        if rel in mapping:
            raise CheckpointError(f"{source.origin}: {mapping[rel]!r} and {name!r} are the same "
                                  f"tensor {rel!r} of the {policy.name} policy; keep one")
        mapping[rel] = name
    return prefix, mapping


def match(policy: Policy, cfg: ModelConfig, source: TensorSource) -> tuple[list[Rule], dict]:
    """(expanded rules, {policy-relative name: checkpoint name}) once the layers the config
    counts are the checkpoint's, every tensor the rules need is there, every other one is
    explained by an ignore pattern, and each fused part has its stated shape: from names and
    headers alone, before any model is built or tensor read."""
    table = policy.make_rules(cfg)
    prefix, names = _resolve_names(policy, cfg, source)
    _check_layers(table, cfg, names, source.origin)
    rules = expand(table, cfg.num_layers)
    used = {s for r in rules for s in r.sources}
    missing = sorted(used - set(names))
    if missing:
        raise CheckpointError(
            f"{source.origin}: {len(missing)} tensor(s) the {policy.name} policy needs are missing, "
            f"e.g. {', '.join(repr(prefix + m) for m in missing[:5])}")
    ignored = [re.compile(p) for p in policy.ignore]
    unused = set(names) - used
    unexpected = sorted(names[n] for n in unused if not any(p.fullmatch(n) for p in ignored))
    if unused and not unexpected:
        log.info("%s: not read, as the %s policy's ignore list says: %s", source.origin,
                 policy.name, ", ".join(sorted(names[n] for n in unused)[:8]))
    if unexpected:
        raise CheckpointError(
            f"{source.origin}: {len(unexpected)} tensor(s) the {policy.name} policy does not know, "
            f"e.g. {', '.join(map(repr, unexpected[:5]))}; refusing to drop them silently "
            "(is the config's architecture right?)")
    for r in rules:
        for s, want in zip(r.sources, r.parts or ()):
            if tuple(source.shapes[names[s]]) != want:
                raise CheckpointError(
                    f"{source.origin}: {names[s]} has shape {tuple(source.shapes[names[s]])}, but "
                    f"the config implies {want} (one of the {len(r.sources)} tensors fused into "
                    f"{r.target})")
    return rules, names


def _check_layers(table: tuple[Rule, ...], cfg: ModelConfig, names: dict, origin: str) -> None:
    """The layer indices the checkpoint's per-layer names hold must be 0 .. num_layers - 1:
    checked before the table is written out per layer, so an absurd count fails at once."""
    patterns = [re.compile(r"(\d+)".join(map(re.escape, s.split("{i}"))))
                for r in table for s in r.sources if "{i}" in s]
    held = sorted({int(m.group(1)) for n in names for p in patterns if (m := p.fullmatch(n))})
    n = cfg.num_layers
    if not patterns or (len(held) == n and held[0] == 0 and held[-1] == n - 1):
        return
    if not held:
        found = "no layers"
    elif held == list(range(held[0], held[-1] + 1)):
        found = f"layers {held[0]}..{held[-1]}"
    else:
        found = "layers " + ", ".join(map(str, held[:8])) + (", ..." if len(held) > 8 else "")
    lacking = sum(i < n for i in held) < n
    raise CheckpointError(
        f"{origin}: the config says {n} layers, the checkpoint holds {found}: the tensors of "
        + ("the other layers are missing" if lacking else f"layers {n} and up are unexpected")
        + " (is this config the checkpoint's own?)")


def untie_if_head_differs(policy: Policy, cfg: ModelConfig, source: TensorSource) -> ModelConfig:
    """The config, untied where it ties the LM head to the embeddings but the checkpoint holds a
    head of its own that differs from them: transformers keeps that head (with a warning), and
    so does dsjax. A head equal to the embeddings stays tied."""
    if not cfg.tie_word_embeddings:
        return cfg
    untied = dataclasses.replace(cfg, tie_word_embeddings=False)
    table = policy.make_rules(untied)
    head = next((r for r in table if r.target.endswith("lm_head.kernel")), None)
    embed = next((r for r in table if head and r.target == head.target.replace(
        "lm_head.kernel", "embed.embedding")), None)
    _, names = _resolve_names(policy, cfg, source)
    if head is None or embed is None or not all(s in names for s in head.sources + embed.sources):
        return cfg
    ours = head.transform.apply(*(source[names[s]] for s in head.sources))
    theirs = embed.transform.apply(*(source[names[s]] for s in embed.sources)).T
    if ours.shape == theirs.shape and np.array_equal(ours, theirs):
        log.info("%s: the checkpoint's %s equals the embeddings: tied, as the config says",
                 source.origin, names[head.sources[0]])
        return cfg
    log.warning("%s: the config ties the LM head to the input embeddings (tie_word_embeddings), "
                "but the checkpoint holds its own %s, which differs from them: it is kept, untied, "
                "as transformers keeps it", source.origin, names[head.sources[0]])
    return untied


def convert(policy: Policy, cfg: ModelConfig, source: TensorSource,
            expected: dict[str, jax.ShapeDtypeStruct], dtype, progress: bool = True,
            put: Callable[[str, np.ndarray], jax.Array] | None = None,
            counter: ReadCounter | None = None) -> dict[str, jax.Array]:
    """Runs the policy's table over `source`; returns {param path: device array} in `dtype`.
    With a counter, the values are lazy tensors (dsjax.lazy) that read only the blocks asked
    of them, counting the bytes read."""
    rules, names = checked_rules(policy, cfg, source, expected)
    put = put or (lambda path, x: jnp.asarray(x))
    np_dtype = np.dtype(jnp.dtype(dtype))
    return {r.target: put(r.target, convert_rule(r, names, source, np_dtype, counter))
            for r in _progress(rules, progress, f"loading {policy.name}")}


def checked_rules(policy: Policy, cfg: ModelConfig, source: TensorSource,
                  expected: dict[str, jax.ShapeDtypeStruct]) -> tuple[list[Rule], dict]:
    """match()'s (rules, names), once the rules make exactly the expected parameters and every
    shape they produce, computed from the headers, is the expected one: no tensor is read."""
    rules, names = match(policy, cfg, source)
    targets = [r.target for r in rules]
    if sorted(targets) != sorted(expected):
        raise CheckpointError(
            f"{policy.name} policy produces {sorted(set(targets) ^ set(expected))[:5]} "
            "which do not match the model's parameters")
    for r in rules:  # shapes first, from the headers: no tensor is read before all are checked
        got = r.transform.shape(*(source.shapes[names[s]] for s in r.sources))
        if got != tuple(expected[r.target].shape):
            raise CheckpointError(
                f"{source.origin}: {', '.join(names[s] for s in r.sources)} gives shape {got} for "
                f"{r.target}, but the config implies {tuple(expected[r.target].shape)}")
    return rules, names


def convert_rule(rule: Rule, names: dict, source: TensorSource, np_dtype: np.dtype,
                 counter: ReadCounter | None = None) -> np.ndarray | Lazy:
    """One rule's parameter: its tensors read, transformed and cast to np_dtype; a kernel the
    checkpoint stores quantized comes as its QuantizedWeight (TensorSource.quantized_kernel).
    With a counter: a lazy tensor, each block checked and cast as it is read."""
    tensors = [names[s] for s in rule.sources]
    quantized = source.quantized_kernel(rule.transform.name, tensors)
    if quantized is not None:
        return quantized
    def cast(v):
        if np_dtype == np.float16:
            _check_fits_fp16(v, source.origin, tensors)
        return np.asarray(v, dtype=np_dtype)

    def read(name):  # a memory map stays unread; an array the source made is cast now
        a = source[name]
        if not isinstance(a, np.memmap) and a.dtype.itemsize > np_dtype.itemsize:
            a = cast(a)  # (as the whole-array path does: not kept wider than needed)
        return Stored(a, counter)

    value = rule.transform.apply(*(read(n) if counter is not None else source[n] for n in tensors))
    return Mapped(value, cast, np_dtype) if isinstance(value, Lazy) else cast(value)


_WIDER_THAN_FP16 = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16))


def _check_fits_fp16(value: np.ndarray, origin: str, tensors: list[str]) -> None:
    """Finite values beyond float16's range would become inf: an error naming the tensor (NaN
    and inf already in the checkpoint are left to the engine's check after loading)."""
    limit = float(np.finfo(np.float16).max)
    if value.dtype not in _WIDER_THAN_FP16 or not value.size:
        return
    if max(float(np.max(value)), -float(np.min(value))) <= limit:  # NaN compares False
        return
    finite = value[np.isfinite(value)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak > limit:
        raise CheckpointError(
            f"{origin}: {', '.join(tensors)} holds values up to |x| = {peak:.6g}, beyond float16's "
            f"range ({limit:g}); load it in bf16 or fp32 (dtype='bf16')")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)
