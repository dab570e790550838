"""Training on two-subject targets (synthetic spec version 2): two reference sets in one CADS forward."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from customshift.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "tiny-smoke.yaml"
NO_DROPOUT = ("train.prompt_dropout=0", "train.reference_dropout=0", "train.both_dropout=0")


@pytest.fixture(scope="module")
def tiny_pipe():
    from customshift.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


def make_trainer(tiny_pipe, tmp_path: Path, *overrides: str):
    from customshift.training.trainer import Trainer

    config = load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", "data.curriculum=[]", "checkpoint.every_steps=0",
                                 *NO_DROPOUT, *overrides])
    return Trainer(config, resume=False, pipe=copy.deepcopy(tiny_pipe))


def test_two_subject_groups_carry_both_references_and_prompts(tiny_pipe, tmp_path):
    trainer = make_trainer(tiny_pipe, tmp_path, 'data.track={"clean": 0.5, "two_subject": 0.5}')
    groups = [trainer.loader.source.get(i) for i in range(12)]
    two = [g for g in groups if g.second is not None]
    assert two and len(two) < len(groups)
    for g in two:
        name_b = g.second[1]
        assert name_b != g.subject and all(f" {g.subject} " in p and f" {name_b} " in p for p in g.prompts)

    batch = trainer.prepare_batch(groups, torch.Generator().manual_seed(0))
    n_targets = sum(len(g.targets) for g in groups)
    assert batch["reference_latents"].shape[0] == len(groups) + len(two)  # one branch pass over every reference
    assert batch["second_index"].shape == (n_targets,)
    off = torch.isneginf(batch["second_log_scale"])
    expected_off = torch.tensor([g.second is None for g in groups for _ in g.targets])
    assert torch.equal(off.cpu(), expected_off)
    # the second set's subject relevance is its own name's tokens, only where there is a second subject
    assert torch.all(batch["second_weights"][expected_off] == 0)
    assert torch.all(batch["second_weights"][~expected_off].sum(-1) > 0)


def test_the_second_reference_set_is_read_and_trained(tiny_pipe, tmp_path):
    trainer = make_trainer(tiny_pipe, tmp_path, "data.track=two_subject", "model.customshift.beta_init=3.0")
    groups = [trainer.loader.source.get(i) for i in range(2)]
    base = trainer.loss_on(groups)
    # another image as the second reference changes the loss: the second set reaches the generation branch
    swapped = [dataclasses.replace(g, second=(g.reference, g.second[1])) for g in groups]
    assert trainer.loss_on(swapped) != pytest.approx(base, rel=1e-6, abs=0)
    # with the second set switched off, the loss is the one-subject objective (softmax(0, l, -inf) = sigmoid)
    batch = trainer.prepare_batch(groups, torch.Generator().manual_seed(0))
    one = {k: v for k, v in batch.items() if not k.startswith("second_")}
    batch["second_log_scale"] = torch.full_like(batch["second_log_scale"], -math.inf)
    with torch.no_grad():
        assert float(trainer.objective(batch)[0]) == pytest.approx(float(trainer.objective(one)[0]), rel=1e-5)
    metrics = trainer.train_step([groups])
    assert math.isfinite(metrics["loss"])
