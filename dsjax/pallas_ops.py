"""The "pallas" implementations of dsjax.ops: adapters from the ops' signatures to the kernels
in pallas_kernels/, and the routing of `linear` in one table (`route_linear`).

Every function takes the engine's KernelPolicy (its thresholds and interpret mode). A call a
kernel cannot take raises policy.Unsupported with the reason; ops then logs the fallback.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from types import MappingProxyType

import jax
import jax.numpy as jnp

from dsjax import numerics
from dsjax.numerics import NormSpec
from dsjax.policy import KernelPolicy, Unsupported, announce
from dsjax.weights import DenseWeight, QuantizedWeight

_NORM_NAMES = MappingProxyType({"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"})


def _interpret(policy: KernelPolicy) -> bool:
    interpret = jax.default_backend() == "cpu" if policy.interpret is None else policy.interpret
    if interpret:
        announce("Pallas kernels run in interpret mode (correct but slow; for tests)",
                 logging.WARNING if jax.default_backend() != "cpu" else logging.INFO)
    return interpret


def _kernel(op: str, what: str) -> None:
    announce(f"ops.{op}: Pallas {what}")


# ----------------------------------------------------------------------------- linear

@dataclasses.dataclass(frozen=True)
class Route:
    """How `linear` runs: kernel "gemv" | "matmul" | "quant_matmul" | "xla" (XLA's GEMM:
    ops.linear runs it); norm "fused" (in the kernel) | "xla" (applied in XLA first) | None
    (no norm)."""

    kernel: str
    norm: str | None


def route_linear(w, rows: int, norm: NormSpec | None, policy: KernelPolicy) -> Route:
    """The table "weight kind x layout x rows x norm -> kernel" (why each threshold:
    docs/decisions.md, under the KernelPolicy field's name):

      weight           layout   rows                     kernel         norm
      any              any      > xla_gemm_rows (if set) XLA's GEMM     XLA
      float            K-major  <= gemv_rows             gemv           fused if its kind is in
                                                                        gemv_fused_norms, else XLA
      int8 per-channel K-major  <= int8_gemv_rows        gemv           (as above)
      float / int8     K-major  <= norm_in_xla_rows      matmul / quant_matmul  XLA first
      float / int8     K-major  more                     matmul / quant_matmul  fused prologue
      float            [K, N]   any                      matmul         fused prologue
      quantized        [K, N]   any (all int4 codes)     quant_matmul   fused prologue
    """
    if policy.xla_gemm_rows and rows > policy.xla_gemm_rows:
        return Route("xla", None if norm is None else "xla")
    quantized = isinstance(w, QuantizedWeight)
    gemv_rows = (policy.int8_gemv_rows if quantized and w.bits == 8 and w.per_channel
                 else 0 if quantized else policy.gemv_rows)
    if w.k_major and rows <= gemv_rows:
        fused = norm is not None and norm.kind in policy.gemv_fused_norms
        return Route("gemv", None if norm is None else "fused" if fused else "xla")
    kernel = "quant_matmul" if quantized else "matmul"
    if norm is None:
        return Route(kernel, None)
    return Route(kernel, "xla" if w.k_major and rows <= policy.norm_in_xla_rows else "fused")


def _integer_codes(w, op: str) -> None:
    if isinstance(w, QuantizedWeight) and jnp.issubdtype(w.values.dtype, jnp.floating):
        raise Unsupported(f"{w.values.dtype} codes: the Pallas {op} kernels read integer codes")


def linear(x, w, bias=None, residual=None, *, norm=None, activation=None, gated=False,
           policy: KernelPolicy):
    _integer_codes(w, "GEMM")
    route = route_linear(w, math.prod(x.shape[:-1]), norm, policy)
    if route.kernel == "xla":  # ops.linear routes these before calling here
        raise Unsupported(f"more rows than xla_gemm_rows={policy.xla_gemm_rows}")
    if route.norm == "xla":
        x, norm = numerics.apply_norm(x, norm), None
    interpret = _interpret(policy)
    if route.kernel == "gemv":
        return _gemv(x, w, bias, residual, norm, activation, gated, route, interpret)
    layout = ", K-major" if w.k_major else ""
    norm_where = _where(route, norm, "norm fused")
    if route.kernel == "quant_matmul":
        return _quant_matmul(x, w, bias, residual, norm, activation, gated, interpret,
                             f"{layout}{norm_where}")
    from pallas_kernels import matmul

    if norm is not None:
        if residual is not None:
            raise Unsupported("norm_matmul takes no residual")
        _kernel("linear", f"norm_matmul kernel (norm fused into the GEMM{layout})")
        return matmul.norm_matmul(x, norm, w.values, bias, activation=activation, gated=gated,
                                  transpose_w=w.k_major, interpret=interpret)
    _kernel("linear", f"matmul kernel (bias/activation/residual epilogue{layout}{norm_where})")
    return matmul.matmul(x, w.values, bias, residual, activation=activation, gated=gated,
                         transpose_w=w.k_major, interpret=interpret)


def _where(route: Route, norm, fused: str) -> str:
    """Where the norm runs, for the log line: ', <fused>', ', norm in XLA first' or nothing."""
    return {"fused": f", {fused}", "xla": ", norm in XLA first", None: ""}[route.norm]


def _quant_matmul(x, w: QuantizedWeight, bias, residual, norm, activation, gated, interpret,
                  how: str):
    from pallas_kernels import quant_matmul

    try:
        out = quant_matmul.quant_matmul(
            x, w.values, w.scales, w.zeros, bits=w.bits, group_size=w.group_size, bias=bias,
            residual=residual, activation=activation, gated=gated, norm=norm,
            transpose_w=w.k_major, interpret=interpret)
    except ValueError as why:  # a group size the kernel's K blocks cannot tile
        raise Unsupported(str(why)) from None
    _kernel("linear", f"quant_matmul kernel (int{w.bits}, group {w.group_size}{how})")
    return out


def _gemv(x, w: DenseWeight | QuantizedWeight, bias, residual, norm, activation, gated,
          route: Route, interpret: bool):
    """The decode GEMV over a K-major weight [N, K] (int8 codes with one scale per output)."""
    from pallas_kernels import gemv

    scales = w.scales[0] if isinstance(w, QuantizedWeight) else None
    where = _where(route, norm, route.norm == "fused" and f"{_NORM_NAMES[norm.kind]} fused")
    _kernel("linear", f"gemv kernel ({w.values.dtype}, K-major{where})")
    return gemv.gemv(x, w.values, scales, bias, residual, activation=activation, gated=gated,
                     norm=norm, interpret=interpret)


# ----------------------------------------------------------------------------- census

def pallas_eqns(jaxpr) -> list:
    """The pallas_call equations of a (closed) jaxpr, sub-jaxprs included (while-loop bodies,
    conds, nested jits): which kernels a traced program really holds, whatever its log said."""
    found, stack = [], [getattr(jaxpr, "jaxpr", jaxpr)]
    while stack:
        for eqn in stack.pop().eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(eqn)
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        stack.append(sub)
    return found


def pallas_calls(jaxpr) -> collections.Counter:
    """Kernel name -> count of pallas_call equations in a jaxpr (see pallas_eqns)."""
    return collections.Counter(str(eqn.params["name"]) for eqn in pallas_eqns(jaxpr))


# ----------------------------------------------------------------------------- attention

def attention(q, k, v, q_pos, k_pos, k_valid, *, scale, causal, window, alibi_slopes,
              policy: KernelPolicy):
    from pallas_kernels.flash_attention import flash_attention

    _kernel("attention", "flash_attention kernel")
    return flash_attention(q, k, v, q_pos, k_pos, k_valid, scale=scale, causal=causal,
                           window=window, alibi_slopes=alibi_slopes,
                           interpret=_interpret(policy))


def cudnn_refusal(q, kv, *, alibi_slopes, from_start: bool, policy: KernelPolicy) -> str | None:
    """Why this cache_attention call does not run cuDNN's fused attention (None: it does):
    cuDNN takes a prompt that starts its sequences (its causal mask counts from key 0), of at
    least policy.cudnn_prompt_tokens tokens, bf16/fp16 K/V, no ALiBi, head sizes of at most
    128 in multiples of 8, on an NVIDIA GPU."""
    T, Dh = q.shape[1], q.shape[3]
    if not policy.cudnn_prompt_tokens or T < policy.cudnn_prompt_tokens or not from_start:
        return "not a long prompt from the start"
    if len(kv) != 2 or kv[0].dtype not in (jnp.bfloat16, jnp.float16) or q.dtype != kv[0].dtype:
        return f"cuDNN takes q and K/V of one dtype, bf16 or fp16 (q {q.dtype}, K/V {kv[0].dtype})"
    if alibi_slopes is not None:
        return "ALiBi"
    if Dh > 128 or Dh % 8:
        return f"head size {Dh}"
    if _interpret(policy) or jax.default_backend() != "gpu":
        return "cuDNN needs an NVIDIA GPU"
    return None


def _cudnn_attention(q, k, v, *, scale, window, implementation="cudnn"):
    """jax.nn.dot_product_attention over the cache's first T slots of k, v [B, KVH, S, Dh],
    copied to its [B, T, KVH, Dh] (the cache keeps [B, KVH, S, Dh]) -> [B, T, H * Dh]."""
    B, T, H, Dh = q.shape
    k, v = (x[:, :, :T].transpose(0, 2, 1, 3) for x in (k, v))
    left = None if window is None else (window - 1, 0)  # keys left of the query, itself excluded
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                       local_window_size=left, implementation=implementation)
    return out.reshape(B, T, H * Dh)


@functools.lru_cache(maxsize=None)
def _cudnn_compiles(q: jax.ShapeDtypeStruct, kv: jax.ShapeDtypeStruct, scale: float,
                    window: int | None) -> str | None:
    """Compiles cuDNN's attention of these shapes once, outside the program being traced:
    None, or why it does not compile (cuDNN reports some cases, e.g. no engine for the
    configuration, only as it compiles, which would fail the whole prompt program)."""
    try:
        jax.jit(functools.partial(_cudnn_attention, scale=scale, window=window)).lower(
            q, kv, kv).compile()
    except Exception as e:  # noqa: BLE001  (any failure: the flash kernel runs instead)
        return f"cuDNN refused it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def cudnn_prompt(q, kv, *, scale, window, implementation="cudnn"):
    """cuDNN's causal attention of a prompt's T queries over the cache's first T slots:
    (out [B, T, H * Dh], None), or (None, why) where cuDNN refuses these shapes as they
    compile on their own (logged as a warning). implementation: jax.nn.dot_product_attention's
    ("xla" checks this function's slicing, layout and window on the CPU)."""
    k, v = kv
    why = None
    if implementation == "cudnn":
        why = _cudnn_compiles(jax.ShapeDtypeStruct(q.shape, q.dtype),
                              jax.ShapeDtypeStruct(k.shape, k.dtype), float(scale), window)
    if why is not None:
        announce(f"ops.cache_attention: {why}", logging.WARNING)
        return None, why
    announce(f"ops.cache_attention: {implementation} fused attention (prompts of {q.shape[1]} tokens)")
    return _cudnn_attention(q, k, v, scale=scale, window=window,
                            implementation=implementation), None


def cache_attention(q, kv, q_pos, *, scale, window, alibi_slopes, policy: KernelPolicy,
                    from_start: bool = False):
    """One query per sequence: flash-decoding over the cache (bf16/fp16/fp32 or int8); a long
    prompt from the start: cuDNN's fused attention where it takes the case (cudnn_refusal);
    other queries: causal flash attention that skips the cache's unreached blocks."""
    from pallas_kernels.decode_attention import decode_attention
    from pallas_kernels.flash_attention import flash_attention

    B, T, H, Dh = q.shape
    k, v, *scales = kv
    if T == 1:
        _kernel("cache_attention", f"decode_attention kernel (flash-decoding, {k.dtype} cache)")
        out = decode_attention(q[:, 0], k, v, q_pos[:, 0], scale=scale, window=window,
                               alibi_slopes=alibi_slopes, k_scale=scales[0] if scales else None,
                               v_scale=scales[1] if scales else None,
                               min_split_keys=policy.min_split_keys, interpret=_interpret(policy))
        return out.reshape(B, 1, H * Dh)
    refusal = cudnn_refusal(q, kv, alibi_slopes=alibi_slopes, from_start=from_start, policy=policy)
    if refusal is None:
        out, refusal = cudnn_prompt(q, kv, scale=scale, window=window)
        if out is not None:
            return out
    if scales:
        raise Unsupported("flash attention over an int8 cache (prompt phase)")
    why = "" if refusal.startswith("not a long") else f"; not cuDNN: {refusal}"
    _kernel("cache_attention", f"flash_attention kernel (causal over the cache{why})")
    return flash_attention(q, k, v, q_pos, None, None, scale=scale, causal=True, window=window,
                           alibi_slopes=alibi_slopes, interpret=_interpret(policy))


def write_kv(qkv, kv, positions, write_at, *, heads, rotary, policy: KernelPolicy):
    from pallas_kernels.rotary_cache import rotary_cache_write

    H, K, Dh = heads
    k, v, *scales = kv
    q, *kv = rotary_cache_write(
        qkv, k, v, positions, write_at, num_heads=H, kv_heads=K, head_dim=Dh,
        rot_dim=rotary.rot_dim if rotary else 0, layout=rotary.layout if rotary else "half",
        inv_freq=rotary.inv_freq if rotary else None, k_scale=scales[0] if scales else None,
        v_scale=scales[1] if scales else None, interpret=_interpret(policy))
    return q, tuple(kv)


def paged_attention(q, layer, q_pos, *, scale, window, alibi_slopes, policy: KernelPolicy):
    """The serving step's flat batch q [1, N, H, Dh] over a PagedLayer's block pools (bf16,
    fp16, fp32 or int8 with scales): one program per (tile of a sequence's tokens, kv head)
    through the block table; padding tokens (no slot) give 0."""
    from pallas_kernels.paged_attention import POOL_DTYPES, paged_attention as kernel

    B, N, H, Dh = q.shape
    if B != 1:
        raise Unsupported(f"a batch of {B} flat batches (the serving step has one)")
    if layer.k.dtype not in POOL_DTYPES:
        raise Unsupported(f"{layer.k.dtype} pools (it reads {', '.join(map(str, POOL_DTYPES))})")
    meta = layer.meta
    _kernel("paged_attention", f"paged_attention kernel ({layer.k.dtype} pools, "
                               f"blocks of {layer.k.shape[2]})")
    out = kernel(q[0], layer.k, layer.v, q_pos[0], meta.token_seq, meta.block_tables,
                 meta.slots >= 0, scale=scale, window=window, alibi_slopes=alibi_slopes,
                 k_scale=layer.k_scale, v_scale=layer.v_scale, interpret=_interpret(policy))
    return out.reshape(1, N, H * Dh)


def experts(x, up, down, picks, weights, *, activation: str, policy: KernelPolicy,
            block_sizes=None):
    """ops.experts through two grouped GEMMs over the rows laid out by expert (each expert's
    rows padded to the kernel's row block): [gate | up] with the gated activation, then down
    with the routing weights in the epilogue; only experts with rows are read. block_sizes:
    (up's, down's) grouped_matmul.BlockSizes (default: split K where few experts have rows,
    expert_block_sizes)."""
    from pallas_kernels.grouped_matmul import (BlockSizes, expert_block_sizes, expert_layout,
                                               grouped_matmul, k_unit)

    N, D = x.shape
    E, _, two_i = up.shape
    _integer_codes(up, "grouped GEMM")
    if D % 16 or (two_i // 2) % 16:
        raise Unsupported(f"hidden size {D} and expert width {two_i // 2} must be multiples of 16")
    if isinstance(up, QuantizedWeight) and any(k_unit(K, up) % 16 for K in (D, two_i // 2)):
        raise Unsupported(f"int{up.bits} groups of {up.group_size} with K = {D}, "
                          f"{two_i // 2} (K steps of 16 or more within one group)")
    k, bm = picks.shape[1], BlockSizes().block_m
    how = f"int{up.bits} groups of {up.group_size}, " if isinstance(up, QuantizedWeight) else ""
    _kernel("experts", f"grouped GEMM over {E} experts ({how}top-{k})")
    interpret = _interpret(policy)
    slot, block_expert = expert_layout(picks, E, bm)
    M, token = block_expert.shape[0] * bm, jnp.arange(N * k) // k
    rows = jnp.zeros((M, D), x.dtype).at[slot].set(x[token], mode="drop")
    scale = jnp.zeros((M,), jnp.float32).at[slot].set(weights.reshape(-1).astype(jnp.float32),
                                                      mode="drop")
    block_sizes = block_sizes or expert_block_sizes(N * k, E, D, two_i // 2)
    h = grouped_matmul(rows, up, block_expert, activation=activation,
                       block_sizes=block_sizes[0], interpret=interpret)
    # each pick's scaled output stays float32 until the picks are summed (as the XLA op's)
    o = grouped_matmul(h, down, block_expert, scale, out_dtype=jnp.float32,
                       block_sizes=block_sizes[1], interpret=interpret)
    back = jnp.take(o, slot, axis=0, mode="fill", fill_value=0)
    return jnp.zeros((N, D), jnp.float32).at[token].add(back).astype(x.dtype)
