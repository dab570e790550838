"""CustomShiftPipeline on tiny SD3 / SD3.5 models loaded from disk: exactness, caching, round trips, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import load_tiny, random_image
from diffusers import StableDiffusion3Pipeline

from customshift import attention
from customshift.config import CustomShiftConfig
from customshift.errors import IncompatibleWeightsError, PromptError
from customshift.pipeline import CustomShiftPipeline, find_token_positions
from customshift.reference import SubjectEmbedding

PROMPT = "a dog on the beach"


def generate(pipe, prompt=PROMPT, seed=0, steps=3, **kwargs) -> np.ndarray:
    return pipe(
        prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
        output_type="np", **kwargs,
    ).images


def randomize_adapter(pipe, rank=4, seed=0, **config):
    """Give the branch a non-trivial LoRA and shift, as training would."""
    branch = pipe.set_customshift_config(CustomShiftConfig(lora_rank=rank, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in branch.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
        branch.shift.beta.copy_(torch.randn(branch.shift.beta.shape, generator=g))
    pipe.customshift_weights_changed()
    return branch


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_without_subject_or_with_zero_shift_equals_plain_sd3(tiny_folders, variant):
    folder = tiny_folders[variant]
    pipe = load_tiny(folder)
    plain = StableDiffusion3Pipeline.from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    expected = generate(plain)
    subject = pipe.encode_subject(random_image(0), "dog")
    assert np.abs(generate(pipe) - expected).max() <= 1e-5
    assert np.abs(generate(pipe, subject=subject, shift_scale=0.0) - expected).max() <= 1e-5
    assert np.abs(generate(pipe, subject=subject, shift_scale=1e-9) - expected).max() <= 1e-5
    # ...also through the 3-pass reference guidance, where the "no reference" pass is plain SD3.
    with_ref = generate(pipe, subject=subject, shift_scale=1e-9, reference_guidance_scale=2.0)
    assert np.abs(with_ref - expected).max() <= 1e-5


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_subject_changes_the_image_and_different_subjects_differently(tiny_folders, variant):
    pipe = load_tiny(tiny_folders[variant])
    randomize_adapter(pipe)
    plain = generate(pipe)
    first = generate(pipe, subject=pipe.encode_subject(random_image(1), "dog"))
    second = generate(pipe, subject=pipe.encode_subject(random_image(2), "dog"))
    assert np.abs(first - plain).max() > 1e-3
    assert np.abs(second - plain).max() > 1e-3
    assert np.abs(first - second).max() > 1e-3


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_cached_embedding_equals_recomputing_the_branch_every_step(tiny_folders, variant):
    pipe = load_tiny(tiny_folders[variant])
    randomize_adapter(pipe)
    subject = pipe.encode_subject(random_image(3), "dog")
    cached = generate(pipe, subject=subject, guidance_scale=3.0)
    recomputed = generate(pipe, subject=subject, guidance_scale=3.0, recompute_subject=True)
    assert np.array_equal(cached, recomputed)


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_split_and_mask_forms_give_the_same_image(tiny_folders, variant):
    pipe = load_tiny(tiny_folders[variant])
    randomize_adapter(pipe)
    subject = pipe.encode_subject(random_image(4), "dog")
    split = generate(pipe, subject=subject, reference_guidance_scale=1.5)
    pipe.customshift_config.cads_form = "mask"
    mask = generate(pipe, subject=subject, reference_guidance_scale=1.5)
    assert np.abs(split - mask).max() <= 1e-5


def test_reference_keys_are_shared_across_the_batch_not_copied(tiny_pipe, monkeypatch):
    seen = []
    original = attention.cads_attention

    def spy(query, key, value, ref_key, ref_value, *args, **kwargs):
        seen.append((query.shape[0], ref_key.shape[0]))
        return original(query, key, value, ref_key, ref_value, *args, **kwargs)

    monkeypatch.setattr(attention, "cads_attention", spy)
    subject = tiny_pipe.encode_subject(random_image(0), "dog")
    images = generate(tiny_pipe, prompt=[PROMPT, "a dog in the snow"], subject=subject, num_images_per_prompt=2)
    assert images.shape[0] == 4
    assert seen and all(query_batch == 8 and ref_batch == 1 for query_batch, ref_batch in seen)


def test_reference_guidance_runs_three_passes_and_changes_the_image(tiny_pipe):
    randomize_adapter(tiny_pipe)
    batches = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    subject = tiny_pipe.encode_subject(random_image(0), "dog")
    base = generate(tiny_pipe, subject=subject)
    assert set(batches) == {2}
    batches.clear()
    guided = generate(tiny_pipe, subject=subject, reference_guidance_scale=3.0)
    hook.remove()
    assert set(batches) == {3}
    assert np.abs(guided - base).max() > 1e-4


def test_parent_options_work_with_a_subject(tiny_pipe):
    subject = tiny_pipe.encode_subject(random_image(0), "dog")
    steps = []

    def on_step(pipe, i, t, kwargs):
        steps.append(i)
        return kwargs

    images = generate(
        tiny_pipe, subject=subject, negative_prompt="blurry", skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0, callback_on_step_end=on_step, height=64, width=32,
    )
    assert images.shape == (1, 64, 32, 3)
    assert steps == [0, 1, 2]
    latents = tiny_pipe(prompt=PROMPT, subject=subject, num_inference_steps=2, output_type="latent").images
    assert latents.shape[1] == tiny_pipe.transformer.config.in_channels
    assert isinstance(generate(tiny_pipe, subject=subject, guidance_scale=1.0), np.ndarray)


def test_pipeline_and_weights_round_trip(tiny_pipe, tmp_path):
    randomize_adapter(tiny_pipe, seed=5)
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    tiny_pipe.save_customshift(tmp_path / "weights")
    manifest = json.loads((tmp_path / "weights" / "customshift.json").read_text())
    assert manifest["format"] == "customshift-weights/1" and manifest["config"]["lora_rank"] == 4
    expected = generate(tiny_pipe, subject=tiny_pipe.encode_subject(random_image(6), "dog"))

    reloaded = load_tiny(str(tmp_path / "pipe"))
    reloaded.load_customshift(tmp_path / "weights")
    assert reloaded.weights_fingerprint == tiny_pipe.weights_fingerprint
    got = generate(reloaded, subject=reloaded.encode_subject(random_image(6), "dog"))
    assert np.array_equal(got, expected)
    assert reloaded.customshift_config.cads_shift == tiny_pipe.customshift_config.cads_shift == "mass"


def test_weights_saved_before_cads_shift_existed_load_as_logit(tiny_pipe, tmp_path):
    randomize_adapter(tiny_pipe, seed=5)
    tiny_pipe.save_customshift(tmp_path / "weights")
    path = tmp_path / "weights" / "customshift.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["cads_shift"]  # as written by the first release
    path.write_text(json.dumps(manifest))
    tiny_pipe.load_customshift(tmp_path / "weights")
    assert tiny_pipe.customshift_config.cads_shift == "logit"


def test_subject_embedding_round_trip(tiny_pipe, tmp_path):
    randomize_adapter(tiny_pipe)
    subject = tiny_pipe.encode_subject([random_image(7), random_image(8)], "dog")
    assert subject.num_references == 2 and subject.num_tokens == 2 * 64
    path = subject.save(tmp_path / "dog.safetensors")
    loaded = SubjectEmbedding.load(path)
    assert (loaded.subject, loaded.resolution, loaded.num_references) == ("dog", (32, 32), 2)
    assert np.array_equal(generate(tiny_pipe, subject=loaded), generate(tiny_pipe, subject=subject))


def test_bf16_reference_cache_is_kept_saved_and_close_to_the_float32_one(tiny_pipe, tmp_path, monkeypatch):
    randomize_adapter(tiny_pipe)
    full = tiny_pipe.encode_subject(random_image(7), "dog")
    half = tiny_pipe.encode_subject(random_image(7), "dog", dtype=torch.bfloat16)
    assert {t.dtype for t in half.keys.values()} == {torch.bfloat16}
    for name in full.keys:  # the same keys, rounded once
        assert torch.equal(half.keys[name], full.keys[name].bfloat16())
    seen = []
    original = attention.cads_attention
    monkeypatch.setattr(attention, "cads_attention", lambda q, k, v, rk, *a, **kw: (
        seen.append((q.dtype, rk.dtype)), original(q, k, v, rk, *a, **kw))[1])
    image_half, image_full = generate(tiny_pipe, subject=half), generate(tiny_pipe, subject=full)
    assert seen and all(s == (torch.float32, torch.bfloat16) for s in seen[: len(seen) // 2])
    assert all(s == (torch.float32, torch.float32) for s in seen[len(seen) // 2 :])
    assert not np.array_equal(image_half, image_full) and np.abs(image_half - image_full).max() < 0.05
    loaded = SubjectEmbedding.load(half.save(tmp_path / "dog.safetensors"))
    assert np.array_equal(generate(tiny_pipe, subject=loaded), image_half)
    with pytest.raises(ValueError, match="floating-point"):
        tiny_pipe.encode_subject(random_image(7), "dog", dtype=torch.int8)


def test_embedding_or_weights_for_another_base_model_are_refused(tiny_pipe, tmp_path):
    from customshift.tiny import build_tiny_pipeline

    other = build_tiny_pipeline("sd3", seed=1)
    foreign = other.encode_subject(random_image(0), "dog")
    with pytest.raises(IncompatibleWeightsError, match="another base model"):
        generate(tiny_pipe, subject=foreign)
    randomize_adapter(other)
    other.save_customshift(tmp_path / "foreign")
    with pytest.raises(IncompatibleWeightsError, match="another base model"):
        tiny_pipe.load_customshift(tmp_path / "foreign")
    # An embedding made before new weights were loaded is stale.
    stale = tiny_pipe.encode_subject(random_image(0), "dog")
    randomize_adapter(tiny_pipe)
    with pytest.raises(IncompatibleWeightsError, match="other CustomShift weights"):
        generate(tiny_pipe, subject=stale)


def test_corrupt_weights_and_non_embedding_files_are_refused(tiny_pipe, tmp_path):
    randomize_adapter(tiny_pipe)
    tiny_pipe.save_customshift(tmp_path / "w")
    weights = tmp_path / "w" / "customshift.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IncompatibleWeightsError, match="checksum"):
        tiny_pipe.load_customshift(tmp_path / "w")
    with pytest.raises(IncompatibleWeightsError, match="not a CustomShift weights folder"):
        tiny_pipe.load_customshift(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(IncompatibleWeightsError, match="not a readable safetensors"):
        SubjectEmbedding.load(tmp_path / "junk.safetensors")


def test_bad_prompts_and_subjects_are_clear_errors(tiny_pipe, caplog):
    subject = tiny_pipe.encode_subject(random_image(0), "dog")
    for bad in ["", "   ", [PROMPT, ""]]:
        with pytest.raises(PromptError, match="prompt is empty"):
            generate(tiny_pipe, prompt=bad, subject=subject)
    with pytest.raises(PromptError, match="subject name is empty"):
        tiny_pipe.encode_subject(random_image(0), " ")
    with pytest.raises(PromptError, match="shift_scale"):
        generate(tiny_pipe, subject=subject, shift_scale=-1.0)
    with caplog.at_level(logging.WARNING, logger="customshift.pipeline"):
        images = generate(tiny_pipe, prompt="a cat on the beach", subject=subject)
    assert "does not appear in the prompt" in caplog.text
    assert images.shape == (1, 32, 32, 3)


def test_subject_token_positions_in_prompt(tiny_pipe):
    weights = tiny_pipe.subject_token_weights(["a red robot on a pink background", "a tree"], "robot", 333)
    assert weights.shape == (2, 333)
    assert weights[0].sum().item() == pytest.approx(1.0) and weights[1].sum().item() == 0
    clip_ids = tiny_pipe.tokenizer("a red robot on a pink background").input_ids
    robot = tiny_pipe.tokenizer("robot", add_special_tokens=False).input_ids
    assert weights[0, clip_ids.index(robot[0])] > 0  # CLIP part
    assert weights[0, 77:].sum() > 0  # T5 part
    assert find_token_positions([5, 1, 2, 7, 1, 2], [1, 2]) == [1, 2, 4, 5]


def test_odd_reference_images_are_accepted(tiny_pipe, tmp_path):
    from PIL import Image

    rgba = random_image(0).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "a.png")
    random_image(1).convert("P").save(tmp_path / "p.png")
    random_image(2, size=20).convert("CMYK").save(tmp_path / "c.jpg")
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(tmp_path / "g16.png")
    subject = tiny_pipe.encode_subject([str(tmp_path / n) for n in ["a.png", "p.png", "c.jpg", "g16.png"]], "dog")
    assert subject.num_references == 4


@pytest.mark.parametrize(
    "config",
    [
        {"reference_positions": "offset"},
        {"subject_tokens_in_reference": False},
        {"conditional_shift": False},
        {"text_queries_attend_reference": True},
        {"lora_feedforward": True},
    ],
)
def test_ablation_configs_run_and_differ(tiny_folders, config):
    pipe = load_tiny(tiny_folders["sd35"])
    randomize_adapter(pipe, seed=1)
    baseline = generate(pipe, subject=pipe.encode_subject(random_image(0), "dog"))
    randomize_adapter(pipe, seed=1, **config)
    ablated = generate(pipe, subject=pipe.encode_subject(random_image(0), "dog"))
    assert ablated.shape == baseline.shape
    assert np.abs(ablated - baseline).max() > 1e-6


def test_branch_shares_base_weights_and_keeps_its_lora_private(tiny_pipe):
    branch = randomize_adapter(tiny_pipe)
    base = dict(tiny_pipe.transformer.named_parameters())
    tree = dict(branch.tree.named_parameters())
    name = "transformer_blocks.0.ff.net.2.weight"
    assert tree[name] is base[name]
    assert tree["transformer_blocks.0.attn.to_q.base_layer.weight"] is base["transformer_blocks.0.attn.to_q.weight"]
    assert not any("lora" in n for n in base)
    assert isinstance(tiny_pipe, CustomShiftPipeline)


def test_generation_lora_round_trips_and_base_fingerprint_ignores_loras(tiny_folder, tmp_path):
    pipe = load_tiny(tiny_folder)
    fingerprint = pipe.base_fingerprint
    randomize_adapter(pipe, generation_lora_rank=2)
    pipe.add_generation_lora()
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    pipe.customshift_weights_changed()
    expected = generate(pipe, subject=pipe.encode_subject(random_image(0), "dog"))
    pipe.save_customshift(tmp_path / "w")

    fresh = load_tiny(tiny_folder)
    fresh.load_customshift(tmp_path / "w")
    assert fresh.base_fingerprint == fingerprint
    assert not any("generation" in n for n in dict(fresh.reference_branch.tree.named_parameters()))
    assert any("lora_A.generation" in n for n in dict(fresh.transformer.named_parameters()))
    assert np.array_equal(generate(fresh, subject=fresh.encode_subject(random_image(0), "dog")), expected)


def test_sampling_uses_the_t5_length_the_weights_were_trained_with(tiny_pipe):
    lengths = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    generate(tiny_pipe, steps=1)
    tiny_pipe.customshift_config.max_sequence_length = 16
    generate(tiny_pipe, steps=1)
    generate(tiny_pipe, steps=1, max_sequence_length=32)
    hook.remove()
    assert lengths == [77 + 256, 77 + 16, 77 + 32]
