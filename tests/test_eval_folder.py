"""Folder mode (any method's images + a manifest), the report files and the published-results data file."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from customshift.errors import CustomShiftError, ManifestError  # noqa: E402
from customshift.eval import dreambench as db  # noqa: E402
from customshift.eval import folder as F  # noqa: E402
from customshift.eval import report as R  # noqa: E402
from customshift.eval.tiny_models import build_tiny_metric_models, make_dreambench_fixture  # noqa: E402


class FakeGenerator:
    def encode(self, reference_images, subject_name):
        return subject_name

    def generate(self, subject, prompt, seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    torch.set_num_threads(1)
    return tuple(str(p) for p in build_tiny_metric_models(tmp_path_factory.mktemp("metric-models")))


def _img(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def other_method(tmp_path):
    """Images of 'another method' with a CSV manifest and real images under a real root."""
    for i, s in enumerate(("cat", "teapot")):
        for k in range(2):
            _img(tmp_path / "real" / s / f"{k}.jpg", 100 * i + k)
        for k in range(3):
            _img(tmp_path / "theirs" / f"{s}_{k}.png", 10 * i + k)
    rows = [{"image": f"{s}_{k}.png", "subject": s, "prompt": f"a {s} on the beach", "image_index": k}
            for s in ("cat", "teapot") for k in range(3)]
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "subject", "prompt", "image_index"])
        w.writeheader()
        w.writerows(rows)
    return tmp_path


def test_folder_mode_with_csv_and_real_root(other_method, metric_dirs):
    dino, clip = metric_dirs
    t = other_method
    summary = F.run_folder(t / "theirs", t / "manifest.csv", t / "scores", real_root=t / "real",
                           method_name="Other", dino_model=dino, clip_model=clip, show_progress=False)
    assert summary["benchmark"] == "folder" and summary["method"] == "Other"
    assert summary["counts"] == {"subjects": 2, "images": 6, "real_images": 4}
    assert (t / "scores" / "grids" / "cat.png").is_file()
    assert not (t / "scores" / "scatter.png").exists()  # no published results for a plain folder
    # Placed beside DreamBench's published numbers when asked.
    s2 = F.run_folder(t / "theirs", t / "manifest.csv", t / "scores2", real_root=t / "real", benchmark="dreambench",
                      dino_model=dino, clip_model=clip, grids=False, show_progress=False)
    assert (t / "scores2" / "scatter.png").is_file() and not (t / "scores2" / "grids").exists()
    assert s2["metrics"] == summary["metrics"]


def test_folder_mode_rescoring_a_benchmark_run_gives_the_same_numbers(tmp_path, metric_dirs):
    dino, clip = metric_dirs
    data = make_dreambench_fixture(tmp_path / "data")
    out = tmp_path / "run"
    run = db.run_dreambench(data, out, model="fake", prompts=2, images_per_prompt=2, dino_model=dino,
                            clip_model=clip, generator=FakeGenerator(), show_progress=False)
    again = F.run_folder(out / "images", out / "manifest.jsonl", tmp_path / "rescored", dino_model=dino,
                         clip_model=clip, show_progress=False)
    assert again["benchmark"] == "dreambench"  # read from run_config.json beside the manifest
    for m in ("dino", "clip_i", "clip_t", "clipscore"):
        assert again["metrics"]["subject_mean"][m] == pytest.approx(run["metrics"]["subject_mean"][m], abs=1e-9)


def test_missing_images(other_method, metric_dirs):
    dino, clip = metric_dirs
    t = other_method
    (t / "theirs" / "cat_1.png").unlink()
    with pytest.raises(CustomShiftError, match="1 of 6 images .* missing .*cat_1.png"):
        F.read_manifest(t / "manifest.csv", t / "theirs", real_root=t / "real")
    summary = F.run_folder(t / "theirs", t / "manifest.csv", t / "scores", real_root=t / "real", allow_missing=True,
                           dino_model=dino, clip_model=clip, grids=False, show_progress=False)
    assert summary["counts"]["images"] == 5


def test_jsonl_manifest_with_real_dir_once_per_subject(tmp_path):
    for k in range(2):
        _img(tmp_path / "real_cat" / f"{k}.png", k)
        _img(tmp_path / "imgs" / f"{k}.png", 10 + k)
    lines = [{"image": "0.png", "subject": "cat", "prompt": "a cat", "real_dir": "real_cat"},
             {"image": "1.png", "subject": "cat", "prompt": "a cat", "seed": "12"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs = F.read_manifest(tmp_path / "m.jsonl", tmp_path / "imgs")
    assert len(recs) == 2 and recs[1].real_images == recs[0].real_images and len(recs[0].real_images) == 2
    assert recs[1].seed == 12


@pytest.mark.parametrize("content, match", [
    ('{"image": "0.png", "subject": "cat"}\n', r"m.jsonl:1: missing prompt"),
    ('{"image": "0.png", "subject": "cat", "prompt": "a cat"}\n', r"m.jsonl:1: no real images"),
    ('{"image": "0.png", "subject": "cat", "prompt": "a cat", "real_dir": "nope"}\n', r"m.jsonl:1: real_dir"),
    ('\n{"image": "0.png", "subject": "cat", "prompt": "a cat", "real_images": ["x.png"], "seed": "s"}\n',
     r"m.jsonl:2: (real image|seed)"),
    ('not json\n', r"m.jsonl:1: not valid JSON"),
    ('', r"no rows"),
])
def test_manifest_errors_name_file_and_line(tmp_path, content, match):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(ManifestError, match=match):
        F.read_manifest(tmp_path / "m.jsonl", tmp_path)


# ------------------------------------------------------------------------------------------ reports
def test_published_results_every_number_has_a_source():
    data = R.load_published_results()
    assert "about" in data
    dream = data["benchmarks"]["dreambench"]["entries"]
    by = {(e["method"], e["base_model"]): e for e in dream}
    assert (by[("DreamBooth", "Stable Diffusion")]["dino"], by[("DreamBooth", "Stable Diffusion")]["clip_i"],
            by[("DreamBooth", "Stable Diffusion")]["clip_t"]) == (0.668, 0.803, 0.305)
    assert by[("Textual Inversion", "Stable Diffusion")]["clip_t"] == 0.255
    assert by[("Real images (oracle)", "")]["dino"] == 0.774
    for bench in data["benchmarks"].values():
        assert len(bench["scatter_axes"]) == 2
        for e in bench["entries"]:
            src = e["source"]
            assert src["title"] and (src.get("arxiv") or src.get("url")) and src["table"], e
            for k in ("dino", "clip_i", "clip_t"):
                assert e.get(k) is None or 0 < e[k] < 1, e
            assert e.get("clipscore") is None or 0 < e["clipscore"] < 2.5


def test_published_results_without_a_source_are_refused(tmp_path):
    bad = {"benchmarks": {"dreambench": {"entries": [{"method": "X", "dino": 0.5, "source": {"title": "T"}}]}}}
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(CustomShiftError, match="no complete source"):
        R.load_published_results(tmp_path / "p.json")


def test_grid_and_scatter(tmp_path):
    real = [Image.new("RGB", (60, 40), (255, 0, 0))] * 3
    rows = [("a dog in the jungle", [Image.new("RGB", (32, 32), (0, 255, 0))] * 4),
            ("a dog wearing a black top hat and a monocle", [Image.new("RGB", (32, 32), (0, 0, 255))] * 4)]
    grid = R.subject_grid("dog", real, rows, thumb=64)
    assert grid.size == (240 + 4 * 68 + 4, 24 + 3 * 68 + 4)
    assert grid.getpixel((240 + 4 + 10, 24 + 68 + 10)) == (0, 255, 0)
    entries = R.published_entries("dreambench")
    assert R.save_scatter_plot(tmp_path / "s.png", "CustomShift", (0.7, 0.31), entries)
    with Image.open(tmp_path / "s.png") as im:
        assert im.size[0] > 400
    assert not R.save_scatter_plot(tmp_path / "t.png", "x", (0.7, None), entries)


def test_markdown_lists_this_run_and_sources():
    summary = {"benchmark": "dreambench", "benchmark_title": "DreamBench", "method": "CustomShift",
               "generation": {"model": "m", "steps": 28, "height": 1024, "width": 1024, "guidance_scale": 7.0,
                              "shift_scale": 1.0, "reference_policy": "first", "seed": 0},
               "metric_models": {"dino_model": "d", "clip_model": "c"}, "counts": {"images": 2},
               "metrics": {"subject_mean": {"dino": 0.5, "clip_i": 0.6, "clip_t": 0.3, "clipscore": 0.75},
                           "image_mean": {"dino": 0.5, "clip_i": 0.6, "clip_t": 0.3, "clipscore": 0.75},
                           "real_vs_real": {"dino": 0.8, "clip_i": 0.9}}}
    per_subject = [{"subject": "dog", "subject_name": "dog", "n_generated": 2, "n_real": 5, "dino": 0.5,
                    "clip_i": 0.6, "clip_t": 0.3, "clipscore": 0.75}]
    md = R.render_markdown(summary, per_subject, R.published_entries("dreambench"))
    assert "| mean over subjects | 0.500 | 0.600 | 0.300 | 0.750 |" in md
    assert "arXiv:2208.12242, Table 1" in md and "**CustomShift (this run)**" in md
    assert "| dog | dog | 2 | 5 |" in md
