"""`CustomShiftLoaderMixin`: trained CustomShift weights that travel with the pipeline.

One layout everywhere (CLI, web UI, Python, the hub): a pipeline folder or repository carries its weights
in ``customshift/``; a weights folder saved on its own has the same two files at its top:

    customshift.json           manifest: format, base-model fingerprint, config, weights file name, sha256
    customshift.safetensors    the reference branch's LoRA, the shift parameters (and a generation LoRA)

``save_pretrained`` / ``push_to_hub`` write them with a model card, ``from_pretrained`` restores them, and
``load_customshift`` fetches exactly these two files (``hf_hub_download``, as diffusers' own
``SD3LoraLoaderMixin`` does with ``weight_name`` / ``subfolder``). A manifest may come from anywhere: every
field is checked before anything is read or loaded (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import create_repo, hf_hub_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RemoteEntryNotFoundError
from torch import Tensor

from .config import CustomShiftConfig
from .errors import IncompatibleWeightsError, WeightsError, WeightsNotFoundError
from .io import file_sha256

logger = logging.getLogger(__name__)

WEIGHTS_FORMAT = "customshift-weights/1"
WEIGHTS_NAME = "customshift.safetensors"
MANIFEST_NAME = "customshift.json"
WEIGHTS_SUBFOLDER = "customshift"
GENERATION_ADAPTER = "generation"
TRAINING_FREE = "training-free"  # the weights fingerprint of a pristine branch (no LoRA, initial shift)
# `DiffusionPipeline.from_pretrained(folder, custom_pipeline=PIPELINE_SHIM[:-3], trust_remote_code=True)`
# finds the class through this file (diffusers' custom-pipeline route); it only imports ours.
PIPELINE_SHIM = "customshift_pipeline.py"
PIPELINE_SHIM_SOURCE = (
    '"""Lets DiffusionPipeline.from_pretrained find CustomShiftPipeline (the custom_pipeline route)."""\n'
    "from customshift.pipeline import CustomShiftPipeline  # noqa: F401\n"
)
_MAX_MANIFEST_BYTES = 1 << 20
_LOADING: ContextVar[bool] = ContextVar("customshift_from_pretrained", default=False)
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def manifest_name(weight_name: str) -> str:
    """``dog.safetensors`` -> ``dog.json``: several weight sets can share a folder."""
    return Path(weight_name).stem + ".json"


def plain_file_name(name: Any, where: str) -> str:
    """A file name with no folder part (``weights`` in a manifest may come from anyone)."""
    if not isinstance(name, str) or not name.strip():
        raise WeightsError(f"{where}: 'weights' must be a file name, got {name!r}")
    if name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name or "\0" in name:
        raise WeightsError(f"{where}: 'weights' must be a plain file name inside the folder, got {name!r}")
    return name


def check_safetensors_file(path: Path) -> None:
    """A regular file whose size is exactly what its safetensors header says (so hashing it ends)."""
    try:
        info = os.stat(path)
    except OSError:
        raise WeightsError(f"{path}: the weights file named by the manifest does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise WeightsError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(_MAX_HEADER_BYTES, info.st_size - 8):
                raise ValueError(f"header of {length} bytes in a file of {info.st_size}")
            header = json.loads(handle.read(length))
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    except (struct.error, ValueError, TypeError, KeyError, IndexError, RecursionError, OSError) as error:
        raise WeightsError(f"{path}: not a safetensors file ({error})") from None
    if 8 + length + end != info.st_size:
        raise WeightsError(f"{path}: size {info.st_size} does not match its header ({8 + length + end}); truncated?")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path`` with every field checked (format, types, config)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_MANIFEST_BYTES:
            raise WeightsError(f"{path}: not a regular file of at most {_MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsNotFoundError(f"{path.parent}: no {path.name}; not a CustomShift weights folder") from None
    except (OSError, ValueError, RecursionError) as error:
        raise WeightsError(f"{path}: unreadable manifest ({type(error).__name__}: {str(error)[:100]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != WEIGHTS_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise IncompatibleWeightsError(f"{path}: format {found!r} is not {WEIGHTS_FORMAT!r}")
    missing = {"base_fingerprint", "config", "weights", "weights_sha256"} - set(manifest)
    if missing:
        raise WeightsError(f"{path}: manifest lacks {sorted(missing)}")
    plain_file_name(manifest["weights"], str(path))
    sha = manifest["weights_sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise WeightsError(f"{path}: 'weights_sha256' must be 64 hex digits, got {str(sha)[:80]!r}")
    if not isinstance(manifest["base_fingerprint"], str) or not isinstance(manifest.get("extra", {}), dict):
        raise WeightsError(f"{path}: 'base_fingerprint' must be a string and 'extra' an object")
    try:
        # Weights saved before ``cads_shift`` existed were trained with the logit form.
        config = manifest["config"]
        manifest["config"] = CustomShiftConfig.from_dict({"cads_shift": "logit", **config} if isinstance(config, dict)
                                                         else config)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{path}: bad config: {error}") from None
    return manifest


def locate_weights(
    path_or_repo: str | Path, subfolder: str | None, weight_name: str, **hub: Any
) -> tuple[Path, dict[str, Any]]:
    """The local weights file and its checked manifest; a hub repo gives exactly two downloads."""
    name = manifest_name(weight_name)
    local = Path(path_or_repo)
    if local.is_dir():
        folders = [local / subfolder] if subfolder else [local, local / WEIGHTS_SUBFOLDER]
        folder = next((f for f in folders if (f / name).is_file()), folders[0])
        manifest = read_manifest(folder / name)
        return folder / manifest["weights"], manifest
    if local.exists():
        raise WeightsError(f"{local}: expected a CustomShift weights folder (with {name})")
    subfolders = [subfolder] if subfolder else [None, WEIGHTS_SUBFOLDER]
    for i, sub in enumerate(subfolders):
        try:
            manifest_path = Path(_download(path_or_repo, name, sub, **hub))
        except WeightsNotFoundError:
            if i == len(subfolders) - 1:
                raise
            continue
        manifest = read_manifest(manifest_path)
        return Path(_download(path_or_repo, manifest["weights"], sub, **hub)), manifest
    raise AssertionError("unreachable")  # pragma: no cover


def _download(repo: str | Path, filename: str, subfolder: str | None, **hub: Any) -> str:
    where = f"{repo}/{subfolder + '/' if subfolder else ''}{filename}"
    try:
        return hf_hub_download(str(repo), filename, subfolder=subfolder, **hub)
    except (RemoteEntryNotFoundError, LocalEntryNotFoundError) as error:
        offline = isinstance(error, LocalEntryNotFoundError)
        raise WeightsNotFoundError(
            f"{where}: not found" + (" (offline and not in the hub cache: download it on a connected machine "
                                     "and pass the folder)" if offline else "")
        ) from None
    except HFValidationError:
        raise WeightsNotFoundError(f"{repo}: neither a local folder nor a hub repository id") from None
    except OSError as error:  # the hub's HTTP errors (missing repo, revision, gated, network) are OSErrors
        raise WeightsNotFoundError(f"{where}: could not be fetched from the hub ({type(error).__name__})") from None


def _base(transformer: Any) -> Any:
    """The module under ``torch.compile`` (peft's state-dict names are the plain module's)."""
    return getattr(transformer, "_orig_mod", transformer)


@contextmanager
def plain_layers(modules: list[Any]) -> Iterator[None]:
    """Each peft-wrapped layer replaced by its base layer, and put back after.

    Why: ``ModelMixin.save_pretrained`` writes ``state_dict()``, whose names under a LoRA are peft's
    (``to_q.base_layer.weight``, ``lora_A...``), which ``from_pretrained`` cannot read back. The base layers
    are the very modules the LoRA wraps (and the reference branch shares), so nothing is copied; the
    generation LoRA travels in ``customshift/`` and a user's LoRA in its own file, as in diffusers (on a text
    encoder too, where transformers would otherwise write the adapter alone).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    swapped = []
    for model in modules:
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer") and "base_layer" not in name \
                    and "lora_" not in name:
                parent, _, child = name.rpartition(".")
                swapped.append((model.get_submodule(parent), child, layer))
    # transformers' save_pretrained writes only the adapter of a model flagged as carrying one
    flagged = [model for model in modules if getattr(model, "_hf_peft_config_loaded", False)]
    try:
        for parent, child, layer in swapped:
            setattr(parent, child, layer.get_base_layer())
        for model in flagged:
            model._hf_peft_config_loaded = False
        yield
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)
        for model in flagged:
            model._hf_peft_config_loaded = True


def model_card(pipe: Any) -> str:
    """README.md of a saved pipeline: base model, CustomShift config, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    base = getattr(pipe.config, "_name_or_path", None) or None
    data = ModelCardData(library_name="diffusers", base_model=base if isinstance(base, str) else None,
                         pipeline_tag="text-to-image", tags=["customshift", "stable-diffusion-3", "subject-driven"])
    config = json.dumps(pipe.customshift_config.to_dict(), indent=2, sort_keys=True)
    body = (
        "# CustomShift pipeline\n\nA Stable Diffusion 3 pipeline with CustomShift weights (tuning-free subject-driven "
        f"generation).\n\n* Base model: `{base}` (fingerprint `{pipe.base_fingerprint}`)\n"
        f"* CustomShift weights: `{WEIGHTS_SUBFOLDER}/` (fingerprint `{pipe.weights_fingerprint}`)\n\n"
        "## Load\n\n```python\nfrom customshift import CustomShiftPipeline\n\n"
        "pipe = CustomShiftPipeline.from_pretrained(\"THIS_REPO_OR_FOLDER\")  # CustomShift weights included\n"
        "dog = pipe.encode_subject(\"dog.jpg\", \"dog\")\nimage = pipe(\"a dog on the beach\", subject=dog).images[0]\n"
        "```\n\nCommand line: `customshift generate --model THIS_REPO_OR_FOLDER --reference dog.jpg --subject dog "
        "--prompt \"a dog on the beach\" --out out`.\n\n## CustomShift config\n\n```json\n" + config + "\n```\n"
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


class CustomShiftLoaderMixin:
    """Load, save and share CustomShift weights; ``save_pretrained`` / ``from_pretrained`` carry them."""

    def customshift_state_dict(self) -> dict[str, Tensor]:
        """Everything CustomShift adds: the branch's LoRA, the shift parameters, the generation LoRA if any."""
        state = self.reference_branch.trainable_state_dict()
        if self.customshift_config.generation_lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(_base(self.transformer), adapter_name=GENERATION_ADAPTER)
            state.update({f"generation_lora.{k}": v for k, v in lora.items()})
        return state

    def add_generation_lora(self) -> None:
        """Add the optional generation-branch LoRA of ``customshift_config`` (once)."""
        from .reference import make_lora_config

        transformer = _base(self.transformer)
        if GENERATION_ADAPTER not in (getattr(transformer, "peft_config", None) or {}):
            config = self.customshift_config
            transformer.add_adapter(make_lora_config(config, config.generation_lora_rank), GENERATION_ADAPTER)

    def save_customshift(
        self, save_directory: str | Path, extra: dict[str, Any] | None = None, weight_name: str = WEIGHTS_NAME
    ) -> Path:
        """Write the CustomShift weights and their manifest (``weight_name`` and its ``.json``) to a folder."""
        from .io import atomic_save_safetensors, atomic_write_json

        folder = Path(save_directory)
        plain_file_name(weight_name, "weight_name")
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.customshift_state_dict().items()}
        atomic_save_safetensors(state, folder / weight_name, metadata={"format": WEIGHTS_FORMAT})
        base = getattr(self.config, "_name_or_path", None)
        atomic_write_json(folder / manifest_name(weight_name), {
            "format": WEIGHTS_FORMAT,
            "base_fingerprint": self.base_fingerprint,
            "base_model": base if isinstance(base, str) else None,
            "config": self.customshift_config.to_dict(),
            "weights": weight_name,
            "weights_sha256": file_sha256(folder / weight_name),
            "extra": extra or {},
        })
        return folder

    def load_customshift(
        self,
        path_or_repo: str | Path,
        *,
        subfolder: str | None = None,
        weight_name: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
        check_base: bool = True,
    ) -> None:
        """Load CustomShift weights from a folder, a pipeline folder (its ``customshift/``) or a hub repository.

        Everything is checked before the pipeline changes: the manifest's fields and config, the weights file
        (a regular file of the size its header gives, the recorded sha256, exactly the expected tensors) and
        the base-model fingerprint (``check_base=False`` skips that one).
        """
        from safetensors.torch import load_file

        from .reference import ReferenceBranch, tensors_fingerprint

        hub = {"revision": revision, "cache_dir": cache_dir, "token": token, "force_download": force_download}
        if local_files_only is not None:
            hub["local_files_only"] = local_files_only
        weights_path, manifest = locate_weights(path_or_repo, subfolder, weight_name or WEIGHTS_NAME, **hub)
        if check_base and manifest["base_fingerprint"] != self.base_fingerprint:
            raise IncompatibleWeightsError(
                f"{path_or_repo}: these CustomShift weights were made for another base model "
                f"(fingerprint {manifest['base_fingerprint']}, this model is {self.base_fingerprint}; "
                f"base model recorded: {manifest.get('base_model')!r}). Load the matching base model."
            )
        check_safetensors_file(weights_path)
        if file_sha256(weights_path) != manifest["weights_sha256"]:
            raise IncompatibleWeightsError(f"{weights_path}: checksum mismatch; the file is corrupt or was replaced")
        config: CustomShiftConfig = manifest["config"]
        state = load_file(str(weights_path))
        expected = ReferenceBranch(self.transformer, config).trainable_state_dict()
        found = {k: v for k, v in state.items() if not k.startswith("generation_lora.")}
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = [k for k in expected if k in found and found[k].shape != expected[k].shape]
        if missing or unexpected or wrong or (config.generation_lora_rank > 0) != (len(found) < len(state)):
            raise WeightsError(
                f"{weights_path}: tensors do not match the manifest's config (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
            )
        branch = self.set_customshift_config(config)
        branch.load_trainable_state_dict(state)
        if config.generation_lora_rank > 0:
            self._load_generation_lora(state, weights_path)
        branch.to(self._execution_device)  # transformer.device is meta under sequential offload
        pristine = config.lora_rank == 0 and config.generation_lora_rank == 0 and all(
            torch.equal(state[k].float(), v.float()) for k, v in expected.items())
        self._weights_fingerprint = TRAINING_FREE if pristine else tensors_fingerprint(self.customshift_state_dict())

    def _load_generation_lora(self, state: dict[str, Tensor], where: Path) -> None:
        from peft.utils import set_peft_model_state_dict

        self.add_generation_lora()
        prefix = "generation_lora."
        lora = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            result = set_peft_model_state_dict(_base(self.transformer), lora, adapter_name=GENERATION_ADAPTER)
        except (RuntimeError, ValueError) as error:
            raise WeightsError(f"{where}: generation LoRA does not fit this model ({error})") from None
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and GENERATION_ADAPTER in k]
        if getattr(result, "unexpected_keys", []) or missing:
            raise WeightsError(f"{where}: generation LoRA tensors missing or unexpected ({(missing or [''])[0]})")

    # ------------------------------------------------------------------------------------------------------
    # diffusers' own idioms, carrying the weights

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, push_to_hub: bool = False,
                        **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, plus ``customshift/`` weights, a model card and the pipeline shim."""
        hub = {k: kwargs.pop(k) for k in ("commit_message", "private", "create_pr", "token", "repo_id") if k in kwargs}
        modules = [_base(c) for c in self.components.values() if isinstance(c, torch.nn.Module)]
        with plain_layers(modules):
            super().save_pretrained(save_directory, *args, push_to_hub=False, **kwargs)
        folder = Path(save_directory)
        self.save_customshift(folder / WEIGHTS_SUBFOLDER)
        (folder / "README.md").write_text(model_card(self), encoding="utf-8")
        (folder / PIPELINE_SHIM).write_text(PIPELINE_SHIM_SOURCE, encoding="utf-8")
        if push_to_hub:
            repo_id = create_repo(hub.get("repo_id", folder.name), exist_ok=True, private=hub.get("private"),
                                  token=hub.get("token")).repo_id
            self._upload_folder(str(folder), repo_id, token=hub.get("token"),
                                commit_message=hub.get("commit_message"), create_pr=hub.get("create_pr", False))

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None) -> str:
        """Upload the pipeline with its CustomShift weights and model card (what ``save_pretrained`` writes)."""
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message,
                                       create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained``, then the folder's (or repository's) ``customshift/`` weights if any.

        ``load_customshift=False`` skips them (training-free).
        """
        from .console import quiet_loading_bars

        quiet_loading_bars()  # the CLI's quiet mode (customshift/console.py); a no-op otherwise
        bundled = kwargs.pop("load_customshift", True)
        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        skip = _LOADING.set(True)  # register_to_config below must not load them a second time
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            _LOADING.reset(skip)
        if bundled:
            try:
                pipe.load_customshift(pretrained_model_name_or_path, subfolder=WEIGHTS_SUBFOLDER, **hub)
            except WeightsNotFoundError as error:
                if not Path(pretrained_model_name_or_path).is_dir():
                    logger.info("no CustomShift weights in %s (%s)", pretrained_model_name_or_path, error)
        return pipe

    def register_to_config(self, **kwargs: Any) -> None:
        """diffusers' hook; ``DiffusionPipeline.from_pretrained(folder)`` (custom_pipeline route) ends by
        recording ``_name_or_path`` here, the one point where it hands us the folder: load its weights."""
        super().register_to_config(**kwargs)
        source = kwargs.get("_name_or_path")
        if source is None or _LOADING.get() or getattr(self, "_weights_fingerprint", None) != TRAINING_FREE:
            return
        if (Path(source) / WEIGHTS_SUBFOLDER / MANIFEST_NAME).is_file():
            self.load_customshift(source, subfolder=WEIGHTS_SUBFOLDER)

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> Any:
        """diffusers' ``from_pipe``; from another CustomShift pipeline, its weights come along (shared)."""
        pipe = super().from_pipe(pipeline, **kwargs)
        if isinstance(pipeline, CustomShiftLoaderMixin) and pipe.transformer is pipeline.transformer:
            pipe.customshift_config = pipeline.customshift_config
            pipe.reference_branch = pipeline.reference_branch
            pipe._base_fingerprint = pipeline._base_fingerprint
            pipe._weights_fingerprint = pipeline._weights_fingerprint
        return pipe
