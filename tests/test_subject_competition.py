"""The subjects' competition (CustomShiftConfig.subject_competition): kappa_l times each name's centred score.

docs/method.md, "Several subjects": zero at the start (the same model), nothing for one subject, and with
kappa > 0 each query's reference mass moves to the subject whose name it matches best.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tiny, random_image
from test_pipeline import generate, randomize_adapter
from test_runtime import two_name_state

from customshift.attention import _shift_logits, compete

TWO = "a robot next to a tree"


def _pipes(tiny_folder):
    plain, competing = load_tiny(tiny_folder), load_tiny(tiny_folder)
    randomize_adapter(plain)
    randomize_adapter(competing, subject_competition=True)
    return plain, competing


def _subjects(pipe):
    return [pipe.encode_subject(random_image(1), "robot"), pipe.encode_subject(random_image(2), "tree")]


def test_kappa_zero_is_the_model_without_competition_and_one_subject_is_never_affected(tiny_folder):
    plain, competing = _pipes(tiny_folder)
    assert competing.reference_branch.shift.kappa is not None and plain.reference_branch.shift.kappa is None
    assert np.array_equal(generate(plain, TWO, subject=_subjects(plain)),
                          generate(competing, TWO, subject=_subjects(competing)))
    with torch.no_grad():
        competing.reference_branch.shift.kappa.fill_(5.0)
    competing.customshift_weights_changed()
    robot = competing.encode_subject(random_image(1), "robot")
    assert np.array_equal(generate(plain, TWO, subject=plain.encode_subject(random_image(1), "robot")),
                          generate(competing, TWO, subject=robot))  # one subject: nothing to compete with
    assert not np.array_equal(generate(plain, TWO, subject=_subjects(plain)),
                              generate(competing, TWO, subject=_subjects(competing)))


def test_each_query_moves_to_the_subject_whose_name_it_matches():
    state, query, text_key = two_name_state(gamma=0.0)  # queries 0..2 match the robot's name, 3..5 the tree's
    (robot, s_robot), (tree, s_tree) = (_shift_logits(state, i, "a", query, text_key, True) for i in range(2))
    assert torch.equal(robot, tree)  # gamma 0: no preference from m_ik
    moved = compete([robot, tree], [s_robot, s_tree], torch.tensor(0.5))
    gap = moved[0] - moved[1]
    assert (gap[0, :3] > 3).all() and (gap[0, 3:] < -3).all()
    assert torch.allclose(moved[0] + moved[1], robot + tree)  # centred: the two shifts' sum is unchanged
    # rows without names (guidance's negative pass) score 0 for both: no change
    empty = [torch.zeros(1, 6), torch.zeros(1, 6)]
    assert all(torch.equal(a, b) for a, b in zip(compete([robot, tree], empty, torch.tensor(3.0)), [robot, tree],
                                                 strict=True))


def test_weights_with_kappa_round_trip_and_older_weights_load_without_it(tiny_folder, tmp_path):
    _, competing = _pipes(tiny_folder)
    with torch.no_grad():
        kappa = competing.reference_branch.shift.kappa
        kappa.copy_(torch.linspace(0.5, 2.0, kappa.numel()))
    competing.customshift_weights_changed()
    competing.save_customshift(tmp_path / "competing")
    loaded = load_tiny(tiny_folder)
    loaded.load_customshift(tmp_path / "competing")
    assert loaded.customshift_config.subject_competition
    assert torch.equal(loaded.reference_branch.shift.kappa, competing.reference_branch.shift.kappa)
    assert np.array_equal(generate(loaded, TWO, subject=_subjects(loaded)),
                          generate(competing, TWO, subject=_subjects(competing)))
    plain = load_tiny(tiny_folder)
    randomize_adapter(plain)
    plain.save_customshift(tmp_path / "plain")
    assert "shift.kappa" not in plain.customshift_state_dict()
    loaded.load_customshift(tmp_path / "plain")  # weights saved without the competition load as before
    assert loaded.reference_branch.shift.kappa is None and not loaded.customshift_config.subject_competition


@pytest.fixture(scope="module")
def tiny_train_pipe():
    from customshift.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd3")


def test_a_later_stage_turns_the_competition_on_and_the_routing_loss_trains_kappa(tiny_train_pipe, tmp_path):
    from test_training_two_subject import make_trainer

    first = make_trainer(tiny_train_pipe, tmp_path / "a", "data.track=two_subject")
    weights = first.pipe.save_customshift(tmp_path / "weights")
    groups = [first.loader.source.get(i) for i in range(2)]
    later = make_trainer(tiny_train_pipe, tmp_path / "b", "data.track=two_subject", "train.routing_loss_weight=1.0",
                         f"model.customshift_weights={weights}", "model.customshift={subject_competition: true}")
    kappa = later.pipe.reference_branch.shift.kappa
    assert later.pipe.customshift_config.subject_competition and kappa.requires_grad
    assert float(kappa.detach().abs().sum()) == 0
    assert torch.equal(later.pipe.reference_branch.shift.beta, first.pipe.reference_branch.shift.beta)
    batch = first.prepare_batch(groups, torch.Generator().manual_seed(0))
    with torch.no_grad():  # kappa = 0: the same objective as the stage it starts from
        later.objective.routing_weight = 0.0
        assert float(later.objective(batch)[0]) == float(first.objective(batch)[0])
    later.objective.routing_weight = 1.0
    batch = later.prepare_batch(groups, torch.Generator().manual_seed(0))
    loss, _ = later.objective(batch)
    loss.backward()
    assert kappa.grad is not None and float(kappa.grad.abs().sum()) > 0
    assert any(id(kappa) in {id(p) for p in group["params"]} and group["weight_decay"] == 0.0
               for group in later.optimizer.param_groups)
