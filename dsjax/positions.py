"""Position encodings' constants: rotary inverse frequencies (with HF's rope_scaling rules) and
ALiBi slopes."""

from __future__ import annotations

import math

import numpy as np

from dsjax.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[rot_dim / 2] float32 inverse frequencies, with HF's rope_scaling rules applied."""
    rd = cfg.rot_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, rd, 2, dtype=np.float32) / rd))
    rs = cfg.rope_scaling
    if rs is None or rs.kind == "default":
        return inv.astype(np.float32)
    if rs.kind == "linear":
        return (inv / rs.factor).astype(np.float32)
    # llama3: wavelengths longer than old_len/low_freq_factor are divided by factor, shorter
    # than old_len/high_freq_factor kept, and the band between interpolated smoothly.
    wavelen = 2 * math.pi / inv
    low_wl = rs.original_max_position / rs.low_freq_factor
    high_wl = rs.original_max_position / rs.high_freq_factor
    scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(is_mid, mid, scaled).astype(np.float32)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes (Press et al.; BLOOM's rule for head counts not a power of 2)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return np.asarray(slopes, np.float32)
