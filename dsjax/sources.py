"""Where a model comes from: one small class per kind of source, each giving the model's
config, its generation defaults, its tokenizer directory, and its weights on request.

  HFSource           an HF checkpoint directory or an in-memory transformers model (converters/)
  CheckpointSource   a dsjax checkpoint directory (`dsjax convert`, engine.save())
  GGUFSource         a llama.cpp GGUF file (dsjax.formats.gguf)
  RandomSource       a ModelConfig or a built-in architecture name: random weights
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from dsjax import checkpoint, integrity, presets, validate
from dsjax.config import ModelConfig
from dsjax.encoders import module_for
from dsjax.lazy import Lazy, ReadCounter
from dsjax.model import flatten, random_params, unflatten
from dsjax.quant import QuantSpec, abstract_layout, abstract_quantized

log = logging.getLogger("dsjax")


class Source:
    """What every source gives. `load(expected, dtype, seed=, progress=, host=, check_finite=,
    each=)` returns nested params shaped like `expected` ({path: ShapeDtypeStruct}), on the
    default device, or as host arrays with host=True (to be sliced over a mesh: a model larger
    than one device is never made on one); with check_finite, a weight holding NaN or inf is an
    error (dsjax.integrity); each(path, array), if given, replaces every weight as it is made
    (a converter calls it per tensor, so that e.g. quantizing never holds two full copies).
    With lazy=True (and host), a source that reads a file by offset (HF safetensors, GGUF)
    returns lazy tensors (dsjax.lazy) that read only the blocks asked of them, each checked as
    it is read, and counts the bytes read in `read` (tensors the source makes in memory, such
    as GGUF's dequantized or unpermuted ones, are whole arrays under them); the other sources
    return host arrays."""

    config: ModelConfig
    generation: dict  # eos_token_id / pad_token_id defaults
    generation_fields: dict = {}  # generation_config.json's other fields (dsjax.settings)
    tokenizer_dir: Path | None = None
    random_weights: bool = False
    stored_quant: QuantSpec | None = None  # the checkpoint's stored weight format
    # or, where weights are stored each in its own format (GGUF files mix types): {param path:
    # QuantSpec}; load() returns those as QuantizedWeight, the others in `dtype`
    stored_layout: dict[str, QuantSpec] | None = None
    read: ReadCounter | None = None  # bytes the lazy loads read (sources that read lazily)

    @property
    def prequantized(self) -> bool:
        """Whether the source stores quantized weights (which are taken as they are)."""
        return self.stored_quant is not None or bool(self.stored_layout)

    def load(self, expected: dict, dtype, *, seed: int, progress: bool, host: bool = False,
             check_finite: bool = True, each=None, lazy: bool = False) -> dict:
        raise NotImplementedError


def _each(params: dict, each) -> dict:
    """each(path, weight) over loaded params (sources that make them all at once)."""
    return params if each is None else unflatten({k: each(k, v) for k, v in flatten(params).items()})


class RandomSource(Source):
    random_weights = True

    def __init__(self, config: ModelConfig, generation: dict | None = None):
        self.config, self.generation = config, generation or {}

    def load(self, expected, dtype, *, seed, progress, host=False, check_finite=True, each=None,
             lazy=False):
        cpu = jax.local_devices(backend="cpu")[0]  # this process's, over several processes
        where = jax.default_device(cpu) if host else contextlib.nullcontext()
        with where:
            return _each(random_params(self.config, dtype, seed, module=module_for(self.config)),
                         each)


class CheckpointSource(Source):
    def __init__(self, path: Path):
        self.path = self.tokenizer_dir = path
        self.config, self.meta = checkpoint.load_meta(path)
        self.generation = self.meta["generation"]
        self.generation_fields = generation_fields(path)
        self.stored_quant = checkpoint.stored_quant(self.meta)
        self.stored_layout = checkpoint.stored_layout(self.meta)

    def load(self, expected, dtype, *, seed, progress, host=False, check_finite=True, each=None,
             lazy=False):
        if self.stored_quant is not None:
            expected = abstract_quantized(expected, self.stored_quant)
        if self.stored_layout:
            expected = abstract_layout(expected, self.stored_layout)
        params = checkpoint.restore(self.path, expected, dtype, meta=self.meta,
                                    device=jax.local_devices(backend="cpu")[0] if host else None)
        if check_finite:
            integrity.check_all(flatten(params), str(self.path))
        return _each(params, each)


class HFSource(Source):
    def __init__(self, model):
        import converters
        from dsjax.formats.compressed import stored_layout

        self.hf = converters.open_hf(model)
        self.config, self.tokenizer_dir = self.hf.config, self.hf.directory
        self.generation = generation_defaults(self.hf.hf_config, self.hf.directory,
                                              self.config.vocab_size)
        self.generation_fields = generation_fields(self.hf.directory)
        self.stored_layout = stored_layout(self.hf)  # compressed-tensors kernels, as stored
        self.read = ReadCounter()

    def load(self, expected, dtype, *, seed, progress, host=False, check_finite=True, each=None,
             lazy=False):
        return _convert(self.hf.policy, self.hf.config, self.hf.tensors, expected, dtype,
                        progress=progress, host=host, check_finite=check_finite, each=each,
                        counter=self.read if lazy and host else None)


def _convert(policy, config, tensors, expected, dtype, *, progress, host, check_finite, each,
             counter=None):
    """converters.convert over a TensorSource: each converted tensor (or QuantizedWeight the
    source keeps quantized) checked on the host, then placed unless host, then each(path, x).
    With a counter: lazy tensors, each block checked as it is read."""
    import converters

    if counter is not None and each is not None:
        raise ValueError("a lazy load takes no each(): its tensors are read block by block")

    def put(path, x):
        if isinstance(x, Lazy):
            return x.map(lambda b: (integrity.check(path, b, tensors.origin, x.shape), b)[1]) \
                if check_finite else x
        if check_finite:
            integrity.check(path, x, tensors.origin)
        x = x if host else jax.tree.map(jnp.asarray, x)
        return x if each is None else each(path, x)

    return unflatten(converters.convert(policy, config, tensors, expected, dtype, progress,
                                        put=put, counter=counter))


def open_source(model) -> Source:
    """A Source for init_inference's `model` argument (see its docstring for the forms; a
    Source already opened, e.g. to check its config first, is used as it is)."""
    if isinstance(model, Source):
        return model
    if isinstance(model, ModelConfig):
        return RandomSource(model)
    if isinstance(model, (str, Path)):
        path = Path(model)
        if checkpoint.is_checkpoint(path):
            return CheckpointSource(path)
        if _is_gguf(path):
            return GGUFSource(path)
        if not path.exists() and str(model) in presets.PRESETS:
            hf_config = presets.hf_config(str(model))
            cfg = presets.model_config(str(model))
            return RandomSource(cfg, generation_defaults(hf_config, None, cfg.vocab_size))
        if not path.exists():
            raise FileNotFoundError(f"{model!r} is neither a directory nor a built-in architecture "
                                    f"({', '.join(presets.PRESETS)})")
    return HFSource(model)


def _is_gguf(path: Path) -> bool:
    """A regular file named *.gguf or starting with GGUF's magic."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFSource(Source):
    """A llama.cpp GGUF file, parsed and checked when opened (dsjax.formats.gguf: its config,
    tokenizer and weights, the quantized ones each in its own format)."""

    def __init__(self, path: Path):
        try:
            from dsjax.formats.gguf import GGUFFile
        except ImportError as e:
            raise ImportError(f"{path} is a GGUF file, which needs the gguf package ({e}); "
                              "pip install 'dsjax[gguf]'") from None
        self.file = GGUFFile(path)
        self.config, self.tokenizer_dir = self.file.config, self.file.tokenizer_dir
        self.stored_layout = self.file.stored_layout
        self.read = ReadCounter()
        self.generation = generation_defaults(self.file.hf_config, None, self.config.vocab_size)

    def load(self, expected, dtype, *, seed, progress, host=False, check_finite=True, each=None,
             lazy=False):
        self.file.announce(dtype)
        return _convert(self.file.policy, self.file.config, self.file.tensors, expected, dtype,
                        progress=progress, host=host, check_finite=check_finite, each=each,
                        counter=self.read if lazy and host else None)


def load_tokenizer(directory: Path | None, random_weights: bool):
    """The checkpoint's HF tokenizer; a byte-level one for random-weight models. A model with
    neither (an in-memory or Megatron model, a directory without tokenizer files) is an error:
    encode with its own tokenizer and pass token ids."""
    if directory is not None and any((directory / f).exists() for f in checkpoint.TOKENIZER_FILES[:5]):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    if random_weights:
        return presets.ByteTokenizer()
    where = f"{directory} has no tokenizer files" if directory else "this model came without a directory"
    raise ValueError(f"no tokenizer: {where} (looked for {', '.join(checkpoint.TOKENIZER_FILES[:5])}); "
                     "encode prompts with the model's own tokenizer and pass token ids")


SPECIAL_IDS = ("eos_token_id", "pad_token_id", "bos_token_id")


def _generation_file(directory: Path | None) -> dict:
    """generation_config.json of a directory as a dict ({} if there is none)."""
    from converters.loader import CheckpointError, read_json

    if directory is None or not (directory / "generation_config.json").exists():
        return {}
    gen_file = directory / "generation_config.json"
    gen_cfg = read_json(gen_file, "generation defaults")
    if not isinstance(gen_cfg, dict):
        raise CheckpointError(f"{gen_file}: is not a JSON object")
    return gen_cfg


def generation_fields(directory: Path | None) -> dict:
    """generation_config.json's fields other than the special token ids (sampling defaults,
    lengths, penalties: see dsjax.settings, which checks them)."""
    return {k: v for k, v in _generation_file(directory).items() if k not in SPECIAL_IDS}


def generation_defaults(hf_config: dict, directory: Path | None, vocab_size: int) -> dict:
    """eos/pad/bos token ids from generation_config.json, else config.json, checked: a value of
    the wrong type is an error naming the field and the file; an id outside the vocabulary is
    kept (as transformers does: an eos that can never be sampled, a pad that only fills the
    output) with one warning naming the field."""
    from converters.loader import CheckpointError

    gen_cfg = _generation_file(directory)
    out = {}
    for key in SPECIAL_IDS:
        where = "generation_config.json" if key in gen_cfg else "config.json"
        value = gen_cfg.get(key, hf_config.get(key))
        try:
            ids = validate.token_list(key, value, low=-validate.INT32_MAX)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        if key != "eos_token_id" and len(ids) > 1:
            raise CheckpointError(f"{where}: {key} must be one token id, got {value!r}")
        outside = [i for i in ids if not 0 <= i < vocab_size]
        if outside:
            log.warning("%s: %s=%s lies outside the %d-token vocabulary; kept as transformers "
                        "keeps it (%s)", where, key, value, vocab_size, _OUTSIDE[key])
        out[key] = (ids or None) if key == "eos_token_id" else (ids[0] if ids else None)
    return out


_OUTSIDE = {"eos_token_id": "the model can never produce it, so it never stops a sequence",
            "pad_token_id": "it only fills the output after a sequence ends",
            "bos_token_id": "dsjax never inserts it"}
