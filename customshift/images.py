"""The one way CustomShift reads an image.

Every entry point (CLI, pipeline, trainer, evaluator, web UI) loads user images through
:func:`load_image`, so every one of them gets the same behaviour: any common format and mode comes
out as a fully loaded 8-bit RGB image in its upright orientation, and anything unusable (missing,
empty, truncated, not an image, a decompression bomb, absurd dimensions) is refused with one
:class:`~customshift.errors.ImageLoadError` whose one-line message names the file and says what to do.

Nothing here changes PIL's global settings: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off (so a
truncated file is an error, not a grey band) and ``Image.MAX_IMAGE_PIXELS`` is left alone (our own
``max_pixels`` is checked against the header before any pixel is decoded).
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, TypeAlias

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "DEFAULT_MIN_SIDE",
    "ImageSource",
    "load_image",
    "load_images",
    "make_grid",
    "prepare_reference",
]

#: Default pixel budget: 64 MP covers any phone or DSLR photo (a 48 MP phone shot is 8064x6048)
#: yet stays below PIL's own bomb threshold (~89 MP), and an RGB copy of it is ~190 MB.
DEFAULT_MAX_PIXELS = 64_000_000
#: Default longest accepted side; longer sides are panoramas or crafted headers, not references.
DEFAULT_MAX_SIDE = 16384
#: Default shortest accepted side; anything smaller is an icon, a tracking pixel or a broken header.
DEFAULT_MIN_SIDE = 8
#: Transparent pixels are composited on white: what an image viewer shows and what a product shot's
#: background usually is.
DEFAULT_BACKGROUND = (255, 255, 255)

#: Formats we are willing to decode. Restricting the list keeps PIL's rarer (and less hardened)
#: plugins, and formats without a magic number such as TGA, away from untrusted uploads.
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "WEBP", "TIFF", "PPM", "AVIF", "JPEG2000")

ImageSource: TypeAlias = (
    "str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Image.Image | np.ndarray"
)

_HINT_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# ``warnings.catch_warnings`` swaps process-wide state; serialise our own uses of it. Only the header
# parse runs under the lock, so concurrent loads still decode in parallel.
_OPEN_LOCK = threading.Lock()
_formats_cache: tuple[str, ...] | None = None


def _formats() -> tuple[str, ...]:
    """The accepted formats that this PIL build can open (``Image.open`` fails on unknown names)."""
    global _formats_cache
    if _formats_cache is None:
        Image.init()
        _formats_cache = tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)
    return _formats_cache


def _display(name: object) -> str:
    """A one-line rendering of a file name (control characters would break the one-line message)."""
    text = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
    return text if text.isprintable() else repr(text)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Limits:
    __slots__ = ("max_pixels", "max_side", "min_side")

    def __init__(self, max_pixels: int, max_side: int, min_side: int) -> None:
        for label, value in (("max_pixels", max_pixels), ("max_side", max_side), ("min_side", min_side)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if min_side > max_side:
            raise ValueError(f"min_side ({min_side}) is larger than max_side ({max_side})")
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.min_side = min_side

    def check(self, size: tuple[int, int], name: str) -> None:
        """Refuse a size from the header, before PIL allocates or decodes anything."""
        width, height = size
        if width * height > self.max_pixels:
            raise ImageLoadError(
                f"cannot load image {name}: {width}x{height} is {width * height:,} pixels, more than the "
                f"limit of {self.max_pixels:,} (possible decompression bomb); downscale the image first"
            )
        if max(width, height) > self.max_side:
            raise ImageLoadError(
                f"cannot load image {name}: {width}x{height} has a side longer than {self.max_side} "
                "pixels; downscale or crop the image first"
            )
        if min(width, height) < self.min_side:
            raise ImageLoadError(
                f"cannot load image {name}: {width}x{height} has a side shorter than {self.min_side} "
                "pixels; use a larger image"
            )


def _background(value: object) -> tuple[int, int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in value)
    ):
        raise ValueError(f"background must be an (r, g, b) tuple of ints in 0..255, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    min_side: int = DEFAULT_MIN_SIDE,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Load ``source`` as a fully decoded 8-bit RGB image, upright, with no file left open.

    ``source`` is a path (str / PathLike), the encoded bytes (bytes / bytearray / memoryview), a binary
    file object (read from its current position to the end; the caller keeps ownership and it is not
    closed), a PIL image (not modified; its current frame is used), or a numpy ``uint8`` array of shape
    HxW, HxWx1, HxWx3 or HxWx4 (RGBA).

    Conversions, so that every caller sees the same pixels:

    * alpha (RGBA, LA, palette or RGB/L with a transparent colour) is composited on ``background``
      (default white, :data:`DEFAULT_BACKGROUND`);
    * 16-bit images are scaled to 8 bits (``round(v * 255 / 65535)``: 65535 -> 255, 32768 -> 128), never
      clipped; 32-bit integer ("I") images are read as 8-bit if all values fit 0..255, as 16-bit if
      they fit 0..65535, otherwise min-max stretched; float ("F") images as 0..1 if they fit, as 0..255
      if they fit, otherwise min-max stretched;
    * CMYK goes through its embedded ICC profile to sRGB when it has one, PIL's formula otherwise;
      RGB images keep their pixel values (ICC profiles of RGB images are not applied);
    * the EXIF orientation is applied (a rotated phone photo comes out upright); broken EXIF is ignored;
    * an animated image (GIF, WebP, APNG, multi-page TIFF) gives its first frame;
    * the result carries no metadata (``info`` is empty).

    Limits, checked on the header's size before decoding (PIL's own decompression-bomb guard applies
    too): at most ``max_pixels`` pixels (default 64,000,000, :data:`DEFAULT_MAX_PIXELS`), no side
    longer than ``max_side`` (16384) or shorter than ``min_side`` (8).

    Raises :class:`ImageLoadError` (one line, naming the file and what to do) for any unusable data,
    and ``ValueError`` only for bad keyword arguments.
    """
    limits = _Limits(max_pixels, max_side, min_side)
    bg = _background(background)
    if isinstance(source, Image.Image):
        name = _display(getattr(source, "filename", "") or "<PIL image>")
        return _finish(source, name, limits, bg)
    if isinstance(source, np.ndarray):
        return _finish(_from_array(source, limits), "<numpy array>", limits, bg)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(source), "<bytes>", limits, bg)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(source, limits, bg)
    if hasattr(source, "read"):
        name = _display(getattr(source, "name", None) or "<file object>")
        try:
            data = source.read()
        except Exception as exc:
            raise ImageLoadError(f"cannot load image {name}: reading failed ({_one_line(exc)})") from exc
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageLoadError(
                f"cannot load image {name}: the file object returned {type(data).__name__}, not bytes; "
                "open it in binary mode ('rb')"
            )
        return _load_bytes(bytes(data), name, limits, bg)
    raise ImageLoadError(
        f"cannot load an image from a {type(source).__name__}: pass a path, bytes, a binary file object, "
        "a PIL image or a uint8 numpy array"
    )


def load_images(sources: Iterable[ImageSource], **kwargs: object) -> list[Image.Image]:
    """Load several images with the same limits; the first bad one raises (its message names it)."""
    return [load_image(source, **kwargs) for source in sources]  # type: ignore[arg-type]


def prepare_reference(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` to cover ``width`` x ``height`` (Lanczos, aspect kept) and centre-crop to exactly it.

    The reference branch needs the subject at the generation resolution without distortion, so we
    crop rather than stretch or pad. A non-RGB image goes through :func:`load_image` first.
    """
    for label, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if not isinstance(image, Image.Image):
        raise TypeError(f"prepare_reference needs a PIL image, got {type(image).__name__}; use load_image")
    if image.mode != "RGB":
        image = load_image(image)
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


# --------------------------------------------------------------------------------------------------
# Sources


def _load_path(source: str | os.PathLike, limits: _Limits, bg: tuple[int, int, int]) -> Image.Image:
    if not os.fspath(source):
        raise ImageLoadError("cannot load image: the path is empty; pass the path of an image file")
    path = Path(source)
    name = _display(path)
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise ImageLoadError(f"cannot load image {name}: no such file; check the path") from exc
    except PermissionError as exc:
        raise ImageLoadError(f"cannot load image {name}: permission denied; check its permissions") from exc
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"cannot load image {name}: {_one_line(exc)}; check the path") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(f"cannot load image {name}: it is a directory; pass an image file inside it")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or never end; only regular files are images.
        raise ImageLoadError(f"cannot load image {name}: not a regular file; pass an image file")
    if st.st_size == 0:
        raise ImageLoadError(
            f"cannot load image {name}: the file is empty (0 bytes); re-copy or re-download it"
        )
    try:
        handle = open(path, "rb")  # closed by the with below
    except PermissionError as exc:
        raise ImageLoadError(f"cannot load image {name}: permission denied; check its permissions") from exc
    except OSError as exc:
        raise ImageLoadError(f"cannot load image {name}: {_one_line(exc)}") from exc
    with handle:
        return _decode(handle, name, limits, bg)


def _load_bytes(data: bytes, name: str, limits: _Limits, bg: tuple[int, int, int]) -> Image.Image:
    if not data:
        raise ImageLoadError(f"cannot load image {name}: no data (0 bytes); the upload or read was empty")
    return _decode(io.BytesIO(data), name, limits, bg)


def _from_array(array: np.ndarray, limits: _Limits) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageLoadError(
            f"cannot load image <numpy array>: dtype {array.dtype} is not uint8; convert it, e.g. "
            "(np.clip(a, 0, 1) * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageLoadError(
            f"cannot load image <numpy array>: shape {array.shape} is not HxW, HxWx3 or HxWx4; "
            "pass channels last"
        )
    height, width = array.shape[:2]
    limits.check((width, height), "<numpy array>")
    image = Image.fromarray(np.ascontiguousarray(array))  # mode L, RGB or RGBA from the shape
    return image


# --------------------------------------------------------------------------------------------------
# Decoding


def _decode(fp: IO[bytes], name: str, limits: _Limits, bg: tuple[int, int, int]) -> Image.Image:
    """Identify from the header, check the size, then decode; every failure becomes ImageLoadError."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=_formats())
    except UnidentifiedImageError as exc:
        raise ImageLoadError(_unidentified_message(fp, name)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"cannot load image {name}: its header claims too many pixels ({_one_line(exc)}); "
            "possible decompression bomb, downscale the image first"
        ) from exc
    except Exception as exc:  # PIL plugins raise anything on a mangled header
        raise ImageLoadError(_corrupt_message(name, exc)) from exc
    try:
        return _finish(image, name, limits, bg)
    finally:
        image.close()


def _finish(image: Image.Image, name: str, limits: _Limits, bg: tuple[int, int, int]) -> Image.Image:
    """Check the size, decode the (current, i.e. first) frame, orient and convert to RGB."""
    try:
        limits.check(image.size, name)
        image.load()
        limits.check(image.size, name)  # a few plugins settle the size only while decoding
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # broken EXIF must not make a good picture unusable
            oriented = image
        assert oriented is not None
        rgb = _to_rgb(oriented, bg)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"cannot load image {name}: too many pixels ({_one_line(exc)}); downscale the image first"
        ) from exc
    except MemoryError as exc:
        raise ImageLoadError(
            f"cannot load image {name}: not enough memory to decode it; downscale the image first"
        ) from exc
    except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise ImageLoadError(_corrupt_message(name, exc)) from exc
    if rgb is image:
        rgb = rgb.copy()
    rgb.info = {}
    return rgb


def _to_rgb(image: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode in _16BIT_MODES or mode == "I":
        return _gray_array_to_rgb(np.asarray(image), integer=True)
    if mode == "F":
        return _gray_array_to_rgb(np.asarray(image), integer=False)
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    has_alpha = mode in _ALPHA_MODES or (
        mode in ("P", "L", "RGB", "1") and image.info.get("transparency") is not None
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, bg)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _gray_array_to_rgb(array: np.ndarray, *, integer: bool) -> Image.Image:
    """16/32-bit or float grayscale to 8 bits by scaling, since PIL's own conversion clips."""
    if integer:
        values = array.astype(np.int64)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low >= 0 and high <= 255 and array.dtype.itemsize > 2:
            out = values
        elif low >= 0 and high <= 65535:
            out = (values * 255 + 32767) // 65535
        else:
            out = (values - low) * 255 // max(high - low, 1)
    else:
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0.0 and high <= 1.0:
            out = np.rint(values * 255.0)
        elif low >= 0.0 and high <= 255.0:
            out = np.rint(values)
        else:
            out = np.rint((values - low) * (255.0 / max(high - low, 1e-12)))
    gray = np.clip(out, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(
                image, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if converted is not None:
                return converted
        except Exception:  # a broken or non-CMYK profile: fall back to the plain formula
            pass
    return image.convert("RGB")


def _unidentified_message(fp: IO[bytes], name: str) -> str:
    try:
        fp.seek(0)
        head = fp.read(32)
    except Exception:
        head = b""
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return (
            f"cannot load image {name}: HEIC/HEIF photos are not supported; "
            "export or convert it to JPEG or PNG"
        )
    return f"cannot load image {name}: not a recognised image file; use {_HINT_FORMATS}"


def _corrupt_message(name: str, exc: BaseException) -> str:
    detail = _one_line(exc)
    if isinstance(exc, EOFError) or "truncated" in detail.lower():
        return (
            f"cannot load image {name}: the file is truncated ({detail}); "
            "re-copy or re-download it"
        )
    return (
        f"cannot load image {name}: corrupt or unsupported image data ({detail}); "
        "re-export it as PNG or JPEG"
    )


def _rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image or a PIL image, got {array.dtype} {array.shape}")
    return array


def make_grid(
    rows: Sequence[Sequence[np.ndarray | Image.Image]],
    labels: Sequence[str] | None = None,
    scale: int = 2,
    pad: int = 2,
) -> Image.Image:
    """Images in a grid (e.g. reference | generated | target per row), upscaled by nearest neighbour.

    ``labels`` are column titles drawn in a header strip. Short rows are padded with blank cells.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("make_grid needs at least one image")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    imgs = [[_rgb_array(im) for im in row] for row in rows]
    cell_h = max(im.shape[0] for row in imgs for im in row) * scale
    cell_w = max(im.shape[1] for row in imgs for im in row) * scale
    n_cols = max(max(len(row) for row in imgs), len(labels) if labels else 0)
    header = 14 if labels else 0
    width = n_cols * cell_w + (n_cols + 1) * pad
    height = header + len(imgs) * cell_h + (len(imgs) + 1) * pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    if labels:
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for j, text in enumerate(labels):
            draw.text((pad + j * (cell_w + pad) + 2, 1), str(text), fill=(0, 0, 0), font=font)
    for i, row in enumerate(imgs):
        for j, im in enumerate(row):
            tile = Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell_w + pad), header + pad + i * (cell_h + pad)))
    return canvas
