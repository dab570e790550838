"""Property-based test of the CLI (issue 16, "beyond the list"): whatever the options and manifest rows,
``customshift generate`` ends with images and exit 0, or one ``error:`` line, exit 2 and no new file —
never a traceback, never a hang. Few examples per run, on the tiny model, so CI stays fast."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import customshift.generate
from customshift.cli import app

runner = CliRunner()
RUN_TIMEOUT_S = 60  # one CLI run on the tiny model takes seconds; past this it is a hang


@pytest.fixture(scope="module")
def cached_loader():
    """The real loader, called once per distinct arguments: examples differ in options, not in models."""
    real, cache = customshift.generate.load_pipeline, {}

    def load(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **kwargs)
        return cache[key]

    return load


@contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise TimeoutError(f"a CLI run took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def check_outcome(result, root: Path, before: set[Path], out: Path) -> None:
    """Images and exit 0, or exactly one error line, exit 2 and nothing new on disk."""
    assert not isinstance(result.exception, TimeoutError), "hang"
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 0:
        assert not errors, result.output
        images = sorted(out.glob("*.png"))
        assert images and all(p.with_suffix(".json").is_file() for p in images), result.output
    else:
        assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
        assert len(errors) == 1, result.output
        assert files_under(root) == before, f"files written on error: {files_under(root) - before}"


def make_reference(root: Path, kind: str) -> Path:
    path = root / "ref.png"
    if kind == "png":
        random_image(0).save(path)
    elif kind == "text":
        path.write_text("not an image")
    elif kind == "dir":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(root / "ref2.png")
        (root / "ref2.png").symlink_to(path)
    return path  # "missing": nothing there


def make_out(root: Path, kind: str) -> Path:
    if kind == "existing-file":
        (root / "taken").write_text("x")
        return root / "taken"
    if kind == "inside-file":
        (root / "taken").write_text("x")
        return root / "taken" / "out"
    return root / "out"


NUMBERS = {
    "--steps": st.sampled_from(["1", "2", "0", "-1", "1001", "abc", "2.5"]),
    "--height": st.sampled_from(["16", "32", "0", "-8", "30", "1024", "100000", "x"]),
    "--width": st.sampled_from(["16", "32", "0", "-16", "1024"]),
    "--seed": st.sampled_from(["0", "7", "-1", str(2**64 - 1), str(2**64), str(2**70), "1e3"]),
    "--num-images": st.sampled_from(["1", "2", "0", "-2"]),
    "--shift-scale": st.sampled_from(["1", "0", "-1", "nan", "inf", "2.5"]),
    "--guidance-scale": st.sampled_from(["1", "0", "nan", "-inf"]),
    "--reference-guidance-scale": st.sampled_from(["0", "1", "-0.5"]),
    "--device": st.sampled_from(["cpu", "bogus", "cuda", ""]),
    "--dtype": st.sampled_from(["auto", "fp32", "int8"]),
}
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(options=st.fixed_dictionaries({}, optional=NUMBERS),
       prompts=st.lists(st.one_of(st.just("a dog on the beach"), TEXT.map(lambda t: f"a dog {t}"), TEXT),
                        min_size=1, max_size=2),
       subject=st.sampled_from(["dog", "Dog", " ", "", "cat"]),
       reference=st.sampled_from(["png", "png", "png", "missing", "text", "dir", "loop"]),
       out_kind=st.sampled_from(["fresh", "fresh", "existing-file", "inside-file"]))
def test_generate_options_end_in_images_or_one_error_line(tiny_folder, tmp_path_factory, cached_loader,
                                                          monkeypatch, options, prompts, subject, reference,
                                                          out_kind):
    monkeypatch.setattr(customshift.generate, "load_pipeline", cached_loader)
    options.setdefault("--steps", "1")  # keep the runs that generate short
    if options.get("--num-images", "1") not in ("0", "-2"):
        options["--num-images"] = "1"
    root = tmp_path_factory.mktemp("case")
    ref, out = make_reference(root, reference), make_out(root, out_kind)
    args = ["generate", "--model", tiny_folder, "--out", str(out), "--reference", str(ref), "--subject", subject]
    for prompt in prompts:
        args += ["--prompt", prompt]
    for name, value in options.items():
        args += [name, value]
    before = files_under(root)
    with time_limit(RUN_TIMEOUT_S):
        result = runner.invoke(app, args)
    check_outcome(result, root, before, out)


ROW_VALUES = {
    "id": st.sampled_from(["a", "b", "a", "x/../../y", "", "../up", 7, None, "ok.1"]),
    "reference": st.sampled_from(["ref.png", ["ref.png"], [], "", "missing.png", "/proc/self", 3, "loop.png"]),
    "subject": st.sampled_from(["dog", "", "  ", 5, None]),
    "prompt": st.one_of(st.sampled_from(["a dog on the beach", " ", "", 1]), TEXT.map(lambda t: f"a dog {t}")),
    "seed": st.sampled_from([0, 3, -1, 2**64 - 1, 2**64, 2**70, True, 1.5, "4", None]),
}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(rows=st.lists(st.one_of(st.fixed_dictionaries({"id": ROW_VALUES["id"], "reference": ROW_VALUES["reference"],
                                                      "subject": ROW_VALUES["subject"],
                                                      "prompt": ROW_VALUES["prompt"]},
                                                     optional={"seed": ROW_VALUES["seed"]}),
                               st.sampled_from(["{broken", "[]", "null", ""])), min_size=1, max_size=3))
def test_batch_manifests_end_in_images_or_one_error_line(tiny_folder, tmp_path_factory, cached_loader, monkeypatch,
                                                         rows):
    monkeypatch.setattr(customshift.generate, "load_pipeline", cached_loader)
    root = tmp_path_factory.mktemp("batch")
    random_image(1).save(root / "ref.png")
    (root / "loop.png").symlink_to(root / "loop2.png")
    (root / "loop2.png").symlink_to(root / "loop.png")
    manifest = root / "jobs.jsonl"
    manifest.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    out = root / "out"
    before = files_under(root)
    with time_limit(RUN_TIMEOUT_S):
        result = runner.invoke(app, ["generate", "--batch", str(manifest), "--model", tiny_folder, "--out", str(out),
                                     "--steps", "1", "--device", "cpu"])
    check_outcome(result, root, before, out)
