"""compressed-tensors and HF FP8 weights -> dsjax weights, in numpy on the host.

A stored Linear weight is [N, K] (out, in). compressed-tensors keeps integer codes signed,
q in [-2^(b-1), 2^(b-1) - 1], W = (q - zp) * scale, with:
  pack-quantized   int32 [N, ceil(K b / 32)]: 32 / b codes per word, code k at bits
                   (k b mod 32) of word k b / 32, each stored as q + 2^(b-1) (unsigned)
                   zero points (asymmetric) packed the same way along N: int32 [ceil(N b / 32), K/G]
  int-/naive-quantized   int8 [N, K] codes, int8 zero points [N, K/G]
  scales           [N, K/G] (group), [N, 1] (channel), [1] (tensor), in the checkpoint's float dtype
  g_idx            int32 [K] (act-order): code k uses scale column g_idx[k]
dsjax's QuantizedWeight (dsjax.weights) is [K, N] with W = (u - z) * s on unsigned codes
u = q + 2^(b-1), z = zp + 2^(b-1): the same numbers, so the mapping is exact.
FP8 weights (e4m3) are dequantized here: W = fp8 * scale per tensor, channel, group or block.
"""

from __future__ import annotations

import numpy as np

from dsjax.quant.weights import pack_int4
from dsjax.weights import QuantizedWeight


def unpack_int32(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """int32 [R, W] -> unsigned codes uint8 [R, count] (the stored q + 2^(b-1)), codes packed
    densely along the last axis, little-endian (compressed-tensors' pack_to_int32)."""
    raw = np.ascontiguousarray(packed).astype("<i4", copy=False).view(np.uint8)  # [R, 4W]
    if bits == 8:
        return raw[:, :count].copy()
    low, high = raw & 0xF, raw >> 4
    return np.stack([low, high], axis=-1).reshape(raw.shape[0], -1)[:, :count]


def scale_columns(scale: np.ndarray, N: int) -> np.ndarray:
    """A stored int scale ([N, K/G], [N, 1], or [1] per tensor) as float32 [N, groups]."""
    scale = np.asarray(scale).astype(np.float32)
    if scale.ndim < 2:  # per tensor
        scale = scale.reshape(1, 1)
    return np.broadcast_to(scale, (N, scale.shape[1]))


def int_codes(stored: dict, scheme, N: int, K: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(unsigned codes uint8 [N, K], unsigned zero points uint8 [N, groups] or None)."""
    offset = 1 << (scheme.bits - 1)
    zeros = stored.get("zero")
    if scheme.format == "pack-quantized":
        codes = unpack_int32(stored["codes"], scheme.bits, K)
        if zeros is not None:  # packed along N: unpack its transpose
            zeros = unpack_int32(np.asarray(zeros).T, scheme.bits, N).T
        return codes, zeros
    codes = (np.asarray(stored["codes"], np.int16) + offset).astype(np.uint8)
    if zeros is not None:
        zeros = (np.asarray(zeros, np.int16) + offset).astype(np.uint8)
    return codes, zeros


def to_quantized(stored: dict, scheme, N: int, K: int, bits: int) -> QuantizedWeight:
    """The exact dsjax QuantizedWeight [K, N] of a compressed-tensors int weight (contiguous
    groups); bits may be 8 for a 4-bit scheme whose groups do not fit dsjax's 4-bit packing
    (the same codes, one per byte)."""
    codes, zeros = int_codes(stored, scheme, N, K)
    scales = np.ascontiguousarray(scale_columns(stored["scale"], N).T)  # [groups, N]
    G = K // scales.shape[0]
    codes = np.ascontiguousarray(codes.T)  # [K, N]
    if zeros is not None:
        zeros = np.ascontiguousarray(zeros.T.astype(np.float32))  # [groups, N]
    if bits == 4:
        values = pack_int4(codes)
    elif zeros is None:  # symmetric 8-bit codes are signed
        values = (codes.astype(np.int16) - (1 << (scheme.bits - 1))).astype(np.int8)
    else:
        values = codes
    return QuantizedWeight(values, scales, zeros, bits, G)


def dequantize_int(stored: dict, scheme, N: int, K: int, g_idx: np.ndarray | None) -> np.ndarray:
    """W [N, K] float32 of an int weight: (q - zp) * scale[:, group of k]; the group of k is
    g_idx[k] (act-order) or k // G."""
    codes, zeros = int_codes(stored, scheme, N, K)
    scales = scale_columns(stored["scale"], N)
    G = scheme.group_size if scheme.strategy == "group" else K
    column = np.asarray(g_idx) if g_idx is not None else np.arange(K) // G
    zero = np.float32(1 << (scheme.bits - 1)) if zeros is None else zeros[:, column]
    return (codes.astype(np.float32) - zero) * scales[:, column]


def dequantize_fp8(weight: np.ndarray, scale: np.ndarray, scheme) -> np.ndarray:
    """W [N, K] float32 = fp8 * scale, the scale per tensor ([1] or []), per channel ([N, 1]),
    per group ([N, ceil(K/G)]) or per block ([ceil(N/bn), ceil(K/bk)])."""
    w = np.asarray(weight).astype(np.float32)
    s = np.asarray(scale).astype(np.float32)
    N, K = w.shape
    if scheme.strategy == "tensor":
        return w * s.reshape(())
    if scheme.strategy == "channel":
        return w * s.reshape(N, 1)
    if scheme.strategy == "group":
        return w * np.repeat(s, scheme.group_size, axis=1)[:, :K]
    bn, bk = scheme.block
    return w * np.repeat(np.repeat(s, bn, axis=0), bk, axis=1)[:N, :K]


def fp8_to_quantized(stored: dict, scheme, N: int, K: int) -> QuantizedWeight:
    """The exact dsjax QuantizedWeight [K, N] of an FP8 weight [N, K] (stored codes and scale,
    as to_quantized takes them): its e4m3 values
    transposed, its scales as [K/G, N] groups: one row for a tensor's or a channel's scale (G =
    K), a group's [N, K/G] transposed, a block's repeated over its rows of N (G = the block's
    columns of K). fp8_layout says which layouts fit (K a multiple of G)."""
    s = np.asarray(stored["scale"]).astype(np.float32)
    if scheme.strategy == "tensor":
        cols = np.full((1, N), s.reshape(()), np.float32)
    elif scheme.strategy == "channel":
        cols = s.reshape(1, N)
    elif scheme.strategy == "group":
        cols = s.T
    else:
        cols = np.repeat(s, scheme.block[0], axis=0)[:N].T
    values = np.ascontiguousarray(np.asarray(stored["codes"]).T)
    return QuantizedWeight(values, np.ascontiguousarray(cols), None, 8, K // cols.shape[0])


def fp8_group(scheme, K: int) -> int | None:
    """The group size (K: one per channel) an FP8 weight's scales map onto exactly; None where
    they do not (groups or blocks that do not divide K into even groups)."""
    G = {"tensor": K, "channel": K, "group": scheme.group_size,
         "block": scheme.block[1] if scheme.block else None}[scheme.strategy]
    if G is None or K % G or (G != K and G % 2):
        return None
    return G


def fuse(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Quantized [K, N_j] weights of one layout -> one [K, sum N_j] (fused QKV, gate|up)."""
    first = parts[0]
    zeros = None if first.zeros is None else np.concatenate([p.zeros for p in parts], axis=1)
    return QuantizedWeight(np.concatenate([p.values for p in parts], axis=1),
                           np.concatenate([p.scales for p in parts], axis=1), zeros,
                           first.bits, first.group_size)
