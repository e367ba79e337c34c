"""config.json's `quantization_config` for pre-quantized checkpoints, read strictly: every field
is known, every value one dsjax reads; anything else is a CheckpointError naming the field.

  compressed-tensors   config_groups {name: {targets, weights, input_activations,
                       output_activations, format}}, ignore, format, quantization_status ...
  fp8 (HF)             weight_block_size [bn, bk] (or none: one scale per tensor),
                       activation_scheme, modules_to_not_convert

Layers are matched as compressed-tensors matches them: a target is an exact module name, a
regex "re:<pattern>" (re.match on the name), or the class name "Linear" (every module that
holds a quantized weight; dsjax reads no module classes); an exact name wins over a regex,
a regex over a class; `ignore` takes the same forms.
"""

from __future__ import annotations

import dataclasses
import math
import re

from converters.loader import CheckpointError

_TOP = {"config_groups", "format", "global_compression_ratio", "ignore", "kv_cache_scheme",
        "quant_method", "quantization_status", "sparsity_config", "transform_config", "version",
        "moe_sparsity_config"}
_GROUP = {"targets", "weights", "input_activations", "output_activations", "format"}
_ARGS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
         "actorder", "observer", "observer_kwargs", "scale_dtype", "zp_dtype"}
_FP8_TOP = {"quant_method", "activation_scheme", "weight_block_size", "modules_to_not_convert",
            "dequantize"}
INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
FLOAT_FORMATS = ("float-quantized", "naive-quantized")
_FLOAT_SCALE_DTYPES = (None, "torch.float32", "torch.bfloat16", "torch.float16")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How one Linear's weight is stored."""

    format: str  # pack-quantized | int-quantized | naive-quantized | float-quantized | fp8
    type: str  # "int" | "float" (FP8 e4m3)
    bits: int
    strategy: str  # tensor | channel | group | block
    group_size: int | None = None
    block: tuple[int, int] | None = None  # [rows of N, columns of K] per scale
    symmetric: bool = True
    act_order: bool = False  # a g_idx tensor maps each input column to its group

    @property
    def scale_name(self) -> str:
        return "weight_scale_inv" if self.format == "fp8" else "weight_scale"

    def groups(self, K: int) -> int:
        return math.ceil(K / self.group_size) if self.strategy == "group" else 1

    def scale_shapes(self, N: int, K: int) -> set[tuple[int, ...]]:
        if self.strategy == "tensor":
            return {(), (1,)}
        if self.strategy == "block":
            return {(math.ceil(N / self.block[0]), math.ceil(K / self.block[1]))}
        return {(N, self.groups(K))}

    def describe(self) -> str:
        layout = {"group": f"groups of {self.group_size}", "channel": "per channel",
                  "tensor": "per tensor", "block": f"blocks of {self.block}"}[self.strategy]
        kind = f"int{self.bits}" if self.type == "int" else "fp8 e4m3"
        sym = "" if self.symmetric else ", asymmetric"
        return f"{self.format} {kind} {layout}{sym}{', act-order' if self.act_order else ''}"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    method: str
    targets: dict[str, Scheme]  # target -> scheme, in the config's order
    ignore: tuple[str, ...]
    activations: tuple[str, ...]  # what the config quantizes beyond weights, in words

    def scheme_for(self, module: str) -> Scheme | None:
        """The scheme of a module that holds a quantized weight; None if none applies."""
        if any(_matches(t, module) for t in self.ignore):
            return None
        ordered = sorted(self.targets, key=lambda t: (t.startswith("re:"), t))
        for target in ordered:
            if target != "Linear" and _matches(target, module):
                return self.targets[target]
        return self.targets.get("Linear")

    def why_not(self, module: str) -> str:
        if any(_matches(t, module) for t in self.ignore):
            return "its ignore list names it"
        return "no config group targets it"


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == "Linear"


def read_config(qc, where: str) -> QuantConfig:
    """config.json's quantization_config, checked; `where` names config.json in errors."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is not a JSON object")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc, f"{where}: quantization_config")
    if method == "fp8":
        return _hf_fp8(qc, f"{where}: quantization_config")
    raise CheckpointError(f"{where}: quantization_config.quant_method {method!r} is not "
                          "supported; dsjax reads 'compressed-tensors' and 'fp8' checkpoints "
                          "(or load the unquantized model and pass quant=)")


def _unknown(d: dict, known: set, where: str) -> None:
    extra = sorted(set(d) - known)
    if extra:
        raise CheckpointError(f"{where}.{extra[0]}: a field dsjax does not know; refusing to "
                              "guess what it changes")


def _compressed_tensors(qc: dict, where: str) -> QuantConfig:
    _unknown(qc, _TOP, where)
    for field in ("sparsity_config", "transform_config", "moe_sparsity_config",
                  "kv_cache_scheme"):
        if qc.get(field):
            raise CheckpointError(f"{where}.{field} is set: dsjax does not read it "
                                  "(weight quantization only)")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(f"{where}.quantization_status is {status!r}; dsjax reads "
                              "'compressed' checkpoints")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}.config_groups: expected an object of config groups")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise CheckpointError(f"{where}.ignore: expected a list of module names or 're:' regexes")
    targets, activations = {}, []
    for name, group in groups.items():
        here = f"{where}.config_groups.{name}"
        scheme, words = _group(group, qc.get("format"), here)
        for target in group["targets"]:
            _check_target(target, f"{here}.targets")
            targets[target] = scheme
        activations += [f"config group {name!r} quantizes {w}" for w in words]
    return QuantConfig("compressed-tensors", targets, tuple(ignore), tuple(activations))


def _check_target(target, where: str) -> None:
    if not isinstance(target, str):
        raise CheckpointError(f"{where}: {target!r} is not a string")
    if target.startswith("re:"):
        try:
            re.compile(target[3:])
        except re.error as e:
            raise CheckpointError(f"{where}: {target!r} is not a valid regex ({e})") from None
    elif target != "Linear" and "." not in target and target[:1].isupper():
        raise CheckpointError(f"{where}: class target {target!r}: dsjax matches the class "
                              "'Linear', module names and 're:' regexes only")


def _group(group, top_format, where: str) -> tuple[Scheme, list[str]]:
    if not isinstance(group, dict):
        raise CheckpointError(f"{where}: expected an object")
    _unknown(group, _GROUP, where)
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(f"{where}.targets: expected a non-empty list")
    fmt = group.get("format") or top_format
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}.weights: expected the weights' quantization arguments")
    scheme = _weights(weights, fmt, f"{where}.weights", f"{where}.format")
    words = []
    for kind in ("input_activations", "output_activations"):
        args = group.get(kind)
        if args is None:
            continue
        if not isinstance(args, dict):
            raise CheckpointError(f"{where}.{kind}: expected an object or null")
        words.append(f"{kind.replace('_', ' ')} ({args.get('type', 'int')}"
                     f"{args.get('num_bits', '?')} per {args.get('strategy', '?')}"
                     f"{', dynamic' if args.get('dynamic') else ', static'})")
    return scheme, words


def _weights(args: dict, fmt, where: str, fmt_where: str) -> Scheme:
    _unknown(args, _ARGS, where)
    kind, bits, strategy = args.get("type", "int"), args.get("num_bits", 8), args.get("strategy")
    formats = INT_FORMATS if kind == "int" else FLOAT_FORMATS if kind == "float" else None
    if formats is None:
        raise CheckpointError(f"{where}.type is {kind!r}; dsjax reads 'int' and 'float'")
    if fmt not in formats:
        raise CheckpointError(f"{fmt_where} is {fmt!r}; dsjax reads {kind} weights in "
                              f"{', '.join(formats)}")
    if kind == "int" and (bits not in (4, 8) or fmt != "pack-quantized" and bits != 8):
        raise CheckpointError(f"{where}.num_bits is {bits!r}; dsjax reads 4 and 8 bits "
                              "(4 only pack-quantized)")
    if kind == "float" and bits != 8:
        raise CheckpointError(f"{where}.num_bits is {bits!r}; dsjax reads FP8 (8) float weights")
    allowed = ("tensor", "channel", "group") + (("block",) if kind == "float" else ())
    if strategy not in allowed:
        raise CheckpointError(f"{where}.strategy is {strategy!r}; dsjax reads "
                              f"{', '.join(allowed)} for {kind} weights")
    if args.get("dynamic") not in (False, None):
        raise CheckpointError(f"{where}.dynamic is {args['dynamic']!r}: weights quantized on "
                              "the fly are not a stored format")
    if args.get("scale_dtype") not in _FLOAT_SCALE_DTYPES:
        raise CheckpointError(f"{where}.scale_dtype is {args['scale_dtype']!r}; dsjax reads "
                              "float scales")
    symmetric = args.get("symmetric", True)
    if not isinstance(symmetric, bool) or kind == "float" and not symmetric:
        raise CheckpointError(f"{where}.symmetric is {symmetric!r}; FP8 weights are symmetric")
    if not symmetric and strategy == "tensor":
        raise CheckpointError(f"{where}: asymmetric per-tensor weights are not supported")
    group_size = (_positive(args.get("group_size"), f"{where}.group_size")
                  if strategy == "group" else None)
    block = _block(args.get("block_structure"), f"{where}.block_structure") \
        if strategy == "block" else None
    act_order = args.get("actorder") in ("group", "dynamic", True)
    if args.get("actorder") not in (None, False, "weight", "static") and not act_order:
        raise CheckpointError(f"{where}.actorder is {args['actorder']!r}; dsjax reads null, "
                              "'weight', 'static', 'group' and 'dynamic'")
    if act_order and strategy != "group":
        raise CheckpointError(f"{where}.actorder {args['actorder']!r} needs strategy 'group'")
    return Scheme(fmt, kind, bits, strategy, group_size, block, symmetric, act_order)


def _positive(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where} is {value!r}; expected a positive integer")
    return value


def _block(value, where: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2):
        raise CheckpointError(f"{where} is {value!r}; expected [rows, columns]")
    return tuple(_positive(v, where) for v in value)


def _hf_fp8(qc: dict, where: str) -> QuantConfig:
    _unknown(qc, _FP8_TOP, where)
    scheme_act = qc.get("activation_scheme", "dynamic")
    if scheme_act not in ("dynamic", "static"):
        raise CheckpointError(f"{where}.activation_scheme is {scheme_act!r}; expected "
                              "'dynamic' or 'static'")
    block = qc.get("weight_block_size")
    block = None if block is None else _block(block, f"{where}.weight_block_size")
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(t, str) for t in skip):
        raise CheckpointError(f"{where}.modules_to_not_convert: expected a list of module names")
    scheme = Scheme("fp8", "float", 8, "block" if block else "tensor", block=block)
    ignore = tuple(f"re:.*{re.escape(m)}" for m in skip)  # transformers matches by substring
    words = (f"activations (fp8, {scheme_act})",)
    return QuantConfig("fp8", {"Linear": scheme}, ignore, tuple(f"quant_method 'fp8' quantizes "
                                                               f"{w}" for w in words))
