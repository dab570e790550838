"""Compare two models pair by pair on the held-out synthetic split (same pairs, same seeds).

    python scripts/compare_models.py runs/candidate-a customshift/assets/default-model --n 64 --json out.json

A difference of means over 64 pairs is noisy (a per-sample identity has a standard deviation near 0.2); the same
pairs sampled with the same seeds by both models make it a paired test: for each track the script prints both
means with their standard errors, the mean paired difference with its standard error, and on how many pairs the
second model draws more / as many / fewer cells right.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from customshift.generate import load_pipeline
from customshift.io import atomic_write_json
from customshift.sprites import synthetic
from customshift.sprites.evaluate import TRACKS, generate_pairs, track_pairs


def standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def compare(model_a: str, model_b: str, *, n: int, tracks: list[str], steps: int, guidance_scale: float,
            seed: int, batch_size: int = 8, device: str = "cpu") -> dict:
    pipes = [load_pipeline(name, None, device=device) for name in (model_a, model_b)]  # loaded apart, even if equal
    report: dict = {"model_a": model_a, "model_b": model_b, "n": n, "steps": steps,
                    "guidance_scale": guidance_scale, "seed": seed}
    for track in tracks:
        pairs = track_pairs(track, n)
        score = synthetic.score_two_subjects if TRACKS[track].get("two_subjects") else synthetic.score
        a, b = (np.asarray(score(images, pairs)["per_sample"]["identity"], dtype=float)
                for images in (generate_pairs(pipe, pairs, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                              batch_size=batch_size)
                               for pipe in pipes))
        diff = b - a
        report[track] = {
            "identity_a": float(a.mean()), "se_a": standard_error(a),
            "identity_b": float(b.mean()), "se_b": standard_error(b),
            "difference": float(diff.mean()), "se_difference": standard_error(diff),
            "b_better": int((diff > 1e-9).sum()), "tie": int((np.abs(diff) <= 1e-9).sum()),
            "b_worse": int((diff < -1e-9).sum()),
        }
        r = report[track]
        print(f"{track}: identity {r['identity_a']:.3f} ± {r['se_a']:.3f} -> {r['identity_b']:.3f} ± {r['se_b']:.3f}; "
              f"paired difference {r['difference']:+.3f} ± {r['se_difference']:.3f}; second model better / tie / worse "
              f"on {r['b_better']} / {r['tie']} / {r['b_worse']} pairs", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_a")
    parser.add_argument("model_b")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--track", action="append", choices=list(TRACKS), help="default: clean and distractor")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per call (the same images, faster)")
    parser.add_argument("--device", default="cpu", help="cpu (the documented numbers) or cuda; both models on it")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = compare(args.model_a, args.model_b, n=args.n, tracks=args.track or ["clean", "distractor"],
                     steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size,
                     device=args.device)
    if args.json:
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
