"""The objective: SD3's rectified-flow loss with the reference through the branch, sigma sampling, dropout.

docs/method.md, "Training": x_t = (1 - sigma) x0 + sigma * noise, predict noise - x0, sigma from the
scheduler's shifted table at a logit-normal position; the reference enters through the Reference-Alignment
Branch at t = 0 and CADS in every block. Condition dropout (prompt / reference / both) teaches the
unconditional passes that guidance needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import ReferenceSet, build_cads_state
from .config import TrainConfig

__all__ = ["Objective", "SigmaSampler", "condition_dropout", "foreground_weights", "one_reference_dropout",
           "routing_loss"]

# Max-channel difference from the border colour that makes a pixel foreground: the sprite metric's threshold
# (FAR_THRESHOLD in customshift/sprites/synthetic.py), which separates every sprite colour from every background.
FOREGROUND_THRESHOLD = 40


class Objective(nn.Module):
    """The loss as one module, so that DDP / FSDP / DeepSpeed see every trained parameter in one forward."""

    def __init__(self, pipe: Any, use_reference: bool, routing_weight: float = 0.0) -> None:
        super().__init__()
        self.transformer = pipe.transformer
        self.branch = pipe.reference_branch if use_reference else None
        self.routing_weight = float(routing_weight)
        object.__setattr__(self, "_pipe", pipe)  # not a submodule: its VAE/text encoders are frozen

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        x0, noise, sigmas = batch["target_latents"], batch["noise"], batch["sigmas"]
        s = sigmas.view(-1, 1, 1, 1)
        noisy = ((1.0 - s) * x0 + s * noise).to(self.transformer.dtype)
        kwargs, routed = None, False
        if self.branch is not None:
            kv = self.branch(batch["reference_latents"], batch["subject_embeds"], batch["subject_pooled"],
                             batch["subject_mask"])
            index = batch["reference_index"]
            reference = ReferenceSet(
                keys={name: k[index] for name, (k, _) in kv.items()},
                values={name: v[index] for name, (_, v) in kv.items()},
                log_scale=batch["log_scale"],
                subject_weights=batch["subject_weights"],
            )
            references = [reference]
            if "second_index" in batch:  # two-subject targets: a second set with its own subject relevance
                second = batch["second_index"]
                references.append(ReferenceSet(
                    keys={name: k[second] for name, (k, _) in kv.items()},
                    values={name: v[second] for name, (_, v) in kv.items()},
                    log_scale=batch["second_log_scale"], subject_weights=batch["second_weights"]))
            state = build_cads_state(self.branch.config, self.branch.shift, references, device=noisy.device,
                                     dtype=self.transformer.dtype, trainable=True)
            routed = self.routing_weight > 0 and "route_masks" in batch and len(state.references) == 2
            if routed:
                state.shift_record = []
            kwargs = {"customshift": state}
        pred = self.transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000.0,
            encoder_hidden_states=batch["prompt_embeds"],
            pooled_projections=batch["pooled_embeds"],
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )[0]
        target = noise - x0
        error = (pred.float() - target.float()).pow(2)
        weights = batch.get("loss_weights")
        if weights is None:
            per_sample = error.mean(dim=(1, 2, 3))
        else:
            per_sample = (error * weights).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        if routed:
            valid = torch.isfinite(batch["log_scale"]) & torch.isfinite(batch["second_log_scale"])
            valid &= (batch["subject_weights"].sum(-1) > 0) & (batch["second_weights"].sum(-1) > 0)
            loss = loss + self.routing_weight * routing_loss(state.shift_record, batch["route_masks"], valid)
        # Every trained parameter takes part in every step (a batch whose references are all dropped
        # leaves the branch unused), so DDP needs no find_unused_parameters; the term is exactly 0.
        loss = loss + sum(p.reshape(-1)[:1].sum() for p in self.parameters() if p.requires_grad) * 0.0
        return loss, per_sample.detach()


def routing_loss(record: Sequence[Sequence[Tensor]], masks: Tensor, valid: Tensor) -> Tensor:
    """Localisation supervision of two subjects' shifts: each subject's region should route to its own reference.

    ``record``: per CADS layer the two reference sets' shifts beta_i1, beta_i2, (B, N_image) each;
    ``masks``: (B, 2, N_image) in {0, 1}, the image tokens covered by each subject in the target;
    ``valid``: (B,) rows where both references and both names are present. Per token of subject k's region,
    the logistic loss of "subject k, not the other" on beta_ik - beta_i,other (the two sets' mass
    log-odds ratio), averaged over each row's region tokens, the valid rows and the layers. 0 without any.
    """
    masks = masks.float() * valid.float().view(-1, 1, 1)
    count = masks.sum(dim=(1, 2))
    if not record or not bool((count > 0).any()):
        return masks.new_zeros(())
    total = masks.new_zeros(())
    for first, second in record:
        gap = (first.float() - second.float()).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        per_token = masks[:, 0] * F.softplus(-gap) + masks[:, 1] * F.softplus(gap)
        total = total + (per_token.sum(-1) / count.clamp(min=1))[count > 0].mean()
    return total / len(record)


class SigmaSampler:
    """Noise levels for training: the scheduler's (shifted) sigma table at diffusers' density positions."""

    def __init__(self, scheduler: Any, t: TrainConfig) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(scheduler.config)
        if t.scheduler_shift is not None:
            config["shift"] = t.scheduler_shift
        table = FlowMatchEulerDiscreteScheduler.from_config(config)  # a copy: sampling moves the pipeline's
        self.table = table.sigmas.float().cpu()
        self.num_train_timesteps = int(table.config.num_train_timesteps)
        self.t = t

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        t = self.t
        u = compute_density_for_timestep_sampling(
            weighting_scheme=t.weighting_scheme, batch_size=n, logit_mean=t.logit_mean, logit_std=t.logit_std,
            mode_scale=t.mode_scale, generator=generator,
        )
        # u is the noise level's position (SD3 paper: t = sigmoid(logit-normal)); the table runs from
        # sigma = 1 down, so u -> 1 is pure noise and a positive logit_mean means more high-noise samples.
        index = ((1.0 - u) * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.table[index]


def condition_dropout(n: int, t: TrainConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per target: (drop the prompt, drop the reference) from one uniform draw (both / prompt only / reference only)."""
    u = torch.rand(n, generator=generator)
    both = u < t.both_dropout
    prompt_only = (u >= t.both_dropout) & (u < t.both_dropout + t.prompt_dropout)
    reference_only = (u >= t.both_dropout + t.prompt_dropout) & (
        u < t.both_dropout + t.prompt_dropout + t.reference_dropout)
    return both | prompt_only, both | reference_only


def one_reference_dropout(eligible: Tensor, rate: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per target: (drop the first subject's reference, drop the second's) for two-subject targets.

    Of the ``eligible`` targets (two subjects, both references kept), a share ``rate`` keeps one of the two,
    either evenly: the other subject is then drawn from its words alone, which a user's prompt naming a second
    object without a reference asks for (docs/default-model.md, "Where the two-subject identity goes").
    """
    n = eligible.shape[0]
    single = eligible & (torch.rand(n, generator=generator) < rate)
    first = torch.rand(n, generator=generator) < 0.5
    return single & first, single & ~first


def foreground_weights(images: Sequence[Any], resolution: int, size: tuple[int, int], weight: float) -> Tensor:
    """(N, 1, h, w) loss weights: ``weight`` where a latent pixel covers a pixel far from the image's border colour.

    Images are resized and cropped to ``resolution`` as the trainer's latents are, so the mask lines up.
    """
    from ..images import prepare_reference

    arr = np.stack([np.asarray(prepare_reference(image, resolution, resolution).convert("RGB"), dtype=np.int16)
                    for image in images])  # (N, H, W, 3), all images at once
    border = np.concatenate([arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]], axis=1)  # (N, 4 sides, 3)
    far = np.abs(arr - np.median(border, axis=1)[:, None, None]).max(axis=3) > FOREGROUND_THRESHOLD
    mask = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(far).float()[:, None], tuple(size))
    return 1.0 + (float(weight) - 1.0) * mask
