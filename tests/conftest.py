"""Shared fixtures: tiny SD3 / SD3.5 pipelines built offline, saved to disk once per session and loaded
back through ``from_pretrained``, so every test exercises the real loading path."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, str]:
    from customshift.tiny import build_tiny_pipeline

    folders = {}
    for variant in ("sd3", "sd35"):
        folder = tmp_path_factory.mktemp(f"tiny-{variant}")
        build_tiny_pipeline(variant, seed=0).save_pretrained(folder)
        folders[variant] = str(folder)
    return folders


@pytest.fixture(scope="session")
def tiny_folder(tiny_folders) -> str:
    return tiny_folders["sd3"]


def load_tiny(folder: str):
    from customshift.pipeline import CustomShiftPipeline

    pipe = CustomShiftPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipe(tiny_folder):
    return load_tiny(tiny_folder)


def random_image(seed: int = 0, size: int = 32, mode: str = "RGB") -> Image.Image:
    array = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8")
    return Image.fromarray(array).convert(mode)


@pytest.fixture
def reference_image() -> Image.Image:
    return random_image(0)
