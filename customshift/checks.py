"""Checks of what the user handed the CLI, run before the model loads (docs/reliability.md, round 2).

Everything here is cheap (a stat, a JSON config read) so that a bad number, path or device is one
``error:`` line in a second, before minutes of loading and before any output folder is created.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import CustomShiftError

MAX_SEED = 2**64  # torch.Generator.manual_seed takes [0, 2^64)
MAX_STEPS = 1000  # SD3's scheduler has 1000 training timesteps: more steps repeat timesteps
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def describe_missing(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a readable regular file (a loop, a folder, a dangling link...), or None if it is one."""
    path = Path(path)
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop"
        if path.is_symlink():
            return f"{path} is a broken symbolic link (to {os.readlink(path)})"
        if error.errno == errno.EACCES:
            return f"{path} cannot be read (permission denied)"
        if error.errno == errno.ENOTDIR:
            return f"{path} not found (a part of the path is a file, not a folder)"
        return f"{path} not found"
    if path.is_dir():
        return f"{path} is a directory; give an image file inside it"
    if not path.is_file():
        return f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{path} cannot be read (permission denied)"
    return None


def check_reference(path: str | os.PathLike[str]) -> None:
    """A reference the CLI can read: a regular file, with a message that says what it is otherwise, and
    an image the project's loader decodes (a few references, decoded once more before the model loads, so
    that a bad one is refused before any output folder exists)."""
    problem = describe_missing(path)
    if problem is not None:
        raise CustomShiftError(f"reference {problem}")
    if Path(path).suffix.lower() != ".safetensors":  # embeddings are checked by their own loader
        from .images import load_image

        load_image(path)


def check_out_folder(out: str | os.PathLike[str], option: str = "--out") -> None:
    """``--out`` must be a folder we can create or write into (not a file, not read-only)."""
    _check_writable(Path(out), option)


def check_out_file(out: str | os.PathLike[str], option: str = "--out") -> None:
    """``--out`` must be a file path whose folder we can create or write into."""
    out = Path(out)
    if out.is_dir():
        raise CustomShiftError(f"{option} {out} is a directory; give a file path")
    _check_writable(out.parent, option, shown=out)


def _check_writable(folder: Path, option: str, *, shown: Path | None = None) -> None:
    shown = shown or folder
    probe = folder
    while True:  # the nearest part of the path that exists decides
        try:
            os.stat(probe)
        except (FileNotFoundError, NotADirectoryError):
            if probe.parent == probe:
                break
            probe = probe.parent
            continue
        except OSError as error:
            raise CustomShiftError(f"{option} {shown}: {error.strerror}") from None
        if not os.path.isdir(probe):
            what = "is an existing file" if probe == folder else f"is inside {probe}, which is a file"
            raise CustomShiftError(f"{option} {shown} {what}; give a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise CustomShiftError(f"{option} {shown}: cannot write into {probe} (permission denied)")
        return


def check_device(device: str | None) -> None:
    """``--device``: a torch device name this machine has (cuda without CUDA is an error, not a traceback)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CustomShiftError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CustomShiftError(f"--device {device}: CUDA is not available on this machine (torch "
                                   f"{torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CustomShiftError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CustomShiftError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        raise CustomShiftError(f"--device {device}: unsupported device type {parsed.type!r}; use cpu, cuda or mps")


def check_seed(seed: object, where: str = "--seed") -> int:
    """A seed torch accepts: an integer (not a bool) in [0, 2^64)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CustomShiftError(f"{where} must be an integer, got {seed!r}")
    if not 0 <= seed < MAX_SEED:
        raise CustomShiftError(f"{where} must be in [0, 2^64), got {seed}")
    return seed


def model_geometry(source: str | os.PathLike[str]) -> tuple[int, int | None] | None:
    """(size multiple, largest side) of an SD3 pipeline folder from its config files, or None if unreadable.

    The largest side is what the positional embedding can place: ``pos_embed_max_size * patch_size *
    vae_scale_factor`` (None when the model has no such limit).
    """
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(source), "transformer/config.json")
        except Exception:  # not a hub id either: the loader reports it
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent.parent
    try:
        transformer = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        vae_factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        multiple = int(transformer.get("patch_size", 2)) * vae_factor
        max_positions = transformer.get("pos_embed_max_size")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return multiple, (int(max_positions) * multiple if max_positions else None)


def check_sizes(height: int | None, width: int | None, geometry: tuple[int, int | None] | None) -> None:
    """``--height``/``--width``: positive, a multiple of the model's patch in pixels, within what it can place."""
    for name, value in (("--height", height), ("--width", width)):
        if value is None:
            continue
        if value <= 0:
            raise CustomShiftError(f"{name} must be a positive number of pixels, got {value}")
        if geometry is None:
            continue
        multiple, largest = geometry
        if largest is not None and value > largest:
            raise CustomShiftError(f"{name} {value} is larger than this model can place ({largest} pixels: its "
                                   "positional embedding's size); use a smaller size")
        if value % multiple:
            raise CustomShiftError(f"{name} must be a multiple of {multiple} on this model, got {value} "
                                   f"(try {max(multiple, value - value % multiple)})")


def check_generation_numbers(*, steps: int, seed: int, num_images: int = 1, height: int | None = None,
                             width: int | None = None, geometry: tuple[int, int | None] | None = None,
                             floats: dict[str, float | None] | None = None) -> None:
    """Every number of ``customshift generate`` that would otherwise fail (or silently misbehave) mid-run."""
    if steps < 1:
        raise CustomShiftError(f"--steps must be at least 1, got {steps}")
    if steps > MAX_STEPS:
        raise CustomShiftError(f"--steps {steps} is more than the scheduler's {MAX_STEPS} timesteps")
    check_seed(seed)
    if seed + max(num_images, 1) - 1 >= MAX_SEED:
        raise CustomShiftError(f"--seed {seed} with --num-images {num_images} goes past 2^64 - 1")
    check_sizes(height, width, geometry)
    for name, value in (floats or {}).items():
        if value is None:
            continue
        if not math.isfinite(value):
            raise CustomShiftError(f"{name} must be a finite number, got {value}")
        if value < 0:
            raise CustomShiftError(f"{name} must not be negative, got {value}")


def check_texts(prompts: Sequence[str], subject: str | None) -> None:
    """Every prompt (and the subject) non-blank, so that a blank second prompt fails before the first image."""
    if subject is not None and not subject.strip():
        raise CustomShiftError("the subject name is empty; give --subject as the prompt says it")
    for number, prompt in enumerate(prompts, start=1):
        if not prompt.strip():
            raise CustomShiftError(f"the prompt is empty (--prompt number {number}); write what the image should show")


def safe_file_name(name: str) -> str:
    """``name`` as one file name that cannot leave its folder: kept when already safe, else slugged plus a hash."""
    import hashlib

    if _SAFE_NAME.match(name) and name not in (".", ".."):
        return name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:48] or "item"
    return f"{slug}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def inside(root: str | os.PathLike[str], relative: str | os.PathLike[str]) -> Path:
    """``root / relative``, refused when it would end up outside ``root`` (absolute, ``..``, links out)."""
    root_path = Path(root).resolve()
    target = (root_path / relative).resolve()
    if target != root_path and root_path not in target.parents:
        raise CustomShiftError(f"output path {str(relative)!r} would be written outside {root}; refused")
    return Path(root) / relative


def pipeline_geometry(pipe) -> tuple[int, int | None]:
    """:func:`model_geometry` of a loaded pipeline (for a hub model whose configs were not on disk before)."""
    config = pipe.transformer.config
    multiple = int(pipe.vae_scale_factor * config.patch_size)
    max_positions = getattr(config, "pos_embed_max_size", None)
    return multiple, (int(max_positions) * multiple if max_positions else None)


def subject_spellings(prompt: str, subject: str) -> list[str]:
    """The subject as given, then every other casing the prompt writes it in ("Robot" for "robot").

    CLIP's tokenizer lowercases and T5's does not: matching these spellings token by token makes both
    encoders find the subject in "a Robot on the beach".
    """
    found = [subject]
    if subject:
        for match in re.finditer(re.escape(subject), prompt, flags=re.IGNORECASE):
            if match.group(0) not in found:
                found.append(match.group(0))
    return found


def subject_missing_message(subject: str, prompt: str, limit: int = 80) -> str:
    """The warning for a prompt in which no encoder found the subject's tokens, with the prompt shortened."""
    shown = prompt if len(prompt) <= limit else f"{prompt[:limit - 1]}… ({len(prompt)} characters)"
    if subject and subject.lower() in prompt.lower():
        where = ("is written in the prompt %r only past the text encoders' token limit (truncated), or tokenized "
                 "differently there")
    else:
        where = "does not appear in the prompt %r"
    return (f"subject name %r {where}: the reference is applied with an unconditional shift (m_i = 1). Put the "
            "subject's name early in the prompt.") % (subject, shown)


def image_problem(path: str, seen: dict[str, str | None]) -> str | None:
    """Why the reference ``path`` cannot be decoded (the loader's message), or None; each path decoded once.

    Batch manifests repeat references across rows: ``seen`` keeps the answer per path.
    """
    if path not in seen:
        seen[path] = None
        if Path(path).suffix.lower() != ".safetensors":  # embeddings are checked by their own loader
            from .images import load_image

            try:
                load_image(path)
            except CustomShiftError as error:
                seen[path] = str(error)
    return seen[path]
