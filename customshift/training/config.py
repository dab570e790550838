"""The trainer's configuration: one typed schema (pydantic), YAML/TOML files that inherit a ``base``, overrides.

Every knob of a run lives here, with its default decided once (the field below), so that the resolved
config saved beside each checkpoint is enough to rebuild the run exactly (``--resume``) or to rebuild its
model for evaluation. Every bad key, type or value is a `ConfigError` whose one-line message names the
key: a typo in a long run's config must not cost the run.

A recipe may start with ``base: other.yaml`` (relative to its own file) and hold only its differences:
mappings are merged key by key, everything else (lists included) is replaced.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from ..config import CustomShiftConfig
from ..errors import CustomShiftError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "TrainingConfig",
    "ValidationConfig",
    "apply_overrides",
    "config_to_yaml",
    "load_config",
    "read_config_file",
]

# diffusers.optimization.SchedulerType's values (listed here so that validating a config imports no diffusers)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
MAX_SEED = 2**32  # the trainer seeds torch generators with seed * 1000 + small offsets: far below 2**64


class ConfigError(CustomShiftError, ValueError):
    """A training config file or override is malformed; the message (one line) names the key."""


# ----------------------------------------------------------------------------------------------------
# Field types: what YAML gives, checked strictly (no bool for an int, no "3" for 3, no NaN)


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; accept it as the number it spells."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _literal_bool(value: Any) -> Any:
    """YAML 1.1 reads ``no``/``off``/``yes``/``on`` as booleans; ``mixed_precision: no`` means ``"no"``."""
    return {False: "no", True: "yes"}.get(value, value) if isinstance(value, bool) else value


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
PosInt = Annotated[int, Strict(), Field(ge=1)]
Fraction = Annotated[float, BeforeValidator(_number), Field(ge=0, le=1, allow_inf_nan=False)]
Weights = dict[Str, Annotated[float, BeforeValidator(_number), Field(ge=0, allow_inf_nan=False)]]


# A domain choice: one name, or ``{name: weight}`` drawn per item; the names are the data source's to check.
Named = Annotated[Str | Weights, AfterValidator(lambda v: _positive_weights(v))]


def _positive_weights(value: str | dict[str, float]) -> str | dict[str, float]:
    if isinstance(value, dict) and (not value or sum(value.values()) <= 0):
        raise ValueError("the weights must not all be 0")
    return value


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


# ----------------------------------------------------------------------------------------------------
# The schema


class ModelConfig(Section):
    """Which base model, and which CustomShift adapter to build on it.

    ``pretrained``: ``tiny`` / ``tiny:sd3`` / ``tiny:sd35`` (offline random tiny model, ``tiny`` holds
    keyword arguments of `customshift.tiny.build_tiny_components`), a registered model (customshift/plugins.py:
    ``sprite`` is the default model's untrained shape, customshift/sprites/model.py, with the stage-1 VAE
    folder ``vae`` and ``tiny`` as shape overrides), a local diffusers folder, or a hub id. ``customshift``: fields
    of `CustomShiftConfig` (``lora_rank``, ``generation_lora_rank``, ``beta_init``, ...), only those that
    differ from its defaults. ``customshift_weights``: start the adapter from saved CustomShift weights (a
    folder written by ``save_customshift``, e.g. a run's ``final/customshift``) instead of a fresh one; their
    own config is used, so ``customshift`` must be empty or say the same.
    ``weight_dtype``: dtype of the frozen weights (``auto``: the mixed-precision dtype for frozen
    weights, fp32 for trained ones).
    """

    pretrained: Str = "tiny"
    tiny: dict[Str, Any] = Field(default_factory=dict)
    vae: Str | None = None
    revision: Str | None = None
    variant: Str | None = None
    customshift: dict[Str, Any] = Field(default_factory=dict)
    customshift_weights: Str | None = None
    gradient_checkpointing: Bool = False
    weight_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @field_validator("customshift")
    @classmethod
    def _customshift_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Each key is a `CustomShiftConfig` field holding a value of its type (checked here, not at build)."""
        from typing import get_type_hints

        from pydantic import TypeAdapter

        hints = get_type_hints(CustomShiftConfig)
        for key, item in value.items():
            if key not in hints:
                raise ValueError(f"{_WHOLE}unknown config key model.customshift.{key}; CustomShiftConfig fields: "
                                 f"{', '.join(sorted(hints))}")
            given = tuple(item) if isinstance(item, list) else item  # YAML has lists, the dataclass tuples
            try:
                TypeAdapter(hints[key], config=ConfigDict(strict=True)).validate_python(given)
            except ValidationError as error:
                problem = error.errors()[0]
                phrase = _PHRASES.get(problem["type"]) or "must be " + problem["msg"].removeprefix("Input should be ")
                raise ValueError(f"{_WHOLE}model.customshift.{key} {phrase}, got {item!r}") from None
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{_WHOLE}model.customshift.{key} must be a finite number, got {item!r}")
        try:
            CustomShiftConfig.from_dict(dict(value))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{_WHOLE}model.customshift: {error}") from None
        return value


class DataConfig(Section):
    """Where training pairs come from.

    ``kind``: ``manifest`` (JSONL of local files), ``subjects200k`` (parquet: a file, a folder of them, or a
    glob), or a plugged-in source (customshift/plugins.py): ``synthetic`` (endless sprite pairs,
    customshift/sprites/data.py) or a user's ``package.module:Class``. ``batch_size`` counts
    references per process and micro-step; each reference has ``targets_per_reference`` targets
    (synthetic; the others have one target per reference). ``curriculum`` (synthetic): a list of
    ``{until_step: N, layout: ..., track: ...}`` stages, the first whose ``until_step`` is above the
    current step wins, after the last one ``layout``/``track`` apply. ``prompt_cache_size``: how many
    prompts' text embeddings (from the frozen text encoders) and subject-token weights to keep between
    steps, least recently used out first; 0 = encode every step. Worth it where prompts repeat (the
    synthetic domain has a few hundred): tokenising and encoding them was most of a GPU step's time.
    ``placement`` / ``distractor_offsets`` (a name or weights): docs/synthetic.md's version-2 generator (``grid``
    is version 1's).
    ``reference_size`` (a size or ``{small: w, large: w}``) forces the reference subject's size and
    ``distractor_touching`` is the share of distractor references whose distractor touches the subject (the
    rest as drawn); unset = the generator's own draws.
    """

    kind: Str = "synthetic"
    path: Str | None = None
    resolution: PosInt | None = None
    batch_size: PosInt = 4
    targets_per_reference: PosInt = 1
    num_workers: NonNegInt = 2
    shuffle: Bool = True
    max_sequence_length: Annotated[int, Strict(), Field(ge=1, le=512)] = 77
    max_skip_fraction: Annotated[float, BeforeValidator(_number), Field(gt=0, le=1, allow_inf_nan=False)] = 0.5
    prompt_cache_size: NonNegInt = 0
    # synthetic (names checked by the source: customshift/sprites/data.py)
    track: Named = "clean"
    layout: Named = "random"
    curriculum: list[Any] = Field(default_factory=list)
    placement: Named = "grid"
    distractor_offsets: Named = "grid"
    reference_size: Named | None = None
    distractor_touching: Fraction | None = None
    # subjects200k
    padding: NonNegInt = 8
    min_quality: NonNegInt = 0
    collections: list[Str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _source_options(self) -> DataConfig:
        """A plugged-in source checks its own options here, so a bad name fails before any model is loaded."""
        from .data import BUILT_IN_KINDS, source_class

        if self.kind not in BUILT_IN_KINDS:
            try:
                check = getattr(source_class(self.kind), "check_config", None)
                if check is not None:
                    check(self)
            except ValueError as error:
                raise ValueError(f"{_WHOLE}{error}") from None
        return self


class TrainConfig(Section):
    """The objective and the optimiser.

    ``trainable``: ``adapter`` (branch LoRA + shift parameters [+ generation LoRA]) or ``full`` (the
    whole transformer too). Sigma sampling follows diffusers' SD3 example: ``weighting_scheme``
    ``logit_normal`` with ``logit_mean``/``logit_std`` (a positive mean puts the signal at high noise, where
    identity is decided: docs/default-model.md), on the scheduler's shifted sigma table
    (``scheduler_shift`` overrides the model's shift). Condition dropout is per target:
    ``prompt_dropout`` (prompt only), ``reference_dropout`` (reference only), ``both_dropout``;
    ``subject_reference_dropout``: of the two-subject targets that keep their references, the share that keeps
    only one of the two (either, evenly), so a prompt naming two subjects with one reference is trained too.
    ``foreground_loss_weight`` weighs the loss on latent pixels whose image pixels differ from the
    target's border colour (the subject, on uniform-background data such as the synthetic domain,
    where the sprite is a small share of the loss); 1 = the plain loss.
    ``routing_loss_weight`` adds the routing loss of two-subject targets whose data gives each subject's mask
    (customshift/training/objective.py ``routing_loss``: each subject's region routes to its own reference);
    0 = off.
    ``max_minutes`` ends the run like ``max_steps`` does (checkpoint and ``final/`` export) once this
    invocation has trained that long, for time-boxed machines; 0 = no limit. ``--resume`` goes on.
    ``report_to``: accelerate trackers; ``auto`` = the CSV logs plus TensorBoard and W&B when installed
    (W&B only with ``WANDB_MODE`` or ``WANDB_API_KEY`` set), or a list of ``csv``/``tensorboard``/``wandb``.
    ``detect_anomaly``: torch.autograd.detect_anomaly around the loop (slow; to find where a NaN starts).
    """

    trainable: Literal["adapter", "full"] = "adapter"
    max_steps: PosInt = 1000
    learning_rate: Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)] = 1e-4
    shift_learning_rate: Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)] | None = None
    adam_beta1: Annotated[float, BeforeValidator(_number), Field(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, BeforeValidator(_number), Field(ge=0, lt=1)] = 0.999
    adam_weight_decay: Annotated[float, BeforeValidator(_number), Field(ge=0, allow_inf_nan=False)] = 1e-4
    adam_epsilon: Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)] = 1e-8
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    lr_warmup_steps: NonNegInt = 0
    gradient_accumulation_steps: PosInt = 1
    max_grad_norm: Annotated[float, BeforeValidator(_number), Field(ge=0, allow_inf_nan=False)] = 1.0
    mixed_precision: Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(_literal_bool)] = "no"
    ema_decay: Annotated[float, BeforeValidator(_number), Field(ge=0, lt=1)] = 0.0
    weighting_scheme: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: Float = 0.0
    logit_std: Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)] = 1.0
    mode_scale: Float = 1.29
    scheduler_shift: Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)] | None = None
    prompt_dropout: Fraction = 0.10
    reference_dropout: Fraction = 0.10
    both_dropout: Fraction = 0.05
    subject_reference_dropout: Fraction = 0.0
    foreground_loss_weight: Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)] = 1.0
    routing_loss_weight: Annotated[float, BeforeValidator(_number), Field(ge=0, allow_inf_nan=False)] = 0.0
    max_minutes: Annotated[float, BeforeValidator(_number), Field(ge=0, allow_inf_nan=False)] = 0.0
    log_every: PosInt = 10
    report_to: Literal["auto"] | list[Literal["csv", "tensorboard", "wandb"]] = "auto"
    detect_anomaly: Bool = False


class CheckpointConfig(Section):
    """``every_steps``: checkpoint period (0: only at the end / on a signal); ``keep_last``: how many to keep."""

    every_steps: NonNegInt = 500
    keep_last: PosInt = 3


class ValidationConfig(Section):
    """Periodic sample grids (reference | target | generated) and, on the synthetic domain, exact metrics.

    ``wrong_reference`` adds a wrong-reference control column (identity equal with the right and a wrong
    reference means the reference is ignored: docs/default-model.md).
    """

    every_steps: NonNegInt = 0
    num_pairs: PosInt = 4
    num_inference_steps: PosInt = 20
    guidance_scale: Float = 4.0
    reference_guidance_scale: Float = 0.0
    shift_scale: Float = 1.0
    seed: Annotated[int, Strict(), Field(ge=0, lt=MAX_SEED)] = 0
    track: Str = "clean"
    wrong_reference: Bool = True


class TrainingConfig(Section):
    """A whole training run. ``mode``: ``customshift`` (with references) or ``base`` (text-only pretraining)."""

    output_dir: Str = "runs/customshift"
    seed: Annotated[int, Strict(), Field(ge=0, lt=MAX_SEED)] = 0
    mode: Literal["customshift", "base"] = "customshift"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    # ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    @classmethod
    def from_dict(cls, data: Any) -> TrainingConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        data = _drop_legacy(data)
        try:
            config = cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(_one_line(error)) from None
        config.validate_combination()
        return config

    def customshift_config(self) -> CustomShiftConfig:
        """The adapter's `CustomShiftConfig` (base mode: no reference LoRA)."""
        fields = dict(self.model.customshift)
        fields.setdefault("max_sequence_length", self.data.max_sequence_length)  # sampling then matches training
        if self.mode == "base":
            fields["lora_rank"] = 0
        return CustomShiftConfig.from_dict(fields)

    def validate_combination(self) -> None:
        """Cross-field checks, so that a bad combination fails before the model is loaded."""
        from ..plugins import is_registered, names
        from .data import BUILT_IN_KINDS, source_class

        d, t = self.data, self.train
        cs = self.customshift_config()
        if t.prompt_dropout + t.reference_dropout + t.both_dropout > 1:
            raise ConfigError("train.prompt_dropout + train.reference_dropout + train.both_dropout must be at most 1")
        if d.kind in ("manifest", "subjects200k") and not d.path:
            raise ConfigError(f"data.path is required for data.kind={d.kind!r}")
        if d.targets_per_reference != 1 and (d.kind in BUILT_IN_KINDS
                                             or not getattr(source_class(d.kind), "several_targets", False)):
            raise ConfigError(f"data.targets_per_reference: data.kind={d.kind} has one target per reference; "
                              "set it to 1")
        if self.model.vae is not None and not is_registered("models", self.model.pretrained):
            raise ConfigError(f"model.vae applies to a registered model ({', '.join(names('models'))}) only")
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


# A section removed from the schema that configs saved beside older checkpoints still hold (at its defaults).
_LEGACY_DEFAULTS = {"debug": {"inject_nan_at_step": None, "checkpoint_sleep": 0.0, "detect_anomaly": False}}


def _drop_legacy(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    for key, defaults in _LEGACY_DEFAULTS.items():
        if key in data:
            value = data.pop(key)
            if not isinstance(value, dict) or any(value.get(k, v) != v for k, v in defaults.items()) \
                    or set(value) - set(defaults):
                raise ConfigError(f"{key}: this section was removed (its test hooks live in the tests now); "
                                  f"drop it from the config")
    return data


_WHOLE = "[whole message] "  # a validator's message that already names its key in full

_PHRASES = {
    "int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be true or false",
    "string_type": "must be a string", "dict_type": "must be a mapping", "list_type": "must be a list",
    "finite_number": "must be a finite number", "model_type": "must be a mapping",
    "float_parsing": "must be a number", "int_parsing": "must be an integer", "tuple_type": "must be a list",
}


def _one_line(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``key message, got value`` (one line, the key in full)."""
    problems = error.errors()
    first = next((p for p in problems if p["type"] == "extra_forbidden"), None) or min(
        problems, key=lambda p: (p["type"] in ("string_type", "dict_type", "model_type"), len(p["loc"])))
    loc = [str(part) for part in first["loc"] if not _is_union_tag(part)]
    key = ".".join(loc) or "config"
    kind, value = first["type"], first.get("input")
    if kind == "extra_forbidden":
        return f"unknown config key {key}; see customshift/training/config.py for the valid keys"
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        message = f"{key} must be one of {expected}"
    elif kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}[kind]
        limit = next(iter(first.get("ctx", {}).values()), "")
        message = f"{key} must be {sign} {limit}"
    elif kind in _PHRASES:
        message = f"{key} {_PHRASES[kind]}"
    else:
        text = " ".join(str(first["msg"]).split()).removeprefix("Value error, ")
        if text.startswith(_WHOLE):
            return text[len(_WHOLE):]
        message = f"{key} {text}" if text.startswith("must") else f"{key}: {text}"
    shown = repr(value)
    return f"{message}, got {shown[:80]}" if value is not None or kind != "missing" else message


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union it tried (``int``, ``function-after[...]``) in the location."""
    text = str(part)
    return text in ("int", "float", "str", "bool", "dict[str,float]", "list[literal['csv','tensorboard','wandb']]",
                    "literal['auto']", "dict[str,constrained-float]") or text.startswith(("function-", "constrained-"))


# ----------------------------------------------------------------------------------------------------
# Files, inheritance and overrides


def _parse_file(path: Path) -> dict[str, Any]:
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


# Where a child's mapping is merged into its base's key by key; every other value (a list, a ``{name: weight}``
# choice such as data.track) is replaced whole, so a recipe never inherits half of a distribution; an empty
# mapping clears its base's (``customshift: {}`` when a stage starts from saved weights and their config).
MERGED = frozenset({"", "model", "data", "train", "checkpoint", "validation", "model.customshift", "model.tiny"})


def merge(base: dict[str, Any], changes: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``changes`` over ``base``: the sections in `MERGED` key by key, anything else replaced."""
    out = _deep_copy(base)
    for key, value in changes.items():
        path = f"{where}.{key}" if where else key
        if path in MERGED and value and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, path)
        else:
            out[key] = _deep_copy(value)
    return out


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Plain data from a ``.yaml``/``.yml``/``.toml``/``.json`` file, its ``base:`` chain resolved."""
    path = Path(path)
    data = _parse_file(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base in {path} must be a file name, got {base!r}")
    parent = (path.parent / base).resolve()
    if parent in _seen or parent == path.resolve():
        raise ConfigError(f"base in {path}: {base} inherits from itself")
    return merge(read_config_file(parent, (*_seen, path.resolve())), data)


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
