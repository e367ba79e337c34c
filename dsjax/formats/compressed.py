"""Pre-quantized HF checkpoints: compressed-tensors (what llm-compressor writes and vLLM reads)
and HF FP8 (`quant_method: fp8`, DeepSeek-V3 / Qwen3 FP8 block-scaled weights).

`open_tensors(hf_config, directory, where)` reads config.json's `quantization_config` and wraps
the checkpoint's tensors in a QuantizedSource: each quantized Linear appears as one `<m>.weight`
of its logical [N, K] shape, so a family's converter table reads it like any other checkpoint.
Everything is checked from the config and the safetensors headers before a weight is read: each
layer's scheme, its tensors' names, dtypes and shapes (codes, scales, zero points, g_idx).

How each layer is delivered (the choices: docs/decisions.md#pre-quantized-checkpoints):
  int 4/8-bit, contiguous groups or per channel   an exact dsjax QuantizedWeight
  int with act-order (g_idx not k // G)            dequantized to float32, then the
                                                   engine dtype, with a log line naming the layers
  FP8 e4m3, scales per tensor / channel, or        an exact FP8 QuantizedWeight (e4m3 codes,
  groups or blocks dividing K                      float32 scales per group of K)
  FP8 e4m3 with other groups or blocks             dequantized to float32, then the
                                                   engine dtype, with one log line
Activation quantization in the config (W8A8, FP8 dynamic) is not applied: dsjax runs activations
in the engine dtype, and says so in one warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from converters.loader import CheckpointError, TensorSource, from_directory
from dsjax.formats import compressed_codes as codes
from dsjax.formats.compressed_config import Scheme, read_config
from dsjax.quant.weights import QuantSpec

log = logging.getLogger("dsjax")

_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
# companions of a quantized weight that only activation quantization reads (dropped, warned)
_ACTIVATION_TENSORS = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")
_QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_scale_inv", "weight_shape",
                   "weight_zero_point", "weight_g_idx", "weight_global_scale",
                   "input_global_scale") + _ACTIVATION_TENSORS


@dataclasses.dataclass(frozen=True)
class StoredLinear:
    """One quantized Linear of the checkpoint: its module name, scheme, logical [N, K] and the
    checkpoint names of its parts by role (codes, scale, shape, zero, g_idx)."""

    module: str
    scheme: Scheme
    shape: tuple[int, int]
    parts: dict[str, str]


def open_tensors(hf_config: dict, directory: Path, where: str) -> TensorSource:
    """The tensors of an HF checkpoint directory: a QuantizedSource when config.json (`where`)
    has a quantization_config, read and checked before any header; plain ones otherwise."""
    if "quantization_config" not in hf_config:
        return from_directory(directory)
    config = read_config(hf_config["quantization_config"], where)
    tensors = from_directory(directory, fp8=True)
    if tensors.dtypes is None:
        raise CheckpointError(f"{tensors.origin}: a pre-quantized checkpoint "
                              f"({config.method}) is read from safetensors files only")
    return QuantizedSource(tensors, config)


def refuse_compressed_in_memory(hf_config: dict, tensors: TensorSource) -> None:
    """An in-memory transformers model that still holds its quantized parts (compressed-tensors
    run compressed, FP8 on an accelerator) is refused with the way to read it: its directory."""
    qc = hf_config.get("quantization_config")
    quantized = [n for n in tensors if n.rsplit(".", 1)[-1] in _QUANT_SUFFIXES]
    if isinstance(qc, dict) and quantized:
        raise CheckpointError(
            f"{tensors.origin}: holds its quantized weights as stored ({quantized[0]!r}, "
            f"quant_method {qc.get('quant_method')!r}); dsjax reads pre-quantized weights from "
            "the checkpoint directory: pass the directory (or save_pretrained() the model)")


class QuantizedSource(TensorSource):
    """A checkpoint's tensors with each quantized Linear's parts replaced by one logical
    `<module>.weight` [N, K]: `quantized_kernel` gives a rule's kernel as a QuantizedWeight
    where the layout maps exactly, reading it as an array gives W in float32."""

    def __init__(self, inner: TensorSource, config):
        self.inner, self.config = inner, config
        self.linears = _find_linears(inner, config)
        hidden = {name for lin in self.linears.values() for name in lin.parts.values()}
        hidden |= {f"{lin.module}.{a}" for lin in self.linears.values()
                   for a in _ACTIVATION_TENSORS if f"{lin.module}.{a}" in inner.shapes}
        getters = {n: (lambda n=n: inner[n]) for n in inner if n not in hidden}
        shapes = {n: inner.shapes[n] for n in getters}
        dtypes = {n: inner.dtypes[n] for n in getters}
        for name, lin in self.linears.items():
            getters[name] = (lambda lin=lin: self._dense(lin))
            shapes[name], dtypes[name] = lin.shape, np.dtype(np.float32)
        super().__init__(getters, shapes, inner.origin, dtypes, inner.files)
        _check_plain(self, hidden)
        self.g_idx = {name: self._g_idx(lin) for name, lin in self.linears.items()}
        self._announce()

    # ------------------------------------------------------------------ reading

    def quantized_kernel(self, transform: str, names: list[str]):
        """The rule's kernel [K, sum N] as a QuantizedWeight (numpy leaves) when every name is
        an int-quantized Linear of one layout (kernel_layout); None reads the names as float32
        arrays instead (FP8, act-order, dense parts)."""
        layout = self.kernel_layout(transform, names, announce=True)
        if layout is None:
            return None
        lins = [self.linears[n] for n in names]
        parts = [codes.fp8_to_quantized(self._stored(lin), lin.scheme, *lin.shape) if layout.fp8
                 else codes.to_quantized(self._stored(lin), lin.scheme, *lin.shape, layout.bits)
                 for lin in lins]
        return parts[0] if len(parts) == 1 else codes.fuse(parts)

    def kernel_layout(self, transform: str, names: list[str], announce: bool = False):
        """The QuantSpec of the QuantizedWeight a rule's kernel maps onto exactly (a Linear's
        transform over int-quantized parts of one layout); None where it is read as float32.
        Parts of different layouts fused into one kernel are dequantized (logged)."""
        lins = [self.linears.get(n) for n in names]
        if not any(lins):
            return None
        if transform not in ("transpose", "concat_transposed"):
            raise CheckpointError(
                f"{self.origin}: {', '.join(names)} are stored quantized, but dsjax's rule for "
                f"them is {transform!r}, not a Linear kernel's; this family's quantized "
                "checkpoints are not supported")
        layouts = {self._layout(n) for n in names}
        if len(layouts) == 1 and None not in layouts:
            return layouts.pop()
        if announce and len(layouts) > 1:
            log.warning("%s: %s are fused into one dsjax kernel but stored in different "
                        "layouts (%s): dequantized to float32, then the engine dtype",
                        self.origin, ", ".join(names), "; ".join(self._describe(n) for n in names))
        return None

    def _layout(self, name: str) -> QuantSpec | None:
        """The QuantSpec of the dsjax QuantizedWeight a Linear maps onto exactly; None where it
        does not (dense, FP8, act-order, groups dsjax cannot hold)."""
        lin = self.linears.get(name)
        if lin is not None and lin.scheme.type == "float":
            G = codes.fp8_group(lin.scheme, lin.shape[1])
            return None if G is None else QuantSpec(
                bits=8, group_size=None if G == lin.shape[1] else G, fp8=True)
        if lin is None or lin.scheme.type != "int" or self.g_idx.get(name) is not None:
            return None
        N, K = lin.shape
        G = lin.scheme.group_size if lin.scheme.strategy == "group" else K
        if K % G or (G != K and G % 2):
            return None
        bits = lin.scheme.bits
        if bits == 4 and (K % 2 or (G != K and (K // 2) % G)):
            bits = 8  # the same codes, one per byte: dsjax's 4-bit groups sit in one half of K
        return QuantSpec(bits=bits, group_size=None if G == K else G,
                         symmetric=lin.scheme.symmetric)

    def _stored(self, lin: StoredLinear) -> dict:
        return {role: self.inner[name] for role, name in lin.parts.items()
                if role not in ("shape", "g_idx")}

    def _dense(self, lin: StoredLinear) -> np.ndarray:
        """W [N, K] float32, exactly as the format defines it."""
        stored = self._stored(lin)
        if lin.scheme.type == "float":
            return codes.dequantize_fp8(stored["codes"], stored["scale"], lin.scheme)
        g_idx = self.g_idx.get(f"{lin.module}.weight")
        return codes.dequantize_int(stored, lin.scheme, *lin.shape, g_idx)

    def _g_idx(self, lin: StoredLinear) -> np.ndarray | None:
        """An act-order layer's g_idx, None where it is the contiguous k // G (or absent); an
        index outside the layer's groups is an error."""
        if "g_idx" not in lin.parts:
            return None
        g_idx = np.asarray(self.inner[lin.parts["g_idx"]]).astype(np.int64)
        K = lin.shape[1]
        groups = math.ceil(K / lin.scheme.group_size)
        if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
            raise CheckpointError(f"{_file(self.inner, lin.parts['g_idx'])}: tensor "
                                  f"{lin.parts['g_idx']!r} holds group indices outside "
                                  f"[0, {groups})")
        contiguous = np.arange(K) // lin.scheme.group_size
        return None if np.array_equal(g_idx, contiguous) else g_idx

    def _describe(self, name: str) -> str:
        lin = self.linears.get(name)
        return "dense" if lin is None else lin.scheme.describe()

    def _delivery(self, name: str) -> str | None:
        """Why a quantized Linear is not delivered as the QuantizedWeight of its own bits."""
        lin, spec = self.linears[name], self._layout(name)
        if lin.scheme.type == "float":
            return None if spec is not None else "fp8"
        if self.g_idx.get(name) is not None:
            return "act_order"
        if spec is None:
            return "groups"
        return "wide" if spec.bits != lin.scheme.bits else None

    def _announce(self) -> None:
        """One log line per kind of layer not delivered as the QuantizedWeight of its own bits,
        and one warning for activation quantization the config asks for."""
        kinds = {}
        for name in sorted(self.linears):
            kind = self._delivery(name)
            if kind is not None:
                kinds.setdefault(kind, []).append(name[: -len(".weight")])
        for kind, names in kinds.items():
            level = logging.INFO if kind in ("fp8", "wide") else logging.WARNING
            log.log(level, "%s: %d %s", self.origin, len(names), _DELIVERY[kind] % _few(names))
        for text in self.config.activations:
            log.warning("%s: %s; dsjax runs activations in the engine dtype (weight-only "
                        "quantization)", self.origin, text)


_EXACT = "dequantized to float32, then the engine dtype"
_DELIVERY = {
    "fp8": f"FP8 layers (%s) {_EXACT}: their scales' groups do not divide K evenly",
    "act_order": f"act-order layers (%s) {_EXACT}: their g_idx is not the contiguous "
                 "k // group_size, and dsjax's quantized linear reads contiguous groups",
    "groups": f"int layers (%s) {_EXACT}: their group size does not divide K evenly into the "
              "even-sized groups dsjax's quantized linear reads",
    "wide": "int4 layers (%s) held as 8-bit codes, the same values one per byte: their groups "
            "do not fit dsjax's 4-bit packing (each group within one half of K)",
}


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ----------------------------------------------------------------------------- validation

def _find_linears(source: TensorSource, config) -> dict[str, StoredLinear]:
    """{"<module>.weight": StoredLinear} for every module holding quantization tensors, each
    checked against its scheme from the headers (and weight_shape's two integers)."""
    modules = sorted({m.group(1) for n in source
                      if (m := re.fullmatch(rf"(.+)\.({'|'.join(_QUANT_SUFFIXES)})", n))})
    found = {}
    for module in modules:
        marker = next(f"{module}.{s}" for s in _QUANT_SUFFIXES if f"{module}.{s}" in source.shapes)
        scheme = config.scheme_for(module)
        if scheme is None:
            raise CheckpointError(
                f"{_file(source, marker)}: tensor {marker!r} quantizes {module}, which "
                f"quantization_config does not ({config.why_not(module)})")
        lin = _check_linear(source, module, scheme)
        found[f"{module}.weight"] = lin
    return found


def _file(source: TensorSource, name: str) -> str:
    return str(source.files[name]) if source.files and name in source.files else source.origin


def _tensor(source: TensorSource, module: str, suffix: str, dtypes, shape, why: str) -> str:
    """The checkpoint name of `<module>.<suffix>`, once it exists with one of dtypes and the
    expected shape (a tuple, or a set of accepted tuples)."""
    name = f"{module}.{suffix}"
    if name not in source.shapes:
        raise CheckpointError(f"{source.origin}: tensor {name!r} is missing ({why})")
    got, dtype = tuple(source.shapes[name]), source.dtypes[name]
    shapes = shape if isinstance(shape, set) else {tuple(shape)}
    if dtype not in dtypes or got not in shapes:
        want = " or ".join(str(s) for s in sorted(shapes))
        raise CheckpointError(
            f"{_file(source, name)}: tensor {name!r} is {dtype} {got}, expected "
            f"{'/'.join(str(d) for d in dtypes)} {want} ({why})")
    return name


def _check_linear(source: TensorSource, module: str, s: Scheme) -> StoredLinear:
    """The module's tensors checked against scheme s: names, dtypes, shapes."""
    parts, why = {}, s.describe()
    if s.format == "pack-quantized":
        parts["shape"] = _tensor(source, module, "weight_shape",
                                 (np.dtype(np.int64), np.dtype(np.int32)), (2,), why)
        N, K = (int(v) for v in np.asarray(source[parts["shape"]]))
        if N <= 0 or K <= 0:
            raise CheckpointError(f"{_file(source, parts['shape'])}: tensor {parts['shape']!r} "
                                  f"gives the weight shape [{N}, {K}]; expected two positive "
                                  "sizes")
        parts["codes"] = _tensor(source, module, "weight_packed", (np.dtype(np.int32),),
                                 (N, math.ceil(K * s.bits / 32)), why)
    else:
        dtype = np.dtype(np.int8) if s.type == "int" else _FP8
        codes_name = f"{module}.weight"
        shape = source.shapes.get(codes_name)
        if shape is None or len(shape) != 2:
            raise CheckpointError(f"{_file(source, codes_name) if shape else source.origin}: "
                                  f"tensor {codes_name!r} is missing or not 2-D ({why})")
        N, K = shape
        parts["codes"] = _tensor(source, module, "weight", (dtype,), (N, K), why)
    parts["scale"] = _tensor(source, module, s.scale_name, _FLOATS, s.scale_shapes(N, K), why)
    if not s.symmetric:
        zshape = ((math.ceil(N * s.bits / 32), s.groups(K)) if s.format == "pack-quantized"
                  else (N, s.groups(K)))
        zdtype = np.dtype(np.int32) if s.format == "pack-quantized" else np.dtype(np.int8)
        parts["zero"] = _tensor(source, module, "weight_zero_point", (zdtype,), zshape, why)
    if s.act_order:
        parts["g_idx"] = _tensor(source, module, "weight_g_idx",
                                 (np.dtype(np.int32), np.dtype(np.int64)), (K,), why)
    known = set(parts.values()) | {f"{module}.{a}" for a in _ACTIVATION_TENSORS}
    candidates = _QUANT_SUFFIXES + (("weight",) if s.format == "pack-quantized" else ())
    extra = sorted(f"{module}.{x}" for x in candidates
                   if f"{module}.{x}" in source.shapes and f"{module}.{x}" not in known)
    if extra:
        raise CheckpointError(f"{_file(source, extra[0])}: tensor {extra[0]!r} is not part of "
                              f"{module}'s quantized weight ({why}); refusing to drop it")
    return StoredLinear(module, s, (N, K), parts)


def _check_plain(source: TensorSource, hidden: set) -> None:
    """A tensor outside every quantized Linear must hold floats: integer or FP8 values read as
    floats would be silently wrong."""
    for name in source.inner:
        dtype = source.inner.dtypes[name]
        if name not in hidden and (dtype == _FP8 or np.issubdtype(dtype, np.integer)):
            raise CheckpointError(
                f"{_file(source.inner, name)}: tensor {name!r} holds {dtype} values, but "
                "quantization_config gives it no scale (no quantized layer owns it)")


def stored_layout(hf) -> dict[str, QuantSpec] | None:
    """{param path: QuantSpec} of the kernels an opened HF checkpoint (converters.HFSource)
    delivers as QuantizedWeight; None for a checkpoint that is not pre-quantized."""
    if not isinstance(hf.tensors, QuantizedSource):
        return None
    from converters.policy import match

    rules, names = match(hf.policy, hf.config, hf.tensors)
    layout = {r.target: hf.tensors.kernel_layout(r.transform.name, [names[s] for s in r.sources])
              for r in rules}
    return {path: spec for path, spec in layout.items() if spec is not None}
