"""Training CustomShift (and the project's own small SD3 models): config, data, the accelerate trainer.

Entry points: ``customshift train CONFIG [--set k=v ...] [--resume [PATH]]`` (customshift/training/commands.py;
also under ``accelerate launch -m customshift train``, docs/training.md), which calls
``train_main(config_path, overrides, resume)``. Imports are lazy so that ``import customshift.training`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "train_main": "customshift.training.trainer",
    "Trainer": "customshift.training.trainer",
    "TrainingDiverged": "customshift.training.trainer",
    "CheckpointError": "customshift.training.trainer",
    "find_checkpoint": "customshift.training.trainer",
    "load_pipeline_from_checkpoint": "customshift.training.trainer",
    "TrainingConfig": "customshift.training.config",
    "ConfigError": "customshift.training.config",
    "load_config": "customshift.training.config",
    "DataError": "customshift.training.data",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'customshift.training' has no attribute {name!r}")
