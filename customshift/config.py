"""`CustomShiftConfig`: every choice of the method that is fixed at training time.

Inference-time knobs (shift scale, guidance scales, steps) are arguments of the pipeline instead.
The config is saved beside trained weights so that loading them rebuilds the same adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

# Attention projections that receive the Reference-Alignment Branch's LoRA: image-side q/k/v/out and
# the text-side (context) projections, as in method.md section 1.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)


@dataclass
class CustomShiftConfig:
    """Training-time configuration of the CustomShift adapter.

    Attributes:
        lora_rank: rank of the Reference-Alignment Branch LoRA (0 = no LoRA, training-free branch).
        lora_alpha: LoRA alpha (scale = alpha / rank).
        lora_targets: module-name suffixes inside each transformer block that get the LoRA.
        lora_feedforward: also adapt the blocks' feed-forward layers (an ablation of method.md).
        generation_lora_rank: optional LoRA on the generation branch (0 = none).
        reference_positions: "same" gives reference tokens the target's centred sin-cos grid;
            "offset" takes them from the table's corner so they never coincide with target positions.
        subject_tokens_in_reference: run the subject-name tokens with the reference (ablation: False).
        conditional_shift: make the shift depend on subject relevance m_i (ablation: False).
        learn_shift: train beta_l and gamma_l (ablation: False keeps them at their initial values).
        beta_init / gamma_init: initial per-layer shift parameters.
        text_queries_attend_reference: let text queries see the reference keys too (default: no).
        cads_form: "split" (two attention calls joined by log-sum-exp) or "mask" (one call, additive mask).
        cads_shift: "mass" (beta_i is the log-odds of the image query's attention mass on the reference,
            so the path cannot be closed by the scores) or "logit" (beta_i is added to the reference
            logits; the mass follows the scores). docs/method.md derives both.
        subject_competition: with several subjects, add kappa_l times each name's centred query score to its
            shift, so the subjects compete for each query by which name it matches best (docs/method.md, "Several
            subjects"); kappa_l starts at 0 (the same model) and is trained; one subject is unaffected.
        max_sequence_length: T5 tokens the model was trained with; the pipeline's default when the caller
            gives none (None: SD3's 256).
    """

    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_feedforward: bool = False
    generation_lora_rank: int = 0
    reference_positions: Literal["same", "offset"] = "same"
    subject_tokens_in_reference: bool = True
    conditional_shift: bool = True
    learn_shift: bool = True
    beta_init: float = 0.0
    gamma_init: float = 1.0
    text_queries_attend_reference: bool = False
    cads_form: Literal["split", "mask"] = "split"
    cads_shift: Literal["mass", "logit"] = "mass"
    subject_competition: bool = False
    max_sequence_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Fields that add a part initialised to the identity (kappa_l = 0; a LoRA whose B is 0): switched on over
    # saved weights they give the same model, so a later training stage may switch them on
    # (customshift/training/model.py); every other field must match the saved weights' config.
    SWITCH_ON_LATER: ClassVar[tuple[str, ...]] = ("subject_competition", "generation_lora_rank")

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        if self.reference_positions not in ("same", "offset"):
            raise ValueError(f"reference_positions must be 'same' or 'offset', not {self.reference_positions!r}")
        if self.cads_form not in ("split", "mask"):
            raise ValueError(f"cads_form must be 'split' or 'mask', not {self.cads_form!r}")
        if self.cads_shift not in ("mass", "logit"):
            raise ValueError(f"cads_shift must be 'mass' or 'logit', not {self.cads_shift!r}")
        if self.lora_rank < 0 or self.generation_lora_rank < 0:
            raise ValueError("LoRA ranks must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CustomShiftConfig:
        """The config saved in a file; every value's type is checked (a file may come from anywhere)."""
        if not isinstance(data, dict):
            raise TypeError(f"a CustomShiftConfig is a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CustomShiftConfig fields {unknown}; is this file from a newer version?")
        for name, value in data.items():
            _check_field(name, value)
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> CustomShiftConfig:
        return dataclasses.replace(self, **changes)


# The T5 length SD3's encode_prompt accepts (StableDiffusion3Pipeline.check_inputs refuses more than 512).
MAX_SEQUENCE_LENGTH = 512
_INTS = {"lora_rank", "generation_lora_rank"}
_FLOATS = {"lora_alpha", "beta_init", "gamma_init"}
_BOOLS = {"lora_feedforward", "subject_tokens_in_reference", "conditional_shift", "learn_shift",
          "text_queries_attend_reference", "subject_competition"}
_CHOICES = {"reference_positions": ("same", "offset"), "cads_form": ("split", "mask"), "cads_shift": ("mass", "logit")}


def _check_field(name: str, value: Any) -> None:
    """Refuse a value of the wrong type for ``name`` (bool is not an int here, and floats must be finite)."""
    def wrong(expected: str) -> TypeError:
        return TypeError(f"config field {name!r} must be {expected}, got {value!r}")

    if name in _INTS and (isinstance(value, bool) or not isinstance(value, int)):
        raise wrong("an integer")
    if name in _FLOATS and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise wrong("a finite number")
    if name in _BOOLS and not isinstance(value, bool):
        raise wrong("true or false")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise wrong(" or ".join(repr(c) for c in _CHOICES[name]))
    if name == "lora_targets" and (not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value)):
        raise wrong("a list of module-name strings")
    if name == "max_sequence_length" and value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQUENCE_LENGTH
    ):
        raise wrong(f"null or an integer from 1 to {MAX_SEQUENCE_LENGTH}")
    if name == "extra" and not isinstance(value, dict):
        raise wrong("a JSON object")
