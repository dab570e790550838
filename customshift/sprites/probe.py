"""The reference-use probe: does the model read the subject's colours from the reference?

Sampling decides a sprite's colours at high noise (docs/default-model.md). This probe noises held-out
targets to fixed levels sigma, asks the model for its clean-image estimate x0 = x_t - sigma * v with the
right reference, a wrong one (another pair's) and none, decodes it, and reads the 5 x 5 cells at the
target's known box. A model that uses the reference recovers more cells with the right reference than
with a wrong one at sigma >= 0.85; equal numbers mean the reference is ignored, whatever the loss says.
It needs one forward per (pair, sigma, condition) and no sampling, so it is cheap enough to gate a long
run on it (docs/default-model.md: >= 10 points at sigma 0.85 / 0.95 before a run is worth hours).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..attention import ReferenceSet, build_cads_state
from ..training.batches import token_masks
from . import synthetic
from .data import box_mask

SIGMAS = (0.5, 0.7, 0.85, 0.95)
CONDITIONS = ("right", "wrong", "none")


def _cell_accuracy(image: np.ndarray, subject: synthetic.Subject, context: synthetic.Context) -> float:
    """The share of the subject's silhouette cells that have its colour at its box in ``context``."""
    x0, y0, side = synthetic.sprite_box(context)
    cells = synthetic.read_cells(image, (x0, y0, side, side))
    mask = synthetic.SILHOUETTES[subject.cls]
    return float((cells[mask] == subject.color_grid()[mask]).mean())


def _decoded_estimates(pipe: Any, noisy: torch.Tensor, sigma: float, velocity: torch.Tensor) -> list[np.ndarray]:
    """The clean-image estimates x0 = x_t - sigma * v, decoded to uint8 images."""
    estimate = noisy.float() - sigma * velocity.float()
    latents = estimate / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
    decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type="np")
    return [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in images]


def _noised_inputs(pipe: Any, pairs: Sequence[Any], seed: int, max_sequence_length: int | None) -> tuple:
    """The pairs' target latents, their noise (from ``seed``) and their prompts' embeddings (one pass)."""
    from PIL import Image

    size = synthetic.CANVAS
    length = max_sequence_length or pipe.customshift_config.max_sequence_length or 256
    targets = pipe.prepare_reference_latents([Image.fromarray(p.target) for p in pairs], size, size).float()
    noise = torch.randn(targets.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(targets.device)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=[p.prompt for p in pairs], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, device=pipe.transformer.device,
                                              max_sequence_length=length)
    return targets, noise, embeds, pooled


@torch.no_grad()
def colour_recovery(
    pipe: Any,
    pairs: Sequence[synthetic.Pair],
    sigmas: Sequence[float] = SIGMAS,
    *,
    seed: int = 0,
    batch_size: int = 32,
    max_sequence_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{condition: {sigma: mean cell accuracy}}`` over ``pairs`` (conditions: right, wrong, none)."""
    if len(pairs) < 2:
        raise ValueError("the probe needs at least two pairs (the wrong reference is another pair's)")
    size = synthetic.CANVAS
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    targets, noise, embeds, pooled = _noised_inputs(pipe, pairs, seed, max_sequence_length)
    weights = torch.cat([pipe.subject_token_weights([p.prompt], p.subject_name, embeds.shape[1]) for p in pairs])
    references = {"right": [p.reference for p in pairs], "wrong": synthetic.wrong_references(pairs)}
    subjects = {cond: [pipe.encode_subject(ref, p.subject_name, size, size) for ref, p in zip(refs, pairs,
                                                                                            strict=True)]
                for cond, refs in references.items()}
    result: dict[str, dict[str, float]] = {cond: {} for cond in CONDITIONS}
    for sigma in sigmas:
        noisy = ((1.0 - sigma) * targets + sigma * noise).to(dtype)
        for cond in CONDITIONS:
            scores = []
            for start in range(0, len(pairs), batch_size):
                part = slice(start, start + batch_size)
                n = len(pairs[part])
                kwargs = None
                if cond != "none":
                    chosen = subjects[cond][part]
                    reference = ReferenceSet.from_rows(chosen, torch.zeros(n), weights[part])
                    state = build_cads_state(pipe.customshift_config, pipe.reference_branch.shift, [reference],
                                             device=device, dtype=dtype)
                    kwargs = {"customshift": state}
                velocity = pipe.transformer(
                    hidden_states=noisy[part], timestep=torch.full((n,), sigma * 1000.0, device=device),
                    encoder_hidden_states=embeds[part], pooled_projections=pooled[part],
                    joint_attention_kwargs=kwargs, return_dict=False,
                )[0]
                for image, pair in zip(_decoded_estimates(pipe, noisy[part], sigma, velocity), pairs[part],
                                       strict=True):
                    scores.append(_cell_accuracy(image, pair.subject, pair.target_context))
            result[cond][f"{sigma:g}"] = float(np.mean(scores))
    return result


@torch.no_grad()
def routing_shares(
    pipe: Any,
    pairs: Sequence[synthetic.TwoSubjectPair],
    sigmas: Sequence[float] = SIGMAS,
    *,
    seed: int = 0,
    max_sequence_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Where two subjects' references go, and what they bring: ``{sigma: {own, region_mass, background_mass,
    recovery, recovery_wrong}}`` over ``pairs``.

    One forward per sigma with both references (each with its own name's m_ik) on the noised targets. From
    each CADS layer's shifts (the mass form's log-odds) per image token: ``own`` is the share of a subject's
    region's reference mass that goes to that subject's own reference, sigmoid(beta_own - beta_other), averaged
    over both regions, pairs and layers (0.5: no routing, 1: each region reads only its own subject);
    ``region_mass`` and ``background_mass`` are the total mass on the references inside the regions and outside.
    ``recovery`` is the share of both sprites' cells whose colour the clean-image estimate gets right, where the
    layout is the target's (as `colour_recovery` for one subject); ``recovery_wrong`` the same with the next
    pair's two references (the control): a gap means the references' colours reach their sprites.
    """
    size = synthetic.CANVAS
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    targets, noise, embeds, pooled = _noised_inputs(pipe, pairs, seed, max_sequence_length)
    if len(pairs) < 2:
        raise ValueError("the probe needs at least two pairs (the wrong references are another pair's)")

    def reference_sets(sources: Sequence[synthetic.TwoSubjectPair]) -> list[ReferenceSet]:
        """Slot k holds ``sources[p]``'s k-th reference under pair p's own k-th name."""
        return [ReferenceSet.from_rows(
            [pipe.encode_subject(src.references[k], p.subject_names[k], size, size)
             for src, p in zip(sources, pairs, strict=True)],
            torch.zeros(len(pairs)),
            torch.cat([pipe.subject_token_weights([p.prompt], p.subject_names[k], embeds.shape[1]) for p in pairs]))
            for k in range(2)]

    sets = {"right": reference_sets(pairs), "wrong": reference_sets(synthetic.wrong_partners(pairs))}
    side = targets.shape[-1] // pipe.transformer.config.patch_size
    # The routing loss's own token masks (customshift/training/batches.py): the share reported is the one trained.
    regions = torch.stack([token_masks([box_mask(c) for c in p.target_contexts], size, (side, side))
                           for p in pairs]).bool()  # (P, 2, N)
    background = ~regions.any(dim=1)
    result = {}
    for sigma in sigmas:
        noisy = ((1.0 - sigma) * targets + sigma * noise).to(dtype)
        recovery, record = {}, []
        for cond, chosen in sets.items():
            state = build_cads_state(pipe.customshift_config, pipe.reference_branch.shift, chosen, device=device,
                                     dtype=dtype)
            state.shift_record = record if cond == "right" else None  # shares from the right references only
            velocity = pipe.transformer(
                hidden_states=noisy, timestep=torch.full((len(pairs),), sigma * 1000.0, device=device),
                encoder_hidden_states=embeds, pooled_projections=pooled, joint_attention_kwargs={"customshift": state},
                return_dict=False)[0]
            images = _decoded_estimates(pipe, noisy, sigma, velocity)
            recovery[cond] = float(np.mean([_cell_accuracy(image, subject, context)
                                            for image, p in zip(images, pairs, strict=True)
                                            for subject, context in zip(p.subjects, p.target_contexts, strict=True)]))
        own, region_mass, background_mass = [], [], []
        for first, second in record:
            first, second = first.float().cpu(), second.float().cpu()
            share = torch.sigmoid(first - second)  # of the references' mass, the share of the first subject
            mass = 1.0 - torch.softmax(torch.stack([torch.zeros_like(first), first, second]), dim=0)[0]
            own.append(((share * regions[:, 0]).sum() + ((1 - share) * regions[:, 1]).sum()) / regions.sum())
            region_mass.append((mass * regions.any(dim=1)).sum() / regions.any(dim=1).sum())
            background_mass.append((mass * background).sum() / background.sum().clamp(min=1))
        result[f"{sigma:g}"] = {"own": float(np.mean(own)), "region_mass": float(np.mean(region_mass)),
                                "background_mass": float(np.mean(background_mass)),
                                "recovery": recovery["right"], "recovery_wrong": recovery["wrong"]}
    return result


def gate(result: dict[str, dict[str, float]], sigmas: Sequence[float] = (0.85, 0.95)) -> float:
    """The smallest right-minus-wrong gap (in points of cell accuracy) at the deciding noise levels."""
    gaps = [100.0 * (result["right"][f"{s:g}"] - result["wrong"][f"{s:g}"]) for s in sigmas]
    return min(gaps) if gaps else math.nan


def probe_markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A table: one row per (layout, condition), one column per sigma."""
    first = next(iter(results.values()))
    sigmas = list(first["right"])
    lines = ["| layout | reference | " + " | ".join(f"sigma {s}" for s in sigmas) + " |",
             "|---|---|" + "---|" * len(sigmas)]
    for layout, result in results.items():
        for cond in CONDITIONS:
            lines.append(f"| {layout} | {cond} | " + " | ".join(f"{result[cond][s]:.3f}" for s in sigmas) + " |")
    return "\n".join(lines) + "\n"


def load_model(path: str) -> Any:
    """A training run / checkpoint folder, a run's ``final/`` export (also a run holding only that, e.g. one
    copied back from another machine), or a model folder (its ``customshift/`` weights if present)."""
    from pathlib import Path

    from ..training.trainer import find_checkpoint, load_pipeline_from_checkpoint

    if find_checkpoint(path) is not None:
        return load_pipeline_from_checkpoint(path)
    from ..generate import load_pipeline

    root = Path(path)
    if (root / "final" / "pipeline").is_dir():
        root = root / "final"
    model = root / "pipeline" if (root / "pipeline" / "model_index.json").is_file() else root
    weights = root / "customshift"  # a run's final/customshift, or the model folder's own
    return load_pipeline(str(model), str(weights) if weights.is_dir() else None, device="cpu", dtype="fp32")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m customshift.eval.probe MODEL_OR_CHECKPOINT [--n 64] [--layouts random same_size ...]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model folder with CustomShift weights, or a training checkpoint")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--layouts", nargs="+", default=["same_layout", "same_size", "random"])
    parser.add_argument("--track", default="clean")
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--routing", action="store_true",
                        help="two-subject pairs: where each subject's reference mass goes (routing_shares)")
    args = parser.parse_args(argv)
    pipe = load_model(args.model)
    if args.routing:
        shares = routing_shares(pipe, synthetic.two_subject_split(n=args.n))
        print("| sigma | own share | mass in regions | mass in background | colour recovery | wrong references |\n"
              "|---|---|---|---|---|---|")
        for sigma, row in shares.items():
            print(f"| {sigma} | {row['own']:.3f} | {row['region_mass']:.3f} | {row['background_mass']:.3f} | "
                  f"{row['recovery']:.3f} | {row['recovery_wrong']:.3f} |")
        if args.json:
            from ..io import atomic_write_json

            atomic_write_json(args.json, shares)
        return 0
    results = {}
    for layout in args.layouts:
        pairs = synthetic.evaluation_split(n=args.n, track=args.track, layout=layout)
        results[layout] = colour_recovery(pipe, pairs)
        print(f"{layout}: gate {gate(results[layout]):+.1f} points", flush=True)
    print(probe_markdown(results))
    if args.json:
        from ..io import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
