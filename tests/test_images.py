"""Tests of customshift.images: every fixture is built in code, nothing is committed."""

from __future__ import annotations

import faulthandler
import io
import os
import signal
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from customshift.errors import ImageLoadError
from customshift.images import load_image, load_images, prepare_reference

# ----------------------------------------------------------------------------------------------------
# Helpers


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims ``width`` x ``height`` (8-bit gray)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[:, :, 0] if channels == 1 else array)


def px(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(c) for c in image.getpixel(xy))  # type: ignore[union-attr]


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(actual, expected, strict=True))


def open_fds_to(path: Path) -> list[str]:
    fd_dir = Path("/proc/self/fd")
    found = []
    for entry in fd_dir.iterdir():
        try:
            if os.readlink(entry) == str(path):
                found.append(entry.name)
        except OSError:
            continue
    return found


def refused(source: object, *needles: str, **kwargs: object) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle.lower() in message.lower(), message
    return message


# ----------------------------------------------------------------------------------------------------
# Accepted inputs


def test_plain_rgb_png_from_path_is_loaded_and_file_closed(tmp_path: Path) -> None:
    source = noise(20, 12)
    path = write(tmp_path, "a.png", encode(source, "PNG"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 12)
    assert np.array_equal(np.asarray(image), np.asarray(source))
    assert image.info == {}
    if Path("/proc/self/fd").is_dir():
        assert open_fds_to(path.resolve()) == []
    assert load_image(str(path)).size == (20, 12)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_rgba_is_composited_on_white_by_default(tmp_path: Path) -> None:
    array = np.zeros((10, 10, 4), dtype=np.uint8)
    array[:, :] = (255, 0, 0, 0)  # fully transparent red
    array[0, 1] = (0, 0, 0, 255)  # opaque black
    array[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = write(tmp_path, "rgba.png", encode(Image.fromarray(array), "PNG"))
    image = load_image(path)
    assert image.mode == "RGB"
    assert px(image, (0, 0)) == (255, 255, 255)
    assert px(image, (1, 0)) == (0, 0, 0)
    assert close_to(px(image, (2, 0)), (127, 127, 127), 2)
    on_green = load_image(path, background=(0, 255, 0))
    assert px(on_green, (0, 0)) == (0, 255, 0)


def test_la_is_composited() -> None:
    image = Image.new("LA", (10, 10), (0, 0))
    assert px(load_image(encode(image, "PNG")), (5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(tmp_path: Path, fmt: str) -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, 5, 10))  # left half blue, right half red (transparent)
    path = write(tmp_path, f"p.{fmt.lower()}", encode(image, fmt, transparency=0))
    loaded = load_image(path)
    assert px(loaded, (1, 1)) == (0, 0, 255)
    assert px(loaded, (8, 8)) == (255, 255, 255)


def test_palette_without_transparency() -> None:
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    assert px(load_image(encode(image, "PNG")), (3, 3)) == (10, 200, 30)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    array = np.zeros((8, 8), dtype=np.uint16)
    array[0, :4] = [0, 257, 32768, 65535]
    array[1, :] = np.linspace(0, 65535, 8).astype(np.uint16)
    source = Image.fromarray(array)
    assert source.mode == "I;16"
    path = write(tmp_path, "g16.png", encode(source, "PNG"))
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.dtype == np.uint8
    assert list(out[0, :4, 0]) == [0, 1, 128, 255]
    assert np.all(np.diff(out[1, :, 0].astype(int)) > 0)  # the gradient survives
    assert np.array_equal(out[..., 0], out[..., 2])


def test_32bit_int_image_from_16bit_ppm() -> None:
    array = np.array([[0, 32768, 65535] + [0] * 5] * 8, dtype=np.uint16)
    data = encode(Image.fromarray(array), "PPM")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert list(np.asarray(load_image(data))[0, :3, 0]) == [0, 128, 255]


def test_float_image() -> None:
    array = np.tile(np.array([0.0, 0.5, 1.0, np.nan], dtype=np.float32), (8, 2))
    out = np.asarray(load_image(Image.fromarray(array, mode="F")))
    assert list(out[0, :4, 0]) == [0, 128, 255, 0]


def test_cmyk_jpeg_colour_is_roughly_right(tmp_path: Path) -> None:
    red = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    path = write(tmp_path, "cmyk.jpg", encode(red, "JPEG", quality=95))
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    assert close_to(px(image, (16, 16)), (255, 0, 0), 30)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # marker at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = write(tmp_path, f"rot{orientation}.jpg", encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    image = load_image(path)
    assert image.size == (20, 40)
    # 6: rotate 90 degrees clockwise to view, so the stored top-left lands top-right;
    # 8: rotate 90 degrees counter-clockwise, so it lands bottom-left.
    marker = (17, 2) if orientation == 6 else (2, 37)
    assert close_to(px(image, marker), (255, 0, 0), 40)
    assert close_to(px(image, (2, 2) if orientation == 6 else (17, 2)), (0, 0, 255), 40)


def test_broken_exif_is_ignored() -> None:
    data = encode(Image.new("RGB", (16, 16), (0, 200, 0)), "JPEG", exif=b"Exif\x00\x00garbage-garbage")
    assert close_to(px(load_image(data), (8, 8)), (0, 200, 0), 10)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_and_bilevel(mode: str) -> None:
    image = Image.new(mode, (12, 12), 0)
    image.paste(255, (0, 0, 6, 12))
    loaded = load_image(encode(image, "PNG"))
    assert loaded.mode == "RGB"
    assert px(loaded, (1, 1)) == (255, 255, 255)
    assert px(loaded, (10, 1)) == (0, 0, 0)


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    assert close_to(px(load_image(path), (8, 8)), (255, 0, 0), 5)


def test_other_formats_load() -> None:
    source = Image.new("RGB", (16, 16), (40, 80, 120))
    for fmt in ["BMP", "TIFF", "WEBP", "PPM"]:
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        assert close_to(px(load_image(encode(source, fmt, **kwargs)), (5, 5)), (40, 80, 120), 2), fmt


def test_bytes_file_object_and_buffers() -> None:
    data = encode(Image.new("RGB", (16, 10), (1, 2, 3)), "PNG")
    for source in (data, bytearray(data), memoryview(data)):
        assert load_image(source).size == (16, 10)
    handle = io.BytesIO(b"junk" + data)
    handle.seek(4)
    assert load_image(handle).size == (16, 10)
    assert not handle.closed


def test_numpy_inputs() -> None:
    gray = np.full((10, 12), 7, dtype=np.uint8)
    assert px(load_image(gray), (0, 0)) == (7, 7, 7)
    assert load_image(gray[:, :, None]).size == (12, 10)
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    assert px(load_image(rgb), (11, 9)) == (0, 200, 0)
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    assert px(load_image(rgba), (0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((12, 10, 3), dtype=np.uint8)[:, ::-1]).size == (10, 12)  # non-contiguous


def test_pil_input_is_not_modified() -> None:
    source = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    out = load_image(source)
    assert out is not source and source.mode == "RGBA" and out.mode == "RGB"
    rgb = Image.new("RGB", (10, 10))
    assert load_image(rgb) is not rgb


def test_load_images() -> None:
    images = load_images([np.zeros((8, 8), dtype=np.uint8), encode(Image.new("RGB", (9, 9)), "PNG")])
    assert [im.size for im in images] == [(8, 8), (9, 9)]


# ----------------------------------------------------------------------------------------------------
# Refusals


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    refused(path, str(path), "no such file")


def test_directory(tmp_path: Path) -> None:
    refused(tmp_path, str(tmp_path), "directory")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.png", b"")
    refused(path, str(path), "empty")
    refused(b"", "0 bytes")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    refused(path, "not a regular file")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    data = encode(noise(64, 64), fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2])
    refused(path, str(path), "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.png", b"hello, this is not an image\n" * 10)
    refused(path, str(path), "not a recognised image")


def test_heic_gets_a_specific_message() -> None:
    refused(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 64, "HEIC")


@pytest.mark.parametrize(
    ("width", "height"),
    [(100_000, 100_000), (10_000, 10_000), (9_000, 9_000)],  # PIL error, PIL warning, our own limit
)
def test_decompression_bomb_refused_before_decoding(tmp_path: Path, width: int, height: int) -> None:
    path = write(tmp_path, "bomb.png", png_with_header_size(width, height))
    assert path.stat().st_size < 200
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused(path, str(path), "pixels")
    assert time.monotonic() - start < 1.0
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's global is left alone


def test_max_pixels_argument() -> None:
    refused(encode(Image.new("RGB", (40, 40)), "PNG"), "1,600 pixels", max_pixels=1000)


def test_too_small() -> None:
    refused(encode(Image.new("RGB", (4, 4)), "PNG"), "4x4", "shorter than 8")
    refused(np.zeros((4, 100), dtype=np.uint8), "shorter")


def test_too_long_side(tmp_path: Path) -> None:
    path = write(tmp_path, "long.png", png_with_header_size(20_000, 8))
    refused(path, "longer than 16384")
    refused(encode(Image.new("RGB", (64, 16)), "PNG"), "longer than 32", max_side=32)


def test_bad_inputs() -> None:
    refused(np.zeros((10, 10), dtype=np.float32), "uint8")
    refused(np.zeros((10, 10, 2), dtype=np.uint8), "shape")
    refused(io.StringIO("text"), "binary mode")
    refused(12345, "int")
    refused("", "empty")


def test_bad_arguments_are_value_errors() -> None:
    data = encode(Image.new("RGB", (10, 10)), "PNG")
    with pytest.raises(ValueError):
        load_image(data, background=(0, 0))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_image(data, max_pixels=0)


# ----------------------------------------------------------------------------------------------------
# prepare_reference


@pytest.mark.parametrize(
    ("size", "target"), [((200, 100), (64, 64)), ((100, 200), (48, 96)), ((30, 30), (64, 32))]
)
def test_prepare_reference_exact_size_and_centre_crop(size: tuple[int, int], target: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (255, 0, 0))
    width, height = size
    half = (width // 2, 0, width, height) if width >= height else (0, height // 2, width, height)
    image.paste((0, 0, 255), half)
    out = prepare_reference(image, height=target[1], width=target[0])
    assert out.size == target and out.mode == "RGB"
    if width > height:  # centre crop keeps both halves, not stretched
        assert close_to(px(out, (0, target[1] // 2)), (255, 0, 0), 10)
        assert close_to(px(out, (target[0] - 1, target[1] // 2)), (0, 0, 255), 10)


def test_prepare_reference_aspect_is_preserved() -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (90, 40, 110, 60))  # a 20x20 white square in the centre
    out = np.asarray(prepare_reference(image, height=50, width=50))
    rows = np.where(out[:, 25, 0] > 128)[0]
    cols = np.where(out[25, :, 0] > 128)[0]
    assert abs(len(rows) - len(cols)) <= 1  # still a square


def test_prepare_reference_composites_alpha_and_checks_args() -> None:
    out = prepare_reference(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), 16, 16)
    assert px(out, (8, 8)) == (255, 255, 255)
    with pytest.raises(ValueError):
        prepare_reference(Image.new("RGB", (20, 20)), 0, 16)


# ----------------------------------------------------------------------------------------------------
# Fuzzing


def _seeds() -> list[bytes]:
    rgb = noise(16, 12, seed=1)
    rgba = noise(12, 12, "RGBA", seed=2)
    palette = rgb.convert("P")
    frames = [noise(12, 10, seed=s).convert("P") for s in (3, 4)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    return [
        encode(rgb, "PNG"),
        encode(rgba, "PNG"),
        encode(palette, "PNG", transparency=0),
        encode(rgb, "JPEG", quality=80),
        encode(rgb, "JPEG", progressive=True),
        gif.getvalue(),
        encode(rgb, "BMP"),
        encode(rgba, "WEBP"),
        encode(rgb, "WEBP", lossless=True),
        encode(rgb, "TIFF"),
        encode(rgb, "TIFF", compression="tiff_deflate"),
        encode(Image.fromarray(np.arange(160, dtype=np.uint16).reshape(10, 16) * 400), "PNG"),
    ]


SEEDS = _seeds()
FUZZ_LIMITS = {"max_pixels": 1 << 20, "max_side": 4096, "min_side": 8}
_position = st.integers(min_value=0, max_value=1 << 20)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _position, st.integers(min_value=1, max_value=64)),
    st.tuples(st.just("truncate"), _position, st.none()),
)


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    out = bytearray(data)
    for kind, position, arg in mutations:
        at = position % (len(out) + 1)
        if kind == "flip" and out:
            at %= len(out)
            out[at] ^= int(arg)  # type: ignore[call-overload]
        elif kind == "insert":
            out[at:at] = arg  # type: ignore[assignment]
        elif kind == "delete":
            del out[at : at + int(arg)]  # type: ignore[call-overload]
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so load_image cannot turn it into ImageLoadError."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Hang("load_image took more than 5 s")


@pytest.fixture
def hang_guard():
    """A per-call Python-level alarm, plus a hard process dump in case a C decoder never returns."""
    if not hasattr(signal, "setitimer"):
        pytest.skip("needs signal.setitimer")
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_seeds_are_valid() -> None:
    for data in SEEDS:
        assert load_image(data, **FUZZ_LIMITS).mode == "RGB"


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(min_value=0, max_value=len(SEEDS) - 1),
    mutations=st.lists(MUTATION, min_size=1, max_size=4),
)
def test_fuzz_mutated_images_load_or_raise_image_load_error(
    hang_guard: None, seed: int, mutations: list[tuple[str, int, object]]
) -> None:
    data = mutate(SEEDS[seed], mutations)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        image = load_image(data, **FUZZ_LIMITS)
    except ImageLoadError as exc:
        assert "\n" not in str(exc)
        return
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    assert image.mode == "RGB"
    width, height = image.size
    assert 8 <= min(width, height) and max(width, height) <= 4096 and width * height <= 1 << 20
    image.tobytes()  # fully decoded: no lazy file behind it


def test_concurrent_loads_leave_warning_filters_alone() -> None:
    from concurrent.futures import ThreadPoolExecutor

    before = list(warnings.filters)
    sources = [encode(noise(32, 32, seed=s), "PNG") for s in range(4)] + [png_with_header_size(9000, 9000)]

    def attempt(data: bytes) -> str:
        try:
            return load_image(data).mode
        except ImageLoadError:
            return "refused"

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, sources * 5))
    assert results.count("refused") == 5 and results.count("RGB") == 20
    assert warnings.filters == before
