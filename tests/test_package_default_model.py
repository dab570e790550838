"""scripts/package_default_model.py reads runs of both checkpoint layouts (the stage-7 run was started in the first)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "legacy-run"


@pytest.fixture(scope="module")
def package():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import package_default_model
    finally:
        sys.path.pop(0)
    return package_default_model.package


def test_packages_a_first_layout_run_and_a_new_one(package, tmp_path):
    from customshift.tiny import build_tiny_pipeline
    from customshift.training.config import load_config
    from customshift.training.trainer import Trainer

    torch.set_num_threads(1)
    legacy = tmp_path / "legacy"
    shutil.copytree(FIXTURE, legacy)
    dest = package(legacy, tmp_path / "packaged-legacy")
    recipe = json.loads((dest / "RECIPE.json").read_text())
    assert recipe["checkpoint"] == "ckpt-0000002" and recipe["step"] == 2
    assert (dest / "model_index.json").is_file() and (dest / "customshift" / "customshift.json").is_file()
    assert (dest / "transformer" / "diffusion_pytorch_model.safetensors").is_file()

    run = tmp_path / "new"
    config = load_config(ROOT / "configs" / "tiny-smoke.yaml", [f"output_dir={run}", "train.max_steps=2",
                                                                 "train.ema_decay=0.9", "checkpoint.every_steps=2"])
    Trainer(config, pipe=copy.deepcopy(build_tiny_pipeline("sd3"))).train()
    assert json.loads((run / "ckpt-0000002" / "checkpoint.json").read_text())["format"] == "customshift-checkpoint/2"
    dest = package(run, tmp_path / "packaged-new")
    assert json.loads((dest / "RECIPE.json").read_text())["step"] == 2
    from safetensors.torch import load_file

    ema = load_file(str(run / "ckpt-0000002" / "ema.safetensors"))
    packaged = load_file(str(dest / "customshift" / "customshift.safetensors"))
    for name in ("beta", "gamma"):  # the EMA weights are what is packaged
        torch.testing.assert_close(packaged[f"shift.{name}"].float(), ema[f"branch.shift.{name}"], rtol=1e-5, atol=1e-6)
