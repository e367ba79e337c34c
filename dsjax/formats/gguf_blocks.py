"""GGUF tensor data -> dsjax weights: quant blocks mapped exactly onto QuantizedWeight, or
dequantized to dense arrays.

A GGUF weight is ggml [ne0 = K, ne1 = N], numpy [N, K]: N rows of K, each row cut along K into
blocks. Three block types have an exact dsjax layout (dsjax.weights: groups of 32 rows of K,
float32 scales [K/32, N]):

  Q8_0  d (fp16), 32 int8 q                 W = q d            -> int8 symmetric
  Q4_0  d (fp16), 16 bytes of nibbles u     W = (u - 8) d      -> int4 symmetric
  Q4_1  d, m (fp16), 16 bytes of nibbles u  W = u d + m        -> int4 asymmetric, z = -m / d

(a 4-bit block's byte j holds element j in its low nibble and element j + 16 in its high one). A
Q4_1 zero point is not an integer. F32, F16 and BF16 load as they are; every other type that
gguf.quants dequantizes (the K-quants, IQ types, ...) loads as float32 from its dequantizer.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q

from dsjax.quant.weights import pack_int4
from dsjax.weights import QuantizedWeight

GROUP = 32  # elements of K per block, for every mapped type
MAPPED = {Q.Q8_0: (8, True), Q.Q4_0: (4, True), Q.Q4_1: (4, False)}  # -> (bits, symmetric)
_PLAIN = {Q.F32: np.float32, Q.F16: np.float16}


@functools.cache
def readable(kind: Q) -> bool:
    """Whether a tensor of this type can be loaded: a plain float type, or one gguf.quants
    dequantizes (probed on one all-zero block, never on file data)."""
    if kind in _PLAIN:
        return True
    _, type_size = GGML_QUANT_SIZES[kind]
    try:
        quants.dequantize(np.zeros((1, type_size), np.uint8), kind)
    except Exception:  # noqa: BLE001  NotImplementedError, or a type it cannot shape
        return False
    return True


def readable_names() -> list[str]:
    return [kind.name for kind in Q if readable(kind)]


def mappable(kind: Q, K: int) -> bool:
    """Whether a [N, K] weight of this type maps onto a QuantizedWeight: a mapped type, and for
    4 bits groups that sit inside one half of K (dsjax packs rows r and r + K/2 in one byte)."""
    if kind not in MAPPED:
        return False
    bits, _ = MAPPED[kind]
    return bits == 8 or (K // 2) % GROUP == 0


def dense(kind: Q, data: np.ndarray) -> np.ndarray:
    """A tensor's values [..., K] (F32/F16/BF16 as they are, others dequantized to float32)."""
    if kind in _PLAIN:
        return data.view(_PLAIN[kind])
    if kind == Q.BF16:
        return data.view(ml_dtypes.bfloat16)
    return quants.dequantize(data, kind)


def _blocks(kind: Q, data: np.ndarray) -> np.ndarray:
    """Raw rows [N, row bytes] -> [N, K/32, bytes per block]."""
    _, type_size = GGML_QUANT_SIZES[kind]
    return data.reshape(data.shape[0], -1, type_size)


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of each block, as float32 [N, K/32]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(blocks: np.ndarray, at: int) -> np.ndarray:
    """The 16 bytes from `at` of each block -> codes [N, K/32, 32] in [0, 15]."""
    qs = blocks[..., at:at + GROUP // 2]
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def decode(kind: Q, data: np.ndarray):
    """A mapped type's raw rows [N, row bytes] -> (codes [N, K] (int8, or uint8 in [0, 15]),
    scales [N, K/32], zeros [N, K/32] or None), with W = (code - zero) * scale, or code * scale
    (8 bits) and (code - 8) * scale (4 bits) when symmetric."""
    blocks = _blocks(kind, data)
    N = blocks.shape[0]
    d = _half(blocks, 0)
    if kind == Q.Q8_0:
        return blocks[..., 2:].view(np.int8).reshape(N, -1), d, None
    if kind == Q.Q4_0:
        return _nibbles(blocks, 2).reshape(N, -1), d, None
    m, codes = _half(blocks, 2), _nibbles(blocks, 4)
    flat = d == 0  # a constant block W = m: codes 0, W = (0 - (-1)) * m
    codes[flat] = 0
    zeros = np.where(flat, -1.0, -m / np.where(flat, 1.0, d)).astype(np.float32)
    return codes.reshape(N, -1), np.where(flat, m, d), zeros


def quantized(kind: Q, parts: list[np.ndarray]) -> QuantizedWeight:
    """The QuantizedWeight (numpy leaves) of one weight [K, sum N_j] made of parts [N_j, row
    bytes] of one mapped type, fused along N (QKV, gate|up) as dsjax stores them."""
    bits, symmetric = MAPPED[kind]
    decoded = [decode(kind, p) for p in parts]
    codes = np.concatenate([c for c, _, _ in decoded]).T  # [K, N]
    scales = np.ascontiguousarray(np.concatenate([s for _, s, _ in decoded]).T)  # [K/32, N]
    zeros = None if symmetric else np.ascontiguousarray(
        np.concatenate([z for _, _, z in decoded]).T)
    if bits == 4:
        values = pack_int4(codes)
    else:
        values = np.ascontiguousarray(codes)
    return QuantizedWeight(values, scales, zeros, bits, GROUP)
