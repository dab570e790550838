"""The CustomShift trainer: one accelerate-based loop from a tiny CPU model to SD3 on many GPUs.

Objective (docs/method.md, "Training"): SD3's rectified-flow loss on the target latent,
x_t = (1 - sigma) x0 + sigma * noise, predict noise - x0, sigma from the scheduler's shifted table at a
logit-normal position; the reference enters through the Reference-Alignment Branch at t = 0 and CADS
in every block. Condition dropout (prompt / reference / both) teaches the unconditional passes that
guidance needs.

Reliability, since real runs last hours on preemptible machines:

* checkpoints are folders written under a hidden temporary name and renamed into place, then a
  ``latest`` pointer is replaced atomically; a SIGKILL at any moment leaves the previous complete
  checkpoint loadable, and loading falls back to the newest complete one if ``latest`` is broken;
* ``--resume`` restores model, optimizer, LR schedule, EMA, RNG and data position exactly;
* SIGTERM / SIGINT finish the current step, write a checkpoint and exit 0 (a second signal aborts);
* a NaN/inf loss or gradient stops the run naming the step and the batch, before the optimizer
  touches the weights, so the last checkpoint stays the last good one.

Run it with ``customshift train CONFIG`` or ``accelerate launch -m customshift.training.trainer CONFIG``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..attention import ReferenceSet, build_cads_state
from ..errors import CustomShiftError
from ..io import (
    atomic_path,
    atomic_save_image,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
)
from .config import ConfigError, TrainingConfig, config_to_yaml, load_config, read_config_file
from .data import GroupLoader, build_source, group_from_pairs

logger = logging.getLogger("customshift.training.trainer")

__all__ = [
    "CheckpointError",
    "Trainer",
    "TrainingDiverged",
    "find_checkpoint",
    "load_pipeline_from_checkpoint",
    "train_main",
]

CHECKPOINT_FORMAT = "customshift-checkpoint/1"
CHECKPOINT_INDEX = "checkpoint.json"
LATEST = "latest"
GENERATION_ADAPTER = "generation"
SLEEP_ENV = "CUSTOMSHIFT_TEST_CHECKPOINT_SLEEP"


class TrainingDiverged(CustomShiftError, RuntimeError):
    """The loss or the gradients became NaN/inf; the message names the step and the batch."""


class CheckpointError(CustomShiftError, RuntimeError):
    """No loadable checkpoint where one was asked for."""


# ----------------------------------------------------------------------------------------------------
# Checkpoint folders


def _checkpoint_step(path: Path) -> int | None:
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
        index = json.loads((path / CHECKPOINT_INDEX).read_text())
        if index.get("format") != CHECKPOINT_FORMAT:
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
    if (path / CHECKPOINT_INDEX).exists() or _checkpoint_step(path) is not None:
        return path if is_complete_checkpoint(path) else None
    if not path.is_dir():
        return None
    try:
        latest = (path / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        latest = ""
    candidates = sorted((p for p in path.iterdir() if p.is_dir() and _checkpoint_step(p) is not None),
                        key=_checkpoint_step, reverse=True)
    for candidate in candidates:
        if is_complete_checkpoint(candidate):
            if candidate.name != latest:
                logger.warning("%s: 'latest' points to %r; using the newest complete checkpoint %s",
                               path, latest, candidate.name)
            return candidate
    return None


# ----------------------------------------------------------------------------------------------------
# The objective as one module, so that DDP / FSDP / DeepSpeed see every trained parameter in one forward


class Objective(nn.Module):
    """Rectified-flow loss of the generation transformer with the reference through the branch."""

    def __init__(self, pipe: Any, use_reference: bool) -> None:
        super().__init__()
        self.transformer = pipe.transformer
        self.branch = pipe.reference_branch if use_reference else None
        object.__setattr__(self, "_pipe", pipe)  # not a submodule: its VAE/text encoders are frozen

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        x0, noise, sigmas = batch["target_latents"], batch["noise"], batch["sigmas"]
        s = sigmas.view(-1, 1, 1, 1)
        noisy = ((1.0 - s) * x0 + s * noise).to(self.transformer.dtype)
        kwargs = None
        if self.branch is not None:
            kv = self.branch(batch["reference_latents"], batch["subject_embeds"], batch["subject_pooled"],
                             batch["subject_mask"])
            index = batch["reference_index"]
            reference = ReferenceSet(
                keys={name: k[index] for name, (k, _) in kv.items()},
                values={name: v[index] for name, (_, v) in kv.items()},
                log_scale=batch["log_scale"],
                subject_weights=batch["subject_weights"],
            )
            state = build_cads_state(self.branch.config, self.branch.shift, [reference], device=noisy.device,
                                     dtype=self.transformer.dtype, trainable=True)
            kwargs = {"customshift": state}
        pred = self.transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000.0,
            encoder_hidden_states=batch["prompt_embeds"],
            pooled_projections=batch["pooled_embeds"],
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )[0]
        target = noise - x0
        error = (pred.float() - target.float()).pow(2)
        weights = batch.get("loss_weights")
        if weights is None:
            per_sample = error.mean(dim=(1, 2, 3))
        else:
            per_sample = (error * weights).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        # Every trained parameter takes part in every step (a batch whose references are all dropped
        # leaves the branch unused), so DDP needs no find_unused_parameters; the term is exactly 0.
        loss = loss + sum(p.reshape(-1)[:1].sum() for p in self.parameters() if p.requires_grad) * 0.0
        return loss, per_sample.detach()


# ----------------------------------------------------------------------------------------------------
# Pipeline building


def build_pipeline(config: TrainingConfig) -> Any:
    """The base pipeline of a run (tiny offline model, local folder or hub id), fp32 on CPU."""
    model = config.model
    name = model.pretrained
    if name == "tiny" or name.startswith("tiny:"):
        from ..tiny import build_tiny_pipeline

        variant = name.split(":", 1)[1] if ":" in name else "sd3"
        return build_tiny_pipeline(variant, **model.tiny)
    if name == "sprite":
        from ..tiny import build_sprite_pipeline

        if model.vae is not None and not Path(model.vae).expanduser().is_dir():
            raise ConfigError(f"model.vae={model.vae!r} is not a folder; train one with "
                              "python -m customshift.training.vae --out FOLDER")
        return build_sprite_pipeline(model.vae, **model.tiny)
    from ..pipeline import CustomShiftPipeline

    kwargs: dict[str, Any] = {}
    if model.revision:
        kwargs["revision"] = model.revision
    if model.variant:
        kwargs["variant"] = model.variant
    try:
        return CustomShiftPipeline.from_pretrained(name, torch_dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained={name!r} could not be loaded: {' '.join(str(error).split())[:300]}") \
            from None


def setup_model(pipe: Any, config: TrainingConfig) -> None:
    """Build the adapter(s) a run trains on ``pipe`` (seeded, so two runs start from the same weights)."""
    cs = config.customshift_config()
    torch.manual_seed(config.seed)
    if config.model.customshift_weights:
        pipe.load_customshift(config.model.customshift_weights)  # a later stage starts from earlier weights
        saved = pipe.customshift_config.to_dict()
        given = {k: v for k, v in config.model.customshift.items() if saved.get(k) != v}
        if given:
            raise ConfigError(f"model.customshift {given} differs from the config saved with "
                              f"model.customshift_weights={config.model.customshift_weights}; drop it")
        return
    pipe.set_customshift_config(cs)
    if cs.generation_lora_rank > 0:
        pipe.add_generation_lora()


# ----------------------------------------------------------------------------------------------------
# Signals


class _StopFlag:
    """First SIGTERM/SIGINT asks for a clean stop (checkpoint, exit 0); a second one aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {name}: aborting without a checkpoint")
        self.requested = name
        logger.warning("%s received: finishing this step, writing a checkpoint, then stopping", name)

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """One class for every mode of training: adapter or full, with references or text-only (``mode: base``).

    Args:
        config: the validated run config.
        resume: ``False`` (fresh run; refuses an output folder that already has checkpoints), ``True``
            (continue from ``output_dir``'s latest checkpoint if there is one), or a path to a run or
            checkpoint folder.
        pipe: an already built base pipeline (tests pass a copy to skip building); default builds it
            from ``config.model``.
    """

    def __init__(self, config: TrainingConfig, resume: bool | str | os.PathLike[str] = False,
                 pipe: Any = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, ProjectConfiguration

        self.config = config
        self.output_dir = Path(config.output_dir).expanduser()
        t = config.train

        def accelerator() -> Accelerator:
            return Accelerator(
                mixed_precision=t.mixed_precision,
                gradient_accumulation_steps=t.gradient_accumulation_steps,
                project_config=ProjectConfiguration(project_dir=str(self.output_dir)),
            )

        try:
            self.accelerator = accelerator()
        except ValueError as error:
            # accelerate keeps one global state per process; a second in-process run with another
            # mixed precision (notebooks, tests) needs it reset, which is only safe without peers.
            if "already been initialized" not in str(error) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                raise
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
            self.accelerator = accelerator()
        acc = self.accelerator
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and acc.num_processes == 1:
            # Each process would train alone and overwrite the others' checkpoints.
            raise ConfigError(
                f"launched as {launched} processes but accelerate set up a single-process run; on a machine "
                "without GPUs set ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu then runs gloo on CPUs)"
            )
        launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if launcher_precision and launcher_precision != t.mixed_precision:
            logger.warning("the accelerate config says mixed_precision=%s, the training config %s: the training "
                           "config wins (train.mixed_precision)", launcher_precision, t.mixed_precision)
        self.is_main = acc.is_main_process
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self.device = acc.device
        self._sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self._setup_logging()

        resume_from = self._resume_source(resume)

        # --- model -----------------------------------------------------------------------------------
        self.pipe = pipe if pipe is not None else build_pipeline(config)
        self.use_reference = config.mode == "customshift"
        setup_model(self.pipe, config)
        self.cs = self.pipe.customshift_config
        self.pipe.set_progress_bar_config(disable=True)
        self.resolution = config.data.resolution or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        self.pipe.check_size(self.resolution, self.resolution)
        self._configure_trainable()
        self._configure_dtypes()
        if config.model.gradient_checkpointing:
            self.pipe.transformer.enable_gradient_checkpointing()
            self.pipe.reference_branch.tree.enable_gradient_checkpointing()

        self.objective = Objective(self.pipe, self.use_reference)
        self.optimizer = self._build_optimizer()
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps)
        self.model, self.optimizer = acc.prepare(self.objective, self.optimizer)
        self.ema = {n: p.detach().float().clone() for n, p in self.trainable.items()} if t.ema_decay > 0 else None

        # --- objective tables ------------------------------------------------------------------------
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler_config = dict(self.pipe.scheduler.config)
        if t.scheduler_shift is not None:
            scheduler_config["shift"] = t.scheduler_shift
        table = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)  # a copy: sampling moves pipe's
        self.sigma_table = table.sigmas.float().cpu()
        self.num_train_timesteps = int(table.config.num_train_timesteps)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + 7919 * self.rank + 1)
        self._subject_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._prompt_cache: OrderedDict[Any, Any] = OrderedDict()  # data.prompt_cache_size
        self._warned_no_subject = False

        # --- data ------------------------------------------------------------------------------------
        d = config.data
        items_per_step = d.batch_size * self.world_size * t.gradient_accumulation_steps
        self.source, self.order = build_source(d, config.seed, items_per_step)
        self.loader = GroupLoader(self.source, self.order, d.batch_size, self.rank, self.world_size,
                                  d.num_workers, d.max_skip_fraction)
        self._validation_groups: list[Any] | None = None

        # --- state -----------------------------------------------------------------------------------
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._last_saved_step = -1
        self._stop = _StopFlag()
        self._tb = None
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.yaml", config_to_yaml(config))
            self._clean_stale()
            self._truncate_logs()
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------
    # Setup helpers

    def _setup_logging(self) -> None:
        root = logging.getLogger("customshift")
        self._log_handler: logging.Handler | None = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "train.log"
            if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
                handler = logging.FileHandler(path, encoding="utf-8")
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                root.addHandler(handler)
                self._log_handler = handler
            if root.level == logging.NOTSET or root.level > logging.INFO:
                root.setLevel(logging.INFO)
        else:
            root.setLevel(logging.WARNING)

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
        if self.is_main and found.parent.resolve() == self.output_dir.resolve():
            # Continuing from an older checkpoint: newer ones would be mistaken for this run's future.
            for newer in self.output_dir.glob("ckpt-*"):
                step = _checkpoint_step(newer)
                if step is not None and step > (_checkpoint_step(found) or 0):
                    target = newer.with_name(f"abandoned-{newer.name}-{int(time.time())}")
                    os.replace(newer, target)
                    logger.warning("resuming from %s: set the newer %s aside as %s", found.name, newer.name,
                                   target.name)
        return found

    def _configure_trainable(self) -> None:
        """Freeze everything, then mark what this run trains; ``self.trainable`` maps stable names to them."""
        pipe, t = self.pipe, self.config.train
        for module in (pipe.transformer, pipe.reference_branch, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                       pipe.text_encoder_3):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        chosen: list[nn.Parameter] = []
        if t.trainable == "full":
            chosen += list(pipe.transformer.parameters())
        elif self.cs.generation_lora_rank > 0:
            chosen += [p for n, p in pipe.transformer.named_parameters() if "lora_" in n]
        if self.use_reference:
            chosen += pipe.reference_branch.trainable_parameters()
        for p in chosen:
            p.requires_grad_(True)
        if t.trainable == "full":
            pipe.transformer.train()
        names = {}
        for prefix, module in (("transformer.", pipe.transformer), ("branch.", pipe.reference_branch)):
            for n, p in module.named_parameters():
                if p.requires_grad and id(p) not in names:
                    names[id(p)] = prefix + n
        self.trainable: dict[str, nn.Parameter] = {names[id(p)]: p for p in chosen if id(p) in names}
        self._shift_ids = {id(pipe.reference_branch.shift.beta), id(pipe.reference_branch.shift.gamma)}
        count = sum(p.numel() for p in self.trainable.values())
        logger.info("training %d tensors, %.3fM parameters (%s, mode %s)", len(self.trainable), count / 1e6,
                    t.trainable, self.config.mode)

    def _configure_dtypes(self) -> None:
        """Frozen weights in the mixed-precision dtype (``weight_dtype: auto``); trained ones stay fp32."""
        pipe, m, t = self.pipe, self.config.model, self.config.train
        names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if m.weight_dtype == "auto":
            dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.mixed_precision]
        else:
            dtype = names[m.weight_dtype]
        for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            _move(encoder, self.device, dtype)
        _move(pipe.vae, self.device, torch.float32)  # small, and fp16 VAEs overflow
        _move(pipe.transformer, self.device, torch.float32 if t.trainable == "full" else dtype)
        pipe.reference_branch.to(self.device)
        for p in self.trainable.values():
            p.data = p.data.float()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.config.train
        shift = [p for p in self.trainable.values() if id(p) in self._shift_ids]
        rest = [p for p in self.trainable.values() if id(p) not in self._shift_ids]
        groups = []
        if rest:
            groups.append({"params": rest, "lr": t.learning_rate, "weight_decay": t.adam_weight_decay})
        if shift:
            groups.append({"params": shift, "lr": t.shift_learning_rate or t.learning_rate, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)

    # ------------------------------------------------------------------------------------------------
    # Batches

    @torch.no_grad()
    def _subject_tokens(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self._subject_cache:
            if len(self._subject_cache) > 4096:
                self._subject_cache.clear()
            self._subject_cache[name] = self.pipe.subject_tokens(name)
        return self._subject_cache[name]

    @torch.no_grad()
    def prepare_batch(self, groups: Sequence[Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """Latents, text embeddings, condition dropout, sigmas and noise for a list of groups."""
        g = generator if generator is not None else self.generator
        t, pipe, device = self.config.train, self.pipe, self.device
        targets, prompts, reference_index, subjects = [], [], [], []
        for i, group in enumerate(groups):
            for image, prompt in zip(group.targets, group.prompts, strict=True):
                targets.append(image)
                prompts.append(prompt)
                reference_index.append(i)
                subjects.append(group.subject)
        n = len(targets)
        u = torch.rand(n, generator=g)
        both = u < t.both_dropout
        prompt_only = (u >= t.both_dropout) & (u < t.both_dropout + t.prompt_dropout)
        reference_only = (u >= t.both_dropout + t.prompt_dropout) & (
            u < t.both_dropout + t.prompt_dropout + t.reference_dropout)
        drop_prompt = both | prompt_only
        drop_reference = both | reference_only
        texts = ["" if drop else p for p, drop in zip(prompts, drop_prompt.tolist(), strict=True)]

        batch: dict[str, Any] = {}
        batch["target_latents"] = pipe.prepare_reference_latents(targets, self.resolution, self.resolution).float()
        embeds, pooled = self._encode_texts(texts)
        batch["prompt_embeds"], batch["pooled_embeds"] = embeds, pooled
        if self.use_reference:
            batch["reference_latents"] = pipe.prepare_reference_latents(
                [gr.reference for gr in groups], self.resolution, self.resolution).to(pipe.transformer.dtype)
            tokens = [self._subject_tokens(gr.subject) for gr in groups]
            length = max(e.shape[1] for e, _ in tokens)
            width = tokens[0][0].shape[2]
            subject_embeds = embeds.new_zeros(len(groups), length, width)
            mask = torch.zeros(len(groups), length, device=device)
            for i, (e, _) in enumerate(tokens):
                subject_embeds[i, : e.shape[1]] = e[0]
                mask[i, : e.shape[1]] = 1
            batch["subject_embeds"] = subject_embeds
            batch["subject_pooled"] = torch.cat([p for _, p in tokens]).to(embeds.dtype)
            batch["subject_mask"] = None if bool(mask.all()) else mask
            batch["reference_index"] = torch.tensor(reference_index, device=device)
            batch["subject_weights"] = self._subject_weights(texts, subjects, embeds.shape[1])
            batch["log_scale"] = torch.where(drop_reference, -math.inf, 0.0).to(device)
        # u is the noise level's position (SD3 paper: t = sigmoid(logit-normal)); the table runs from
        # sigma = 1 down, so u -> 1 is pure noise and a positive logit_mean means more high-noise samples.
        u = _density(t, n, g)
        index = ((1.0 - u) * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        batch["sigmas"] = self.sigma_table[index].to(device)
        batch["noise"] = torch.randn(batch["target_latents"].shape, generator=g).to(device)
        if t.foreground_loss_weight != 1.0:
            batch["loss_weights"] = foreground_weights(targets, self.resolution, batch["target_latents"].shape[-2:],
                                                       t.foreground_loss_weight).to(device)
        batch["origins"] = [gr.origin for gr in groups]
        batch["prompts"] = texts
        return batch

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per key, kept in an LRU of ``data.prompt_cache_size`` entries (0: never kept)."""
        size = self.config.data.prompt_cache_size
        if size <= 0:
            return make()
        if key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        value = self._prompt_cache[key] = make()
        while len(self._prompt_cache) > size:
            self._prompt_cache.popitem(last=False)
        return value

    @torch.no_grad()
    def _encode_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(N, L, D) prompt embeddings and (N, P) pooled ones of the frozen text encoders, cached per prompt."""
        def encode(batch: Sequence[str]) -> tuple[Tensor, Tensor]:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(batch), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                device=self.device, max_sequence_length=self.config.data.max_sequence_length)
            return embeds, pooled

        if self.config.data.prompt_cache_size <= 0:
            return encode(texts)
        missing = [t for t in dict.fromkeys(texts) if ("text", t) not in self._prompt_cache]
        if missing:  # new prompts are encoded together, then kept one by one
            embeds, pooled = encode(missing)
            for i, text in enumerate(missing):
                self._cached(("text", text), lambda i=i: (embeds[i], pooled[i]))
        rows = []
        for text in texts:
            row = self._prompt_cache.get(("text", text))
            if row is None:  # evicted within this batch: the cache is smaller than a batch's prompts
                return encode(texts)
            self._prompt_cache.move_to_end(("text", text))
            rows.append(row)
        return torch.stack([e for e, _ in rows]), torch.stack([p for _, p in rows])

    def _subject_weights(self, texts: Sequence[str], subjects: Sequence[str], length: int) -> Tensor:
        """Where each target's subject sits in its prompt; the pipeline's per-prompt warning becomes one note."""
        pipe_logger = logging.getLogger("customshift.pipeline")
        level = pipe_logger.level
        pipe_logger.setLevel(logging.ERROR)
        try:
            rows = [self._cached(("subject", text, subject, length),
                                 lambda text=text, subject=subject: self.pipe.subject_token_weights(
                                     [text], subject, length))
                    for text, subject in zip(texts, subjects, strict=True)]
        finally:
            pipe_logger.setLevel(level)
        weights = torch.cat(rows)
        if not self._warned_no_subject:
            missing = [t for t, w in zip(texts, weights, strict=True) if t.strip() and w.sum() == 0]
            if missing:
                self._warned_no_subject = True
                logger.info("some prompts do not contain their subject's name (e.g. %r): CADS uses an unconditional "
                            "shift for them (m_i = 1)", missing[0][:80])
        return weights.to(self.device)

    # ------------------------------------------------------------------------------------------------
    # Steps

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
            "train.learning_rate, enable train.max_grad_norm, or check this data"
        )

    def train_step(self, micro_batches: Sequence[Sequence[Any]] | None = None) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches (from the loader by default)."""
        t, acc = self.config.train, self.accelerator
        losses, sigmas = [], []
        grad_norm = float("nan")
        for micro in range(t.gradient_accumulation_steps):
            groups = micro_batches[micro] if micro_batches is not None else self.loader.next_batch()
            batch = self.prepare_batch(groups)
            with acc.accumulate(self.model):
                loss, _ = self.model(batch)
                if self.config.debug.inject_nan_at_step == self.step + 1:
                    loss = loss * float("nan")
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
            decay = min(self.config.train.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for name, p in self.trainable.items():
                    self.ema[name].lerp_(p.detach().float(), 1.0 - decay)
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
    # The loop

    def train(self) -> Path:
        """Train to ``train.max_steps`` or ``train.max_minutes`` (or until a signal); returns the last checkpoint."""
        from tqdm.auto import tqdm

        cfg = self.config
        self._stop.install()
        anomaly = torch.autograd.detect_anomaly() if cfg.debug.detect_anomaly else contextlib.nullcontext()
        progress = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                        desc="train")
        window: list[float] = []
        started, window_start, window_steps = time.time(), time.time(), 0
        targets_per_step = (cfg.data.batch_size * cfg.data.targets_per_reference * self.world_size
                            * cfg.train.gradient_accumulation_steps)
        stopped = False
        try:
            with anomaly:
                while self.step < cfg.train.max_steps:
                    stats = self.train_step()
                    window.append(stats["loss"])
                    window_steps += 1
                    progress.update(1)
                    progress.set_postfix(loss=f"{np.mean(window[-20:]):.4f}", lr=f"{stats['lr']:.2e}")
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                        elapsed = max(time.time() - window_start, 1e-9)
                        self._log_train(stats, float(np.mean(window)), window_steps / elapsed,
                                        window_steps * targets_per_step / elapsed, time.time() - started)
                        window, window_start, window_steps = [], time.time(), 0
                    stop = self._reduce_flag(self._stop.requested is not None)
                    if not stop and cfg.train.max_minutes and self._reduce_flag(
                            time.time() - started >= 60 * cfg.train.max_minutes):
                        logger.info("train.max_minutes=%g reached at step %d", cfg.train.max_minutes, self.step)
                        break  # like max_steps: the final checkpoint and export follow
                    every = cfg.checkpoint.every_steps
                    if (every and self.step % every == 0) or stop:
                        self.save_checkpoint("signal" if stop else "periodic")
                    v_every = cfg.validation.every_steps
                    if v_every and self.step % v_every == 0 and not stop:
                        self.validate()
                        stop = self._reduce_flag(self._stop.requested is not None)  # a signal during it
                        if stop and self._last_saved_step != self.step:
                            self.save_checkpoint("signal")
                    if stop:
                        stopped = True
                        logger.info("stopped at step %d on %s; checkpoint %s", self.step,
                                    self._stop.requested or "a signal on another process", self.last_checkpoint)
                        break
            if not stopped:
                if self._last_saved_step != self.step:
                    self.save_checkpoint("final")
                if cfg.validation.every_steps and self.step % cfg.validation.every_steps:
                    self.validate()
                self.export_final()
        finally:
            progress.close()
            self._stop.restore()
            self.close()
        assert self.last_checkpoint is not None
        return self.last_checkpoint

    def close(self) -> None:
        """Stop the data threads and detach this run's log file and TensorBoard writer."""
        self.loader.close()
        if self._tb:
            self._tb.close()
        self._tb = None
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            logging.getLogger("customshift").removeHandler(handler)
            handler.close()
            self._log_handler = None

    # ------------------------------------------------------------------------------------------------
    # Logs

    def _log_train(self, stats: dict[str, float], loss: float, steps_per_s: float, samples_per_s: float,
                   elapsed: float) -> None:
        if self.world_size > 1:
            value = torch.tensor([loss], device=self.device)
            loss = float(self.accelerator.reduce(value, reduction="mean").item())
        skipped = sum(self.loader.skipped.values()) + sum(getattr(self.source, "skipped", {}).values())
        if not self.is_main:
            return
        row = {"step": self.step, "loss": round(loss, 6), "lr": stats["lr"], "grad_norm": round(stats["grad_norm"], 6),
               "sigma_mean": round(stats["sigma"], 4), "steps_per_s": round(steps_per_s, 4),
               "samples_per_s": round(samples_per_s, 3), "skipped": skipped, "elapsed_s": round(elapsed, 1)}
        self._append_csv(self.output_dir / "train_log.csv", row)
        logger.info("step %d loss %.5f lr %.2e %.2f steps/s", self.step, loss, stats["lr"], steps_per_s)
        self._tensorboard({f"train/{k}": v for k, v in row.items() if k not in ("step",)})

    def _append_csv(self, path: Path, row: dict[str, Any]) -> None:
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()

    def _tensorboard(self, values: dict[str, float]) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
                return
            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        if self._tb:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, self.step)

    def _truncate_logs(self) -> None:
        """On resume, drop log rows written after the checkpoint by the interrupted run."""
        for name in ("train_log.csv", "validation.csv"):
            path = self.output_dir / name
            if not path.exists():
                continue
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
            if not rows:
                continue
            kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= self.step]
            if len(kept) != len(rows):
                buffer = io.StringIO()
                csv.writer(buffer, lineterminator="\n").writerows(kept)
                atomic_write_text(path, buffer.getvalue())

    def _clean_stale(self) -> None:
        """Remove temporary folders left by a process killed while writing a checkpoint."""
        for path in self.output_dir.glob(".tmp-ckpt-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.output_dir.glob(".trash-*"):
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------
    # Checkpoints

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily put the EMA weights in place (validation, exports)."""
        if self.ema is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self.trainable.items()}
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(self.ema[n])
        if self.use_reference:
            self.pipe.customshift_weights_changed()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(saved[n])
            if self.use_reference:
                self.pipe.customshift_weights_changed()

    def _rng_state(self) -> dict[str, Tensor]:
        state = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                state[f"cuda{i}"] = s
        return state

    def save_checkpoint(self, reason: str = "periodic") -> Path:
        """Write ``ckpt-{step:07d}`` atomically (temp folder, fsync, rename), then point ``latest`` at it."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        if self.world_size > 1 and not self._sharded:
            # Replicas must hold the same weights; a silent desync would make the checkpoint rank 0's alone.
            sums = gather_object([sum(float(p.detach().double().abs().sum()) for p in self.trainable.values())])
            if max(sums) - min(sums) > 1e-6 * max(1.0, abs(max(sums))):
                raise CheckpointError(f"processes disagree on the trained weights (checksums {sums}); "
                                      "the distributed setup is broken")
        data_states = gather_object([self.loader.state()])
        rng_states = gather_object([{k: v.cpu() for k, v in self._rng_state().items()}])
        step = self.step
        final = self.output_dir / f"ckpt-{step:07d}"
        temp = self.output_dir / f".tmp-ckpt-{step:07d}"
        if self.is_main:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self._sharded:  # FSDP / DeepSpeed: their own collective state formats, inside our atomic folder
            acc.save_state(str(temp / "accelerate"))
            full = acc.get_state_dict(self.model)
            trainable = {n: full[n].detach().float().cpu().contiguous() for n in self.trainable if n in full}
        else:
            trainable = {n: p.detach().float().cpu().contiguous() for n, p in self.trainable.items()}
        if self.is_main:
            atomic_save_safetensors(trainable, temp / "trainable.safetensors",
                                    metadata={"format": CHECKPOINT_FORMAT, "step": str(step)})
            if not self._sharded:
                with atomic_path(temp / "optimizer.pt") as path:
                    torch.save(self.optimizer.state_dict(), path)
            with atomic_path(temp / "scheduler.pt") as path:
                torch.save(self.lr_scheduler.state_dict(), path)
            sleep = float(os.environ.get(SLEEP_ENV) or self.config.debug.checkpoint_sleep or 0)
            if sleep > 0:  # test hook: a window where a kill lands mid-checkpoint
                time.sleep(sleep)
            if self.ema is not None:
                atomic_save_safetensors({n: v.cpu().contiguous() for n, v in self.ema.items()},
                                        temp / "ema.safetensors")
            rng = {f"rank{r}.{k}": v for r, states in enumerate(rng_states) for k, v in states.items()}
            atomic_save_safetensors(rng, temp / "rng.safetensors")
            source_skipped = dict(getattr(self.source, "skipped", {}))
            atomic_write_json(temp / "state.json", {
                "step": step, "world_size": self.world_size, "data": data_states, "source_skipped": source_skipped,
                "reason": reason, "time": time.time(), "seed": self.config.seed,
            })
            atomic_write_text(temp / "config.yaml", config_to_yaml(self.config))
            self._write_exports(temp)
            files = {str(p.relative_to(temp)): p.stat().st_size for p in sorted(temp.rglob("*")) if p.is_file()}
            for directory in sorted({p.parent for p in temp.rglob("*")} | {temp}, key=lambda p: -len(p.parts)):
                fsync_dir(directory)
            atomic_write_json(temp / CHECKPOINT_INDEX, {"format": CHECKPOINT_FORMAT, "step": step, "files": files})
            fsync_dir(temp)
            if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
                trash = self.output_dir / f".trash-{final.name}-{os.getpid()}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(temp, final)
            fsync_dir(self.output_dir)
            atomic_write_text(self.output_dir / LATEST, final.name + "\n")
            self._prune()
            logger.info("checkpoint %s (%s)", final, reason)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        self._last_saved_step = step
        return final

    def _write_exports(self, folder: Path) -> None:
        """What users load: CustomShift weights (``customshift/``) and the generation LoRA (diffusers format)."""
        with self.ema_weights():
            if self.use_reference:
                if self.config.train.trainable == "full":
                    self.pipe.customshift_weights_changed(base=True)  # the base itself was trained
                self.pipe.save_customshift(folder / "customshift", extra={"step": self.step})
            if self.cs.generation_lora_rank > 0:
                from peft.utils import get_peft_model_state_dict

                state = get_peft_model_state_dict(self.pipe.transformer, adapter_name=GENERATION_ADAPTER)
                state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
                type(self.pipe).save_lora_weights(str(folder / "generation_lora"), transformer_lora_layers=state)

    def _prune(self) -> None:
        keep = self.config.checkpoint.keep_last
        done = sorted((p for p in self.output_dir.iterdir() if p.is_dir() and _checkpoint_step(p) is not None),
                      key=_checkpoint_step)
        for old in done[:-keep]:
            trash = self.output_dir / f".trash-{old.name}"
            try:
                os.replace(old, trash)  # renamed first: a half-deleted folder never looks like a checkpoint
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)

    def export_final(self) -> Path | None:
        """``final/``: the exports of the last step, plus the whole pipeline when the base was trained."""
        acc = self.accelerator
        if not self.is_main:
            acc.wait_for_everyone()
            return None
        final = self.output_dir / "final"
        temp = self.output_dir / ".tmp-ckpt-final"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        self._write_exports(temp)
        if self.config.train.trainable == "full":
            with self.ema_weights():
                self.pipe.save_pretrained(str(temp / "pipeline"))
        atomic_write_text(temp / "config.yaml", config_to_yaml(self.config))
        atomic_write_json(temp / "info.json", {"step": self.step, "checkpoint": str(self.last_checkpoint)})
        if final.exists():
            trash = self.output_dir / ".trash-final"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(temp, final)
        fsync_dir(self.output_dir)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore everything a checkpoint holds; the data position continues exactly when the world size matches."""
        from safetensors.torch import load_file

        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        saved_config = read_config_file(path / "config.yaml")
        for section in ("model", "mode"):
            if saved_config.get(section) != self.config.to_dict().get(section):
                logger.warning("resuming %s with a different %r section than the checkpoint's", path, section)
        weights = load_file(str(path / "trainable.safetensors"))
        missing = sorted(set(self.trainable) - set(weights))
        unexpected = sorted(set(weights) - set(self.trainable))
        if missing or unexpected:
            raise CheckpointError(f"{path}: its weights do not match this run's trained parameters "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]}); same config?")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        if self._sharded:
            self.accelerator.load_state(str(path / "accelerate"))
        else:
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        if self.ema is not None:
            if (path / "ema.safetensors").exists():
                self.ema = {k: v.to(self.device) for k, v in load_file(str(path / "ema.safetensors")).items()}
            else:
                logger.warning("%s has no EMA weights: the EMA restarts from the current weights", path)
        self.step = int(state["step"])
        rng = load_file(str(path / "rng.safetensors"))
        data = state["data"]
        if state.get("world_size") == self.world_size:
            self.generator.set_state(rng[f"rank{self.rank}.generator"])
            torch.set_rng_state(rng[f"rank{self.rank}.torch_cpu"])
            mine = data[self.rank]
            self.loader.cursor = int(mine["cursor"])
        else:
            logger.warning("resuming with %d processes from a checkpoint made with %s: data order and noise "
                           "continue approximately, not exactly", self.world_size, state.get("world_size"))
            self.generator.manual_seed(self.config.seed * 1000 + 7919 * self.rank + self.step)
            consumed = sum(int(d["cursor"]) for d in data)
            self.loader.cursor = consumed // self.world_size
            mine = {"skipped": {}, "attempted": 0}
        self.loader.skipped.clear()
        self.loader.skipped.update(mine.get("skipped", {}))
        self.loader.attempted = int(mine.get("attempted", 0))
        if self.use_reference:
            self.pipe.customshift_weights_changed()
        self.last_checkpoint = path
        self._last_saved_step = self.step
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------------
    # Validation

    def validation_groups(self) -> list[Any]:
        """Fixed validation groups: held-out synthetic pairs, or the first usable items of the data."""
        if self._validation_groups is None:
            v = self.config.validation
            if self.config.data.kind == "synthetic":
                from ..synthetic import evaluation_split

                pairs = evaluation_split(max(v.num_pairs, 2), track=v.track, seed=v.seed)[: v.num_pairs]
                self._validation_groups = [group_from_pairs([p], f"evaluation pair {i}") for i, p in enumerate(pairs)]
            else:
                groups, index = [], 0
                length = self.source.length
                while len(groups) < v.num_pairs and index < length:
                    with contextlib.suppress(Exception):
                        groups.append(self.source.get(index))
                    index += 1
                self._validation_groups = groups
        return self._validation_groups

    def validate(self) -> dict[str, Any] | None:
        """A grid (reference | target | generated [| wrong reference]) and, on synthetic data, exact metrics.

        Runs on the main process only; a failure is logged, never fatal to the run.
        """
        metrics = None
        if self.is_main:
            try:
                metrics = self._validate()
            except Exception:  # noqa: BLE001 - a broken sample grid must not end hours of training
                logger.exception("validation at step %d failed; training continues", self.step)
        self.accelerator.wait_for_everyone()
        return metrics

    @torch.no_grad()
    def _validate(self) -> dict[str, Any] | None:
        acc = self.accelerator
        from PIL import Image

        from ..synthetic import make_grid, score, wrong_references

        v, pipe = self.config.validation, self.pipe
        groups = self.validation_groups()
        if not groups:
            return None
        synthetic = groups[0].pairs is not None
        wrong = (self.use_reference and synthetic and v.wrong_reference and len(groups) >= 2)
        wrong_refs = wrong_references([g.pairs[0] for g in groups]) if wrong else None
        rows, generated, generated_wrong = [], [], []
        was_training = pipe.transformer.training
        pipe.transformer.eval()
        try:
            with self.ema_weights(), acc.autocast():
                for k, group in enumerate(groups):
                    target = np.asarray(group.targets[0])
                    image = self._generate(group.reference if self.use_reference else None, group.subject,
                                           group.prompts[0], v.seed + k, target.shape[:2])
                    generated.append(image)
                    row = [np.asarray(group.reference), target, image] if self.use_reference else [target, image]
                    if wrong_refs is not None:
                        other = self._generate(Image.fromarray(wrong_refs[k]), group.subject, group.prompts[0],
                                               v.seed + k, target.shape[:2])
                        generated_wrong.append(other)
                        row.append(other)
                    rows.append(row)
        finally:
            pipe.transformer.train(was_training)
        labels = ["reference", "target", "generated"] if self.use_reference else ["target", "generated"]
        if wrong_refs is not None:
            labels.append("wrong ref")
        grid = make_grid(rows, labels=labels, scale=max(1, 128 // max(rows[0][0].shape[:2])))
        atomic_save_image(grid, self.output_dir / "validation" / f"step-{self.step:07d}.png")
        metrics: dict[str, Any] = {"step": self.step}
        if synthetic:
            pairs = [g.pairs[0] for g in groups]
            result = score(generated, pairs)
            metrics.update({k: round(result[k], 4) for k in ("identity", "prompt_accuracy", "psnr")})
            if generated_wrong:
                metrics["identity_wrong_reference"] = round(score(generated_wrong, pairs)["identity"], 4)
            self._append_csv(self.output_dir / "validation.csv", metrics)
            self._tensorboard({f"validation/{k}": val for k, val in metrics.items() if k != "step"})
            logger.info("validation at step %d: %s", self.step, metrics)
        return metrics

    def _generate(self, reference: Any, subject_name: str, prompt: str, seed: int,
                  size: tuple[int, int]) -> np.ndarray:
        from PIL import Image

        v, pipe = self.config.validation, self.pipe
        subject = None
        if reference is not None:
            subject = pipe.encode_subject(reference, subject_name, height=self.resolution, width=self.resolution)
        result = pipe(
            prompt, subject=subject, shift_scale=v.shift_scale, guidance_scale=v.guidance_scale,
            reference_guidance_scale=v.reference_guidance_scale if subject is not None else 0.0,
            num_inference_steps=v.num_inference_steps, height=self.resolution, width=self.resolution,
            generator=torch.Generator().manual_seed(seed), max_sequence_length=self.config.data.max_sequence_length,
        ).images[0]
        height, width = size
        if result.size != (width, height):  # compare at the data's size (the sprite metrics expect 64 x 64)
            upscale = width >= result.size[0]
            result = result.resize((width, height), Image.Resampling.NEAREST if upscale else Image.Resampling.BOX)
        return np.asarray(result.convert("RGB"))


def _move(module: nn.Module | None, device: torch.device, dtype: torch.dtype) -> None:
    """Move/cast only when needed (diffusers warns on every dtype cast, even a no-op one)."""
    if module is None:
        return
    first = next(module.parameters(), None)
    if first is not None and first.dtype != dtype:
        module.to(device, dtype=dtype)
    else:
        module.to(device)


def foreground_weights(images: Sequence[Any], resolution: int, size: tuple[int, int], weight: float) -> Tensor:
    """(N, 1, h, w) loss weights: ``weight`` where a latent pixel covers a pixel far from the image's border colour.

    Images are resized and cropped to ``resolution`` as the trainer's latents are, so the mask lines up.
    """
    from ..images import prepare_reference
    from ..synthetic import FAR_THRESHOLD

    arr = np.stack([np.asarray(prepare_reference(image, resolution, resolution).convert("RGB"), dtype=np.int16)
                    for image in images])  # (N, H, W, 3), all images at once
    border = np.concatenate([arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]], axis=1)  # (N, 4 sides, 3)
    far = np.abs(arr - np.median(border, axis=1)[:, None, None]).max(axis=3) > FAR_THRESHOLD
    mask = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(far).float()[:, None], tuple(size))
    return 1.0 + (float(weight) - 1.0) * mask


def _density(t: Any, n: int, generator: torch.Generator) -> Tensor:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(
        weighting_scheme=t.weighting_scheme, batch_size=n, logit_mean=t.logit_mean, logit_std=t.logit_std,
        mode_scale=t.mode_scale, generator=generator,
    )


# ----------------------------------------------------------------------------------------------------
# Loading a checkpoint for evaluation


def load_pipeline_from_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                                  ema: bool = True) -> Any:
    """A pipeline with a checkpoint's trained weights (any mode), rebuilt from its saved config.

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
    weights = load_file(str(found / "trainable.safetensors"))
    if ema and (found / "ema.safetensors").exists():
        weights = load_file(str(found / "ema.safetensors"))
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

        data = apply_overrides(read_config_file(found / "config.yaml"), overrides)
        config = TrainingConfig.from_dict(data)
    else:
        config = load_config(config_path, overrides)
    trainer = Trainer(config, resume=resume)
    return trainer.train()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m customshift.training.trainer CONFIG [--set k=v ...] [--resume [PATH]]``.

    The same command works under ``accelerate launch``.
    """
    parser = argparse.ArgumentParser(prog="customshift.training.trainer", description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", help="YAML or TOML config file")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.max_steps=10 data.kind=synthetic")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="continue from output_dir's latest checkpoint, or from the given run/checkpoint folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.config is None and args.resume in (False, True):
        parser.error("give a config file, or --resume RUN_FOLDER")
    try:
        path = train_main(args.config, args.overrides, args.resume)
    except CustomShiftError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
