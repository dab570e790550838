"""Resume equals an uninterrupted run; broken or partial checkpoints are never picked."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from customshift.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tiny-smoke.yaml"

# Every piece of resumable state is exercised: LoRA on both branches, shift parameters, AdamW moments,
# a warmup + cosine schedule, EMA, condition dropout and noise (RNG), prefetching threads, accumulation
# and the curriculum (data position).
RECIPE = (
    "model.customshift.generation_lora_rank=2",
    "train.ema_decay=0.9",
    "train.lr_scheduler=cosine",
    "train.lr_warmup_steps=2",
    "train.gradient_accumulation_steps=2",
    "train.prompt_dropout=0.3",
    "train.reference_dropout=0.3",
    "data.num_workers=2",
    "checkpoint.every_steps=2",
    "train.log_every=1",
)


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.set_num_threads(1)
    from customshift.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


def run(tiny_pipe, output: Path, max_steps: int, resume=False):
    from customshift.training.trainer import Trainer

    config = load_config(SMOKE, [f"output_dir={output}", f"train.max_steps={max_steps}", *RECIPE])
    trainer = Trainer(config, resume=resume, pipe=copy.deepcopy(tiny_pipe))
    trainer.train()
    return trainer


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_pipe, tmp_path):
    straight = run(tiny_pipe, tmp_path / "a", 4)
    run(tiny_pipe, tmp_path / "b", 2)
    resumed = run(tiny_pipe, tmp_path / "b", 4, resume=True)
    assert resumed.step == 4
    for name, param in straight.trainable.items():
        torch.testing.assert_close(resumed.trainable[name], param, rtol=1e-6, atol=1e-7, msg=name)
    for name, value in straight.ema.items():
        torch.testing.assert_close(resumed.ema[name], value, rtol=1e-6, atol=1e-7)
    assert resumed.loader.cursor == straight.loader.cursor
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in opt_a:
        torch.testing.assert_close(opt_b[key]["exp_avg_sq"], opt_a[key]["exp_avg_sq"], rtol=1e-6, atol=1e-10)
    # The log of the resumed run continues the first one's, without duplicated steps.
    steps = [line.split(",")[0] for line in (tmp_path / "b" / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]
    assert (tmp_path / "b" / "ckpt-0000004" / "generation_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "b" / "final" / "customshift" / "customshift.json").is_file()


def test_fresh_run_refuses_a_folder_with_checkpoints(tiny_pipe, tmp_path):
    from customshift.training.config import ConfigError

    run(tiny_pipe, tmp_path / "c", 2)
    with pytest.raises(ConfigError, match="--resume"):
        run(tiny_pipe, tmp_path / "c", 2)


def test_broken_latest_and_partial_checkpoints_fall_back(tiny_pipe, tmp_path):
    from customshift.training.trainer import find_checkpoint, load_pipeline_from_checkpoint

    folder = tmp_path / "d"
    run(tiny_pipe, folder, 4)  # ckpt-0000002, ckpt-0000004 (keep_last 2)
    assert find_checkpoint(folder).name == "ckpt-0000004"
    # A kill while the next checkpoint was being written leaves a hidden temp folder: never chosen.
    partial = folder / ".tmp-ckpt-0000006"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    (folder / "latest").write_text("ckpt-0000009\n")  # points nowhere
    assert find_checkpoint(folder).name == "ckpt-0000004"
    (folder / "latest").write_bytes(b"")
    assert find_checkpoint(folder).name == "ckpt-0000004"
    # Killed after publishing ckpt-4 but before updating 'latest': the newer complete one wins.
    (folder / "latest").write_text("ckpt-0000002\n")
    assert find_checkpoint(folder).name == "ckpt-0000004"
    # A checkpoint folder whose file no longer matches its index is not complete.
    weights = folder / "ckpt-0000004" / "trainable.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    assert find_checkpoint(folder).name == "ckpt-0000002"
    index = json.loads((folder / "ckpt-0000002" / "checkpoint.json").read_text())
    assert {"accelerate/optimizer.bin", "accelerate/custom_checkpoint_0.pkl", "customshift/customshift.safetensors",
            "trainable.safetensors", "ema.safetensors"} <= set(index["files"])  # save_state inside, exports beside
    pipe = load_pipeline_from_checkpoint(folder)
    assert pipe.customshift_config.generation_lora_rank == 2
    # Resuming cleans the temp folder and continues from the newest complete checkpoint.
    resumed = run(tiny_pipe, folder, 3, resume=True)
    assert resumed.step == 3 and not partial.exists()
    assert (folder / "latest").read_text().strip() == "ckpt-0000003"


def test_a_run_written_in_the_first_checkpoint_layout_resumes_exactly(tiny_pipe, tmp_path):
    """tests/fixtures/legacy-run was written by the trainer before save_state (layout 1), stopped at step 2; resuming
    it to step 4 gives the weights and EMA that trainer reached training straight to step 4."""
    import shutil

    from safetensors.torch import load_file

    from customshift.training.trainer import find_checkpoint, load_pipeline_from_checkpoint

    fixture = Path(__file__).parent / "fixtures" / "legacy-run"
    folder = tmp_path / "legacy"
    shutil.copytree(fixture, folder)
    assert json.loads((folder / "ckpt-0000002" / "checkpoint.json").read_text())["format"] == "customshift-checkpoint/1"
    assert find_checkpoint(folder).name == "ckpt-0000002"
    assert load_pipeline_from_checkpoint(folder).customshift_config.generation_lora_rank == 2
    resumed = run(tiny_pipe, folder, 4, resume=True)
    assert resumed.step == 4
    expected = load_file(str(fixture / "expected-step4-trainable.safetensors"))
    expected_ema = load_file(str(fixture / "expected-step4-ema.safetensors"))
    assert expected.keys() == resumed.trainable.keys()
    for name, param in resumed.trainable.items():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(resumed.ema[name], expected_ema[name], rtol=1e-5, atol=1e-6, msg=name)
    # Its new checkpoints are in today's layout, and the run goes on from them.
    new = find_checkpoint(folder)
    assert new.name == "ckpt-0000004"
    assert json.loads((new / "checkpoint.json").read_text())["format"] == "customshift-checkpoint/2"
    assert (new / "accelerate" / "optimizer.bin").is_file() and not (new / "optimizer.pt").exists()
