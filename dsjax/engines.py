"""The engines init_inference returns: DecoderEngine (generate, logits) and EncoderEngine (BERT,
DistilBERT, CLIP: embed). Both run through a runner (dsjax.runners: one device or a mesh), so
neither branches on where it runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import checkpoint, decoding, encoders, settings, streaming, validate
from dsjax import generate as gen
from dsjax.cache import check_cache_fits
from dsjax.config import InferenceConfig, ModelConfig
from dsjax.decoding import GenerationOutput
from dsjax.prompts import pack
from dsjax.runners import LocalRunner, MeshRunner, device_bytes
from dsjax.sources import load_tokenizer


class InferenceEngine:
    """A converted model on its device(s): config, inference config, runner, tokenizer."""

    def __init__(self, cfg: ModelConfig, icfg: InferenceConfig, runner: LocalRunner | MeshRunner,
                 *, generation: dict | None = None, tokenizer_dir: Path | None = None,
                 random_weights: bool = False, generation_fields: dict | None = None):
        self.config, self.inference_config, self.runner = cfg, icfg, runner
        generation = generation or {}
        eos = generation.get("eos_token_id")
        self.eos_token_id = [eos] if isinstance(eos, int) else list(eos or [])
        pad = generation.get("pad_token_id")
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or [0])[0]
        self.tokenizer_dir, self.random_weights = tokenizer_dir, random_weights
        self._tokenizer = None
        # generation_config.json's defaults, checked (and its unimplemented fields warned) once
        self.defaults = settings.Defaults(generation_fields or {}, self.eos_token_id)
        self.warned: set = set()  # warnings given once per engine

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

    def generate(self, input_ids, attention_mask=None, *, prng_key=None,
                 return_logprobs: bool = False, pad_token_id: int | None = None,
                 streamer=None, per_prompt: list | None = None, generation_config=None,
                 tokenizer=None, **options) -> GenerationOutput:
        """Generates for a batch of prompts of any lengths (each gets exactly its own tokens),
        as transformers' generate() does.

        input_ids: a list of token lists, one token list, or an [B, T] array with an HF-style
          attention_mask (left or right padding). options: transformers' generation arguments
          (max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
          no_repeat_ngram_size, min_new_tokens, bad_words_ids, stop_strings, num_beams,
          num_return_sequences, length_penalty, early_stopping, eos_token_id, ...; see
          dsjax.settings.FIELDS) plus OpenAI's presence_penalty, frequency_penalty and
          logit_bias ({token: bias}); they override the model's generation_config.json, which
          overrides transformers' defaults. generation_config: a transformers GenerationConfig
          or dict, read as options. per_prompt: one dict of options per prompt, over the rest
          (a batch of mixed settings, one program). eos_token_id: int, list, or [] to never stop
          early. prng_key: a jax.random key, needed when sampling. streamer: an object with
          put(token ids) / end() (transformers' TextStreamer, TextIteratorStreamer): one prompt,
          tokens delivered as they are made. tokenizer: the one stop_strings are read with
          (default: the engine's). Returns a GenerationOutput (prompts x
          num_return_sequences rows; sequences_scores with beam search).
        """
        options = {**_config_options(generation_config), **options}
        decoding.check_names(options)
        return_logprobs = validate.boolean("return_logprobs", return_logprobs)
        rows, settings_ = decoding.resolve(self, input_ids, attention_mask, options, per_prompt)
        key = decoding.prng_key(prng_key, any(s.do_sample for s in settings_))
        pad = decoding.pad_id(self, pad_token_id)
        fill = self._in_vocab(pad)  # what the program feeds back after a row ends
        p = decoding.prepare(self, rows, settings_, fill, self._stop_factory(tokenizer))
        check_cache_fits(self.config, self.inference_config, len(p.tokens) * p.samples * p.beams,
                         self.runner.cache_shards(self.config), self.runner.device, free=True)
        if p.beams > 1:
            return beam_generate(self, p, fill, pad, streamer)
        if streamer is not None:
            return streaming.to_streamer(self, p, key, fill, pad, streamer, return_logprobs)
        prog = decoding.program(self, p, return_logprobs)
        fn, args, kw = self.generate_program(jnp.asarray(p.tokens), jnp.asarray(p.lengths), key,
                                             jnp.int32(fill), decoding.device_request(p.request),
                                             prog=prog)
        out, count, lps = (self.runner.rows(x) for x in fn(*args, **kw))
        return decoding.output(p, out, count, lps, pad, return_logprobs)

    def stream(self, input_ids, attention_mask=None, *, prng_key=None,
               pad_token_id: int | None = None, per_prompt: list | None = None,
               tokenizer=None, **options):
        """generate() as an iterator: yields each step's new tokens as they are made, a list
        per prompt (empty once a prompt has finished); for one prompt given as a token list,
        that prompt's list alone. The same options as generate() (not num_beams)."""
        decoding.check_names(options)
        rows, settings_ = decoding.resolve(self, input_ids, attention_mask, options, per_prompt)
        key = decoding.prng_key(prng_key, any(s.do_sample for s in settings_))
        fill = self._in_vocab(decoding.pad_id(self, pad_token_id))
        p = decoding.prepare(self, rows, settings_, fill, self._stop_factory(tokenizer))
        if p.beams > 1:
            raise ValueError("stream() does not do beam search (transformers' streamers do not "
                             "either): use generate(num_beams=...)")
        check_cache_fits(self.config, self.inference_config, len(p.tokens) * p.samples,
                         self.runner.cache_shards(self.config), self.runner.device, free=True)
        one = _one_flat_prompt(input_ids) and p.samples == 1
        for step in streaming.steps(self, p, key, fill):
            yield step[0] if one else step

    def _stop_factory(self, tokenizer):
        """Builds the stop-string tables of per-row strings with `tokenizer` (default: the
        engine's own), only when some prompt has stop strings."""
        from dsjax.stop_strings import StopStrings

        return lambda per_row: StopStrings.build_rows(tokenizer or self.tokenizer, per_row,
                                                      self.config.vocab_size)

    def pack(self, rows, pad: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prompt rows right-padded to this engine's bucketed [B', T] (dsjax.prompts.pack): one
        row at least under the Pallas gemv or on the CPU, two under XLA's GPU GEMMs."""
        return pack([np.asarray(r) for r in rows], self.inference_config.max_out_tokens,
                    self._in_vocab(self.pad_token_id if pad is None else pad),
                    groups=self.runner.batch_groups,
                    min_rows=self.policy.rows_on(self.runner.device.platform))

    def _in_vocab(self, pad: int) -> int:
        """The pad id the model may read: a config's pad outside the vocabulary (kept only to
        fill outputs, as transformers does) becomes 0 inside the program."""
        return pad if 0 <= pad < self.config.vocab_size else 0

    @property
    def batch_groups(self) -> int:
        """The packed batch is cut into this many equal groups (replicas x micro-batches)."""
        return self.runner.batch_groups

    def generate_program(self, tokens, lengths, key, pad_id, request, *, prog):
        """(jitted function, its arguments, its keyword arguments) of one generate call on
        packed prompts (see LocalRunner.generate_program)."""
        return self.runner.generate_program(tokens, lengths, key, pad_id, request, prog=prog)

    def greedy_program(self, rows, max_new_tokens: int, *, stop_ids=(), return_logprobs=False,
                       int8_cache: bool | None = None):
        """generate_program of greedy decoding on `rows` (packed with pad 0): what benchmarks
        time and tests inspect."""
        tokens, lengths = self.pack([np.asarray(r) for r in rows], pad=0)
        int8 = self.inference_config.kv_cache_dtype == "int8" if int8_cache is None else int8_cache
        prog = gen.Program(capacity=self.inference_config.max_out_tokens,
                           return_logprobs=return_logprobs, int8_cache=int8)
        return self.generate_program(jnp.asarray(tokens), jnp.asarray(lengths),
                                     jax.random.key(0), jnp.int32(0),
                                     decoding.device_request(gen.Request.greedy(max_new_tokens,
                                                                                stop_ids)),
                                     prog=prog)


def _config_options(config) -> dict:
    """A transformers GenerationConfig (its fields that are set) or a dict, as options."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        fields = config.to_dict()
        return {k: v for k, v in fields.items() if k in settings.FIELDS and v is not None}
    raise TypeError(f"generation_config must be a transformers GenerationConfig or a dict, "
                    f"got {type(config).__name__}")


def _one_flat_prompt(input_ids) -> bool:
    return isinstance(input_ids, (list, tuple)) and bool(input_ids) and not isinstance(
        input_ids[0], (list, tuple, np.ndarray))


def beam_generate(engine, p, fill: int, pad: int, streamer) -> GenerationOutput:
    """Beam search (dsjax.beam) on prepared prompts: each prompt's num_return_sequences best
    beams, best first, with transformers' sequences_scores."""
    from dsjax import beam

    if streamer is not None:
        raise ValueError("streamer= does not work with beam search (as in transformers)")
    if engine.runner.plan is not None:
        raise ValueError("beam search runs on one device; this engine is over a mesh")
    if p.features.stop_strings or len(set(p.limits)) > 1:
        raise ValueError("beam search takes one max_new_tokens for every prompt and no "
                         "stop_strings")
    s = p.settings[0]
    seqs, counts, scores = beam.beam_search(
        engine.graphdef, engine.params, jnp.asarray(p.tokens), jnp.asarray(p.lengths),
        jnp.int32(p.width), jnp.asarray(p.request.sampling.eos[0]), jnp.int32(fill),
        jnp.float32(s.length_penalty), decoding.device_request(p.request).sampling,
        capacity=engine.inference_config.max_out_tokens, num_beams=s.num_beams,
        num_return=s.num_return_sequences, early_stopping=s.early_stopping,
        features=p.features, int8_cache=engine.inference_config.kv_cache_dtype == "int8")
    R = s.num_return_sequences
    flat = lambda x: np.asarray(x).reshape(-1, *np.shape(x)[2:])  # noqa: E731
    out = decoding.output(dataclasses.replace(p, samples=R), flat(seqs), flat(counts),
                          None, pad, False)
    return dataclasses.replace(out, sequences_scores=flat(scores)[:len(p.rows) * R])


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
