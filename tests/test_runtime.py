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


def two_name_state(gamma: float) -> tuple[CADSState, torch.Tensor, torch.Tensor]:
    """Image queries 0..2 point at text token 0 (the robot's name), 3..5 at token 1 (the tree's)."""
    heads, dim = 2, 4
    text_key = torch.zeros(1, heads, 3, dim)
    text_key[..., 0, 0], text_key[..., 1, 1] = 4.0, 4.0
    query = torch.zeros(1, heads, 6, dim)
    query[..., :3, 0], query[..., 3:, 1] = 4.0, 4.0
    weights = [torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 1.0, 0]])]
    refs = [ReferenceSet({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, torch.zeros(1), w) for w in weights]
    return CADSState(refs, beta={"a": torch.tensor(0.0)}, gamma={"a": torch.tensor(gamma)}), query, text_key


def test_each_subject_shift_follows_its_own_name_tokens():
    state, query, text_key = two_name_state(gamma=3.0)
    robot, tree = (_shift_logits(state, i, "a", query, text_key)[0][0] for i in range(2))
    assert (robot[:3] > tree[:3] + 2).all() and (tree[3:] > robot[3:] + 2).all()
    # The negative pass of guidance (leading rows of a larger batch) has no subject tokens: m_i = 1.
    doubled = _shift_logits(state, 0, "a", query.repeat(2, 1, 1, 1), text_key.repeat(2, 1, 1, 1))[0]
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


# ----------------------------------------------------------------------------------------------------------
# The parent's arguments (issue 19 item 3): the two-pass path is StableDiffusion3Pipeline.__call__ itself;
# reference guidance has its own loop, so each case runs on both paths.

BOTH_PATHS = pytest.mark.parametrize("w_ref", [0.0, 1.5])


class Recorder:
    """Every transformer forward's batch, text embeddings and CADS state."""

    def __init__(self, pipe) -> None:
        self.calls: list[tuple[int, torch.Tensor, object]] = []
        self.handle = pipe.transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        state = (kwargs.get("joint_attention_kwargs") or {}).get("customshift")
        self.calls.append((kwargs["hidden_states"].shape[0], kwargs["encoder_hidden_states"], state))


def test_ip_adapter_arguments_reach_the_transformer_as_in_the_parent_and_a_subject_is_refused(trained_pipe):
    from diffusers import StableDiffusion3Pipeline

    class ImageProjection(torch.nn.Module):  # stands in for a loaded IP-Adapter's image_proj
        def forward(self, embeds, timestep):
            seen.append(embeds.shape[0])
            return embeds, timestep

    seen: list[int] = []
    embeds = torch.zeros(2, 1, 8)  # [negative; positive]
    trained_pipe.transformer.image_proj = ImageProjection()
    ours = generate(trained_pipe, ip_adapter_image_embeds=embeds)
    plain = generate(StableDiffusion3Pipeline(**trained_pipe.components), ip_adapter_image_embeds=embeds)
    assert seen == [2] * 6 and np.array_equal(ours, plain)
    subject = trained_pipe.encode_subject(random_image(0), "dog")
    with pytest.raises(PromptError, match="IP-Adapter"):
        generate(trained_pipe, subject=subject, ip_adapter_image_embeds=embeds)


@BOTH_PATHS
def test_a_callback_replacing_prompt_embeds_takes_effect_with_a_subject(trained_pipe, w_ref):
    subject = trained_pipe.encode_subject(random_image(0), "dog")
    other = trained_pipe.encode_prompt("a cat in the snow", None, None, do_classifier_free_guidance=True,
                                       max_sequence_length=256)
    seen = []

    def replace(pipe, i, t, kwargs):
        seen.append(kwargs["prompt_embeds"].shape[0])
        return {"prompt_embeds": torch.cat([other[1], other[0]])} if i == 0 else kwargs

    base = generate(trained_pipe, subject=subject, reference_guidance_scale=w_ref)
    replaced = generate(trained_pipe, subject=subject, reference_guidance_scale=w_ref, callback_on_step_end=replace,
                        callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert seen == [2, 2, 2]  # [negative; positive], as the parent passes them
    assert np.abs(replaced - base).max() > 1e-4


@BOTH_PATHS
def test_cfg_cutoff_keeps_the_reference_on_the_positive_prompt(trained_pipe, w_ref):
    from diffusers.callbacks import SD3CFGCutoffCallback

    subject = trained_pipe.encode_subject(random_image(0), "dog")
    recorder = Recorder(trained_pipe)
    image = generate(trained_pipe, subject=subject, reference_guidance_scale=w_ref,
                     callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0))
    recorder.handle.remove()
    first, *after = recorder.calls
    assert first[0] == (3 if w_ref else 2)
    positive = first[1][-1]
    for batch, embeds, state in after:  # after the cutoff: the positive prompt only, the reference still on
        assert batch == (2 if w_ref else 1)
        assert all(torch.equal(row, positive) for row in embeds)
        log_scale = state.rows(0, batch)[0].view(-1)
        assert torch.isfinite(log_scale[-1]) and (torch.isneginf(log_scale[0]) if w_ref else True)
    assert np.abs(image - generate(trained_pipe, subject=subject, reference_guidance_scale=w_ref)).max() > 1e-4


@BOTH_PATHS
def test_skip_layer_guidance_runs_its_pass_with_the_subject(trained_pipe, w_ref):
    subject = trained_pipe.encode_subject(random_image(0), "dog")
    recorder = Recorder(trained_pipe)
    skipped = generate(trained_pipe, subject=subject, reference_guidance_scale=w_ref, skip_guidance_layers=[0],
                       skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    recorder.handle.remove()
    skip_passes = [state for batch, _, state in recorder.calls if batch == 1]
    assert len(skip_passes) == 2 and all(state is not None and state.active for state in skip_passes)
    assert np.abs(skipped - generate(trained_pipe, subject=subject, reference_guidance_scale=w_ref)).max() > 1e-4


@BOTH_PATHS
def test_output_types_and_generator_lists(trained_pipe, w_ref):
    from PIL import Image

    subject = trained_pipe.encode_subject(random_image(0), "dog")
    run = lambda **kw: trained_pipe(PROMPT, subject=subject, reference_guidance_scale=w_ref,  # noqa: E731
                                    num_inference_steps=2, **kw).images
    assert isinstance(run(output_type="pil")[0], Image.Image)
    assert isinstance(run(output_type="pt"), torch.Tensor)
    assert run(output_type="latent").shape[1] == trained_pipe.transformer.config.in_channels
    assert run(output_type="np", return_dict=True).shape == (1, 32, 32, 3)
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    pair = run(output_type="np", num_images_per_prompt=2, generator=generators)
    second = run(output_type="np", generator=torch.Generator().manual_seed(1))
    assert np.abs(pair[1] - second[0]).max() <= 1e-4 and np.abs(pair[0] - pair[1]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Nothing silently drops the subject (issue 19 item 4)


def test_processor_replacement_and_fused_qkv_keep_cads_and_foreign_processors_are_refused(trained_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

    subject = trained_pipe.encode_subject(random_image(0), "dog")
    expected = generate(trained_pipe, subject=subject)
    assert np.abs(expected - generate(trained_pipe)).max() > 1e-4
    trained_pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
    assert np.array_equal(generate(trained_pipe, subject=subject), expected)
    trained_pipe.transformer.fuse_qkv_projections()
    assert np.abs(generate(trained_pipe, subject=subject) - expected).max() <= 1e-5  # CADS reads to_qkv
    trained_pipe.transformer.unfuse_qkv_projections()
    trained_pipe.transformer.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(PromptError, match="would ignore the subject"):
        generate(trained_pipe, subject=subject)


def _style_lora(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.transformer.named_modules():
        if name.endswith("attn.to_k"):
            base = getattr(module, "base_layer", module)
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(2, base.in_features, generator=g) * 0.3
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(base.out_features, 2, generator=g) * 0.3
    return state


@pytest.fixture
def generation_pipe(tiny_folder):
    pipe = load_tiny(tiny_folder)
    randomize_adapter(pipe, generation_lora_rank=2)
    pipe.add_generation_lora()
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B.generation" in name:
                param.normal_(0, 0.2)
    pipe.customshift_weights_changed()
    return pipe


def test_user_lora_calls_keep_the_customshift_generation_adapter(generation_pipe):
    pipe = generation_pipe
    subject = pipe.encode_subject(random_image(0), "dog")
    expected = generate(pipe, subject=subject)
    pipe.load_lora_weights(_style_lora(pipe), adapter_name="style")
    assert set(pipe.transformer.active_adapters()) == {"style", "generation"}
    pipe.set_adapters("style")
    assert set(pipe.transformer.active_adapters()) == {"style", "generation"}
    pipe.set_adapters(["style"], [0.0])  # the style at weight 0: the image is the one without it
    assert set(pipe.transformer.active_adapters()) == {"style", "generation"}
    assert np.abs(generate(pipe, subject=subject) - expected).max() <= 1e-5
    pipe.unload_lora_weights()
    assert pipe.transformer.active_adapters() == ["generation"]
    assert np.abs(generate(pipe, subject=subject) - expected).max() <= 1e-5


def test_fused_lora_leaves_the_generation_adapter_and_makes_older_subjects_stale(generation_pipe):
    from customshift.errors import IncompatibleWeightsError

    pipe = generation_pipe
    before = pipe.encode_subject(random_image(0), "dog")
    pipe.load_lora_weights(_style_lora(pipe), adapter_name="style")
    pipe.fuse_lora(components=["transformer"])
    assert not any("generation" in getattr(m, "merged_adapters", []) for m in pipe.transformer.modules())
    with pytest.raises(IncompatibleWeightsError, match="fused-lora"):
        generate(pipe, subject=before)
    generate(pipe, subject=pipe.encode_subject(random_image(0), "dog"), steps=1)  # a fresh one is accepted
    pipe.unfuse_lora(components=["transformer"])
    generate(pipe, subject=before, steps=1)  # the base layers are back: the old embedding is valid again


def test_torch_compile_keeps_fingerprints_loading_and_the_subject(trained_pipe, tmp_path):
    subject = trained_pipe.encode_subject(random_image(0), "dog")
    expected = generate(trained_pipe, subject=subject)
    trained_pipe.save_customshift(tmp_path / "w")
    fresh = load_tiny(trained_pipe.config._name_or_path)
    base = fresh.base_fingerprint
    fresh._base_fingerprint = None
    fresh.transformer = torch.compile(fresh.transformer, backend="eager")
    assert fresh.base_fingerprint == base
    fresh.load_customshift(tmp_path / "w")
    assert fresh.weights_fingerprint == trained_pipe.weights_fingerprint
    again = fresh.encode_subject(random_image(0), "dog")
    assert np.abs(generate(fresh, subject=again) - expected).max() <= 1e-5


@pytest.mark.parametrize("w_ref", [0.0, 1.5])
def test_nothing_reads_transformer_device_which_is_meta_under_sequential_offload(trained_pipe, monkeypatch, w_ref):
    # What sequential offload does to transformer.device, without accelerate: CADS must use _execution_device.
    subject = trained_pipe.encode_subject(random_image(0), "dog")
    expected = generate(trained_pipe, subject=subject, reference_guidance_scale=w_ref)
    monkeypatch.setattr(type(trained_pipe.transformer), "device", property(lambda self: torch.device("meta")))
    again = trained_pipe.encode_subject(random_image(0), "dog")
    assert np.array_equal(generate(trained_pipe, subject=again, reference_guidance_scale=w_ref), expected)


def test_two_subjects_on_sd35_dual_attention_blocks(tiny_folders):
    pipe = load_tiny(tiny_folders["sd35"])  # attn2 has no text tokens: both subjects fall back to m_i = 1 there
    randomize_adapter(pipe)
    robot = pipe.encode_subject(random_image(1), "robot")
    tree = pipe.encode_subject(random_image(2), "tree")
    single = generate(pipe, TWO, subject=robot)
    assert np.array_equal(generate(pipe, TWO, subject=[robot, tree], shift_scale=[1.0, 0.0]), single)
    assert np.abs(generate(pipe, TWO, subject=[robot, tree]) - single).max() > 1e-4
