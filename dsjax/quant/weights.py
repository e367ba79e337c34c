"""Weight-only quantization: the QuantSpec, quantize / dequantize, and the walk that quantizes a
converted model's GEMM weights. The QuantizedWeight layout (the one the Pallas `quant_matmul`
kernel reads) is described in dsjax.weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax import numerics, validate
from dsjax.weights import QuantizedWeight, is_experts, is_gemm


FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """bits: 8 or 4; group_size: rows of K per scale (None: one scale per output channel);
    symmetric: zero points or not; lm_head: also quantize an untied LM head; fp8: the 8-bit
    codes are FP8 e4m3 values (W = q s, symmetric), not integers."""

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    lm_head: bool = False
    fp8: bool = False

    def __post_init__(self):
        object.__setattr__(self, "bits", validate.integer("quant bits", self.bits))
        for name in ("symmetric", "lm_head", "fp8"):
            object.__setattr__(self, name, validate.boolean(f"quant {name}", getattr(self, name)))
        if self.bits not in (8, 4):
            raise ValueError(f"quant bits must be 8 or 4, got {self.bits!r}")
        if self.fp8 and (self.bits != 8 or not self.symmetric):
            raise ValueError("quant fp8 codes are 8 bits and symmetric (W = q s): "
                             f"got bits={self.bits}, symmetric={self.symmetric}")
        if self.group_size is not None:
            object.__setattr__(self, "group_size",
                               validate.integer("quant group_size", self.group_size))
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"quant group_size must be an even integer >= 2 (or None for one "
                             f"scale per output channel), got {self.group_size!r}")

    def groups(self, K: int) -> int:
        """Group size for a weight with K input rows; errors say how to fix a bad one."""
        G = self.group_size or K
        rows = K // 2 if self.bits == 4 else K
        if self.bits == 4 and K % 2:
            raise ValueError(f"4-bit packing needs an even K, got K={K}")
        if G != K and rows % G:  # per channel (G = K) always fits; 4-bit groups sit in one half
            raise ValueError(f"group_size={G} does not divide {'K/2' if self.bits == 4 else 'K'}="
                             f"{rows} of a [{K}, N] weight; choose a divisor such as 64 or 128")
        return G

    @classmethod
    def parse(cls, quant) -> QuantSpec | None:
        """init_inference's quant=: None/False, a QuantSpec, dsjax's dict
        {"bits", "group_size", "symmetric", "lm_head"}, or DeepSpeed's
        {"enabled": True, "weight": {"num_bits": 8, "q_type": "symmetric", "q_groups": 1}}
        (q_groups > 1 needs group_size instead: DeepSpeed groups the flattened tensor)."""
        if quant is None or quant is False:
            return None
        if isinstance(quant, QuantSpec):
            return quant
        if not isinstance(quant, dict):
            raise TypeError(f"quant must be a dict or QuantSpec, got {type(quant).__name__}")
        if "weight" in quant or "enabled" in quant:
            return cls._parse_deepspeed(quant)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(quant) - known
        if unknown:
            raise ValueError(f"unknown quant keys {sorted(unknown)}; known: {sorted(known)} "
                             "(or DeepSpeed's {'enabled': True, 'weight': {'num_bits': 8}})")
        return cls(**quant)

    @classmethod
    def _parse_deepspeed(cls, quant: dict) -> QuantSpec | None:
        unknown = set(quant) - {"enabled", "weight", "activation", "qkv"}
        if unknown:
            raise ValueError(f"unknown DeepSpeed quant keys {sorted(unknown)}")
        if not quant.get("enabled", True):
            return None
        if quant.get("activation", {}).get("enabled"):
            raise NotImplementedError("activation quantization is not supported: dsjax "
                                      "quantizes weights only (activations stay bf16/fp16)")
        weight = dict(quant.get("weight", {}))
        weight.pop("enabled", None)
        bits = weight.pop("num_bits", 8)
        q_type = weight.pop("q_type", "symmetric")
        if q_type not in ("symmetric", "asymmetric"):
            raise ValueError(f"q_type must be 'symmetric' or 'asymmetric', got {q_type!r}")
        if weight.pop("q_groups", 1) != 1:
            raise ValueError("DeepSpeed's q_groups > 1 splits the flattened weight; dsjax groups "
                             "along K: pass quant={'bits': 8, 'group_size': 128} instead")
        if weight:
            raise ValueError(f"unsupported DeepSpeed weight-quant keys {sorted(weight)}")
        return cls(bits=bits, symmetric=q_type == "symmetric")


def quantize(w, spec: QuantSpec) -> QuantizedWeight:
    """w [K, N] (any float dtype) -> QuantizedWeight, rounding to nearest."""
    K, N = w.shape
    G = spec.groups(K)
    qmax = 2 ** spec.bits - 1
    wg = w.astype(jnp.float32).reshape(K // G, G, N)
    if spec.fp8:  # scaled so each group's largest magnitude is e4m3's largest finite value
        amax = jnp.max(jnp.abs(wg), axis=1)
        scales = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
        q = jnp.clip(wg / scales[:, None], -FP8_MAX, FP8_MAX).astype(FP8)
        return QuantizedWeight(q.reshape(K, N), scales, None, 8, G)
    if spec.symmetric:
        half = 127 if spec.bits == 8 else 7
        amax = jnp.max(jnp.abs(wg), axis=1)  # [K/G, N]
        scales = jnp.where(amax > 0, amax / half, 1.0)
        q = jnp.clip(jnp.round(wg / scales[:, None]), -half, half)
        zeros = None
        q = q.astype(jnp.int8) if spec.bits == 8 else (q + 8).astype(jnp.uint8)
    else:
        lo, hi = jnp.minimum(jnp.min(wg, axis=1), 0.0), jnp.maximum(jnp.max(wg, axis=1), 0.0)
        scales = jnp.where(hi > lo, (hi - lo) / qmax, 1.0)
        zeros = jnp.clip(jnp.round(-lo / scales), 0, qmax)
        q = jnp.clip(jnp.round(wg / scales[:, None]) + zeros[:, None], 0, qmax).astype(jnp.uint8)
    q = q.reshape(K, N)
    return QuantizedWeight(pack_int4(q) if spec.bits == 4 else q, scales, zeros, spec.bits, G)


def pack_int4(codes):
    """uint8 codes [K, N] in [0, 15] -> [K/2, N]: byte r holds row r in its low nibble and row
    r + K/2 in its high one."""
    half = codes.shape[0] // 2
    return codes[:half] | (codes[half:] << 4)


def dequantize(qw: QuantizedWeight, dtype=jnp.float32):
    """QuantizedWeight -> W [K, N] (a stack of experts: [E, K, N], each on its own) in dtype (a
    reference; the kernels never materialize it)."""
    if qw.values.ndim == 3:
        return jax.vmap(lambda one: dequantize(one, dtype))(qw)
    values = qw.values.T if qw.k_major else qw.values
    return numerics.dequantize(values, qw.scales, qw.zeros, bits=qw.bits,
                               group_size=qw.group_size, dtype=dtype)


def quantizable(path: str, spec: QuantSpec, experts: bool = False) -> bool:
    """Block GEMM weights (and, with spec.lm_head, an untied LM head; with experts, the MoE
    layers' stacked expert weights) by flat parameter path."""
    return is_gemm(path, lm_head=spec.lm_head) or experts and is_experts(path)


def quantize_any(w, spec: QuantSpec) -> QuantizedWeight:
    """quantize() of a [K, N] weight, or of each [K, N] of a stack [E, K, N] (MoE experts: a
    QuantizedWeight whose leaves carry the expert axis first)."""
    return quantize(w, spec) if w.ndim == 2 else jax.vmap(lambda x: quantize(x, spec))(w)


_quantize_jit = jax.jit(quantize_any, static_argnums=1)


def quantize_flat(flat: dict, spec: QuantSpec) -> dict:
    """{path: array} -> the same with every quantizable kernel a QuantizedWeight; the
    full-precision kernel is freed as soon as its quantized form exists."""
    out = {}
    for path in list(flat):
        w = flat.pop(path)
        out[path] = _quantize_jit(w, spec) if quantizable(path, spec, experts=True) else w
    return out


def abstract_quantized(flat: dict, spec: QuantSpec) -> dict:
    """{path: ShapeDtypeStruct} -> the same with QuantizedWeight-of-ShapeDtypeStruct leaves."""
    return {path: (jax.eval_shape(lambda w: quantize_any(w, spec), s)
                   if quantizable(path, spec, experts=True) else s) for path, s in flat.items()}


def abstract_layout(flat: dict, layout: dict) -> dict:
    """{path: ShapeDtypeStruct} -> the same with each path `layout` names ({path: QuantSpec},
    weights each stored in its own format) a QuantizedWeight-of-ShapeDtypeStruct."""
    return {path: (jax.eval_shape(lambda w, spec=layout[path]: quantize_any(w, spec), s)
                   if path in layout else s) for path, s in flat.items()}
