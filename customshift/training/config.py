"""The trainer's configuration: one YAML/TOML file, ``section.key=value`` overrides, validated once.

Every knob of a run lives here so that the resolved config saved beside each checkpoint is enough to
rebuild the run exactly (``--resume``) or to rebuild its model for evaluation. Unknown keys are
errors, never silently ignored: a typo in a long run's config must not cost the run.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ..config import CustomShiftConfig
from ..errors import CustomShiftError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "ModelConfig",
    "TrainConfig",
    "TrainingConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_config",
]


class ConfigError(CustomShiftError, ValueError):
    """A training config file or override is malformed; the message names the key."""


@dataclass
class ModelConfig:
    """Which base model, and which CustomShift adapter to build on it.

    ``pretrained``: ``tiny`` / ``tiny:sd3`` / ``tiny:sd35`` (offline random tiny model, ``tiny`` holds
    keyword arguments of `customshift.tiny.build_tiny_components`), ``sprite`` (the project's default
    sprite-domain model, `customshift.tiny.build_sprite_pipeline`, with the stage-1 VAE folder ``vae``
    and ``tiny`` as shape overrides), a local diffusers folder, or a hub id. ``customshift``: fields
    of `CustomShiftConfig` (``lora_rank``, ``generation_lora_rank``, ``beta_init``, ...).
    ``customshift_weights``: start the adapter from saved CustomShift weights (a folder written by
    ``save_customshift``, e.g. a run's ``final/customshift``) instead of a fresh one; their own config
    is used, so ``customshift`` must be empty or say the same.
    ``weight_dtype``: dtype of the frozen weights (``auto``: the mixed-precision dtype for frozen
    weights, fp32 for trained ones).
    """

    pretrained: str = "tiny"
    tiny: dict[str, Any] = field(default_factory=dict)
    vae: str | None = None
    revision: str | None = None
    variant: str | None = None
    customshift: dict[str, Any] = field(default_factory=dict)
    customshift_weights: str | None = None
    gradient_checkpointing: bool = False
    weight_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass
class DataConfig:
    """Where training pairs come from.

    ``kind``: ``synthetic`` (endless sprite pairs), ``manifest`` (JSONL of local files) or
    ``subjects200k`` (parquet: a file, a folder of them, or a glob). ``batch_size`` counts
    references per process and micro-step; each reference has ``targets_per_reference`` targets
    (synthetic; the others have one target per reference). ``curriculum`` (synthetic): a list of
    ``{until_step: N, layout: ..., track: ...}`` stages, the first whose ``until_step`` is above the
    current step wins, after the last one ``layout``/``track`` apply. ``prompt_cache_size``: how many
    prompts' text embeddings (from the frozen text encoders) and subject-token weights to keep between
    steps, least recently used out first; 0 = encode every step. Worth it where prompts repeat (the
    synthetic domain has a few hundred): tokenising and encoding them was most of a GPU step's time.
    """

    kind: Literal["synthetic", "manifest", "subjects200k"] = "synthetic"
    path: str | None = None
    resolution: int | None = None
    batch_size: int = 4
    targets_per_reference: int = 1
    num_workers: int = 2
    shuffle: bool = True
    max_sequence_length: int = 77
    max_skip_fraction: float = 0.5
    prompt_cache_size: int = 0
    # synthetic
    track: str | dict[str, float] = "clean"
    layout: str | dict[str, float] = "random"
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    placement: str | dict[str, float] = "grid"  # synthetic.md v2: "grid" | "free" or {name: weight}
    distractor_offsets: str = "grid"  # "grid" (version 1's generator) | "any" (the spec: any pixel offset)
    # subjects200k
    padding: int = 8
    min_quality: int = 0
    collections: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The objective and the optimiser.

    ``trainable``: ``adapter`` (branch LoRA + shift parameters [+ generation LoRA]) or ``full`` (the
    whole transformer too). Sigma sampling follows diffusers' SD3 example: ``weighting_scheme``
    ``logit_normal`` with ``logit_mean``/``logit_std`` (findings.md: a positive mean puts the signal at
    high noise, where identity is decided), on the scheduler's shifted sigma table
    (``scheduler_shift`` overrides the model's shift). Condition dropout is per target:
    ``prompt_dropout`` (prompt only), ``reference_dropout`` (reference only), ``both_dropout``.
    ``foreground_loss_weight`` weighs the loss on latent pixels whose image pixels differ from the
    target's border colour (the subject, on uniform-background data such as the synthetic domain;
    findings.md: the sprite is a small share of the loss); 1 = the plain loss.
    ``max_minutes`` ends the run like ``max_steps`` does (checkpoint and ``final/`` export) once this
    invocation has trained that long, for time-boxed machines; 0 = no limit. ``--resume`` goes on.
    """

    trainable: Literal["adapter", "full"] = "adapter"
    max_steps: int = 1000
    learning_rate: float = 1e-4
    shift_learning_rate: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float = 0.0
    weighting_scheme: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    scheduler_shift: float | None = None
    prompt_dropout: float = 0.10
    reference_dropout: float = 0.10
    both_dropout: float = 0.05
    foreground_loss_weight: float = 1.0
    max_minutes: float = 0.0
    log_every: int = 10


@dataclass
class CheckpointConfig:
    """``every_steps``: checkpoint period (0: only at the end / on a signal); ``keep_last``: how many to keep."""

    every_steps: int = 500
    keep_last: int = 3


@dataclass
class ValidationConfig:
    """Periodic sample grids (reference | target | generated) and, on the synthetic domain, exact metrics.

    ``wrong_reference`` adds a wrong-reference control column (findings.md: identity equal with the
    right and a wrong reference means the reference is ignored).
    """

    every_steps: int = 0
    num_pairs: int = 4
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    reference_guidance_scale: float = 0.0
    shift_scale: float = 1.0
    seed: int = 0
    track: str = "clean"
    wrong_reference: bool = True


@dataclass
class DebugConfig:
    """Test hooks; leave at their defaults for real runs.

    ``inject_nan_at_step``: make the loss NaN at that step (tests the divergence stop).
    ``checkpoint_sleep``: seconds to sleep inside a checkpoint write, before it is published (tests
    that a kill at that moment leaves the previous checkpoint loadable). The environment variable
    ``CUSTOMSHIFT_TEST_CHECKPOINT_SLEEP`` does the same.
    """

    inject_nan_at_step: int | None = None
    checkpoint_sleep: float = 0.0
    detect_anomaly: bool = False


@dataclass
class TrainingConfig:
    """A whole training run. ``mode``: ``customshift`` (with references) or ``base`` (text-only pretraining)."""

    output_dir: str = "runs/customshift"
    seed: int = 0
    mode: Literal["customshift", "base"] = "customshift"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    # ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        config = _build(cls, data, "")
        config.validate()
        return config

    def customshift_config(self) -> CustomShiftConfig:
        """The adapter's `CustomShiftConfig` (base mode: no reference LoRA)."""
        fields = dict(self.model.customshift)
        fields.setdefault("max_sequence_length", self.data.max_sequence_length)  # sampling then matches training
        if self.mode == "base":
            fields["lora_rank"] = 0
        return CustomShiftConfig.from_dict(fields)

    def validate(self) -> None:
        """Cross-field checks, so that a bad combination fails before the model is loaded."""
        d, t = self.data, self.train
        try:
            cs = self.customshift_config()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.customshift: {error}") from None
        positive = {
            "data.batch_size": d.batch_size,
            "data.targets_per_reference": d.targets_per_reference,
            "data.max_sequence_length": d.max_sequence_length,
            "train.max_steps": t.max_steps,
            "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
            "train.log_every": t.log_every,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "validation.num_pairs": self.validation.num_pairs,
            "validation.num_inference_steps": self.validation.num_inference_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in {"data.num_workers": d.num_workers, "data.prompt_cache_size": d.prompt_cache_size,
                           "checkpoint.every_steps": self.checkpoint.every_steps,
                           "validation.every_steps": self.validation.every_steps,
                           "train.lr_warmup_steps": t.lr_warmup_steps, "data.padding": d.padding}.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if not (t.max_minutes >= 0 and math.isfinite(t.max_minutes)):
            raise ConfigError(f"train.max_minutes must be >= 0 (0 = no time limit), got {t.max_minutes}")
        if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):
            raise ConfigError(f"train.learning_rate must be a positive number, got {t.learning_rate}")
        drops = (t.prompt_dropout, t.reference_dropout, t.both_dropout)
        if any(p < 0 for p in drops) or sum(drops) > 1:
            raise ConfigError("train.*_dropout must be >= 0 and sum to at most 1")
        if not 0 <= t.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
        if not 0 < d.max_skip_fraction <= 1:
            raise ConfigError(f"data.max_skip_fraction must be in (0, 1], got {d.max_skip_fraction}")
        if d.kind in ("manifest", "subjects200k") and not d.path:
            raise ConfigError(f"data.path is required for data.kind={d.kind!r}")
        if d.kind != "synthetic" and d.targets_per_reference != 1:
            raise ConfigError("data.targets_per_reference applies to data.kind=synthetic only; set it to 1")
        for i, stage in enumerate(d.curriculum):
            if not isinstance(stage, dict) or "until_step" not in stage:
                raise ConfigError(f"data.curriculum[{i}] must be a mapping with until_step (and layout/track)")
            unknown = set(stage) - {"until_step", "layout", "track"}
            if unknown:
                raise ConfigError(f"data.curriculum[{i}]: unknown keys {sorted(unknown)}; "
                                  "use until_step, layout, track")
        if self.model.vae is not None and self.model.pretrained != "sprite":
            raise ConfigError("model.vae applies to model.pretrained=sprite only")
        if self.mode == "base" and t.trainable == "adapter" and cs.generation_lora_rank == 0:
            raise ConfigError(
                "mode=base trains no reference branch: use train.trainable=full, or set "
                "model.customshift.generation_lora_rank > 0 to train a generation LoRA"
            )
        if t.trainable == "full" and cs.generation_lora_rank > 0:
            raise ConfigError("train.trainable=full already trains the generation transformer; "
                              "set model.customshift.generation_lora_rank to 0")
        if self.mode == "customshift" and t.trainable == "adapter" and cs.lora_rank == 0 and not cs.learn_shift \
                and cs.generation_lora_rank == 0:
            raise ConfigError("nothing to train: lora_rank, generation_lora_rank are 0 and learn_shift is false")


# ----------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks and key paths in the errors


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _describe(hint: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in get_args(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple type hint; ints are accepted for floats."""
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans
            spelled = [a for a in args if isinstance(a, str) and a.lower() in
                       (("no", "off", "false") if not value else ("yes", "on", "true"))]
            value = spelled[0] if spelled else value
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is Union or origin is types.UnionType:
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {_describe(hint)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        if args and args[1] is not Any:
            return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


# ----------------------------------------------------------------------------------------------------
# Files and overrides


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Plain data from a ``.yaml``/``.yml``/``.toml``/``.json`` file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # yaml/toml parse errors carry the line in their message
        detail = " ".join(str(error).split())
        raise ConfigError(f"config file {path} is not valid {suffix.lstrip('.') or 'YAML'}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML: ``10``, ``true``, ``null``, ``[1, 2]``)."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.max_steps=10")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainingConfig:
    """The validated config from a file (or the defaults) plus overrides."""
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return TrainingConfig.from_dict(data)


def config_to_yaml(config: TrainingConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
