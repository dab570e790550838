"""`customshift evaluate dreambench | customconcept101 | folder` (registered by customshift.cli's hook)."""

# No `from __future__ import annotations`: typer evaluates these closures' annotations at runtime.
import json
from pathlib import Path
from typing import Annotated

import typer

from customshift.eval.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL

DinoOpt = Annotated[
    str, typer.Option("--dino-model", help="DINO ViT-S/16: hub id or local folder ('tiny': smoke tests).")
]
ClipOpt = Annotated[
    str, typer.Option("--clip-model", help="CLIP: hub id, local folder, ViT-B/32 or ViT-L/14 ('tiny').")
]


def _echo_summary(summary) -> None:
    if summary is None:
        return  # a non-main process of a sharded run
    if "metrics" in summary:
        typer.echo(json.dumps(summary["metrics"]["subject_mean"], indent=2))
    else:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "generation"}, indent=2))


def register_cli(app: typer.Typer, evaluate_app: typer.Typer, user_errors) -> None:
    def bench_command(name: str, runner, extra_help: str):
        @evaluate_app.command(name, help=extra_help)
        @user_errors
        def command(
            data: Annotated[Path, typer.Option("--data", help="The benchmark's dataset folder.")],
            out: Annotated[Path, typer.Option("--out", help="Output folder (resumable).")],
            model: Annotated[str | None, typer.Option("--model", help="SD3 pipeline folder or hub id.")] = None,
            weights: Annotated[str | None, typer.Option("--weights")] = None,
            dataset_json: Annotated[Path | None, typer.Option("--dataset-json", hidden=name != "customconcept101",
                                                              help="CustomConcept101 dataset.json.")] = None,
            images_per_prompt: Annotated[int, typer.Option("--images-per-prompt")] = 4,
            reference_policy: Annotated[str, typer.Option("--reference-policy", help="first|all|random")] = "first",
            subjects: Annotated[str | None, typer.Option("--subjects", help="a,b,c (default: all)")] = None,
            prompts: Annotated[int | None, typer.Option("--prompts", help="The first N prompts.")] = None,
            steps: int = 28, height: int | None = None, width: int | None = None, seed: int = 0,
            shift_scale: float = 1.0, guidance_scale: float = 7.0, reference_guidance_scale: float = 0.0,
            dtype: str = "auto",
            dino_model: DinoOpt = DEFAULT_DINO_MODEL, clip_model: ClipOpt = DEFAULT_CLIP_MODEL,
            overwrite: bool = False, device: str | None = None,
            plan_only: Annotated[bool, typer.Option("--plan-only")] = False,
            skip_metrics: Annotated[bool, typer.Option("--skip-metrics")] = False,
            method_name: Annotated[str, typer.Option("--method-name")] = "CustomShift",
            grids: Annotated[bool, typer.Option("--grids/--no-grids")] = True,
            batch_size: Annotated[int, typer.Option("--batch-size", min=1, help=(
                "Images of one subject per pipeline call; the same images as one at a time."))] = 1,
        ) -> None:
            kwargs = dict(batch_size=batch_size, model=model, weights=weights, images_per_prompt=images_per_prompt,
                          reference_policy=reference_policy, subjects=subjects, prompts=prompts, steps=steps,
                          height=height, width=width, seed=seed, shift_scale=shift_scale,
                          guidance_scale=guidance_scale, reference_guidance_scale=reference_guidance_scale,
                          dtype=dtype, dino_model=dino_model, clip_model=clip_model, overwrite=overwrite,
                          device=device, plan_only=plan_only, skip_metrics=skip_metrics, method_name=method_name,
                          grids=grids)
            if name == "customconcept101":
                kwargs["dataset_json"] = dataset_json
            _echo_summary(runner(data, out, **kwargs))

        return command

    from customshift.eval.customconcept101 import run_customconcept101
    from customshift.eval.dreambench import run_dreambench

    bench_command("dreambench", run_dreambench, "DreamBench: 30 subjects x 25 prompts, DINO / CLIP-I / CLIP-T.")
    bench_command("customconcept101", run_customconcept101, "CustomConcept101 single-concept protocol.")

    @evaluate_app.command("folder")
    @user_errors
    def folder(
        images: Annotated[Path, typer.Option("--images", help="Folder of the images to score.")],
        manifest: Annotated[Path, typer.Option("--manifest", help="JSONL / JSON / CSV: image, subject, prompt, ...")],
        out: Annotated[Path, typer.Option("--out")],
        real_root: Annotated[Path | None, typer.Option("--real-root", help="DIR/<subject>/ real images.")] = None,
        benchmark: Annotated[str | None, typer.Option("--benchmark", help="dreambench|customconcept101|folder")] = None,
        method_name: Annotated[str, typer.Option("--method-name")] = "method",
        dino_model: DinoOpt = DEFAULT_DINO_MODEL, clip_model: ClipOpt = DEFAULT_CLIP_MODEL,
        device: str | None = None,
        allow_missing: Annotated[bool, typer.Option("--allow-missing")] = False,
        grids: Annotated[bool, typer.Option("--grids/--no-grids")] = True,
    ) -> None:
        """Score any method's images with the benchmark metric code."""
        from customshift.eval.folder import run_folder

        _echo_summary(run_folder(images, manifest, out, real_root=real_root, benchmark=benchmark,
                                 method_name=method_name, dino_model=dino_model, clip_model=clip_model,
                                 device=device, allow_missing=allow_missing, grids=grids))
