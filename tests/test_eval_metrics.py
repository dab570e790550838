"""The metric code: hand-computed averages, the protocol transforms, the tiny models loaded by folder."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from customshift.errors import CustomShiftError  # noqa: E402
from customshift.eval import metrics as M  # noqa: E402
from customshift.eval.tiny_models import build_tiny_metric_models  # noqa: E402


@pytest.fixture(scope="module")
def tiny_metric_dirs(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_metric_models(tmp_path_factory.mktemp("metric-models"))


@pytest.fixture(scope="module")
def suite(tiny_metric_dirs):
    dino, clip = tiny_metric_dirs
    return M.MetricSuite(dino_model=str(dino), clip_model=str(clip), device="cpu")


# ------------------------------------------------------------------------------------- hand computed
def test_score_embeddings_hand_computed():
    # Two generated images, two real images, 2-d embeddings with known angles.
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unit x, and y (scaled: normalisation must undo it)
    real = torch.tensor([[3.0, 0.0], [0.6, 0.8]])  # x, and (0.6, 0.8)
    # cos(gen, real) = [[1, 0.6], [0, 0.8]] -> per image 0.8 and 0.4 -> subject 0.6 (= mean of the 4 pairs)
    text = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # cos(gen_k, text_k) = 0.6 and 0.0
    s = M.score_embeddings(gen, real, gen, real, text)
    assert s.per_image["dino"] == pytest.approx([0.8, 0.4])
    assert s.mean["dino"] == pytest.approx(0.6)
    assert s.mean["clip_i"] == pytest.approx(0.6)
    assert s.per_image["clip_t"] == pytest.approx([0.6, 0.0])
    assert s.mean["clip_t"] == pytest.approx(0.3)
    assert s.per_image["clipscore"] == pytest.approx([1.5, 0.0])
    assert s.mean["clipscore"] == pytest.approx(0.75)
    # real vs real: the one off-diagonal pair, cos = 0.6
    assert s.real_vs_real["dino"] == pytest.approx(0.6)
    assert (s.n_generated, s.n_real) == (2, 2)


def test_subject_mean_is_mean_over_all_pairs_with_uneven_counts():
    rng = np.random.default_rng(0)
    gen, real = torch.tensor(rng.normal(size=(5, 8))), torch.tensor(rng.normal(size=(3, 8)))
    s = M.score_embeddings(gen, real, gen, real, torch.tensor(rng.normal(size=(5, 8))))
    pairs = [float(np.dot(g, r) / np.linalg.norm(g) / np.linalg.norm(r)) for g in gen.numpy() for r in real.numpy()]
    assert s.mean["dino"] == pytest.approx(np.mean(pairs))


def test_clipscore_clips_negative_cosines():
    assert M.clipscore_from_cosine(-0.3) == 0.0
    assert M.clipscore_from_cosine(0.31) == pytest.approx(0.775)
    gen = torch.tensor([[1.0, 0.0]])
    s = M.score_embeddings(gen, gen, gen, gen, torch.tensor([[-1.0, 0.0]]))
    assert s.per_image["clip_t"] == pytest.approx([-1.0]) and s.per_image["clipscore"] == [0.0]
    assert s.real_vs_real["dino"] is None  # one real image: no pair


def test_score_embeddings_rejects_empty():
    with pytest.raises(CustomShiftError):
        M.score_embeddings(torch.zeros(0, 2), torch.ones(1, 2), torch.zeros(0, 2), torch.ones(1, 2), torch.zeros(0, 2))


# ----------------------------------------------------------------------------------------- transforms
def test_dino_transform_resize_crop_normalise():
    # 512x256 (w x h): shorter side already 256 -> centre crop 224 keeps columns 144..367: left half red.
    arr = np.zeros((256, 512, 3), np.uint8)
    arr[:, :256] = (255, 0, 0)
    arr[:, 256:] = (0, 0, 255)
    x = M.dino_transform(Image.fromarray(arr))
    assert x.shape == (3, 224, 224)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(M.IMAGENET_MEAN)) / torch.tensor(M.IMAGENET_STD)
    blue = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(M.IMAGENET_MEAN)) / torch.tensor(M.IMAGENET_STD)
    assert torch.allclose(x[:, :, 0], red[:, None].expand(3, 224), atol=1e-5)
    assert torch.allclose(x[:, :, 111], red[:, None].expand(3, 224), atol=1e-5)
    assert torch.allclose(x[:, :, 112], blue[:, None].expand(3, 224), atol=1e-5)


def test_resize_shorter_side_matches_torchvision_rounding():
    assert M.resize_shorter_side(Image.new("RGB", (300, 200)), 256).size == (384, 256)
    assert M.resize_shorter_side(Image.new("RGB", (200, 333)), 224).size == (224, 372)  # int() truncation
    assert M.center_crop(Image.new("RGB", (384, 256)), 224).size == (224, 224)


def test_clip_transform_uses_clip_normalisation():
    x = M.clip_transform(Image.new("RGB", (40, 30), (128, 128, 128)))
    assert x.shape == (3, 224, 224)
    expect = (128 / 255 - torch.tensor(M.CLIP_MEAN)) / torch.tensor(M.CLIP_STD)
    assert torch.allclose(x[:, 100, 100], expect, atol=1e-5)


# ----------------------------------------------------------------------------------------- tiny models
def test_tiny_models_load_by_folder_and_embed(suite):
    imgs = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (30, 60), (10, 200, 40))]
    d = suite.dino.embed_images(imgs)
    c = suite.clip.embed_images(imgs)
    t = suite.clip.embed_texts(["a dog in the jungle", "a red backpack " * 40])  # the long one is truncated
    assert d.shape == (2, 24) and c.shape == (2, 16) and t.shape == (2, 16)
    assert torch.isfinite(d).all() and torch.isfinite(c).all() and torch.isfinite(t).all()
    # Same image -> cosine 1 in both spaces (so DINO / CLIP-I of an image with itself is 1).
    real = suite.embed_real(imgs[:1])
    s = suite.score(imgs[:1], ["a dog"], real)
    assert s.mean["dino"] == pytest.approx(1.0) and s.mean["clip_i"] == pytest.approx(1.0)
    assert -1.0 <= s.mean["clip_t"] <= 1.0
    # Deterministic
    assert torch.equal(suite.dino.embed_images(imgs), d)


def test_tokenizer_special_ids_match_model_config(tiny_metric_dirs):
    from transformers import CLIPConfig, CLIPTokenizer

    _, clip = tiny_metric_dirs
    tok = CLIPTokenizer.from_pretrained(str(clip))
    cfg = CLIPConfig.from_pretrained(str(clip)).text_config
    ids = tok("a dog").input_ids
    assert ids[0] == tok.bos_token_id == cfg.bos_token_id
    assert ids[-1] == tok.eos_token_id == cfg.eos_token_id
    assert max(ids) < cfg.vocab_size
    assert tok.model_max_length == 77


def test_aliases_resolve_to_hub_ids():
    assert M.resolve_model_name("ViT-L/14", M.CLIP_MODEL_ALIASES) == "openai/clip-vit-large-patch14"
    assert M.resolve_model_name("ViT-S/16", M.DINO_MODEL_ALIASES) == "facebook/dino-vits16"


def test_missing_model_gives_offline_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CustomShiftError) as err:
        M.DinoEmbedder("customshift-test/no-such-dino-model", device="cpu")
    msg = str(err.value)
    assert "huggingface-cli download customshift-test/no-such-dino-model" in msg and "--dino-model" in msg
    with pytest.raises(CustomShiftError) as err:
        M.ClipEmbedder("customshift-test/no-such-clip-model", device="cpu")
    assert "--clip-model" in str(err.value)


def test_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CustomShiftError) as err:
        M.DinoEmbedder(str(tmp_path), device="cpu")
    assert str(tmp_path) in str(err.value) and "config.json" in str(err.value)


def test_cosine_matrix_is_scale_invariant():
    a = torch.tensor([[1.0, 1.0]])
    b = torch.tensor([[5.0, 0.0], [0.0, -2.0]])
    cm = M.cosine_matrix(a, b)
    assert cm.tolist()[0] == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)])
