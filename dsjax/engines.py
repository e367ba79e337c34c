"""The engines init_inference returns: DecoderEngine (generate, logits) and EncoderEngine (BERT,
DistilBERT, CLIP: embed). Both run through a runner (dsjax.runners: one device or a mesh), so
neither branches on where it runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import checkpoint, encoders
from dsjax import generate as gen
from dsjax import validate
from dsjax.cache import check_budget, check_cache_fits
from dsjax.config import InferenceConfig, ModelConfig
from dsjax.prompts import pack, prompt_rows
from dsjax.runners import LocalRunner, MeshRunner, device_bytes
from dsjax.sources import load_tokenizer


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    tokens: np.ndarray  # [B, max_new_tokens] new tokens, pad_token_id after each sequence's end
    num_tokens: np.ndarray  # [B] tokens generated per prompt (a stop token included)
    logprobs: np.ndarray | None  # [B, max_new_tokens] log p(token) under the model, if asked

    @property
    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.num_tokens)]


class InferenceEngine:
    """A converted model on its device(s): config, inference config, runner, tokenizer."""

    def __init__(self, cfg: ModelConfig, icfg: InferenceConfig, runner: LocalRunner | MeshRunner,
                 *, generation: dict | None = None, tokenizer_dir: Path | None = None,
                 random_weights: bool = False):
        self.config, self.inference_config, self.runner = cfg, icfg, runner
        generation = generation or {}
        eos = generation.get("eos_token_id")
        self.eos_token_id = [eos] if isinstance(eos, int) else list(eos or [])
        pad = generation.get("pad_token_id")
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or [0])[0]
        self.tokenizer_dir, self.random_weights = tokenizer_dir, random_weights
        self._tokenizer = None

    graphdef = property(lambda self: self.runner.graphdef)
    params = property(lambda self: self.runner.params)
    plan = property(lambda self: self.runner.plan)  # the mesh and degrees, or None
    policy = property(lambda self: self.inference_config.kernels)

    @property
    def tokenizer(self):
        """The checkpoint's HF tokenizer; a byte-level one for random-weight models (see
        dsjax.sources.load_tokenizer)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir, self.random_weights)
        return self._tokenizer

    def save(self, path, tokenizer_dir: Path | None = None) -> Path:
        """Writes a dsjax checkpoint that init_inference(path) restores."""
        checkpoint.check_output(path)  # before the weights are gathered
        gen_meta = {"eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        return checkpoint.save(path, self.config, self.runner.stored_params(),
                               generation=gen_meta,
                               tokenizer_dir=tokenizer_dir or self.tokenizer_dir,
                               quant=self.inference_config.quant)

    def num_params(self) -> int:
        """Logical parameter count of the model (a quantized [K, N] weight counts K * N; over a
        mesh, the one-device model's, without vocabulary padding or replicated KV heads)."""
        return self.runner.num_params()

    def weight_bytes(self) -> int:
        """Bytes the parameters occupy on the device (quantized values, scales and zeros)."""
        return device_bytes(self.params)


def _for_encoders(name: str):
    def method(self, *args, **kwargs):
        raise TypeError(f"{name}() is for encoder models (BERT, DistilBERT, CLIP); this "
                        f"{self.config.family} model is a decoder: use generate() or engine(ids)")
    method.__name__ = name
    return method


class DecoderEngine(InferenceEngine):
    """A decoder: HF-style generate() and full-sequence logits."""

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        """Logits [B, T, V] (float32) of a full forward pass, HF-style padding mask optional."""
        ids = validate.id_array("input_ids", input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = (np.ones(ids.shape, bool) if attention_mask is None
                else validate.mask_array("attention_mask", attention_mask, ids.shape))
        self.config.check_ids(ids)
        self.config.check_length(ids.shape[1])
        return self.runner.forward(ids, mask.astype(np.int32))

    forward = __call__

    embed, embed_text = _for_encoders("embed"), _for_encoders("embed_text")
    embed_image, clip_logits = _for_encoders("embed_image"), _for_encoders("clip_logits")

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
        rows = prompt_rows(input_ids, attention_mask)
        max_new_tokens = validate.integer("max_new_tokens", max_new_tokens, low=1)
        budget = self.inference_config.max_out_tokens
        check_budget(max(len(r) for r in rows), max_new_tokens, budget)
        for r in rows:
            self.config.check_ids(r)
        do_sample = validate.boolean("do_sample", do_sample)
        # greedy decoding reads no sampling value, so it checks none (HF's behaviour too)
        sampling = gen.Sampling.make(temperature, top_k, top_p) if do_sample else gen.Sampling.make()
        return_logprobs = validate.boolean("return_logprobs", return_logprobs)
        key = _prng_key(prng_key, do_sample)
        eos = (self.eos_token_id if eos_token_id is None
               else validate.token_list("eos_token_id", eos_token_id))
        pad = self.pad_token_id
        if pad_token_id is not None:
            pad = validate.integer("pad_token_id", pad_token_id, low=0)
            self.config.check_ids([pad], "pad_token_id")
        fill = self._in_vocab(pad)  # what the program feeds back after a row ends
        tokens, lengths = self.pack(rows, fill)
        check_cache_fits(self.config, self.inference_config, len(tokens),  # before it runs
                         self.runner.cache_shards(self.config), self.runner.device, free=True)
        fn, args, kw = self.generate_program(
            jnp.asarray(tokens), jnp.asarray(lengths), key, jnp.int32(max_new_tokens),
            jnp.asarray(eos or [-1], jnp.int32), jnp.int32(fill), sampling, capacity=budget,
            do_sample=do_sample, return_logprobs=return_logprobs,
            int8_cache=self.inference_config.kv_cache_dtype == "int8")
        out, count, lps = (self.runner.rows(x) for x in fn(*args, **kw))
        B = len(rows)
        out, count = np.array(out)[:B, :max_new_tokens], np.asarray(count)[:B]
        out[np.arange(out.shape[1])[None] >= count[:, None]] = pad  # HF's filler, any id
        return GenerationOutput(out, count, np.asarray(lps)[:B, :max_new_tokens]
                                if return_logprobs else None)

    def pack(self, rows, pad: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prompt rows right-padded to this engine's bucketed [B', T] (dsjax.prompts.pack): one
        row at least under the Pallas gemv, two under XLA's GEMMs."""
        return pack([np.asarray(r) for r in rows], self.inference_config.max_out_tokens,
                    self._in_vocab(self.pad_token_id if pad is None else pad),
                    groups=self.runner.batch_groups, min_rows=self.policy.min_rows)

    def _in_vocab(self, pad: int) -> int:
        """The pad id the model may read: a config's pad outside the vocabulary (kept only to
        fill outputs, as transformers does) becomes 0 inside the program."""
        return pad if 0 <= pad < self.config.vocab_size else 0

    @property
    def batch_groups(self) -> int:
        """The packed batch is cut into this many equal groups (replicas x micro-batches)."""
        return self.runner.batch_groups

    def generate_program(self, tokens, lengths, *args, **kw):
        """(jitted function, its arguments, its keyword arguments) of one generate call on
        packed prompts (see LocalRunner.generate_program)."""
        return self.runner.generate_program(tokens, lengths, *args, **kw)


def _prng_key(key, do_sample: bool):
    """The sampling key: a jax.random.key (or a legacy uint32 [2] key); greedy needs none."""
    if key is None:
        if do_sample:
            raise ValueError("do_sample=True needs an explicit prng_key (jax.random.key(seed))")
        return jax.random.key(0)
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    legacy = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,)
    if not (typed and key.shape == ()) and not legacy:
        raise TypeError(f"prng_key must be one jax.random.key(seed), got {type(key).__name__}"
                        f"{' of shape ' + str(key.shape) if hasattr(key, 'shape') else ''}")
    return key


def _for_decoders(what: str):
    def method(self, *args, **kwargs):
        raise TypeError(
            f"{what}: this {self.config.family} model is an encoder and does not generate text; "
            "use engine.embed(input_ids, attention_mask) for hidden states, pooled output and "
            "head logits (embed_image / clip_logits for CLIP images)")
    return method


class EncoderEngine(InferenceEngine):
    """An encoder (BERT, DistilBERT, CLIP): hidden states, pooled output, head logits."""

    __call__ = forward = _for_decoders("engine(input_ids) (LM logits)")
    generate = _for_decoders("generate()")

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
        tower = self.config if self.config.takes_images else self.config.encoder.vision
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
        if self.config.encoder.vision is None:
            raise TypeError("clip_logits() needs a CLIP model with both towers (CLIPModel); "
                            f"this is a {self.config.family} model: use embed()/embed_image()")
        text = self.embed(input_ids, attention_mask)
        image = self.embed_image(pixel_values)
        return encoders.clip_output(text.embeds, image.embeds, self.params["logit_scale"])
