"""Megatron-LM GPT checkpoints, written here in Megatron's layout from HF GPT-2 weights (one and
two tensor-parallel rank files), against HF transformers' own logits and greedy tokens."""

import argparse
import fractions
import random
import shutil

import numpy as np
import pytest
import torch

import dsjax
from converters import CheckpointError, MegatronCheckpoint
from dsjax import cli
from tests.conftest import gpt2_model, hf_greedy, hf_logits, prompt

COLUMN, ROW = 0, 1  # the axis Megatron splits a tensor on over the ranks; None: replicated
ITER = "iter_0000010"


def megatron_tensors(model, tp: int) -> tuple[dict, int]:
    """HF GPT-2 weights under Megatron's names and layouts, unsplit: {name: (tensor, axis)}.

    GPT-2's Conv1D weights are [in, out], Megatron's Linear [out, in]; GPT-2's c_attn outputs are
    [q | k | v] (each heads-contiguous), Megatron's QKV rows [heads, 3, head_dim]. gpt2_model's
    weights are perturbed, biases and norm scales included, so a misplaced or misordered tensor
    (the QKV bias not reordered per head, two norms swapped) changes the logits."""
    sd, c = model.state_dict(), model.config
    H, D, V = c.n_head, c.n_embd, c.vocab_size
    qkv = lambda x: x.reshape(3, H, D // H, *x.shape[1:]).transpose(0, 1).reshape(x.shape)  # noqa: E731
    padded = -(-V // (128 * tp)) * (128 * tp)  # --make-vocab-size-divisible-by 128, times tp
    pad_rows = lambda w: torch.cat([w, torch.randn(padded - V, D)])  # noqa: E731  junk rows
    out = {"embedding.word_embeddings.weight": (pad_rows(sd["transformer.wte.weight"]), COLUMN),
           "embedding.position_embeddings.weight": (sd["transformer.wpe.weight"], None)}
    for p in ("weight", "bias"):
        out[f"encoder.final_layernorm.{p}"] = (sd[f"transformer.ln_f.{p}"], None)
    for i in range(c.n_layer):
        h, m = f"transformer.h.{i}.", f"encoder.layers.{i}."
        for theirs, ours in [("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")]:
            for p in ("weight", "bias"):
                out[f"{m}{ours}.{p}"] = (sd[f"{h}{theirs}.{p}"], None)
        out[m + "self_attention.query_key_value.weight"] = (qkv(sd[h + "attn.c_attn.weight"].T), COLUMN)
        out[m + "self_attention.query_key_value.bias"] = (qkv(sd[h + "attn.c_attn.bias"]), COLUMN)
        out[m + "mlp.dense_h_to_4h.weight"] = (sd[h + "mlp.c_fc.weight"].T, COLUMN)
        out[m + "mlp.dense_h_to_4h.bias"] = (sd[h + "mlp.c_fc.bias"], COLUMN)
        for theirs, ours in [("attn.c_proj", "self_attention.dense"),
                             ("mlp.c_proj", "mlp.dense_4h_to_h")]:
            out[f"{m}{ours}.weight"] = (sd[f"{h}{theirs}.weight"].T, ROW)
            out[f"{m}{ours}.bias"] = (sd[f"{h}{theirs}.bias"], None)
    if not c.tie_word_embeddings:
        out["output_layer.weight"] = (pad_rows(sd["lm_head.weight"]), COLUMN)
    return out, padded


def megatron_args(model, tp: int, padded: int, **overrides) -> argparse.Namespace:
    c = model.config
    args = dict(num_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
                ffn_hidden_size=c.n_inner or 4 * c.n_embd, kv_channels=c.n_embd // c.n_head,
                max_position_embeddings=c.n_positions, layernorm_epsilon=c.layer_norm_epsilon,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                make_vocab_size_divisible_by=128, padded_vocab_size=padded,
                tokenizer_type="NullTokenizer", vocab_size=c.vocab_size - 1,  # + its EOD token
                bias_gelu_fusion=True, openai_gelu=False, onnx_safe=None, swiglu=False,
                untie_embeddings_and_output_weights=not c.tie_word_embeddings,
                position_embedding_type="learned_absolute", add_bias_linear=True,
                apply_query_key_layer_scaling=True, params_dtype=torch.float32)
    args.update(overrides)
    return argparse.Namespace(**args)


def _language_model(flat: dict, legacy: bool) -> dict:
    """Megatron's nesting; legacy files name the stack 'transformer' and use '.attention.'."""
    lm = {"embedding": {
        "word_embeddings": {"weight": flat.pop("embedding.word_embeddings.weight")},
        "position_embeddings": {"weight": flat.pop("embedding.position_embeddings.weight")}}}
    if "output_layer.weight" in flat:
        lm["output_layer"] = {"weight": flat.pop("output_layer.weight")}
    rename = (lambda k: k.replace(".self_attention.", ".attention.")) if legacy else (lambda k: k)
    lm["transformer" if legacy else "encoder"] = {rename(k.removeprefix("encoder.")): v
                                                  for k, v in flat.items()}
    return lm


def write_megatron(directory, model, tp=1, *, layout="iteration", version=3.0, edit=None,
                   torch_dtype=torch.float32, **args):
    """Rank files as Megatron-LM's save_checkpoint writes them. layout: 'iteration' (tracker
    file + iter_ folder), 'ranks' (mp_rank_XX folders directly) or 'legacy' (ranks, old names)."""
    tensors, padded = megatron_tensors(model, tp)
    namespace = megatron_args(model, tp, padded, **args)
    root = directory / ITER if layout == "iteration" else directory
    for r in range(tp):
        flat = {n: (t if axis is None else t.chunk(tp, axis)[r]).clone().to(torch_dtype)
                for n, (t, axis) in tensors.items()}
        state = {"args": namespace, "iteration": 10,
                 "model": {"language_model": _language_model(flat, layout == "legacy")},
                 "rng_state": [{"random_rng_state": random.getstate(),
                                "np_rng_state": np.random.get_state(),
                                "torch_rng_state": torch.get_rng_state()}]}
        if version is not None:
            state["checkpoint_version"] = version
        if edit:
            edit(r, state)
        (root / f"mp_rank_{r:02d}").mkdir(parents=True)
        torch.save(state, root / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    if layout == "iteration":
        (directory / "latest_checkpointed_iteration.txt").write_text("10")
    return directory


def _load(path, **kw):
    return dsjax.init_inference(path, dtype="fp32", max_out_tokens=64, progress=False, **kw)


def _assert_logits_match(engine, model):
    ids = [prompt(1, 20), prompt(2, 20)]
    np.testing.assert_allclose(np.asarray(engine(ids)), hf_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp,layout", [(1, "iteration"), (2, "iteration"), (2, "legacy"), (4, "ranks")])
def test_logits_and_greedy_tokens_match_hf(tmp_path, tp, layout):
    model = gpt2_model()
    engine = _load(write_megatron(tmp_path, model, tp, layout=layout))
    assert (engine.config.family, engine.config.vocab_size) == ("megatron_gpt", 96)
    _assert_logits_match(engine, model)
    p = prompt(3, 5)
    ours = engine.generate([p], max_new_tokens=32, eos_token_id=[]).sequences[0]
    assert ours == hf_greedy(model, p, 32)
    assert len(set(ours)) > 4  # the reference really varies


def test_exact_gelu_untied_head_and_ffn_width(tmp_path):
    model = gpt2_model(activation_function="gelu", tie_word_embeddings=False, n_inner=48)
    engine = _load(write_megatron(tmp_path, model, 2, bias_gelu_fusion=False))
    assert engine.config.activation == "gelu" and not engine.config.tie_word_embeddings
    _assert_logits_match(engine, model)


def test_bf16_rank_files(tmp_path):
    model = gpt2_model()
    write_megatron(tmp_path, model, 2, torch_dtype=torch.bfloat16)
    _assert_logits_match(_load(tmp_path), model.to(torch.bfloat16).float())  # same rounded weights


def test_vocab_size_from_the_caller(tmp_path):
    model = gpt2_model()
    write_megatron(tmp_path, model, 2, tokenizer_type="HuggingFaceTokenizer", vocab_size=None)
    with pytest.raises(CheckpointError, match="true vocab size is not recorded.*vocab_size=N"):
        _load(tmp_path)
    _assert_logits_match(_load(MegatronCheckpoint(tmp_path, vocab_size=96)), model)
    with pytest.raises(CheckpointError, match="vocab size 300 .* does not fit the 256"):
        _load(MegatronCheckpoint(tmp_path, vocab_size=300))


def test_cli_convert(tmp_path, capsys):
    model = gpt2_model()
    write_megatron(tmp_path / "megatron", model, 2)
    assert cli.main(["-q", "convert", str(tmp_path / "megatron"), str(tmp_path / "ds"),
                     "--dtype", "fp32"]) == 0
    assert "wrote dsjax checkpoint" in capsys.readouterr().out
    _assert_logits_match(_load(tmp_path / "ds"), model)


# ----------------------------------------------------------------------------- errors

@pytest.fixture()
def tp2_dir(tmp_path):
    return write_megatron(tmp_path, gpt2_model(), 2)


def test_missing_rank_file(tp2_dir):
    (tp2_dir / ITER / "mp_rank_01" / "model_optim_rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_optim_rng\.pt is missing"):
        _load(tp2_dir)


def test_missing_rank_folder(tp2_dir):
    shutil.rmtree(tp2_dir / ITER / "mp_rank_01")
    with pytest.raises(CheckpointError, match=r"mp_rank_01 is missing \(tensor_model_parallel_size=2\)"):
        _load(tp2_dir)


def test_tracker_names_a_missing_iteration(tp2_dir):
    (tp2_dir / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(CheckpointError, match="names iter_0000020, which is missing"):
        _load(tp2_dir)


@pytest.mark.parametrize("version", [1.0, 0, None])
def test_old_checkpoint_version_is_refused(tmp_path, version):
    write_megatron(tmp_path, gpt2_model(), 1, version=version)
    with pytest.raises(CheckpointError, match=r"checkpoint_version (1\.0|0) .*dsjax reads version >= 2"):
        _load(tmp_path)


def test_ranks_disagree_on_shapes(tmp_path):
    def edit(rank, state):
        if rank == 1:
            stack = state["model"]["language_model"]["encoder"]
            stack["layers.1.mlp.dense_4h_to_h.weight"] = torch.zeros(32, 63)

    write_megatron(tmp_path, gpt2_model(), 2, edit=edit)
    with pytest.raises(CheckpointError, match=r"ranks disagree on the shape of "
                       r"'encoder\.layers\.1\.mlp\.dense_4h_to_h\.weight'.*\(32, 64\).*\(32, 63\)"):
        _load(tmp_path)


@pytest.mark.parametrize("change,match", [
    (lambda stack: stack.pop("layers.0.mlp.dense_h_to_4h.bias"),
     r"missing.*'encoder\.layers\.0\.mlp\.dense_h_to_4h\.bias'"),
    (lambda stack: stack.update({"layers.0.mlp.extra.weight": torch.zeros(2, 2)}),
     r"does not know.*'encoder\.layers\.0\.mlp\.extra\.weight'"),
])
def test_missing_and_unexpected_tensors(tmp_path, change, match):
    write_megatron(tmp_path, gpt2_model(), 2,
                   edit=lambda r, state: change(state["model"]["language_model"]["encoder"]))
    with pytest.raises(CheckpointError, match=match):
        _load(tmp_path)


def test_padded_vocab_disagrees_with_the_rows(tmp_path):
    write_megatron(tmp_path, gpt2_model(), 2, padded_vocab_size=128)
    with pytest.raises(CheckpointError, match="hold 256 word-embedding rows but args.padded_vocab_size is 128"):
        _load(tmp_path)


def test_unsupported_arg_is_named(tmp_path):
    write_megatron(tmp_path, gpt2_model(), 1, swiglu=True)
    with pytest.raises(CheckpointError, match="Megatron arg swiglu=True is not supported"):
        _load(tmp_path)


def test_unknown_pickled_class_is_refused(tmp_path):
    write_megatron(tmp_path, gpt2_model(), 1, edit=lambda r, s: s.update(extra=fractions.Fraction(1, 3)))
    with pytest.raises(CheckpointError, match="weights_only=True .*GLOBAL fractions.Fraction"):
        _load(tmp_path)
