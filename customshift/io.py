"""Atomic file writes: a crash, a kill or a full disk never leaves a half-written output behind.

Every output (images, JSON reports, safetensors weights, manifests) is written to a hidden temporary
file in the destination directory, flushed and fsynced, then renamed over the final path with
``os.replace`` (atomic on POSIX and Windows), and the directory is fsynced so the rename survives a
power cut. Readers therefore see either the old complete file or the new complete file.

The temporary name is ``.{name}.tmp-{pid}-{random}``: hidden, so a glob for the final name (or ``*``)
does not match it. A process killed with SIGKILL can leave such a file behind, never a partial
final file.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import CustomShiftError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "atomic_path",
    "atomic_save_image",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "refuse_overwrite",
    "remove_stale_temps",
]

_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def refuse_overwrite(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse to clobber an existing output unless the user asked for it (``--overwrite``)."""
    target = Path(path)
    if not overwrite and (target.exists() or target.is_symlink()):
        raise CustomShiftError(f"{target} exists; pass --overwrite to replace it")


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def _write_error(path: Path, exc: BaseException) -> CustomShiftError:
    if _is_disk_full(exc):
        return CustomShiftError(
            f"could not write {path}: disk full (or quota exceeded); free some space and retry "
            "(the previous file, if any, is unchanged)"
        )
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
    return CustomShiftError(f"could not write {path}: {detail} (the previous file, if any, is unchanged)")


def _create_temp(final: Path) -> tuple[int, Path]:
    """Create the hidden temp file exclusively; mode 0o666 lets the umask decide, like a plain open."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not find a free temporary name", str(final.parent))


def fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort, since some filesystems (and Windows) cannot."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed onto ``path``.

    For libraries that insist on a file name (safetensors, ``torch.save``...). The temp file exists
    (empty) when yielded. On any exception it is removed and ``path`` is untouched; an ``OSError``
    from our own steps, or a full disk anywhere, becomes a :class:`CustomShiftError` chained from it.
    """
    final = Path(path)
    if final.is_dir():
        raise CustomShiftError(f"could not write {final}: it is a directory; give a file path")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = _create_temp(final)
        os.close(fd)
    except OSError as exc:
        raise _write_error(final, exc) from exc
    try:
        try:
            yield temp
        except BaseException as exc:
            if not isinstance(exc, CustomShiftError) and _is_disk_full(exc):
                raise _write_error(final, exc) from exc
            raise
        try:
            with open(temp, "rb+") as handle:
                os.fsync(handle.fileno())
            _copy_mode(final, temp)
            os.replace(temp, final)
        except OSError as exc:
            raise _write_error(final, exc) from exc
    except BaseException:
        _remove_quietly(temp)
        raise
    fsync_dir(final.parent)


def _copy_mode(final: Path, temp: Path) -> None:
    """Replacing a file keeps its permissions, as writing it in place would."""
    try:
        mode = os.stat(final).st_mode
    except OSError:
        return
    os.chmod(temp, mode & 0o7777)


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temp file next to ``path`` for writing; on clean exit flush, fsync and rename it over ``path``.

    ``mode`` is ``"wb"`` (binary) or ``"w"``/``"wt"`` (text, ``encoding``). A missing parent directory
    is created. On any exception the temp file is removed and ``path`` keeps its old content; a full
    disk raises :class:`CustomShiftError` ("could not write ...: disk full ...") chained from the
    ``OSError``.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_write mode must be 'wb', 'w' or 'wt', got {mode!r}")
    final = Path(path)
    with atomic_path(final) as temp:
        try:
            handle = open(temp, mode) if "b" in mode else open(temp, mode, encoding=encoding)
        except OSError as exc:
            raise _write_error(final, exc) from exc
        with handle:
            yield handle
            try:
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                raise _write_error(final, exc) from exc


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (``\\n`` newlines kept as is)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys, trailing newline) so diffs between runs stay small.

    Serialisation happens before anything is written, so an unserialisable object raises
    ``TypeError`` without touching ``path``.
    """
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)


def atomic_save_image(
    image: Image.Image,
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    pnginfo: Mapping[str, str] | None = None,
    **save_kwargs: Any,
) -> None:
    """Save ``image`` atomically; the format comes from ``format``, else the extension, else PNG.

    ``pnginfo`` adds PNG text chunks (prompt, seed, ...); it is only valid for PNG. Extra keyword
    arguments go to ``Image.save`` (``quality=95`` for JPEG, ...).
    """
    from PIL import Image, PngImagePlugin

    final = Path(path)
    if format is None:
        suffix = final.suffix.lower()
        if not suffix:
            format = "PNG"
        else:
            format = Image.registered_extensions().get(suffix)
            if format is None:
                raise CustomShiftError(
                    f"could not write {final}: unknown image extension {suffix!r}; use .png, .jpg or .webp"
                )
    format = format.upper()
    if pnginfo:
        if format != "PNG":
            raise ValueError(f"pnginfo is only valid for PNG, not {format}")
        info = PngImagePlugin.PngInfo()
        for key, value in pnginfo.items():
            info.add_text(str(key), str(value))
        save_kwargs["pnginfo"] = info
    with atomic_write(final, "wb") as handle:
        image.save(handle, format=format, **save_kwargs)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save ``tensors`` as a safetensors file atomically, through this module's own temp file.

    Serialised in memory first: ``safetensors.torch.save_file`` writes its own hidden ``.tmpXXXXXX``
    file (mode 0600, which it renames over the target, and which a SIGKILL leaves behind), so going
    through our temp file is what keeps the umask and the cleanup of :func:`remove_stale_temps`.
    Tensors must be contiguous and must not share memory (safetensors' own rules, which raise
    ``ValueError``); metadata keys and values must be ``str``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save

    final = Path(path)
    meta = dict(metadata) if metadata is not None else None
    if meta is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("safetensors metadata keys and values must all be str")
    with atomic_write(final, "wb") as handle:
        try:
            handle.write(save(dict(tensors), metadata=meta))
        except (SafetensorError, OSError) as exc:
            raise _write_error(final, exc) from exc


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden temp files a killed writer of ``path`` left beside it; returns what was removed.

    Only ``.{name}.tmp-{pid}-*`` files whose process is gone: a live writer's temp file is kept.
    """
    final = Path(path)
    removed = []
    try:
        candidates = list(final.parent.glob(f".{glob.escape(final.name)}.tmp-*"))
    except OSError:
        return removed
    for temp in candidates:
        pid = temp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        _remove_quietly(temp)
        removed.append(temp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in chunks (references in sidecars, weights in manifests)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
