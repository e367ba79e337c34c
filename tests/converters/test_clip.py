"""CLIP: text and image towers, their projections and logits_per_image against HF transformers
(padded text, both EOS pooling rules, random pixels); one-tower classes in every name layout;
a dsjax checkpoint round trip; bad images."""

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dsjax
from tests.conftest import INIT, perturb, torch, transformers

TOL = dict(atol=1e-4, rtol=1e-4)
BOS, EOS = 48, 49
# image 18 px with 4 px patches: 16 patches, the last 2 pixel rows/columns dropped by the conv
TEXT = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=12, bos_token_id=BOS, eos_token_id=EOS,
            pad_token_id=0, initializer_range=INIT)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
              image_size=18, patch_size=4, initializer_range=INIT)


def clip(seed=0, eos=EOS, projection_dim=16):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=eos), vision_config=VISION,
                                  projection_dim=projection_dim)
    model = perturb(transformers.CLIPModel(cfg), INIT)
    with torch.no_grad():
        model.logit_scale.fill_(1.3)  # not the init value, so that it is really read
    return model


def texts():
    """ids, mask [3, 8], right-padded. Row 1 has no EOS and its largest id mid-row (the two
    pooling rules differ there); row 2 holds a second EOS (pooled at the first)."""
    rows = [[BOS, 5, 6, 7, 8, 9, EOS], [5, 30, 47, 6], [BOS, 11, EOS, 12, EOS]]
    ids = np.zeros((3, 8), np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return ids, (ids != 0).astype(np.int64)


def pixels(n=2):
    return np.random.default_rng(3).normal(size=(n, 3, 18, 18)).astype(np.float32)


@pytest.mark.parametrize("eos", [EOS, 2])  # 2: HF's legacy rule, pooled at the largest id
def test_clip_model_matches_hf(eos):
    model = clip(eos=eos)
    engine = dsjax.init_inference(model, dtype="fp32", progress=False)
    ids, mask = texts()
    px = pixels()
    t_ids, t_mask, t_px = torch.tensor(ids), torch.tensor(mask), torch.tensor(px)
    with torch.no_grad():
        ref = model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_px)
        text_ref = model.text_model(input_ids=t_ids, attention_mask=t_mask)
        image_ref = model.vision_model(pixel_values=t_px)
        text_feat = model.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output
        image_feat = model.get_image_features(pixel_values=t_px).pooler_output
    out = engine.clip_logits(ids, px, mask)
    np.testing.assert_allclose(out.logits_per_image, ref.logits_per_image.numpy(), **TOL)
    np.testing.assert_allclose(out.logits_per_text, ref.logits_per_text.numpy(), **TOL)
    np.testing.assert_allclose(out.text_embeds, ref.text_embeds.numpy(), **TOL)
    np.testing.assert_allclose(out.image_embeds, ref.image_embeds.numpy(), **TOL)
    assert np.ptp(np.asarray(out.logits_per_image)) > 0.1
    text = engine.embed_text(ids, mask)
    np.testing.assert_allclose(text.last_hidden_state, text_ref.last_hidden_state.numpy(), **TOL)
    np.testing.assert_allclose(text.pooler_output, text_ref.pooler_output.numpy(), **TOL)
    np.testing.assert_allclose(text.embeds, text_feat.numpy(), **TOL)
    image = engine.embed_image(px)
    assert image.last_hidden_state.shape == (2, 17, 24)
    np.testing.assert_allclose(image.last_hidden_state, image_ref.last_hidden_state.numpy(), **TOL)
    np.testing.assert_allclose(image.pooler_output, image_ref.pooler_output.numpy(), **TOL)
    np.testing.assert_allclose(image.embeds, image_feat.numpy(), **TOL)


def test_pooling_rules():
    cfg = dsjax.init_inference(clip(), dtype="fp32", progress=False).config
    legacy = dsjax.init_inference(clip(eos=2), dtype="fp32", progress=False).config
    ids = [np.array([BOS, 5, EOS, 7, EOS, 0]), np.array([3, 4, 1])]  # second row has no EOS
    assert dsjax.encoders.pool_index(cfg, ids).tolist() == [2, 0]
    assert dsjax.encoders.pool_index(legacy, ids).tolist() == [2, 1]  # the first largest id


def _tower(cls, config):
    torch.manual_seed(1)
    return perturb(getattr(transformers, cls)(config), INIT)


@pytest.mark.parametrize("cls", ["CLIPTextModel", "CLIPTextModelWithProjection"])
@pytest.mark.parametrize("layout", ["memory", "directory", "prefixed"])
def test_text_tower_alone(tmp_path, cls, layout):
    model = _tower(cls, transformers.CLIPTextConfig(**TEXT, projection_dim=8))
    engine = dsjax.init_inference(_source(model, tmp_path, layout, "text_model."), dtype="fp32",
                                  progress=False)
    ids, mask = texts()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = engine.embed(ids, mask)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), **TOL)
    if cls == "CLIPTextModel":
        np.testing.assert_allclose(out.pooler_output, ref.pooler_output.numpy(), **TOL)
        assert out.embeds is None
    else:
        np.testing.assert_allclose(out.embeds, ref.text_embeds.numpy(), **TOL)
    with pytest.raises(TypeError, match="no image tower"):
        engine.embed_image(pixels())


@pytest.mark.parametrize("cls", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
@pytest.mark.parametrize("layout", ["memory", "directory", "prefixed"])
def test_vision_tower_alone(tmp_path, cls, layout):
    model = _tower(cls, transformers.CLIPVisionConfig(**VISION, projection_dim=8))
    engine = dsjax.init_inference(_source(model, tmp_path, layout, "vision_model."), dtype="fp32",
                                  progress=False)
    px = pixels(3)
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(px))
    out = engine.embed_image(px)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), **TOL)
    if cls == "CLIPVisionModel":
        np.testing.assert_allclose(out.pooler_output, ref.pooler_output.numpy(), **TOL)
    else:
        np.testing.assert_allclose(out.embeds, ref.image_embeds.numpy(), **TOL)
    np.testing.assert_allclose(engine.embed_image(px[0]).last_hidden_state[0], out.last_hidden_state[0],
                               atol=1e-5)  # one [C, S, S] image
    with pytest.raises(TypeError, match="image tower only"):
        engine.embed([[1, 2]])


def _source(model, tmp_path, layout, prefix):
    """The model itself, its save_pretrained directory, or that directory with every tower
    tensor under `prefix` (transformers 4's one-tower files, e.g. Stable Diffusion's)."""
    if layout == "memory":
        return model
    model.save_pretrained(tmp_path)
    if layout == "prefixed":
        tensors = load_file(tmp_path / "model.safetensors")
        tensors = {(k if k.startswith(prefix) or "projection" in k else prefix + k): v
                   for k, v in tensors.items()}
        tensors[prefix + "embeddings.position_ids"] = np.arange(17)[None]  # old buffer
        save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_convert_restore_round_trip(tmp_path):
    clip().save_pretrained(tmp_path / "hf")
    out = dsjax.engine.convert_checkpoint(tmp_path / "hf", tmp_path / "ds", dtype="fp32", progress=False)
    restored = dsjax.init_inference(out, dtype="fp32")
    direct = dsjax.init_inference(tmp_path / "hf", dtype="fp32", progress=False)
    assert restored.config == direct.config and restored.config.encoder.vision.takes_images
    ids, mask = texts()
    a, b = restored.clip_logits(ids, pixels(), mask), direct.clip_logits(ids, pixels(), mask)
    np.testing.assert_array_equal(a.logits_per_image, b.logits_per_image)


def test_bad_images():
    engine = dsjax.init_inference(clip(), dtype="fp32", progress=False)
    with pytest.raises(ValueError, match=r"input image size \(16\*16\) doesn't match the model's \(18\*18\)"):
        engine.embed_image(np.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="1 channels; the model takes 3"):
        engine.embed_image(np.zeros((1, 1, 18, 18)))
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        engine.embed_image(np.zeros((18, 18)))
    with pytest.raises(ValueError, match="13 tokens exceed the 12 learned positions"):
        engine.embed([list(range(13))])
