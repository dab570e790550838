"""The training commands of the ``customshift`` CLI: ``train``, ``train-vae`` and ``train-default-model``.

They live here, beside what they run, and `register` adds them to the app in customshift/cli.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

__all__ = ["LATEST_CHECKPOINT", "register"]

LATEST_CHECKPOINT = "<latest>"  # what a bare --resume means: the output folder's newest complete checkpoint
CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


class OptionalResume(TyperCommand):
    """``--resume`` takes an optional value (a run or checkpoint folder): bare, it continues ``output_dir``.

    Click options cannot have optional values, so a bare ``--resume`` (at the end, before another option,
    or before a config file name) is rewritten to ``--resume=<latest>`` before parsing. ``--set a=1 b=2``
    (several overrides after one ``--set``, as the argparse entry point took them) means ``--set a=1 --set b=2``.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        out: list[str] = []
        in_set = False
        for i, arg in enumerate(args):
            following = args[i + 1] if i + 1 < len(args) else None
            if arg == "--resume" and (following is None or following.startswith("-")
                                      or following.lower().endswith(CONFIG_SUFFIXES)):
                out.append(f"--resume={LATEST_CHECKPOINT}")
            elif in_set and not arg.startswith("-") and "=" in arg:
                out += ["--set", arg]
            else:
                out.append(arg)
            in_set = arg == "--set" or (in_set and not arg.startswith("-") and "=" in arg)
            if arg == "--set":
                out.pop()
        return super().parse_args(ctx, out)


def train(
    config: Annotated[Path | None, typer.Argument(help="YAML/TOML training config (may inherit a `base:`).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key: section.key=value (repeatable).")] = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue a run: bare, from output_dir's latest checkpoint (a fresh run if it has none); "
        "with a run or checkpoint folder, from there (without CONFIG, with that run's saved config).")] = None,
) -> None:
    """Train CustomShift weights (or a small base model) with accelerate; resumable."""
    import logging

    from .trainer import train_main

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    where: bool | str = False if resume is None else (True if resume == LATEST_CHECKPOINT else resume)
    path = train_main(str(config) if config else None, list(set_ or []), where)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(path)


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
    """Add the training commands to ``app``; ``user_errors`` turns the project's errors into one line."""
    app.command(cls=OptionalResume, context_settings={"allow_extra_args": False})(user_errors(train))
    app.command("train-vae")(user_errors(train_vae))
    app.command("train-default-model")(user_errors(train_default_model))
