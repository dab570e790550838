"""The web demo: ``customshift serve`` — drop in a photo of a subject, type its name and a prompt.

Design (docs/webui.md has the user-facing side):

* The model is chosen by the caller: `create_app` takes a pipeline (or a factory for one); `serve`
  loads ``--model``/``--weights``, or the default model, or — when no default model is installed —
  the tiny random model, with a notice on the page saying so.
* Safety: the server binds to 127.0.0.1 unless told otherwise, ``allowed_paths`` is empty, and the
  only files the app reads are gradio's own uploads (gradio refuses any other path at preprocess).
  Uploads over ``max_upload_mb`` are refused by gradio's upload route and again by a size check here,
  before a single byte is decoded; decoding goes through `customshift.images.load_image`, which
  refuses absurd dimensions from the header.
* Resources: generation runs one request at a time (gradio queue with concurrency 1, plus a lock),
  the waiting queue is bounded, each request is bounded (images, steps, size), subject embeddings
  live in an LRU cache bounded by entries and bytes (kept on the CPU), and the files written for
  downloads are pruned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CustomShiftError

if TYPE_CHECKING:  # gradio, torch and diffusers are imported only when the demo is built
    import gradio as gr
    from PIL import Image

    from .pipeline import CustomShiftPipeline
    from .reference import SubjectEmbedding

logger = logging.getLogger(__name__)

__all__ = [
    "DemoEngine",
    "EmbeddingCache",
    "Limits",
    "LimitError",
    "TINY_NOTICE",
    "build_app",
    "create_app",
    "launch",
    "load_pipeline",
    "serve",
]

TINY_NOTICE = (
    "**No default model installed: random tiny model.** Images are noise-like 32x32 pictures; start "
    "the server with `customshift serve --model <SD3 checkpoint> [--weights <CustomShift weights>]` "
    "for real results."
)
MAX_SEED = 2**32 - 1
_KEPT_REQUESTS = 32  # output folders kept for downloads; older ones are deleted


class LimitError(CustomShiftError):
    """A request exceeds one of the demo's limits; the message names the limit and the way out."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Every bound exists to keep memory and time per request bounded."""

    max_images_per_request: int = 4
    max_references: int = 4
    max_upload_mb: float = 10.0
    max_side: int = 4096  # longest side of an uploaded reference, checked from the header
    max_resolution: int = 1536  # longest side of a generated image (also capped by the model)
    max_steps: int = 100
    max_prompt_chars: int = 1000
    max_subject_chars: int = 100
    max_queue: int = 16  # requests waiting behind the running one; more are refused
    max_upload_cache_mb: float = 1024.0  # everything the upload folder may hold (uploads and cached outputs)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{field.name} must be a positive number, got {value!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_request_upload_bytes(self) -> int:
        """All the files of one upload request together: every reference at its largest."""
        return self.max_references * self.max_upload_bytes

    @property
    def max_pixels(self) -> int:
        from .images import DEFAULT_MAX_PIXELS

        return min(self.max_side * self.max_side, DEFAULT_MAX_PIXELS)


# ----------------------------------------------------------------------------------------------------------
# Subject-embedding cache


def embedding_nbytes(embedding: SubjectEmbedding) -> int:
    """Bytes held by an embedding's keys and values (what the cache's byte bound counts)."""
    tensors = list(embedding.keys.values()) + list(embedding.values.values())
    return sum(t.numel() * t.element_size() for t in tensors)


class EmbeddingCache:
    """LRU of subject embeddings, bounded by entry count and by bytes.

    Encoding a subject runs the reference branch, so a user who generates many prompts for one
    photo pays for it once. A real SD3 embedding at 1024 px is hundreds of MB, hence the byte bound.
    """

    def __init__(self, max_entries: int = 16, max_bytes: int = 4 << 30) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[SubjectEmbedding, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def get(self, key: tuple) -> SubjectEmbedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple, embedding: SubjectEmbedding) -> None:
        size = embedding_nbytes(embedding)
        with self._lock:
            self._items.pop(key, None)
            if self.max_entries == 0 or size > self.max_bytes:
                return  # larger than the whole budget: use it once, keep nothing
            self._items[key] = (embedding, size)
            total = sum(s for _, s in self._items.values())
            while len(self._items) > self.max_entries or total > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                total -= evicted


# ----------------------------------------------------------------------------------------------------------
# The engine: validation, uploads, cache, generation (no gradio in here, so it is unit-testable)


@dataclass
class Result:
    """One request's output: images with captions, their parameters, the files to download."""

    images: list[Image.Image]
    captions: list[str]
    parameters: list[dict[str, Any]]
    files: list[str]
    parameters_file: str
    status: str
    embedding_cached: bool


def _parse_prompts(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _as_int(value: Any, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LimitError(f"{name} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise LimitError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _as_float(value: Any, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LimitError(f"{name} must be a number, got {value!r}") from None
    if not (low <= number <= high):
        raise LimitError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return number


def _is_inside(path: str, root: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(root)
    except (OSError, ValueError):
        return False


def _second_subject(uploads: Sequence[Any] | None, subject: str | None, first: str,
                    limits: Limits) -> list[tuple[list[Any], str]]:
    """The optional second subject of a request as ``[(uploads, name)]`` ([] when none), checked like the first."""
    uploads, subject = [u for u in (uploads or []) if u], (subject or "").strip()
    if not uploads and not subject:
        return []
    if not uploads or not subject:
        raise LimitError("the second subject needs both its reference image(s) and its name (or neither)")
    if len(uploads) > limits.max_references or len(subject) > limits.max_subject_chars:
        raise LimitError(f"the second subject allows up to {limits.max_references} images and a name of up to "
                         f"{limits.max_subject_chars} characters")
    if subject.lower() == first.lower():
        raise LimitError(f"the two subjects need different names (both are {subject!r})")
    return [(uploads, subject)]


def _upload_path(item: Any) -> str:
    """The server path of one uploaded file as gradio hands it over (a str, or a FileData-like)."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    path = getattr(item, "path", None) or (item.get("path") if isinstance(item, dict) else None)
    if not path:
        raise LimitError("a reference upload is missing its file; upload the image again")
    return str(path)


class DemoEngine:
    """Everything the web page does, minus the page: check a request, encode the subject (cached),
    generate one image at a time under a lock, write the downloads."""

    def __init__(
        self,
        pipeline: CustomShiftPipeline,
        limits: Limits | None = None,
        *,
        cache_size: int = 16,
        cache_mb: float = 4096,
        model_name: str = "custom",
        output_dir: str | Path | None = None,
        upload_root: str | Path | None = None,
    ) -> None:
        """``upload_root``: when set, only files below it are read (the web app passes gradio's upload
        folder); None for direct use from Python."""
        self.pipeline = pipeline
        self.upload_root = Path(upload_root).resolve() if upload_root is not None else None
        self.limits = limits or Limits()
        self.cache = EmbeddingCache(cache_size, int(cache_mb * 1024 * 1024))
        self.model_name = model_name
        self._lock = threading.Lock()
        self._outputs: deque[Path] = deque()
        self._outputs_lock = threading.Lock()
        if output_dir is None:
            output_dir = tempfile.mkdtemp(prefix="customshift-webui-")
            import atexit

            atexit.register(shutil.rmtree, output_dir, True)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.requests_served = 0

    # -- model geometry ------------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Generated sides must be multiples of this (VAE factor x patch size: 16 on SD3)."""
        return int(self.pipeline.vae_scale_factor * self.pipeline.transformer.config.patch_size)

    @property
    def default_size(self) -> int:
        return int(self.pipeline.default_sample_size * self.pipeline.vae_scale_factor)

    @property
    def max_size(self) -> int:
        """The longest generated side: our limit, capped by what the positional embedding covers."""
        config = self.pipeline.transformer.config
        model_max = getattr(config, "pos_embed_max_size", None)
        cap = self.limits.max_resolution
        if model_max:
            cap = min(cap, int(model_max) * self.size_multiple)
        return max(cap - cap % self.size_multiple, self.size_multiple)

    # -- uploads -------------------------------------------------------------------------------------------

    def read_upload(self, item: Any) -> tuple[str, bytes]:
        """(display name, bytes) of one upload; the size is checked from the file system first."""
        path = _upload_path(item)
        name = os.path.basename(path) or "upload"
        if self.upload_root is not None and not _is_inside(path, self.upload_root):
            # gradio already refuses such paths at preprocess; this is the second lock on the door.
            raise LimitError(f"reference '{name}' was not uploaded through this page; upload it again")
        try:
            size = os.stat(path).st_size
        except OSError:
            raise LimitError(f"reference '{name}' is no longer on the server; upload it again") from None
        limit = self.limits.max_upload_bytes
        if size > limit:
            raise LimitError(
                f"reference '{name}' is {size / 1048576:.1f} MB; the limit is {self.limits.max_upload_mb:g} MB "
                "per file. Downscale or re-encode it (JPEG) and upload again"
            )
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:  # the file grew after the stat
            raise LimitError(f"reference '{name}' is larger than {self.limits.max_upload_mb:g} MB")
        return name, data

    def decode(self, data: bytes, name: str) -> Image.Image:
        """Decode an upload through the project's one image loader, with the demo's dimension limits."""
        import io

        from .images import load_image

        stream = io.BytesIO(data)
        stream.name = name  # so that load_image's messages name the user's file
        return load_image(stream, max_pixels=self.limits.max_pixels, max_side=self.limits.max_side)

    def preview(self, uploads: Sequence[Any] | None, size: int = 256) -> list[Image.Image]:
        """Thumbnails of the uploaded references (same checks as a generation)."""
        thumbs = []
        for item in list(uploads or [])[: self.limits.max_references]:
            name, data = self.read_upload(item)
            image = self.decode(data, name)
            image.thumbnail((size, size))
            thumbs.append(image)
        return thumbs

    # -- checks --------------------------------------------------------------------------------------------

    def check_request(
        self,
        uploads: Sequence[Any] | None,
        subject: str | None,
        prompts_text: str | None,
        shift_scale: Any,
        guidance_scale: Any,
        reference_guidance_scale: Any,
        steps: Any,
        seed: Any,
        width: Any,
        height: Any,
        num_images: Any,
        second_uploads: Sequence[Any] | None = None,
        second_subject: str | None = None,
    ) -> dict[str, Any]:
        """Every limit, cheapest first, before any file is read; returns the normalised request."""
        lim = self.limits
        uploads = [u for u in (uploads or []) if u]
        if not uploads:
            raise LimitError("no reference image: upload at least one photo of the subject")
        if len(uploads) > lim.max_references:
            raise LimitError(
                f"{len(uploads)} reference images uploaded; the limit is {lim.max_references} per request"
            )
        subject = (subject or "").strip()
        if not subject:
            raise LimitError("the subject name is missing: type the word your prompts use for it (e.g. 'dog')")
        if len(subject) > lim.max_subject_chars:
            raise LimitError(
                f"the subject name is {len(subject)} characters long; the limit is {lim.max_subject_chars}"
            )
        if len(prompts_text or "") > lim.max_prompt_chars:
            raise LimitError(
                f"the prompts are {len(prompts_text or '')} characters long; the limit is {lim.max_prompt_chars}"
            )
        prompts = _parse_prompts(prompts_text)
        if not prompts:
            raise LimitError("the prompt is empty: describe the image to generate, one prompt per line")
        num_images = _as_int(num_images, "number of images")
        if num_images < 1:
            raise LimitError(f"number of images must be at least 1, got {num_images}")
        total = len(prompts) * num_images
        if total > lim.max_images_per_request:
            raise LimitError(
                f"this request asks for {total} images ({len(prompts)} prompt(s) x {num_images}); the limit is "
                f"{lim.max_images_per_request} images per request. Use fewer prompts or images per prompt"
            )
        steps = _as_int(steps, "steps")
        if not 1 <= steps <= lim.max_steps:
            raise LimitError(f"steps must be between 1 and {lim.max_steps}, got {steps}")
        seed = _as_int(seed if seed is not None else -1, "seed")
        if seed < -1 or seed > MAX_SEED - total:
            raise LimitError(f"seed must be between 0 and {MAX_SEED - total} (or -1 for a random seed), got {seed}")
        sizes = []
        for label, value in (("width", width), ("height", height)):
            side = _as_int(value if value is not None else self.default_size, label)
            multiple, largest = self.size_multiple, self.max_size
            if side < multiple or side > largest or side % multiple:
                raise LimitError(
                    f"{label} must be a multiple of {multiple} between {multiple} and {largest}, got {side}"
                )
            sizes.append(side)
        return {
            "second": _second_subject(second_uploads, second_subject, subject, lim),
            "uploads": uploads,
            "subject": subject,
            "prompts": prompts,
            "shift_scale": _as_float(shift_scale, "shift scale", 0.0, 10.0),
            "guidance_scale": _as_float(guidance_scale, "text guidance scale", 0.0, 30.0),
            "reference_guidance_scale": _as_float(reference_guidance_scale, "reference guidance scale", -10.0, 10.0),
            "steps": steps,
            "seed": seed,
            "width": sizes[0],
            "height": sizes[1],
            "num_images": num_images,
        }

    # -- subject -------------------------------------------------------------------------------------------

    def subject_embedding(
        self, uploads: Sequence[Any], subject: str, height: int, width: int
    ) -> tuple[SubjectEmbedding, bool, list[str]]:
        """(embedding, from cache?, reference digests): encoded once per (references, subject, size)."""
        blobs = [self.read_upload(item) for item in uploads]
        digests = [hashlib.sha256(data).hexdigest() for _, data in blobs]
        key = (tuple(digests), subject, (height, width), self.pipeline.weights_fingerprint)
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True, digests
        images = [self.decode(data, name) for name, data in blobs]
        del blobs
        embedding = self.pipeline.encode_subject(images, subject, height=height, width=width)
        embedding = dataclasses.replace(embedding, inputs=None)  # the branch inputs are only for tests
        if any(t.device.type != "cpu" for t in embedding.keys.values()):
            embedding = embedding.to("cpu")  # cached copies must not pile up in GPU memory
        self.cache.put(key, embedding)
        return embedding, False, digests

    # -- generation ----------------------------------------------------------------------------------------

    def generate(self, *args: Any, progress: Callable[..., Any] | None = None) -> Result:
        """Check, encode (or reuse) the subject and generate every image of one request."""
        import torch
        from PIL.PngImagePlugin import PngInfo

        request = self.check_request(*args)
        report = progress or (lambda *a, **k: None)
        seed = request["seed"] if request["seed"] >= 0 else secrets.randbelow(2**31)
        prompts, per_prompt, steps = request["prompts"], request["num_images"], request["steps"]
        total = len(prompts) * per_prompt
        start = time.perf_counter()
        with self._lock:  # one generation at a time, whatever the queue settings
            report(0.0, desc="encoding the subject")
            embedding, cached, digests = self.subject_embedding(
                request["uploads"], request["subject"], request["height"], request["width"]
            )
            subjects = [embedding] + [self.subject_embedding(ups, name, request["height"], request["width"])[0]
                                      for ups, name in request["second"]]  # several: each its own m_i
            pipe = self.pipeline
            images, parameters = [], []
            for index in range(total):
                prompt = prompts[index // per_prompt]
                image_seed = seed + index

                def on_step(_pipe: Any, step: int, _t: Any, kwargs: dict, index: int = index) -> dict:
                    report((index * steps + step + 1, total * steps), desc=f"image {index + 1}/{total}")
                    return kwargs

                output = pipe(
                    prompt=prompt,
                    subject=subjects if len(subjects) > 1 else embedding,
                    shift_scale=request["shift_scale"],
                    guidance_scale=request["guidance_scale"],
                    reference_guidance_scale=request["reference_guidance_scale"],
                    num_inference_steps=steps,
                    height=request["height"],
                    width=request["width"],
                    num_images_per_prompt=1,
                    generator=torch.Generator(device="cpu").manual_seed(image_seed),
                    callback_on_step_end=on_step,
                    output_type="pil",
                )
                images.append(output.images[0])
                parameters.append({
                    "prompt": prompt,
                    "subject": request["subject"], "subjects": [request["subject"]] + [n for _, n in request["second"]],
                    "seed": image_seed,
                    "shift_scale": request["shift_scale"],
                    "guidance_scale": request["guidance_scale"],
                    "reference_guidance_scale": request["reference_guidance_scale"],
                    "num_inference_steps": steps,
                    "width": request["width"],
                    "height": request["height"],
                    "references_sha256": digests,
                    "model": self.model_name,
                    "base_fingerprint": pipe.base_fingerprint,
                    "weights_fingerprint": pipe.weights_fingerprint,
                })
            self.requests_served += 1
        elapsed = time.perf_counter() - start

        folder = self._new_output_folder()
        files = []
        for index, (image, params) in enumerate(zip(images, parameters, strict=True)):
            info = PngInfo()
            info.add_text("customshift", json.dumps(params))
            path = folder / f"customshift_{index + 1:02d}_seed{params['seed']}.png"
            image.save(path, pnginfo=info)
            files.append(str(path))
        params_path = folder / "parameters.json"
        params_path.write_text(json.dumps(parameters, indent=2))
        captions = [
            f"seed {p['seed']} · shift {p['shift_scale']:g} · text cfg {p['guidance_scale']:g} · "
            f"ref cfg {p['reference_guidance_scale']:g} · {p['num_inference_steps']} steps · "
            f"{p['width']}x{p['height']}: {p['prompt']}"
            for p in parameters
        ]
        status = (
            f"Generated {total} image(s) in {elapsed:.1f} s; subject embedding "
            f"{'reused from the cache' if cached else 'computed'} ({len(self.cache)} cached)."
        )
        return Result(images, captions, parameters, files + [str(params_path)], str(params_path), status, cached)

    def _new_output_folder(self) -> Path:
        """A fresh folder for one request's downloads; the oldest beyond `_KEPT_REQUESTS` are deleted."""
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.output_dir))
        with self._outputs_lock:
            self._outputs.append(folder)
            while len(self._outputs) > _KEPT_REQUESTS:
                shutil.rmtree(self._outputs.popleft(), ignore_errors=True)
        return folder


# ----------------------------------------------------------------------------------------------------------
# Examples


def write_examples(folder: str | Path, count: int = 4) -> list[list[Any]]:
    """Example rows (references, subject, prompt) from held-out synthetic subjects, one per class."""
    from PIL import Image

    from .sprites.synthetic import evaluation_split

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    seen: set[str] = set()
    for index, pair in enumerate(evaluation_split(64)):
        if pair.subject_name in seen:
            continue
        seen.add(pair.subject_name)
        path = folder / f"example_{index:02d}_{pair.subject_name}.png"
        Image.fromarray(pair.reference).save(path)
        rows.append([[str(path)], pair.subject_name, pair.prompt])
        if len(rows) == count:
            break
    return rows


# ----------------------------------------------------------------------------------------------------------
# The page

_CSS = """
#status {min-height: 1.5em}
"""


def _user_error(error: BaseException) -> Exception:
    import gradio as gr

    return gr.Error(str(error), print_exception=False)


def create_app(
    pipeline: CustomShiftPipeline | Callable[[], CustomShiftPipeline],
    *,
    max_images_per_request: int = 4,
    max_upload_mb: float = 10,
    max_side: int = 4096,
    cache_size: int = 16,
    cache_mb: float = 4096,
    max_references: int = 4,
    max_resolution: int = 1536,
    max_steps: int = 100,
    max_queue: int = 16,
    max_upload_cache_mb: float = 1024,
    default_steps: int = 28,
    default_guidance: float = 7.0,
    notice: str | None = None,
    model_name: str = "custom",
    examples: int = 4,
    title: str = "CustomShift",
) -> gr.Blocks:
    """The Gradio app around ``pipeline`` (or ``pipeline()`` when given a factory).

    The returned Blocks already has its queue configured (one generation at a time, at most
    ``max_queue`` waiting); start it with `launch` so the upload limit and the safe defaults apply.
    """
    import gradio as gr

    if callable(pipeline) and not hasattr(pipeline, "encode_subject"):
        pipeline = pipeline()
    limits = Limits(
        max_images_per_request=max_images_per_request,
        max_references=max_references,
        max_upload_mb=max_upload_mb,
        max_side=max_side,
        max_resolution=max_resolution,
        max_steps=max_steps,
        max_queue=max_queue,
        max_upload_cache_mb=max_upload_cache_mb,
    )
    from gradio.utils import get_upload_folder

    engine = DemoEngine(pipeline, limits, cache_size=cache_size, cache_mb=cache_mb, model_name=model_name,
                        upload_root=get_upload_folder())
    multiple, largest, default = engine.size_multiple, engine.max_size, min(engine.default_size, engine.max_size)

    def generate(
        uploads, subject, prompts, shift_scale, guidance_scale, reference_guidance_scale, steps, seed, width,
        height, num_images, second_uploads=None, second_subject=None,
        progress=gr.Progress(),  # gradio's way to ask for a progress bar
    ):
        for prompt in _parse_prompts(prompts):
            if subject and subject.strip() and subject.strip().lower() not in prompt.lower():
                gr.Warning(f"the subject name '{subject.strip()}' does not appear in the prompt '{prompt}'; "
                           "the reference then applies everywhere rather than to the subject")
        try:
            result = engine.generate(
                uploads, subject, prompts, shift_scale, guidance_scale, reference_guidance_scale, steps, seed,
                width, height, num_images, second_uploads, second_subject, progress=progress,
            )
        except CustomShiftError as error:
            raise _user_error(error) from None
        except Exception as error:  # out of memory and the like: say so, keep the server up
            logger.exception("generation failed")
            _release_memory()
            if "out of memory" in str(error).lower():
                raise gr.Error("out of memory: use a smaller size or fewer images, or try again later",
                               print_exception=False) from None
            raise gr.Error(f"generation failed ({type(error).__name__}); see the server log",
                           print_exception=False) from None
        gallery = list(zip(result.images, result.captions, strict=True))
        return gallery, result.status, result.files, result.parameters, result.parameters_file

    def preview(uploads):
        try:
            return engine.preview(uploads)
        except CustomShiftError as error:
            gr.Warning(str(error))
            return []

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            f"# {title}\nUpload one or more photos of a subject, type the subject's name and one prompt per line "
            "that uses that name, then **Generate**. The subject is encoded once and reused for later requests."
        )
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                references = gr.File(
                    label=f"Reference image(s): up to {limits.max_references}, {limits.max_upload_mb:g} MB each",
                    file_count="multiple", file_types=["image"], type="filepath", elem_id="references",
                )
                reference_preview = gr.Gallery(
                    label="References", columns=4, height=120, format="png", interactive=False,
                    elem_id="reference-preview", show_label=False, object_fit="contain", allow_preview=False,
                    fit_columns=False,
                )
                subject = gr.Textbox(label="Subject name (as written in the prompts)", placeholder="dog",
                                     max_lines=1, elem_id="subject")
                prompts = gr.Textbox(label="Prompts, one per line", lines=3,
                                     placeholder="a dog on the beach\na dog in the snow", elem_id="prompts")
                with gr.Accordion("Second subject (optional): its own photo(s) and name, both in the prompts",
                                  open=False):
                    second_references = gr.File(label="Second subject's reference image(s)", file_count="multiple",
                                                file_types=["image"], type="filepath", elem_id="second-references")
                    second_subject = gr.Textbox(label="Second subject's name", placeholder="cat", max_lines=1,
                                                elem_id="second-subject")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        shift_scale = gr.Slider(0.0, 5.0, value=1.0, step=0.05, label="Shift scale",
                                                info="strength of the subject (0 = plain SD3)")
                        num_images = gr.Slider(1, limits.max_images_per_request, value=1, step=1,
                                               label="Images per prompt", elem_id="num-images")
                    with gr.Row():
                        guidance_scale = gr.Slider(0.0, 20.0, value=default_guidance, step=0.5,
                                                   label="Text guidance scale")
                        reference_guidance_scale = gr.Slider(0.0, 10.0, value=0.0, step=0.5,
                                                             label="Reference guidance scale")
                    with gr.Row():
                        steps = gr.Slider(1, limits.max_steps, value=min(default_steps, limits.max_steps), step=1,
                                          label="Steps")
                        seed = gr.Number(value=0, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1: random)")
                    with gr.Row():
                        width = gr.Slider(multiple, largest, value=default, step=multiple, label="Width")
                        height = gr.Slider(multiple, largest, value=default, step=multiple, label="Height")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Results (captions: the parameters of each image)", columns=2, height=440,
                                     format="png", elem_id="gallery", buttons=["download", "fullscreen"],
                                     interactive=False, object_fit="contain")
                status = gr.Markdown(elem_id="status")
                downloads = gr.File(label="Downloads: images (PNG, parameters embedded) and parameters.json",
                                    file_count="multiple", interactive=False, elem_id="downloads", height=160)
                parameters_button = gr.DownloadButton("Download parameters (JSON)", elem_id="download-parameters")
                with gr.Accordion("Parameters", open=False):
                    parameters = gr.JSON(label="Parameters", elem_id="parameters")
        if examples:
            gr.Examples(
                write_examples(engine.output_dir / "examples", examples),
                inputs=[references, subject, prompts],
                label="Examples (held-out synthetic subjects, made for the default model)",
            )
        references.change(preview, references, reference_preview, api_visibility="private",
                          concurrency_id="preview", concurrency_limit=2)
        button.click(
            generate,
            inputs=[references, subject, prompts, shift_scale, guidance_scale, reference_guidance_scale, steps, seed,
                    width, height, num_images, second_references, second_subject],
            outputs=[gallery, status, downloads, parameters, parameters_button],
            api_name="generate",
            concurrency_id="generate",
            concurrency_limit=1,
        )
    demo.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    _explain_refused_paths(demo)
    demo.customshift_engine = engine  # type: ignore[attr-defined]  # for launch() and the tests
    return demo


build_app = create_app


def _explain_refused_paths(demo: gr.Blocks) -> None:
    """gradio refuses a request naming a file outside its upload folder before our code runs, showing the
    client ``{"error": null}`` and logging a traceback: refuse it with a message instead, and quietly."""
    import gradio as gr
    from gradio.exceptions import InvalidPathError

    original = demo.preprocess_data

    async def preprocess_data(*args: Any, **kwargs: Any) -> Any:
        try:
            return await original(*args, **kwargs)
        except InvalidPathError:
            logger.info("refused a request naming a file that was not uploaded through the page")
            raise gr.Error("a reference image was not uploaded through this page; upload it again",
                           print_exception=False) from None

    demo.preprocess_data = preprocess_data  # type: ignore[method-assign]  # this app only, not gradio's class


def _release_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort
        pass


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    *,
    block: bool = True,
    quiet: bool = False,
) -> str:
    """Start ``demo`` with the safe settings: upload size limit, no extra served paths, no share link,
    no SSR (no Node), no MCP. Returns the local URL (when ``block=False``; otherwise runs until stopped)."""
    import gradio as gr
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    from .webui_uploads import UploadBudget

    engine: DemoEngine | None = getattr(demo, "customshift_engine", None)
    limits = engine.limits if engine else Limits()
    max_file_size = limits.max_upload_bytes
    budget = Middleware(UploadBudget, folder=get_upload_folder, max_files=limits.max_references,
                        max_request_bytes=limits.max_request_upload_bytes,
                        max_folder_bytes=int(limits.max_upload_cache_mb * 1024 * 1024))
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: the demo is reachable from other machines; it has no authentication", host)
    theme = gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # system fonts: the page must not fetch anything from the internet
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        allowed_paths=[],
        max_file_size=max_file_size,
        app_kwargs={"middleware": [budget]},
        ssr_mode=False,
        mcp_server=False,
        show_error=False,
        quiet=quiet,
        footer_links=["api"],
        theme=theme,
        css=_CSS,
    )
    return url


# ----------------------------------------------------------------------------------------------------------
# Models and the server


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _default_model_installed() -> bool:
    """Whether `customshift.default_model` exists and its packaged files are there.

    Only a missing module or missing files mean "not installed" (and the tiny fallback); a default
    model that is there but broken raises when loaded, since hiding that would be worse.
    """
    try:
        default_model = importlib.import_module("customshift.default_model")
    except ModuleNotFoundError as error:
        if error.name != "customshift.default_model":
            raise
        return False
    locate = getattr(default_model, "default_model_path", None)
    if locate is None:
        return True
    try:
        locate()
    except CustomShiftError as error:
        logger.warning("%s; serving the random tiny model instead", error)
        return False
    return True


def load_pipeline(
    model: str | None = None,
    weights: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[CustomShiftPipeline, str | None, str]:
    """(pipeline, notice for the page or None, model name).

    ``model=None``: the default model (`customshift.default_model`) when installed, otherwise the
    tiny random model with `TINY_NOTICE`. ``weights``: trained CustomShift weights to load on top.
    """

    device = device or _default_device()
    notice = None
    if model is None:
        if _default_model_installed():
            default_model = importlib.import_module("customshift.default_model")
            pipe, name = default_model.load_default_pipeline(), "customshift-default"
        else:
            from .tiny import build_tiny_pipeline

            pipe, notice, name = build_tiny_pipeline("sd3"), TINY_NOTICE, "tiny-random-sd3"
    else:
        from .generate import load_pipeline as load_model

        return load_model(model, weights, device, dtype), None, str(model)
    if weights:
        pipe.load_customshift(weights)
    pipe = pipe.to(device)
    return pipe, notice, name


def default_guidance_for(model_name: str) -> float:
    """SD3's text guidance 7, except for the packaged default model, which was trained and evaluated at 2."""
    if model_name == "customshift-default":
        from .default_model import DEFAULT_MODEL_GUIDANCE

        return DEFAULT_MODEL_GUIDANCE
    return 7.0


def serve(
    model: str | None = None,
    weights: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    device: str | None = None,
    dtype: str | None = None,
    max_images_per_request: int = 4,
    max_upload_mb: float = 10,
    max_side: int = 4096,
    cache_size: int = 16,
    max_queue: int = 16,
    max_upload_cache_mb: float = 1024,
    block: bool = True,
) -> gr.Blocks:
    """``customshift serve``: load the model (see `load_pipeline`) and run the demo on host:port.

    Blocks until interrupted unless ``block=False``; returns the running app (``.local_url``,
    ``.close()``).
    """
    if block:  # the command line: this process serves one app, whose folders go when it stops (SIGTERM too)
        from .webui_uploads import cleanup_on_exit

        parent = os.environ.get("GRADIO_TEMP_DIR") or None
        if parent:
            os.makedirs(parent, exist_ok=True)
        uploads = tempfile.mkdtemp(prefix="customshift-webui-uploads-", dir=parent)
        os.environ["GRADIO_TEMP_DIR"] = uploads  # a private upload folder, not the machine's shared /tmp/gradio
    pipe, notice, name = load_pipeline(model, weights, device=device, dtype=dtype)
    demo = create_app(
        pipe,
        max_images_per_request=max_images_per_request,
        max_upload_mb=max_upload_mb,
        max_side=max_side,
        cache_size=cache_size,
        max_queue=max_queue,
        max_upload_cache_mb=max_upload_cache_mb,
        notice=notice,
        model_name=name,
        default_steps=8 if notice == TINY_NOTICE else 28,
        default_guidance=default_guidance_for(name),
    )
    if block:
        remove = cleanup_on_exit(uploads, demo.customshift_engine.output_dir)
        try:
            launch(demo, host, port, block=True)
        finally:
            demo.close()
            remove()
        return demo
    launch(demo, host, port, block=block)
    return demo
