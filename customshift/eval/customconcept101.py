"""CustomConcept101 (Kumari et al., Custom Diffusion, arXiv:2212.04488): 101 concepts x 20 prompts.

Single-concept set. ``dataset.json`` lists each concept's ``instance_prompt`` (``photo of a <new1> dog``),
``class_prompt``, ``instance_data_dir`` (``./benchmark_dataset/pet_dog1``) and ``prompt_filename``
(``prompts/dog.txt``: 20 prompts with ``{}`` where the subject goes). A tuning-free method has no learned
``<new1>`` token: the subject phrase is the instance prompt's noun phrase without it (``dog``), and each
prompt gets it in place of ``{}`` (``dog swimming in a pool.``). The same phrase is the subject name given
to the method, and the prompt is the text of CLIP-T / CLIPScore.

``dataset.json`` and ``prompts/`` come from the benchmark's repository (adobe-research/custom-diffusion,
``customconcept101/``); the images are distributed separately (``benchmark_dataset.zip``). ``--data`` is
the folder of the unzipped images (``benchmark_dataset/`` or the folder that holds it); ``dataset_json``
defaults to ``<data>/dataset.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from customshift.errors import CustomShiftError, ManifestError
from customshift.eval.harness import (
    BenchmarkOptions,
    BenchmarkSubject,
    check_prompt_count,
    list_images,
    parse_subject_list,
    run_dataset_benchmark,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

MODIFIER_TOKEN = "<new1>"
_PHOTO_PREFIX = re.compile(r"^\s*(a\s+)?photo\s+of\s+(an?\s+|the\s+)?", re.IGNORECASE)
_REQUIRED_KEYS = ("instance_prompt", "class_prompt", "instance_data_dir", "prompt_filename")


@dataclass(frozen=True)
class Concept:
    """One entry of dataset.json."""

    concept_id: str  # the last part of instance_data_dir, e.g. pet_dog1
    instance_prompt: str
    class_prompt: str
    instance_data_dir: str
    prompt_filename: str
    subject_phrase: str


def subject_phrase(instance_prompt: str, token: str = "") -> str:
    """``photo of a <new1> dog`` -> ``dog`` (``token`` replaces ``<new1>``; the article goes)."""
    text = _PHOTO_PREFIX.sub("", instance_prompt)
    return " ".join(text.replace(MODIFIER_TOKEN, token).split())


def render_prompt(template: str, phrase: str) -> str:
    """Put the subject phrase in place of ``{}`` (and of any ``<new1>`` left in a prompt)."""
    text = template.replace("{}", phrase).replace(MODIFIER_TOKEN, phrase)
    return " ".join(text.split())


def read_prompt_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CustomShiftError(f"cannot read the prompt file {path}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip()]
    for i, p in enumerate(prompts, 1):
        if "{}" not in p and MODIFIER_TOKEN not in p:
            raise ManifestError(f"{path}: prompt {i} ({p!r}) has no '{{}}' placeholder for the subject")
    if not prompts:
        raise ManifestError(f"{path}: no prompts")
    return prompts


def parse_dataset_json(path: str | Path) -> list[Concept]:
    """The concepts of a single-concept ``dataset.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a list of concepts (the single-concept dataset.json)")
    concepts, seen = [], set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or any(k not in entry for k in _REQUIRED_KEYS):
            raise ManifestError(f"{path}: entry {i} lacks one of {', '.join(_REQUIRED_KEYS)}")
        cid = PurePosixPath(entry["instance_data_dir"].replace("\\", "/")).name
        if not cid or cid in seen:
            raise ManifestError(f"{path}: entry {i} has an empty or repeated instance_data_dir {cid!r}")
        seen.add(cid)
        phrase = subject_phrase(entry["instance_prompt"]) or entry["class_prompt"].strip()
        concepts.append(Concept(cid, entry["instance_prompt"], entry["class_prompt"], entry["instance_data_dir"],
                                entry["prompt_filename"], phrase))
    return concepts


def _find_images_dir(concept: Concept, data_dir: Path, spec_dir: Path) -> Path:
    rel = PurePosixPath(concept.instance_data_dir.replace("\\", "/"))
    rel_parts = [p for p in rel.parts if p not in (".", "")]
    candidates = [data_dir.joinpath(*rel_parts), data_dir / concept.concept_id, spec_dir.joinpath(*rel_parts)]
    for c in candidates:
        if c.is_dir():
            return c
    raise CustomShiftError(
        f"the images of concept {concept.concept_id!r} are not found (looked in "
        f"{', '.join(str(c) for c in dict.fromkeys(candidates))}). Point --data at the unzipped "
        f"benchmark_dataset folder (or the folder that holds it)."
    )


def load_customconcept101(data_dir: str | Path, dataset_json: str | Path | None = None,
                          subjects: str | Sequence[str] | None = None,
                          prompts: int | None = None) -> list[BenchmarkSubject]:
    """The concepts (all, or the named ones), each with its first ``prompts`` prompts and its images."""
    data_dir = Path(data_dir).expanduser().resolve()
    if dataset_json is None:
        dataset_json = data_dir / "dataset.json"
        if not dataset_json.is_file():
            raise CustomShiftError(
                f"{dataset_json} not found: pass the benchmark's dataset.json (customconcept101/dataset.json of "
                f"adobe-research/custom-diffusion, with its prompts/ folder beside it) with --dataset-json"
            )
    dataset_json = Path(dataset_json).expanduser().resolve()
    spec_dir = dataset_json.parent
    concepts = parse_dataset_json(dataset_json)
    by_id = {c.concept_id: c for c in concepts}
    wanted = parse_subject_list(subjects) or list(by_id)
    unknown = [s for s in wanted if s not in by_id]
    if unknown:
        raise CustomShiftError(f"unknown CustomConcept101 concept(s) {', '.join(unknown)}; known: "
                               f"{', '.join(by_id)}")
    out = []
    for cid in dict.fromkeys(wanted):
        c = by_id[cid]
        prompt_path = spec_dir / c.prompt_filename
        if not prompt_path.is_file() and (data_dir / c.prompt_filename).is_file():
            prompt_path = data_dir / c.prompt_filename
        templates = read_prompt_file(prompt_path)
        n = check_prompt_count(prompts, len(templates))
        folder = _find_images_dir(c, data_dir, spec_dir)
        photos = list_images(folder)
        if not photos:
            raise CustomShiftError(f"{folder} holds no images")
        out.append(BenchmarkSubject(subject=cid, subject_name=c.subject_phrase,
                                    prompts=[render_prompt(t, c.subject_phrase) for t in templates[:n]],
                                    real_images=photos, category=c.class_prompt))
    return out


def run_customconcept101(
    data_dir: str | Path,
    out_dir: str | Path,
    model: str | None = None,
    weights: str | None = None,
    *,
    dataset_json: str | Path | None = None,
    subjects: str | Sequence[str] | None = None,
    prompts: int | None = None,
    **options: Unpack[BenchmarkOptions],
) -> dict[str, Any] | None:
    """Run the CustomConcept101 single-concept protocol into ``out_dir`` (see :func:`run_dreambench`).

    ``subjects`` are concept ids (the folder names: ``pet_dog1,scene_barn``); ``prompts`` the first N of
    each concept's 20 prompts. Text alignment is reported both as CLIP-T and as CLIPScore
    (2.5 x max(cos, 0)), the number the benchmark's own evaluate.py prints.
    """
    chosen = load_customconcept101(data_dir, dataset_json=dataset_json, subjects=subjects, prompts=prompts)
    return run_dataset_benchmark("customconcept101", "CustomConcept101", chosen, data_dir, out_dir, model, weights,
                                 **options)
