"""The sprite domain's commands of the ``customshift`` CLI: ``train-vae`` and ``train-default-model``.

`register` adds them to the app in customshift/cli.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]


def train_vae(
    out: Annotated[Path, typer.Option("--out", help="Output folder (the VAE in OUT/vae, vae_stats.json).")],
    minutes: Annotated[float, typer.Option(min=0.0, help="Wall-clock budget.")] = 15.0,
    max_steps: Annotated[int, typer.Option(min=1)] = 100_000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    latent_std: Annotated[float, typer.Option(min=0.0)] = 1.0,
    threads: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Train the sprite-domain VAE (stage 1 of the default model); resumable."""
    import json

    from .vae import train_vae as run

    folder = run(str(out), minutes=minutes, max_steps=max_steps, batch_size=batch_size, lr=lr,
                 latent_std=latent_std, threads=threads)
    typer.echo(json.dumps(json.loads((folder.parent / "vae_stats.json").read_text())))


def train_default_model() -> None:
    """Run the default model's whole recipe, resumable: scripts/train_default_model.sh of a source checkout."""
    from ..errors import CustomShiftError

    root = Path(__file__).resolve().parents[2]
    script = root / "scripts" / "train_default_model.sh"
    if not script.is_file():
        raise CustomShiftError("the default model's recipe needs the source checkout (scripts/train_default_model.sh)")
    raise typer.Exit(subprocess.call(["bash", str(script)], cwd=root, env={**os.environ, "PYTHON": sys.executable}))


def register(app: typer.Typer, user_errors: Any) -> None:
    """Add the sprite commands to ``app``; ``user_errors`` turns the project's errors into one line."""
    app.command("train-vae")(user_errors(train_vae))
    app.command("train-default-model")(user_errors(train_default_model))
