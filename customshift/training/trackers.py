"""Run logs through accelerate's trackers: the CSV files as one tracker, TensorBoard and W&B when installed."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from ..io import atomic_write_text

__all__ = ["CSVTracker", "choose_trackers", "truncate_logs"]

# accelerate.log(values) keys are "<table>/<column>"; each table is one CSV file in the run folder.
CSV_FILES = {"train": "train_log.csv", "validation": "validation.csv"}


class CSVTracker(GeneralTracker):
    """``train/*`` values to ``train_log.csv``, ``validation/*`` to ``validation.csv``: one row per log call."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike[str]) -> None:
        super().__init__()
        self.run_name = run_name
        self.folder = Path(logging_dir)

    @property
    def tracker(self) -> Path:
        return self.folder

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """The config is saved as config.yaml beside the logs already."""

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        tables: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            table, _, column = key.partition("/")
            if table in CSV_FILES and column:
                tables.setdefault(table, {"step": step})[column] = value
        for table, row in tables.items():
            path = self.folder / CSV_FILES[table]
            new = not path.exists() or path.stat().st_size == 0
            with open(path, "a", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
                handle.flush()


class _FiniteOnly(GeneralTracker):
    """Wraps a tracker that rejects non-numbers (TensorBoard's add_scalar): only finite numbers reach it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.requires_logging_directory = inner.requires_logging_directory
        self.main_process_only = inner.main_process_only

    @property
    def tracker(self) -> Any:
        return self.inner.tracker

    def start(self) -> None:
        self.inner.start()

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.inner.store_init_configuration(values)

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        clean = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean:
            self.inner.log(clean, step=step, **kwargs)

    def finish(self) -> None:
        self.inner.finish()


def choose_trackers(report_to: str | list[str], output_dir: Path, run_name: str) -> list[Any]:
    """accelerate ``log_with`` for ``train.report_to``: CSV always, the others as asked or, on ``auto``, when usable."""
    if report_to == "auto":
        wanted = ["csv"]
        if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
            wanted.append("tensorboard")
        if importlib.util.find_spec("wandb") is not None and (os.environ.get("WANDB_MODE")
                                                               or os.environ.get("WANDB_API_KEY")):
            wanted.append("wandb")
    else:
        wanted = list(dict.fromkeys(["csv", *report_to]))
        modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
        for name in wanted[1:]:
            if not any(importlib.util.find_spec(m) is not None for m in modules[name]):
                from .config import ConfigError

                raise ConfigError(f"train.report_to asks for {name}, which is not installed (pip install {name})")
    trackers: list[Any] = []
    for name in wanted:
        if name == "csv":
            trackers.append(CSVTracker(run_name, output_dir))
        elif name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            trackers.append(_FiniteOnly(TensorBoardTracker(run_name, str(output_dir / "tensorboard"))))
        elif name == "wandb":
            from accelerate.tracking import WandBTracker

            trackers.append(_FiniteOnly(WandBTracker(run_name, dir=str(output_dir))))
    return trackers


def truncate_logs(output_dir: Path, step: int) -> None:
    """On resume, drop log rows written after the checkpoint by the interrupted run."""
    for name in CSV_FILES.values():
        path = output_dir / name
        if not path.exists():
            continue
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            continue
        kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        if len(kept) != len(rows):
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(kept)
            atomic_write_text(path, buffer.getvalue())
