"""The default model: a small SD3 trained by this project on the synthetic sprite domain.

It ships inside the package (``customshift/assets/default-model``: a diffusers pipeline folder plus
``customshift/`` trained weights) so that ``customshift generate`` and ``customshift demo`` work offline
from a fresh clone. The recipe that made it is ``scripts/train_default_model.sh``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .errors import CustomShiftError

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"
# The text guidance the default model was evaluated with (docs/default-model.md); SD3's 7 oversaturates it.
DEFAULT_MODEL_GUIDANCE = 2.0


def default_model_path() -> Path:
    """The packaged default pipeline folder; a clear error where this install has none."""
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise CustomShiftError(
            f"no default model is installed ({DEFAULT_MODEL_DIR} is missing); pass --model with an SD3 "
            "checkpoint folder or hub id (e.g. stabilityai/stable-diffusion-3-medium-diffusers)"
        )
    return DEFAULT_MODEL_DIR


def default_weights_path() -> Path | None:
    folder = DEFAULT_MODEL_DIR / "customshift"
    return folder if (folder / "customshift.json").is_file() else None


def load_default_pipeline(device: str | None = None):
    """The default pipeline; ``from_pretrained`` loads its ``customshift/`` weights (docs/diffusers.md)."""
    from .pipeline import CustomShiftPipeline

    pipe = CustomShiftPipeline.from_pretrained(default_model_path())
    return pipe.to(device) if device else pipe


def domain_note(subjects: Iterable[str], prompts: Iterable[str]) -> str | None:
    """One line when a subject or prompt is outside the sprite domain the default model was trained on.

    A newcomer's first ``customshift generate --reference dog.jpg --subject dog --prompt "a dog on the beach"``
    (no ``--model``) otherwise silently makes a 64 x 64 sprite picture.
    """
    from .synthetic import BACKGROUND_NAMES, CLASS_NAMES, HORIZONTAL_NAMES, SIZE_NAMES, VERTICAL_NAMES

    known = {*CLASS_NAMES, *BACKGROUND_NAMES, *HORIZONTAL_NAMES, *SIZE_NAMES, *VERTICAL_NAMES,
             "a", "an", "the", "on", "background"}
    subjects = sorted({s for s in subjects if s.strip().lower() not in CLASS_NAMES})
    words = sorted({w for p in prompts for w in re.findall(r"[a-z]+", p.lower()) if w not in known})
    if not subjects and not words:
        return None
    outside = f"subject {subjects[0]!r}" if subjects else f"prompt word {words[0]!r}"
    return (f"note: no --model given, so the built-in 64x64 sprite model is used; {outside} is outside its domain "
            f"(subjects {'/'.join(CLASS_NAMES)}, prompts like 'a small robot on a pink background, top left'). "
            "For photos pass --model stabilityai/stable-diffusion-3-medium-diffusers (or a local SD3 folder).")
