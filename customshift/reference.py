"""The Reference-Alignment Branch and the `SubjectEmbedding` it produces.

The branch runs the SD3 blocks over the joint sequence [reference latent tokens ; subject-name tokens]
at timestep 0, so the reference is read *through the subject's name*. It shares every base weight with
the generation branch — it is a second module tree whose leaf layers are the very same modules — and
owns a LoRA adapter that only this tree sees. Because it never sees the noisy target and runs at a
fixed timestep, its per-layer keys/values depend only on (reference, subject): they are computed once
and reused for every step, prompt and seed, and can be saved to disk.
"""

from __future__ import annotations

import copy
import hashlib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attention import ShiftParameters, install_processors
from .config import CustomShiftConfig
from .errors import IncompatibleWeightsError

EMBEDDING_FORMAT = "customshift-subject-embedding/1"
REFERENCE_ADAPTER = "reference"


# ----------------------------------------------------------------------------------------------------------
# Fingerprints: which base model (and which CustomShift weights) a tensor was made with.


def _sign_digest(hasher: Any, name: str, tensor: Tensor, count: int = 512) -> None:
    # Signs survive fp32 -> fp16/bf16 casts exactly, so the same model in another dtype keeps its print.
    values = tensor.detach().flatten()[:count].float().cpu()
    hasher.update(name.encode())
    hasher.update(str(tuple(tensor.shape)).encode())
    hasher.update(torch.sign(values).to(torch.int8).numpy().tobytes())


def base_fingerprint(transformer: nn.Module) -> str:
    """A short digest of an SD3 transformer's config and a sample of its weights."""
    hasher = hashlib.sha256()
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    hasher.update(json.dumps(config, sort_keys=True, default=str).encode())
    # Names as in the plain model: a LoRA loaded on top wraps layers (".base_layer") but is not the base.
    params = {n.replace(".base_layer", ""): p for n, p in transformer.named_parameters() if "lora_" not in n}
    probes = ["pos_embed.proj.weight", "context_embedder.weight", "proj_out.weight"]
    probes.append("transformer_blocks.0.attn.to_q.weight")
    for name in probes:
        if name in params:
            _sign_digest(hasher, name, params[name])
    return hasher.hexdigest()[:16]


def tensors_fingerprint(tensors: dict[str, Tensor]) -> str:
    """A digest of trained CustomShift weights (LoRA and shift parameters)."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        _sign_digest(hasher, name, tensors[name])
        hasher.update(f"{tensors[name].detach().float().abs().sum().item():.3e}".encode())
    return hasher.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# SubjectEmbedding


@dataclass
class SubjectEmbedding:
    """Per-layer reference keys/values of one subject, plus what they were made from.

    ``keys[name]`` / ``values[name]`` have shape (1, heads, R, head_dim) for each CADS processor
    name. ``inputs`` holds the branch inputs (reference latents, subject tokens) in memory so the
    branch can be re-run; it is not saved.
    """

    keys: dict[str, Tensor]
    values: dict[str, Tensor]
    subject: str
    base_fingerprint: str
    weights_fingerprint: str
    resolution: tuple[int, int]
    num_references: int = 1
    inputs: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return next(iter(self.keys.values())).shape[2]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SubjectEmbedding:
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return SubjectEmbedding(
            keys={k: move(v) for k, v in self.keys.items()},
            values={k: move(v) for k, v in self.values.items()},
            subject=self.subject,
            base_fingerprint=self.base_fingerprint,
            weights_fingerprint=self.weights_fingerprint,
            resolution=self.resolution,
            num_references=self.num_references,
            inputs=self.inputs,
        )

    def save(self, path: str | Path) -> Path:
        """Write the embedding as one safetensors file (atomic: a crash never leaves half a file)."""
        from .io import atomic_save_safetensors

        tensors = {f"k::{n}": t.detach().contiguous().cpu() for n, t in self.keys.items()}
        tensors.update({f"v::{n}": t.detach().contiguous().cpu() for n, t in self.values.items()})
        metadata = {
            "format": EMBEDDING_FORMAT,
            "subject": self.subject,
            "base_fingerprint": self.base_fingerprint,
            "weights_fingerprint": self.weights_fingerprint,
            "resolution": json.dumps(list(self.resolution)),
            "num_references": str(self.num_references),
        }
        path = Path(path)
        atomic_save_safetensors(tensors, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SubjectEmbedding:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise IncompatibleWeightsError(f"{path}: no such subject embedding file")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise IncompatibleWeightsError(
                f"{path}: not a readable safetensors file ({error}); re-create it with encode_subject"
            ) from None
        if metadata.get("format") != EMBEDDING_FORMAT:
            raise IncompatibleWeightsError(
                f"{path}: not a CustomShift subject embedding (format {metadata.get('format')!r}, "
                f"expected {EMBEDDING_FORMAT!r})"
            )
        return cls(
            keys={n[3:]: t for n, t in tensors.items() if n.startswith("k::")},
            values={n[3:]: t for n, t in tensors.items() if n.startswith("v::")},
            subject=metadata["subject"],
            base_fingerprint=metadata["base_fingerprint"],
            weights_fingerprint=metadata["weights_fingerprint"],
            resolution=tuple(json.loads(metadata["resolution"])),
            num_references=int(metadata.get("num_references", "1")),
        )


# ----------------------------------------------------------------------------------------------------------
# The branch


def _structural_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose leaf modules are the original objects.

    Parameters therefore stay shared (also across ``.to(device)``, which converts leaves in place),
    while containers — attention modules with their processors, blocks — are distinct, so an adapter
    injected into the copy never appears in the original.
    """
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        # A LoRA of the generation branch (or a user's style LoRA) is not part of the reference branch.
        return _structural_copy(module.get_base_layer())
    if not module._modules:
        return module
    clone = copy.copy(module)
    for attribute, value in vars(module).items():
        if "hooks" in attribute and isinstance(value, dict):
            setattr(clone, attribute, type(value)(value))  # hooks added to the original later stay there
    clone._modules = {name: _structural_copy(child) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


def make_lora_config(config: CustomShiftConfig, rank: int):
    """The peft LoRA config of either branch (the reference branch's, or the optional generation LoRA)."""
    from peft import LoraConfig

    targets = list(config.lora_targets)
    if config.lora_feedforward:
        targets += ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    return LoraConfig(r=rank, lora_alpha=config.lora_alpha, target_modules=targets, init_lora_weights=True)


def _corner_pos_embed(self, height: int, width: int) -> Tensor:
    """PatchEmbed.cropped_pos_embed, but from the table's corner: positions no target token has."""
    height, width = height // self.patch_size, width // self.patch_size
    table = self.pos_embed.reshape(1, self.pos_embed_max_size, self.pos_embed_max_size, -1)
    return table[:, :height, :width, :].reshape(1, height * width, -1)


class ReferenceBranch(nn.Module):
    """The Reference-Alignment Branch: a weight-sharing copy of the SD3 transformer with its own LoRA.

    ``forward`` returns the reference tokens' keys/values of every CADS processor, which the
    generation branch attends to through CADS. The shift parameters beta_l, gamma_l live here too,
    so that everything CustomShift trains is in one module.
    """

    def __init__(self, transformer: nn.Module, config: CustomShiftConfig | None = None) -> None:
        super().__init__()
        self.config = config or CustomShiftConfig()
        tree = _structural_copy(transformer)
        if self.config.reference_positions == "offset":
            tree.pos_embed.cropped_pos_embed = types.MethodType(_corner_pos_embed, tree.pos_embed)
        names = install_processors(tree)
        if self.config.lora_rank > 0:
            from peft import inject_adapter_in_model

            lora = make_lora_config(self.config, self.config.lora_rank)
            inject_adapter_in_model(lora, tree, adapter_name=REFERENCE_ADAPTER)
        self.tree = tree
        self.shift = ShiftParameters(names, self.config.beta_init, self.config.gamma_init)

    @property
    def processor_names(self) -> list[str]:
        return self.shift.names

    def _apply(self, fn: Any, recurse: bool = True) -> ReferenceBranch:
        """``.to()`` / ``.half()`` move what the branch owns (its LoRA, the shift parameters), never the base layers
        it shares with the transformer: those move with the transformer, and may sit on ``meta`` under offload."""
        self.shift._apply(fn)
        for module in self.tree.modules():
            for name in getattr(module, "adapter_layer_names", ()):
                getattr(module, name)._apply(fn)
        return self

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The LoRA and shift parameters: everything CustomShift adds to the base model."""
        state: dict[str, Tensor] = {}
        if self.config.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(self.tree, adapter_name=REFERENCE_ADAPTER)
            state.update({f"reference_lora.{k}": v for k, v in lora.items()})
        state["shift.beta"] = self.shift.beta.detach()
        state["shift.gamma"] = self.shift.gamma.detach()
        return state

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.shift.beta.copy_(state["shift.beta"])
            self.shift.gamma.copy_(state["shift.gamma"])
        lora = {k[len("reference_lora.") :]: v for k, v in state.items() if k.startswith("reference_lora.")}
        if self.config.lora_rank > 0:
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.tree, lora, adapter_name=REFERENCE_ADAPTER)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise IncompatibleWeightsError(f"LoRA weights do not fit this model: {unexpected[:3]} ...")

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for n, p in self.tree.named_parameters() if "lora_" in n]
        if self.config.learn_shift:
            params += [self.shift.beta]
            if self.config.conditional_shift:
                params += [self.shift.gamma]
        return params

    def encode(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One subject's keys/values, (1, heads, R, head_dim): several references' tokens joined side by side."""
        kv = self(**inputs)
        keys = {n: k.transpose(0, 1).reshape(1, k.shape[1], -1, k.shape[-1]) for n, (k, _) in kv.items()}
        values = {n: v.transpose(0, 1).reshape(1, v.shape[1], -1, v.shape[-1]) for n, (_, v) in kv.items()}
        return keys, values

    def forward(
        self,
        reference_latents: Tensor,
        subject_embeds: Tensor,
        subject_pooled: Tensor,
        subject_mask: Tensor | None = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-layer reference K/V for a batch of references.

        Args:
            reference_latents: (B, C, h, w) clean, scaled VAE latents of the references.
            subject_embeds: (B, S, D) the subject-name tokens (unpadded, or padded with ``subject_mask``).
            subject_pooled: (B, P) pooled embedding of the subject phrase.
            subject_mask: (B, S) 1 for real subject tokens, 0 for padding.
        """
        if not self.config.subject_tokens_in_reference:
            subject_embeds = subject_embeds[:, :0]
            subject_mask = None
        capture: dict[str, tuple[Tensor, Tensor]] = {}
        kwargs: dict[str, Any] = {"customshift_capture": capture}
        if subject_mask is not None:
            kwargs["customshift_text_mask"] = subject_mask
        timestep = torch.zeros(reference_latents.shape[0], device=reference_latents.device)
        self.tree(
            hidden_states=reference_latents,
            encoder_hidden_states=subject_embeds,
            pooled_projections=subject_pooled,
            timestep=timestep,
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )
        return capture
