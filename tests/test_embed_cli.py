"""`dsjax embed`: encoder checkpoints with their own tokenizer, against HF transformers."""

import numpy as np
import pytest

from dsjax import cli
from tests.conftest import INIT, gpt2_model, torch, transformers

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "deep", "speed", "on",
         "the", "gpu", "a", "photo", "of", "cat"]
TEXTS = ["hello world", "deep speed on the gpu"]


def _tokenizer(directory, first: str, last: str):
    """A word-level tokenizer that wraps each text in first ... last (BERT's [CLS] ... [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", special_tokens=[(first, vocab[first]), (last, vocab[last])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fast.save_pretrained(directory)
    return fast


def _bert(cls):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, initializer_range=INIT, num_labels=3)
    return getattr(transformers, cls)(cfg).eval()


def _hf(model, tok, text):
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc)


def test_bert_classifier_pooled_vectors_match_hf(tmp_path, capsys):
    model = _bert("BertForSequenceClassification")
    model.save_pretrained(tmp_path / "hf")
    tok = _tokenizer(tmp_path / "hf", "[CLS]", "[SEP]")
    args = ["-q", "embed", "--text", TEXTS[0], "--text", TEXTS[1], "--show", "0"]
    assert cli.main(args + ["--model", str(tmp_path / "hf"), "--save", str(tmp_path / "a.npz")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("[0] 'hello world': hidden [4, 32]; pooler_output [32] norm")
    assert "[1] 'deep speed on the gpu': hidden [7, 32]" in text
    assert text.count("classifier logits:") == 2
    saved = np.load(tmp_path / "a.npz")["text"]
    for i, t in enumerate(TEXTS):
        with torch.no_grad():
            pooled = model.bert(**tok(t, return_tensors="pt")).pooler_output[0].numpy()
        np.testing.assert_allclose(saved[i], pooled, atol=1e-4, rtol=1e-4)
        logits = _hf(model, tok, t).logits[0].numpy()
        assert "classifier logits: " + " ".join(f"{x:.4f}" for x in logits) in text
    # the same from a dsjax checkpoint, which carries the tokenizer along
    assert cli.main(["-q", "convert", str(tmp_path / "hf"), str(tmp_path / "ds"), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--model", str(tmp_path / "ds")]) == 0
    assert capsys.readouterr().out == text.rsplit("wrote", 1)[0]


def test_bert_mlm_prints_argmax_tokens(tmp_path, capsys):
    model = _bert("BertForMaskedLM")
    model.save_pretrained(tmp_path)
    tok = _tokenizer(tmp_path, "[CLS]", "[SEP]")
    assert cli.main(["-q", "embed", "--model", str(tmp_path), "--text", TEXTS[1]]) == 0
    out = capsys.readouterr().out
    assert "mean of hidden states [32]" in out  # no pooler in BertForMaskedLM: auto -> mean
    best = _hf(model, tok, TEXTS[1]).logits[0].argmax(-1).tolist()
    assert "mlm argmax per token: " + " ".join(WORDS[i] for i in best) in out


def test_clip_texts_and_image(tmp_path, capsys):
    torch.manual_seed(0)
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                initializer_range=INIT)
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                  image_size=16, patch_size=8, initializer_range=INIT)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=8)).eval()
    model.save_pretrained(tmp_path / "hf")
    tok = _tokenizer(tmp_path / "hf", "[CLS]", "[SEP]")  # BOS = [CLS] (2), EOS = [SEP] (3)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "img.npy", pixels)
    texts = ["a photo of a cat", "a photo of the gpu"]
    assert cli.main(["-q", "embed", "--model", str(tmp_path / "hf"), "--text", texts[0], "--text",
                     texts[1], "--image", str(tmp_path / "img.npy"), "--save", str(tmp_path / "o.npz")]) == 0
    out = capsys.readouterr().out
    assert "[image 1] hidden [5, 24]; projected embeds [8]" in out
    assert "logits_per_image (rows: images, columns: texts" in out
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=torch.tensor(pixels))
    saved = np.load(tmp_path / "o.npz")
    np.testing.assert_allclose(saved["logits_per_image"], ref.logits_per_image.numpy(), atol=1e-4)
    assert saved["text"].shape == (2, 8) and saved["image"].shape == (2, 8)


def test_bad_requests_exit_with_a_message(tmp_path, capsys):
    _bert("BertModel").save_pretrained(tmp_path / "bert")
    _tokenizer(tmp_path / "bert", "[CLS]", "[SEP]")
    gpt2_model().save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # save_pretrained's progress bar
    for argv, message in [
            (["--model", str(tmp_path / "gpt2"), "--text", "hi"], "decoder; use dsjax generate"),
            (["--model", str(tmp_path / "bert"), "--image", "x.npy"], "has no image tower"),
            (["--model", str(tmp_path / "bert"), "--text", " ".join(["hello"] * 32)],
             "34 tokens exceed the 32 learned positions"),
            (["--model", str(tmp_path / "bert")], "at least one --text or --image")]:
        assert cli.main(["-q", "embed", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dsjax embed: ") and message in err and err.count("\n") == 1
