"""Exact evaluation on the synthetic sprite domain: identity, prompt accuracy, leakage, PSNR.

Every held-out pair is generated twice — with its own reference and with another pair's reference
(the wrong-reference control: identity equal in both means the reference is ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_save_image, atomic_write_json, atomic_write_text
from . import synthetic

SIZE = synthetic.CANVAS


def generate_pairs(
    pipe,
    pairs: list,
    references: list | None = None,
    *,
    steps: int = 20,
    guidance_scale: float = 1.0,
    reference_guidance_scale: float = 0.0,
    shift_scale: float = 1.0,
    seed: int = 0,
    use_reference: bool = True,
    reference_dtype: str | None = None,
    batch_size: int = 1,
) -> list[np.ndarray]:
    """One image per pair (uint8 64x64), from ``references`` (default: each pair's own reference).

    A two-subject pair's reference is a pair of images: both subjects go through the method
    (``subject=[a, b]``, each with its own name). ``batch_size`` pairs share one pipeline call, each with its
    own subject(s) and seed, and give the same images as one at a time (customshift/batching.py).
    """
    from ..batching import generate_batch
    from ..generate import parse_dtype

    kv_dtype = parse_dtype(reference_dtype, "reference_dtype")
    references = references if references is not None else [_references_of(p) for p in pairs]
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                reference_guidance_scale=reference_guidance_scale, shift_scale=shift_scale, output_type="np")
    images = []
    for start in range(0, len(pairs), max(1, batch_size)):
        chunk = list(zip(pairs[start:start + batch_size], references[start:start + batch_size], strict=True))
        subjects = None
        if use_reference:
            subjects = []
            for pair, reference in chunk:
                several = isinstance(reference, tuple | list)
                names = pair.subject_names if several else [pair.subject_name]
                subjects.append([pipe.encode_subject(ref, name, SIZE, SIZE, dtype=kv_dtype)
                                 for ref, name in zip(reference if several else [reference], names, strict=True)])
        seeds = [seed + start + k for k in range(len(chunk))]
        out = generate_batch(pipe, subjects, [pair.prompt for pair, _ in chunk], seeds, **call)
        images += [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in out]
    return images


def _references_of(pair) -> np.ndarray | tuple[np.ndarray, ...]:
    return pair.references if isinstance(pair, synthetic.TwoSubjectPair) else pair.reference


# Every track `customshift evaluate synthetic` reports (synthetic.md, versions 1 and 2). "clean" is both
# versions' grid clean track; "distractor" is version 1's (distractors on the prompt grid: the v1-v6 models'
# tables); the "-grid"/"-free" tracks are version 2's (distractors at any pixel offset, boxes may touch).
TRACKS: dict[str, dict[str, Any]] = {
    "clean": {"track": "clean"},
    "clean-free": {"track": "clean", "placement": "free"},
    "distractor": {"track": "distractor"},
    "distractor-grid": {"track": "distractor", "distractor_offsets": "any"},
    "distractor-free": {"track": "distractor", "placement": "free", "distractor_offsets": "any"},
    "two-subject": {"two_subjects": True, "placement": "grid"},
    "two-subject-free": {"two_subjects": True, "placement": "free"},
}
DEFAULT_TRACKS: tuple[str, ...] = tuple(TRACKS)


def track_pairs(name: str, n: int, layout: str = "random", seed: int = 0) -> list:
    """The held-out pairs of one named track (two-subject tracks ignore ``layout``)."""
    if name not in TRACKS:
        raise ValueError(f"unknown track {name!r}; expected one of {', '.join(TRACKS)}")
    spec = dict(TRACKS[name])
    if spec.pop("two_subjects", False):
        return synthetic.two_subject_split(n=n, seed=seed, **spec)
    return synthetic.evaluation_split(n=n, seed=seed, layout=layout, **spec)


def _breakdown(scores: dict[str, Any], pairs: list) -> dict[str, Any]:
    """Distractor tracks: identity and leakage over the pairs whose two boxes touch, and over the others."""
    per = scores["per_sample"]
    out: dict[str, Any] = {}
    for label, keep in (("touching", True), ("apart", False)):
        idx = [k for k, p in enumerate(pairs) if p.touching is keep]
        out[label] = {"n": len(idx)} | ({} if not idx else {
            "identity": float(np.mean([per["identity"][k] for k in idx])),
            "leakage": float(np.mean([per["leakage"][k] for k in idx])),
        })
    return out


def _size_breakdown(scores: dict[str, Any], pairs: list) -> dict[str, Any]:
    """Identity per requested sprite size (small: one 4-px token per cell; large: 2 x 2 tokens), so a gap can
    be read as the size it comes from; a two-subject pair counts each of its subjects under its own size."""
    per = scores["per_sample"]
    found: dict[str, list[float]] = {name: [] for name in synthetic.SIZES}
    for k, pair in enumerate(pairs):
        if isinstance(pair, synthetic.TwoSubjectPair):
            for ctx, key in zip(pair.target_contexts, ("identity_first", "identity_second"), strict=True):
                found[ctx.size].append(per[key][k])
        else:
            found[pair.target_context.size].append(per["identity"][k])
    return {name: {"n": len(ids)} | ({"identity": float(np.mean(ids))} if ids else {}) for name, ids in found.items()}


def evaluate_track(pipe, name: str, *, n: int = 64, seed: int = 0, layout: str = "random",
                   **generation: Any) -> tuple[dict[str, Any], list, list[np.ndarray]]:
    """Scores of one track with its wrong-reference control (each pair generated with reference k+1);
    ``generation``: `generate_pairs`' settings."""
    pairs = track_pairs(name, n, layout)
    score = synthetic.score_two_subjects if TRACKS[name].get("two_subjects") else synthetic.score
    images = generate_pairs(pipe, pairs, seed=seed, **generation)
    wrong_refs = [_references_of(partner) for partner in synthetic.wrong_partners(pairs)]
    wrong = generate_pairs(pipe, pairs, wrong_refs, seed=seed, **generation)
    scores, wrong_scores = score(images, pairs), score(wrong, pairs)
    summary = {k: v for k, v in scores.items() if k != "per_sample"}
    summary["identity_wrong_reference"] = wrong_scores["identity"]
    if TRACKS[name].get("track") == "distractor":
        summary |= _breakdown(scores, pairs)
    summary["by_size"] = _size_breakdown(scores, pairs)
    return summary, pairs, images


def evaluate_synthetic(
    pipe,
    out_dir: str | Path,
    *,
    n: int = 64,
    tracks: list[str] | tuple[str, ...] = DEFAULT_TRACKS,
    seed: int = 0,
    grid_rows: int = 8,
    layout: str = "random",
    batch_size: int = 1,
    **generation: Any,
) -> dict[str, Any]:
    """Score ``pipe`` on ``n`` held-out pairs per track; writes summary.json, summary.md and grids.

    ``tracks`` are names of ``TRACKS`` (default: all of them, both spec versions). ``layout`` is the spec's
    ``random`` (the subject moves and resizes) unless a diagnosis asks for ``same_size`` or ``same_layout``.
    ``batch_size`` changes the speed only, never the images.
    """
    bad = [t for t in tracks if t not in TRACKS]
    if bad:
        raise ValueError(f"unknown track(s) {bad}; expected names from {', '.join(TRACKS)}")
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"n": n, "seed": seed, "layout": layout, **{k: v for k, v in generation.items()}}
    for track in tracks:
        summary[track], pairs, images = evaluate_track(pipe, track, n=n, seed=seed, layout=layout,
                                                       batch_size=batch_size, **generation)
        rows, labels = _grid_rows(pairs[:grid_rows], images)
        atomic_save_image(synthetic.make_grid(rows, labels=labels), out_dir / f"grid-{track}.png")
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", summary_markdown(summary, tracks))
    return summary


def _grid_rows(pairs: list, images: list[np.ndarray]) -> tuple[list[list[np.ndarray]], list[str]]:
    """reference(s) | generated | target rows and their column titles."""
    if pairs and isinstance(pairs[0], synthetic.TwoSubjectPair):
        return ([[*p.references, g, p.target] for p, g in zip(pairs, images, strict=False)],
                ["reference 1", "reference 2", "generated", "target"])
    rows = [[p.reference, g, p.target] for p, g in zip(pairs, images, strict=False)]
    return rows, ["reference", "generated", "target"]


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_markdown(summary: dict[str, Any], tracks) -> str:
    """One row per track; distractor tracks add touching / apart rows, every track identity per sprite size
    (a two-subject track counts subjects, not images), two-subject tracks their swap rate and a row breaking
    prompt accuracy into its checks (background, the subjects' positions, their sizes)."""
    lines = [
        "| track | identity | identity (wrong ref.) | prompt accuracy | PSNR | leakage | swap rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for track in tracks:
        s = summary[track]
        lines.append(
            f"| {track} | {s['identity']:.3f} | {s['identity_wrong_reference']:.3f} | "
            f"{s['prompt_accuracy']:.3f} | {s['psnr']:.1f} | {_fmt(s.get('leakage'))} | {_fmt(s.get('swap_rate'))} |"
        )
        for part in ("touching", "apart"):
            if part in s and s[part]["n"]:
                p = s[part]
                lines.append(f"| {track}, {part} (n={p['n']}) | {p['identity']:.3f} | | | | {p['leakage']:.3f} | |")
        for size, p in s.get("by_size", {}).items():
            if p["n"]:
                lines.append(f"| {track}, {size} sprites (n={p['n']}) | {p['identity']:.3f} | | | | | |")
        if "position_accuracy" in s:
            lines.append(f"| {track}, prompt checks | | | background {s['background_accuracy']:.3f}, position "
                         f"{s['position_accuracy']:.3f}, size {s['size_accuracy']:.3f} | | | |")
    return "\n".join(lines) + "\n"


def demo_grid(pipe, out_dir: str | Path, *, n: int = 8, steps: int = 20, seed: int = 0, guidance_scale: float = 1.0,
              layout: str = "random", track: str = "clean") -> Path:
    """reference(s) | generated | exact target for ``n`` held-out pairs of ``track`` (a `TRACKS` name), as one PNG:
    ``demo.png`` for the clean track on the spec's random layout, else ``demo-TRACK[-LAYOUT].png``."""
    pairs = track_pairs(track, n, layout)
    images = generate_pairs(pipe, pairs, steps=steps, seed=seed, guidance_scale=guidance_scale)
    rows, labels = _grid_rows(pairs, images)
    suffix = "".join(f"-{part}" for part, default in ((track, "clean"), (layout, "random")) if part != default)
    path = Path(out_dir) / f"demo{suffix}.png"
    atomic_save_image(synthetic.make_grid(rows, labels=labels), path)
    return path
