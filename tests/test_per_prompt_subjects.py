"""Each prompt its own subject(s) in one batched call: the same images as one call per prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

from customshift.batching import generate_batch
from customshift.errors import PromptError

PROMPTS = ["a dog on the beach", "a cat in the snow", "a dog and a cat"]


def _call(pipe, prompts, subject, seeds, **kwargs):
    return np.stack(generate_batch(pipe, subject, prompts, seeds, num_inference_steps=3, output_type="np",
                                   **kwargs))


@pytest.fixture(scope="module")
def subjects(tiny_folder):
    from conftest import load_tiny

    pipe = load_tiny(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    dog, cat = (pipe.encode_subject(random_image(seed), name) for seed, name in ((0, "dog"), (1, "cat")))
    return pipe, dog, cat


@pytest.mark.parametrize("guidance", [{"guidance_scale": 1.0}, {"guidance_scale": 3.0},
                                      {"guidance_scale": 3.0, "reference_guidance_scale": 1.5}])
def test_per_prompt_subjects_equal_one_call_per_prompt(subjects, guidance):
    pipe, dog, cat = subjects
    alone = np.concatenate([_call(pipe, [PROMPTS[0]], dog, [3], **guidance),
                            _call(pipe, [PROMPTS[1]], cat, [4], **guidance)])
    batched = _call(pipe, PROMPTS[:2], [[dog], [cat]], [3, 4], **guidance)
    assert np.array_equal(batched, alone)
    assert not np.array_equal(batched[0], _call(pipe, [PROMPTS[0]], None, [3], **guidance)[0])  # the subject acts


def test_several_subjects_per_prompt_and_the_one_prompt_form(subjects):
    pipe, dog, cat = subjects
    both = _call(pipe, [PROMPTS[2]], [dog, cat], [5], guidance_scale=2.0)
    assert np.array_equal(_call(pipe, [PROMPTS[2]], [[dog, cat]], [5], guidance_scale=2.0), both)
    batched = _call(pipe, [PROMPTS[0], PROMPTS[2]], [[dog, cat], [dog, cat]], [3, 5], guidance_scale=2.0,
                    shift_scale=[1.0, 0.5])
    assert np.array_equal(batched[1], _call(pipe, [PROMPTS[2]], [dog, cat], [5], guidance_scale=2.0,
                                            shift_scale=[1.0, 0.5])[0])


def test_per_prompt_subjects_are_checked(subjects):
    pipe, dog, cat = subjects
    with pytest.raises(PromptError, match="same number of subjects"):
        pipe(PROMPTS[:2], subject=[[dog], [dog, cat]], num_inference_steps=1)
    with pytest.raises(PromptError, match="2 subject lists for 3 prompts"):
        pipe(PROMPTS, subject=[[dog], [cat]], num_inference_steps=1)
    with pytest.raises(PromptError, match="recompute_subject"):
        pipe(PROMPTS[:2], subject=[[dog], [cat]], recompute_subject=True, num_inference_steps=1)
    big = pipe.encode_subject([random_image(2), random_image(3)], "cat")  # two references: twice the keys
    with pytest.raises(PromptError, match="same size and count"):
        pipe(PROMPTS[:2], subject=[[dog], [big]], num_inference_steps=1)


def test_evaluate_synthetic_batches_give_the_same_images():
    from customshift.sprites.evaluate import generate_pairs, track_pairs
    from customshift.sprites.model import build_sprite_pipeline

    torch.manual_seed(0)
    pipe = build_sprite_pipeline(num_layers=1)
    for track in ("clean", "two-subject"):
        pairs = track_pairs(track, 5)
        one = generate_pairs(pipe, pairs, steps=2, guidance_scale=2.0, seed=7)
        assert all(np.array_equal(a, b) for a, b in zip(one, generate_pairs(
            pipe, pairs, steps=2, guidance_scale=2.0, seed=7, batch_size=3), strict=True)), track


def test_per_prompt_subjects_with_several_images_per_prompt(subjects):
    """Rows are prompt-major: prompt k's images all carry prompt k's subject and its name's relevance."""
    pipe, dog, cat = subjects

    def images(prompts, subject, seed):
        out = pipe(prompts, subject=subject, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0,
                   output_type="np", generator=torch.Generator().manual_seed(seed))
        return out.images

    prompts = [PROMPTS[0], PROMPTS[2]]  # the names sit at different tokens: rows must follow their own prompt
    batched = images(prompts, [[dog], [cat]], 7)
    assert batched.shape[0] == 4
    with_dog_everywhere = images(prompts, [[dog], [dog]], 7)
    with_cat_everywhere = images(prompts, [[cat], [cat]], 7)
    assert np.array_equal(batched[:2], with_dog_everywhere[:2])  # the same noise, the same subject: the same rows
    assert np.array_equal(batched[2:], with_cat_everywhere[2:])
    assert not np.array_equal(batched[2:], with_dog_everywhere[2:])
