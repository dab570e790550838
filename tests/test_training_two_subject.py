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


def test_subject_reference_dropout_keeps_exactly_one_reference_of_some_two_subject_targets(tiny_pipe, tmp_path):
    track = 'data.track={"clean": 0.5, "two_subject": 0.5}'
    kept = make_trainer(tiny_pipe, tmp_path, track)
    groups = [kept.loader.source.get(i) for i in range(16)]
    two = torch.tensor([g.second is not None for g in groups for _ in g.targets])
    # off by default: the draws (and so every earlier recipe's stream) are as before
    plain = kept.prepare_batch(groups, torch.Generator().manual_seed(0))
    assert not torch.isneginf(plain["log_scale"]).any() and torch.equal(torch.isneginf(plain["second_log_scale"]), ~two)

    trainer = make_trainer(tiny_pipe, tmp_path, track, "train.subject_reference_dropout=1")
    batch = trainer.prepare_batch(groups, torch.Generator().manual_seed(0))
    first_off, second_off = torch.isneginf(batch["log_scale"]).cpu(), torch.isneginf(batch["second_log_scale"]).cpu()
    assert not first_off[~two].any()  # one-subject targets keep their reference
    assert torch.equal((first_off ^ second_off)[two], torch.ones(int(two.sum()), dtype=torch.bool))
    assert first_off[two].any() and second_off[two].any()  # either one, not always the same
    # the routing loss skips rows without both references; the step still trains
    assert math.isfinite(trainer.train_step([groups[:4]])["loss"])

    # with the whole reference dropped, nothing is switched back on
    both = make_trainer(tiny_pipe, tmp_path, track, "train.subject_reference_dropout=1", "train.reference_dropout=1")
    batch = both.prepare_batch(groups, torch.Generator().manual_seed(0))
    assert torch.isneginf(batch["log_scale"]).all() and torch.isneginf(batch["second_log_scale"]).all()


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


def test_routing_masks_cover_each_subjects_box_in_token_space(tiny_pipe, tmp_path):
    from customshift.sprites import synthetic

    trainer = make_trainer(tiny_pipe, tmp_path, "data.track=two_subject", "train.routing_loss_weight=0.1")
    groups = [trainer.loader.source.get(i) for i in range(2)]
    batch = trainer.prepare_batch(groups, torch.Generator().manual_seed(0))
    masks = batch["route_masks"]
    patch = trainer.pipe.transformer.config.patch_size
    side = batch["target_latents"].shape[-1] // patch
    assert masks.shape == (sum(len(g.targets) for g in groups), 2, side * side)
    row = 0
    for group in groups:
        for pair in group.pairs:
            for k, context in enumerate(pair.target_contexts):
                x0, y0, s = synthetic.sprite_box(context)
                cell = synthetic.CANVAS / side  # a token's side in canvas pixels
                starts = torch.arange(side) * cell
                overlap_x = ((starts + cell).clamp(max=x0 + s) - starts.clamp(min=x0)).clamp(min=0) / cell
                overlap_y = ((starts + cell).clamp(max=y0 + s) - starts.clamp(min=y0)).clamp(min=0) / cell
                expected = (overlap_y[:, None] * overlap_x[None, :] >= 0.5).float()  # half a token's pixels
                assert expected.sum() > 0
                assert torch.equal(masks[row, k].view(side, side).cpu(), expected)
            assert not bool((masks[row, 0] * masks[row, 1]).any())  # the two boxes are apart
            row += 1


def test_routing_loss_is_log2_at_no_preference_and_vanishes_when_each_region_routes_to_its_own():
    from customshift.training.objective import routing_loss

    masks = torch.zeros(2, 2, 6)
    masks[:, 0, :2], masks[:, 1, 3:5] = 1, 1
    valid = torch.tensor([True, True])
    flat = [[torch.zeros(2, 6), torch.zeros(2, 6)]]
    assert float(routing_loss(flat, masks, valid)) == pytest.approx(math.log(2))
    routed = torch.zeros(2, 6)
    routed[:, :2], routed[:, 3:5] = 30.0, -30.0  # beta_A - beta_B: large in A's region, negative in B's
    assert float(routing_loss([[routed, torch.zeros(2, 6)]], masks, valid)) < 1e-10
    assert float(routing_loss([[-routed, torch.zeros(2, 6)]], masks, valid)) == pytest.approx(30.0, rel=1e-6)
    # rows that are not valid (a dropped reference or name) do not count, and -inf shifts give no NaN
    off = [[torch.full((2, 6), -math.inf), torch.zeros(2, 6)]]
    assert float(routing_loss(off, masks, torch.tensor([False, False]))) == 0.0
    mixed = [[torch.stack([routed[0], torch.full((6,), -math.inf)]), torch.zeros(2, 6)]]
    assert float(routing_loss(mixed, masks, torch.tensor([True, False]))) < 1e-10


@pytest.mark.parametrize("checkpointing", [False, True])
def test_routing_loss_trains_the_shift_and_the_queries_with_and_without_checkpointing(tiny_pipe, tmp_path,
                                                                                     checkpointing):
    trainer = make_trainer(tiny_pipe, tmp_path, "data.track=two_subject", "train.routing_loss_weight=1.0",
                           f"model.gradient_checkpointing={str(checkpointing).lower()}",
                           "model.customshift={generation_lora_rank: 4, lora_rank: 4}")
    groups = [trainer.loader.source.get(i) for i in range(2)]
    batch = trainer.prepare_batch(groups, torch.Generator().manual_seed(0))
    gamma = trainer.pipe.reference_branch.shift.gamma

    def gradient(b):
        trainer.objective.zero_grad(set_to_none=False)
        gamma.grad = None
        loss, _ = trainer.objective(b)
        loss.backward()
        return float(loss), gamma.grad.clone()

    with_routing, grad_routing = gradient(batch)
    without = {k: v for k, v in batch.items() if k != "route_masks"}
    plain, grad_plain = gradient(without)
    assert with_routing > plain  # the routing term is added (and positive)
    assert not torch.allclose(grad_routing, grad_plain)  # it reaches the per-layer gamma_l
    assert torch.isfinite(grad_routing).all()
    # with a generation LoRA it reaches the queries that m_ik is computed from (the frozen base's m_ik cannot move)
    lora = [p for n, p in trainer.pipe.transformer.named_parameters() if "to_q.lora_B" in n]
    gradient(batch)
    routed_query = torch.cat([p.grad.flatten() for p in lora])
    gradient(without)
    assert not torch.allclose(routed_query, torch.cat([p.grad.flatten() for p in lora]))


def test_routing_loss_weight_zero_is_the_objective_it_was(tiny_pipe, tmp_path):
    trainer = make_trainer(tiny_pipe, tmp_path, "data.track=two_subject")
    groups = [trainer.loader.source.get(i) for i in range(2)]
    batch = trainer.prepare_batch(groups, torch.Generator().manual_seed(0))
    assert "route_masks" not in batch
    routed = make_trainer(tiny_pipe, tmp_path / "b", "data.track=two_subject", "train.routing_loss_weight=0.5")
    batch_b = routed.prepare_batch(groups, torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed.objective.routing_weight = 0.0
        assert float(routed.objective(batch_b)[0]) == float(trainer.objective(batch)[0])

