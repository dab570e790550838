"""The benchmark harness shared by DreamBench, CustomConcept101 and the folder mode.

A run is: a *plan* (one :class:`WorkItem` per image to make: subject, prompt, index, seed, file name),
*generation* (resumable, sharded across processes, the subject embedding computed once per subject),
then *scoring* of the images against each subject's real images and the *report*.

* Deterministic: the seed of an image depends only on (base seed, subject, prompt index, image index),
  never on the order, the subset or the number of processes.
* Resumable: an image already on disk is skipped (images are written atomically, so a file that
  exists is complete); ``run_config.json`` records the settings that shape the images, and a second
  run with other settings in the same folder is refused unless ``overwrite``.
* Sharded: under ``accelerate launch`` process *i* of *N* takes every *N*-th item of the plan; the
  main process scores and writes the report after all processes are done.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import torch
from PIL import Image

from customshift.batching import ProcessShare
from customshift.checks import inside, safe_file_name
from customshift.errors import CustomShiftError, ManifestError
from customshift.eval import report as rep
from customshift.eval.metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    METRICS,
    MetricSuite,
    score_embeddings,
)
from customshift.images import load_image

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
REFERENCE_POLICIES = ("first", "all", "random")
#: Settings that change the images: resuming with other values is refused (pass overwrite).
IMAGE_SHAPING_KEYS = ("benchmark", "model", "weights", "steps", "height", "width", "guidance_scale",
                      "reference_guidance_scale", "shift_scale", "seed", "reference_policy", "dtype")

# Generation defaults: those of `customshift generate` (SD3-medium's usual settings).
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE_SCALE = 7.0
DEFAULT_REFERENCE_GUIDANCE_SCALE = 0.0
DEFAULT_SHIFT_SCALE = 1.0
TINY_MODEL = "tiny"  # --model / --dino-model / --clip-model value for the tiny random models (smoke tests)


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class BenchmarkSubject:
    """One subject (concept) of a benchmark: its prompts and its real images."""

    subject: str  # id: the folder name (DreamBench) or the concept folder (CustomConcept101)
    subject_name: str  # how prompts name it (the class noun / subject phrase), also given to encode_subject
    prompts: list[str]
    real_images: list[Path]
    category: str = ""


@dataclass(frozen=True)
class WorkItem:
    """One image to make (and later score)."""

    subject: str
    subject_name: str
    prompt: str
    prompt_index: int
    image_index: int
    seed: int
    image: str  # path relative to the images folder, posix
    references: tuple[str, ...]  # the images handed to the method
    real_images: tuple[str, ...]  # the images it is scored against

    def manifest_row(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "subject": self.subject,
            "subject_name": self.subject_name,
            "prompt": self.prompt,
            "prompt_index": self.prompt_index,
            "image_index": self.image_index,
            "seed": self.seed,
            "references": list(self.references),
            "real_images": list(self.real_images),
        }


def item_seed(base_seed: int, subject: str, prompt_index: int, image_index: int) -> int:
    """A seed that depends only on (base seed, subject, prompt index, image index): 31-bit, stable."""
    digest = hashlib.sha256(f"{int(base_seed)}|{subject}|{int(prompt_index)}|{int(image_index)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a folder (not recursive), sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def select_references(images: Sequence[Path], policy: str, seed: int, subject: str) -> list[Path]:
    """The reference images given to the method: the first, all, or one chosen by (seed, subject)."""
    if policy not in REFERENCE_POLICIES:
        raise CustomShiftError(f"unknown reference policy {policy!r}: use one of {', '.join(REFERENCE_POLICIES)}")
    if not images:
        raise CustomShiftError(f"subject {subject!r} has no reference images")
    if policy == "first":
        return [images[0]]
    if policy == "all":
        return list(images)
    return [random.Random(f"{int(seed)}|{subject}").choice(list(images))]


def image_filename(subject: str, prompt_index: int, image_index: int) -> str:
    return f"{safe_file_name(subject)}/{prompt_index:02d}_{image_index:02d}.png"


def plan_work(subjects: Sequence[BenchmarkSubject], images_per_prompt: int, reference_policy: str,
              seed: int) -> list[WorkItem]:
    """Every image of the run, subject-major (so each process encodes each of its subjects once)."""
    if images_per_prompt < 1:
        raise CustomShiftError(f"--images-per-prompt must be at least 1 (got {images_per_prompt})")
    items = []
    for s in subjects:
        refs = tuple(str(p) for p in select_references(s.real_images, reference_policy, seed, s.subject))
        real = tuple(str(p) for p in s.real_images)
        for pi, prompt in enumerate(s.prompts):
            for ii in range(images_per_prompt):
                items.append(WorkItem(s.subject, s.subject_name, prompt, pi, ii, item_seed(seed, s.subject, pi, ii),
                                      image_filename(s.subject, pi, ii), refs, real))
    return items


def parse_subject_list(subjects: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b,c"`` or a list -> names (None or empty: all)."""
    if subjects is None:
        return None
    if isinstance(subjects, str):
        subjects = subjects.split(",")
    names = [s.strip() for s in subjects if s and s.strip()]
    return names or None


def check_prompt_count(prompts: int | None, available: int) -> int:
    if prompts is None:
        return available
    if prompts < 1 or prompts > available:
        raise CustomShiftError(f"--prompts must be between 1 and {available} (got {prompts})")
    return prompts


# ----------------------------------------------------------------------------------------- generation
class SubjectGenerator(Protocol):
    """What generation needs from a method: encode a subject once, then make images from it."""

    def encode(self, reference_images: list[Image.Image], subject_name: str) -> Any: ...

    def generate(self, subject: Any, prompt: str, seed: int) -> Image.Image: ...


@dataclass
class GenerationSettings:
    """The options of ``customshift generate`` that shape a benchmark's images."""

    model: str | None = None  # None: the packaged default model (as in `customshift generate`)
    weights: str | None = None
    steps: int = DEFAULT_STEPS
    height: int | None = None  # None: the model's default size (1024 for SD3-medium)
    width: int | None = None
    seed: int = 0
    shift_scale: float = DEFAULT_SHIFT_SCALE
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    reference_guidance_scale: float = DEFAULT_REFERENCE_GUIDANCE_SCALE
    dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16 - as `customshift generate`


DTYPES = ("auto", "fp32", "fp16", "bf16")


class PipelineGenerator:
    """:class:`SubjectGenerator` over a :class:`customshift.pipeline.CustomShiftPipeline`.

    The pipeline is loaded like ``customshift generate`` loads it (``customshift.generate.load_pipeline``);
    ``model="tiny"`` builds the tiny random SD3 pipeline instead (smoke tests).
    """

    def __init__(self, settings: GenerationSettings, device: str | torch.device | None = None, pipeline: Any = None):
        self.settings = settings
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if settings.dtype not in DTYPES:
            raise CustomShiftError(f"unknown dtype {settings.dtype!r}: use one of {', '.join(DTYPES)}")
        if pipeline is None:
            pipeline = self._load()
        self.pipe = pipeline

    def _load(self) -> Any:
        s = self.settings
        if s.model == TINY_MODEL:  # the name, never a folder called tiny: "./tiny" is the path
            from customshift.tiny import build_tiny_pipeline

            pipe = build_tiny_pipeline(variant="sd3", seed=0)
            if s.weights:
                pipe.load_customshift(s.weights)
            pipe = pipe.to(self.device)
        else:
            from customshift.generate import load_pipeline

            pipe = load_pipeline(s.model, s.weights, str(self.device), s.dtype)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # one bar for the run, not one per image
        return pipe

    def encode(self, reference_images: list[Image.Image], subject_name: str) -> Any:
        # References are prepared at the generation size.
        return self.pipe.encode_subject(reference_images, subject_name, height=self.settings.height,
                                        width=self.settings.width)

    def generate(self, subject: Any, prompt: str, seed: int) -> Image.Image:
        return self.generate_batch(subject, [prompt], [seed])[0]

    def generate_batch(self, subject: Any, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """One pipeline call for several prompts of one subject, the same images as one call each
        (customshift/batching.py; CPU generators: the initial noise is the same on every device)."""
        from customshift.batching import generate_batch

        s = self.settings
        return generate_batch(self.pipe, subject, prompts, seeds, num_inference_steps=s.steps,
                              guidance_scale=s.guidance_scale, reference_guidance_scale=s.reference_guidance_scale,
                              shift_scale=s.shift_scale, height=s.height, width=s.width)


def _is_done(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


@dataclass
class GenerationStats:
    assigned: int = 0
    generated: int = 0
    skipped: int = 0
    seconds: float = 0.0
    subjects_encoded: int = 0

    @property
    def seconds_per_image(self) -> float | None:
        return self.seconds / self.generated if self.generated else None


def pending_items(items: Sequence[WorkItem], images_root: str | Path, overwrite: bool = False) -> list[WorkItem]:
    """The items whose image is not on disk yet (all of them with ``overwrite``), in plan order."""
    images_root = Path(images_root)
    return [it for it in items if overwrite or not _is_done(images_root / it.image)]


def run_generation(items: Sequence[WorkItem], images_root: str | Path,
                   generator_factory: Callable[[], SubjectGenerator], *, overwrite: bool = False,
                   process_index: int = 0, num_processes: int = 1, show_progress: bool = True,
                   batch_size: int = 1) -> GenerationStats:
    """Make this process's share of ``items`` (every ``num_processes``-th from ``process_index``).

    Images already present are skipped unless ``overwrite``; the generator is only built when there is
    something to make; each subject is encoded once (items are subject-major). Up to ``batch_size``
    images of one subject go through one call when the generator has ``generate_batch`` (the same images
    as one at a time, customshift/batching.py).
    """
    from tqdm.auto import tqdm

    from customshift.batching import group_batches

    images_root = Path(images_root)
    mine = list(items)[process_index::num_processes]
    stats = GenerationStats(assigned=len(mine))
    todo = [it for it in mine if overwrite or not _is_done(images_root / it.image)]
    stats.skipped = len(mine) - len(todo)
    if not todo:
        return stats
    generator = generator_factory()
    key: tuple | None = None
    encoded: Any = None
    start = time.perf_counter()
    batched = getattr(generator, "generate_batch", None)
    bar = tqdm(total=len(todo), desc=f"generating [{process_index + 1}/{num_processes}]", disable=not show_progress)
    for batch in group_batches(todo, lambda it: (it.references, it.subject_name), batch_size if batched else 1):
        it = batch[0]
        if (it.references, it.subject_name) != key:
            encoded = None  # drop the previous subject's embedding before making the next
            encoded = generator.encode([load_image(p) for p in it.references], it.subject_name)
            key = (it.references, it.subject_name)
            stats.subjects_encoded += 1
        if batched is not None and len(batch) > 1:
            images = batched(encoded, [it.prompt for it in batch], [it.seed for it in batch])
        else:
            images = [generator.generate(encoded, it.prompt, it.seed)]
        for it, img in zip(batch, images, strict=True):
            rep.atomic_save_image(img.convert("RGB"), images_root / it.image)
            stats.generated += 1
        bar.update(len(batch))
    stats.seconds = time.perf_counter() - start
    return stats


# ------------------------------------------------------------------------------------- run bookkeeping
def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def check_run_config(out_dir: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume into a folder whose images were made with other settings."""
    path = out_dir / "run_config.json"
    if overwrite or not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CustomShiftError(f"{path} is unreadable ({exc}); remove it or pass --overwrite") from exc
    new = _normalise(config)
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in IMAGE_SHAPING_KEYS if old.get(k) != new.get(k)]
    if diffs:
        raise CustomShiftError(
            f"{out_dir} holds images made with other settings ({'; '.join(diffs)}). Pass --overwrite to "
            f"regenerate them, or choose another --out."
        )


# --------------------------------------------------------------------------------------------- scoring
@dataclass
class ScoreRecord:
    """One generated image to score."""

    image: Path
    image_rel: str
    subject: str
    prompt: str
    subject_name: str = ""
    prompt_index: int | None = None
    image_index: int | None = None
    seed: int | None = None
    real_images: tuple[Path, ...] = field(default_factory=tuple)
    references: tuple[Path, ...] = field(default_factory=tuple)


PER_IMAGE_FIELDS = ("subject", "subject_name", "prompt_index", "image_index", "seed", "image", "prompt", *METRICS)
PER_SUBJECT_FIELDS = ("subject", "subject_name", "n_generated", "n_real", *METRICS, "real_dino", "real_clip_i")


def build_metric_suite(dino_model: str, clip_model: str, out_dir: Path,
                       device: str | torch.device | None = None) -> MetricSuite:
    """The metric models; ``tiny`` builds the tiny random ones (smoke tests only) under ``out_dir``."""
    from customshift.eval import tiny_models

    # "tiny" always means the tiny models, even beside a folder of that name: "./tiny" is the path.
    if dino_model == TINY_MODEL:
        dino_model = str(tiny_models.build_tiny_dino(out_dir / "_tiny_metric_models" / "dino"))
    if clip_model == TINY_MODEL:
        clip_model = str(tiny_models.build_tiny_clip(out_dir / "_tiny_metric_models" / "clip"))
    return MetricSuite(dino_model=dino_model, clip_model=clip_model, device=device)


def _load_many(paths: Sequence[Path]) -> list[Image.Image]:
    return [load_image(p) for p in paths]


def score_and_report(records: Sequence[ScoreRecord], suite: MetricSuite, out_dir: str | Path, *, benchmark: str,
                     benchmark_title: str, method: str, generation: dict[str, Any] | None = None,
                     extra: dict[str, Any] | None = None, grids: bool = True, grid_thumb: int = 128,
                     chunk: int = 32, show_progress: bool = True) -> dict[str, Any]:
    """Score ``records`` subject by subject and write every report file into ``out_dir``.

    Writes ``per_image.csv``, ``per_subject.csv``, ``summary.json``, ``results.md``, ``grids/<subject>.png``
    and ``scatter.png`` (when published results exist for the benchmark); returns the summary.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if not records:
        raise CustomShiftError("nothing to score: no generated images")
    by_subject: dict[str, list[ScoreRecord]] = {}
    for r in records:
        by_subject.setdefault(r.subject, []).append(r)

    per_image_rows: list[dict[str, Any]] = []
    per_subject_rows: list[dict[str, Any]] = []
    for subject, recs in tqdm(by_subject.items(), desc="scoring", disable=not show_progress):
        real_paths = list(dict.fromkeys(p for r in recs for p in r.real_images))
        if not real_paths:
            raise ManifestError(f"subject {subject!r}: no real images to score against")
        real_imgs = _load_many(real_paths)
        real_dino, real_clip = suite.embed_real(real_imgs)
        gen_dino, gen_clip, thumbs = [], [], []
        for i in range(0, len(recs), chunk):
            imgs = _load_many([r.image for r in recs[i:i + chunk]])
            gen_dino.append(suite.dino.embed_images(imgs))
            gen_clip.append(suite.clip.embed_images(imgs))
            if grids:
                thumbs += [rep._thumb(im, grid_thumb) for im in imgs]
            del imgs
        text = suite.clip.embed_texts([r.prompt for r in recs])
        scores = score_embeddings(torch.cat(gen_dino), real_dino, torch.cat(gen_clip), real_clip, text)
        for k, r in enumerate(recs):
            row = {"subject": r.subject, "subject_name": r.subject_name, "prompt_index": r.prompt_index,
                   "image_index": r.image_index, "seed": r.seed, "image": r.image_rel, "prompt": r.prompt}
            row.update({m: scores.per_image[m][k] for m in METRICS})
            per_image_rows.append(row)
        per_subject_rows.append({"subject": subject, "subject_name": recs[0].subject_name,
                                 "n_generated": scores.n_generated, "n_real": scores.n_real, **scores.mean,
                                 "real_dino": scores.real_vs_real["dino"],
                                 "real_clip_i": scores.real_vs_real["clip_i"]})
        if grids:
            rows: dict[tuple, tuple[str, list[Image.Image]]] = {}
            for r, th in zip(recs, thumbs, strict=True):
                rows.setdefault((r.prompt_index, r.prompt), (r.prompt, []))[1].append(th)
            refs = {Path(p) for r in recs for p in r.references}
            grid = rep.subject_grid(f"{subject} ({recs[0].subject_name})" if recs[0].subject_name else subject,
                                    real_imgs, list(rows.values()), thumb=grid_thumb,
                                    highlight=[j for j, p in enumerate(real_paths) if Path(p) in refs])
            # The subject comes from a manifest: as a file name it must not leave grids/ (absolute, ../).
            rep.atomic_save_image(grid, inside(out_dir / "grids", f"{safe_file_name(subject)}.png"))
        del real_imgs, thumbs

    def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(sum(vals) / len(vals)) if vals else None

    published = []
    try:
        published = rep.published_entries(benchmark)
    except CustomShiftError as exc:  # a broken data file must not cost the run its report
        logger.warning("%s", exc)

    summary: dict[str, Any] = {
        "benchmark": benchmark,
        "benchmark_title": benchmark_title,
        "method": method,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "customshift_version": _package_version(),
        "generation": generation,
        "metric_models": suite.describe(),
        "protocol": {
            "dino": "cosine of DINO CLS embeddings (resize 256 bicubic, centre crop 224, ImageNet norm), "
                    "mean over all generated x real pairs of a subject",
            "clip_i": "cosine of CLIP image embeddings (resize bicubic, centre crop, CLIP norm), "
                      "mean over all generated x real pairs of a subject",
            "clip_t": "cosine of the CLIP image embedding and the CLIP text embedding of the prompt, mean over images",
            "clipscore": "2.5 * max(clip_t, 0) per image (CLIPScore; CustomConcept101 evaluate.py), mean over images",
            "aggregate": "subject_mean: mean over subjects of the subject means (the headline numbers); "
                         "image_mean: mean over all generated images",
        },
        "counts": {"subjects": len(per_subject_rows), "images": len(per_image_rows),
                   "real_images": sum(r["n_real"] for r in per_subject_rows)},
        "metrics": {
            "subject_mean": {m: mean_of(per_subject_rows, m) for m in METRICS},
            "image_mean": {m: mean_of(per_image_rows, m) for m in METRICS},
            "real_vs_real": {"dino": mean_of(per_subject_rows, "real_dino"),
                             "clip_i": mean_of(per_subject_rows, "real_clip_i")},
        },
        "files": {"per_image": "per_image.csv", "per_subject": "per_subject.csv", "markdown": "results.md",
                  "grids": "grids/" if grids else None, "scatter": None},
    }
    if extra:
        summary.update(extra)

    rep.write_csv(out_dir / "per_image.csv", per_image_rows, PER_IMAGE_FIELDS)
    rep.write_csv(out_dir / "per_subject.csv", per_subject_rows, PER_SUBJECT_FIELDS)
    axes = _scatter_axes(benchmark)
    if published and axes:
        m = summary["metrics"]["subject_mean"]
        if rep.save_scatter_plot(out_dir / "scatter.png", method, (m[axes[0]], m[axes[1]]), published,
                                 x_metric=axes[0], y_metric=axes[1], title=f"{benchmark_title}: "
                                 f"{axes[1].upper().replace('_', '-')} vs {axes[0].upper().replace('_', '-')}"):
            summary["files"]["scatter"] = "scatter.png"
    rep.atomic_write_text(out_dir / "results.md", rep.render_markdown(summary, per_subject_rows, published))
    rep.atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _package_version() -> str:
    try:
        from customshift import __version__

        return str(__version__)
    except ImportError:  # an unusual install: ask the metadata
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("customshift")
        except PackageNotFoundError:
            return "unknown"


def _scatter_axes(benchmark: str) -> tuple[str, str] | None:
    try:
        spec = rep.load_published_results().get("benchmarks", {}).get(benchmark, {})
    except CustomShiftError:
        return None
    axes = spec.get("scatter_axes")
    return (axes[0], axes[1]) if axes else None


# ----------------------------------------------------------------------------------------- the driver
def write_manifest(path: Path, items: Sequence[WorkItem]) -> None:
    rep.atomic_write_text(path, "".join(json.dumps(it.manifest_row(), ensure_ascii=False) + "\n" for it in items))


def run_benchmark(*, benchmark: str, benchmark_title: str, subjects: Sequence[BenchmarkSubject],
                  out_dir: str | Path, settings: GenerationSettings, images_per_prompt: int = 4,
                  reference_policy: str = "first",
                  dino_model: str = DEFAULT_DINO_MODEL, clip_model: str = DEFAULT_CLIP_MODEL,
                  overwrite: bool = False, device: str | None = None, plan_only: bool = False,
                  skip_metrics: bool = False, method_name: str = "CustomShift", grids: bool = True,
                  generator: SubjectGenerator | None = None, pipeline: Any = None,
                  process_index: int | None = None, num_processes: int | None = None,
                  show_progress: bool = True, extra: dict[str, Any] | None = None,
                  batch_size: int = 1) -> dict[str, Any] | None:
    """Plan, generate (resumable, sharded), score and report one benchmark run.

    Returns the summary on the main process (None on the others). With ``plan_only`` it only writes
    ``manifest.jsonl`` (the images another method must produce, for ``evaluate folder``); with
    ``skip_metrics`` it stops after generation.
    """
    out_dir = Path(out_dir)
    items = plan_work(subjects, images_per_prompt, reference_policy, settings.seed)
    if not items:
        raise CustomShiftError("the selection has no images to make")
    config = {"benchmark": benchmark, **asdict(settings), "reference_policy": reference_policy,
              "images_per_prompt": images_per_prompt, "subjects": [s.subject for s in subjects],
              "prompts_per_subject": {s.subject: len(s.prompts) for s in subjects}, "method": method_name}
    # Without a GPU (or with device="cpu") processes launched by accelerate/torchrun meet over gloo.
    on_cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    dist = ProcessShare(cpu=on_cpu, index=process_index, count=num_processes)
    if plan_only:
        if dist.is_main:
            write_manifest(out_dir / "manifest.jsonl", items)
        return {"manifest": str(out_dir / "manifest.jsonl"), "images": len(items)} if dist.is_main else None

    check_run_config(out_dir, config, overwrite)
    if dist.is_main:
        rep.atomic_write_json(out_dir / "run_config.json", _normalise(config))
        write_manifest(out_dir / "manifest.jsonl", items)
    images_root = out_dir / "images"
    gen_device = device
    if dist.device is not None and (device is None or (dist.count > 1 and torch.device(device).index is None
                                                       and torch.device(device).type == dist.device.type)):
        gen_device = dist.device  # one GPU per process

    def factory() -> SubjectGenerator:
        if generator is not None:
            return generator
        return PipelineGenerator(settings, device=gen_device, pipeline=pipeline)

    # Every process looks at the same folder before anyone writes, then the images still to make are dealt
    # round-robin: the shares stay balanced when resuming, whatever the number of processes.
    pending = pending_items(items, images_root, overwrite)
    dist.wait()
    stats = run_generation(pending, images_root, factory, overwrite=overwrite, process_index=dist.index,
                           num_processes=dist.count, show_progress=show_progress, batch_size=batch_size)
    logger.info("process %d/%d: %d images made, %d of the run's %d were already there", dist.index + 1, dist.count,
                stats.generated, len(items) - len(pending), len(items))
    dist.wait()
    if not dist.is_main:
        return None
    missing = [it.image for it in items if not _is_done(images_root / it.image)]
    if missing:
        raise CustomShiftError(f"{len(missing)} images are missing after generation (first: {missing[0]})")
    gen_info = {**_normalise(config), "device": str(gen_device or ""),
                "already_present": len(items) - len(pending),
                "main_process_stats": {**asdict(stats), "seconds_per_image": stats.seconds_per_image},
                "num_processes": dist.count}
    if skip_metrics:
        return {"generation": gen_info, "images": len(items), "manifest": str(out_dir / "manifest.jsonl")}
    suite = build_metric_suite(dino_model, clip_model, out_dir, device=device)
    records = [ScoreRecord(image=images_root / it.image, image_rel=it.image, subject=it.subject, prompt=it.prompt,
                           subject_name=it.subject_name, prompt_index=it.prompt_index, image_index=it.image_index,
                           seed=it.seed, real_images=tuple(Path(p) for p in it.real_images),
                           references=tuple(Path(p) for p in it.references)) for it in items]
    return score_and_report(records, suite, out_dir, benchmark=benchmark, benchmark_title=benchmark_title,
                            method=method_name, generation=gen_info, extra=extra, grids=grids,
                            show_progress=show_progress)


class BenchmarkOptions(TypedDict, total=False):
    """The keywords a benchmark runner takes beyond its dataset: :class:`GenerationSettings`' fields (less
    ``model``/``weights``) and :func:`run_benchmark`'s own, with their defaults."""

    images_per_prompt: int
    reference_policy: str
    steps: int
    height: int | None
    width: int | None
    seed: int
    shift_scale: float
    guidance_scale: float
    reference_guidance_scale: float
    dtype: str
    dino_model: str
    clip_model: str
    overwrite: bool
    device: str | None
    plan_only: bool
    skip_metrics: bool
    method_name: str
    grids: bool
    show_progress: bool
    generator: SubjectGenerator | None
    pipeline: Any
    process_index: int | None
    num_processes: int | None
    batch_size: int


def run_dataset_benchmark(benchmark: str, benchmark_title: str, subjects: Sequence[BenchmarkSubject],
                          data_dir: str | Path, out_dir: str | Path, model: str | None, weights: str | None,
                          **options: Unpack[BenchmarkOptions]) -> dict[str, Any] | None:
    """:func:`run_benchmark` on subjects loaded from ``data_dir``, the options split into the settings
    that shape the images and the run's own."""
    shaping = {f.name for f in fields(GenerationSettings)}
    settings = GenerationSettings(model=str(model) if model else None, weights=str(weights) if weights else None,
                                  **{k: v for k, v in options.items() if k in shaping})
    rest = {k: v for k, v in options.items() if k not in shaping}
    return run_benchmark(benchmark=benchmark, benchmark_title=benchmark_title, subjects=subjects,
                         out_dir=out_dir, settings=settings, extra={"data": str(Path(data_dir).resolve())}, **rest)
