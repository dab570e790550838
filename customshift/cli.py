"""The ``customshift`` command line: generate | encode | train | evaluate | demo | serve.

Errors caused by what the user handed us print one line (``error: ...``) and exit with status 2, with
no traceback; everything heavy is imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from .errors import CustomShiftError
from .sprites.commands import register as register_sprite_commands
from .training.commands import register as register_training_commands

try:  # typer >= 0.24 vendors click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors


class OneLineErrors(TyperGroup):
    """Usage errors (a bad number, a missing option) as the one ``error:`` line our own errors give, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as error:
            typer.echo(error.ctx.get_help() if error.ctx else "", err=True)
            sys.exit(2)
        except click_errors.UsageError as error:
            where = f"; see '{error.ctx.command_path} --help'" if error.ctx else ""
            message = " ".join(error.format_message().split()).rstrip(".")
            typer.secho(f"error: {message}{where}", err=True, fg=typer.colors.RED)
            sys.exit(error.exit_code)
        except click_errors.ClickException as error:
            typer.secho(f"error: {' '.join(error.format_message().split())}", err=True, fg=typer.colors.RED)
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
evaluate_app = typer.Typer(no_args_is_help=True, help="Score a model on a benchmark.")
app.add_typer(evaluate_app, name="evaluate")


@app.callback()
def _console(verbose: Annotated[bool, typer.Option(
        "--verbose", help="Also show the libraries' own warnings, logs and loading bars.")] = False) -> None:
    # No docstring: it would replace the app's help. customshift/console.py says what is quieted and why.
    from .console import configure_console

    configure_console(verbose)

ModelOpt = Annotated[
    str | None, typer.Option("--model", help="SD3 pipeline folder or hub id (default: the packaged default model).")
]
WeightsOpt = Annotated[str | None, typer.Option("--weights", help="Trained CustomShift weights folder or hub id.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cuda, cpu, ... (default: cuda when available).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")]
ReferenceDtypeOpt = Annotated[str, typer.Option(
    "--reference-dtype", help="Precision of the cached reference keys/values: auto (the model's), fp32, fp16 or bf16. "
    "bf16 on a fp32 model halves the cache and the cost of the attention over the reference on CPUs with bf16 "
    "units.")]


def user_errors(command):
    """Turn the project's own errors into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CustomShiftError as error:
            typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; finished outputs are kept, rerun to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def check_generation_options(out: Path, model: str | None, device: str | None, **numbers) -> None:
    """``generate``'s numbers, ``--out`` and ``--device``, checked before anything loads or is written."""
    from .checks import check_device, check_generation_numbers, check_out_folder, model_geometry
    from .default_model import default_model_path

    check_out_folder(out)
    check_device(device)
    geometry = model_geometry(model or default_model_path())
    check_generation_numbers(geometry=geometry, **numbers)


def _check_sampling(out: Path, steps: int, seed: int) -> None:
    """demo's and evaluate synthetic's --out, --steps and --seed, before the model loads."""
    from .checks import MAX_STEPS, check_out_folder, check_seed

    check_out_folder(out)
    check_seed(seed)
    if not 1 <= steps <= MAX_STEPS:
        raise CustomShiftError(f"--steps must be between 1 and {MAX_STEPS}, got {steps}")


@app.command()
@user_errors
def generate(
    out: Annotated[Path, typer.Option("--out", help="Output folder (images + JSON sidecars).")],
    reference: Annotated[
        list[str] | None,
        typer.Option("--reference", help="Reference image (repeatable), or a .safetensors subject embedding."),
    ] = None,
    subject: Annotated[list[str] | None, typer.Option("--subject", help=(
        "The subject's name as the prompt says it. Repeat it for several subjects in one image, one --reference "
        "each, in order: --reference a.png --subject robot --reference b.png --subject tree."))] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt (repeatable).")] = None,
    batch: Annotated[
        Path | None, typer.Option("--batch", help="JSONL manifest: id, reference, subject, prompt (or subjects: "
                                  "[{reference, subject}, ...] for several subjects).")
    ] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: int = 0,
    steps: int = 28,
    shift_scale: float = 1.0,
    guidance_scale: Annotated[float | None, typer.Option(
        help="Text guidance (default: 7, SD3's; 2 for the packaged default model).")] = None,
    reference_guidance_scale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    num_images: Annotated[int, typer.Option("--num-images", min=1)] = 1,
    negative_prompt: str | None = None,
    overwrite: Annotated[bool, typer.Option(help="Regenerate images that already exist in --out.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    reference_dtype: ReferenceDtypeOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help=(
        "Images of one subject per pipeline call; the same files as one at a time, faster."))] = 1,
) -> None:
    """Generate images of a subject from reference image(s) and prompt(s), or a whole batch manifest.

    Under ``accelerate launch`` (or ``torchrun``) each process makes its share of the images.
    """
    from .checks import check_reference, check_sizes, check_texts, pipeline_geometry
    from .generate import (
        GenerationParams,
        load_pipeline,
        pair_subjects,
        parse_dtype,
        read_manifest,
        run_jobs,
        single_jobs,
    )

    parse_dtype(reference_dtype, "--reference-dtype")  # fail before anything loads
    parse_dtype(dtype)
    check_generation_options(out, model, device, steps=steps, seed=seed, num_images=num_images, height=height,
                             width=width, floats={"--shift-scale": shift_scale, "--guidance-scale": guidance_scale,
                                                  "--reference-guidance-scale": reference_guidance_scale})
    if batch is not None:
        if reference or subject or prompt:
            raise CustomShiftError("--batch takes references, subjects and prompts from the manifest; drop the others")
        jobs = read_manifest(batch, seed=seed)
    else:
        if not reference or not subject or not prompt:
            raise CustomShiftError("give --reference, --subject and --prompt (or --batch manifest.jsonl)")
        for ref in reference:
            check_reference(ref)
        for name in subject:
            check_texts(prompt, name)
        specs = pair_subjects([str(Path(r).resolve()) for r in reference], subject)
        jobs = single_jobs(specs[0][0], specs[0][1], prompt, seed, num_images, others=specs[1:])
    if guidance_scale is None:
        from .default_model import DEFAULT_MODEL_GUIDANCE

        guidance_scale = 7.0 if model else DEFAULT_MODEL_GUIDANCE
    if model is None:
        from .sprites.model import domain_note

        note = domain_note([j.subject for j in jobs], [j.prompt for j in jobs])
        if note:
            typer.secho(note, err=True, fg=typer.colors.YELLOW)
    params = GenerationParams(
        steps=steps, guidance_scale=guidance_scale, reference_guidance_scale=reference_guidance_scale,
        shift_scale=shift_scale, height=height, width=width, negative_prompt=negative_prompt,
        reference_dtype=None if reference_dtype == "auto" else reference_dtype,
    )
    from .batching import ProcessShare

    share = ProcessShare(cpu=device == "cpu" if device else None)  # one device per process when launched
    pipe = load_pipeline(model, weights, device or (str(share.device) if share.count > 1 else None), dtype)
    check_sizes(height, width, pipeline_geometry(pipe))  # a hub model's configs may only be here now
    counts = run_jobs(pipe, jobs, out, params, overwrite=overwrite, batch_size=batch_size, share=share)
    kept = f", kept {counts['kept']} existing (--overwrite regenerates them)" if counts["kept"] else ""
    where = f" (process {share.index + 1} of {share.count})" if share.count > 1 else ""
    typer.echo(f"wrote {counts['generated']} image(s) to {out}{kept}{where}")


@app.command()
@user_errors
def encode(
    reference: Annotated[list[str], typer.Option("--reference", help="Reference image (repeatable).")],
    subject: Annotated[str, typer.Option("--subject")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the .safetensors subject embedding.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    height: int | None = None,
    width: int | None = None,
    overwrite: bool = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "auto",
    reference_dtype: ReferenceDtypeOpt = "auto",
    compact: Annotated[bool, typer.Option(
        "--compact", help="Save the reference latents and subject tokens (about 1 MiB) instead of the keys/values "
        "(hundreds of MiB on real models); they are recomputed in one pass when the embedding is loaded.")] = False,
) -> None:
    """Compute a subject embedding once and save it, to reuse with ``generate --reference emb.safetensors``."""
    from .checks import check_device, check_out_file, check_reference, check_sizes, check_texts, model_geometry
    from .default_model import default_model_path
    from .generate import load_pipeline, parse_dtype
    from .io import refuse_overwrite, remove_stale_temps

    refuse_overwrite(out, overwrite)
    kv_dtype = parse_dtype(reference_dtype, "--reference-dtype")
    parse_dtype(dtype)
    check_out_file(out)
    check_device(device)
    for ref in reference:
        check_reference(ref)
    check_texts([], subject)
    check_sizes(height, width, model_geometry(model or default_model_path()))
    remove_stale_temps(out)
    pipe = load_pipeline(model, weights, device, dtype)
    pipe.encode_subject(reference, subject, height, width, dtype=kv_dtype).save(out, compact=compact)
    typer.echo(f"wrote {out}")


register_training_commands(app, user_errors)  # train: customshift/training/commands.py
register_sprite_commands(app, user_errors)  # train-vae, train-default-model: customshift/sprites/commands.py


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    n: Annotated[int, typer.Option("--n", help="Held-out subjects to show.")] = 8,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: Annotated[float | None, typer.Option(
        help="Text guidance (default: 2 on the default model, 1 with --model).")] = None,
    layout: Annotated[str, typer.Option("--layout", help="random (the spec), same_size or same_layout; "
                                        "other than random, the file is demo-LAYOUT.png.")] = "random",
    track: Annotated[str, typer.Option("--track", help="An evaluate-synthetic track, e.g. two-subject or "
                                       "distractor-free; other than clean, the file is demo-TRACK.png.")] = "clean",
    device: DeviceOpt = None,
) -> None:
    """Write a grid of held-out synthetic subjects: reference(s) | generated | exact target."""
    from .default_model import DEFAULT_MODEL_GUIDANCE
    from .generate import load_pipeline
    from .sprites.evaluate import TRACKS, demo_grid
    from .sprites.synthetic import LAYOUTS

    if layout not in LAYOUTS:
        raise typer.BadParameter(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if track not in TRACKS:
        raise typer.BadParameter(f"--track must be one of {', '.join(TRACKS)}, got {track!r}")
    _check_sampling(out, steps, seed)
    if guidance_scale is None:
        guidance_scale = DEFAULT_MODEL_GUIDANCE if model is None else 1.0
    pipe = load_pipeline(model, weights, device, "auto")
    path = demo_grid(pipe, out, n=n, steps=steps, seed=seed, guidance_scale=guidance_scale, layout=layout,
                     track=track)
    typer.echo(f"wrote {path}")


@app.command()
@user_errors
def serve(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you add authentication.")] = (
        "127.0.0.1"
    ),
    port: int = 7860,
    device: DeviceOpt = None,
    max_images_per_request: int = 4,
    max_upload_mb: float = 10.0,
    max_upload_cache_mb: Annotated[float, typer.Option(
        help="What the private upload folder may hold (uploads and cached outputs), oldest out first.")] = 1024.0,
) -> None:
    """Start the web UI (Gradio) on the default model or the given checkpoint."""
    import math

    from .checks import check_device

    check_device(device)
    if not 1 <= port <= 65535:
        raise CustomShiftError(f"--port must be between 1 and 65535, got {port}")
    for option, value in (("--max-images-per-request", max_images_per_request), ("--max-upload-mb", max_upload_mb),
                          ("--max-upload-cache-mb", max_upload_cache_mb)):
        if not math.isfinite(value) or value <= 0:
            raise CustomShiftError(f"{option} must be a positive number, got {value:g}")
    from .webui import serve as run

    run(model, weights, host, port, device=device, max_images_per_request=max_images_per_request,
        max_upload_mb=max_upload_mb, max_upload_cache_mb=max_upload_cache_mb)


@evaluate_app.command("synthetic")
@user_errors
def evaluate_synthetic(
    out: Annotated[Path, typer.Option("--out")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    n: Annotated[int, typer.Option("--n", help="Held-out pairs per track.")] = 64,
    track: Annotated[list[str] | None, typer.Option("--track", help="Track(s) to score (default: all): clean, "
                                                     "clean-free, distractor (spec v1), distractor-grid, "
                                                     "distractor-free, two-subject, two-subject-free.")] = None,
    steps: int = 20,
    guidance_scale: float = 1.0,
    reference_guidance_scale: float = 0.0,
    shift_scale: float = 1.0,
    seed: int = 0,
    layout: Annotated[str, typer.Option("--layout", help="random (the spec), same_size or same_layout.")] = "random",
    device: DeviceOpt = None,
    reference_dtype: ReferenceDtypeOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help=(
        "Pairs per pipeline call, each with its own subject(s) and seed: faster, the same images."))] = 1,
) -> None:
    """Score a model on held-out synthetic subjects with the exact metrics (JSON, markdown, grid)."""
    from .generate import load_pipeline, parse_dtype
    from .sprites.evaluate import TRACKS
    from .sprites.evaluate import evaluate_synthetic as run
    from .sprites.synthetic import LAYOUTS

    if layout not in LAYOUTS:
        raise typer.BadParameter(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    for name in track or []:
        if name not in TRACKS:
            raise typer.BadParameter(f"--track must be one of {', '.join(TRACKS)}, got {name!r}")
    _check_sampling(out, steps, seed)
    parse_dtype(reference_dtype, "--reference-dtype")
    extra = {} if reference_dtype == "auto" else {"reference_dtype": reference_dtype}
    pipe = load_pipeline(model, weights, device, "auto")
    summary = run(pipe, out, n=n, tracks=track or list(TRACKS), steps=steps, guidance_scale=guidance_scale,
                  reference_guidance_scale=reference_guidance_scale, shift_scale=shift_scale, seed=seed,
                  layout=layout, batch_size=batch_size, **extra)
    typer.echo((out / "summary.md").read_text() if (out / "summary.md").exists() else str(summary))


@evaluate_app.command("probe")
@user_errors
def evaluate_probe(
    model: Annotated[str | None, typer.Option("--model", help="Model folder, training run or checkpoint "
                                              "(default: the packaged default model).")] = None,
    n: Annotated[int, typer.Option("--n", help="Held-out pairs per layout.")] = 64,
    layout: Annotated[list[str] | None, typer.Option("--layout", help="same_layout, same_size and/or random.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
    routing: Annotated[bool, typer.Option("--routing", help="Two-subject pairs: how much of each region's "
                                          "reference mass goes to its own subject.")] = False,
) -> None:
    """Does the model read its reference? Cells recovered at high noise with the right, a wrong and no reference."""
    from .default_model import default_model_path
    from .sprites.probe import main as probe_main

    argv = [model or str(default_model_path()), "--n", str(n), "--layouts", *(layout or ["same_layout", "random"])]
    if json_out is not None:
        argv += ["--json", str(json_out)]
    if routing:
        argv.append("--routing")
    probe_main(argv)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    app(prog_name="customshift")


def _register_benchmarks() -> None:
    from .eval.cli import register_cli

    register_cli(app, evaluate_app, user_errors)


_register_benchmarks()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
