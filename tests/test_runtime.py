"""The pipeline at run time: several subjects, the parent's own __call__, offload, processors, LoRA, compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_tiny, random_image
from test_pipeline import PROMPT, generate, randomize_adapter  # noqa: F401 - PROMPT for later tests

from customshift.attention import CADSState, ReferenceSet, _shift_logits
from customshift.errors import PromptError

TWO = "a robot next to a tree"


@pytest.fixture
def trained_pipe(tiny_folder):
    pipe = load_tiny(tiny_folder)
    randomize_adapter(pipe)
    return pipe


# ----------------------------------------------------------------------------------------------------------
# Several subjects (issue 18): docs/method.md, "Several subjects"


@pytest.mark.parametrize("reference_guidance_scale", [0.0, 2.0])
def test_one_subject_in_a_list_is_the_single_subject_path_exactly(trained_pipe, reference_guidance_scale):
    robot = trained_pipe.encode_subject(random_image(1), "robot")
    single = generate(trained_pipe, TWO, subject=robot, reference_guidance_scale=reference_guidance_scale)
    listed = generate(trained_pipe, TWO, subject=[robot], shift_scale=[1.0],
                      reference_guidance_scale=reference_guidance_scale)
    assert np.array_equal(single, listed)


@pytest.mark.parametrize("reference_guidance_scale", [0.0, 2.0])
def test_a_second_subject_at_shift_zero_is_the_single_subject_image_exactly(trained_pipe, reference_guidance_scale):
    robot = trained_pipe.encode_subject(random_image(1), "robot")
    tree = trained_pipe.encode_subject(random_image(2), "tree")
    single = generate(trained_pipe, TWO, subject=robot, reference_guidance_scale=reference_guidance_scale)
    both = generate(trained_pipe, TWO, subject=[robot, tree], shift_scale=[1.0, 0.0],
                    reference_guidance_scale=reference_guidance_scale)
    assert np.array_equal(single, both)
    assert np.abs(generate(trained_pipe, TWO, subject=[robot, tree]) - single).max() > 1e-4


def test_two_subjects_differ_from_each_alone_and_recompute_equals_cache(trained_pipe):
    robot = trained_pipe.encode_subject(random_image(1), "robot")
    tree = trained_pipe.encode_subject(random_image(2), "tree")
    both = generate(trained_pipe, TWO, subject=[robot, tree], shift_scale=[1.0, 2.0])
    assert np.abs(both - generate(trained_pipe, TWO, subject=tree, shift_scale=2.0)).max() > 1e-4
    recomputed = generate(trained_pipe, TWO, subject=[robot, tree], shift_scale=[1.0, 2.0], recompute_subject=True)
    assert np.array_equal(both, recomputed)
    with pytest.raises(PromptError, match="one per subject"):
        generate(trained_pipe, TWO, subject=[robot, tree], shift_scale=[1.0])


def test_each_subject_shift_follows_its_own_name_tokens():
    # Image queries 0..2 point at text token 0 (the robot's name), 3..5 at token 1 (the tree's).
    heads, dim = 2, 4
    text_key = torch.zeros(1, heads, 3, dim)
    text_key[..., 0, 0], text_key[..., 1, 1] = 4.0, 4.0
    query = torch.zeros(1, heads, 6, dim)
    query[..., :3, 0], query[..., 3:, 1] = 4.0, 4.0
    weights = [torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 1.0, 0]])]
    refs = [ReferenceSet({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, torch.zeros(1), w) for w in weights]
    state = CADSState(refs, beta={"a": torch.tensor(0.0)}, gamma={"a": torch.tensor(3.0)})
    robot, tree = (_shift_logits(state, i, "a", query, text_key)[0] for i in range(2))
    assert (robot[:3] > tree[:3] + 2).all() and (tree[3:] > robot[3:] + 2).all()
    # The negative pass of guidance (leading rows of a larger batch) has no subject tokens: m_i = 1.
    doubled = _shift_logits(state, 0, "a", query.repeat(2, 1, 1, 1), text_key.repeat(2, 1, 1, 1))
    assert torch.allclose(doubled[0], torch.full((6,), 3.0)) and torch.equal(doubled[1], robot)
    assert math.isclose(float(robot.max()), 3.0, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Devices and offload (issue 19 item 2). diffusers allows model offload on CPU with device="cpu" (hooks,
# no real move). Sequential offload fails on CPU for the parent pipeline too (accelerate 1.15 with torch 2.13:
# moving a parameter back to meta raises), so it is checked on a GPU: scripts/offload_check.py.


def test_model_offload_gives_the_same_image_with_a_subject(tiny_folder):
    pipe = load_tiny(tiny_folder)
    randomize_adapter(pipe)
    expected = generate(pipe, subject=pipe.encode_subject(random_image(3), "dog"), reference_guidance_scale=1.5)
    pipe.enable_model_cpu_offload(device="cpu")
    subject = pipe.encode_subject(random_image(3), "dog")
    for scale in (0.0, 1.5):
        image = generate(pipe, subject=subject, reference_guidance_scale=scale)
        assert image.shape == expected.shape
    assert np.abs(image - expected).max() <= 1e-5


def test_pipe_to_dtype_moves_the_branch_but_branch_to_leaves_the_shared_layers(tiny_pipe):
    branch = randomize_adapter(tiny_pipe)
    lora = next(p for n, p in branch.named_parameters() if "lora_A" in n)
    branch.to(torch.float64)
    assert lora.dtype == torch.float64 and branch.shift.beta.dtype == torch.float64
    assert tiny_pipe.transformer.dtype == torch.float32  # the shared base layers did not move
    tiny_pipe.to(torch.bfloat16)
    assert lora.dtype == torch.bfloat16 and tiny_pipe.transformer.dtype == torch.bfloat16
    subject = tiny_pipe.encode_subject(random_image(0), "dog")
    assert next(iter(subject.keys.values())).dtype == torch.bfloat16
    assert np.isfinite(generate(tiny_pipe, subject=subject, steps=2)).all()
