"""BERT: hidden states, pooled output, MLM and classification logits against HF transformers,
with a right-padded batch and token types; checkpoints (HF directory, legacy names, dsjax
round trip) and the errors an encoder raises."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dsjax
from dsjax import checkpoint
from tests.conftest import INIT, perturb, torch, transformers

TOL = dict(atol=1e-4, rtol=1e-4)
LENGTHS = [9, 6, 3]  # a right-padded batch of three rows


def bert(cls: str, seed: int = 0, **overrides):
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=40, type_vocab_size=3,
               initializer_range=INIT, num_labels=3)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return perturb(getattr(transformers, cls)(transformers.BertConfig(**cfg)), INIT)


def batch(vocab=64):
    """ids, attention_mask, token_type_ids: [3, 9], right-padded; two segments per row."""
    rng = np.random.default_rng(0)
    T = max(LENGTHS)
    mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    ids = rng.integers(0, vocab, (len(LENGTHS), T)) * mask
    types = ((np.arange(T)[None] >= np.array(LENGTHS)[:, None] // 2) * mask).astype(np.int64)
    types[0, 7:] = 2  # a third token type
    return ids, mask, types


def hf_run(model, ids, mask, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types), output_hidden_states=True)


@pytest.mark.parametrize("cls,overrides", [
    ("BertModel", {}),
    ("BertForMaskedLM", {}),
    ("BertForMaskedLM", {"tie_word_embeddings": False, "hidden_act": "gelu_new"}),
    ("BertForSequenceClassification", {}),
])
def test_matches_hf(cls, overrides):
    model = bert(cls, **overrides)
    if not model.config.tie_word_embeddings:  # HF's untied decoder reads its own bias
        torch.nn.init.normal_(model.cls.predictions.decoder.bias)
    engine = dsjax.init_inference(model, dtype="fp32", progress=False)
    ids, mask, types = batch()
    out = engine.embed(ids, mask, types)
    ref = hf_run(model, ids, mask, types)
    np.testing.assert_allclose(out.last_hidden_state, ref.hidden_states[-1].numpy(), **TOL)
    if cls == "BertForMaskedLM":
        assert out.pooler_output is None
        assert out.logits.shape == (3, 9, 64)
    else:
        base = model if cls == "BertModel" else model.bert
        pooled = hf_run(base, ids, mask, types).pooler_output.numpy()
        np.testing.assert_allclose(out.pooler_output, pooled, **TOL)
    if cls != "BertModel":
        np.testing.assert_allclose(out.logits, ref.logits.numpy(), **TOL)
        assert np.asarray(out.logits).std() > 0.1  # outputs that really vary
    else:
        assert out.logits is None


def test_ragged_lists_equal_the_padded_array():
    engine = dsjax.init_inference(bert("BertForSequenceClassification"), dtype="fp32", progress=False)
    ids, mask, types = batch()
    rows = [r[:n].tolist() for r, n in zip(ids, LENGTHS)]
    trows = [r[:n].tolist() for r, n in zip(types, LENGTHS)]
    ragged = engine.embed(rows, token_type_ids=trows)
    padded = engine.embed(ids, mask, types)
    np.testing.assert_array_equal(ragged.attention_mask, mask)
    np.testing.assert_allclose(ragged.logits, padded.logits, atol=1e-6)
    alone = engine.embed(rows[2], token_type_ids=trows[2])  # one row on its own
    np.testing.assert_allclose(alone.last_hidden_state[0], padded.last_hidden_state[2, :3], atol=1e-5)
    want = (np.asarray(padded.last_hidden_state) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(padded.mean_pooled(), want, atol=1e-5)


def test_hf_directory_with_legacy_names_and_pretraining_extras(tmp_path):
    model = bert("BertForMaskedLM")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in tensors.items()}
    legacy["bert.embeddings.position_ids"] = np.arange(40)[None]  # old buffer
    legacy["bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)  # what BertForPreTraining
    legacy["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)  # saved; HF drops them
    save_file(legacy, tmp_path / "model.safetensors")
    engine = dsjax.init_inference(tmp_path, dtype="fp32", progress=False)
    ids, mask, types = batch()
    np.testing.assert_allclose(engine.embed(ids, mask, types).logits,
                               hf_run(model, ids, mask, types).logits.numpy(), **TOL)


def test_convert_restore_round_trip(tmp_path):
    bert("BertForSequenceClassification").save_pretrained(tmp_path / "hf")
    out = dsjax.engine.convert_checkpoint(tmp_path / "hf", tmp_path / "ds", dtype="fp32", progress=False)
    assert checkpoint.is_checkpoint(out)
    assert json.loads((out / "dsjax.json").read_text())["model"]["encoder"]["head"] == "classifier"
    restored = dsjax.init_inference(out, dtype="fp32")
    direct = dsjax.init_inference(tmp_path / "hf", dtype="fp32", progress=False)
    assert restored.config == direct.config
    ids, mask, types = batch()
    a, b = restored.embed(ids, mask, types), direct.embed(ids, mask, types)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.pooler_output, b.pooler_output)


def test_random_weights_from_config():
    cfg = dsjax.init_inference(bert("BertForMaskedLM"), dtype="fp32", progress=False).config
    engine = dsjax.init_inference(cfg, dtype="fp32")
    assert engine.embed([[1, 2, 3]]).logits.shape == (1, 3, 64)


def test_encoder_errors():
    engine = dsjax.init_inference(bert("BertModel"), dtype="fp32", progress=False)
    with pytest.raises(TypeError, match="encoder.*engine.embed"):
        engine.generate([[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(TypeError, match="encoder.*engine.embed"):
        engine([[1, 2, 3]])
    with pytest.raises(TypeError, match="no image tower"):
        engine.embed_image(np.zeros((1, 3, 8, 8)))
    with pytest.raises(TypeError, match="both towers"):
        engine.clip_logits([[1]], np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="41 tokens exceed the 40 learned positions"):
        engine.embed([list(range(41))])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        engine.embed([[1, 64]])
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, 3\)"):
        engine.embed([[1, 2]], token_type_ids=[[0, 3]])
    with pytest.raises(ValueError, match="token_type_ids must have the shape"):
        engine.embed([[1, 2]], token_type_ids=[[0]])
    with pytest.raises(ValueError, match="attention_mask shape"):
        engine.embed(np.ones((2, 4), int), np.ones((2, 3), int))
    with pytest.raises(ValueError, match="at least one token"):
        engine.embed([[1], []])


def test_decoder_has_no_embed(gpt2_pair):
    with pytest.raises(TypeError, match="decoder: use generate"):
        gpt2_pair[1].embed([[1, 2]])


def test_unsupported_bert_options(tmp_path):
    from converters import CheckpointError

    model = bert("BertModel")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, value in [("is_decoder", True), ("position_embedding_type", "relative_key"),
                       ("architectures", ["BertForTokenClassification"])]:
        bad = dict(cfg, **{key: value})
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=key if key != "architectures" else "BertForToken"):
            dsjax.init_inference(tmp_path, progress=False)
