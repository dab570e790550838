"""What a run trains: the base pipeline, its adapter(s), which parameters learn, their dtypes, the optimiser."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CustomShiftConfig
from ..plugins import is_registered, load
from .config import ConfigError, TrainingConfig

logger = logging.getLogger("customshift.training.model")

__all__ = ["GENERATION_ADAPTER", "build_optimizer", "build_pipeline", "configure_dtypes", "mark_trainable",
           "setup_model"]

GENERATION_ADAPTER = "generation"


def build_pipeline(config: TrainingConfig) -> Any:
    """The base pipeline of a run (tiny offline model, registered model, local folder or hub id), fp32 on CPU."""
    model = config.model
    name = model.pretrained
    if name == "tiny" or name.startswith("tiny:"):
        from ..tiny import build_tiny_pipeline

        variant = name.split(":", 1)[1] if ":" in name else "sd3"
        return build_tiny_pipeline(variant, **model.tiny)
    if is_registered("models", name):  # e.g. ``sprite``: customshift/sprites/model.py
        if model.vae is not None and not Path(model.vae).expanduser().is_dir():
            raise ConfigError(f"model.vae={model.vae!r} is not a folder; train one with "
                              "customshift train-vae --out FOLDER")
        return load("models", name)(model.vae, **model.tiny)
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
        switched = {k: v for k, v in given.items() if k in CustomShiftConfig.SWITCH_ON_LATER and not saved.get(k)}
        rest = {k: v for k, v in given.items() if k not in switched}
        if rest:
            raise ConfigError(f"model.customshift {rest} differs from the config saved with "
                              f"model.customshift_weights={config.model.customshift_weights}; drop it")
        if switched:  # parts that start as the identity: the stage starts from the same model
            saved_state = pipe.reference_branch.trainable_state_dict()
            branch = pipe.set_customshift_config(pipe.customshift_config.replace(**switched))
            branch.load_trainable_state_dict({**branch.trainable_state_dict(), **saved_state})
            if pipe.customshift_config.generation_lora_rank > 0:
                pipe.add_generation_lora()
        return
    pipe.set_customshift_config(cs)
    if cs.generation_lora_rank > 0:
        pipe.add_generation_lora()


def mark_trainable(pipe: Any, config: TrainingConfig) -> dict[str, nn.Parameter]:
    """Freeze everything, then mark what this run trains; returns stable names (``transformer.``/``branch.``)."""
    t, cs = config.train, pipe.customshift_config
    use_reference = config.mode == "customshift"
    for module in (pipe.transformer, pipe.reference_branch, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                   pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    chosen: list[nn.Parameter] = []
    if t.trainable == "full":
        chosen += list(pipe.transformer.parameters())
    elif cs.generation_lora_rank > 0:
        chosen += [p for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    if use_reference:
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
    trainable = {names[id(p)]: p for p in chosen if id(p) in names}
    count = sum(p.numel() for p in trainable.values())
    logger.info("training %d tensors, %.3fM parameters (%s, mode %s)", len(trainable), count / 1e6, t.trainable,
                config.mode)
    return trainable


def _move(module: nn.Module | None, device: torch.device, dtype: torch.dtype) -> None:
    """Move/cast only when needed (diffusers warns on every dtype cast, even a no-op one)."""
    if module is None:
        return
    first = next(module.parameters(), None)
    if first is not None and first.dtype != dtype:
        module.to(device, dtype=dtype)
    else:
        module.to(device)


def configure_dtypes(pipe: Any, config: TrainingConfig, device: torch.device) -> None:
    """Frozen weights in the mixed-precision dtype (``weight_dtype: auto``); trained ones fp32 (diffusers' cast)."""
    from diffusers.training_utils import cast_training_params

    m, t = config.model, config.train
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if m.weight_dtype == "auto":
        dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.mixed_precision]
    else:
        dtype = names[m.weight_dtype]
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        _move(encoder, device, dtype)
    _move(pipe.vae, device, torch.float32)  # small, and fp16 VAEs overflow
    _move(pipe.transformer, device, torch.float32 if t.trainable == "full" else dtype)
    pipe.reference_branch.to(device)
    cast_training_params([pipe.transformer, pipe.reference_branch], dtype=torch.float32)


def build_optimizer(pipe: Any, trainable: dict[str, nn.Parameter], config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW; the shift parameters (beta, gamma, kappa) get their own learning rate and no weight decay."""
    t = config.train
    shift_ids = {id(p) for p in (pipe.reference_branch.shift.beta, pipe.reference_branch.shift.gamma,
                                 pipe.reference_branch.shift.kappa) if p is not None}
    shift = [p for p in trainable.values() if id(p) in shift_ids]
    rest = [p for p in trainable.values() if id(p) not in shift_ids]
    groups = []
    if rest:
        groups.append({"params": rest, "lr": t.learning_rate, "weight_decay": t.adam_weight_decay})
    if shift:
        groups.append({"params": shift, "lr": t.shift_learning_rate or t.learning_rate, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
