"""The default model's sprite domain as a model: its untrained shape and the vocabulary it was trained on.

``model.pretrained: sprite`` in a training config (an entry point, customshift/plugins.py) builds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..tiny import build_tiny_components
from .synthetic import BACKGROUND_NAMES, CLASS_NAMES, HORIZONTAL_NAMES, SIZE_NAMES, VERTICAL_NAMES

__all__ = ["DEFAULT_MODEL_SHAPE", "build_sprite_pipeline", "domain_note"]

# The default model's shape: 64 x 64 sprites, a 4x VAE (16 x 16 x 4 latents), patch 1 (256 tokens, one per
# 4-px sprite cell), a transformer narrow enough to train on a CPU (docs/default-model.md).
DEFAULT_MODEL_SHAPE = {
    "sample_size": 16,
    "patch_size": 1,
    "num_layers": 6,
    "heads": 3,
    "head_dim": 64,
    "latent_channels": 4,
    "vae_channels": (32, 32, 64),
}


def build_sprite_pipeline(vae_folder: str | None = None, seed: int = 0, **overrides):
    """The untrained default-model pipeline: random transformer and text encoders, the sprite VAE.

    ``vae_folder`` is the stage-1 VAE (customshift/sprites/vae.py); without it the VAE is random too.
    """
    from ..pipeline import CustomShiftPipeline

    components = build_tiny_components("sd3", seed, **{**DEFAULT_MODEL_SHAPE, **overrides})
    if vae_folder is not None:
        from diffusers import AutoencoderKL

        components["vae"] = AutoencoderKL.from_pretrained(vae_folder)
    return CustomShiftPipeline(**components)


def domain_note(subjects: Iterable[str], prompts: Iterable[str]) -> str | None:
    """One line when a subject or prompt is outside the sprite domain the default model was trained on.

    A newcomer's first ``customshift generate --reference dog.jpg --subject dog --prompt "a dog on the beach"``
    (no ``--model``) otherwise silently makes a 64 x 64 sprite picture.
    """
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
