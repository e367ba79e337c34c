"""KernelPolicy: the one place that says which implementation each op runs and every routing
threshold. Frozen and hashable, it travels as a static value into the model and the jitted
functions (it is part of the model's graphdef), so two engines with different policies never
share a trace.

Also here: `Unsupported`, raised by an implementation that cannot take a particular call (the
seam then falls back to XLA with a warning), and the kernel log with its once-per-message filter.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from dsjax.numerics import NORM_KINDS

OPS = ("norm", "linear", "attention", "cache_attention", "write_kv", "paged_write_kv",
       "paged_attention", "experts")
IMPLEMENTATIONS = ("xla", "pallas")
# the ops that have a Pallas kernel (dsjax.pallas_ops); the others are XLA under every policy
PALLAS_OPS = ("linear", "attention", "cache_attention", "write_kv", "paged_attention", "experts")
GEMV_MAX_ROWS = 8  # the most rows the gemv kernel takes (pallas_kernels.gemv.MAX_ROWS)
# KernelPolicy.pallas()'s cudnn_prompt_tokens (docs/decisions.md#cudnn-prompt-attention)
CUDNN_PROMPT_TOKENS = 1024
# KernelPolicy.pallas()'s xla_gemm_rows (docs/decisions.md#xla-gemms-for-prompts)
XLA_GEMM_ROWS = 16

log = logging.getLogger("dsjax.ops")


class Unsupported(Exception):
    """Raised by an implementation that cannot run this particular call; the reason is logged
    and the XLA implementation runs instead."""


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Which implementation each op runs ("xla" or "pallas") and how the Pallas path routes.

    gemv_rows: float K-major GEMMs with at most this many rows run the gemv kernel;
    gemv_fused_norms: the norms the gemv takes fused (the others run in XLA first);
    norm_in_xla_rows: up to this many rows a norm runs in XLA before a K-major GEMM kernel
      instead of fused into its prologue; int8_gemv_rows: per-channel int8 codes run the gemv up
      to this many rows (0: quant_matmul at every row count); expert_slice_rows: up to this
      many (token, pick) rows the XLA expert op runs each row against its own expert sliced
      from the stacks, reading only the picked experts, instead of ragged_dot (which reads
      every expert; 0: never; off until measured on a GPU); min_split_keys: cache slots a
      decode-attention split covers at least (0: one key block); cudnn_prompt_tokens: under
      the Pallas cache_attention, a prompt that starts its sequences with at least this many
      tokens runs cuDNN's fused attention where cuDNN takes the case (0: never; the flash
      kernel otherwise); xla_gemm_rows: under the Pallas linear, GEMMs of more rows than
      this (prompts) run XLA's GEMM over the same weights (0: never); interpret: run the
      Pallas kernels in interpret mode (None: when the backend is the CPU).
    Why each default: docs/decisions.md (gemv-rows, gemv-fused-norms, norm-in-xla-rows,
    int8-gemv-rows, decode-split-minimum, cudnn-prompt-attention, xla-gemms-for-prompts).
    """

    norm: str = "xla"
    linear: str = "xla"
    attention: str = "xla"
    cache_attention: str = "xla"
    write_kv: str = "xla"
    paged_write_kv: str = "xla"  # the serving engine's block pools (dsjax.serving.paged)
    paged_attention: str = "xla"
    experts: str = "xla"  # sparse expert MLPs (MoE layers)
    gemv_rows: int = 1
    gemv_fused_norms: tuple[str, ...] = ("rmsnorm",)
    norm_in_xla_rows: int = 16
    int8_gemv_rows: int = 0
    min_split_keys: int = 0
    expert_slice_rows: int = 0
    cudnn_prompt_tokens: int = 0
    xla_gemm_rows: int = 0
    interpret: bool | None = None

    def __post_init__(self):
        fused = self.gemv_fused_norms
        object.__setattr__(self, "gemv_fused_norms", (fused,) if isinstance(fused, str) else tuple(fused))
        for op in OPS:
            name = getattr(self, op)
            if name not in IMPLEMENTATIONS:
                raise ValueError(f"kernels[{op!r}]={name!r} is not one of {IMPLEMENTATIONS}")
            if name == "pallas" and op not in PALLAS_OPS:
                raise ValueError(f"there is no Pallas {op} kernel (ops with one: "
                                 f"{', '.join(PALLAS_OPS)}); leave {op} on 'xla'")
        for norm in self.gemv_fused_norms:
            if norm not in NORM_KINDS:
                raise ValueError(f"gemv_fused_norms: {norm!r} is not one of {NORM_KINDS}")
        for name in ("gemv_rows", "norm_in_xla_rows", "int8_gemv_rows", "min_split_keys",
                     "expert_slice_rows", "cudnn_prompt_tokens", "xla_gemm_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"KernelPolicy.{name} must be an integer >= 0, got {value!r}")
        for name in ("gemv_rows", "int8_gemv_rows"):
            if getattr(self, name) > GEMV_MAX_ROWS:
                raise ValueError(f"KernelPolicy.{name}={getattr(self, name)}: the gemv kernel takes "
                                 f"at most {GEMV_MAX_ROWS} rows")

    @classmethod
    def pallas(cls, **changes) -> KernelPolicy:
        """DeepSpeed's replace_with_kernel_inject=True: every op with a Pallas kernel runs it;
        prompts of CUDNN_PROMPT_TOKENS or more run cuDNN's attention where it takes them, and
        GEMMs of more than XLA_GEMM_ROWS rows XLA's GEMM."""
        return cls(**{**{op: "pallas" for op in PALLAS_OPS},
                      "cudnn_prompt_tokens": CUDNN_PROMPT_TOKENS, "xla_gemm_rows": XLA_GEMM_ROWS,
                      **changes})

    @classmethod
    def parse(cls, kernels=None, inject: bool = False) -> KernelPolicy:
        """init_inference's `kernels=`: a KernelPolicy as it is, or a dict {op: "xla" | "pallas"}
        of per-op overrides (plus any routing field) over the policy that
        replace_with_kernel_inject selects."""
        if isinstance(kernels, KernelPolicy):
            injected = cls.pallas()
            if inject and kernels != injected:
                differ = ", ".join(f"{f.name}={getattr(kernels, f.name)!r}"
                                   for f in dataclasses.fields(cls)
                                   if getattr(kernels, f.name) != getattr(injected, f.name))
                raise ValueError("replace_with_kernel_inject=True asks for KernelPolicy.pallas(), "
                                 f"kernels= for another policy ({differ}): pass one")
            return kernels
        base = cls.pallas() if inject else cls()
        if kernels is None:
            return base
        if not isinstance(kernels, dict):
            raise TypeError(f"kernels must be a KernelPolicy or a dict, got {type(kernels).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kernels) - known
        if unknown:
            raise ValueError(f"unknown kernels keys {sorted(unknown)}; ops: {', '.join(OPS)}; "
                             f"routing: {', '.join(sorted(known - set(OPS)))}")
        return dataclasses.replace(base, **kernels)

    def implementation(self, op: str) -> str:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
        return getattr(self, op)

    @property
    def k_major(self) -> bool:
        """An engine holds its GEMM weights K-major when its linear op runs the Pallas kernels
        (the gemv and the tensor-core kernels read them in place: docs/decisions.md#k-major-weights)."""
        return self.linear == "pallas"

    @property
    def min_rows(self) -> int:
        """The fewest rows a packed batch gets on a GPU: one under the Pallas gemv, two under
        XLA's GEMMs (docs/decisions.md#two-row-batch-minimum)."""
        return 1 if self.k_major else 2

    def rows_on(self, platform: str) -> int:
        """min_rows on a device of `platform`: the CPU's dots take one row fastest."""
        return 1 if platform == "cpu" else self.min_rows

    def describe(self) -> str:
        """'pallas' / 'xla' (how the ops with a kernel run), or the per-op choice when they
        differ."""
        names = {getattr(self, op) for op in PALLAS_OPS}
        if len(names) > 1:
            return ", ".join(f"{op}={getattr(self, op)}" for op in PALLAS_OPS)
        return names.pop()


# ----------------------------------------------------------------------------- the kernel log

class OncePerProgram(logging.Filter):
    """Lets each message through once per traced program: the model calls an op once per layer,
    and every layer would repeat it. `new_program()` is called when a top-level function traces,
    so every compile logs the kernels it chose, and a cached program logs nothing."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def new_program(self) -> None:
        self._seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


ONCE = OncePerProgram()
log.addFilter(ONCE)


_SAYING = threading.local()  # .said: the messages of the nested trace under way, or None
_TRACE_SAID: dict = {}  # a nested trace's key -> the messages its tracing announced


def announce(message: str, level: int = logging.INFO) -> None:
    said = getattr(_SAYING, "said", None)
    if said is not None:
        said.append((message, level))
    log.log(level, message)


def announced_by_trace(key, call):
    """call(): a nested jitted function (dsjax.model.run_block) whose tracing announces the
    kernels it chose. jit reuses a trace in later programs, which then would log nothing for
    it: where the call traced nothing (key: its static arguments and shapes), the messages its
    trace said are announced again, so every program logs the kernels it runs."""
    outer = getattr(_SAYING, "said", None)
    _SAYING.said = said = []
    try:
        out = call()
    finally:
        _SAYING.said = outer
    if said:
        _TRACE_SAID[key] = said
        if outer is not None:
            outer.extend(said)
    else:
        for message, level in _TRACE_SAID.get(key, ()):
            announce(message, level)
    return out
