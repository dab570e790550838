"""The default model: a small SD3 trained by this project on the synthetic sprite domain.

It ships inside the package (``customshift/assets/default-model``: a diffusers pipeline folder plus
``customshift/`` trained weights) so that ``customshift generate`` and ``customshift demo`` work offline
from a fresh clone. The recipe that made it is ``scripts/train_default_model.sh``.
"""

from __future__ import annotations

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
