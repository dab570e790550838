"""First contact (issue 19 item 7): no --model and a photo subject gives one line saying so, and the console
holds only our own messages unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import random_image

from customshift.sprites.model import domain_note


def test_the_domain_note_names_what_is_outside_the_sprite_domain():
    assert domain_note(["robot"], ["a small robot on a pink background, top left"]) is None
    note = domain_note(["dog"], ["a dog on the beach"])
    assert note is not None and "'dog'" in note and "--model" in note and "\n" not in note
    assert "'beach'" in domain_note(["robot"], ["a robot on the beach"])


def test_first_contact_prints_our_own_lines_only(tmp_path):
    random_image(0, size=48).save(tmp_path / "dog.jpg")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DIFFUSERS_VERBOSITY", None), env.pop("TRANSFORMERS_VERBOSITY", None)
    result = subprocess.run(
        [sys.executable, "-m", "customshift", "generate", "--reference", str(tmp_path / "dog.jpg"), "--subject", "dog",
         "--prompt", "a dog on the beach", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "'dog'" in notes[0] and "--model" in notes[0]
    for noise in ("torchvision", "torch_dtype", "deprecated", "Loading pipeline components", "Loading weights",
                  "WARNING", "Warning"):
        assert noise not in result.stderr + result.stdout, noise
    assert list((tmp_path / "out").glob("*.png"))


def test_verbose_is_a_global_option_and_encode_offers_compact():
    from typer.testing import CliRunner

    from customshift.cli import app

    result = CliRunner().invoke(app, ["--verbose", "encode", "--help"])
    assert result.exit_code == 0 and "--compact" in result.output
