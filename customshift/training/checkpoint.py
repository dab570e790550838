"""Checkpoints: accelerate's ``save_state`` / ``load_state`` inside folders published atomically.

A checkpoint ``ckpt-{step:07d}`` is written under a hidden temporary name, fsynced, renamed into place,
then a ``latest`` pointer is replaced atomically: a SIGKILL at any moment leaves the previous complete
checkpoint loadable, and loading falls back to the newest complete one if ``latest`` is broken.

Layout ``customshift-checkpoint/2``: ``accelerate/`` (what ``Accelerator.save_state`` writes: optimizer,
the LR schedule as a registered object, every process's RNG; FSDP / DeepSpeed shards), and beside it what
evaluation and packaging read without accelerate: ``trainable.safetensors`` and ``ema.safetensors`` (the
full trained / averaged tensors by name; the save hook keeps accelerate from writing a second full copy of
the model), ``rng.safetensors`` (each process's data-noise generator), ``state.json`` (step, data
position per process), ``config.yaml`` and the user-facing exports ``customshift/`` and
``generation_lora/``. Checkpoints of the first layout (``customshift-checkpoint/1``: ``optimizer.pt``,
``scheduler.pt``, torch RNG in ``rng.safetensors``) still load, so runs started before keep resuming.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CustomShiftError
from ..io import atomic_save_safetensors, atomic_write_json, atomic_write_text, fsync_dir
from .config import ConfigError, TrainingConfig, config_to_yaml, read_config_file
from .model import GENERATION_ADAPTER

logger = logging.getLogger("customshift.training.checkpoint")

__all__ = ["CheckpointError", "Checkpointer", "check_resume_compatible", "find_checkpoint", "is_complete_checkpoint"]

FORMAT = "customshift-checkpoint/2"
LEGACY_FORMAT = "customshift-checkpoint/1"
INDEX = "checkpoint.json"
LATEST = "latest"


class CheckpointError(CustomShiftError, RuntimeError):
    """No loadable checkpoint where one was asked for."""


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("ckpt-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint folder whose index exists and lists files that all exist with their sizes."""
    try:
        index = json.loads((path / INDEX).read_text())
        if index.get("format") not in (FORMAT, LEGACY_FORMAT):
            return False
        for rel, size in index["files"].items():
            if (path / rel).stat().st_size != size:
                return False
        from safetensors import safe_open

        with safe_open(str(path / "trainable.safetensors"), framework="pt") as handle:
            handle.keys()
        return True
    except Exception:  # noqa: BLE001 - anything unreadable means "not complete"
        return False


def find_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to load: ``path`` itself if it is a complete checkpoint folder, else the run folder's.

    In a run folder that is ``latest``'s target, unless it is broken or a newer complete checkpoint
    exists (a kill between publishing a checkpoint and updating ``latest``): then the newest complete one.
    """
    path = Path(path)
    if (path / INDEX).exists() or checkpoint_step(path) is not None:
        return path if is_complete_checkpoint(path) else None
    if not path.is_dir():
        return None
    try:
        latest = (path / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        latest = ""
    candidates = sorted((p for p in path.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                        key=checkpoint_step, reverse=True)
    for candidate in candidates:
        if is_complete_checkpoint(candidate):
            if candidate.name != latest:
                logger.warning("%s: 'latest' points to %r; using the newest complete checkpoint %s",
                               path, latest, candidate.name)
            return candidate
    return None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def check_resume_compatible(config: TrainingConfig, checkpoint: Path) -> None:
    """Refuse, naming the key, a resume whose config changes what is trained (the adapter's shape, the mode)."""
    saved = TrainingConfig.from_dict(read_config_file(checkpoint / "config.yaml"))
    shaping = {"mode": (config.mode, saved.mode), "train.trainable": (config.train.trainable, saved.train.trainable)}
    mine, theirs = _flat(config.customshift_config().to_dict()), _flat(saved.customshift_config().to_dict())
    for key in sorted(set(mine) | set(theirs)):
        shaping[f"model.customshift.{key}"] = (mine.get(key), theirs.get(key))
    tiny_now, tiny_then = _flat(config.model.tiny), _flat(saved.model.tiny)
    for key in sorted(set(tiny_now) | set(tiny_then)):
        shaping[f"model.tiny.{key}"] = (tiny_now.get(key), tiny_then.get(key))
    for key, (now, then) in shaping.items():
        if now != then:
            raise ConfigError(f"--resume: {key} is {now!r} here but {then!r} in {checkpoint}; resume with the "
                              "checkpoint's value, or start a new run in another output_dir")
    for section in ("model", "data"):
        if getattr(saved, section) != getattr(config, section):
            logger.warning("resuming %s with a different %r section than the checkpoint's", checkpoint, section)


class Checkpointer:
    """Saves and restores a `Trainer`'s state; the trainer supplies the parts (accelerator, optimizer, ...)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        acc = trainer.accelerator
        acc.register_for_checkpointing(trainer.lr_scheduler)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        self._shadow: Any = None

    # accelerate hooks: the trained tensors are saved once, by name, at the checkpoint's top level
    def _save_hook(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        while weights:
            weights.pop()

    def _load_hook(self, models: list[Any], input_dir: str) -> None:
        while models:
            models.pop()

    # ------------------------------------------------------------------------------------------------
    def full_state(self, averaged: bool = False) -> dict[str, Tensor]:
        """The trained (or EMA) tensors in full, on every process (a collective under FSDP / DeepSpeed)."""
        tr = self.trainer
        if averaged and tr.ema is not None and not tr.sharded:
            return tr.ema.named()
        if not tr.sharded:
            return {n: p.detach().float().cpu().contiguous() for n, p in tr.trainable.items()}
        swap = tr.ema.swapped_in() if averaged and tr.ema is not None else contextlib.nullcontext()
        with swap:
            full = tr.accelerator.get_state_dict(tr.model)  # the Objective's keys: transformer.* and branch.*
        return {n: full[n].detach().float().cpu().contiguous() for n in tr.trainable if n in full}

    def save(self, reason: str = "periodic") -> Path:
        """Write ``ckpt-{step:07d}`` atomically (temp folder, fsync, rename), then point ``latest`` at it."""
        from accelerate.utils import gather_object

        tr = self.trainer
        acc, out = tr.accelerator, tr.output_dir
        if tr.world_size > 1 and not tr.sharded:
            # Replicas must hold the same weights; a silent desync would make the checkpoint rank 0's alone.
            sums = gather_object([sum(float(p.detach().double().abs().sum()) for p in tr.trainable.values())])
            if max(sums) - min(sums) > 1e-6 * max(1.0, abs(max(sums))):
                raise CheckpointError(f"processes disagree on the trained weights (checksums {sums}); "
                                      "the distributed setup is broken")
        data_states = gather_object([tr.loader.state()])
        generators = gather_object([tr.generator.get_state()])
        step = tr.step
        final, temp = out / f"ckpt-{step:07d}", out / f".tmp-ckpt-{step:07d}"
        if tr.is_main:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        acc.wait_for_everyone()
        trained = self.full_state()
        averaged = self.full_state(averaged=True) if tr.ema is not None else None
        acc.save_state(str(temp / "accelerate"))
        if tr.is_main:
            atomic_save_safetensors(trained, temp / "trainable.safetensors",
                                    metadata={"format": FORMAT, "step": str(step)})
            if averaged is not None:
                atomic_save_safetensors(averaged, temp / "ema.safetensors")
            atomic_save_safetensors({f"rank{r}.generator": g for r, g in enumerate(generators)},
                                    temp / "rng.safetensors")
            atomic_write_json(temp / "state.json", {
                "step": step, "world_size": tr.world_size, "data": data_states,
                "source_skipped": dict(getattr(tr.source, "skipped", {})), "reason": reason, "time": time.time(),
                "seed": tr.config.seed, "ema_step": step if averaged is not None else None,
            })
            atomic_write_text(temp / "config.yaml", config_to_yaml(tr.config))
            self.write_exports(temp, averaged if averaged is not None else trained)
            self._publish(temp, final, step)
            atomic_write_text(out / LATEST, final.name + "\n")
            self.prune()
            logger.info("checkpoint %s (%s)", final, reason)
        acc.wait_for_everyone()
        tr.last_checkpoint, tr.last_saved_step = final, step
        return final

    def _publish(self, temp: Path, final: Path, step: int) -> None:
        files = {str(p.relative_to(temp)): p.stat().st_size for p in sorted(temp.rglob("*")) if p.is_file()}
        for directory in sorted({p.parent for p in temp.rglob("*")} | {temp}, key=lambda p: -len(p.parts)):
            fsync_dir(directory)
        atomic_write_json(temp / INDEX, {"format": FORMAT, "step": step, "files": files})
        fsync_dir(temp)
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            trash = final.parent / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(temp, final)
        fsync_dir(final.parent)

    # ------------------------------------------------------------------------------------------------
    def _export_pipe(self, weights: dict[str, Tensor]) -> Any:
        """A pipeline holding ``weights`` in full: the run's own when unsharded, else a CPU copy built once."""
        tr = self.trainer
        if not tr.sharded:
            pipe = tr.pipe
        else:
            if self._shadow is None:
                from .model import setup_model

                self._shadow = tr.build_base()
                setup_model(self._shadow, tr.config)
                self._shadow.set_progress_bar_config(disable=True)
            pipe = self._shadow
        params = {**{f"transformer.{n}": p for n, p in pipe.transformer.named_parameters()},
                  **{f"branch.{n}": p for n, p in pipe.reference_branch.named_parameters()}}
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        if tr.config.train.trainable == "full":
            pipe.customshift_weights_changed(base=True)  # the base itself was trained
        if tr.use_reference:
            pipe.customshift_weights_changed()
        return pipe

    def write_exports(self, folder: Path, weights: dict[str, Tensor], whole_pipeline: bool = False) -> None:
        """What users load: CustomShift weights (``customshift/``), the generation LoRA (diffusers format)."""
        tr = self.trainer
        saved = None if tr.sharded else {n: p.detach().clone() for n, p in tr.trainable.items()}
        pipe = self._export_pipe(weights)
        try:
            if tr.use_reference:
                pipe.save_customshift(folder / "customshift", extra={"step": tr.step})
            if tr.cs.generation_lora_rank > 0:
                from peft.utils import get_peft_model_state_dict

                state = get_peft_model_state_dict(pipe.transformer, adapter_name=GENERATION_ADAPTER)
                state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
                type(pipe).save_lora_weights(str(folder / "generation_lora"), transformer_lora_layers=state)
            if whole_pipeline:
                pipe.save_pretrained(str(folder / "pipeline"))
        finally:
            if saved is not None:  # the run's own pipeline gets its trained (not averaged) weights back
                self._export_pipe(saved)

    def export_final(self) -> Path | None:
        """``final/``: the exports of the last step, plus the whole pipeline when the base was trained."""
        tr = self.trainer
        acc = tr.accelerator
        weights = self.full_state(averaged=tr.ema is not None)
        if not tr.is_main:
            acc.wait_for_everyone()
            return None
        final, temp = tr.output_dir / "final", tr.output_dir / ".tmp-ckpt-final"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        self.write_exports(temp, weights, whole_pipeline=tr.config.train.trainable == "full")
        atomic_write_text(temp / "config.yaml", config_to_yaml(tr.config))
        atomic_write_json(temp / "info.json", {"step": tr.step, "checkpoint": str(tr.last_checkpoint)})
        if final.exists():
            trash = tr.output_dir / ".trash-final"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(temp, final)
        fsync_dir(tr.output_dir)
        acc.wait_for_everyone()
        return final

    def prune(self) -> None:
        out, keep = self.trainer.output_dir, self.trainer.config.checkpoint.keep_last
        done = sorted((p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)
        for old in done[:-keep]:
            trash = out / f".trash-{old.name}"
            try:
                os.replace(old, trash)  # renamed first: a half-deleted folder never looks like a checkpoint
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove temporary folders left by a process killed while writing a checkpoint."""
        for pattern in (".tmp-ckpt-*", ".trash-*"):
            for path in self.trainer.output_dir.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore everything a checkpoint holds; the data position continues exactly when the world size matches."""
        from safetensors.torch import load_file

        tr, path = self.trainer, Path(path)
        check_resume_compatible(tr.config, path)
        legacy = json.loads((path / INDEX).read_text()).get("format") == LEGACY_FORMAT
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        missing, unexpected = sorted(set(tr.trainable) - set(weights)), sorted(set(weights) - set(tr.trainable))
        if missing or unexpected:
            raise CheckpointError(f"{path}: its weights do not match this run's trained parameters "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]}); same config?")
        if not tr.sharded:
            with torch.no_grad():
                for name, p in tr.trainable.items():
                    p.copy_(weights[name].to(p.device, p.dtype))
        rng = load_file(str(path / "rng.safetensors"))
        same_world = state.get("world_size") == tr.world_size
        if legacy:
            if tr.sharded:
                tr.accelerator.load_state(str(path / "accelerate"))
            else:
                tr.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
            tr.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
            if same_world:
                torch.set_rng_state(rng[f"rank{tr.rank}.torch_cpu"])
        else:
            tr.accelerator.load_state(str(path / "accelerate"))
        if tr.ema is not None:
            if (path / "ema.safetensors").exists():
                tr.ema.load_named(load_file(str(path / "ema.safetensors")), int(state["step"]))
            else:
                logger.warning("%s has no EMA weights: the EMA restarts from the current weights", path)
        tr.step = int(state["step"])
        data = state["data"]
        if same_world:
            tr.generator.set_state(rng[f"rank{tr.rank}.generator"])
            mine = data[tr.rank]
            tr.loader.cursor = int(mine["cursor"])
        else:
            logger.warning("resuming with %d processes from a checkpoint made with %s: data order and noise "
                           "continue approximately, not exactly", tr.world_size, state.get("world_size"))
            tr.generator.manual_seed(tr.config.seed * 1000 + 7919 * tr.rank + tr.step)
            tr.loader.cursor = sum(int(d["cursor"]) for d in data) // tr.world_size
            mine = {"skipped": {}, "attempted": 0}
        tr.loader.skipped.clear()
        tr.loader.skipped.update(mine.get("skipped", {}))
        tr.loader.attempted = int(mine.get("attempted", 0))
        if tr.use_reference:
            tr.pipe.customshift_weights_changed()
        tr.last_checkpoint, tr.last_saved_step = path, tr.step
        logger.info("resumed from %s at step %d%s", path, tr.step, " (first checkpoint layout)" if legacy else "")
