"""Megatron-LM GPT checkpoints (the `model_optim_rng.pt` layout); tensor-parallel ranks merged.

Accepted directory layout (Megatron-LM's `save_checkpoint`, pipeline-parallel size 1):

    DIR/latest_checkpointed_iteration.txt            "NNN" or "release"
    DIR/iter_000NNNN/mp_rank_00/model_optim_rng.pt   (or DIR/release/mp_rank_00/...)
    DIR/iter_000NNNN/mp_rank_01/model_optim_rng.pt   one file per tensor-parallel rank

or without the tracker one iter_*/release folder, or the mp_rank_XX folders themselves. Each
file is a dict with `args` (argparse.Namespace), `checkpoint_version` and `model.language_model`:

    embedding.word_embeddings.weight       [Vp/tp, D]    vocab-parallel (Vp: the padded vocab)
    embedding.position_embeddings.weight   [P, D]        replicated
    encoder.* (older files: transformer.*, with `.attention.` for `.self_attention.`)
      layers.{i}.input_layernorm.{weight,bias}, layers.{i}.post_attention_layernorm.{...}
      layers.{i}.self_attention.query_key_value.{weight,bias}  [3 H Dh/tp, D]  column-parallel
      layers.{i}.self_attention.dense.weight       [D, H Dh/tp]  row-parallel (bias replicated)
      layers.{i}.mlp.dense_h_to_4h.{weight,bias}   [F/tp, D]     column-parallel
      layers.{i}.mlp.dense_4h_to_h.weight          [D, F/tp]     row-parallel (bias replicated)
      final_layernorm.{weight,bias}
    output_layer.weight                    [Vp/tp, D]    only with untied embeddings

Linear weights are [out, in]. From checkpoint_version 2 each rank's QKV rows are its own heads
in [H/tp, 3, Dh] order, so the ranks concatenated are [H, 3, Dh]; versions 0 and 1 ([3, H, Dh],
[H, Dh, 3]) are refused. The padded vocab rows are dropped; the true vocab size comes from the
caller (`MegatronCheckpoint(dir, vocab_size=N)`), else the args (NullTokenizer's `vocab_size`
+ 1 for its EOD, an explicit `vocab_size`, or 50257 for GPT2BPETokenizer); else loading fails.

The math is GPT-2's: learned positions, pre-LN LayerNorm, GELU (tanh approximation under the
default fused bias-GELU or --openai-gelu, else exact), biases, LM head tied to the word
embeddings unless --untie-embeddings-and-output-weights; args that change it (rotary, RMSNorm,
SwiGLU, GQA, ...) are refused by name. Files are untrusted: read with weights_only=True, allowing
only argparse.Namespace and numpy's arrays (Megatron's RNG state) beyond torch's tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import numpy as np

from converters.hf_config import build_config
from converters.loader import CheckpointError, TensorSource, load_pickled, regular_file, torch_to_numpy
from converters.policy import IDENTITY, TRANSPOSE, Policy, Rule, Transform, qkv_per_head
from dsjax.config import ModelConfig

log = logging.getLogger("dsjax.converters")

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d+)(_\d+)?")
_GPT2_BPE_VOCAB = 50257  # Megatron's GPT2BPETokenizer reads the fixed GPT-2 vocab file


@dataclasses.dataclass(frozen=True)
class MegatronCheckpoint:
    """A Megatron-LM checkpoint directory, plus the true vocab size where the args lack it."""

    path: str | Path
    vocab_size: int | None = None


def is_checkpoint(path) -> bool:
    path = Path(path)
    if not path.is_dir() or (path / "config.json").exists():
        return False
    return (path / TRACKER).exists() or bool(_rank_dirs(path)) or bool(_iteration_dirs(path))


def _rank_dirs(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and _RANK_DIR.fullmatch(d.name))


def _iteration_dirs(path: Path) -> list[Path]:
    return sorted(d for d in path.iterdir() if d.is_dir() and _rank_dirs(d)
                  and (d.name == "release" or re.fullmatch(r"iter_\d+", d.name)))


def _checkpoint_dir(path: Path) -> Path:
    """The folder holding the mp_rank_XX folders."""
    if _rank_dirs(path):
        return path
    tracker = path / TRACKER
    if tracker.exists():
        regular_file(tracker, "the iteration tracker", max_bytes=4096)
        text = tracker.read_bytes().decode("utf-8", errors="replace").strip()
        if text != "release" and not (text.isascii() and text.isdigit()):
            raise CheckpointError(f"{tracker}: holds neither an iteration number nor 'release'")
        found = path / (text if text == "release" else f"iter_{int(text):07d}")
        if not found.is_dir():
            raise CheckpointError(f"{tracker} names {found.name}, which is missing from {path}")
        return found
    found = _iteration_dirs(path)
    if len(found) != 1:
        raise CheckpointError(f"{path}: no {TRACKER} and {len(found)} iteration folders "
                              f"({', '.join(d.name for d in found) or 'none'}); pass one of them")
    return found[0]


def _rank_files(root: Path, tp: int | None) -> list[Path]:
    """mp_rank_00 .. mp_rank_{tp-1}/model_optim_rng.pt, each present, and no other ranks;
    tp None: rank 0's alone (its args give tp). Pipeline-parallel layouts are refused."""
    ranks = {}
    for d in _rank_dirs(root):
        m = _RANK_DIR.fullmatch(d.name)
        if m.group(2):
            raise CheckpointError(f"{root}: {d.name} is a pipeline-parallel rank; dsjax reads "
                                  "Megatron checkpoints saved with pipeline-parallel size 1")
        ranks[int(m.group(1))] = d / RANK_FILE
    want = range(tp or 1)
    extra = sorted(set(ranks) - set(want)) if tp else []
    if extra:
        raise CheckpointError(f"{root}: holds mp_rank_{extra[0]:02d}, more ranks than "
                              f"tensor_model_parallel_size={tp}")
    for r in want:
        if r not in ranks:
            raise CheckpointError(f"{root}: mp_rank_{r:02d} is missing"
                                  + (f" (tensor_model_parallel_size={tp})" if tp else ""))
        if not ranks[r].is_file():
            raise CheckpointError(f"{ranks[r]} is missing: every tensor-parallel rank is needed")
    return [ranks[r] for r in want]


def _allowed_globals() -> tuple:
    """What Megatron's files pickle beyond tensors: the args, and numpy's RNG state arrays."""
    import argparse

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
    return (argparse.Namespace, np.ndarray, np.dtype, np.dtypes.UInt32DType,
            *((_reconstruct, n) for n in names))  # numpy 1.x and 2.x spell it differently


def _read(path: Path) -> dict:
    state = load_pickled(path, _allowed_globals())
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _args(state: dict, path: Path) -> dict:
    version = state.get("checkpoint_version", 0)
    if not isinstance(version, (int, float)) or version < 2:
        raise CheckpointError(
            f"{path}: checkpoint_version {version!r} stores the fused QKV rows as [3, heads, dim] "
            "(0) or [heads, dim, 3] (1); dsjax reads version >= 2 ([heads, 3, dim]): re-save it "
            "with a current Megatron-LM")
    args = state.get("args")
    if not hasattr(args, "__dict__"):
        raise CheckpointError(f"{path}: no 'args' namespace; the architecture cannot be known")
    return dict(vars(args), checkpoint_version=float(version))


def _flatten(tree: dict, path: Path, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path, name + "."))
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            out[name] = value
        else:
            raise CheckpointError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor")
    return out


def _language_model(state: dict, path: Path) -> dict:
    """model.language_model flattened, with the older names Megatron itself renames on load."""
    model = state.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("language_model"), dict):
        raise CheckpointError(f"{path}: no model.language_model dict (Megatron-core and "
                              f"interleaved-pipeline checkpoints are not read yet); keys: "
                              f"{sorted(model) if isinstance(model, dict) else type(model).__name__}")
    flat, old = _flatten(model["language_model"], path), "transformer."
    return {("encoder." + n[len(old):].replace(".attention.", ".self_attention.")
             if n.startswith(old) else n): t for n, t in flat.items()}


# How Megatron splits each tensor over the ranks: the axis the rank files are concatenated on.
_SPLITS = (
    (re.compile(r"embedding\.word_embeddings\.weight|output_layer\.weight"), 0),  # vocab-parallel
    (re.compile(r".*\.(query_key_value|dense_h_to_4h)\.(weight|bias)"), 0),  # column-parallel
    (re.compile(r".*\.(self_attention\.dense|dense_4h_to_h)\.weight"), 1),  # row-parallel
)


def _split_axis(name: str) -> int | None:
    return next((axis for pattern, axis in _SPLITS if pattern.fullmatch(name)), None)


def merge_ranks(ranks: list[dict], origin: str) -> TensorSource:
    """Rank state dicts -> one lazy TensorSource of the unsplit tensors."""
    names = list(ranks[0])
    getters, shapes = {}, {}
    for r, tensors in enumerate(ranks[1:], 1):
        if set(tensors) != set(names):
            raise CheckpointError(f"{origin}: mp_rank_{r:02d} and mp_rank_00 hold different tensors: "
                                  f"{sorted(set(tensors) ^ set(names))[:5]}")
    for name in names:
        parts, axis = [t[name] for t in ranks], _split_axis(name)
        shape = tuple(parts[0].shape)
        if any(tuple(p.shape) != shape for p in parts):  # Megatron splits evenly
            raise CheckpointError(f"{origin}: ranks disagree on the shape of {name!r}: " + ", ".join(
                f"mp_rank_{r:02d} has {tuple(p.shape)}" for r, p in enumerate(parts)))
        if axis is None or len(parts) == 1:
            getters[name], shapes[name] = (lambda p=parts[0]: torch_to_numpy(p)), shape
        else:
            getters[name] = lambda ps=parts, a=axis: np.concatenate([torch_to_numpy(p) for p in ps], a)
            shapes[name] = shape[:axis] + (shape[axis] * len(parts),) + shape[axis + 1:]
    return TensorSource(getters, shapes, origin)


def true_vocab_size(args: dict, rows: int, given: int | None, origin: str) -> int:
    """The vocab without Megatron's padding rows, checked against the rows the ranks hold."""
    if args.get("padded_vocab_size") not in (None, rows):
        raise CheckpointError(f"{origin}: the ranks hold {rows} word-embedding rows but "
                              f"args.padded_vocab_size is {args['padded_vocab_size']}")
    tokenizer = args.get("tokenizer_type")
    if given is not None:
        vocab, source = int(given), "vocab_size passed by the caller"
    elif tokenizer == "NullTokenizer" and args.get("vocab_size"):
        vocab, source = int(args["vocab_size"]) + 1, "args.vocab_size + 1 (NullTokenizer's EOD)"
    elif args.get("vocab_size"):
        vocab, source = int(args["vocab_size"]), "args.vocab_size"
    elif tokenizer == "GPT2BPETokenizer":
        vocab, source = _GPT2_BPE_VOCAB, "GPT2BPETokenizer's vocab"
    else:
        raise CheckpointError(
            f"{origin}: the true vocab size is not recorded (tokenizer_type {tokenizer!r}, "
            f"{rows} embedding rows with Megatron's padding); pass it: dsjax.init_inference("
            "converters.MegatronCheckpoint(DIR, vocab_size=N))")
    if not 0 < vocab <= rows:
        raise CheckpointError(f"{origin}: vocab size {vocab} ({source}) does not fit the {rows} "
                              "word-embedding rows of the checkpoint")
    multiple = ((args.get("make_vocab_size_divisible_by") or 1)
                * (args.get("tensor_model_parallel_size") or 1))
    if math.ceil(vocab / multiple) * multiple != rows and given is None:
        raise CheckpointError(
            f"{origin}: vocab size {vocab} ({source}) does not pad to the checkpoint's {rows} rows "
            f"by Megatron's rule (multiple of {multiple}); if it is right, pass it explicitly: "
            "converters.MegatronCheckpoint(DIR, vocab_size=N)")
    return vocab


_UNSUPPORTED = {  # Megatron args that move the math away from GPT-2's, and when they do
    "position_embedding_type": lambda v: v not in (None, "learned_absolute"),
    "use_rotary_position_embeddings": bool, "add_position_embedding": lambda v: v is False,
    "normalization": lambda v: v not in (None, "LayerNorm"), "apply_layernorm_1p": bool,
    "apply_residual_connection_post_layernorm": bool, "qk_layernorm": bool,
    "swiglu": bool, "squared_relu": bool, "add_bias_linear": lambda v: v is False,
    "group_query_attention": bool, "num_experts": lambda v: v not in (None, 0, 1),
    "pipeline_model_parallel_size": lambda v: v not in (None, 1),
}


def _check_args(args: dict) -> None:
    for key, bad in _UNSUPPORTED.items():
        if bad(args.get(key)):
            raise CheckpointError(f"Megatron arg {key}={args[key]!r} is not supported by dsjax")


def make_config(meta: dict) -> ModelConfig:
    """meta: open_checkpoint's dict, the rank-0 args plus the resolved true vocab_size."""
    args = meta["args"]
    _check_args(args)
    D, H, kv = args["hidden_size"], args["num_attention_heads"], args.get("kv_channels")
    fused = args.get("bias_gelu_fusion", False) and not args.get("onnx_safe")  # tanh bias-GELU
    return ModelConfig(
        family="megatron_gpt", vocab_size=meta["vocab_size"], hidden_size=D,
        num_layers=args["num_layers"], num_heads=H,
        head_dim=kv if kv and kv * H != D else None,  # attention width from --kv-channels
        intermediate_size=args.get("ffn_hidden_size") or 4 * D,
        max_position_embeddings=args["max_position_embeddings"], positions="learned",
        norm="layernorm", norm_eps=args.get("layernorm_epsilon", args.get("norm_epsilon", 1e-5)),
        activation="gelu_tanh" if args.get("openai_gelu") or fused else "gelu",
        tie_word_embeddings=not args.get("untie_embeddings_and_output_weights", False))


def trim_rows(vocab: int, then: Transform = IDENTITY) -> Transform:
    """[Vp, D] vocab-parallel rows -> the first `vocab` rows (Megatron's padding dropped)."""
    return Transform(f"trim_rows({vocab}) + {then.name}", lambda x: then.apply(x[:vocab]),
                     lambda s: then.shape((vocab,) + tuple(s[1:])) if s[0] >= vocab else None)


def make_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    layer, meg = "layers.{i}.", "encoder.layers.{i}."
    qkv = qkv_per_head(cfg.num_heads)
    rules = [
        Rule("embed.embedding", ("embedding.word_embeddings.weight",), trim_rows(cfg.vocab_size)),
        Rule("pos_embed.embedding", ("embedding.position_embeddings.weight",)),
        Rule("final_norm.scale", ("encoder.final_layernorm.weight",)),
        Rule("final_norm.bias", ("encoder.final_layernorm.bias",)),
        Rule(layer + "attn.qkv.kernel", (meg + "self_attention.query_key_value.weight",), qkv),
        Rule(layer + "attn.qkv.bias", (meg + "self_attention.query_key_value.bias",), qkv),
    ]
    for ours, theirs in [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]:
        rules += [Rule(f"{layer}{ours}.scale", (f"{meg}{theirs}.weight",)),
                  Rule(f"{layer}{ours}.bias", (f"{meg}{theirs}.bias",))]
    for ours, theirs in [("attn.out", "self_attention.dense"), ("mlp.up", "mlp.dense_h_to_4h"),
                         ("mlp.down", "mlp.dense_4h_to_h")]:
        rules += [Rule(f"{layer}{ours}.kernel", (f"{meg}{theirs}.weight",), TRANSPOSE),
                  Rule(f"{layer}{ours}.bias", (f"{meg}{theirs}.bias",))]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.kernel", ("output_layer.weight",),
                          trim_rows(cfg.vocab_size, TRANSPOSE)))
    return tuple(rules)


POLICY = Policy(
    name="megatron_gpt",
    model_types=(),  # never picked by an HF model_type: open_checkpoint selects it
    architectures=(),
    prefix="",
    make_config=make_config,
    make_rules=make_rules,
)


def open_checkpoint(model) -> tuple[dict, ModelConfig, Policy, TensorSource]:
    """A Megatron checkpoint directory (or MegatronCheckpoint) -> (meta, config, policy,
    tensors), with every rank file present and every rank's shapes checked; no weight read."""
    ckpt = model if isinstance(model, MegatronCheckpoint) else MegatronCheckpoint(model)
    root = _checkpoint_dir(Path(ckpt.path))
    origin = str(root)
    first = _rank_files(root, None)[0]
    state0 = _read(first)
    args = _args(state0, first)
    _check_args(args)  # before the vocab size is asked for
    files = _rank_files(root, int(args.get("tensor_model_parallel_size") or 1))
    states = [state0] + [_read(f) for f in files[1:]]
    for f, s in zip(files[1:], states[1:]):
        _args(s, f)  # every rank's version is checked
    tensors = merge_ranks([_language_model(s, f) for f, s in zip(files, states)], origin)
    rows_name = "embedding.word_embeddings.weight"
    if rows_name not in tensors.shapes:
        raise CheckpointError(f"{origin}: no {rows_name!r} among the language model's tensors")
    vocab = true_vocab_size(args, tensors.shapes[rows_name][0], ckpt.vocab_size, origin)
    meta = {"model_type": "megatron_gpt", "vocab_size": vocab, "args": args,
            "eos_token_id": None, "pad_token_id": None}
    log.info("megatron: %s, %d tensor-parallel rank(s) merged, vocab %d", origin, len(files), vocab)
    return meta, build_config(POLICY.make_config, meta, f"{first}: args"), POLICY, tensors
