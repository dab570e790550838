"""DreamBench, the DreamBooth dataset (Ruiz et al., arXiv:2208.12242): 30 subjects x 25 prompts.

The dataset folder is laid out as google/dreambooth ships it (``dataset/``): ``<subject>/NN.jpg`` for
each subject and ``prompts_and_classes.txt`` with the subject -> class table and two prompt lists (one
for objects, one for live subjects: the dogs and cats). The prompts are Python ``.format`` templates
``'a {0} {1} in the jungle'.format(unique_token, class_token)``; a tuning-free method has no unique
token, so the prompt names the subject by its class noun: ``a dog in the jungle``. The real images
of a subject are all the photos of its folder; the reference images handed to the method are chosen
by the reference policy (``first`` by default).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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

PROMPTS_FILE = "prompts_and_classes.txt"
#: The classes of DreamBench's live subjects (they get the live-subject prompt list).
LIVE_CLASSES = frozenset({"dog", "cat"})

_CLASS_LINE = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*,\s*(.+?)\s*$")
_PROMPT_LINE = re.compile(r"""^\s*(?P<q>['"])(?P<t>.*?)(?P=q)\s*\.format\(""")


@dataclass(frozen=True)
class DreamBenchSpec:
    """The content of ``prompts_and_classes.txt``."""

    classes: dict[str, str]  # subject -> class noun
    object_prompts: tuple[str, ...]  # templates with {0} (unique token) and {1} (class token)
    live_prompts: tuple[str, ...]

    def is_live(self, subject: str) -> bool:
        return self.classes[subject] in LIVE_CLASSES

    def templates_for(self, subject: str) -> tuple[str, ...]:
        return self.live_prompts if self.is_live(subject) else self.object_prompts


def parse_prompts_and_classes(text: str, source: str = PROMPTS_FILE) -> DreamBenchSpec:
    """Parse ``prompts_and_classes.txt``: the ``subject_name,class`` table, then the two prompt lists."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = "preamble"
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        low = line.lower()
        if not line:
            continue
        if low.replace(" ", "") == "subject_name,class":
            section = "classes"
            continue
        if low.startswith("object prompts"):
            section = "object"
            continue
        if low.startswith("live subject prompts"):
            section = "live"
            continue
        if section == "classes":
            if low == "prompts":
                section = "prompts"
                continue
            m = _CLASS_LINE.match(line)
            if not m:
                raise ManifestError(f"{source}:{lineno}: expected 'subject_name,class', got {line!r}")
            subject, cls = m.group(1), m.group(2).strip()
            if subject in classes:
                raise ManifestError(f"{source}:{lineno}: subject {subject!r} listed twice")
            classes[subject] = cls
        elif section in lists:
            if line.startswith("prompt_list") or line in ("]", "],"):
                continue
            m = _PROMPT_LINE.match(line)
            if not m:
                raise ManifestError(f"{source}:{lineno}: cannot read a prompt template from {line!r}")
            template = m.group("t")
            if "{0}" not in template or "{1}" not in template:
                raise ManifestError(f"{source}:{lineno}: the template {template!r} lacks {{0}} or {{1}}")
            lists[section].append(template)
    if not classes:
        raise ManifestError(f"{source}: no 'subject_name,class' table found")
    for name, templates in lists.items():
        if not templates:
            raise ManifestError(f"{source}: no {'live subject' if name == 'live' else 'object'} prompts found")
    return DreamBenchSpec(classes=classes, object_prompts=tuple(lists["object"]), live_prompts=tuple(lists["live"]))


def render_prompt(template: str, class_noun: str, unique_token: str = "") -> str:
    """``'a {0} {1} in the snow'`` -> ``'a dog in the snow'`` (no unique token: single spaces)."""
    return " ".join(template.format(unique_token, class_noun).split())


def read_spec(data_dir: str | Path) -> DreamBenchSpec:
    path = Path(data_dir) / PROMPTS_FILE
    if not path.is_file():
        raise CustomShiftError(
            f"{path} not found: --data must be the DreamBench dataset folder as google/dreambooth ships it "
            f"(its dataset/ folder: {PROMPTS_FILE} and one folder of photos per subject)"
        )
    return parse_prompts_and_classes(path.read_text(encoding="utf-8"), source=str(path))


def load_dreambench(data_dir: str | Path, subjects: str | Sequence[str] | None = None,
                    prompts: int | None = None) -> list[BenchmarkSubject]:
    """The subjects of DreamBench (all, or the named ones in the given order), with the first ``prompts``."""
    data_dir = Path(data_dir).expanduser().resolve()
    spec = read_spec(data_dir)
    wanted = parse_subject_list(subjects)
    if wanted is None:
        wanted = list(spec.classes)
    unknown = [s for s in wanted if s not in spec.classes]
    if unknown:
        raise CustomShiftError(f"unknown DreamBench subject(s) {', '.join(unknown)}; known: "
                               f"{', '.join(spec.classes)}")
    out = []
    for subject in dict.fromkeys(wanted):
        folder = data_dir / subject
        if not folder.is_dir():
            raise CustomShiftError(f"{folder} not found: the dataset folder lacks subject {subject!r}")
        photos = list_images(folder)
        if not photos:
            raise CustomShiftError(f"{folder} holds no images")
        templates = spec.templates_for(subject)
        n = check_prompt_count(prompts, len(templates))
        cls = spec.classes[subject]
        out.append(BenchmarkSubject(subject=subject, subject_name=cls,
                                    prompts=[render_prompt(t, cls) for t in templates[:n]], real_images=photos,
                                    category="live" if spec.is_live(subject) else "object"))
    return out


def run_dreambench(
    data_dir: str | Path,
    out_dir: str | Path,
    model: str | None = None,
    weights: str | None = None,
    *,
    subjects: str | Sequence[str] | None = None,
    prompts: int | None = None,
    **options: Unpack[BenchmarkOptions],
) -> dict[str, Any] | None:
    """Run the DreamBench protocol: generate (resumable, sharded), score, report into ``out_dir``.

    ``model`` is a diffusers folder or hub id of the base model (None: the packaged default model, as
    ``customshift generate``; ``tiny``: the tiny random pipeline, smoke tests only); ``weights`` the
    CustomShift weights; ``dtype`` auto|fp32|fp16|bf16; ``height``/``width`` None: the model's default.
    Returns the summary dict on the main process and None on the others. ``generator`` (an object with
    ``encode(images, name)`` and ``generate(subject, prompt, seed)``) or ``pipeline`` (a built
    CustomShiftPipeline) replace loading ``model``; ``process_index``/``num_processes`` override accelerate's (tests).
    """
    chosen = load_dreambench(data_dir, subjects=subjects, prompts=prompts)
    return run_dataset_benchmark("dreambench", "DreamBench", chosen, data_dir, out_dir, model, weights, **options)
