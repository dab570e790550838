"""The packaged default model: loads offline with its CustomShift weights and drives `customshift demo`."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from customshift.cli import app
from customshift.default_model import DEFAULT_MODEL_DIR, default_weights_path, load_default_pipeline


def test_default_model_ships_with_its_weights_and_recipe():
    assert (DEFAULT_MODEL_DIR / "model_index.json").is_file()
    recipe = json.loads((DEFAULT_MODEL_DIR / "RECIPE.json").read_text())
    assert recipe["step"] > 0 and "scripts/train_default_model.sh" in recipe["recipe"]
    pipe = load_default_pipeline()
    assert pipe.weights_fingerprint != "training-free"
    assert pipe.customshift_config.max_sequence_length == 16
    manifest = json.loads((default_weights_path() / "customshift.json").read_text())
    assert manifest["base_fingerprint"] == pipe.base_fingerprint


def test_demo_and_generate_run_on_the_default_model(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--n", "2", "--steps", "2"])
    assert result.exit_code == 0, result.output
    grid = Image.open(tmp_path / "demo" / "demo.png")
    assert grid.width > 3 * 64
    result = runner.invoke(app, ["generate", "--reference", str(tmp_path / "demo" / "demo.png"), "--subject", "robot",
                                 "--prompt", "a small robot on a pink background, top left", "--steps", "2",
                                 "--out", str(tmp_path / "gen")])
    assert result.exit_code == 0, result.output
    assert Image.open(next((tmp_path / "gen").glob("*.png"))).size == (64, 64)
    sidecar = json.loads(next((tmp_path / "gen").glob("*.json")).read_text())
    assert sidecar["guidance_scale"] == 2.0  # the default model's guidance, not SD3's 7


def test_demo_shows_the_layout_asked_for(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--n", "1", "--steps", "1",
                                      "--layout", "same_layout"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo-same_layout.png").is_file() and not (tmp_path / "demo.png").exists()


def test_the_shipped_model_reads_its_reference():
    """Held-out subjects that keep their place: the right reference recovers far more cells than a wrong one."""
    import torch

    from customshift.sprites import synthetic
    from customshift.sprites.probe import colour_recovery

    torch.manual_seed(0)
    pairs = synthetic.evaluation_split(n=8, layout="same_layout")
    result = colour_recovery(load_default_pipeline(), pairs, (0.7,))
    assert result["right"]["0.7"] > result["wrong"]["0.7"] + 0.15
    assert result["right"]["0.7"] > result["none"]["0.7"] + 0.15


def test_compare_models_scores_the_same_pairs_as_evaluate_synthetic(tmp_path):
    """scripts/compare_models.py: a model against itself ties on every pair, at evaluate synthetic's mean."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from compare_models import compare

    from customshift.sprites.evaluate import evaluate_synthetic

    model = str(DEFAULT_MODEL_DIR)
    report = compare(model, model, n=3, tracks=["clean"], steps=2, guidance_scale=2.0, seed=0)["clean"]
    assert (report["tie"], report["b_better"], report["b_worse"]) == (3, 0, 0)
    assert report["difference"] == 0 and report["identity_a"] == report["identity_b"]
    summary = evaluate_synthetic(load_default_pipeline(), tmp_path, n=3, tracks=["clean"], steps=2, guidance_scale=2.0)
    assert report["identity_a"] == summary["clean"]["identity"]
