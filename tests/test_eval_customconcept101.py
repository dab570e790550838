"""CustomConcept101: dataset.json and prompt files, the subject phrase, an end-to-end run on a fixture."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from customshift.errors import CustomShiftError, ManifestError  # noqa: E402
from customshift.eval import customconcept101 as cc  # noqa: E402
from customshift.eval.tiny_models import build_tiny_metric_models, make_customconcept101_fixture  # noqa: E402

REAL_SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "customconcept101"


class FakeGenerator:
    def __init__(self):
        self.encoded, self.prompts = [], []

    def encode(self, reference_images, subject_name):
        self.encoded.append(subject_name)
        return subject_name

    def generate(self, subject, prompt, seed):
        self.prompts.append(prompt)
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (36, 36, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    torch.set_num_threads(1)
    return tuple(str(p) for p in build_tiny_metric_models(tmp_path_factory.mktemp("metric-models")))


@pytest.fixture
def data(tmp_path):
    return make_customconcept101_fixture(tmp_path / "customconcept101")


@pytest.mark.parametrize("instance, phrase", [
    ("photo of a <new1> dog", "dog"),
    ("photo of <new1> sunglasses", "sunglasses"),
    ("photo of a <new1> dice plushie", "dice plushie"),
    ("Photo of an <new1> owl", "owl"),
])
def test_subject_phrase(instance, phrase):
    assert cc.subject_phrase(instance) == phrase
    assert cc.subject_phrase(instance, token="sks") == f"sks {phrase}"


def test_render_prompt():
    assert cc.render_prompt("{} swimming in a pool.", "dog") == "dog swimming in a pool."
    assert cc.render_prompt("Painting of {} at a beach by artist claude monet.", "dog") == \
        "Painting of dog at a beach by artist claude monet."
    assert cc.render_prompt("a <new1> on the moon", "dog") == "a dog on the moon"


def test_load_fixture(data):
    concepts = cc.load_customconcept101(data)
    assert [c.subject for c in concepts] == ["pet_dog1", "wearable_sunglasses2"]
    dog = concepts[0]
    assert dog.subject_name == "dog" and dog.category == "dog"
    assert dog.prompts == ["Photo of a dog.", "dog swimming in a pool.", "a sleeping dog."]
    assert len(dog.real_images) == 3
    sub = cc.load_customconcept101(data, subjects=["wearable_sunglasses2"], prompts=2)
    assert [len(c.prompts) for c in sub] == [2]


def test_data_folder_can_be_the_images_folder_with_a_separate_spec(data, tmp_path):
    images = tmp_path / "unzipped"
    shutil.move(str(data / "benchmark_dataset"), images)  # --data benchmark_dataset, spec elsewhere
    concepts = cc.load_customconcept101(images, dataset_json=data / "dataset.json")
    assert concepts[0].real_images[0].parent == images / "pet_dog1"
    with pytest.raises(CustomShiftError, match="--dataset-json"):
        cc.load_customconcept101(images)
    with pytest.raises(CustomShiftError, match="not found"):
        cc.load_customconcept101(tmp_path / "elsewhere", dataset_json=data / "dataset.json")


def test_errors(data):
    with pytest.raises(CustomShiftError, match="unknown CustomConcept101 concept"):
        cc.load_customconcept101(data, subjects="pet_cat1")
    (data / "prompts" / "dog.txt").write_text("a photo of a dog\n")
    with pytest.raises(ManifestError, match="placeholder"):
        cc.load_customconcept101(data)
    (data / "dataset.json").write_text(json.dumps([{"instance_prompt": "x"}]))
    with pytest.raises(ManifestError, match="entry 0"):
        cc.load_customconcept101(data)


@pytest.mark.skipif(not (REAL_SPEC / "dataset.json").is_file(), reason="shared CustomConcept101 files absent")
def test_the_real_dataset_json_and_prompt_files():
    concepts = cc.parse_dataset_json(REAL_SPEC / "dataset.json")
    assert len(concepts) == 101 and len({c.concept_id for c in concepts}) == 101
    for c in concepts:
        prompts = cc.read_prompt_file(REAL_SPEC / c.prompt_filename)
        assert len(prompts) == 20, c.prompt_filename
        assert c.subject_phrase and "<new1>" not in c.subject_phrase
    by_id = {c.concept_id: c for c in concepts}
    assert by_id["pet_dog1"].subject_phrase == "dog"
    assert by_id["wearable_sunglasses2"].subject_phrase == "sunglasses"


def test_end_to_end(data, tmp_path, metric_dirs):
    dino, clip = metric_dirs
    fake = FakeGenerator()
    out = tmp_path / "run"
    summary = cc.run_customconcept101(data, out, model="fake", images_per_prompt=1, prompts=2, dino_model=dino,
                                      clip_model=clip, generator=fake, show_progress=False)
    assert fake.encoded == ["dog", "sunglasses"]
    assert fake.prompts == ["Photo of a dog.", "dog swimming in a pool.", "photo of a sunglasses.",
                            "sunglasses lying on a study table."]
    assert summary["benchmark"] == "customconcept101" and summary["counts"]["images"] == 4
    m = summary["metrics"]["subject_mean"]
    assert m["clipscore"] == pytest.approx(
        np.mean([2.5 * max(float(r), 0) for r in _column(out / "per_image.csv", "clip_t")]), abs=1e-5)
    assert (out / "scatter.png").is_file()  # beside the benchmark README's numbers
    assert "Custom Diffusion" in (out / "results.md").read_text()


def _column(path: Path, name: str) -> list[str]:
    import csv

    return [row[name] for row in csv.DictReader(path.open())]
