"""Generation jobs for the CLI (single prompts and JSONL batches): loading, caching, writing, resuming.

Every image is written atomically with a JSON sidecar holding everything needed to reproduce it; the
sidecar is written last, so an image counts as done exactly when its sidecar exists. Existing outputs
are never overwritten unless asked, which also makes an interrupted batch resumable.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .batching import ProcessShare, generate_batch, group_batches, shard
from .checks import MAX_SEED, describe_missing, image_problem
from .errors import CustomShiftError, ManifestError

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class GenerationParams:
    """Knobs shared by every image of a run."""

    steps: int = 28
    guidance_scale: float = 7.0
    reference_guidance_scale: float = 0.0
    shift_scale: float = 1.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    reference_dtype: str | None = None  # precision of the cached reference K/V (None: the model's)


@dataclass
class Job:
    """One image to make: ``out/<id>.png`` from references + subject + prompt with a seed.

    ``others`` are further subjects of the same image, each ``(references, name)``; the pipeline then gets
    ``subject=[first, *others]`` (several subjects, each through CADS with its own name's relevance).
    """

    id: str
    references: list[str]
    subject: str
    prompt: str
    seed: int
    source: str = ""  # where the job came from (manifest line), for error messages
    extra: dict[str, Any] = field(default_factory=dict)
    others: list[tuple[list[str], str]] = field(default_factory=list)

    @property
    def subject_keys(self) -> tuple[tuple[tuple[str, ...], str], ...]:
        """Every subject of the image as ``(references, name)``, the first one first."""
        return ((tuple(self.references), self.subject), *((tuple(r), name) for r, name in self.others))


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def single_jobs(
    references: Sequence[str], subject: str, prompts: Sequence[str], seed: int, num_images: int,
    others: Sequence[tuple[list[str], str]] = (),
) -> list[Job]:
    """Jobs of ``customshift generate --prompt ...``: image k of prompt i gets seed ``seed + k``."""
    jobs = []
    for i, prompt in enumerate(prompts):
        for k in range(num_images):
            jobs.append(Job(f"{i:02d}-{slug(prompt)}-seed{seed + k}", list(references), subject, prompt, seed + k,
                            others=[(list(r), name) for r, name in others]))
    return jobs


def pair_subjects(references: Sequence[str], subjects: Sequence[str]) -> list[tuple[list[str], str]]:
    """``--reference``/``--subject`` as ``(references, name)`` per subject.

    One ``--subject``: every reference is an image of it. Several: as many references as subjects, the k-th
    ``--reference`` for the k-th ``--subject`` (``--reference a.png --subject robot --reference b.png
    --subject tree``).
    """
    if len(subjects) == 1:
        return [(list(references), subjects[0])]
    if len(references) != len(subjects):
        raise CustomShiftError(f"{len(subjects)} --subject options need one --reference each (the k-th reference is "
                               f"the k-th subject's), got {len(references)} references")
    lowered = [name.strip().lower() for name in subjects]
    if len(set(lowered)) != len(lowered):
        raise CustomShiftError(f"the subjects must have different names, got {', '.join(subjects)}")
    return [([ref], name) for ref, name in zip(references, subjects, strict=True)]


def read_manifest(path: str | Path, seed: int = 0) -> list[Job]:
    """Jobs of a JSONL batch manifest; each line has ``id``, ``reference``, ``subject``, ``prompt``.

    ``reference`` (a path or a list of paths) is relative to the manifest's folder; other fields are
    ignored (an optional ``seed`` is honoured). Several subjects in one image: ``subjects``, a list of
    ``{"reference": ..., "subject": ...}`` objects, in place of ``reference`` and ``subject``. Every problem
    is reported with its line number before anything is generated.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read manifest {path}: {error}") from None
    jobs, problems, seen = [], [], set()
    decoded: dict[str, str | None] = {}  # reference -> why it cannot be decoded (None: fine), once per file
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{where}: not valid JSON ({error.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object")
            continue
        entries = _subject_entries(row)
        if isinstance(entries, str):
            problems.append(f"{where}: {entries}")
            continue
        if entries:
            row = {**row, "reference": entries[0]["reference"], "subject": entries[0]["subject"]}
        missing = [key for key in ("id", "reference", "subject", "prompt") if key not in row]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        job_id = str(row["id"])
        if not _SAFE_ID.match(job_id):
            problems.append(f"{where}: id {job_id!r} must be letters, digits, '.', '_' or '-' (it names a file)")
            continue
        if job_id in seen:
            problems.append(f"{where}: duplicate id {job_id!r}")
            continue
        seen.add(job_id)
        refs = row["reference"] if isinstance(row["reference"], list) else [row["reference"]]
        if not refs or not all(isinstance(r, str) and r for r in refs):
            problems.append(f"{where}: reference must be a path or a list of paths")
            continue
        if not all(isinstance(row[key], str) and row[key].strip() for key in ("subject", "prompt")):
            problems.append(f"{where}: subject and prompt must be non-empty strings")
            continue
        others, bad = [], None
        for entry in entries[1:]:
            more = entry["reference"] if isinstance(entry["reference"], list) else [entry["reference"]]
            if not more or not all(isinstance(r, str) and r for r in more):
                bad = "reference must be a path or a list of paths"
            elif not isinstance(entry["subject"], str) or not entry["subject"].strip():
                bad = "subject and prompt must be non-empty strings"
            else:
                refs_missing = [p for p in (describe_missing(path.parent / r) for r in more) if p]
                bad = f"reference {refs_missing[0]}" if refs_missing else None
            if bad:
                break
            others.append(([str((path.parent / r).resolve()) for r in more], entry["subject"].strip()))
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        absent = [p for p in (describe_missing(path.parent / r) for r in refs) if p]
        if absent:
            problems.append(f"{where}: reference {absent[0]}")
            continue
        resolved = [str((path.parent / r).resolve()) for r in refs]
        unreadable = [p for p in (image_problem(r, decoded) for r in resolved) if p]
        if unreadable:  # a bad image is a bad row, reported before anything is generated
            problems.append(f"{where}: {unreadable[0]}")
            continue
        row_seed = row.get("seed", seed)
        if isinstance(row_seed, bool) or not isinstance(row_seed, int) or not 0 <= row_seed < MAX_SEED:
            problems.append(f"{where}: seed must be an integer in [0, 2^64), got {row_seed!r}")
            continue
        jobs.append(Job(job_id, resolved, row["subject"].strip(), row["prompt"], row_seed, source=where, others=others))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise ManifestError(f"manifest has {len(problems)} bad row(s): {shown}")
    if not jobs:
        raise ManifestError(f"manifest {path} has no rows")
    return jobs


def _subject_entries(row: dict[str, Any]) -> list[dict[str, Any]] | str:
    """A row's ``subjects`` list (checked), [] when the row uses ``reference``/``subject``, or a problem."""
    if "subjects" not in row:
        return []
    entries = row["subjects"]
    if "reference" in row or "subject" in row:
        return "give either subjects or reference and subject, not both"
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and {"reference", "subject"} <= set(e) for e in entries):
        return 'subjects must be a non-empty list of {"reference": ..., "subject": ...} objects'
    names = [str(e["subject"]).strip().lower() for e in entries]
    if len(set(names)) != len(names):
        return "the subjects of one image must have different names"
    return entries


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None, option: str = "--dtype") -> torch.dtype | None:
    """``"bf16"`` -> torch.bfloat16; None or ``"auto"`` -> None (the caller's default)."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise CustomShiftError(f"unknown {option} {name!r}; use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def load_pipeline(model: str | None, weights: str | None, device: str | None = None, dtype: str | None = "auto"):
    """The pipeline for ``--model`` (default: the packaged default model) with ``--weights`` loaded."""
    from .checks import check_device
    from .default_model import default_model_path, default_weights_path
    from .pipeline import CustomShiftPipeline

    check_device(device)  # every command's --device, before any weights are read
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = parse_dtype(dtype) or (torch.float16 if device.startswith("cuda") else torch.float32)
    source = model or str(default_model_path())
    try:
        # ``dtype``: diffusers' current name (``torch_dtype`` is deprecated). A folder's own customshift/
        # weights come with it unless --weights replaces them.
        pipe = CustomShiftPipeline.from_pretrained(source, dtype=torch_dtype, load_customshift=weights is None)
    except CustomShiftError:
        raise
    except (OSError, ValueError) as error:
        raise CustomShiftError(
            f"cannot load the model {source!r}: {' '.join(str(error).split())[:300]}; pass a local SD3 "
            "pipeline folder, or a hub id on a machine that can reach the hub (or has it cached)"
        ) from None
    if weights is None:
        own = Path(source) / "customshift"
        weights = own if (own / "customshift.json").is_file() else (None if model else default_weights_path())
    else:
        pipe.load_customshift(weights)
    pipe._customshift_source = {"model": source, "weights": str(weights) if weights else None}
    return pipe.to(device)


def load_embeddings(pipe: Any, jobs: Sequence[Job], reference_dtype: torch.dtype | None) -> dict[Any, Any]:
    """The jobs' saved subject embeddings (compact ones expanded), each checked against its job and the model."""
    from .errors import SubjectEmbeddingError
    from .reference import SubjectEmbedding

    subjects: dict[tuple[tuple[str, ...], str], Any] = {}
    for key in dict.fromkeys(key for job in jobs for key in job.subject_keys):
        references, name = key
        if len(references) != 1 or not references[0].endswith(".safetensors"):
            continue
        embedding = SubjectEmbedding.load(references[0], pipeline=pipe)
        if embedding.subject != name:
            raise SubjectEmbeddingError(
                f"{references[0]} is an embedding of {embedding.subject!r}, not {name!r}: pass "
                f"--subject {embedding.subject!r}, or encode the reference again for {name!r}"
            )
        pipe.check_subject(embedding)
        subjects[key] = embedding.to(pipe.device, reference_dtype)
    return subjects


def run_jobs(
    pipe,
    jobs: Iterable[Job],
    out_dir: str | Path,
    params: GenerationParams,
    *,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int = 1,
    share: ProcessShare | None = None,
) -> dict[str, int]:
    """Make every job's image and sidecar; returns counts of generated and kept (already done) images.

    The subject embedding is computed once per distinct (references, subject) and reused; up to
    ``batch_size`` jobs of one subject go through one pipeline call, with the same files as one at a time
    (customshift/batching.py). Under ``accelerate launch`` each process makes its share of the jobs still
    to do (``share``: default, accelerate's process index and count).
    """
    from tqdm.auto import tqdm

    from . import __version__
    from .io import atomic_save_image, atomic_write_json
    from .reference import SubjectEmbedding

    jobs = list(jobs)
    # Saved subject embeddings are checked (and kept) before anything is written: a bad one, no output.
    subjects = load_embeddings(pipe, jobs, parse_dtype(params.reference_dtype, "--reference-dtype"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp-*"):  # left by a run killed mid-write; never a finished output
        stale.unlink(missing_ok=True)
    jobs = list(jobs)
    # Done means both files: a sidecar whose image was deleted is redone, not "kept".
    todo = [j for j in jobs if overwrite or not all((out_dir / f"{j.id}{ext}").is_file() for ext in (".json", ".png"))]
    pipe.set_progress_bar_config(leave=False, position=1, disable=not progress)
    source = getattr(pipe, "_customshift_source", {})
    reference_dtype = parse_dtype(params.reference_dtype, "--reference-dtype")
    share = share or ProcessShare()
    share.wait()  # every process has listed the folder before anyone writes: the shares do not overlap
    mine = shard(todo, share.index, share.count)
    # closed before an error propagates, so the error line is not glued to the bar
    with tqdm(total=len(mine), desc="images" if share.count == 1 else f"images [{share.index + 1}/{share.count}]",
               unit="img", disable=not progress) as bar:
        # Jobs of the same subject(s) share a batch (the pipeline takes one set of subjects per call); same files
        # at any size.
        for batch in group_batches(mine, lambda j: j.subject_keys, batch_size):
            for key in batch[0].subject_keys:
                if key not in subjects:
                    if len(key[0]) == 1 and key[0][0].endswith(".safetensors"):
                        subjects[key] = SubjectEmbedding.load(key[0][0]).to(pipe.device, reference_dtype)
                    else:
                        subjects[key] = pipe.encode_subject(list(key[0]), key[1], params.height, params.width,
                                                            dtype=reference_dtype)
            embeddings = [subjects[key] for key in batch[0].subject_keys]
            images = generate_batch(
                pipe, embeddings[0] if len(embeddings) == 1 else embeddings, [j.prompt for j in batch],
                [j.seed for j in batch],
                negative_prompt=params.negative_prompt,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                reference_guidance_scale=params.reference_guidance_scale,
                shift_scale=params.shift_scale,
                height=params.height,
                width=params.width,
            )
            for job, image in zip(batch, images, strict=True):
                atomic_save_image(image, out_dir / f"{job.id}.png")
                sidecar = {
                    "id": job.id,
                    "prompt": job.prompt,
                    "subject": job.subject,
                    "references": _records(job.references),
                    **({"subjects": [{"subject": name, "references": _records(refs)}
                                     for refs, name in job.subject_keys]} if job.others else {}),
                    "seed": job.seed,
                    **asdict(params),
                    "height": image.height,
                    "width": image.width,
                    "model": source.get("model"),
                    "weights": source.get("weights"),
                    "base_fingerprint": pipe.base_fingerprint,
                    "weights_fingerprint": pipe.weights_fingerprint,
                    "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
                    "device": str(pipe.device),
                    "versions": _versions(__version__),
                    "command": _reproduce_command(job, params, source),
                }
                atomic_write_json(out_dir / f"{job.id}.json", sidecar)
            bar.update(len(batch))
    return {"generated": len(mine), "kept": len(jobs) - len(todo)}


def _records(references: Sequence[str]) -> list[dict[str, str]]:
    from .io import file_sha256

    return [{"path": r, "sha256": file_sha256(r)} for r in references]


def _versions(customshift_version: str) -> dict[str, str]:
    import diffusers

    return {"customshift": customshift_version, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _reproduce_command(job: Job, params: GenerationParams, source: dict[str, Any]) -> str:
    parts = ["customshift", "generate"]
    if source.get("model"):
        parts += ["--model", source["model"]]
    if source.get("weights"):
        parts += ["--weights", source["weights"]]
    if job.others:  # several subjects: one --reference per --subject, in order
        for refs, name in job.subject_keys:
            parts += ["--reference", refs[0], "--subject", name]
    else:
        for ref in job.references:
            parts += ["--reference", ref]
        parts += ["--subject", job.subject]
    parts += ["--prompt", job.prompt, "--seed", str(job.seed), "--steps", str(params.steps),
              "--guidance-scale", str(params.guidance_scale), "--shift-scale", str(params.shift_scale),
              "--reference-guidance-scale", str(params.reference_guidance_scale)]
    if params.height:
        parts += ["--height", str(params.height)]
    if params.width:
        parts += ["--width", str(params.width)]
    if params.negative_prompt:
        parts += ["--negative-prompt", params.negative_prompt]
    if params.reference_dtype not in (None, "auto"):
        parts += ["--reference-dtype", params.reference_dtype]
    return shlex.join(parts + ["--out", "OUT"])
