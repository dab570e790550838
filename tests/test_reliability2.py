"""Issue 16, "Reliability and security, round 2": each test here failed on the code before the fix.

CLI cases run in-process through typer's runner; those refused before the model loads also prove it,
by making ``load_pipeline`` fail the test if it is ever reached.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_image
from typer.testing import CliRunner

from customshift.cli import app

runner = CliRunner()


def run_cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, *expected: str) -> str:
    """Exit status 2, exactly one ``error:`` line and no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if the command gets as far as loading a model."""
    import customshift.generate

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(customshift.generate, "load_pipeline", refuse)


@pytest.fixture
def ref_path(tmp_path) -> Path:
    path = tmp_path / "dog.png"
    random_image(0).save(path)
    return path


def generate_args(model, out, ref, *extra):
    return ["generate", "--model", model, "--out", out, "--reference", ref, "--subject", "dog", "--prompt",
            "a dog on the beach", "--steps", "2", "--device", "cpu", *extra]


# ------------------------------------------------------------------------------- 6. numbers, before loading
@pytest.mark.parametrize(("extra", "expected"), [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--steps", "100000"], "--steps 100000 is more than"),
    (["--height", "0"], "--height must be a positive"),
    (["--width", "-16"], "--width must be a positive"),
    (["--height", "100000"], "larger than this model can place"),
    (["--width", "1024"], "larger than this model can place (128 pixels"),  # tiny: 32 positions x 2 x 2
    (["--height", "42"], "multiple of 4"),
    (["--seed", "-1"], "--seed must be in [0, 2^64)"),
    (["--seed", str(2**64)], "--seed must be in [0, 2^64)"),
    (["--seed", str(2**64 - 1), "--num-images", "2"], "goes past 2^64 - 1"),
    (["--shift-scale", "nan"], "--shift-scale must be a finite number"),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    (["--steps", "two"], "Invalid value for '--steps'"),
])
def test_bad_numbers_are_refused_before_the_model_loads(tiny_folder, ref_path, tmp_path, no_model_load, extra,
                                                        expected):
    out = tmp_path / "out"
    assert_one_error_line(run_cli(*generate_args(tiny_folder, out, ref_path, *extra)), expected)
    assert not out.exists()


@pytest.mark.parametrize("seed", [2**70, True, -5, 1.5, "3"])
def test_batch_row_seeds_are_checked_with_the_line_number_before_anything_is_generated(
        tiny_folder, ref_path, tmp_path, no_model_load, seed):
    manifest = tmp_path / "jobs.jsonl"
    rows = [{"id": "ok", "reference": ref_path.name, "subject": "dog", "prompt": "a dog", "seed": 1},
            {"id": "bad", "reference": ref_path.name, "subject": "dog", "prompt": "a dog", "seed": seed}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    line = assert_one_error_line(run_cli("generate", "--batch", manifest, "--model", tiny_folder, "--out", out))
    assert f"{manifest}:2: seed must be an integer in [0, 2^64)" in line and ":1:" not in line
    assert not out.exists()


def test_a_blank_second_prompt_is_refused_before_the_first_image(tiny_folder, ref_path, tmp_path, no_model_load):
    out = tmp_path / "out"
    args = generate_args(tiny_folder, out, ref_path, "--prompt", " ")
    assert_one_error_line(run_cli(*args), "the prompt is empty (--prompt number 2)")
    assert not out.exists()


# ------------------------------------------------------------------- 7. --out, --device, odd references
def test_out_that_is_a_file_or_unwritable_is_one_error_line(tiny_folder, ref_path, tmp_path, no_model_load):
    existing = tmp_path / "taken.txt"
    existing.write_text("mine")
    assert_one_error_line(run_cli(*generate_args(tiny_folder, existing, ref_path)), "is an existing file")
    assert existing.read_text() == "mine"
    assert_one_error_line(run_cli(*generate_args(tiny_folder, existing / "sub", ref_path)), "which is a file")
    # /proc refuses new files even to root, where a read-only chmod would not stop anything.
    assert_one_error_line(run_cli(*generate_args(tiny_folder, "/proc/self/customshift-out", ref_path)),
                          "cannot write")
    emb = tmp_path / "emb" / "dog.safetensors"
    result = run_cli("encode", "--model", tiny_folder, "--reference", ref_path, "--subject", "dog",
                     "--out", "/proc/self/dog.safetensors", "--device", "cpu")
    assert_one_error_line(result, "cannot write")
    assert not emb.parent.exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_one_error_line(tiny_folder, ref_path, tmp_path, no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_one_error_line(run_cli(*generate_args(tiny_folder, locked / "out", ref_path)), "permission denied")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(("device", "expected"), [("bogus", "unknown --device 'bogus'"), ("cuda", "CUDA"),
                                                  ("cuda:7", "CUDA"), ("meta", "unsupported device type")])
def test_device_without_hardware_or_unknown_is_one_error_line(tiny_folder, ref_path, tmp_path, no_model_load,
                                                              device, expected):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    out = tmp_path / "out"
    args = [a if a != "cpu" else device for a in generate_args(tiny_folder, out, ref_path)]
    assert_one_error_line(run_cli(*args), expected)
    assert not out.exists()


def test_reference_that_is_a_symlink_loop_or_a_directory_says_what_it_is(tiny_folder, ref_path, tmp_path,
                                                                         no_model_load):
    loop_a, loop_b = tmp_path / "loop_a.png", tmp_path / "loop_b.png"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    out = tmp_path / "out"
    for ref, expected in ((loop_a, "symbolic link loop"), (tmp_path, "is a directory"),
                          (dangling, "broken symbolic link")):
        assert_one_error_line(run_cli(*generate_args(tiny_folder, out, ref)), expected)
        manifest = tmp_path / "jobs.jsonl"
        manifest.write_text(json.dumps({"id": "a", "reference": str(ref), "subject": "dog", "prompt": "a dog"}) + "\n")
        assert_one_error_line(run_cli("generate", "--batch", manifest, "--model", tiny_folder, "--out", out),
                              ":1:", expected)
    assert not out.exists()


def test_a_reference_that_is_not_an_image_is_refused_before_the_model_loads(tiny_folder, tmp_path, no_model_load):
    out = tmp_path / "out"
    for name, data, expected in (("empty.png", b"", "empty"), ("text.png", b"hello", "not")):
        ref = tmp_path / name
        ref.write_bytes(data)
        assert_one_error_line(run_cli(*generate_args(tiny_folder, out, ref)), name, expected)
    assert not out.exists()


# ------------------------------------------------------------------------- 1. outputs stay inside --out
def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path):
    from customshift.eval.report import write_csv

    rows = [{"prompt": "=HYPERLINK(\"http://x\")", "subject": "+1", "image": "-x.png", "n": -0.5, "k": -3},
            {"prompt": "@SUM(A1)", "subject": "dog", "image": "a.png", "n": 0.25, "k": 2}]
    path = tmp_path / "r.csv"
    write_csv(path, rows, ["prompt", "subject", "image", "n", "k"])
    back = list(csv.DictReader(path.open()))
    assert [r["prompt"] for r in back] == ["'=HYPERLINK(\"http://x\")", "'@SUM(A1)"]
    assert back[0]["subject"] == "'+1" and back[0]["image"] == "'-x.png"
    assert back[0]["n"] == "-0.500000" and back[0]["k"] == "-3"  # numbers stay numbers
    assert back[1]["subject"] == "dog"


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    from customshift.eval.tiny_models import build_tiny_metric_models

    return tuple(str(p) for p in build_tiny_metric_models(tmp_path_factory.mktemp("metric-models")))


def test_evaluate_folder_keeps_grids_inside_out_whatever_the_subject(tmp_path, metric_dirs):
    victim = tmp_path / "victim.png"
    random_image(9).save(victim)
    before = victim.read_bytes()
    images, real = tmp_path / "images", tmp_path / "real"
    images.mkdir()
    real.mkdir()
    random_image(1).save(images / "a.png")
    random_image(2).save(real / "r.png")
    subjects = [str(tmp_path / "victim"), "../../victim", "../escaped", "=cmd"]
    rows = [{"image": "a.png", "subject": s, "prompt": "=HYPERLINK(\"x\") a dog", "real_images": [str(real / "r.png")]}
            for s in subjects]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run" / "out"
    result = run_cli("evaluate", "folder", "--images", images, "--manifest", manifest, "--out", out,
                     "--dino-model", metric_dirs[0], "--clip-model", metric_dirs[1], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == before
    assert not (tmp_path / "run" / "escaped.png").exists() and not (tmp_path / "escaped.png").exists()
    grids = sorted((out / "grids").iterdir())
    assert len(grids) == len(subjects) and all(g.parent == out / "grids" for g in grids)
    written = {p.resolve() for p in tmp_path.rglob("*.png")} - {victim.resolve()}
    assert all(out.resolve() in p.parents or p.parent in (images.resolve(), real.resolve()) for p in written)
    per_image = list(csv.DictReader((out / "per_image.csv").open()))
    assert {r["prompt"] for r in per_image} == {"'=HYPERLINK(\"x\") a dog"}
    assert "'=cmd" in {r["subject"] for r in per_image}


def test_benchmark_image_names_built_from_subjects_stay_in_their_folder():
    from customshift.eval.harness import image_filename

    assert image_filename("dog", 1, 2) == "dog/01_02.png"  # safe names are unchanged (resumed runs match)
    for subject in ("../../x", "/etc/cron.d/x", "a/b", "..", "."):
        name = image_filename(subject, 0, 0)
        assert name.count("/") == 1 and not name.startswith(("/", ".")), name


# ------------------------------------------------------------ 11. --dino-model tiny is never a local folder
def test_tiny_metric_model_name_ignores_a_folder_called_tiny(tmp_path, monkeypatch):
    from customshift.eval import harness

    (tmp_path / "tiny").mkdir()  # an unrelated folder that happens to be named tiny
    monkeypatch.chdir(tmp_path)
    seen = {}

    class Suite:
        def __init__(self, dino_model, clip_model, device=None):
            seen.update(dino=dino_model, clip=clip_model)

    monkeypatch.setattr(harness, "MetricSuite", Suite)
    harness.build_metric_suite("tiny", "tiny", tmp_path / "out")
    assert seen["dino"] != "tiny" and "_tiny_metric_models" in seen["dino"]
    assert seen["clip"] != "tiny" and "_tiny_metric_models" in seen["clip"]
    harness.build_metric_suite("./tiny", "./tiny", tmp_path / "out")  # an explicit path stays a path
    assert seen == {"dino": "./tiny", "clip": "./tiny"}


# ------------------------------------------------------------ 9. encode: killed mid-write, umask honoured
def test_encode_killed_mid_write_leaves_no_temp_file_after_the_next_run_and_honours_the_umask(
        tiny_folder, ref_path, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    out = folder / "dog.safetensors"
    args = ["encode", "--model", tiny_folder, "--reference", str(ref_path), "--subject", "dog", "--out", str(out),
            "--device", "cpu"]
    # The child blocks in the first fsync, i.e. right after the bytes were written, and is killed there.
    code = ("import os, sys, time; os.fsync = lambda fd: time.sleep(600); from customshift.cli import main; "
            f"sys.argv = ['customshift', *{args!r}]; main()")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 180
        while not [p for p in folder.iterdir() if p.stat().st_size > 0]:
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "encode never started writing"
            time.sleep(0.2)
        time.sleep(0.5)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert not out.exists() and list(folder.iterdir())  # killed mid-write: only a temp file
    old_umask = os.umask(0o027)
    try:
        result = run_cli(*args)
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert [p.name for p in folder.iterdir()] == ["dog.safetensors"]  # the killed run's temp file is gone
    assert out.stat().st_mode & 0o777 == 0o640  # 0o666 under umask 027, not always 0600


# ------------------------------------------------------------------- 10. a deleted image is made again
def test_batch_rerun_regenerates_an_image_whose_sidecar_stayed(tiny_folder, ref_path, tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "reference": ref_path.name, "subject": "dog",
                                            "prompt": "a dog on the beach"}) + "\n" for i in ("a", "b")))
    out = tmp_path / "out"
    args = ["generate", "--batch", manifest, "--model", tiny_folder, "--out", out, "--steps", "1", "--device", "cpu"]
    assert run_cli(*args).exit_code == 0
    first = (out / "a.png").read_bytes()
    kept = (out / "b.png").stat().st_mtime_ns
    (out / "a.png").unlink()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "wrote 1 image(s)" in result.output and "kept 1 existing" in result.output
    assert (out / "a.png").read_bytes() == first and (out / "b.png").stat().st_mtime_ns == kept


# ------------------------------------------------------------------------ 11. subject matching, warnings
class WordTokenizer:
    """A word-level stand-in for CLIP's tokenizer (lowercases) and T5's (keeps case)."""

    def __init__(self, lowercase: bool) -> None:
        self.lowercase, self.vocab = lowercase, {}

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        from types import SimpleNamespace

        words = (text.lower() if self.lowercase else text).split()
        ids = [self.vocab.setdefault(w, len(self.vocab) + 2) for w in words] + ([1] if add_special_tokens else [])
        return SimpleNamespace(input_ids=ids[:max_length] if truncation and max_length else ids)


def test_subject_case_matches_in_both_text_encoders(tiny_pipe):
    tiny_pipe.tokenizer, tiny_pipe.tokenizer_3 = WordTokenizer(lowercase=True), WordTokenizer(lowercase=False)
    length = tiny_pipe.tokenizer_max_length + 64
    lower = tiny_pipe.subject_token_weights(["a robot on the beach"], "robot", length)
    upper = tiny_pipe.subject_token_weights(["a Robot on the beach"], "robot", length)
    t5 = slice(tiny_pipe.tokenizer_max_length, None)
    assert lower[0, t5].sum() > 0  # T5's tokens of the subject are found ...
    assert torch.equal(upper, lower)  # ... whatever the prompt's casing, as CLIP's are


def test_a_subject_past_truncation_is_warned_about_with_a_short_prompt(tiny_pipe, caplog):
    prompt = "a photo of " + "very " * 400 + "robot"
    length = tiny_pipe.tokenizer_max_length + 256
    with caplog.at_level("WARNING", logger="customshift.pipeline"):
        tiny_pipe.subject_token_weights([prompt], "robot", length)
    (message,) = [r.getMessage() for r in caplog.records if "robot" in r.getMessage()]
    assert "token limit" in message and f"({len(prompt)} characters)" in message
    assert len(message) < 400 and prompt not in message


def test_a_batch_row_whose_image_cannot_be_decoded_is_reported_before_anything_is_generated(
        tiny_folder, ref_path, tmp_path, no_model_load):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    manifest = tmp_path / "jobs.jsonl"
    rows = [{"id": "ok", "reference": ref_path.name, "subject": "dog", "prompt": "a dog"},
            {"id": "bad", "reference": "broken.png", "subject": "dog", "prompt": "a dog"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    line = assert_one_error_line(run_cli("generate", "--batch", manifest, "--model", tiny_folder, "--out", out))
    assert f"{manifest}:2:" in line and "broken.png" in line and ":1:" not in line
    assert not out.exists()
