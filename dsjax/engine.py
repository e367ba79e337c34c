"""init_inference(): DeepSpeed's entry point, returning an InferenceEngine.

Everything that can be checked from configs (dtype, parallel degrees, token budget, the
checkpoint's architecture and tensor names and shapes) is checked before any weight is read.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import checkpoint, encoders, kmajor, ops, presets
from dsjax import generate as gen
from dsjax.cache import check_budget
from dsjax.config import QUANTIZED_DTYPES, InferenceConfig, ModelConfig, dtype_name
from dsjax.model import Transformer, abstract_model, flatten, random_params, unflatten
from dsjax.parallel import pipeline
from dsjax.parallel.mesh import Parallel
from dsjax.quant import QuantSpec, abstract_quantized, quantize_flat

log = logging.getLogger("dsjax")

_OPTIONS = ("dtype", "tensor_parallel", "mp_size", "pipeline_parallel", "data_parallel",
            "max_out_tokens", "replace_with_kernel_inject", "kernels", "quant", "kv_cache_dtype")


def init_inference(model, config: dict | None = None, *, dtype=None, tensor_parallel=None,
                   mp_size: int | None = None, pipeline_parallel=None, data_parallel=None,
                   max_out_tokens: int | None = None, replace_with_kernel_inject: bool = False,
                   kernels: dict | None = None, quant=None, kv_cache_dtype: str = "auto",
                   seed: int = 0, devices=None, progress: bool = True) -> InferenceEngine:
    """Builds an inference engine.

    model: an HF checkpoint directory, a dsjax checkpoint directory (`dsjax convert`), an
      in-memory transformers model, a built-in architecture name (random weights, see
      dsjax.presets), or a ModelConfig (random weights).
    config: a DeepSpeed-style dict with the same keys as the keyword arguments.
    dtype: bf16 (default) / fp16 / fp32, as strings, JAX or torch dtypes; int8 / int4 (DeepSpeed's
      spelling) computes in bf16 with weight-only quantized GEMM weights.
    quant: weight quantization, {"bits": 8|4, "group_size": None|64|128.., "symmetric": bool,
      "lm_head": bool} or DeepSpeed's {"enabled": True, "weight": {"num_bits": 8, "q_type": ..}}.
    replace_with_kernel_inject: run the matmuls and attention through the Pallas kernels (with a
      logged fallback to XLA for any call a kernel cannot take).
    kernels: per-op overrides, {op: "pallas" | "xla"} for op in dsjax.ops.OPS, e.g.
      {"linear": "xla"} with replace_with_kernel_inject=True: Pallas attention, XLA GEMMs.
    kv_cache_dtype: "auto" (the compute dtype) or "int8" (K/V quantized per token and head:
      half the cache bytes to read per decode step, twice the tokens in the same memory).
      pipeline_parallel's "offload_kv": True keeps the caches of micro-batches not computing
      in pinned host memory (see dsjax.parallel.pipeline).
    tensor_parallel: {"tp_size": T} (or mp_size=T): Megatron slicing of every layer over T
      devices. pipeline_parallel: {"pp_size": P, "micro_batches": M (default P)}: the layers in
      P stages, the batch in M micro-batches that keep every stage busy while decoding.
      data_parallel: {"dp_size": R}: R replicas, each serving a slice of the batch. The mesh
      (dp x pp x tp) is built on `devices` (default jax.devices()); see dsjax.parallel.
    max_out_tokens: prompt + new tokens per sequence, the KV cache capacity (default 1024, or
      the model's learned positions if fewer). seed: for random weights.
    """
    opts = dict(dtype=dtype, tensor_parallel=tensor_parallel, mp_size=mp_size,
                pipeline_parallel=pipeline_parallel, data_parallel=data_parallel,
                max_out_tokens=max_out_tokens,
                replace_with_kernel_inject=replace_with_kernel_inject, kernels=kernels,
                quant=quant, kv_cache_dtype=kv_cache_dtype)
    for key, value in (config or {}).items():
        if key not in _OPTIONS:
            raise ValueError(f"unknown init_inference config key {key!r}; known: {', '.join(_OPTIONS)}")
        opts[key] = value
    source = _open(model)
    cfg = source.config
    if opts["max_out_tokens"] is None:
        opts["max_out_tokens"] = (min(1024, cfg.max_position_embeddings)
                                  if cfg.positions == "learned" else 1024)
    icfg = _inference_config(opts, stored_quant=source.quant)
    par = Parallel.parse(opts["tensor_parallel"], opts["mp_size"], opts["pipeline_parallel"],
                         opts["data_parallel"])
    par.check(cfg)
    mesh = par.mesh(devices) if par.is_parallel else None
    if mesh is not None and source.quant is not None:
        raise ValueError("this dsjax checkpoint stores quantized weights, which are sliced for "
                         "one device; for tensor/pipeline parallelism load the full-precision "
                         "checkpoint and pass quant= to init_inference (each slice is quantized)")
    _check_quant(cfg, icfg.quant, par.tp)
    if cfg.positions == "learned" and icfg.max_out_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"max_out_tokens={icfg.max_out_tokens} exceeds the {cfg.max_position_embeddings} "
            f"learned positions of this {cfg.family} model; pass max_out_tokens <= "
            f"{cfg.max_position_embeddings}")
    graphdef, expected = _abstract_model(cfg, icfg.jnp_dtype, icfg.impl)
    plan = None
    if mesh is None:
        params = _load(source, expected, icfg, seed=seed, progress=progress)
    else:
        flat = flatten(source.load(expected, icfg.jnp_dtype, seed=seed, progress=progress,
                                   host=True))
        plan, graphdef, params = pipeline.build(cfg, par, mesh, flat, icfg.jnp_dtype, icfg.impl,
                                                icfg.quant)
    params = kernel_layout(params, icfg)
    log.info("dsjax: %s, %d layers, %s%s, budget %d tokens, kernels %s%s", cfg.family,
             cfg.num_layers, icfg.dtype, f", weights {_quant_name(icfg.quant)}" if icfg.quant else "",
             icfg.max_out_tokens, icfg.kernels, f", {par}" if plan else "")
    return InferenceEngine(cfg, icfg, graphdef, params, generation=source.generation,
                           tokenizer_dir=source.tokenizer_dir, random_weights=source.random_weights,
                           plan=plan)


def convert_checkpoint(src, out_dir, *, dtype="bf16", quant=None, progress: bool = True) -> Path:
    """HF checkpoint directory (or in-memory HF model) -> dsjax checkpoint at out_dir; with
    quant (or dtype int8/int4) the GEMM weights are stored quantized."""
    icfg = _inference_config(dict(_DEFAULTS, dtype=dtype, quant=quant), stored_quant=None)
    source = _open(src)
    _check_quant(source.config, icfg.quant)
    _, expected = _abstract_model(source.config, icfg.jnp_dtype)
    params = _load(source, expected, icfg, seed=0, progress=progress)
    return checkpoint.save(out_dir, source.config, params, generation=source.generation,
                           tokenizer_dir=source.tokenizer_dir, quant=icfg.quant)


def _load(source: _Source, expected: dict, icfg: InferenceConfig, *, seed, progress) -> dict:
    """Reads the weights; quantizes the GEMM weights unless the source stores them quantized."""
    if source.quant is not None:
        return source.load(abstract_quantized(expected, icfg.quant), icfg.jnp_dtype,
                           seed=seed, progress=progress)
    params = source.load(expected, icfg.jnp_dtype, seed=seed, progress=progress)
    if icfg.quant is None:
        return params
    log.info("dsjax: quantizing the GEMM weights to %s", _quant_name(icfg.quant))
    return unflatten(quantize_flat(flatten(params), icfg.quant))


def kernel_layout(params: dict, icfg: InferenceConfig) -> dict:
    """Placed params in the layout the engine's kernels read: K-major GEMM weights when its
    linear op runs the Pallas kernels (over a mesh, each device transposes its own slice)."""
    return unflatten(kmajor.k_major_flat(flatten(params))) if _k_major(icfg) else params


def _k_major(icfg: InferenceConfig) -> bool:
    """Whether an engine holds its GEMM weights K-major (dsjax.kmajor): when its linear op runs
    the Pallas kernels first."""
    return ops.preference_for(icfg.impl, "linear")[0] == "pallas"


def _quant_name(spec: QuantSpec) -> str:
    group = f"groups of {spec.group_size}" if spec.group_size else "per channel"
    return f"int{spec.bits} ({'symmetric' if spec.symmetric else 'asymmetric'}, {group})"


def _abstract_model(cfg: ModelConfig, dtype, impl=("xla",)):
    """The module a config describes: the generic Transformer, or an Encoder around it."""
    return abstract_model(cfg, dtype, impl, module=module_for(cfg))


def _random_params(cfg: ModelConfig, dtype, seed: int, host: bool = False) -> dict:
    """On the default device, or with host=True in host memory (to be sliced over a mesh: a
    model larger than one device is never made on one)."""
    if not host:
        return random_params(cfg, dtype, seed, module=module_for(cfg))
    with jax.default_device(_host()):
        return random_params(cfg, dtype, seed, module=module_for(cfg))


def _host():
    return jax.devices("cpu")[0]


def module_for(cfg: ModelConfig):
    """Encoders (BERT, DistilBERT, CLIP) wrap the Transformer body with their own heads."""
    return encoders.Encoder if cfg.encoder else Transformer


_DEFAULTS = dict(dtype=None, tensor_parallel=None, mp_size=None, pipeline_parallel=None,
                 data_parallel=None, max_out_tokens=1024, replace_with_kernel_inject=False, kernels=None,
                 quant=None, kv_cache_dtype="auto")


def _inference_config(opts: dict, stored_quant) -> InferenceConfig:
    """dtype int8/int4 (DeepSpeed's spelling) means bf16 compute with quantized weights; a
    checkpoint stored quantized keeps its format (asking for another one is an error)."""
    dtype, spec = opts["dtype"], QuantSpec.parse(opts["quant"])
    bits = QUANTIZED_DTYPES.get(dtype_name(dtype)) if dtype is not None else None
    if bits is not None:
        if spec is not None and spec.bits != bits:
            raise ValueError(f"dtype={dtype!r} contradicts quant bits={spec.bits}")
        spec, dtype = spec or QuantSpec(bits=bits), "bfloat16"
    if stored_quant is not None:
        if spec is not None and spec != stored_quant:
            raise ValueError(f"this checkpoint stores {_quant_name(stored_quant)} weights; it "
                             f"cannot be re-quantized to {_quant_name(spec)}: convert the "
                             "original checkpoint again with the format you want")
        spec = stored_quant
    return InferenceConfig(dtype=dtype or "bfloat16", max_out_tokens=opts["max_out_tokens"],
                           quant=spec, kv_cache_dtype=opts["kv_cache_dtype"],
                           kernels="pallas" if opts["replace_with_kernel_inject"] else "xla",
                           op_kernels=tuple(sorted((opts["kernels"] or {}).items())))


def _check_quant(cfg: ModelConfig, spec: QuantSpec | None, tp: int = 1) -> None:
    """Group sizes must divide every quantized weight's K (of each device's slice): checked
    before any weight is read."""
    if spec is None:
        return
    ks = {cfg.hidden_size, cfg.num_heads * cfg.dim_head // tp, cfg.intermediate_size // tp}
    if spec.lm_head and not cfg.tie_word_embeddings:
        ks.add(cfg.embed_proj_dim or cfg.hidden_size)
    for K in sorted(ks):
        spec.groups(K)


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass
class _Source:
    config: ModelConfig
    load: callable  # (expected, dtype, seed=, progress=, host=) -> nested params
    generation: dict
    tokenizer_dir: Path | None = None
    random_weights: bool = False
    quant: QuantSpec | None = None  # the checkpoint's stored weight format


def _open(model) -> _Source:
    if isinstance(model, ModelConfig):
        return _Source(model, lambda exp, dt, seed, progress, host=False:
                       _random_params(model, dt, seed, host), {}, random_weights=True)
    if isinstance(model, (str, Path)):
        path = Path(model)
        if checkpoint.is_checkpoint(path):
            cfg, meta = checkpoint.load_meta(path)
            return _Source(cfg, lambda exp, dt, seed, progress, host=False:
                           checkpoint.restore(path, exp, dt, device=_host() if host else None),
                           meta["generation"], path, quant=checkpoint.stored_quant(meta))
        if not path.exists() and str(model) in presets.PRESETS:
            return _open_hf_config(presets.hf_config(str(model)))
        if not path.exists():
            raise FileNotFoundError(f"{model!r} is neither a directory nor a built-in architecture "
                                    f"({', '.join(presets.PRESETS)})")
    import converters

    hf = converters.open_hf(model)

    def load(expected, dtype, seed, progress, host=False):  # host: numpy arrays, for slicing
        flat = converters.convert(hf.policy, hf.config, hf.tensors, expected, dtype, progress,
                                  put=(lambda path, x: x) if host else None)
        return unflatten(flat)

    return _Source(hf.config, load, _generation(hf.hf_config, hf.directory), hf.directory)


def _open_hf_config(hf_config: dict) -> _Source:
    import converters

    cfg = converters.policy_for(hf_config).make_config(hf_config)
    return _Source(cfg, lambda exp, dt, seed, progress, host=False:
                   _random_params(cfg, dt, seed, host),
                   _generation(hf_config, None), random_weights=True)


def _generation(hf_config: dict, directory: Path | None) -> dict:
    gen_cfg = {}
    if directory is not None and (directory / "generation_config.json").exists():
        import json

        gen_cfg = json.loads((directory / "generation_config.json").read_text())
    pick = lambda k: gen_cfg.get(k, hf_config.get(k))  # noqa: E731
    return {"eos_token_id": pick("eos_token_id"), "pad_token_id": pick("pad_token_id")}


# ----------------------------------------------------------------------------- the engine

@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    tokens: np.ndarray  # [B, max_new_tokens] new tokens, pad_token_id after each sequence's end
    num_tokens: np.ndarray  # [B] tokens generated per prompt (a stop token included)
    logprobs: np.ndarray | None  # [B, max_new_tokens] log p(token) under the model, if asked

    @property
    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.num_tokens)]


class InferenceEngine:
    """A converted model on the device, with jitted forward and generate."""

    def __init__(self, cfg: ModelConfig, icfg: InferenceConfig, graphdef, params, *,
                 generation: dict | None = None, tokenizer_dir: Path | None = None,
                 random_weights: bool = False, plan: pipeline.Plan | None = None):
        self.config, self.inference_config = cfg, icfg
        self.graphdef, self.params = graphdef, params
        self.plan = plan  # multi-device: the mesh and degrees; params are then stage-stacked slices
        self._specs = None if plan is None else pipeline.hashable_specs(params)
        generation = generation or {}
        eos = generation.get("eos_token_id")
        self.eos_token_id = [eos] if isinstance(eos, int) else list(eos or [])
        pad = generation.get("pad_token_id")
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or [0])[0]
        self.tokenizer_dir, self.random_weights = tokenizer_dir, random_weights
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The checkpoint's HF tokenizer; a byte-level one for random-weight models. A model
        with neither (an in-memory or Megatron model, a directory without tokenizer files) is
        an error: encode with its own tokenizer and pass token ids."""
        if self._tokenizer is None:
            d = self.tokenizer_dir
            if d is not None and any((d / f).exists() for f in checkpoint.TOKENIZER_FILES[:5]):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(d))
            elif self.random_weights:
                self._tokenizer = presets.ByteTokenizer()
            else:
                where = f"{d} has no tokenizer files" if d else "this model came without a directory"
                raise ValueError(f"no tokenizer: {where} (looked for "
                                 f"{', '.join(checkpoint.TOKENIZER_FILES[:5])}); encode prompts "
                                 "with the model's own tokenizer and pass token ids")
        return self._tokenizer

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        """Logits [B, T, V] (float32) of a full forward pass, HF-style padding mask optional."""
        self._need_decoder("engine(input_ids) (LM logits)")
        ids = np.asarray(input_ids, np.int32)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        self.config.check_ids(ids)
        self.config.check_length(ids.shape[1])
        if self.plan is None:
            return gen.forward(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(mask))
        B, dp = ids.shape[0], self.plan.par.dp
        rows = -(-B // dp) * dp
        ids, mask = (np.concatenate([a, np.repeat(a[-1:], rows - B, 0)]).reshape(dp, rows // dp, -1)
                     for a in (ids, mask))
        logits = pipeline.forward(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(mask),
                                  plan=self.plan, specs=self._specs)
        return logits.reshape(rows, *logits.shape[2:])[:B]

    forward = __call__

    # ------------------------------------------------------------------------- encoders

    def embed(self, input_ids, attention_mask=None, token_type_ids=None) -> encoders.EmbeddingOutput:
        """Runs an encoder's text tower (BERT, DistilBERT, CLIP text) as HF's model would.

        input_ids: a list of token lists of any lengths (right-padded here, with the mask made
          for you), one token list, or a [B, T] array with an optional HF attention_mask (any
          padding side; positions are 0..T-1 as in HF). token_type_ids: the same shape as
          input_ids (BERT sentence pairs); default all 0.
        Returns an EmbeddingOutput (float32): last_hidden_state [B, T, D]; pooler_output [B, D]
          (BERT's tanh pooler, DistilBERT classifier's ReLU pre-classifier, CLIP's EOS token;
          None for models without one); logits (MLM [B, T, V] or classification [B, L]);
          embeds [B, P] (CLIP's projected text features). `.mean_pooled()` gives the masked
          mean of the hidden states (sentence-transformers' pooling).
        """
        self._need_encoder("embed()")
        if self.config.takes_images:
            raise TypeError(f"this {self.config.family} model is an image tower only: "
                            "use embed_image(pixel_values)")
        batch = encoders.pack_text(self.config, input_ids, attention_mask, token_type_ids)
        raw = encoders.encode_text(self.graphdef, self.params, *batch.arrays)
        return encoders.output(raw, batch.rows, batch.tokens, batch.mask)

    embed_text = embed

    def embed_image(self, pixel_values) -> encoders.EmbeddingOutput:
        """Runs a CLIP image tower on pixel_values [B, C, S, S] (or one [C, S, S] image),
        normalized as the checkpoint's image processor does; S must be the model's image_size.
        Returns an EmbeddingOutput: last_hidden_state [B, 1 + N, D] (class token first, no
        final norm, as in HF), pooler_output [B, D] (post-LayerNorm class token), embeds [B, P]
        (CLIP's get_image_features) when the model has a visual projection."""
        self._need_encoder("embed_image()")
        enc = self.config.encoder
        tower = self.config if self.config.takes_images else enc.vision
        if tower is None:
            raise TypeError(f"this {self.config.family} model has no image tower; use embed()")
        pixels, B = encoders.pack_pixels(tower.encoder.image, pixel_values)
        raw = encoders.encode_image(self.graphdef, self.params, pixels)
        n = tower.encoder.image.num_patches + 1
        return encoders.output(raw, B, n, np.ones((B, n), np.int32))

    def clip_logits(self, input_ids, pixel_values, attention_mask=None) -> encoders.CLIPOutput:
        """HF CLIPModel(input_ids, pixel_values, attention_mask): normalized text_embeds
        [N, P] and image_embeds [I, P], logits_per_image [I, N] = exp(logit_scale) *
        image_embeds @ text_embeds.T, and logits_per_text, its transpose. Inputs as in
        embed() and embed_image()."""
        if self.config.encoder is None or self.config.encoder.vision is None:
            raise TypeError("clip_logits() needs a CLIP model with both towers (CLIPModel); "
                            f"this is a {self.config.family} model: use embed()/embed_image()")
        text = self.embed(input_ids, attention_mask)
        image = self.embed_image(pixel_values)
        return encoders.clip_output(text.embeds, image.embeds, self.params["logit_scale"])

    def _need_encoder(self, what: str) -> None:
        if self.config.encoder is None:
            raise TypeError(f"{what} is for encoder models (BERT, DistilBERT, CLIP); this "
                            f"{self.config.family} model is a decoder: use generate() or engine(ids)")

    def _need_decoder(self, what: str) -> None:
        if self.config.encoder is not None:
            raise TypeError(
                f"{what}: this {self.config.family} model is an encoder and does not generate "
                "text; use engine.embed(input_ids, attention_mask) for hidden states, pooled "
                "output and head logits (embed_image / clip_logits for CLIP images)")

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id=None, pad_token_id: int | None = None,
                 prng_key=None, return_logprobs: bool = False) -> GenerationOutput:
        """Generates for a batch of prompts of any lengths (each gets exactly its own tokens).

        input_ids: a list of token lists, one token list, or an [B, T] array with an HF-style
          attention_mask (left or right padding). eos_token_id: int, list, or None for the
          model's own (pass [] to never stop early). prng_key: a jax.random key, needed when
          do_sample=True.
        """
        self._need_decoder("generate()")
        rows = _prompt_rows(input_ids, attention_mask)
        budget = self.inference_config.max_out_tokens
        check_budget(max(len(r) for r in rows), max_new_tokens, budget)
        for r in rows:
            if len(r) == 0:
                raise ValueError("every prompt needs at least one token")
            self.config.check_ids(r)
        if do_sample and prng_key is None:
            raise ValueError("do_sample=True needs an explicit prng_key (jax.random.key(seed))")
        sampling = gen.Sampling.make(temperature, top_k, top_p)
        eos = self.eos_token_id if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        self.config.check_ids([pad], "pad_token_id")
        one_row = _k_major(self.inference_config)  # see _pack
        tokens, lengths = _pack(rows, budget, pad, groups=self.batch_groups,
                                min_rows=1 if one_row else 2)
        fn, args, kw = self.generate_program(
            jnp.asarray(tokens), jnp.asarray(lengths),
            prng_key if prng_key is not None else jax.random.key(0), jnp.int32(max_new_tokens),
            jnp.asarray(eos or [-1], jnp.int32), jnp.int32(pad), sampling, capacity=budget,
            do_sample=do_sample, return_logprobs=return_logprobs,
            int8_cache=self.inference_config.kv_cache_dtype == "int8")
        out, count, lps = fn(*args, **kw)
        if self.plan is not None:  # [dp, M, b, ...] -> [B', ...]
            out, count, lps = (x.reshape(-1, *x.shape[3:]) for x in (out, count, lps))
        B = len(rows)
        out, count = np.asarray(out)[:B, :max_new_tokens], np.asarray(count)[:B]
        return GenerationOutput(out, count, np.asarray(lps)[:B, :max_new_tokens]
                                if return_logprobs else None)

    @property
    def batch_groups(self) -> int:
        """The packed batch is cut into this many equal groups (replicas x micro-batches)."""
        return self.plan.par.dp * self.plan.par.micro_batches if self.plan else 1

    def generate_program(self, tokens, lengths, *args, **kw):
        """(jitted function, its arguments, its keyword arguments) of one generate call on
        packed prompts tokens [B', T], lengths [B'] (see gen.generate for the rest): the
        one-device program, or the mesh's with the batch cut [dp, M, b]. `fn(*args, **kw)`
        runs it; `fn.lower(*args, **kw)` shows its program (not with offload_kv, whose `fn` is
        a Python loop over per-tick programs)."""
        if self.plan is None:
            return gen.generate, (self.graphdef, self.params, tokens, lengths, *args), kw
        par = self.plan.par
        cut = lambda a: a.reshape(par.dp, par.micro_batches, -1, *a.shape[1:])  # noqa: E731
        fn = pipeline.generate_offloaded if par.offload_kv else pipeline.generate
        return (fn, (self.graphdef, self.params, cut(tokens), cut(lengths), *args),
                dict(kw, plan=self.plan, specs=self._specs))

    def save(self, path, tokenizer_dir: Path | None = None) -> Path:
        """Writes a dsjax checkpoint that init_inference(path) restores."""
        if self.plan is not None:
            raise ValueError("save() writes single-device checkpoints; this engine's weights are "
                             "sliced over a mesh: save from an engine built without "
                             "tensor/pipeline parallelism (or use `dsjax convert`)")
        gen_meta = {"eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        return checkpoint.save(path, self.config, kmajor.k_n_params(self.params),
                               generation=gen_meta,
                               tokenizer_dir=tokenizer_dir or self.tokenizer_dir,
                               quant=self.inference_config.quant)

    def num_params(self) -> int:
        """Logical parameter count of the model (a quantized [K, N] weight counts K * N; over a
        mesh, the one-device model's, without vocabulary padding or replicated KV heads)."""
        if self.plan is not None:
            _, expected = _abstract_model(self.config, self.inference_config.jnp_dtype)
            return sum(int(np.prod(x.shape)) for x in expected.values())
        return sum(int(np.prod(x.shape)) for x in flatten(self.params).values())

    def weight_bytes(self) -> int:
        """Bytes the parameters occupy on the device (quantized values, scales and zeros)."""
        return sum(x.nbytes for x in jax.tree.leaves(self.params))



def _prompt_rows(input_ids, attention_mask) -> list[np.ndarray]:
    """Token rows of a generate() call; an HF-style mask (either side) cuts each row's padding."""
    rows = encoders.token_rows(input_ids, "input_ids")
    if attention_mask is None:
        return rows
    mask = np.asarray(attention_mask).astype(bool)
    mask = mask[None] if mask.ndim == 1 else mask
    if len({r.size for r in rows}) != 1 or mask.shape != (len(rows), rows[0].size):
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape "
                         f"({len(rows)} rows of lengths {sorted({r.size for r in rows})})")
    out = []
    for r, m in zip(rows, mask):
        idx = np.flatnonzero(m)
        if idx.size and idx[-1] - idx[0] + 1 != idx.size:
            raise ValueError("attention_mask rows must be one contiguous run of 1s (left or right padding)")
        out.append(r[idx])
    return out


def _pack(rows: list[np.ndarray], budget: int, pad: int, groups: int = 1,
          min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to a bucketed [B', T'] (B' / groups and T' powers of two, `groups` = the
    replicas x micro-batches the batch is cut into); filler rows have length 0 (generate treats
    them as finished from the start, so they never hold up an early stop).

    B' >= min_rows, 2 by default: with one row, XLA's GPU DotStrengthReduction turns every
    decode GEMV whose matrix has under 10M elements into a materialized multiply + reduce (13 us
    instead of ~3 for GPT-2 1.3B's attention-out projection on the H200); a second row keeps
    them GEMMs at the same weight-read cost. The Pallas gemv kernel (K-major engines) pays for
    every row it is given (each one's products, measured 1.2-1.5x at two rows), so those take
    one."""
    B = groups * gen.bucket(-(-len(rows) // groups), minimum=min_rows)
    T = min(gen.bucket(max(len(r) for r in rows)), budget)
    tokens = np.full((B, T), pad, np.int32)
    lengths = np.zeros((B,), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
        lengths[b] = len(r)
    return tokens, lengths
