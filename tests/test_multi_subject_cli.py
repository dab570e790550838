"""Several subjects in one image from the command line and the batch manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from typer.testing import CliRunner

from customshift.cli import app
from customshift.errors import CustomShiftError
from customshift.generate import pair_subjects, read_manifest

runner = CliRunner()


@pytest.fixture
def refs(tmp_path):
    paths = []
    for seed, name in ((0, "robot.png"), (1, "tree.png")):
        path = tmp_path / name
        random_image(seed).save(path)
        paths.append(path)
    return paths


def test_references_pair_with_subjects_in_order():
    assert pair_subjects(["a.png", "b.png"], ["dog"]) == [(["a.png", "b.png"], "dog")]
    assert pair_subjects(["a.png", "b.png"], ["robot", "tree"]) == [(["a.png"], "robot"), (["b.png"], "tree")]
    with pytest.raises(CustomShiftError, match="need one --reference each"):
        pair_subjects(["a.png", "b.png", "c.png"], ["robot", "tree"])
    with pytest.raises(CustomShiftError, match="different names"):
        pair_subjects(["a.png", "b.png"], ["robot", "Robot"])


def test_two_subjects_from_the_command_line_are_the_pipelines_two_subject_image(tiny_folder, refs, tmp_path):
    out = tmp_path / "out"
    prompt = "a robot and a tree"
    args = ["generate", "--model", tiny_folder, "--reference", str(refs[0]), "--subject", "robot",
            "--reference", str(refs[1]), "--subject", "tree", "--prompt", prompt, "--steps", "2", "--height", "32",
            "--width", "32", "--guidance-scale", "2", "--device", "cpu", "--out", str(out)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (png,) = out.glob("*.png")
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert [s["subject"] for s in sidecar["subjects"]] == ["robot", "tree"]
    assert "--subject robot" in sidecar["command"] and "--subject tree" in sidecar["command"]

    from customshift.pipeline import CustomShiftPipeline

    pipe = CustomShiftPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    subjects = [pipe.encode_subject([str(r)], name, 32, 32) for r, name in zip(refs, ("robot", "tree"), strict=True)]
    direct = pipe(prompt, subject=subjects, num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                  generator=torch.Generator("cpu").manual_seed(0)).images[0]
    with Image.open(png) as saved:
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(direct))
    one = pipe(prompt, subject=subjects[0], num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
               generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert not np.array_equal(np.asarray(one), np.asarray(direct))  # the second subject is really there

    # the same image from a manifest row with "subjects"
    manifest = tmp_path / "jobs.jsonl"
    row = {"id": "two", "prompt": prompt, "subjects": [{"reference": refs[0].name, "subject": "robot"},
                                                       {"reference": refs[1].name, "subject": "tree"}]}
    manifest.write_text(json.dumps(row) + "\n")
    out2 = tmp_path / "out2"
    result = runner.invoke(app, ["generate", "--model", tiny_folder, "--batch", str(manifest), "--steps", "2",
                                 "--height", "32", "--width", "32", "--guidance-scale", "2", "--device", "cpu",
                                 "--out", str(out2)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with Image.open(out2 / "two.png") as batch_image, Image.open(png) as saved:
        np.testing.assert_array_equal(np.asarray(batch_image), np.asarray(saved))


def test_mismatched_subjects_are_one_error_line_and_nothing_written(tiny_folder, refs, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "--model", tiny_folder, "--reference", str(refs[0]), "--subject",
                                 "robot", "--reference", str(refs[1]), "--reference", str(refs[1]), "--subject",
                                 "tree", "--prompt", "a robot and a tree", "--out", str(out)])
    assert result.exit_code == 2 and "need one --reference each" in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(("subjects", "message"), [
    ([], "non-empty list"),
    ([{"reference": "robot.png"}], "non-empty list"),
    ([{"reference": "robot.png", "subject": "robot"}, {"reference": "missing.png", "subject": "tree"}], "missing.png"),
    ([{"reference": "robot.png", "subject": "robot"}, {"reference": "tree.png", "subject": "robot"}], "different"),
])
def test_bad_subjects_rows_are_reported_with_their_line(refs, tmp_path, subjects, message):
    manifest = refs[0].parent / "jobs.jsonl"
    good = {"id": "a", "prompt": "a robot", "reference": "robot.png", "subject": "robot"}
    manifest.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "prompt": "x", "subjects": subjects}) + "\n")
    with pytest.raises(CustomShiftError, match=rf"jobs.jsonl:2: .*{message}"):
        read_manifest(manifest)
