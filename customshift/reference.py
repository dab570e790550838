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
import dataclasses
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
from .errors import IncompatibleWeightsError, SubjectEmbeddingError

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
    name. ``inputs`` holds the branch inputs (reference latents, subject tokens) so the branch can be re-run.

    Two forms on disk: the full one (the keys/values themselves: ready at once, but 576 MiB in fp16 for a
    1024² reference on SD3-medium) and the compact one (``save(path, compact=True)``: only ``inputs``, about
    a megabyte; ``load(path, pipeline=pipe)`` recomputes the keys/values in one branch pass, exactly).
    docs/diffusers.md gives the sizes.
    """

    keys: dict[str, Tensor]
    values: dict[str, Tensor]
    subject: str
    base_fingerprint: str
    weights_fingerprint: str
    resolution: tuple[int, int]
    num_references: int = 1
    inputs: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)
    kv_dtype: torch.dtype | None = field(default=None, repr=False, compare=False)  # compact: the keys' dtype

    @property
    def num_tokens(self) -> int:
        return next(iter(self.keys.values())).shape[2]

    @property
    def compact(self) -> bool:
        """Loaded from a compact file and not yet expanded (no keys/values: see ``expand``)."""
        return not self.keys

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SubjectEmbedding:
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return dataclasses.replace(self, keys={k: move(v) for k, v in self.keys.items()},
                                   values={k: move(v) for k, v in self.values.items()})

    def save(self, path: str | Path, compact: bool = False) -> Path:
        """Write the embedding as one safetensors file (atomic: a crash never leaves half a file).

        ``compact=True`` stores the branch inputs instead of the keys/values (hundreds of times smaller;
        loading it needs the pipeline, to recompute them).
        """
        from .io import atomic_save_safetensors

        if compact and not self.inputs:
            raise SubjectEmbeddingError("a compact embedding needs the branch inputs: save one from encode_subject")
        if compact:
            tensors = {f"in::{n}": t.detach().contiguous().cpu() for n, t in self.inputs.items()}
            dtype = self.kv_dtype or next(iter(self.keys.values())).dtype
        else:
            tensors = {f"k::{n}": t.detach().contiguous().cpu() for n, t in self.keys.items()}
            tensors.update({f"v::{n}": t.detach().contiguous().cpu() for n, t in self.values.items()})
        metadata = {
            "format": EMBEDDING_FORMAT,
            "form": "compact" if compact else "full",
            "subject": self.subject,
            "base_fingerprint": self.base_fingerprint,
            "weights_fingerprint": self.weights_fingerprint,
            "resolution": json.dumps(list(self.resolution)),
            "num_references": str(self.num_references),
        }
        if compact:
            metadata["kv_dtype"] = str(dtype).removeprefix("torch.")
        path = Path(path)
        atomic_save_safetensors(tensors, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", pipeline: Any = None) -> SubjectEmbedding:
        """Read and check an embedding file; a compact one is expanded when ``pipeline`` is given.

        Every check is here, before a single image is made: metadata, NaN/inf, pairs of keys and values of
        one shape (`check_fits` adds the pipeline's layers).
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise IncompatibleWeightsError(f"{path}: no such subject embedding file")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise IncompatibleWeightsError(
                f"{path}: not a readable safetensors file ({error}); re-create it with encode_subject"
            ) from None
        if metadata.get("format") != EMBEDDING_FORMAT:
            raise IncompatibleWeightsError(
                f"{path}: not a CustomShift subject embedding (format {metadata.get('format')!r}, "
                f"expected {EMBEDDING_FORMAT!r})"
            )
        fields = _read_metadata(path, metadata)
        for name, tensor in tensors.items():
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise SubjectEmbeddingError(f"{path}: tensor {name!r} is not finite floating point (NaN or inf?)")
        if fields.pop("form") == "compact":
            inputs = {n[4:]: t for n, t in tensors.items() if n.startswith("in::")}
            _check_inputs(path, inputs, fields["num_references"])
            embedding = cls(keys={}, values={}, inputs=inputs, **fields)
            return embedding.expand(pipeline) if pipeline is not None else embedding
        keys = {n[3:]: t for n, t in tensors.items() if n.startswith("k::")}
        values = {n[3:]: t for n, t in tensors.items() if n.startswith("v::")}
        if not keys or set(keys) != set(values):
            odd = sorted(set(keys) ^ set(values)) or ["(no layers)"]
            raise SubjectEmbeddingError(f"{path}: keys and values are not in pairs (layer {odd[0]})")
        for name, key in keys.items():
            if key.dim() != 4 or key.shape[0] != 1 or key.shape != values[name].shape:
                raise SubjectEmbeddingError(f"{path}: layer {name}: key {tuple(key.shape)} and value "
                                            f"{tuple(values[name].shape)} are not both (1, heads, tokens, dim)")
        fields.pop("kv_dtype")
        return cls(keys=keys, values=values, **fields)

    def expand(self, pipeline: Any) -> SubjectEmbedding:
        """A compact embedding with its keys/values recomputed by ``pipeline``'s branch (one pass)."""
        if not self.compact:
            return self
        pipeline.check_subject(self, fingerprints_only=True)
        device, dtype = pipeline._execution_device, pipeline.transformer.dtype  # not meta under offload
        with torch.no_grad():
            pipeline.reference_branch.to(device)
            inputs = {n: t.to(device, dtype) for n, t in self.inputs.items()}
            keys, values = pipeline.reference_branch.encode(inputs)
        kv = self.kv_dtype or dtype
        return dataclasses.replace(self, keys={n: k.to(kv) for n, k in keys.items()},
                                   values={n: v.to(kv) for n, v in values.items()}, inputs=inputs)

    def check_fits(self, layers: dict[str, tuple[int, int]]) -> None:
        """Refuse keys/values whose layers or (heads, head_dim) are not the pipeline's ``layers``."""
        if self.compact:
            raise SubjectEmbeddingError(f"subject embedding '{self.subject}' is compact: load it with "
                                        "SubjectEmbedding.load(path, pipeline=pipe) (or call .expand(pipe))")
        missing, unknown = sorted(set(layers) - set(self.keys)), sorted(set(self.keys) - set(layers))
        if missing or unknown:
            raise SubjectEmbeddingError(f"subject embedding '{self.subject}' lacks layers {missing[:3]} or has "
                                        f"layers this model does not {unknown[:3]}")
        for name, (heads, head_dim) in layers.items():
            shape = tuple(self.keys[name].shape)
            if (shape[1], shape[3]) != (heads, head_dim):
                raise SubjectEmbeddingError(f"subject embedding '{self.subject}': layer {name} has {shape[1]} heads "
                                            f"of {shape[3]}, this model {heads} of {head_dim}")


def _read_metadata(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The embedding's own fields from safetensors metadata (all strings), each checked."""
    missing = sorted({"subject", "base_fingerprint", "weights_fingerprint", "resolution"} - set(metadata))
    if missing:
        raise SubjectEmbeddingError(f"{path}: metadata lacks {missing}; re-create it with encode_subject")
    try:
        resolution = json.loads(metadata["resolution"])
        references = int(metadata.get("num_references", "1"))
        kv_dtype = getattr(torch, metadata["kv_dtype"]) if "kv_dtype" in metadata else None
        if not (isinstance(resolution, list) and len(resolution) == 2 and all(
                isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in resolution)):
            raise ValueError(f"resolution {metadata['resolution']!r}")
        if references < 1 or not metadata["subject"].strip() or (
                kv_dtype is not None and not (isinstance(kv_dtype, torch.dtype) and kv_dtype.is_floating_point)):
            raise ValueError("num_references, subject or kv_dtype")
    except (ValueError, TypeError, AttributeError, RecursionError) as error:
        raise SubjectEmbeddingError(f"{path}: unparsable metadata ({str(error)[:100]})") from None
    form = metadata.get("form", "full")
    if form not in ("full", "compact"):
        raise SubjectEmbeddingError(f"{path}: unknown form {form!r}")
    return {"subject": metadata["subject"], "base_fingerprint": metadata["base_fingerprint"],
            "weights_fingerprint": metadata["weights_fingerprint"], "resolution": tuple(resolution),
            "num_references": references, "kv_dtype": kv_dtype, "form": form}


def _check_inputs(path: Path, inputs: dict[str, Tensor], references: int) -> None:
    """A compact file's branch inputs: latents (N, C, h, w), subject tokens (N, S, D), pooled (N, P)."""
    dims = {"reference_latents": 4, "subject_embeds": 3, "subject_pooled": 2}
    for name, dim in dims.items():
        tensor = inputs.get(name)
        if tensor is None or tensor.dim() != dim or tensor.shape[0] != references:
            raise SubjectEmbeddingError(f"{path}: compact input {name!r} is missing or not {dim}-D with "
                                        f"{references} reference(s)")


# ----------------------------------------------------------------------------------------------------------
# The branch


Tied = list[tuple[nn.Module, nn.Module, frozenset[str]]]  # (copy, original, the original's persistent buffers)


def _structural_copy(module: nn.Module, tied: Tied) -> nn.Module:
    """A copy of the module tree whose leaf modules are the original objects (so parameters are shared).

    Containers (the root, blocks, attention modules with their processors, the patch embedding) are new
    objects, so an adapter injected into the copy never appears in the original. Each is built through
    nn.Module's own API: ``copy.copy`` for its plain attributes (config, processor, flags), then
    ``nn.Module.__init__`` for fresh torch state (no children, tensors or hooks of its own: hooks on the
    original, before or after, never run in the branch), then ``add_module`` / ``register_parameter`` /
    ``register_buffer`` with the original's children and tensors. A container with tensors of its own
    (SD3: ``pos_embed``'s table) is recorded in ``tied``: `ReferenceBranch` re-reads them at every forward,
    since ``.to()`` and sharding replace an original's buffers by new tensors.

    Why a copy and not a second peft adapter on the one transformer: tests/test_reference_branch_sharing.py
    measures that peft's ``set_adapter`` drops the inactive adapter's ``requires_grad`` (the reference
    LoRA gets no gradient at all) and that, with that undone, gradient checkpointing recomputes the
    reference blocks in backward with the generation adapter active (a wrong reference-LoRA gradient).
    """
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        # A LoRA of the generation branch (or a user's style LoRA) is not part of the reference branch.
        return _structural_copy(module.get_base_layer(), tied)
    children = list(module.named_children())
    if not children:
        return module
    clone = copy.copy(module)
    nn.Module.__init__(clone)
    clone.training = module.training  # not .train(): that would recurse into the shared leaves
    if "peft_config" in vars(clone):  # the transformer's adapters (generation, user) are not the branch's:
        del clone.peft_config  # a shared dict would list the reference adapter in the original too
    for name, child in children:
        clone.add_module(name, _structural_copy(child, tied))
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        # Here, not at each forward: FSDP2's state_dict hooks reshard, so state_dict never runs during one.
        persistent = frozenset(n for n, _ in module.named_buffers(recurse=False) if n in module.state_dict())
        _retie(clone, module, persistent)
        tied.append((clone, module, persistent))
    return clone


def _retie(clone: nn.Module, source: nn.Module, persistent: frozenset[str]) -> None:
    """Give ``clone`` the very tensors ``source`` holds itself (not its children's)."""
    for name, parameter in source.named_parameters(recurse=False):
        clone.register_parameter(name, parameter)
    for name, buffer in source.named_buffers(recurse=False):
        clone.register_buffer(name, buffer, persistent=name in persistent)


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
    so that everything CustomShift trains is in one module. A copy rather than a second adapter on the
    transformer, because that one gets a wrong gradient under gradient checkpointing (`_structural_copy`;
    measured in tests/test_reference_branch_sharing.py, docs/training.md "The reference branch").
    """

    def __init__(self, transformer: nn.Module, config: CustomShiftConfig | None = None) -> None:
        super().__init__()
        self.config = config or CustomShiftConfig()
        tied: Tied = []
        tree = _structural_copy(getattr(transformer, "_orig_mod", transformer), tied)  # the module under compile
        if self.config.reference_positions == "offset":
            tree.pos_embed.cropped_pos_embed = types.MethodType(_corner_pos_embed, tree.pos_embed)
        names = install_processors(tree)
        if self.config.lora_rank > 0:
            from peft import inject_adapter_in_model

            lora = make_lora_config(self.config, self.config.lora_rank)
            inject_adapter_in_model(lora, tree, adapter_name=REFERENCE_ADAPTER)
        self.tree = tree
        self._tied = tied  # a plain list: the originals are the transformer's, not submodules of the branch
        self.shift = ShiftParameters(names, self.config.beta_init, self.config.gamma_init,
                                     self.config.subject_competition)

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
        if self.shift.kappa is not None:
            state["shift.kappa"] = self.shift.kappa.detach()
        return state

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.shift.beta.copy_(state["shift.beta"])
            self.shift.gamma.copy_(state["shift.gamma"])
            if self.shift.kappa is not None:
                self.shift.kappa.copy_(state["shift.kappa"])
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
                params += [self.shift.gamma] + ([self.shift.kappa] if self.shift.kappa is not None else [])
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
        for clone, source, persistent in self._tied:
            _retie(clone, source, persistent)
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
