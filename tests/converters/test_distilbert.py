"""DistilBERT: hidden states, the classifier's pooled vector, MLM and classification logits
against HF transformers, with a right-padded batch; an HF checkpoint directory."""

import numpy as np
import pytest

import dsjax
from tests.conftest import INIT, perturb, torch, transformers

TOL = dict(atol=1e-4, rtol=1e-4)
LENGTHS = [8, 5, 2]


def distilbert(cls: str, seed: int = 0, **overrides):
    cfg = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
               max_position_embeddings=32, initializer_range=INIT, num_labels=4)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return perturb(getattr(transformers, cls)(transformers.DistilBertConfig(**cfg)), INIT)


def batch():
    T = max(LENGTHS)
    mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return np.random.default_rng(1).integers(1, 64, (len(LENGTHS), T)) * mask, mask


def hf_run(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     output_hidden_states=True)


@pytest.mark.parametrize("cls,overrides", [
    ("DistilBertModel", {}),
    ("DistilBertModel", {"sinusoidal_pos_embds": True, "activation": "relu"}),
    ("DistilBertForMaskedLM", {}),
    ("DistilBertForMaskedLM", {"tie_word_embeddings": False}),
    ("DistilBertForSequenceClassification", {}),
])
def test_matches_hf(cls, overrides):
    model = distilbert(cls, **overrides)
    engine = dsjax.init_inference(model, dtype="fp32", progress=False)
    ids, mask = batch()
    out = engine.embed(ids, mask)
    ref = hf_run(model, ids, mask)
    hidden = ref.hidden_states[-1].numpy()
    np.testing.assert_allclose(out.last_hidden_state, hidden, **TOL)
    if cls == "DistilBertForSequenceClassification":
        # pooler_output is the classifier's input: relu(pre_classifier(h[:, 0]))
        with torch.no_grad():
            pooled = torch.relu(model.pre_classifier(torch.tensor(hidden[:, 0]))).numpy()
        np.testing.assert_allclose(out.pooler_output, pooled, **TOL)
    else:
        assert out.pooler_output is None  # DistilBERT itself has no pooler
    if cls == "DistilBertModel":
        assert out.logits is None
    else:
        np.testing.assert_allclose(out.logits, ref.logits.numpy(), **TOL)
        assert np.asarray(out.logits).std() > 0.1


def test_from_hf_directory(tmp_path):
    model = distilbert("DistilBertForSequenceClassification")
    model.save_pretrained(tmp_path)
    engine = dsjax.init_inference(tmp_path, dtype="fp32", progress=False)
    assert engine.config.encoder.num_labels == 4
    ids, mask = batch()
    np.testing.assert_allclose(engine.embed(ids, mask).logits, hf_run(model, ids, mask).logits.numpy(),
                               **TOL)


def test_no_token_types():
    engine = dsjax.init_inference(distilbert("DistilBertModel"), dtype="fp32", progress=False)
    with pytest.raises(ValueError, match="no token types"):
        engine.embed([[1, 2]], token_type_ids=[[0, 1]])
    with pytest.raises(TypeError, match="encoder"):
        engine.generate([[1, 2]])
