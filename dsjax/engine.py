"""init_inference(): DeepSpeed's entry point, one step per concern:

    options -> model config (the source) -> inference config -> parallel plan (checked) ->
      params (one device: loaded onto it; a mesh: host arrays) -> build_engine: quantize ->
      layout -> place (a mesh: slice, quantize per slice, place, then layout) -> engine

Everything that can be checked from configs (dtype, parallel degrees, token budget, the
checkpoint's architecture and tensor names and shapes) is checked before any weight is read.
`build_engine` runs the last steps on params a caller already has (benchmarks, tests, JAX code).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import checkpoint, compile_cache, validate
from dsjax.cache import check_cache_fits
from dsjax.config import QUANTIZED_DTYPES, InferenceConfig, ModelConfig, dtype_name
from dsjax.encoders import module_for
from dsjax.engines import DecoderEngine, EncoderEngine, InferenceEngine
from dsjax.model import abstract_model, flatten, unflatten
from dsjax.parallel import distributed, pipeline
from dsjax.parallel.mesh import Parallel
from dsjax.policy import KernelPolicy
from dsjax.quant import QuantSpec, quantizable, quantize_flat
from dsjax.runners import LocalRunner, MeshRunner
from dsjax.sources import Source, open_source
from dsjax.weights import QuantizedWeight, k_major_flat

log = logging.getLogger("dsjax")


@dataclasses.dataclass(frozen=True)
class Options:
    """init_inference's options (DeepSpeed's names), declared once.

    dtype: bf16 (default) / fp16 / fp32, as strings, JAX or torch dtypes; int8 / int4
      (DeepSpeed's spelling) computes in bf16 with weight-only quantized GEMM weights.
    tensor_parallel: {"tp_size": T} (or mp_size=T): Megatron slicing of every layer over T
      devices. pipeline_parallel: {"pp_size": P, "micro_batches": M (default P), "offload_kv":
      bool}: the layers in P stages, the batch in M micro-batches that keep every stage busy
      while decoding; offload_kv keeps the caches of micro-batches not computing in pinned host
      memory. data_parallel: {"dp_size": R}: R replicas. expert_parallel: {"ep_size": E} (or
      DeepSpeed-MoE's moe={"ep_size": E, "moe_experts": [...]}): a MoE model's experts spread
      over E replicas (data_parallel follows). The mesh (dp x pp x tp) is built on `devices`
      (default jax.devices()); see dsjax.parallel.
    max_out_tokens: prompt + new tokens per sequence, the KV cache capacity (default 1024, or
      the model's learned positions if fewer).
    replace_with_kernel_inject: the Pallas kernels for every op that has one
      (KernelPolicy.pallas()). kernels: a dsjax.KernelPolicy, or a dict of per-op choices
      {op: "pallas" | "xla"} (and routing fields) over the policy replace_with_kernel_inject
      selects, e.g. {"linear": "xla"}: Pallas attention, XLA GEMMs.
    quant: weight quantization, {"bits": 8|4, "group_size": None|64|128.., "symmetric": bool,
      "lm_head": bool} or DeepSpeed's {"enabled": True, "weight": {"num_bits": 8, "q_type": ..}}.
    kv_cache_dtype: "auto" (the compute dtype) or "int8" (K/V quantized per token and head).
    seed: for random weights. devices: the mesh's devices. progress: a progress bar while
      converting. check_finite: refuse weights holding NaN or inf after loading (default True;
      False skips the check). distributed: one process of several (one per host) joins the
      others first (dsjax.parallel.distributed: DSJAX_* or JAX's own environment variables;
      a caller's earlier jax.distributed.initialize counts) and the mesh spans every
      process's devices. seed, devices, progress, check_finite and distributed are not
      DeepSpeed config keys.
    """

    dtype: object = None
    tensor_parallel: object = None
    mp_size: int | None = None
    pipeline_parallel: object = None
    data_parallel: object = None
    expert_parallel: object = None
    moe: object = None
    max_out_tokens: int | None = None
    replace_with_kernel_inject: bool = False
    kernels: object = None
    quant: object = None
    kv_cache_dtype: str = "auto"
    seed: int = 0
    devices: object = None
    progress: bool = True
    check_finite: bool = True
    distributed: bool = False

    # not DeepSpeed config keys
    CALL_ONLY = ("seed", "devices", "progress", "check_finite", "distributed")

    def __post_init__(self):
        for name in ("replace_with_kernel_inject", "progress", "check_finite", "distributed"):
            validate.boolean(name, getattr(self, name))
        object.__setattr__(self, "seed", validate.integer("seed", self.seed))
        if self.max_out_tokens is not None:
            object.__setattr__(self, "max_out_tokens",
                               validate.integer("max_out_tokens", self.max_out_tokens, low=2))

    @classmethod
    def parse(cls, config: dict | None, kwargs: dict) -> Options:
        """Keyword arguments, then the DeepSpeed-style config dict's keys over them."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(kwargs) - set(names)
        if unknown:
            raise TypeError(f"init_inference() got unknown options {sorted(unknown)}; "
                            f"known: {', '.join(names)}")
        keys = [n for n in names if n not in cls.CALL_ONLY]
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict of init_inference options, got {type(config).__name__}")
        for key, value in (config or {}).items():
            if key not in keys:
                raise ValueError(f"unknown init_inference config key {key!r}; known: {', '.join(keys)}")
            if key in kwargs and not _same(kwargs[key], value):
                raise ValueError(f"{key} is given twice with different values: {kwargs[key]!r} as "
                                 f"a keyword and {value!r} in config; pass it once")
        return cls(**{**kwargs, **(config or {})})

    def parallel(self) -> Parallel:
        return Parallel.parse(self.tensor_parallel, self.mp_size, self.pipeline_parallel,
                              self.data_parallel, self.expert_parallel, self.moe)


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  arrays, objects without a plain ==
        return a is b


def init_inference(model, config: dict | None = None, **options) -> InferenceEngine:
    """Builds an inference engine.

    model: an HF checkpoint directory, a dsjax checkpoint directory (`dsjax convert`), a
      llama.cpp GGUF file (dsjax.formats.gguf), an in-memory transformers model, a built-in
      architecture name (random weights, see dsjax.presets), a ModelConfig (random weights),
      or a dsjax.sources.Source opened from one of these (its config checked before any
      weight is read).
    config: a DeepSpeed-style dict with the same keys as the keyword options (see Options).
    """
    opts = Options.parse(config, options)
    if opts.distributed:
        distributed.initialize()
    compile_cache.enable()
    source = open_source(model)
    icfg = inference_config(opts, source)
    par = opts.parallel()
    check_plan(source.config, icfg, par, opts.devices, prequantized=source.prequantized)
    params = load_params(source, icfg, host=par.is_parallel, lazy=par.is_parallel,
                         seed=opts.seed, progress=opts.progress, check_finite=opts.check_finite)
    return build_engine(source.config, params, inference=icfg, parallel=par,
                        devices=opts.devices, source=source)


def build_engine(config: ModelConfig, params: dict, *, inference: InferenceConfig | None = None,
                 parallel: Parallel | None = None, devices=None,
                 source: Source | None = None) -> InferenceEngine:
    """An engine from a model config and its params (nested, in the stored [K, N] layout; host
    arrays for a mesh): checks the plan, casts float weights to the dtypes the model declares
    under inference.dtype, quantizes (per inference.quant, unless already quantized), lays the
    weights out for the policy's kernels, places them (one device: as they are; a mesh: each
    device its slice, quantized per slice), and wraps them in an engine."""
    icfg = inference or InferenceConfig()
    par = parallel or Parallel()
    compile_cache.enable()
    check_plan(config, icfg, par, devices)
    policy, dtype = icfg.kernels, icfg.jnp_dtype
    graphdef, expected = abstract_model(config, dtype, policy, module=module_for(config))
    params = _in_dtypes(params, expected)
    if par.is_parallel:
        plan, graphdef, params = pipeline.build(config, par, par.mesh(devices), flatten(params),
                                                dtype, policy, icfg.quant)
        runner = MeshRunner(plan, graphdef, layout(params, policy))
    else:
        runner = LocalRunner(graphdef, layout(quantize(params, icfg.quant), policy))
    log.info("dsjax: %s, %d layers, %s%s, budget %d tokens, kernels %s%s, on %s",
             config.family, config.num_layers, icfg.dtype,
             f", weights {quant_name(icfg.quant)}" if icfg.quant else "", icfg.max_out_tokens,
             policy.describe(), f", {par}" if par.is_parallel else "", _device_name(par, devices))
    engine = EncoderEngine if config.encoder is not None else DecoderEngine
    return engine(config, icfg, runner, generation=source.generation if source else None,
                  tokenizer_dir=source.tokenizer_dir if source else None,
                  random_weights=source.random_weights if source else False,
                  generation_fields=source.generation_fields if source else None)


def convert_checkpoint(src, out_dir, *, dtype="bf16", quant=None, progress: bool = True) -> Path:
    """HF checkpoint directory (or in-memory HF model, or GGUF file) -> dsjax checkpoint at
    out_dir; with quant (or dtype int8/int4) the GEMM weights are stored quantized (a GGUF
    file's quantized weights are stored as they are). out_dir is checked before anything is
    read. The converted weights stay host arrays (views of the source where no conversion is
    needed), each GEMM weight quantized as soon as it is converted, and orbax writes them as
    they are: about one copy of them in memory (docs/decisions.md#streaming-convert)."""
    out_dir = checkpoint.check_output(out_dir)
    source = open_source(src)
    icfg = inference_config(Options(dtype=dtype, quant=quant), source)
    check_quant(source.config, icfg.quant)
    spec = icfg.quant

    def each(path, x):  # quantized as soon as it is converted, back on the host
        if spec is None or not quantizable(path, spec, experts=True) or isinstance(x, QuantizedWeight):
            return x
        return jax.device_get(quantize_flat({path: x}, spec)[path])

    if spec is not None:
        log.info("dsjax: quantizing the GEMM weights to %s", quant_name(spec))
    flat = flatten(load_params(source, icfg, host=True, seed=0, progress=progress, each=each))
    return checkpoint.save(out_dir, source.config, unflatten(flat), generation=source.generation,
                           tokenizer_dir=source.tokenizer_dir, quant=spec)


# ----------------------------------------------------------------------------- the steps

def inference_config(opts: Options, source: Source) -> InferenceConfig:
    """dtype int8/int4 (DeepSpeed's spelling) means bf16 compute with quantized weights; a
    checkpoint stored quantized keeps its format (asking for another one is an error)."""
    cfg, dtype, spec = source.config, opts.dtype, QuantSpec.parse(opts.quant)
    bits = QUANTIZED_DTYPES.get(dtype_name(dtype)) if dtype is not None else None
    if bits is not None:
        if spec is not None and spec.bits != bits:
            raise ValueError(f"dtype={dtype!r} contradicts quant bits={spec.bits}")
        spec, dtype = spec or QuantSpec(bits=bits), "bfloat16"
    if source.stored_layout and spec is not None:
        raise ValueError(f"this checkpoint stores quantized weights, each in its own format "
                         f"({layout_name(source.stored_layout)}); it cannot be re-quantized to "
                         f"{quant_name(spec)}: load it without quant= (or dtype int8/int4)")
    stored = source.stored_quant
    if stored is not None:
        if spec is not None and spec != stored:
            raise ValueError(f"this checkpoint stores {quant_name(stored)} weights; it "
                             f"cannot be re-quantized to {quant_name(spec)}: convert the "
                             "original checkpoint again with the format you want")
        spec = stored
    budget = opts.max_out_tokens
    if budget is None:
        budget = min(1024, cfg.max_position_embeddings) if cfg.positions == "learned" else 1024
    return InferenceConfig(dtype=dtype or "bfloat16", max_out_tokens=budget, quant=spec,
                           kv_cache_dtype=opts.kv_cache_dtype,
                           kernels=KernelPolicy.parse(opts.kernels, opts.replace_with_kernel_inject))


def check_plan(cfg: ModelConfig, icfg: InferenceConfig, par: Parallel, devices=None, *,
               prequantized: bool = False) -> None:
    """Everything the configs decide, before any weight is read: the token budget against
    learned positions, the degrees against the model and the devices, quantization against
    each slice (prequantized: the source stores quantized weights)."""
    if cfg.positions == "learned" and icfg.max_out_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"max_out_tokens={icfg.max_out_tokens} exceeds the {cfg.max_position_embeddings} "
            f"learned positions of this {cfg.family} model; pass max_out_tokens <= "
            f"{cfg.max_position_embeddings}")
    par.check(cfg)
    quantized = icfg.quant is not None or prequantized
    if cfg.moe is not None and quantized and (par.tp > 1 or par.pp > 1 or par.ep > 1):
        raise ValueError(f"this {cfg.family} model's expert (MoE) layers are quantized on one "
                         "device or dp replicas; tensor, pipeline and expert parallelism take "
                         "them in the weights' dtype for now: drop quant or the parallelism")
    if par.is_parallel or distributed.multiprocess():
        par.check_processes(devices)
        if prequantized:
            raise ValueError("this checkpoint stores quantized weights, which are sliced "
                             "for one device; for tensor/pipeline parallelism load the "
                             "full-precision checkpoint and pass quant= to init_inference "
                             "(each slice is quantized)")
    check_quant(cfg, icfg.quant, par.tp)
    if cfg.encoder is None:
        rows = par.dp * par.micro_batches * icfg.kernels.min_rows
        check_cache_fits(cfg, icfg, rows, par.cache_shards(cfg), _first_device(par, devices),
                         free=False)


def _first_device(par: Parallel, devices):
    """The first device of this process that the engine uses."""
    if not par.is_parallel:
        return jax.local_devices()[0]
    return distributed.first_own(par.check_devices(devices)[:par.devices])


def load_params(source: Source, icfg: InferenceConfig, *, host: bool, seed: int,
                progress: bool, check_finite: bool = True, each=None, lazy: bool = False) -> dict:
    """The source's weights as nested params: on the default device, or host arrays for a mesh
    (lazy: read block by block as the mesh places them, where the source can); with
    check_finite, a weight holding NaN or inf is an error naming it; each(path, weight)
    replaces every weight as it is made (see Source.load)."""
    _, expected = abstract_model(source.config, icfg.jnp_dtype, module=module_for(source.config))
    return source.load(expected, icfg.jnp_dtype, seed=seed, progress=progress, host=host,
                       check_finite=check_finite, each=each, lazy=lazy)


def quantize(params: dict, spec: QuantSpec | None) -> dict:
    """The GEMM weights quantized (those not already quantized)."""
    if spec is None:
        return params
    flat = flatten(params)
    todo = {k: v for k, v in flat.items()
            if quantizable(k, spec, experts=True) and not isinstance(v, QuantizedWeight)}
    if not todo:
        return params
    log.info("dsjax: quantizing the GEMM weights to %s", quant_name(spec))
    flat.update(quantize_flat(todo, spec))
    return unflatten(flat)


def layout(params: dict, policy: KernelPolicy) -> dict:
    """Placed params in the layout the policy's kernels read: K-major GEMM weights when its
    linear op runs the Pallas kernels (over a mesh, each device transposes its own slice)."""
    return unflatten(k_major_flat(flatten(params))) if policy.k_major else params


def quant_name(spec: QuantSpec) -> str:
    group = f"groups of {spec.group_size}" if spec.group_size else "per channel"
    if spec.fp8:
        return f"fp8 e4m3 ({group})"
    return f"int{spec.bits} ({'symmetric' if spec.symmetric else 'asymmetric'}, {group})"


def layout_name(layout: dict) -> str:
    """The formats of weights stored each in its own, with how many weights hold each."""
    counts = {}
    for spec in layout.values():
        counts[quant_name(spec)] = counts.get(quant_name(spec), 0) + 1
    return "; ".join(f"{n} x {name}" for name, n in counts.items())


def check_quant(cfg: ModelConfig, spec: QuantSpec | None, tp: int = 1) -> None:
    """Group sizes must divide every quantized weight's K (of each device's slice): checked
    before any weight is read."""
    if spec is None:
        return
    ks = {cfg.hidden_size, cfg.num_heads * cfg.dim_head // tp, cfg.intermediate_size // tp}
    if cfg.moe is not None:  # the experts' K: hidden (up) and expert width (down)
        ks.add(cfg.moe.expert_size)
    if spec.lm_head and not cfg.tie_word_embeddings:
        ks.add(cfg.embed_proj_dim or cfg.hidden_size)
    for K in sorted(ks):
        spec.groups(K)


def _device_name(par: Parallel, devices) -> str:
    """The devices the engine runs on, in words ("cuda: NVIDIA H100 80GB HBM3", "cpu x8")."""
    devs = (par.check_devices(devices)[:par.devices] if par.is_parallel
            else [_first_device(par, devices)])
    kind = f"{devs[0].platform}: {devs[0].device_kind}" if devs[0].platform != "cpu" else "cpu"
    return kind + (f" x{len(devs)}" if len(devs) > 1 else "")


def _in_dtypes(params: dict, expected: dict) -> dict:
    """params with every float array in the dtype the model declares for it under the
    inference dtype (a caller's float32 arrays under a bf16 config would otherwise run as they
    are); quantized and lazy weights as they are; logged."""
    flat, cast = flatten(params), []
    for path, v in flat.items():
        want = expected.get(path)
        floats = want is not None and all(jnp.issubdtype(d, jnp.floating)
                                          for d in (getattr(v, "dtype", np.int8), want.dtype))
        if floats and isinstance(v, (np.ndarray, jax.Array)) and v.dtype != want.dtype:
            flat[path] = v.astype(want.dtype)
            cast.append(f"{path}: {v.dtype} -> {want.dtype}")
    if not cast:
        return params
    log.info("dsjax: %d weights cast to the engine's dtypes (%s, ...)", len(cast), cast[0])
    return unflatten(flat)
