"""Tests of customshift.io: atomic writes survive exceptions, full disks and SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

import customshift.io as cio
from customshift.errors import CustomShiftError
from customshift.io import (
    atomic_path,
    atomic_save_image,
    atomic_save_safetensors,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    refuse_overwrite,
)

REPO = Path(__file__).resolve().parents[1]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as handle:
        handle.write(b"new ")
        assert list(tmp_path.glob("out.bin*")) == [path]  # the temp file is hidden from globs
        assert path.read_bytes() == b"old"  # readers still see the old file
        handle.write(b"content")
    assert path.read_bytes() == b"new content"
    assert leftovers(tmp_path) == []


def test_temp_name_is_hidden_and_in_same_directory(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    with atomic_write(path, "w") as handle:
        names = leftovers(tmp_path)
        assert len(names) == 1 and names[0].startswith(f".out.txt.tmp-{os.getpid()}-")
        handle.write("héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(path, "x")
    assert path.read_text() == "x"


def test_exception_mid_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as handle:
            handle.write(b"partial")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_exception_without_previous_file_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as handle:
            handle.write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_enospc_during_write_is_clear_error_and_old_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CustomShiftError, match="disk full") as info:
        with atomic_write(path) as handle:
            handle.write(b"some")
            raise full  # what handle.write raises when the disk fills up
    assert str(path) in str(info.value)
    assert info.value.__cause__ is full
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_enospc_during_fsync_is_clear_error_and_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.json"
    atomic_write_json(path, {"v": 1})

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cio.os, "fsync", no_space)
    with pytest.raises(CustomShiftError, match="disk full") as info:
        atomic_write_json(path, {"v": 2})
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert leftovers(tmp_path) == []


def test_other_os_errors_from_replace_become_custom_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.bin"

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cio.os, "replace", refuse)
    with pytest.raises(CustomShiftError, match="Permission denied"):
        atomic_write_bytes(path, b"x")
    assert list(tmp_path.iterdir()) == []


def test_directory_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CustomShiftError, match="directory"):
        atomic_write_bytes(tmp_path, b"x")


def test_permissions_follow_umask_or_existing_file(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    fresh = tmp_path / "fresh.bin"
    atomic_write_bytes(fresh, b"x")
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask
    private = tmp_path / "private.bin"
    private.write_bytes(b"old")
    private.chmod(0o600)
    atomic_write_bytes(private, b"new")
    assert private.stat().st_mode & 0o777 == 0o600


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "x", "ab"):
            pass


def test_atomic_write_json_format(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    obj = {"b": [1, 2], "a": {"z": "é", "y": None}}
    atomic_write_json(path, obj)
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert text.index('"a"') < text.index('"b"')
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == obj
    assert leftovers(tmp_path) == []


def test_atomic_path_for_libraries(tmp_path: Path) -> None:
    path = tmp_path / "lib.bin"
    with atomic_path(path) as temp:
        assert temp.parent == tmp_path and temp.exists()
        temp.write_bytes(b"library output")
    assert path.read_bytes() == b"library output"
    assert leftovers(tmp_path) == []


def test_atomic_save_image_png_with_text_and_jpeg(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    png = tmp_path / "out.png"
    atomic_save_image(image, png, pnginfo={"prompt": "a dog", "seed": "7"})
    with Image.open(png) as loaded:
        assert loaded.format == "PNG"
        assert loaded.text == {"prompt": "a dog", "seed": "7"}  # type: ignore[attr-defined]
    jpg = tmp_path / "out.jpg"
    atomic_save_image(image, jpg, quality=90)
    with Image.open(jpg) as loaded:
        assert loaded.format == "JPEG"
    bare = tmp_path / "noext"
    atomic_save_image(image, bare)
    with Image.open(bare) as loaded:
        assert loaded.format == "PNG"
    with pytest.raises(CustomShiftError, match="unknown image extension"):
        atomic_save_image(image, tmp_path / "out.xyz")
    with pytest.raises(ValueError, match="pnginfo"):
        atomic_save_image(image, jpg, pnginfo={"a": "b"})
    assert leftovers(tmp_path) == []


def test_atomic_save_safetensors_roundtrip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = tmp_path / "w" / "weights.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    atomic_save_safetensors(tensors, path, metadata={"format_version": "1"})
    loaded = load_file(path)
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format_version": "1"}
    with pytest.raises(TypeError):
        atomic_save_safetensors(tensors, path, metadata={"n": 1})  # type: ignore[dict-item]
    assert leftovers(path.parent) == []


def test_atomic_save_safetensors_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    import safetensors.torch

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"old")

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", no_space)
    with pytest.raises(CustomShiftError, match="disk full"):
        atomic_save_safetensors({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_refuse_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    refuse_overwrite(path, overwrite=False)  # missing: fine
    path.write_bytes(b"x")
    with pytest.raises(CustomShiftError, match="exists; pass --overwrite to replace it"):
        refuse_overwrite(path, overwrite=False)
    refuse_overwrite(path, overwrite=True)


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from customshift.io import atomic_write

    with atomic_write(sys.argv[1]) as handle:
        for _ in range(400):
            handle.write(b"n" * 65536)
            handle.flush()
            time.sleep(0.02)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("had_old_file", [True, False])
def test_sigkill_mid_write_never_leaves_partial_file(tmp_path: Path, had_old_file: bool) -> None:
    path = tmp_path / "big.bin"
    old = b"old complete content\n" * 100
    if had_old_file:
        path.write_bytes(old)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            temps = [tmp_path / name for name in leftovers(tmp_path)]
            if temps and temps[0].stat().st_size >= 3 * 65536:
                break
            assert child.poll() is None, "the writer exited before it was killed"
            time.sleep(0.01)
        else:
            pytest.fail("the writer never got going")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    if had_old_file:
        assert path.read_bytes() == old
    else:
        assert not path.exists()
    # The only trace is the hidden temp file, which no glob for the output matches.
    assert list(tmp_path.glob("big.bin*")) == ([path] if had_old_file else [])
