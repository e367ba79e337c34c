"""llama.cpp's GGUF files: the config, the tokenizer (with its chat template) and the weights from
one file (dsjax.sources.GGUFSource serves them to the engine).

The file is parsed by gguf's GGUFReader (memory-mapped) and checked before any tensor is read:
its magic, every tensor's type, span and block count, the architecture, and the tensors the
family's converter table needs (converters/llama.py, whose HF names GGUF names are renamed to).
llama.cpp's converter permutes the rows of a llama Q and K projection (its interleaved rotary);
they are permuted back as transformers does, rows whole, so quant blocks stay intact. Gemma's
norms are stored + 1 and come back - 1. Weights of the types gguf_blocks maps keep their quantized
form (QuantizedWeight, each in its own format: a file mixes types); the others, and the token
embedding (a dense lookup table), are dequantized, with one log line per file saying which.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import logging
import re
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q

import converters
from converters.hf_config import build_config, check_fields
from converters.loader import CheckpointError, TensorSource, regular_file
from converters.policy import CONCAT_TRANSPOSED, TRANSPOSE, expand, match
from dsjax.formats import gguf_blocks as blocks
from dsjax.formats.gguf_header import check_metadata
from dsjax.positions import rope_inv_freq
from dsjax.quant import QuantSpec
from dsjax.weights import is_gemm

log = logging.getLogger("dsjax")

MAGIC = b"GGUF"
# general.architecture -> (HF model_type, HF class); mistral files say "llama"
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "gemma": ("gemma", "GemmaForCausalLM")}
# llama.cpp's "{arch}.<key>" -> the HF config field (transformers' GGUF_CONFIG_MAPPING, plus
# Gemma's head width); the first four are required
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "context_length": "max_position_embeddings",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
    "attention.key_length": "head_dim", "vocab_size": "vocab_size",
}
_REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
_SPECIAL = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
            "padding_token_id": "pad_token_id"}
# GGUF tensor name stems -> the HF names (relative to "model.") converters/llama.py reads
_NAMES = (
    ("token_embd", "embed_tokens"), ("output_norm", "norm"), ("output", "lm_head"),
    ("blk.{i}.attn_norm", "layers.{i}.input_layernorm"),
    ("blk.{i}.ffn_norm", "layers.{i}.post_attention_layernorm"),
    ("blk.{i}.attn_q", "layers.{i}.self_attn.q_proj"),
    ("blk.{i}.attn_k", "layers.{i}.self_attn.k_proj"),
    ("blk.{i}.attn_v", "layers.{i}.self_attn.v_proj"),
    ("blk.{i}.attn_output", "layers.{i}.self_attn.o_proj"),
    ("blk.{i}.ffn_gate", "layers.{i}.mlp.gate_proj"),
    ("blk.{i}.ffn_up", "layers.{i}.mlp.up_proj"),
    ("blk.{i}.ffn_down", "layers.{i}.mlp.down_proj"),
)


def _renames(pairs) -> tuple[tuple[str, str], ...]:
    """(regex, replacement) pairs renaming a stem (with {i} for the layer) and a dot after it."""
    out = []
    for a, b in pairs:
        pattern = "^" + r"\.".join(p.replace("{i}", r"(\d+)") for p in a.split(".")) + r"\."
        out.append((pattern, b.replace("{i}", r"\1") + "."))
    return tuple(out)


TO_HF = _renames(_NAMES)
TO_GGUF = _renames((b, a) for a, b in _NAMES)


def _rename(name: str, table) -> str:
    for pattern, replacement in table:
        new = re.sub(pattern, replacement, name)
        if new != name:
            return new
    return name


# ----------------------------------------------------------------------------- the file

def open_reader(path: Path) -> GGUFReader:
    """The file parsed by GGUFReader after checking its magic; the reader's own errors (a
    truncated or malformed header, tensor data past the end) name the file; then every tensor's
    span and block count is checked."""
    size = regular_file(path, "GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise CheckpointError(f"{path}: is not a GGUF file (it starts with {magic!r}, not "
                              f"{MAGIC!r}; {size} bytes)")
    check_metadata(path)  # bounded, before GGUFReader makes an object of every item
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001  any failure to parse an untrusted file is the file's
        raise CheckpointError(f"{path}: is truncated or not a valid GGUF file ({size} bytes): "
                              f"gguf's reader failed with {type(e).__name__}: {e}") from None
    _check_spans(reader, path, size)
    return reader


def _check_spans(reader: GGUFReader, path: Path, size: int) -> None:
    """Each tensor holds whole blocks and lies inside the file, no two overlapping."""
    spans = []
    for t in reader.tensors:
        block, _ = GGML_QUANT_SIZES[t.tensor_type]
        ne0 = int(t.shape[0]) if len(t.shape) else 1
        if ne0 % block:
            raise CheckpointError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) has rows of "
                                  f"{ne0} values, not a whole number of {block}-value blocks")
        if not 0 <= t.data_offset <= t.data_offset + t.n_bytes <= size:
            raise CheckpointError(f"{path}: tensor {t.name!r} data [{t.data_offset}, "
                                  f"{t.data_offset + t.n_bytes}) lies past the file's end ({size} "
                                  "bytes): the file is truncated")
        spans.append((t.data_offset, t.data_offset + t.n_bytes, t.name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap")


def metadata(reader: GGUFReader, path: Path) -> dict:
    """The file's scalar and string metadata (arrays of more than 64 items, the vocabulary, are
    left out: the tokenizer reads them itself)."""
    out = {}
    for key, field in reader.fields.items():
        if len(field.data) > 64:
            continue
        try:
            out[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: metadata key {key!r} is malformed ({e})") from None
    return out


def _vocab_size(reader: GGUFReader) -> int | None:
    field = reader.fields.get("tokenizer.ggml.tokens")
    return None if field is None else len(field.data)


def hf_config(meta: dict, tensors: set, vocab: int | None, path: Path) -> dict:
    """The HF config dict a GGUF file's metadata describes (for converters' tables)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture {arch!r} is not one dsjax converts "
                              f"from GGUF ({', '.join(ARCHITECTURES)})")
    missing = [f"{arch}.{k}" for k in _REQUIRED if f"{arch}.{k}" not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata key {missing[0]!r} is missing")
    model_type, cls = ARCHITECTURES[arch]
    hf = {"model_type": model_type, "architectures": [cls],
          "tie_word_embeddings": "output.weight" not in tensors}
    hf.update({field: meta[f"{arch}.{key}"] for key, field in _CONFIG_KEYS.items()
               if f"{arch}.{key}" in meta})
    hf.setdefault("vocab_size", vocab)
    if arch == "gemma":
        hf["hidden_activation"] = "gelu_pytorch_tanh"  # ggml's gelu is the tanh form
    hf.update({ours: meta[f"tokenizer.ggml.{key}"] for key, ours in _SPECIAL.items()
               if f"tokenizer.ggml.{key}" in meta})
    check_fields(hf, str(path))  # before _check_rope does arithmetic on them
    _check_rope(meta, arch, hf, tensors, path)
    if meta.get(f"{arch}.expert_count"):
        raise CheckpointError(f"{path}: a {arch} file with experts (MoE) is not supported")
    return hf


def _check_rope(meta: dict, arch: str, hf: dict, tensors: set, path: Path) -> None:
    """Rotary over whole heads, with no scaling or linear scaling (into hf). As llama.cpp reads
    them: a missing scaling type is "linear", its factor (or the older key rope.scale_linear)
    applies unless the type is "none", and a factor of 0 means none."""
    head_dim = _head_dim(hf)
    dims = meta.get(f"{arch}.rope.dimension_count")
    if dims is not None and dims != head_dim:
        raise CheckpointError(f"{path}: {arch}.rope.dimension_count={dims} rotates part of each "
                              f"{head_dim}-wide head, which dsjax's {arch} does not do")
    kind = meta.get(f"{arch}.rope.scaling.type", "linear")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 0.0))
    if kind == "linear" and factor not in (0, 1):
        hf["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif kind not in ("linear", "none"):
        raise CheckpointError(f"{path}: {arch}.rope.scaling.type={kind!r} is not supported "
                              "(none, linear)")
    if "rope_freqs.weight" in tensors and arch != "llama":
        raise CheckpointError(f"{path}: holds rope_freqs.weight (per-frequency rotary factors), "
                              f"which dsjax reads only for llama files")


def _head_dim(hf: dict) -> int:
    """Each attention head's width (fields checked by check_fields; head count required)."""
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def llama3_scaling(freqs: np.ndarray, meta: dict, path: Path) -> dict:
    """The HF rope_scaling that llama.cpp's converter wrote rope_freqs.weight from (Llama 3.1
    and later: each frequency divided by its factor). The file keeps the factors alone; their
    largest is the scaling factor, and the band edges are Llama 3's (low 1, high 4, an original
    context of 8192 unless the metadata says another): GGUFFile checks the factors they give."""
    key = "llama.rope.scaling.original_context_length"
    original = meta.get(key, 8192)
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise CheckpointError(f"{path}: {key} is {original!r}; expected a positive integer")
    return {"rope_type": "llama3", "factor": float(np.max(freqs)), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


def _unpermute(x: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation undone (transformers' reverse_permute_weights): rows
    [heads, 2, Dh/2] -> [heads, Dh/2, 2], whatever each row holds."""
    w = x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:])
    return w.swapaxes(2, 1).reshape(x.shape)


# ----------------------------------------------------------------------------- the source

class GGUFFile:
    """One GGUF file, checked when opened (see the module docstring)."""

    def __init__(self, path):
        self.path = Path(path).absolute()
        self.reader = open_reader(self.path)
        self.kinds = {t.name: t.tensor_type for t in self.reader.tensors}
        self._check_types()
        self._by_name = {t.name: t for t in self.reader.tensors}
        meta = metadata(self.reader, self.path)
        self.hf_config = hf = hf_config(meta, set(self.kinds), _vocab_size(self.reader), self.path)
        self.arch = meta["general.architecture"]
        freqs = self._rope_freqs()
        if freqs is not None and "rope_scaling" in hf:
            raise CheckpointError(f"{self.path}: holds rope_freqs.weight and a linear rope "
                                  "scaling factor; dsjax applies one or the other")
        if freqs is not None:
            hf["rope_scaling"] = llama3_scaling(freqs, meta, self.path)
        base = converters.policy_for(hf)
        self.config = build_config(base.make_config, hf, str(self.path))
        self._check_rope_freqs(freqs)
        self.policy = dataclasses.replace(base, prefix="", renames=TO_HF, prefix_for=None,
                                          ignore=base.ignore + (r"rope_freqs\.weight",))
        self.tensors = _Tensors({n: functools.partial(self._dense, n) for n in self.kinds},
                                {t.name: tuple(int(d) for d in reversed(t.shape))
                                 for t in self.reader.tensors}, str(self.path))
        self._check_missing()  # tied exactly when the file holds no output.weight: no untying
        self.rules, self.names = match(self.policy, self.config, self.tensors)
        self.stored_layout, self.dequantized = self._plan()
        self.tokenizer_dir = _tokenizer_dir(self.path)

    def _check_types(self) -> None:
        """Every tensor of a type dsjax reads: checked before any tensor data is read."""
        for name, kind in self.kinds.items():
            if not blocks.readable(kind):
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} is stored as {kind.name}, a GGUF type dsjax "
                    f"cannot read (it reads {', '.join(blocks.readable_names())})")

    def _rope_freqs(self) -> np.ndarray | None:
        """rope_freqs.weight (one factor per rotary frequency, the only tensor read while
        opening: its shape is checked first)."""
        if "rope_freqs.weight" not in self.kinds:
            return None
        t, half = self._by_name["rope_freqs.weight"], _head_dim(self.hf_config) // 2
        if [int(d) for d in t.shape] != [half]:
            raise CheckpointError(f"{self.path}: rope_freqs.weight has shape "
                                  f"{[int(d) for d in t.shape]}, not [{half}] (one factor per "
                                  "rotary frequency)")
        freqs = blocks.dense(self.kinds["rope_freqs.weight"], t.data).astype(np.float32)
        if freqs.ndim != 1 or not freqs.size or not np.all(np.isfinite(freqs) & (freqs > 0)):
            raise CheckpointError(f"{self.path}: rope_freqs.weight is not a vector of positive "
                                  "factors")
        return freqs

    def _check_rope_freqs(self, freqs: np.ndarray | None) -> None:
        """The Llama 3 scaling guessed from the factors gives exactly the file's factors."""
        if freqs is None:
            return
        plain = rope_inv_freq(dataclasses.replace(self.config, rope_scaling=None))
        ours = rope_inv_freq(self.config)
        if ours.shape != freqs.shape or not np.allclose(ours, plain / freqs, rtol=1e-5):
            raise CheckpointError(
                f"{self.path}: rope_freqs.weight holds rotary factors that no Llama 3 scaling "
                f"(factor {self.config.rope_scaling.factor:g}, low 1, high 4, original context "
                f"{self.config.rope_scaling.original_max_position}) gives; dsjax cannot run them")

    def _check_missing(self) -> None:
        """The tensors the family's table needs, named as GGUF names them."""
        needed = {s for r in expand(self.policy.make_rules(self.config), self.config.num_layers)
                  for s in r.sources}
        missing = sorted(needed - {_rename(n, TO_HF) for n in self.kinds})
        if missing:
            raise CheckpointError(
                f"{self.path}: {len(missing)} tensor(s) the {self.arch} architecture needs are "
                f"missing, e.g. {', '.join(repr(_rename(m, TO_GGUF)) for m in missing[:5])}")

    def _raw(self, name: str) -> np.ndarray:
        """A tensor's stored rows, Q and K of a llama file permuted back (rows whole)."""
        data = self._by_name[name].data
        hf = _rename(name, TO_HF)
        cfg = self.config
        if self.arch == "llama" and ".self_attn.q_proj." in hf:
            return _unpermute(data, cfg.num_heads)
        if self.arch == "llama" and ".self_attn.k_proj." in hf:
            return _unpermute(data, cfg.kv_heads)
        return data

    def _dense(self, name: str) -> np.ndarray:
        x = blocks.dense(self.kinds[name], self._raw(name))
        if self.arch == "gemma" and name.endswith("norm.weight"):
            x = x.astype(np.float32) - 1.0  # llama.cpp stores Gemma's RMSNorm scales + 1
        return x

    def _quantized(self, kind, names: list[str]):
        return blocks.quantized(kind, [self._raw(n) for n in names])

    def _plan(self) -> tuple[dict, dict]:
        """({param path: QuantSpec} of the weights kept quantized, {reason: [tensor names]} of
        those dequantized), from the tensor types alone; the kept ones are registered with the
        tensor source, which delivers them quantized."""
        layout, dequantized = {}, collections.defaultdict(list)
        for r in self.rules:
            names = [self.names[s] for s in r.sources]
            kinds = {self.kinds[n] for n in names}
            if kinds <= {Q.F32, Q.F16, Q.BF16}:
                continue
            why = self._why_dense(r, kinds, names)
            if why is None:
                kind = next(iter(kinds))
                self.tensors.kept[tuple(names)] = functools.partial(self._quantized, kind, names)
                bits, symmetric = blocks.MAPPED[kind]
                layout[r.target] = QuantSpec(bits=bits, group_size=blocks.GROUP,
                                             symmetric=symmetric,
                                             lm_head=r.target.endswith("lm_head.kernel"))
            else:
                dequantized[why] += [(re.sub(r"^blk\.\d+\.", "blk.*.", n), self.kinds[n].name)
                                     for n in names]
        return layout, {why: _counted(ns) for why, ns in dequantized.items()}

    def _why_dense(self, rule, kinds: set, names: list[str]) -> str | None:
        if not is_gemm(rule.target, lm_head=True) or rule.transform not in (TRANSPOSE,
                                                                            CONCAT_TRANSPOSED):
            return ("the embedding lookup reads a dense table" if "embed" in rule.target
                    else "not a GEMM weight")
        if len(kinds) > 1:
            return "fused with a tensor of another type"
        kind = next(iter(kinds))
        if kind not in blocks.MAPPED:
            return "no exact dsjax layout for this type"
        if not blocks.mappable(kind, self.tensors.shapes[names[0]][-1]):
            return "4-bit groups of 32 need K/2 divisible by 32"
        return None

    def announce(self, dtype) -> None:
        """The log line naming the tensors dequantized (and why), once per load."""
        if self.dequantized:
            log.info("dsjax: %s: dequantized exactly (to float32, then %s): %s", self.path.name,
                     jnp.dtype(dtype).name, "; ".join(f"{', '.join(ns)}: {why}"
                                                      for why, ns in self.dequantized.items()))


class _Tensors(TensorSource):
    """The file's tensors by name, dense when read; the kernels the plan keeps quantized come
    as QuantizedWeight through quantized_kernel (converters.policy.convert_rule asks it)."""

    def __init__(self, getters, shapes, origin):
        super().__init__(getters, shapes, origin)
        self.kept = {}  # (tensor names of one rule) -> () -> QuantizedWeight: filled by _plan

    def quantized_kernel(self, transform: str, names: list[str]):
        make = self.kept.get(tuple(names))
        return None if make is None else make()


def _counted(names: list[tuple[str, str]]) -> list[str]:
    """[(name with blk.* for the layer, type)] -> "name (type)", with " x n" for n layers."""
    counts = collections.Counter(names)
    return [f"{n} ({kind})" + (f" x {c}" if c > 1 else "") for (n, kind), c in counts.items()]


def _tokenizer_dir(path: Path) -> Path | None:
    """The file's tokenizer (and chat template) as transformers builds it from the metadata,
    saved to a directory that lives as long as the process; None, with a warning, when
    transformers cannot build it (token ids still work). AutoTokenizer picks the family's class
    from the config it reads from the file; for an architecture transformers reads no config of
    (Gemma), the generic fast tokenizer holds the same backend."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = Path(tempfile.mkdtemp(prefix="dsjax-gguf-tokenizer-"))
    atexit.register(shutil.rmtree, out, True)
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(**where)
        except ValueError as e:
            if "architecture" not in str(e):
                raise
            tokenizer = PreTrainedTokenizerFast.from_pretrained(**where)
        tokenizer.save_pretrained(out)
    except Exception as e:  # noqa: BLE001  the weights load without it
        log.warning("%s: transformers cannot build its tokenizer (%s: %s); pass token ids",
                    path, type(e).__name__, e)
        return None
    return out
