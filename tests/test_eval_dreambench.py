"""DreamBench: the prompt parser, the plan (seeds, references, subsets), generation (resume, shards), end to end."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from customshift.errors import CustomShiftError, ManifestError  # noqa: E402
from customshift.eval import dreambench as db  # noqa: E402
from customshift.eval import harness as H  # noqa: E402
from customshift.eval.tiny_models import build_tiny_metric_models, make_dreambench_fixture  # noqa: E402

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"

# The layout of google/dreambooth's dataset/prompts_and_classes.txt (lists shortened).
PROMPTS_EXCERPT = """Classes

subject_name,class
backpack,backpack
bear_plushie,stuffed animal
dog,dog
cat2,cat

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on top of pink fabric'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a black top hat and a monocle'.format(unique_token, class_token),
'a {0} {1} in a purple wizard outfit'.format(unique_token, class_token)
]
"""


class FakeGenerator:
    """A stand-in method: an image from the seed; counts encode/generate calls."""

    def __init__(self):
        self.encoded: list[tuple[int, str]] = []
        self.generated: list[tuple[str, int]] = []

    def encode(self, reference_images, subject_name):
        assert all(isinstance(im, Image.Image) for im in reference_images)
        self.encoded.append((len(reference_images), subject_name))
        return subject_name

    def generate(self, subject, prompt, seed):
        assert subject in prompt  # the prompt names the subject by its class noun
        self.generated.append((prompt, seed))
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    torch.set_num_threads(1)
    return tuple(str(p) for p in build_tiny_metric_models(tmp_path_factory.mktemp("metric-models")))


@pytest.fixture
def data(tmp_path):
    return make_dreambench_fixture(tmp_path / "dreambench", {"dog": "dog", "backpack": "backpack",
                                                             "bear_plushie": "stuffed animal"})


# ---------------------------------------------------------------------------------------------- parser
def test_parse_prompts_and_classes_format():
    spec = db.parse_prompts_and_classes(PROMPTS_EXCERPT)
    assert spec.classes == {"backpack": "backpack", "bear_plushie": "stuffed animal", "dog": "dog", "cat2": "cat"}
    assert spec.object_prompts[0] == "a {0} {1} in the jungle"
    assert len(spec.object_prompts) == 3 and len(spec.live_prompts) == 3
    assert spec.is_live("dog") and spec.is_live("cat2") and not spec.is_live("bear_plushie")
    assert spec.templates_for("cat2")[1] == "a {0} {1} wearing a black top hat and a monocle"
    assert db.render_prompt(spec.object_prompts[2], "stuffed animal") == "a cube shaped stuffed animal"
    assert db.render_prompt(spec.live_prompts[2], "dog") == "a dog in a purple wizard outfit"
    assert db.render_prompt(spec.object_prompts[0], "dog", unique_token="sks") == "a sks dog in the jungle"


def test_generated_fixture_text_parses_to_the_full_lists():
    from customshift.eval.tiny_models import dreambench_prompts_text

    spec = db.parse_prompts_and_classes(dreambench_prompts_text({"dog": "dog", "can": "can"}))
    assert len(spec.object_prompts) == 25 and len(spec.live_prompts) == 25
    assert spec.live_prompts[10] == "a {0} {1} wearing a red hat"


@pytest.mark.skipif(not (REAL_DATA / "prompts_and_classes.txt").is_file(), reason="shared DreamBench data absent")
def test_parse_the_real_file():
    spec = db.read_spec(REAL_DATA)
    assert len(spec.classes) == 30
    assert len(spec.object_prompts) == 25 and len(spec.live_prompts) == 25
    assert sum(spec.is_live(s) for s in spec.classes) == 9  # the dogs and cats
    assert spec.classes["bear_plushie"] == "stuffed animal" and spec.classes["red_cartoon"] == "cartoon"
    subjects = db.load_dreambench(REAL_DATA)
    assert sum(len(s.prompts) for s in subjects) == 750
    assert all(len(s.real_images) >= 4 for s in subjects)


@pytest.mark.parametrize("bad, where", [
    (PROMPTS_EXCERPT.replace("dog,dog", "dog dog"), ":6:"),
    (PROMPTS_EXCERPT.replace("'a cube shaped {0} {1}'", "a cube shaped {0} {1}"), ":16:"),
    (PROMPTS_EXCERPT.replace("'a {0} {1} on top of pink fabric'", "'a {1} on top of pink fabric'"), ":15:"),
])
def test_parse_errors_name_the_line(bad, where):
    with pytest.raises(ManifestError) as err:
        db.parse_prompts_and_classes(bad, source="p.txt")
    assert f"p.txt{where}" in str(err.value)


def test_parse_requires_both_lists():
    with pytest.raises(ManifestError, match="live subject"):
        db.parse_prompts_and_classes(PROMPTS_EXCERPT.split("Live Subject Prompts")[0])


# -------------------------------------------------------------------------------------------- the plan
def test_load_subset_and_prompt_count(data):
    subjects = db.load_dreambench(data, subjects="bear_plushie,dog", prompts=2)
    assert [s.subject for s in subjects] == ["bear_plushie", "dog"]
    assert subjects[0].prompts == ["a stuffed animal in the jungle", "a stuffed animal in the snow"]
    assert subjects[0].subject_name == "stuffed animal" and subjects[0].category == "object"
    assert subjects[1].category == "live" and len(subjects[1].real_images) == 3
    assert all(p.is_absolute() for p in subjects[1].real_images)
    full = db.load_dreambench(data)
    assert [len(s.prompts) for s in full] == [25, 25, 25]
    assert full[0].prompts[-5:] == ["a red dog", "a purple dog", "a shiny dog", "a wet dog", "a cube shaped dog"]


def test_load_errors(data, tmp_path):
    with pytest.raises(CustomShiftError, match="unknown DreamBench subject"):
        db.load_dreambench(data, subjects="dog,unicorn")
    with pytest.raises(CustomShiftError, match="--prompts"):
        db.load_dreambench(data, prompts=26)
    with pytest.raises(CustomShiftError, match="prompts_and_classes.txt"):
        db.load_dreambench(tmp_path / "nowhere")
    for f in (data / "dog").iterdir():
        f.unlink()
    (data / "dog").rmdir()
    with pytest.raises(CustomShiftError, match="lacks subject 'dog'"):
        db.load_dreambench(data)


def test_seeds_are_per_subject_prompt_index_and_stable(data):
    full = H.plan_work(db.load_dreambench(data), 4, "first", seed=7)
    assert len(full) == 3 * 25 * 4
    assert len({it.seed for it in full}) == len(full)
    assert len({it.image for it in full}) == len(full)
    subset = H.plan_work(db.load_dreambench(data, subjects="backpack", prompts=3), 2, "first", seed=7)
    by_key = {(it.subject, it.prompt_index, it.image_index): it.seed for it in full}
    assert all(by_key[(it.subject, it.prompt_index, it.image_index)] == it.seed for it in subset)
    assert H.item_seed(7, "dog", 0, 0) != H.item_seed(8, "dog", 0, 0)
    assert H.plan_work(db.load_dreambench(data), 4, "first", seed=7) == full  # stable


def test_reference_policies(data):
    photos = db.load_dreambench(data, subjects="dog")[0].real_images
    assert H.select_references(photos, "first", 0, "dog") == [photos[0]]
    assert H.select_references(photos, "all", 0, "dog") == photos
    picks = {H.select_references(photos, "random", s, "dog")[0] for s in range(20)}
    assert len(picks) > 1  # varies with the seed ...
    assert H.select_references(photos, "random", 3, "dog") == H.select_references(photos, "random", 3, "dog")
    with pytest.raises(CustomShiftError, match="reference policy"):
        H.select_references(photos, "best", 0, "dog")


# ---------------------------------------------------------------------------------------- end to end
def _run(data, out, fake, metric_dirs, **kw):
    dino, clip = metric_dirs
    args = dict(subjects="dog,backpack", prompts=2, images_per_prompt=1, dino_model=dino, clip_model=clip,
                generator=fake, show_progress=False)
    args.update(kw)
    return db.run_dreambench(data, out, model="fake-model", **args)


def test_end_to_end_and_resume(data, tmp_path, metric_dirs):
    out = tmp_path / "run"
    fake = FakeGenerator()
    summary = _run(data, out, fake, metric_dirs)
    assert fake.encoded == [(1, "dog"), (1, "backpack")]  # once per subject, first reference only
    assert len(fake.generated) == 4
    assert {p for p, _ in fake.generated} == {"a dog in the jungle", "a dog in the snow",
                                              "a backpack in the jungle", "a backpack in the snow"}
    for name in ("per_image.csv", "per_subject.csv", "summary.json", "results.md", "scatter.png",
                 "grids/dog.png", "grids/backpack.png", "manifest.jsonl", "run_config.json",
                 "images/dog/00_00.png", "images/backpack/01_00.png"):
        assert (out / name).is_file(), name
    assert summary["counts"] == {"subjects": 2, "images": 4, "real_images": 6}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["metrics"] == summary["metrics"]
    for m in ("dino", "clip_i", "clip_t", "clipscore"):
        assert summary["metrics"]["subject_mean"][m] is not None
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 4 and rows[0]["prompt"] == "a dog in the jungle"
    subj = list(csv.DictReader((out / "per_subject.csv").open()))
    assert [r["subject"] for r in subj] == ["dog", "backpack"]
    mean_dino = np.mean([float(r["dino"]) for r in subj])
    assert mean_dino == pytest.approx(summary["metrics"]["subject_mean"]["dino"], abs=1e-5)
    md = (out / "results.md").read_text()
    assert "Beside published results" in md and "DreamBooth" in md and "| dog |" in md

    # Resume: nothing left to make -> the method is not even built.
    def no_factory():
        raise AssertionError("the generator must not be built when every image exists")

    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    deleted = out / "images" / "dog" / "01_00.png"
    stats = H.run_generation(H.plan_work(db.load_dreambench(data, "dog,backpack", 2), 1, "first", 0),
                             out / "images", no_factory, show_progress=False)
    assert (stats.generated, stats.skipped) == (0, 4)
    # A larger run in the same folder only makes the missing images.
    fake2 = FakeGenerator()
    deleted.unlink()
    _run(data, out, fake2, metric_dirs, images_per_prompt=2)
    assert len(fake2.generated) == 5  # dog 01_00 again + one new image per (subject, prompt)
    assert all(before[p] == p.stat().st_mtime_ns for p in before if p != deleted)
    # Other image-shaping settings in the same folder are refused ...
    with pytest.raises(CustomShiftError, match="other settings"):
        _run(data, out, FakeGenerator(), metric_dirs, steps=5)
    # ... unless --overwrite, which makes every image again.
    fake3 = FakeGenerator()
    _run(data, out, fake3, metric_dirs, steps=5, overwrite=True)
    assert len(fake3.generated) == 4


def test_shards_split_the_work(data, tmp_path):
    items = H.plan_work(db.load_dreambench(data, prompts=3), 2, "all", 0)
    seen = []
    for rank in range(3):
        fake = FakeGenerator()
        stats = H.run_generation(items, tmp_path / "images", lambda f=fake: f, process_index=rank, num_processes=3,
                                 show_progress=False)
        assert stats.generated == len(fake.generated) == len(items[rank::3])
        assert len(fake.encoded) == 3  # each process encodes each of its subjects once
        assert all(n == 3 for n, _ in fake.encoded)  # policy "all": every photo
        seen += [seed for _, seed in fake.generated]
    assert sorted(seen) == sorted(it.seed for it in items)  # disjoint, and together everything


def test_sharded_run_reports_only_on_the_main_process(data, tmp_path, metric_dirs):
    out = tmp_path / "run"
    fake = FakeGenerator()
    assert _run(data, out, fake, metric_dirs, process_index=1, num_processes=2) is None
    assert len(fake.generated) == 2  # its half of the 4 images
    assert not (out / "summary.json").exists() and not (out / "run_config.json").exists()
    fake0 = FakeGenerator()
    summary = _run(data, out, fake0, metric_dirs, process_index=0, num_processes=1)  # resume: the rest
    assert len(fake0.generated) == 2
    assert summary["counts"]["images"] == 4 and (out / "summary.json").is_file()
    assert summary["generation"]["already_present"] == 2


def test_plan_only_writes_the_manifest(data, tmp_path):
    out = tmp_path / "plan"
    res = db.run_dreambench(data, out, model="x", plan_only=True, images_per_prompt=4, show_progress=False)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert res["images"] == len(rows) == 3 * 25 * 4
    assert rows[0]["image"] == "dog/00_00.png" and rows[0]["prompt"] == "a dog in the jungle"
    assert len(rows[0]["real_images"]) == 3 and len(rows[0]["references"]) == 1
    assert not (out / "images").exists()


def test_end_to_end_with_the_tiny_pipeline(data, tmp_path, metric_dirs):
    pytest.importorskip("customshift.pipeline")
    tiny = pytest.importorskip("customshift.tiny")
    model_dir = tmp_path / "tiny-sd3"
    tiny.build_tiny_pipeline(variant="sd3", seed=0).save_pretrained(model_dir)
    out = tmp_path / "run"
    dino, clip = metric_dirs
    summary = db.run_dreambench(data, out, model=str(model_dir), subjects="dog,backpack", prompts=2,
                                images_per_prompt=1, steps=2, height=32, width=32, seed=3, dino_model=dino,
                                clip_model=clip, device="cpu", show_progress=False)
    assert summary["counts"]["images"] == 4
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 4 and Image.open(images[0]).size == (32, 32)
    first = images[0].read_bytes()
    # Deterministic per (subject, prompt, index): regenerating gives the same pixels.
    db.run_dreambench(data, out, model=str(model_dir), subjects="dog,backpack", prompts=2, images_per_prompt=1,
                      steps=2, height=32, width=32, seed=3, dino_model=dino, clip_model=clip, device="cpu",
                      overwrite=True, show_progress=False)
    assert np.array_equal(np.asarray(Image.open(images[0])), np.asarray(Image.open(__import__("io").BytesIO(first))))


SHARD_SCRIPT = """
import os, sys
import numpy as np
import torch
from PIL import Image
torch.set_num_threads(1)
from customshift.eval.dreambench import run_dreambench

class Fake:
    def encode(self, images, name):
        return name
    def generate(self, subject, prompt, seed):
        with open(os.path.join(sys.argv[2], f"{seed}.{os.environ['RANK']}"), "w"):
            pass
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))

summary = run_dreambench(sys.argv[1], sys.argv[3], model="fake", prompts=3, images_per_prompt=2, generator=Fake(),
                         show_progress=False, skip_metrics=True)
assert (summary is not None) == (os.environ["RANK"] == "0"), summary
if summary is not None:  # the main process returns after every process is done
    assert summary["images"] == 18 and summary["generation"]["num_processes"] == 2, summary
    assert len(os.listdir(sys.argv[2])) == 18
"""


@pytest.mark.slow
def test_two_processes_share_the_work_under_torchrun(data, tmp_path):
    """A real 2-process launch (gloo on CPU): each process makes half; the main one goes on when all are done."""
    import shutil
    import subprocess
    import sys

    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not available")
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    marks, out = tmp_path / "marks", tmp_path / "run"
    marks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun if Path(torchrun).exists() else "torchrun", "--standalone", "--nproc_per_node", "2",
                           str(script), str(data), str(marks), str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = [p.name.split(".") for p in marks.iterdir()]
    assert len(done) == 3 * 3 * 2 and len({seed for seed, _ in done}) == len(done)  # each image made once
    assert sorted(rank for _, rank in done).count("0") == 9  # half each
    assert len(list((out / "images").rglob("*.png"))) == 18 and (out / "run_config.json").is_file()
