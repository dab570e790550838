"""Where the two-subject identity goes: each held-out two-subject pair's first subject, drawn three ways.

    python scripts/two_subject_gap.py customshift/assets/default-model --n 32 --json out.json

- ``both``: the track as scored (both references, the two-subject prompt);
- ``own reference only``: the same prompt with the second subject's reference switched off (shift scale 0), so
  the second sprite is drawn from text alone: what the second reference set costs the first subject;
- ``alone``: the first subject alone at the same target context with the one-subject prompt: what drawing a
  second sprite at all costs it;
- ``wrong reference``: ``both`` with both references taken from other pairs (chance ~ 1/6).

Same pairs, same seeds for every row, so the differences are paired (mean and standard error).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from compare_models import standard_error  # scripts/compare_models.py, beside this script

from customshift.generate import load_pipeline
from customshift.io import atomic_write_json
from customshift.sprites import synthetic
from customshift.sprites.evaluate import generate_pairs, track_pairs


def alone(pair: synthetic.TwoSubjectPair) -> synthetic.Pair:
    """The first subject of ``pair`` alone: its own reference, the same target context, the one-subject prompt."""
    subject, context = pair.subjects[0], pair.target_contexts[0]
    return synthetic.Pair(
        reference=pair.references[0], target=synthetic.render(subject, context), prompt=context.prompt(subject.cls),
        subject_name=subject.name, subject=subject, target_context=context,
        reference_context=pair.reference_contexts[0], reference_box=pair.reference_boxes[0],
        placement=pair.placement)


def summarise(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "se": standard_error(values)}


def measure(model: str, *, n: int, track: str, steps: int, guidance_scale: float, batch_size: int,
            device: str) -> dict:
    pipe = load_pipeline(model, None, device=device)
    pairs = track_pairs(track, n)
    call = dict(steps=steps, guidance_scale=guidance_scale, batch_size=batch_size)
    first = {
        "both": synthetic.score_two_subjects(generate_pairs(pipe, pairs, **call), pairs)["per_sample"],
        "own reference only": synthetic.score_two_subjects(
            generate_pairs(pipe, pairs, shift_scale=[1.0, 0.0], **call), pairs)["per_sample"],
        "wrong reference": synthetic.score_two_subjects(
            generate_pairs(pipe, pairs, [p.references for p in synthetic.wrong_partners(pairs)], **call),
            pairs)["per_sample"],
    }
    rows = {name: np.asarray(per["identity_first"], dtype=float) for name, per in first.items()}
    singles = [alone(p) for p in pairs]
    alone_scores = synthetic.score(generate_pairs(pipe, singles, **call), singles)["per_sample"]
    rows["alone"] = np.asarray(alone_scores["identity"], dtype=float)
    report = {"model": model, "track": track, "n": n, "steps": steps, "guidance_scale": guidance_scale,
              "first_subject_identity": {name: summarise(v) for name, v in rows.items()},
              "paired_difference_from_both": {name: summarise(v - rows["both"]) for name, v in rows.items()
                                              if name != "both"}}
    for name, value in report["first_subject_identity"].items():
        diff = report["paired_difference_from_both"].get(name)
        extra = f"; minus both {diff['mean']:+.3f} ± {diff['se']:.3f}" if diff else ""
        print(f"{name}: first subject's identity {value['mean']:.3f} ± {value['se']:.3f}{extra}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--track", choices=["two-subject", "two-subject-free"], default="two-subject")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = measure(args.model, n=args.n, track=args.track, steps=args.steps, guidance_scale=args.guidance_scale,
                     batch_size=args.batch_size, device=args.device)
    if args.json:
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
