"""The table that shows whether the method works: every baseline and ablation on the exact sprite domain.

Each trained variant starts from the same text-to-image base (default: the packaged default model's
transformer), trains the same number of steps on the same data stream with the same seed, and differs
only in its CustomShift config; then all are scored on the same held-out subjects, clean and
distractor tracks, with the wrong-reference control. Untrained baselines: text-only (the base with no
reference) and copy-the-reference. Test-time fine-tuning (a LoRA fitted per subject on the same base)
is timed against CustomShift's encode + generate: seconds to the first image of a new subject.

    python benchmarks/synthetic.py --steps 400 --n 64 --runs runs/synthetic-benchmark \\
        --out docs/results/synthetic --markdown docs/synthetic.md

Training is resumable: rerunning the command continues unfinished variants and reuses finished ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Config overrides of each trained variant on top of the recipe (configs/synthetic-benchmark.yaml).
# Trained in this order (the method and its baseline first, so an interrupted run has the comparison that
# matters most), and listed in the table in this order.
VARIANTS: dict[str, dict[str, Any]] = {
    "CustomShift": {},
    # Reference tokens joined to joint attention as extra keys: no branch LoRA, no subject tokens, no shift.
    "naive concatenation": {"lora_rank": 0, "subject_tokens_in_reference": False, "conditional_shift": False,
                            "learn_shift": False, "beta_init": 0.0, "cads_shift": "logit",
                            "subject_competition": False},
    "no subject tokens in the branch": {"subject_tokens_in_reference": False},
    "unconditional shift": {"conditional_shift": False},
    "no shift parameters": {"learn_shift": False},
    "logit shift (no mass constraint)": {"cads_shift": "logit"},
    # Several subjects: each name's shift no longer competes for the query (docs/method.md, "Several subjects").
    "no subject competition": {"subject_competition": False},
}
# The base's own CustomShift weights (when its folder has customshift/), scored as they are: the full recipe
# that made the shipped default model, far more than the fixed budget of the trained rows.
SHIPPED = "CustomShift, the base's own weights"
ORDER = ["text only", "copy the reference", SHIPPED, *VARIANTS]
TARGETS = {"clean_identity": 0.80, "clean_prompt_accuracy": 0.90, "distractor_leakage": 0.10,
           "identity_over_naive": 0.15}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def base_digest(base: str | Path) -> str:
    """A short digest of the base transformer's weights: rows and runs are reused only on the same base."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(Path(base).glob("transformer/*.safetensors"))
    if not files:
        raise SystemExit(f"--base {base} has no transformer/*.safetensors; pass an SD3 pipeline folder")
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def recipe_digest(args: argparse.Namespace) -> str:
    """A short digest of the shared training recipe as the trainer resolves it (file, its bases, --set):
    rows and runs are reused only when it is unchanged. The output folder and the base path are left out."""
    import hashlib

    from customshift.training.config import load_config

    recipe = load_config(args.config, list(args.overrides)).to_dict()
    recipe.pop("output_dir", None)
    recipe["model"].pop("pretrained", None)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def train_variant(name: str, args: argparse.Namespace) -> Path:
    """Train (or finish, or reuse) one variant; returns its run folder."""
    from customshift.io import atomic_write_text
    from customshift.training.trainer import find_checkpoint

    run = Path(args.runs) / slug(name)
    marker, digest = run / "trained-on.sha256", f"{base_digest(args.base)} recipe {recipe_digest(args)}"
    if find_checkpoint(run) is not None and (not marker.exists() or marker.read_text().strip() != digest):
        raise SystemExit(f"{run} was trained on another base than {args.base} or another recipe than {args.config} "
                         "with these --set overrides (or before both were recorded); pass a new --runs folder, "
                         "or delete that run to retrain it")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, digest + "\n")
    overrides = [f"output_dir={run}", f"train.max_steps={args.steps}", f"model.pretrained={args.base}"]
    overrides += [f"model.customshift.{k}={_value(v)}" for k, v in VARIANTS[name].items()]
    overrides += list(args.overrides)
    found = find_checkpoint(run)
    if found is not None and found.name == f"ckpt-{args.steps:07d}":
        print(f"[{name}] trained ({found})", flush=True)
        return run
    print(f"[{name}] training {args.steps} steps -> {run}", flush=True)
    command = [sys.executable, "-m", "customshift.training.trainer", str(args.config), "--resume",
               "--set", *overrides]
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    with open(Path(args.runs) / f"{slug(name)}.log", "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return run


def evaluate(pipe: Any, folder: Path, args: argparse.Namespace, use_reference: bool = True) -> dict[str, Any]:
    from customshift.sprites.evaluate import evaluate_synthetic
    from customshift.sprites.probe import colour_recovery
    from customshift.sprites.synthetic import evaluation_split

    start = time.perf_counter()
    summary = evaluate_synthetic(pipe, folder, n=args.n, tracks=args.tracks, steps=args.sampling_steps,
                                 guidance_scale=args.guidance_scale, use_reference=use_reference,
                                 batch_size=args.batch_size)
    if use_reference:
        summary["probe"] = colour_recovery(pipe, evaluation_split(n=args.n, layout="random"), (0.85, 0.95))
    summary["seconds"] = time.perf_counter() - start
    return summary


def copy_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The reference itself as the answer (two subjects: the first subject's reference, which holds one sprite)."""
    from customshift.sprites import synthetic
    from customshift.sprites.evaluate import TRACKS, track_pairs

    result: dict[str, Any] = {}
    for track in args.tracks:
        pairs = track_pairs(track, args.n)
        two = TRACKS[track].get("two_subjects", False)
        score = synthetic.score_two_subjects if two else synthetic.score
        answers = [p.references[0] if two else p.reference for p in pairs]
        result[track] = {k: v for k, v in score(answers, pairs).items() if k != "per_sample"}
        result[track]["identity_wrong_reference"] = score(answers[1:] + answers[:1], pairs)["identity"]
    return result


def finetune_cost(args: argparse.Namespace, customshift_run: Path | None) -> dict[str, Any]:
    """Seconds to the first image of a new subject: per-subject LoRA fitting vs CustomShift (same base, same CPU)."""
    from speed import LoraTuner

    from customshift.sprites import synthetic
    from customshift.sprites.probe import load_model
    from customshift.training.trainer import load_pipeline_from_checkpoint

    pairs = synthetic.evaluation_split(n=args.finetune_subjects)
    size = synthetic.CANVAS
    rows = []
    for index, pair in enumerate(pairs):
        pipe = load_model(args.base)
        pipe.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        from PIL import Image

        with torch.no_grad():
            latents = pipe.prepare_reference_latents([Image.fromarray(pair.reference)], size, size)
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=pair.reference_context.prompt(pair.subject.cls), prompt_2=None, prompt_3=None,
                do_classifier_free_guidance=False, device="cpu", max_sequence_length=args.max_sequence_length)
        tuner = LoraTuner(pipe.transformer, latents, embeds, pooled, rank=4, lr=args.finetune_lr, seed=index)
        initial, steps = tuner.eval_loss(), 0
        while steps < args.finetune_max_steps:
            tuner.step()
            steps += 1
            if steps % 25 == 0 and tuner.eval_loss() <= args.finetune_threshold * initial:
                break
        pipe.transformer.requires_grad_(False)
        image = pipe(prompt=pair.prompt, num_inference_steps=args.sampling_steps, guidance_scale=args.guidance_scale,
                     height=size, width=size, max_sequence_length=args.max_sequence_length,
                     generator=torch.Generator().manual_seed(index), output_type="np").images[0]
        seconds = time.perf_counter() - start
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        rows.append({"method": "per-subject LoRA", "steps": steps, "seconds": seconds,
                     "identity": synthetic.identity(image, pair.subject)})
        if customshift_run is not None:
            pipe = load_pipeline_from_checkpoint(customshift_run)
            pipe.set_progress_bar_config(disable=True)
            start = time.perf_counter()
            subject = pipe.encode_subject(pair.reference, pair.subject_name, size, size)
            image = pipe(prompt=pair.prompt, subject=subject, num_inference_steps=args.sampling_steps,
                         guidance_scale=args.guidance_scale, height=size, width=size,
                         generator=torch.Generator().manual_seed(index), output_type="np").images[0]
            seconds = time.perf_counter() - start
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            rows.append({"method": "CustomShift", "steps": 0, "seconds": seconds,
                         "identity": synthetic.identity(image, pair.subject)})
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {key: float(np.median([r[key] for r in mine])) for key in ("seconds", "steps", "identity")}
    return {"subjects": len(pairs), "threshold": f"{args.finetune_threshold} x initial flow loss on the reference",
            "max_steps": args.finetune_max_steps, "median": summary, "rows": rows}


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The generated block of the docs page: table, targets, new-subject cost, figure."""
    rows = {name: results["methods"][name] for name in sorted(results["methods"], key=ORDER.index)}
    settings = {**vars(args), **results.get("settings", {})}
    naive = rows.get("naive concatenation", {}).get("distractor", {}).get("identity")
    lines = [
        "Every trained variant: the same base, "
        f"{settings['steps']} training steps with the same data and seed (configs/synthetic-benchmark.yaml), "
        f"then {settings['n']} held-out subjects per track, {settings['sampling_steps']} sampling steps, guidance "
        f"{settings['guidance_scale']}. Identity with a wrong reference is the control: equal to identity means "
        "the reference is ignored. Probe: cells recovered from the one-step clean estimate at sigma 0.85 / 0.95 "
        "with the right / a wrong reference (customshift.sprites.probe).",
        "",
        f"Measured on {results['machine']} in {results['minutes']:.0f} min. Command:",
        "",
        "    " + results["command"],
        "",
        "| method | clean identity | wrong ref | prompt acc | PSNR | distractor identity | leakage | "
        "probe 0.85 right/wrong | probe 0.95 right/wrong |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        clean, dis = r.get("clean", {}), r.get("distractor", {})
        probe = r.get("probe")
        nan = float("nan")
        cells = [f"{clean.get('identity', nan):.3f}", f"{clean.get('identity_wrong_reference', nan):.3f}",
                 f"{clean.get('prompt_accuracy', nan):.3f}", f"{clean.get('psnr', nan):.1f}",
                 f"{dis.get('identity', nan):.3f}", f"{dis.get('leakage', nan):.3f}"]
        for sigma in ("0.85", "0.95"):
            cells.append(f"{probe['right'][sigma]:.2f} / {probe['wrong'][sigma]:.2f}" if probe else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _two_subject_rows(rows)
    missing = [name for name in VARIANTS if name not in rows]
    if missing:
        lines += ["", "Not measured in this run: " + ", ".join(missing) + ". Rerun the command to add them (finished "
                  "variants and their scores are reused)."]
    cs = rows.get("CustomShift", {})
    lines += ["", "## Targets (clean track unless said)", "",
              "| target | wanted | measured | met |", "|---|---|---|---|"]
    checks = [
        ("identity", f">= {TARGETS['clean_identity']}", cs.get("clean", {}).get("identity"),
         lambda v: v >= TARGETS["clean_identity"]),
        ("prompt accuracy", f">= {TARGETS['clean_prompt_accuracy']}", cs.get("clean", {}).get("prompt_accuracy"),
         lambda v: v >= TARGETS["clean_prompt_accuracy"]),
        ("distractor leakage", f"<= {TARGETS['distractor_leakage']}", cs.get("distractor", {}).get("leakage"),
         lambda v: v <= TARGETS["distractor_leakage"]),
        ("distractor identity minus naive concatenation", f">= {TARGETS['identity_over_naive']}",
         None if naive is None or "distractor" not in cs else cs["distractor"]["identity"] - naive,
         lambda v: v >= TARGETS["identity_over_naive"]),
    ]
    for what, wanted, value, ok in checks:
        lines.append(f"| {what} | {wanted} | {'—' if value is None else f'{value:.3f}'} | "
                     f"{'—' if value is None else ('yes' if ok(value) else 'no')} |")
    cost = results.get("finetune")
    if cost:
        lines += ["", "## A new subject: seconds to its first image (same base, same CPU, median of "
                  f"{cost['subjects']} subjects)", "",
                  "| method | seconds | fitting steps | identity |", "|---|---|---|---|"]
        # the baseline first, also when read back from summary.json (written with sorted keys)
        for method, m in sorted(cost["median"].items(), key=lambda item: item[0] == "CustomShift"):
            lines.append(f"| {method} | {m['seconds']:.1f} | {m['steps']:.0f} | {m['identity']:.3f} |")
        lines += ["", f"Per-subject LoRA: rank 4 on the attention, fitted on the single reference with its own "
                  f"caption until the flow loss is {cost['threshold']} (at most {cost['max_steps']} steps)."]
    lines += ["", "![identity vs prompt accuracy](images/synthetic-identity-vs-prompt.png)", "",
              "Figure and this block from the saved results: `python benchmarks/synthetic.py --report-only --out "
              + str(args.out) + "`."]
    return "\n".join(lines) + "\n"


def _two_subject_rows(rows: dict[str, Any]) -> list[str]:
    """The two-subject table (both references through the method, each with its own name), where measured."""
    measured = {name: r["two-subject"] for name, r in rows.items() if "two-subject" in r}
    if not measured:
        return []
    lines = ["", "Two subjects in one image (`two-subject` track: each subject from its own reference; text only sees "
             "neither; naive concatenation joins both references' tokens):", "",
             "| method | mean identity | wrong refs | swap rate | prompt acc (5 checks) | both found |",
             "|---|---|---|---|---|---|"]
    for name, t in measured.items():
        lines.append(f"| {name} | {t['identity']:.3f} | {t['identity_wrong_reference']:.3f} | {t['swap_rate']:.3f} | "
                     f"{t['prompt_accuracy']:.3f} | {t['found']:.3f} |")
    return lines


def write_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    from speed import write_markdown

    write_markdown(Path(args.markdown), "table", markdown(results, args), tag="synthetic",
                   title="The synthetic ground-truth benchmark")
    plot(results, Path(args.figure))


def plot(results: dict[str, Any], path: Path) -> None:
    """Identity against prompt accuracy: one colour per method, circles clean, squares distractor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(results["methods"], key=ORDER.index)
    fig, ax = plt.subplots(figsize=(7.6, 4.6), dpi=120)
    colours = plt.get_cmap("tab10")
    for index, name in enumerate(names):
        r = results["methods"][name]
        for track, marker in (("clean", "o"), ("distractor", "s")):
            if track in r:
                ax.scatter(r[track]["prompt_accuracy"], r[track]["identity"], marker=marker, s=46, alpha=0.85,
                           color=colours(index % 10), label=name if track == "clean" else None)
    ax.axhline(1 / 6, color="gray", lw=0.8, ls=":", label="chance identity (1/6)")
    ax.axhline(TARGETS["clean_identity"], color="green", lw=0.8, ls="--", label="target identity")
    ax.axvline(TARGETS["clean_prompt_accuracy"], color="green", lw=0.8, ls="-.", label="target prompt accuracy")
    ax.set_xlabel("prompt accuracy")
    ax.set_ylabel("identity (cell accuracy)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_title("Synthetic sprites, held-out subjects: circles clean track, squares distractor track", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthetic-benchmark.yaml"))
    parser.add_argument("--base", default=str(ROOT / "customshift" / "assets" / "default-model"),
                        help="the text-to-image base every variant starts from")
    parser.add_argument("--steps", type=int, default=400, help="training steps of every trained variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="training config overrides for every variant, e.g. train.mixed_precision=no")
    parser.add_argument("--runs", default="runs/synthetic-benchmark")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="held-out pairs per call (the same images, faster)")
    parser.add_argument("--tracks", nargs="+", default=["clean", "distractor", "two-subject"],
                        help="evaluate-synthetic tracks (customshift.sprites.evaluate.TRACKS)")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--max-sequence-length", type=int, default=16)
    parser.add_argument("--finetune-subjects", type=int, default=4)
    parser.add_argument("--finetune-threshold", type=float, default=0.5)
    parser.add_argument("--finetune-max-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--out", default="docs/results/synthetic")
    parser.add_argument("--markdown", default="docs/synthetic.md")
    parser.add_argument("--figure", default="docs/images/synthetic-identity-vs-prompt.png")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the docs block and the figure from OUT/summary.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    from customshift.io import atomic_write_json

    if args.report_only:  # an unfinished run's rows (partial.json exists only until its run finishes), or the summary
        saved = next((f for f in (out / "partial.json", out / "summary.json") if f.exists()), None)
        if saved is None:
            raise SystemExit(f"no results in {out}: run the benchmark first")
        write_report(json.loads(saved.read_text()), args)
        return 0
    torch.manual_seed(0)
    began = time.perf_counter()
    from customshift.sprites.probe import load_model
    from customshift.training.trainer import load_pipeline_from_checkpoint

    partial, summary = out / "partial.json", out / "summary.json"
    settings = {k: getattr(args, k) for k in ("steps", "n", "sampling_steps", "guidance_scale")}
    base = Path(args.base).resolve()
    settings["base"] = str(base.relative_to(ROOT)) if base.is_relative_to(ROOT) else str(base)
    settings["base_sha256"] = base_digest(base)  # the same folder may hold another model later
    settings["recipe_sha256"] = recipe_digest(args)  # and the same recipe file another mix
    results: dict[str, Any] = {"methods": {}, "settings": settings}
    for saved in (partial, summary):  # rows of an earlier run with the same settings are reused
        if saved.exists():
            earlier = json.loads(saved.read_text())
            if earlier.get("settings", settings) == settings:
                results.update({k: earlier[k] for k in ("methods", "minutes", "finetune") if k in earlier})
            break
    import platform

    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["command"] = "python benchmarks/synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv)
    methods = results["methods"]
    earlier_minutes = results.get("minutes", 0.0)

    def save_partial() -> None:
        results["minutes"] = earlier_minutes + (time.perf_counter() - began) / 60
        atomic_write_json(partial, results)

    if "copy the reference" not in methods:
        methods["copy the reference"] = copy_baseline(args)
    if "text only" not in methods:
        with torch.no_grad():
            methods["text only"] = evaluate(load_model(args.base), out / "text-only", args, use_reference=False)
        save_partial()
    if SHIPPED not in methods and (Path(args.base) / "customshift" / "customshift.json").is_file():
        with torch.no_grad():
            methods[SHIPPED] = evaluate(load_model(args.base), out / slug(SHIPPED), args)
        save_partial()
    runs = {}
    for name in args.variants:
        if name in methods:  # scored in an earlier run with the same settings
            continue
        runs[name] = train_variant(name, args)
        with torch.no_grad():
            methods[name] = evaluate(load_pipeline_from_checkpoint(runs[name]), out / slug(name), args)
        save_partial()
        print(f"[{name}] clean identity {methods[name]['clean']['identity']:.3f} "
              f"(wrong {methods[name]['clean']['identity_wrong_reference']:.3f})", flush=True)
    if not args.skip_finetune:
        if "CustomShift" in args.variants and "CustomShift" not in runs:
            runs["CustomShift"] = train_variant("CustomShift", args)  # reused when already trained
        results["finetune"] = finetune_cost(args, runs.get("CustomShift"))
    results["minutes"] = earlier_minutes + (time.perf_counter() - began) / 60  # earlier runs included
    atomic_write_json(summary, results)
    write_report(results, args)
    partial.unlink(missing_ok=True)
    print(Path(args.markdown).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
