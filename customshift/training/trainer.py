"""The CustomShift trainer: one accelerate-based loop from a tiny CPU model to SD3 on many GPUs.

The parts, one job each: objective.py (loss, sigma sampling, condition dropout), batches.py (the
objective's inputs), model.py (what is trained, dtypes, optimiser), checkpoint.py (accelerate's
save_state/load_state in atomic folders, exports), ema.py (diffusers' EMAModel), trackers.py (CSV,
TensorBoard, W&B through accelerate), validation.py; this file is the loop that joins them.

Reliability, since real runs last hours on preemptible machines:

* a SIGKILL at any moment leaves the previous complete checkpoint loadable (checkpoint.py);
* ``--resume`` restores model, optimizer, LR schedule, EMA, RNG and data position exactly;
* SIGTERM / SIGINT finish the current step, write a checkpoint and exit 0 (a second signal aborts);
* a NaN/inf loss or gradient stops the run naming the step and the batch, before the optimizer
  touches the weights, so the last checkpoint stays the last good one.

Run it with ``customshift train CONFIG [--resume [PATH]]``; under several processes
``accelerate launch -m customshift train CONFIG`` (docs/training.md lists the launch commands).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CustomShiftError
from ..io import atomic_write_text
from .batches import BatchBuilder
from .checkpoint import Checkpointer, CheckpointError, check_resume_compatible, checkpoint_step, find_checkpoint
from .config import ConfigError, TrainingConfig, config_to_yaml, load_config, read_config_file
from .data import GroupLoader, build_source
from .ema import TrainedEMA
from .model import build_optimizer, build_pipeline, configure_dtypes, mark_trainable, setup_model
from .objective import Objective, foreground_weights
from .signals import StopFlag
from .trackers import choose_trackers, truncate_logs
from .validation import Validator

logger = logging.getLogger("customshift.training.trainer")

__all__ = ["CheckpointError", "Objective", "Trainer", "TrainingDiverged", "build_pipeline", "find_checkpoint",
           "foreground_weights", "load_pipeline_from_checkpoint", "setup_model", "train_main"]


class TrainingDiverged(CustomShiftError, RuntimeError):
    """The loss or the gradients became NaN/inf; the message names the step and the batch."""


def make_accelerator(config: TrainingConfig, output_dir: Path) -> Any:
    """accelerate's Accelerator for a run, with its trackers in ``log_with``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = config.train

    def build() -> Accelerator:
        trackers = choose_trackers(t.report_to, output_dir, "customshift")  # accelerate logs on the main process
        return Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
                           project_config=ProjectConfiguration(project_dir=str(output_dir)), log_with=trackers or None)

    try:
        return build()
    except ValueError as error:
        # accelerate keeps one global state per process; a second in-process run with another
        # mixed precision (notebooks, tests) needs it reset, which is only safe without peers.
        if "already been initialized" not in str(error) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        return build()


class Trainer:
    """One run: adapter or full training, with references or text-only (``mode: base``).

    Args:
        config: the validated run config.
        resume: ``False`` (fresh run; refuses an output folder that already has checkpoints), ``True``
            (continue from ``output_dir``'s latest checkpoint if there is one), or a path to a run or
            checkpoint folder.
        pipe: an already built base pipeline (tests pass a copy to skip building); default builds it.
    """

    def __init__(self, config: TrainingConfig, resume: bool | str | os.PathLike[str] = False, pipe: Any = None) -> None:
        from accelerate.utils import DistributedType
        from diffusers.optimization import get_scheduler

        self.config, t = config, config.train
        self.output_dir = Path(config.output_dir).expanduser()
        check_output_dir(self.output_dir)
        self.accelerator = acc = make_accelerator(config, self.output_dir)
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and acc.num_processes == 1:  # each process would train alone and overwrite the others
            raise ConfigError(f"launched as {launched} processes but accelerate set up a single-process run; on a "
                              "machine without GPUs set ACCELERATE_USE_CPU=1 (docs/training.md)")
        launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if launcher_precision and launcher_precision != t.mixed_precision:
            logger.warning("the accelerate config says mixed_precision=%s, the training config %s: the training "
                           "config wins (train.mixed_precision)", launcher_precision, t.mixed_precision)
        self.is_main, self.rank, self.world_size = acc.is_main_process, acc.process_index, acc.num_processes
        self.device = acc.device
        self.sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self._log_handler = _attach_log_file(self.output_dir, self.is_main)
        resume_from = self._resume_source(resume)

        self.pipe = pipe if pipe is not None else self.build_base()
        self.use_reference = config.mode == "customshift"
        setup_model(self.pipe, config)
        self.cs = self.pipe.customshift_config
        self.pipe.set_progress_bar_config(disable=True)
        self.resolution = config.data.resolution or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        self.pipe.check_size(self.resolution, self.resolution)
        self.trainable = mark_trainable(self.pipe, config)
        configure_dtypes(self.pipe, config, self.device)
        if config.model.gradient_checkpointing:
            self.pipe.transformer.enable_gradient_checkpointing()
            self.pipe.reference_branch.tree.enable_gradient_checkpointing()
        self.objective = Objective(self.pipe, self.use_reference, t.routing_loss_weight)
        self.optimizer = build_optimizer(self.pipe, self.trainable, config)
        self.lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps)
        if acc.distributed_type == DistributedType.DEEPSPEED:  # no dataloader is prepared: DeepSpeed needs the size
            ds = acc.state.deepspeed_plugin
            if ds.is_auto("train_micro_batch_size_per_gpu"):
                ds.deepspeed_config["train_micro_batch_size_per_gpu"] = config.data.batch_size
        self.model, self.optimizer = acc.prepare(self.objective, self.optimizer)
        # FSDP2 replaces parameters by sharded ones: clipping, EMA and exports must use what the model now holds.
        prepared = dict(acc.unwrap_model(self.model).named_parameters())
        self.trainable = {n: prepared.get(n, p) for n, p in self.trainable.items()}
        self.ema = TrainedEMA(self.trainable, t.ema_decay) if t.ema_decay > 0 else None
        self.batches = BatchBuilder(self.pipe, config, self.resolution, self.device)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + 7919 * self.rank + 1)

        d = config.data
        items_per_step = d.batch_size * self.world_size * t.gradient_accumulation_steps
        self.source, self.order = build_source(d, config.seed, items_per_step)
        self.loader = GroupLoader(self.source, self.order, d.batch_size, self.rank, self.world_size,
                                  d.num_workers, d.max_skip_fraction)
        self.validator = Validator(self)
        self.checkpoints = Checkpointer(self)
        self.step, self.last_checkpoint, self.last_saved_step = 0, None, -1
        self._stop = StopFlag()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        acc.init_trackers("customshift")
        if self.is_main:
            atomic_write_text(self.output_dir / "config.yaml", config_to_yaml(config))
            self.checkpoints.clean_stale()
            truncate_logs(self.output_dir, self.step)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------
    def build_base(self) -> Any:
        return build_pipeline(self.config)

    @property
    def _prompt_cache(self) -> OrderedDict[Any, Any]:
        return self.batches.cache

    def _resume_source(self, resume: bool | str | os.PathLike[str]) -> Path | None:
        if resume is False or resume is None:
            if find_checkpoint(self.output_dir) is not None:
                raise ConfigError(f"{self.output_dir} already holds checkpoints; pass --resume to continue that run "
                                  "or choose another output_dir")
            return None
        where = self.output_dir if resume is True else Path(resume)
        found = find_checkpoint(where)
        if found is None:
            if resume is True:
                logger.info("no checkpoint in %s: starting a fresh run", where)
                return None
            raise CheckpointError(f"no complete checkpoint at {where}")
        check_resume_compatible(self.config, found)
        if self.is_main and found.parent.resolve() == self.output_dir.resolve():
            # Continuing from an older checkpoint: newer ones would be mistaken for this run's future.
            for newer in self.output_dir.glob("ckpt-*"):
                step = checkpoint_step(newer)
                if step is not None and step > (checkpoint_step(found) or 0):
                    target = newer.with_name(f"abandoned-{newer.name}-{int(time.time())}")
                    os.replace(newer, target)
                    logger.warning("resuming from %s: set the newer %s aside as %s", found.name, newer.name,
                                   target.name)
        return found

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The EMA weights in place of the trained ones for the duration (validation)."""
        if self.ema is None:
            yield
            return
        with self.ema.swapped_in(self.pipe.customshift_weights_changed if self.use_reference else None):
            yield

    def save_checkpoint(self, reason: str = "periodic") -> Path:
        return self.checkpoints.save(reason)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        self.checkpoints.load(path)

    def export_final(self) -> Path | None:
        return self.checkpoints.export_final()

    def validate(self) -> dict[str, Any] | None:
        return self.validator()

    # ------------------------------------------------------------------------------------------------
    def prepare_batch(self, groups: Sequence[Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """Latents, text embeddings, condition dropout, sigmas and noise for a list of groups."""
        return self.batches(groups, generator if generator is not None else self.generator)

    def _reduce_flag(self, value: bool) -> bool:
        """OR of a flag over processes, so that every rank stops (or fails) at the same step."""
        if self.world_size == 1:
            return value
        flag = torch.tensor([1.0 if value else 0.0], device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _diverged(self, what: str, value: float, micro: int, batch: dict[str, Any]) -> TrainingDiverged:
        origins = ", ".join(batch["origins"][:4]) + (" ..." if len(batch["origins"]) > 4 else "")
        last = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
            "; no checkpoint was written yet"
        return TrainingDiverged(
            f"{what} is {value} at step {self.step + 1} (micro-batch {micro}, process {self.rank}); batch: {origins}; "
            f"prompts: {batch['prompts'][:2]}. Stopped before updating the weights{last}. Lower "
            "train.learning_rate, enable train.max_grad_norm, or check this data")

    def train_step(self, micro_batches: Sequence[Sequence[Any]] | None = None) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches (from the loader by default)."""
        t, acc = self.config.train, self.accelerator
        losses, sigmas, grad_norm = [], [], float("nan")
        for micro in range(t.gradient_accumulation_steps):
            groups = micro_batches[micro] if micro_batches is not None else self.loader.next_batch()
            batch = self.prepare_batch(groups)
            with acc.accumulate(self.model):
                loss, _ = self.model(batch)
                value = float(loss.detach().item())
                if self._reduce_flag(not math.isfinite(value)):
                    raise self._diverged("the loss", value, micro, batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    if t.max_grad_norm > 0:
                        norm = acc.clip_grad_norm_(list(self.trainable.values()), t.max_grad_norm)
                        if norm is not None:  # DeepSpeed clips inside its engine and returns None
                            grad_norm = float(norm)
                            # fp16's loss scaler skips steps with inf gradients by design
                            if t.mixed_precision != "fp16" and self._reduce_flag(not math.isfinite(grad_norm)):
                                raise self._diverged("the gradient norm", grad_norm, micro, batch)
                    self.optimizer.step()
                    if not self.optimizer.step_was_skipped:
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            sigmas.append(float(batch["sigmas"].mean()))
        self.step += 1
        if self.ema is not None:
            self.ema.step(self.step)
        if self.use_reference:
            self.pipe.customshift_weights_changed()
        return {"loss": float(np.mean(losses)), "sigma": float(np.mean(sigmas)), "grad_norm": grad_norm,
                "lr": float(self.lr_scheduler.get_last_lr()[0])}

    @torch.no_grad()
    def loss_on(self, groups: Sequence[Any], seed: int = 0) -> float:
        """The loss on fixed groups with fixed noise, sigmas and dropout (for tests and probes)."""
        batch = self.prepare_batch(groups, torch.Generator().manual_seed(seed))
        with self.accelerator.autocast():
            loss, _ = self.objective(batch)
        return float(loss)

    # ------------------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to ``train.max_steps`` or ``train.max_minutes`` (or until a signal); returns the last checkpoint."""
        cfg = self.config
        self._stop.install()
        anomaly = torch.autograd.detect_anomaly() if cfg.train.detect_anomaly else contextlib.nullcontext()
        try:
            with anomaly:
                stopped = self._loop()
            if not stopped:
                if self.last_saved_step != self.step:
                    self.save_checkpoint("final")
                if cfg.validation.every_steps and self.step % cfg.validation.every_steps:
                    self.validate()
                self.export_final()
        finally:
            self._stop.restore()
            self.close()
        assert self.last_checkpoint is not None
        return self.last_checkpoint

    def _loop(self) -> bool:
        """Steps, logs, checkpoints and validation until the end; True when a signal stopped it."""
        from tqdm.auto import tqdm

        cfg = self.config
        progress = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                        desc="train")
        window: list[float] = []
        started = window_start = time.time()
        window_steps = 0
        try:
            while self.step < cfg.train.max_steps:
                stats = self.train_step()
                window.append(stats["loss"])
                window_steps += 1
                progress.update(1)
                progress.set_postfix(loss=f"{np.mean(window[-20:]):.4f}", lr=f"{stats['lr']:.2e}")
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    self._log_train(stats, float(np.mean(window)), window_steps / max(time.time() - window_start, 1e-9),
                                    time.time() - started)
                    window, window_start, window_steps = [], time.time(), 0
                stop = self._reduce_flag(self._stop.requested is not None)
                if not stop and cfg.train.max_minutes and self._reduce_flag(
                        time.time() - started >= 60 * cfg.train.max_minutes):
                    logger.info("train.max_minutes=%g reached at step %d", cfg.train.max_minutes, self.step)
                    return False  # like max_steps: the final checkpoint and export follow
                every = cfg.checkpoint.every_steps
                if (every and self.step % every == 0) or stop:
                    self.save_checkpoint("signal" if stop else "periodic")
                v_every = cfg.validation.every_steps
                if v_every and self.step % v_every == 0 and not stop:
                    self.validate()
                    stop = self._reduce_flag(self._stop.requested is not None)  # a signal during it
                    if stop and self.last_saved_step != self.step:
                        self.save_checkpoint("signal")
                if stop:
                    logger.info("stopped at step %d on %s; checkpoint %s", self.step,
                                self._stop.requested or "a signal on another process", self.last_checkpoint)
                    return True
            return False
        finally:
            progress.close()

    def _log_train(self, stats: dict[str, float], loss: float, steps_per_s: float, elapsed: float) -> None:
        cfg = self.config
        if self.world_size > 1:
            loss = float(self.accelerator.reduce(torch.tensor([loss], device=self.device), reduction="mean").item())
        skipped = sum(self.loader.skipped.values()) + sum(getattr(self.source, "skipped", {}).values())
        targets_per_step = (cfg.data.batch_size * cfg.data.targets_per_reference * self.world_size
                            * cfg.train.gradient_accumulation_steps)
        row = {"loss": round(loss, 6), "lr": stats["lr"], "grad_norm": round(stats["grad_norm"], 6),
               "sigma_mean": round(stats["sigma"], 4), "steps_per_s": round(steps_per_s, 4),
               "samples_per_s": round(steps_per_s * targets_per_step, 3), "skipped": skipped,
               "elapsed_s": round(elapsed, 1)}
        self.accelerator.log({f"train/{k}": v for k, v in row.items()}, step=self.step)
        if self.is_main:
            logger.info("step %d loss %.5f lr %.2e %.2f steps/s", self.step, loss, stats["lr"], steps_per_s)

    def close(self) -> None:
        """Stop the data threads, end the trackers and detach this run's log file."""
        self.loader.close()
        self.accelerator.end_training()
        if self._log_handler is not None:
            logging.getLogger("customshift").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


def _attach_log_file(output_dir: Path, is_main: bool) -> logging.Handler | None:
    """``train.log`` in the run folder (main process); other processes log warnings only."""
    root = logging.getLogger("customshift")
    if not is_main:
        root.setLevel(logging.WARNING)
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "train.log"
    handler = None
    if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def check_output_dir(path: Path) -> None:
    """``output_dir`` must be a folder this process can create and write, checked before any model loads."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"output_dir={str(path)!r} cannot be written: {error.strerror or error}") from None


# ----------------------------------------------------------------------------------------------------
# Loading a checkpoint for evaluation


def load_pipeline_from_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                                  ema: bool = True) -> Any:
    """A pipeline with a checkpoint's trained weights (any mode, either layout), rebuilt from its saved config.

    ``path`` is a checkpoint folder or a run folder (its latest complete checkpoint is used); with
    ``ema`` the EMA weights are used when the run kept them.
    """
    from safetensors.torch import load_file

    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no complete checkpoint at {path}")
    config = TrainingConfig.from_dict(read_config_file(found / "config.yaml"))
    pipe = build_pipeline(config)
    setup_model(pipe, config)
    weights = load_file(str(found / ("ema.safetensors" if ema and (found / "ema.safetensors").exists()
                                     else "trainable.safetensors")))
    modules = {"transformer.": pipe.transformer, "branch.": pipe.reference_branch}
    with torch.no_grad():
        for prefix, module in modules.items():
            params = dict(module.named_parameters())
            for name, tensor in weights.items():
                if name.startswith(prefix):
                    params[name[len(prefix):]].copy_(tensor.to(params[name[len(prefix):]].dtype))
    if config.train.trainable == "full":
        pipe.customshift_weights_changed(base=True)  # the base weights were trained
    pipe.customshift_weights_changed()
    pipe.to(device)
    pipe.reference_branch.to(device)
    return pipe


# ----------------------------------------------------------------------------------------------------
# Entry points


def train_main(config_path: str | os.PathLike[str] | None, overrides: Sequence[str] = (),
               resume: bool | str | os.PathLike[str] = False) -> Path:
    """Train from a config file plus ``key=value`` overrides; returns the last checkpoint folder.

    ``resume``: False (fresh run), True (continue ``output_dir``'s latest checkpoint if any), or a run /
    checkpoint folder. Without ``config_path``, resuming from a folder reuses that run's saved config.
    """
    overrides = list(overrides)
    if config_path is None and resume not in (False, True, None):
        found = find_checkpoint(resume)
        if found is None:
            raise CheckpointError(f"no complete checkpoint at {resume}")
        from .config import apply_overrides

        config = TrainingConfig.from_dict(apply_overrides(read_config_file(found / "config.yaml"), overrides))
    elif config_path is None:
        raise ConfigError("give a config file, or --resume RUN_FOLDER")
    else:
        config = load_config(config_path, overrides)
    return Trainer(config, resume=resume).train()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m customshift.training.trainer CONFIG [--set k=v ...] [--resume [PATH]]``: ``customshift train``."""
    from ..cli import app

    try:
        app(["train", *(sys.argv[1:] if argv is None else argv)], prog_name="customshift")
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
