"""Training batches: latents, cached text embeddings, condition dropout, sigmas and noise for a list of groups."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..images import prepare_reference
from .config import TrainingConfig
from .objective import SigmaSampler, condition_dropout, foreground_weights, one_reference_dropout

logger = logging.getLogger("customshift.training.batches")

__all__ = ["BatchBuilder"]


def token_masks(masks: Sequence[np.ndarray], resolution: int, grid: tuple[int, int]) -> Tensor:
    """(len(masks), tokens) {0, 1}: the image tokens each pixel mask covers (a token is covered when half its
    pixels are), through the same resize and centre crop as the targets (`prepare_reference`)."""
    images = [Image.fromarray(m.astype(np.uint8) * 255).convert("RGB") for m in masks]
    pixels = np.stack([np.asarray(prepare_reference(image, resolution, resolution))[..., 0] > 127 for image in images])
    cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(pixels).float()[:, None], grid)
    return (cover[:, 0] >= 0.5).float().flatten(1)


class BatchBuilder:
    """Turns data groups into the objective's inputs; the frozen encoders' outputs are cached per prompt.

    The random draws (dropout, sigma position, noise) come from one generator in a fixed order, so a
    resumed run that restores the generator draws exactly what the uninterrupted run drew.
    """

    def __init__(self, pipe: Any, config: TrainingConfig, resolution: int, device: torch.device) -> None:
        self.pipe, self.config, self.resolution, self.device = pipe, config, resolution, device
        self.use_reference = config.mode == "customshift"
        self.sigmas = SigmaSampler(pipe.scheduler, config.train)
        self._subject_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.cache: OrderedDict[Any, Any] = OrderedDict()  # data.prompt_cache_size entries, LRU
        self._warned_no_subject = False

    @torch.no_grad()
    def _subject_tokens(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self._subject_cache:
            if len(self._subject_cache) > 4096:
                self._subject_cache.clear()
            self._subject_cache[name] = self.pipe.subject_tokens(name)
        return self._subject_cache[name]

    @torch.no_grad()
    def __call__(self, groups: Sequence[Any], generator: torch.Generator) -> dict[str, Any]:
        t, pipe, device, g = self.config.train, self.pipe, self.device, generator
        targets, prompts, reference_index, subjects = [], [], [], []
        for i, group in enumerate(groups):
            for image, prompt in zip(group.targets, group.prompts, strict=True):
                targets.append(image)
                prompts.append(prompt)
                reference_index.append(i)
                subjects.append(group.subject)
        n = len(targets)
        drop_prompt, drop_reference = condition_dropout(n, t, g)
        texts = ["" if drop else p for p, drop in zip(prompts, drop_prompt.tolist(), strict=True)]

        batch: dict[str, Any] = {}
        batch["target_latents"] = pipe.prepare_reference_latents(targets, self.resolution, self.resolution).float()
        embeds, pooled = self._encode_texts(texts)
        batch["prompt_embeds"], batch["pooled_embeds"] = embeds, pooled
        if self.use_reference:
            # Groups with a second subject (two-subject targets) add their second reference after the firsts:
            # the branch reads every reference in one pass.
            seconds = [i for i, gr in enumerate(groups) if gr.second is not None]
            references = [gr.reference for gr in groups] + [groups[i].second[0] for i in seconds]
            names = [gr.subject for gr in groups] + [groups[i].second[1] for i in seconds]
            batch["reference_latents"] = pipe.prepare_reference_latents(
                references, self.resolution, self.resolution).to(pipe.transformer.dtype)
            tokens = [self._subject_tokens(name) for name in names]
            length = max(e.shape[1] for e, _ in tokens)
            width = tokens[0][0].shape[2]
            subject_embeds = embeds.new_zeros(len(references), length, width)
            mask = torch.zeros(len(references), length, device=device)
            for i, (e, _) in enumerate(tokens):
                subject_embeds[i, : e.shape[1]] = e[0]
                mask[i, : e.shape[1]] = 1
            batch["subject_embeds"] = subject_embeds
            batch["subject_pooled"] = torch.cat([p for _, p in tokens]).to(embeds.dtype)
            batch["subject_mask"] = None if bool(mask.all()) else mask
            batch["reference_index"] = torch.tensor(reference_index, device=device)
            batch["subject_weights"] = self._subject_weights(texts, subjects, embeds.shape[1])
            has_second = torch.tensor([groups[i].second is not None for i in reference_index])
            drop_first = drop_second = torch.zeros(n, dtype=torch.bool)
            if seconds and t.subject_reference_dropout > 0:
                drop_first, drop_second = one_reference_dropout(has_second & ~drop_reference,
                                                                 t.subject_reference_dropout, g)
            batch["log_scale"] = torch.where(drop_reference | drop_first, -math.inf, 0.0).to(device)
            if seconds:
                batch |= self._second_subject(groups, seconds, reference_index, texts, has_second,
                                              drop_reference | drop_second, embeds.shape[1])
                if t.routing_loss_weight > 0 and any(groups[i].subject_masks for i in seconds):
                    batch["route_masks"] = self._route_masks(groups, batch["target_latents"].shape[-2:])
        batch["sigmas"] = self.sigmas(n, g).to(device)
        batch["noise"] = torch.randn(batch["target_latents"].shape, generator=g).to(device)
        if t.foreground_loss_weight != 1.0:
            batch["loss_weights"] = foreground_weights(targets, self.resolution, batch["target_latents"].shape[-2:],
                                                       t.foreground_loss_weight).to(device)
        batch["origins"] = [gr.origin for gr in groups]
        batch["prompts"] = texts
        return batch

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per key, kept in an LRU of ``data.prompt_cache_size`` entries (0: never kept)."""
        size = self.config.data.prompt_cache_size
        if size <= 0:
            return make()
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        value = self.cache[key] = make()
        while len(self.cache) > size:
            self.cache.popitem(last=False)
        return value

    @torch.no_grad()
    def _encode_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(N, L, D) prompt embeddings and (N, P) pooled ones of the frozen text encoders, cached per prompt."""
        def encode(batch: Sequence[str]) -> tuple[Tensor, Tensor]:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(batch), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                device=self.device, max_sequence_length=self.config.data.max_sequence_length)
            return embeds, pooled

        if self.config.data.prompt_cache_size <= 0:
            return encode(texts)
        missing = [t for t in dict.fromkeys(texts) if ("text", t) not in self.cache]
        if missing:  # new prompts are encoded together, then kept one by one
            embeds, pooled = encode(missing)
            for i, text in enumerate(missing):
                self._cached(("text", text), lambda i=i: (embeds[i], pooled[i]))
        rows = []
        for text in texts:
            row = self.cache.get(("text", text))
            if row is None:  # evicted within this batch: the cache is smaller than a batch's prompts
                return encode(texts)
            self.cache.move_to_end(("text", text))
            rows.append(row)
        return torch.stack([e for e, _ in rows]), torch.stack([p for _, p in rows])

    def _second_subject(self, groups: Sequence[Any], seconds: list[int], reference_index: list[int],
                        texts: Sequence[str], has_second: Tensor, drop_reference: Tensor,
                        length: int) -> dict[str, Tensor]:
        """The second reference set of CADS: per target the index of its group's second reference (targets of
        one-subject groups point at their own reference and are switched off with log_scale -inf), and the
        weights of the second subject's name in each prompt (its own m_i)."""
        slot = {g: len(groups) + k for k, g in enumerate(seconds)}
        index = [slot.get(g, g) for g in reference_index]
        rows = [j for j, g in enumerate(reference_index) if g in slot]
        weights = torch.zeros(len(texts), length, device=self.device)
        weights[rows] = self._subject_weights([texts[j] for j in rows],
                                              [groups[reference_index[j]].second[1] for j in rows], length)
        off = drop_reference.cpu() | ~has_second
        return {"second_index": torch.tensor(index, device=self.device), "second_weights": weights,
                "second_log_scale": torch.where(off, -math.inf, 0.0).to(self.device)}

    def _route_masks(self, groups: Sequence[Any], latent_size: tuple[int, int]) -> Tensor:
        """(N, 2, tokens) {0, 1}: the image tokens each subject covers in each target; zeros where a group has none."""
        patch = self.pipe.transformer.config.patch_size
        grid = (latent_size[0] // patch, latent_size[1] // patch)
        rows = [token_masks(group.subject_masks[k], self.resolution, grid) if group.subject_masks
                else torch.zeros(2, grid[0] * grid[1]) for group in groups for k in range(len(group.targets))]
        return torch.stack(rows).to(self.device)

    def _subject_weights(self, texts: Sequence[str], subjects: Sequence[str], length: int) -> Tensor:
        """Where each target's subject sits in its prompt; the pipeline's per-prompt warning becomes one note."""
        pipe_logger = logging.getLogger("customshift.pipeline")
        level = pipe_logger.level
        pipe_logger.setLevel(logging.ERROR)
        try:
            rows = [self._cached(("subject", text, subject, length),
                                 lambda text=text, subject=subject: self.pipe.subject_token_weights(
                                     [text], subject, length))
                    for text, subject in zip(texts, subjects, strict=True)]
        finally:
            pipe_logger.setLevel(level)
        weights = torch.cat(rows)
        if not self._warned_no_subject:
            missing = [t for t, w in zip(texts, weights, strict=True) if t.strip() and w.sum() == 0]
            if missing:
                self._warned_no_subject = True
                logger.info("some prompts do not contain their subject's name (e.g. %r): CADS uses an unconditional "
                            "shift for them (m_i = 1)", missing[0][:80])
        return weights.to(self.device)
