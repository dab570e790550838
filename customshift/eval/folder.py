"""Scoring images made by any method, with the same metric code as the benchmark runs.

The manifest lists the images, one row each, as JSON lines (``.jsonl``), a JSON list (``.json``) or CSV
(``.csv``, a header row then one row per image):

========================  ========  =================================================================
field                     needed    meaning
========================  ========  =================================================================
``image``                 yes       the image file, relative to ``--images`` (or absolute)
``subject``               yes       the subject id: images of a subject are scored together
``prompt``                yes       the prompt the image was made from (the text of CLIP-T)
``real_images``           \\*        the subject's real images (a JSON list; in CSV separated by ``;``)
``real_dir``              \\*        or a folder holding them
``subject_name``          no        how the prompt names the subject (reports only)
``prompt_index``,         no        grouping in the grids and the per-image CSV
``image_index``, ``seed``
========================  ========  =================================================================

\\* Real images are needed once per subject: one row of the subject may carry them for all, or
``--real-root DIR`` gives ``DIR/<subject>/``. Relative paths in the manifest are relative to the
manifest's folder. ``manifest.jsonl`` of a benchmark run (``evaluate dreambench --plan-only`` writes
it without generating anything) is such a manifest: another method makes the listed images, with the
listed prompts, seeds and reference images, under the listed names, and is scored with
``evaluate folder --images ITS_FOLDER --manifest manifest.jsonl``.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from customshift.errors import CustomShiftError, ManifestError
from customshift.eval.harness import ScoreRecord, build_metric_suite, list_images, score_and_report
from customshift.eval.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL

logger = logging.getLogger(__name__)

BENCHMARK_TITLES = {"dreambench": "DreamBench", "customconcept101": "CustomConcept101", "folder": "Folder"}


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs of a .jsonl / .json / .csv manifest."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc}") from exc
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            rows.append((reader.line_num, {k.strip(): (v.strip() if isinstance(v, str) else v)
                                           for k, v in row.items() if k is not None}))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise ManifestError(f"{path}: expected a JSON list of rows")
        rows = [(i + 1, r) for i, r in enumerate(data)]
    else:  # .jsonl and anything else: JSON lines
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except ValueError as exc:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise ManifestError(f"{path}:{lineno}: a row must be an object with image, subject and prompt")
    return rows


def _opt_int(value: Any, path: Path, lineno: int, key: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{path}:{lineno}: {key} must be an integer (got {value!r})") from None


def _resolve(base: Path, p: str | Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else base / p


def read_manifest(manifest: str | Path, images_dir: str | Path, real_root: str | Path | None = None,
                  allow_missing: bool = False) -> list[ScoreRecord]:
    """The rows of a manifest as records to score; checks that every image and real folder exists."""
    manifest = Path(manifest).expanduser().resolve()
    images_dir = Path(images_dir).expanduser().resolve()
    base = manifest.parent
    rows = _read_rows(manifest)
    if not rows:
        raise ManifestError(f"{manifest}: the manifest has no rows")

    real_by_subject: dict[str, tuple[Path, ...]] = {}
    parsed = []
    for lineno, row in rows:
        missing = [k for k in ("image", "subject", "prompt") if not str(row.get(k) or "").strip()]
        if missing:
            raise ManifestError(f"{manifest}:{lineno}: missing {', '.join(missing)}")
        subject = str(row["subject"]).strip()
        real: tuple[Path, ...] = ()
        if row.get("real_images"):
            items = row["real_images"]
            if isinstance(items, str):
                items = [s for s in items.split(";") if s.strip()]
            if not isinstance(items, list):
                raise ManifestError(f"{manifest}:{lineno}: real_images must be a list of paths")
            real = tuple(_resolve(base, p) for p in items)
        elif row.get("real_dir"):
            folder = _resolve(base, row["real_dir"])
            if not folder.is_dir():
                raise ManifestError(f"{manifest}:{lineno}: real_dir {folder} is not a folder")
            real = tuple(list_images(folder))
        if real:
            if real_by_subject.get(subject, real) != real:
                raise ManifestError(f"{manifest}:{lineno}: subject {subject!r} is given two different sets of "
                                    f"real images")
            real_by_subject[subject] = real
        parsed.append((lineno, row, subject))

    records, absent = [], []
    for lineno, row, subject in parsed:
        real = real_by_subject.get(subject)
        if real is None and real_root is not None:
            folder = Path(real_root).expanduser().resolve() / subject
            if not folder.is_dir():
                raise ManifestError(f"{manifest}:{lineno}: no real images for subject {subject!r} "
                                    f"({folder} is not a folder)")
            real = real_by_subject[subject] = tuple(list_images(folder))
        if not real:
            raise ManifestError(f"{manifest}:{lineno}: no real images for subject {subject!r}: give real_images "
                                f"or real_dir in a row of the subject, or --real-root")
        for p in real:
            if not p.is_file():
                raise ManifestError(f"{manifest}:{lineno}: real image {p} not found")
        rel = str(row["image"]).strip()
        image = _resolve(images_dir, rel)
        if not image.is_file():
            absent.append(rel)
            continue
        records.append(ScoreRecord(
            image=image, image_rel=rel, subject=subject, prompt=str(row["prompt"]),
            subject_name=str(row.get("subject_name") or subject),
            prompt_index=_opt_int(row.get("prompt_index"), manifest, lineno, "prompt_index"),
            image_index=_opt_int(row.get("image_index"), manifest, lineno, "image_index"),
            seed=_opt_int(row.get("seed"), manifest, lineno, "seed"), real_images=real,
            references=_references(row, base)))
    if absent:
        msg = f"{len(absent)} of {len(parsed)} images of {manifest} are missing from {images_dir} (first: {absent[0]})"
        if not allow_missing:
            raise CustomShiftError(msg + "; make them, or pass --allow-missing to score the others")
        logger.warning("%s; scoring the %d present", msg, len(records))
    if not records:
        raise CustomShiftError(f"none of the images of {manifest} is in {images_dir}")
    return records


def _references(row: dict[str, Any], base: Path) -> tuple[Path, ...]:
    refs = row.get("references") or ()
    if isinstance(refs, str):
        refs = [s for s in refs.split(";") if s.strip()]
    return tuple(_resolve(base, p) for p in refs) if isinstance(refs, (list, tuple)) else ()


def _detect_benchmark(manifest: Path) -> str:
    cfg = manifest.parent / "run_config.json"
    try:
        name = json.loads(cfg.read_text(encoding="utf-8")).get("benchmark")
    except (OSError, ValueError, AttributeError):
        return "folder"
    return name if name in BENCHMARK_TITLES else "folder"


def run_folder(
    images_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    *,
    real_root: str | Path | None = None,
    benchmark: str | None = None,
    method_name: str = "method",
    dino_model: str = DEFAULT_DINO_MODEL,
    clip_model: str = DEFAULT_CLIP_MODEL,
    device: str | None = None,
    allow_missing: bool = False,
    grids: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score the images of ``manifest`` (found under ``images_dir``) and write the report into ``out_dir``.

    ``benchmark`` (``dreambench``, ``customconcept101`` or ``folder``) picks the published results the
    run is placed beside; by default it is read from the ``run_config.json`` beside the manifest (a
    benchmark run's own manifest) and is ``folder`` (no comparison) otherwise.
    """
    manifest = Path(manifest).expanduser().resolve()
    bench = benchmark or _detect_benchmark(manifest)
    if bench not in BENCHMARK_TITLES:
        raise CustomShiftError(f"unknown benchmark {bench!r}: use one of {', '.join(BENCHMARK_TITLES)}")
    records = read_manifest(manifest, images_dir, real_root=real_root, allow_missing=allow_missing)
    out_dir = Path(out_dir)
    suite = build_metric_suite(dino_model, clip_model, out_dir, device=device)
    return score_and_report(records, suite, out_dir, benchmark=bench, benchmark_title=BENCHMARK_TITLES[bench],
                            method=method_name, generation=None, grids=grids, show_progress=show_progress,
                            extra={"images_dir": str(Path(images_dir).resolve()), "manifest": str(manifest)})
