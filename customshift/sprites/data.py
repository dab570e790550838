"""The sprite domain as a training data source (``data.kind: synthetic``, registered in pyproject.toml).

Besides the `customshift.training.data` source interface (``get(i)``, ``length``) it offers what the trainer's
validation uses where a source has it: fixed held-out groups, wrong references and exact scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..images import load_image
from ..training.data import Group
from . import synthetic

__all__ = ["SyntheticSource", "group_from_pairs"]

Spec = str | Mapping[str, float]


def group_from_pairs(pairs: Sequence[Any], origin: str) -> Group:
    """A Group from synthetic Pairs that share one reference."""
    first = pairs[0]
    return Group(reference=load_image(first.reference), subject=first.subject_name,
                 targets=[load_image(p.target) for p in pairs], prompts=[p.prompt for p in pairs],
                 origin=origin, pairs=list(pairs))


def box_mask(context: synthetic.Context) -> np.ndarray:
    """(CANVAS, CANVAS) bool: the sprite's box in a target drawn at ``context``."""
    x0, y0, side = synthetic.sprite_box(context)
    mask = np.zeros((synthetic.CANVAS, synthetic.CANVAS), dtype=bool)
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


def _check_names(where: str, what: str, spec: Spec, allowed: Sequence[str]) -> None:
    names = [spec] if isinstance(spec, str) else list(spec)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{where}: unknown {what} {bad or names!r}; expected names from {list(allowed)}")


class SyntheticSource:
    """Endless sprite groups; item ``i`` is a pure function of ``(seed, i)`` and the curriculum.

    ``items_per_step`` (references per optimizer step over all processes) turns an item index into
    the step it is consumed at, so the staged curriculum is reproducible on resume.
    """

    length: int | None = None
    several_targets = True  # honours data.targets_per_reference

    def __init__(
        self,
        seed: int,
        targets_per_reference: int = 1,
        track: Spec = "clean",
        layout: Spec = "random",
        curriculum: Sequence[Mapping[str, Any]] = (),
        items_per_step: int = 1,
        placement: Spec = "grid",
        distractor_offsets: Spec = "grid",
        reference_size: Spec | None = None,
        distractor_touching: float | None = None,
    ) -> None:
        self.check_options(track, layout, curriculum, placement, distractor_offsets, reference_size,
                           distractor_touching)
        self.seed = int(seed)
        self.targets_per_reference = int(targets_per_reference)
        self.track = track
        self.layout = layout
        self.curriculum = sorted((dict(s) for s in curriculum), key=lambda s: int(s["until_step"]))
        self.items_per_step = max(1, int(items_per_step))
        self.placement = placement
        self.distractor_offsets = distractor_offsets
        self.reference_size = reference_size
        self.distractor_touching = distractor_touching

    @classmethod
    def from_config(cls, data: Any, seed: int, items_per_step: int) -> SyntheticSource:
        return cls(seed, data.targets_per_reference, data.track, data.layout, data.curriculum, items_per_step,
                   data.placement, data.distractor_offsets, data.reference_size, data.distractor_touching)

    @classmethod
    def check_config(cls, data: Any) -> None:
        """Called by customshift/training/config.py on a `DataConfig` naming this source."""
        cls.check_options(data.track, data.layout, data.curriculum, data.placement, data.distractor_offsets,
                          data.reference_size, data.distractor_touching)

    @staticmethod
    def check_options(track: Spec, layout: Spec, curriculum: Sequence[Mapping[str, Any]], placement: Spec,
                      distractor_offsets: Spec, reference_size: Spec | None = None,
                      distractor_touching: float | None = None) -> None:
        """ValueError naming the ``data.`` key of the first bad value (the config calls it before loading)."""
        for key, spec, allowed in (("track", track, synthetic.TRAINING_TRACKS), ("layout", layout, synthetic.LAYOUTS),
                                   ("placement", placement, synthetic.PLACEMENTS),
                                   ("distractor_offsets", distractor_offsets, synthetic.DISTRACTOR_OFFSETS),
                                   ("reference_size", reference_size, synthetic.SIZE_NAMES)):
            if spec is not None:
                _check_names(f"data.{key}", key.replace("_", " "), spec, allowed)
        if distractor_touching is not None and (
                isinstance(distractor_touching, bool) or not isinstance(distractor_touching, int | float)
                or not 0 <= distractor_touching <= 1):
            raise ValueError(f"data.distractor_touching must be a share in [0, 1], got {distractor_touching!r}")
        for i, stage in enumerate(curriculum):
            where = f"data.curriculum: stage {i}"
            if not isinstance(stage, Mapping) or "until_step" not in stage:
                raise ValueError(f"{where} must be a mapping with until_step (and layout/track)")
            unknown = set(stage) - {"until_step", "layout", "track"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use until_step, layout, track")
            if isinstance(stage["until_step"], bool) or not isinstance(stage["until_step"], int):
                raise ValueError(f"{where}: until_step must be an integer")
            for key, allowed in (("track", synthetic.TRAINING_TRACKS), ("layout", synthetic.LAYOUTS)):
                if key in stage:
                    _check_names(where, key, stage[key], allowed)

    def stage(self, step: int) -> tuple[Spec, Spec]:
        """(track, layout) spec at ``step``: the first stage with ``until_step > step``, else the defaults."""
        for stage in self.curriculum:
            if step < int(stage["until_step"]):
                return stage.get("track", self.track), stage.get("layout", self.layout)
        return self.track, self.layout

    def get(self, index: int) -> Group:
        track_spec, layout_spec = self.stage(index // self.items_per_step)
        rng = np.random.default_rng([synthetic.SPEC_SEED, 3, self.seed, int(index)])
        track = synthetic.draw_weighted(rng, track_spec)
        layout = synthetic.draw_weighted(rng, layout_spec)
        # "grid" draws nothing, so version-1 configs keep their exact item streams.
        placement = "grid" if self.placement == "grid" else synthetic.draw_weighted(rng, self.placement)
        if track == "two_subject":
            pairs = synthetic.sample_two_subject_group(rng, self.targets_per_reference, placement=placement)
            first = pairs[0]
            return Group(reference=load_image(first.references[0]), subject=first.subject_names[0],
                         targets=[load_image(p.target) for p in pairs], prompts=[p.prompt for p in pairs],
                         origin=f"synthetic item {index}", pairs=list(pairs),
                         second=(load_image(first.references[1]), first.subject_names[1]),
                         subject_masks=[tuple(box_mask(c) for c in p.target_contexts) for p in pairs])
        # Weighted offsets, size and contact draw only when set, so configs without them keep their item streams.
        offsets = synthetic.draw_weighted(rng, self.distractor_offsets)
        size = None if self.reference_size is None else synthetic.draw_weighted(rng, self.reference_size)
        contact = None
        if track == "distractor" and self.distractor_touching is not None:
            contact = "touching" if rng.random() < self.distractor_touching else None
        pairs = synthetic.sample_group(rng, self.targets_per_reference, track=track, layout=layout,
                                       placement=placement, distractor_offsets=offsets,
                                       reference_size=size, distractor_contact=contact)
        return group_from_pairs(pairs, f"synthetic item {index}")

    # -- what the trainer's validation uses (customshift/training/validation.py) ---------------------------
    @staticmethod
    def validation_groups(count: int, track: str, seed: int) -> list[Group]:
        """Held-out pairs (never drawn by ``get``): one group per pair."""
        pairs = synthetic.evaluation_split(max(count, 2), track=track, seed=seed)[:count]
        return [group_from_pairs([p], f"evaluation pair {i}") for i, p in enumerate(pairs)]

    @staticmethod
    def wrong_references(groups: Sequence[Group]) -> list[np.ndarray]:
        return synthetic.wrong_references([g.pairs[0] for g in groups])

    @staticmethod
    def score(images: Sequence[np.ndarray], groups: Sequence[Group]) -> dict[str, float]:
        """Exact identity, prompt accuracy and PSNR of one image per group (docs/synthetic.md)."""
        result = synthetic.score(images, [g.pairs[0] for g in groups])
        return {k: float(result[k]) for k in ("identity", "prompt_accuracy", "psnr")}
