"""CustomShift: tuning-free subject-driven customization on Stable Diffusion 3.

The public API is imported lazily so that ``import customshift`` stays fast and light (the CLI and
the image utilities do not pay for diffusers until they need it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CustomShiftPipeline": "customshift.pipeline",
    "CustomShiftConfig": "customshift.config",
    "SubjectEmbedding": "customshift.reference",
    "ReferenceBranch": "customshift.reference",
    "CADSAttnProcessor": "customshift.attention",
    "build_tiny_pipeline": "customshift.tiny",
    "load_image": "customshift.images",
    "CustomShiftError": "customshift.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'customshift' has no attribute {name!r}")
