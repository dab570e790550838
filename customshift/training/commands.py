"""The training command of the ``customshift`` CLI: ``train`` (the sprite commands: customshift/sprites/commands.py).

They live here, beside what they run, and `register` adds them to the app in customshift/cli.py.
"""

from __future__ import annotations

import os
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


def register(app: typer.Typer, user_errors: Any) -> None:
    """Add ``train`` to ``app``; ``user_errors`` turns the project's errors into one line."""
    app.command(cls=OptionalResume, context_settings={"allow_extra_args": False})(user_errors(train))
