"""The "pallas" implementations of dsjax.ops: adapters from the ops signatures to the kernels in
pallas_kernels/. Imported by ops when a preference names "pallas".

On a CPU backend the kernels run in Pallas's interpret mode (slow, for tests); that is logged.
A call a kernel cannot take raises ops.Unsupported with the reason, and ops logs the fallback.
"""

from __future__ import annotations

import logging
import math

import jax

from dsjax import ops
from dsjax.kmajor import KMajorWeight
from dsjax.quant import QuantizedWeight

log = logging.getLogger("dsjax.ops")
_INTERPRET_LOGGED = []


def _interpret() -> bool:
    cpu = jax.default_backend() == "cpu"
    if cpu and not _INTERPRET_LOGGED:
        _INTERPRET_LOGGED.append(True)
        log.warning("Pallas kernels run in interpret mode on the CPU backend (correct but slow; "
                    "for tests)")
    return cpu


def _kernel(op: str, what: str) -> None:
    ops._announce(op, "pallas", logging.INFO, f"ops.{op}: Pallas {what}")


# K-major weights (dsjax.kmajor), from benchmarks/results/gemm_kernels-kmajor.md and -int8.md
# (H200, LLaMA-3-8B shapes, M <= 16):
# - float weights at one row run the gemv kernel, its RMSNorm fused (0.97-1.10x the speed of
#   XLA's norm + GEMV). Its fused LayerNorm measured slower than XLA's LayerNorm then the gemv,
#   so a LayerNorm runs in XLA first. At 2-16 rows the gemv falls behind (2.8x slower at 8).
# - more rows, and int8 codes at every row count, run the GEMM kernels' tensor-core form over
#   the [N, K] weight (transpose_w). Over per-channel int8 codes it takes the same time from 1
#   to 16 rows: 1.35-1.5x XLA's bf16 GEMV on gate_up and down, 0.9-1.4x on the small qkv and
#   out (grouped codes: dsjax.kmajor's docstring; int4 codes stay [K, N]).
# - those kernels' fused norm prologue measured 0.5-0.9x of XLA's norm + GEMM at 1-16 rows,
#   so up to NORM_IN_XLA_ROWS rows the norm runs in XLA first; beyond (prompts) the fused
#   prologue stays, as neither form was timed there against the other.
GEMV_ROWS = 1
# the norms the gemv takes fused (the others run in XLA first). Fusing GPT-2 1.3B's LayerNorms
# too (decode_variants' bf16-pallas-lnfused) removed their XLA kernels and gained nothing end to
# end: 1.453 against 1.461 ms/token (H100, results/decode_variants-gpt2-ln-h100.md)
GEMV_FUSED_NORMS = ("rmsnorm",)
_NORM_NAMES = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}
NORM_IN_XLA_ROWS = 16
# per-channel symmetric int8 codes: the gemv (RMSNorm fused) up to this many rows; 0:
# quant_matmul at every row count. At one row, kernel by kernel, the gemv was faster on out and
# slower on qkv; end to end quant_matmul won, 3.302 against 3.386 ms/token
# (results/decode_variants-int8-gemv.md, whose variant int8-pallas-gemv1 sets this to 1).
INT8_GEMV_ROWS = 0


def linear_pallas(x, kernel, bias=None, residual=None, *, norm=None, activation=None,
                  gated=False, kernel_nk=False):
    from pallas_kernels import matmul, quant_matmul

    rows = math.prod(x.shape[:-1])
    k_major = isinstance(kernel, KMajorWeight) or (kernel_nk and not isinstance(
        kernel, QuantizedWeight))
    if k_major:
        if isinstance(kernel, KMajorWeight) and kernel.scales is not None:  # int8 [N, K]
            per_channel = kernel.zeros is None and kernel.scales.shape[0] == 1
            if rows <= INT8_GEMV_ROWS and per_channel:
                return _gemv(x, kernel.values, bias, residual, norm, activation, gated,
                             kernel.scales[0])
            kernel = kernel.codes()  # values [N, K]
        else:
            kernel = kernel.values if isinstance(kernel, KMajorWeight) else kernel  # [N, K]
            if rows <= GEMV_ROWS:
                return _gemv(x, kernel, bias, residual, norm, activation, gated)
        if norm is not None and rows <= NORM_IN_XLA_ROWS:
            x, norm = ops.norm_xla(x, norm), None
            _kernel("linear", f"norm in XLA before a K-major GEMM (<= {NORM_IN_XLA_ROWS} rows: "
                    "faster than its fused norm)")
    if isinstance(kernel, QuantizedWeight):
        if kernel_nk:
            raise ops.Unsupported("a quantized weight stored [N, K]")
        try:
            out = quant_matmul.quant_matmul(
                x, kernel.values, kernel.scales, kernel.zeros, bits=kernel.bits,
                group_size=kernel.group_size, bias=bias, residual=residual, activation=activation,
                gated=gated, norm=None if norm is None else tuple(norm), transpose_w=k_major,
                interpret=_interpret())
        except ValueError as why:  # a group size the kernel's K blocks cannot tile
            raise ops.Unsupported(str(why)) from None
        _kernel("linear", f"quant_matmul kernel (int{kernel.bits}, group {kernel.group_size}"
                f"{', K-major' if k_major else ''}{'' if norm is None else ', norm fused'})")
        return out
    if norm is not None:
        if residual is not None:
            raise ops.Unsupported("norm_matmul takes no residual")
        _kernel("linear", "norm_matmul kernel (norm fused into the GEMM)")
        return matmul.norm_matmul(x, norm.scale, norm.bias, kernel, bias, norm_kind=norm.kind,
                                  eps=norm.eps, plus_one=norm.plus_one, activation=activation,
                                  gated=gated, transpose_w=k_major, interpret=_interpret())
    _kernel("linear", "matmul kernel (bias/activation/residual epilogue)")
    return matmul.matmul(x, kernel, bias, residual, activation=activation, gated=gated,
                         transpose_w=k_major, interpret=_interpret())


def _gemv(x, w, bias, residual, norm, activation, gated, scales=None):
    """The decode GEMV over a K-major weight w [N, K] (int8 codes with scales [N]): the norms of
    GEMV_FUSED_NORMS fused, others in XLA first (see GEMV_ROWS)."""
    from pallas_kernels import gemv

    fused = norm is not None and norm.kind in GEMV_FUSED_NORMS
    if norm is not None and not fused:
        x = ops.norm_xla(x, norm)
    _kernel("linear", f"gemv kernel ({w.dtype}, K-major"
            f"{f', {_NORM_NAMES[norm.kind]} fused' if fused else ', norm in XLA first' if norm else ''})")
    return gemv.gemv(x, w, scales, bias, residual, activation=activation, gated=gated,
                     norm=tuple(norm) if fused else None, interpret=_interpret())


def attention_pallas(q, k, v, q_pos, k_pos, k_valid, *, scale, causal, window, alibi_slopes):
    from pallas_kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, q_pos, k_pos, k_valid, scale=scale, causal=causal,
                           window=window, alibi_slopes=alibi_slopes, interpret=_interpret())


def cache_attention_pallas(q, kv, q_pos, *, scale, window, alibi_slopes):
    """One query per sequence: flash-decoding over the cache (bf16/fp16/fp32 or int8); more:
    causal flash attention that skips the cache's unreached blocks."""
    from pallas_kernels.decode_attention import decode_attention
    from pallas_kernels.flash_attention import flash_attention

    B, T, H, Dh = q.shape
    k, v, *scales = kv
    if T == 1:
        _kernel("cache_attention", f"decode_attention kernel (flash-decoding, {k.dtype} cache)")
        out = decode_attention(q[:, 0], k, v, q_pos[:, 0], scale=scale, window=window,
                               alibi_slopes=alibi_slopes, k_scale=scales[0] if scales else None,
                               v_scale=scales[1] if scales else None, interpret=_interpret())
        return out.reshape(B, 1, H * Dh)
    if scales:
        raise ops.Unsupported("flash attention over an int8 cache (prompt phase)")
    _kernel("cache_attention", "flash_attention kernel (causal over the cache)")
    return flash_attention(q, k, v, q_pos, None, None, scale=scale, causal=True, window=window,
                           alibi_slopes=alibi_slopes, interpret=_interpret())


def write_kv_pallas(qkv, kv, positions, write_at, *, heads, rotary):
    from pallas_kernels.rotary_cache import rotary_cache_write

    H, K, Dh = heads
    k, v, *scales = kv
    q, *kv = rotary_cache_write(
        qkv, k, v, positions, write_at, num_heads=H, kv_heads=K, head_dim=Dh,
        rot_dim=rotary.rot_dim if rotary else 0, layout=rotary.layout if rotary else "half",
        inv_freq=rotary.inv_freq if rotary else None, k_scale=scales[0] if scales else None,
        v_scale=scales[1] if scales else None, interpret=_interpret())
    return q, tuple(kv)


ops.register("linear", "pallas", linear_pallas)
ops.register("attention", "pallas", attention_pallas)
ops.register("cache_attention", "pallas", cache_attention_pallas)
ops.register("write_kv", "pallas", write_kv_pallas)
