"""Validation during training: a sample grid and, where the data source scores images (the sprite domain), exact
metrics, with the EMA weights."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch

from ..images import make_grid
from ..io import atomic_save_image

logger = logging.getLogger("customshift.training.validation")

__all__ = ["Validator"]


class Validator:
    """Generates for fixed groups (reference | target | generated [| wrong reference]) on the main process.

    Single process and DDP: the trainer's own pipeline with the EMA weights swapped in. FSDP / DeepSpeed: the
    pipeline the trainer holds is sharded, so the full (EMA) state is gathered on every process and the main
    one generates with the CPU copy the exports use (checkpoint.py, ``Checkpointer._export_pipe``): slow for
    large models, where ``validation.every_steps: 0`` and an evaluation of the exported checkpoints are better.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._groups: list[Any] | None = None

    def groups(self) -> list[Any]:
        """Fixed validation groups: the source's held-out ones where it has them, else its first usable items."""
        if self._groups is None:
            tr = self.trainer
            v = tr.config.validation
            if hasattr(tr.source, "validation_groups"):
                self._groups = tr.source.validation_groups(v.num_pairs, v.track, v.seed)
            else:
                groups, index = [], 0
                while len(groups) < v.num_pairs and index < tr.source.length:
                    with contextlib.suppress(Exception):
                        groups.append(tr.source.get(index))
                    index += 1
                self._groups = groups
        return self._groups

    def __call__(self) -> dict[str, Any] | None:
        """Runs on the main process only; a failure is logged, never fatal to the run."""
        tr = self.trainer
        metrics = None
        weights = tr.checkpoints.full_state(averaged=tr.ema is not None) if tr.sharded else None  # a collective
        if tr.is_main:
            try:
                if weights is None:
                    with tr.averaged_weights():
                        metrics = self._validate(tr.pipe)
                else:
                    metrics = self._validate(tr.checkpoints._export_pipe(weights))
            except Exception:  # noqa: BLE001 - a broken sample grid must not end hours of training
                logger.exception("validation at step %d failed; training continues", tr.step)
        tr.accelerator.wait_for_everyone()
        return metrics

    @torch.no_grad()
    def _validate(self, pipe: Any) -> dict[str, Any] | None:
        from PIL import Image

        tr = self.trainer
        v = tr.config.validation
        groups = self.groups()
        if not groups:
            return None
        scored = hasattr(tr.source, "score")
        wrong = tr.use_reference and hasattr(tr.source, "wrong_references") and v.wrong_reference and len(groups) >= 2
        wrong_refs = tr.source.wrong_references(groups) if wrong else None
        rows, generated, generated_wrong = [], [], []
        was_training = pipe.transformer.training
        pipe.transformer.eval()
        try:
            with tr.accelerator.autocast():
                for k, group in enumerate(groups):
                    target = np.asarray(group.targets[0])
                    image = self._generate(pipe, group.reference if tr.use_reference else None, group.subject,
                                           group.prompts[0], v.seed + k, target.shape[:2])
                    generated.append(image)
                    row = [np.asarray(group.reference), target, image] if tr.use_reference else [target, image]
                    if wrong_refs is not None:
                        other = self._generate(pipe, Image.fromarray(wrong_refs[k]), group.subject,
                                               group.prompts[0], v.seed + k, target.shape[:2])
                        generated_wrong.append(other)
                        row.append(other)
                    rows.append(row)
        finally:
            pipe.transformer.train(was_training)
        labels = ["reference", "target", "generated"] if tr.use_reference else ["target", "generated"]
        if wrong_refs is not None:
            labels.append("wrong ref")
        grid = make_grid(rows, labels=labels, scale=max(1, 128 // max(rows[0][0].shape[:2])))
        atomic_save_image(grid, tr.output_dir / "validation" / f"step-{tr.step:07d}.png")
        metrics: dict[str, Any] = {"step": tr.step}
        if scored:
            metrics.update({k: round(value, 4) for k, value in tr.source.score(generated, groups).items()})
            if generated_wrong:
                metrics["identity_wrong_reference"] = round(tr.source.score(generated_wrong, groups)["identity"], 4)
            tr.accelerator.log({f"validation/{k}": val for k, val in metrics.items() if k != "step"}, step=tr.step)
            logger.info("validation at step %d: %s", tr.step, metrics)
        return metrics

    def _generate(self, pipe: Any, reference: Any, subject_name: str, prompt: str, seed: int,
                  size: tuple[int, int]) -> np.ndarray:
        from PIL import Image

        tr = self.trainer
        v, resolution = tr.config.validation, tr.resolution
        subject = None
        if reference is not None:
            subject = pipe.encode_subject(reference, subject_name, height=resolution, width=resolution)
        result = pipe(
            prompt, subject=subject, shift_scale=v.shift_scale, guidance_scale=v.guidance_scale,
            reference_guidance_scale=v.reference_guidance_scale if subject is not None else 0.0,
            num_inference_steps=v.num_inference_steps, height=resolution, width=resolution,
            generator=torch.Generator().manual_seed(seed), max_sequence_length=tr.config.data.max_sequence_length,
        ).images[0]
        height, width = size
        if result.size != (width, height):  # compare at the data's size (the sprite metrics expect 64 x 64)
            upscale = width >= result.size[0]
            result = result.resize((width, height), Image.Resampling.NEAREST if upscale else Image.Resampling.BOX)
        return np.asarray(result.convert("RGB"))
