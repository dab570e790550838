"""Why the Reference-Alignment Branch is a structural copy, and what the copy guarantees (issue 15 item 3).

The alternative — the reference LoRA as a second peft adapter on the one transformer, selected with
``set_adapter`` around the reference forward — is measured here against the copy, on the training loss
(customshift/training/objective.py) with both LoRAs and the shift parameters trained:
* ``set_adapter`` sets ``requires_grad=False`` on the adapter it deactivates, so the reference LoRA gets
  no gradient at all;
* with that undone by hand it is exact without gradient checkpointing, but under checkpointing the
  reference blocks are recomputed in backward with the *generation* adapter active: a wrong gradient.
The copy's gradients equal those of an unshared branch (a separately built transformer) in both cases.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from customshift.attention import ReferenceSet, build_cads_state, install_processors
from customshift.config import CustomShiftConfig
from customshift.reference import REFERENCE_ADAPTER, make_lora_config
from customshift.training.model import GENERATION_ADAPTER
from customshift.training.objective import Objective

ATOL = 1e-6


def build_pipe():
    from customshift.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    pipe = build_tiny_pipeline("sd3")
    pipe.set_customshift_config(CustomShiftConfig(lora_rank=4, generation_lora_rank=4, lora_alpha=4.0))
    pipe.add_generation_lora()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero LoRA B and shift, so that every gradient is non-zero
        for module in (pipe.transformer, pipe.reference_branch.tree):
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        beta = pipe.reference_branch.shift.beta
        beta.copy_(torch.rand(beta.shape, generator=generator) + 0.5)
    for module in (pipe.transformer, pipe.reference_branch):
        module.requires_grad_(False)
        module.eval()
    return pipe


@pytest.fixture(scope="module")
def base_pipe():
    return build_pipe()


def make_batch(pipe) -> dict:
    c = pipe.transformer.config
    g = torch.Generator().manual_seed(2)
    n, text, subject = 4, 12, 3
    weights = torch.zeros(n, text)
    weights[:, 2:4] = 0.5
    latent = lambda k: torch.randn(k, c.in_channels, 16, 16, generator=g)  # noqa: E731
    return {"target_latents": latent(n), "noise": latent(n), "sigmas": torch.rand(n, generator=g) * 0.8 + 0.1,
            "prompt_embeds": torch.randn(n, text, c.joint_attention_dim, generator=g),
            "pooled_embeds": torch.randn(n, c.pooled_projection_dim, generator=g),
            "reference_latents": latent(2),
            "subject_embeds": torch.randn(2, subject, c.joint_attention_dim, generator=g),
            "subject_pooled": torch.randn(2, c.pooled_projection_dim, generator=g), "subject_mask": None,
            "reference_index": torch.tensor([0, 0, 1, 1]), "log_scale": torch.zeros(n), "subject_weights": weights}


def reference_lora(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if f"lora_A.{REFERENCE_ADAPTER}." in n
            or f"lora_B.{REFERENCE_ADAPTER}." in n]


def gradients(groups: dict[str, list[torch.nn.Parameter]], loss_fn) -> dict[str, list[Tensor]]:
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
            p.grad = None
    loss_fn().backward()
    return {k: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ps] for k, ps in groups.items()}


def difference(a: dict[str, list[Tensor]], b: dict[str, list[Tensor]]) -> dict[str, float]:
    return {k: max((x - y).abs().max().item() for x, y in zip(a[k], b[k], strict=True)) for k in a}


def copy_branch_gradients(pipe, batch: dict, checkpointing: bool) -> dict[str, list[Tensor]]:
    """(a) The shipped branch through the trainer's own objective."""
    pipe = copy.deepcopy(pipe)
    if checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
        pipe.reference_branch.tree.enable_gradient_checkpointing()
    branch = pipe.reference_branch
    groups = {"reference": reference_lora(branch.tree),
              "generation": [p for n, p in pipe.transformer.named_parameters() if "lora_" in n],
              "shift": [branch.shift.beta, branch.shift.gamma]}
    objective = Objective(pipe, True)
    return gradients(groups, lambda: objective(batch)[0])


def loss_with(batch: dict, branch_forward, transformer, shift, config) -> Tensor:
    """The objective's loss (no loss weights) with the reference K/V from ``branch_forward``."""
    x0, noise, sigmas = batch["target_latents"], batch["noise"], batch["sigmas"]
    s = sigmas.view(-1, 1, 1, 1)
    capture: dict[str, tuple[Tensor, Tensor]] = {}
    branch_forward(hidden_states=batch["reference_latents"], encoder_hidden_states=batch["subject_embeds"],
                   pooled_projections=batch["subject_pooled"], timestep=torch.zeros(2),
                   joint_attention_kwargs={"customshift_capture": capture}, return_dict=False)
    index = batch["reference_index"]
    reference = ReferenceSet(keys={n: k[index] for n, (k, _) in capture.items()},
                             values={n: v[index] for n, (_, v) in capture.items()},
                             log_scale=batch["log_scale"], subject_weights=batch["subject_weights"])
    state = build_cads_state(config, shift, [reference], device="cpu", dtype=torch.float32, trainable=True)
    pred = transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=sigmas * 1000.0,
                       encoder_hidden_states=batch["prompt_embeds"], pooled_projections=batch["pooled_embeds"],
                       joint_attention_kwargs={"customshift": state}, return_dict=False)[0]
    return (pred - (noise - x0)).pow(2).mean(dim=(1, 2, 3)).mean()


def unshared_branch_gradients(pipe, batch: dict, checkpointing: bool) -> dict[str, list[Tensor]]:
    """(c) No sharing at all: the reference branch is a separately built transformer with equal weights."""
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from customshift.tiny import build_tiny_pipeline

    pipe = copy.deepcopy(pipe)
    separate = build_tiny_pipeline("sd3").transformer  # same seed: the same base weights, other tensors
    install_processors(separate)
    inject_adapter_in_model(make_lora_config(pipe.customshift_config, 4), separate, adapter_name=REFERENCE_ADAPTER)
    lora = get_peft_model_state_dict(pipe.reference_branch.tree, adapter_name=REFERENCE_ADAPTER)
    set_peft_model_state_dict(separate, lora, adapter_name=REFERENCE_ADAPTER)
    separate.requires_grad_(False)
    separate.eval()
    assert not {id(p) for p in separate.parameters()} & {id(p) for p in pipe.transformer.parameters()}
    if checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
        separate.enable_gradient_checkpointing()
    shift = pipe.reference_branch.shift
    groups = {"reference": reference_lora(separate),
              "generation": [p for n, p in pipe.transformer.named_parameters() if "lora_" in n],
              "shift": [shift.beta, shift.gamma]}
    return gradients(groups, lambda: loss_with(batch, separate, pipe.transformer, shift, pipe.customshift_config))


def one_transformer_gradients(pipe, batch: dict, checkpointing: bool, undo_requires_grad: bool):
    """(b) The alternative: both adapters on the one transformer, ``set_adapter`` around each forward."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    pipe = copy.deepcopy(pipe)
    transformer, shift = pipe.transformer, pipe.reference_branch.shift
    lora = get_peft_model_state_dict(pipe.reference_branch.tree, adapter_name=REFERENCE_ADAPTER)
    transformer.add_adapter(make_lora_config(pipe.customshift_config, 4), REFERENCE_ADAPTER)
    set_peft_model_state_dict(transformer, lora, adapter_name=REFERENCE_ADAPTER)
    transformer.requires_grad_(False)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    groups = {"reference": reference_lora(transformer),
              "generation": [p for n, p in transformer.named_parameters() if f".{GENERATION_ADAPTER}." in n],
              "shift": [shift.beta, shift.gamma]}

    def select(adapter: str) -> None:
        transformer.set_adapter(adapter)
        if undo_requires_grad:
            for params in groups.values():
                for p in params:
                    p.requires_grad_(True)

    def reference_forward(**kwargs):
        select(REFERENCE_ADAPTER)
        out = transformer(**kwargs)
        select(GENERATION_ADAPTER)
        return out

    return gradients(groups, lambda: loss_with(batch, reference_forward, transformer, shift, pipe.customshift_config))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_copy_gradients_equal_an_unshared_branch(base_pipe, checkpointing):
    batch = make_batch(base_pipe)
    shipped = copy_branch_gradients(base_pipe, batch, checkpointing)
    unshared = unshared_branch_gradients(base_pipe, batch, checkpointing)
    assert all(max(g.abs().max().item() for g in grads) > 1e-4 for grads in shipped.values())
    assert max(difference(shipped, unshared).values()) < ATOL
    if checkpointing:  # and checkpointing itself changes nothing
        assert max(difference(shipped, copy_branch_gradients(base_pipe, batch, False)).values()) < ATOL


def test_one_transformer_with_set_adapter_gets_the_reference_gradient_wrong(base_pipe):
    """The measured reason to keep the copy (docs/training.md, "The reference branch")."""
    batch = make_batch(base_pipe)
    shipped = copy_branch_gradients(base_pipe, batch, checkpointing=False)
    scale = max(g.abs().max().item() for g in shipped["reference"])

    as_is = one_transformer_gradients(base_pipe, batch, checkpointing=False, undo_requires_grad=False)
    assert all(not g.any() for g in as_is["reference"])  # set_adapter froze it: no gradient at all
    assert difference(shipped, as_is)["generation"] < ATOL

    fixed = one_transformer_gradients(base_pipe, batch, checkpointing=False, undo_requires_grad=True)
    assert max(difference(shipped, fixed).values()) < ATOL  # exact without checkpointing...

    recomputed = one_transformer_gradients(base_pipe, batch, checkpointing=True, undo_requires_grad=True)
    wrong = difference(shipped, recomputed)
    assert wrong["reference"] > 0.5 * scale, (wrong, scale)  # ...but not with it (measured 2.1x |g|)
    assert wrong["generation"] < ATOL and wrong["shift"] < ATOL


def test_branch_shares_tensors_through_to_and_deepcopy(base_pipe):
    pipe = copy.deepcopy(base_pipe)
    branch = pipe.reference_branch
    shared = dict(pipe.transformer.named_parameters())
    tree = dict(branch.tree.named_parameters())
    name = "transformer_blocks.0.attn.to_q"
    assert tree[f"{name}.base_layer.weight"] is shared[f"{name}.base_layer.weight"]  # under the generation LoRA
    assert not any(GENERATION_ADAPTER in n for n in tree)
    assert not any(REFERENCE_ADAPTER in n for n in shared)
    assert REFERENCE_ADAPTER not in (getattr(pipe.transformer, "peft_config", None) or {})

    pipe.to(dtype=torch.float64)  # parameters convert in place; buffers are replaced, the branch re-reads them
    inputs = {k: v.double() for k, v in make_batch(pipe).items() if k in ("reference_latents", "subject_embeds",
                                                                          "subject_pooled")}
    kv = branch(**inputs)
    assert next(iter(kv.values()))[0].dtype == torch.float64
    assert tree["pos_embed.proj.weight"] is shared["pos_embed.proj.weight"]
    assert branch.tree.pos_embed.pos_embed is pipe.transformer.pos_embed.pos_embed
    assert "pos_embed.pos_embed" in branch.tree.state_dict()  # persistent as in the original

    twin = copy.deepcopy(pipe)
    twin_shared = {id(p) for p in twin.transformer.parameters()}
    base = [p for n, p in twin.reference_branch.tree.named_parameters() if "lora_" not in n]
    assert all(id(p) in twin_shared for p in base)
    assert not twin_shared & {id(p) for p in pipe.transformer.parameters()}


def test_hooks_and_adapters_of_the_original_stay_out_of_the_branch(base_pipe):
    pipe = copy.deepcopy(base_pipe)
    calls: list[str] = []
    attn = pipe.transformer.transformer_blocks[0].attn
    attn.register_forward_hook(lambda *_: calls.append("before"))  # registered before the branch is rebuilt
    branch = pipe.set_customshift_config(pipe.customshift_config)  # after the generation LoRA this time
    assert list(pipe.transformer.peft_config) == [GENERATION_ADAPTER]  # the branch's adapter stays its own
    attn.register_forward_hook(lambda *_: calls.append("after"))
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append("root"))
    leaf = pipe.transformer.transformer_blocks[0].ff.net[2]  # a shared leaf: its hooks are the leaf's own
    leaf.register_forward_hook(lambda *_: calls.append("leaf"))
    inputs = {k: v for k, v in make_batch(pipe).items() if k in ("reference_latents", "subject_embeds",
                                                                 "subject_pooled")}
    with torch.no_grad():
        branch(**inputs)
    assert calls == ["leaf"]
