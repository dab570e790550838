"""Writing the results of an evaluation: CSVs, the summary JSON, a markdown table, grids and a scatter plot.

Everything is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written report that looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from customshift.errors import CustomShiftError
from customshift.eval.metrics import METRIC_LABELS, METRICS
from customshift.io import atomic_save_image, atomic_write_json, atomic_write_text

PUBLISHED_RESULTS_PATH = Path(__file__).with_name("published_results.json")

__all__ = [
    "atomic_save_image",
    "atomic_write_json",
    "atomic_write_text",
    "load_published_results",
    "published_entries",
    "render_markdown",
    "save_scatter_plot",
    "subject_grid",
    "write_csv",
]


# ------------------------------------------------------------------------------------------------ CSV
def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str]) -> None:
    """Write ``rows`` as CSV (floats with 6 decimals, None as empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt_cell(row.get(k)) for k in fieldnames})
    atomic_write_text(path, buf.getvalue())


def _fmt_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    if isinstance(v, (list, tuple)):
        return escape_formula(";".join(str(x) for x in v))
    return escape_formula(v) if isinstance(v, str) else v


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def escape_formula(text: str) -> str:
    """A text cell a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``...) gets a leading ``'``.

    Numbers are written by ``_fmt_cell`` from floats and ints, never through here, so ``-0.5`` stays a number.
    """
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


# ---------------------------------------------------------------------------------- published results
def load_published_results(path: str | Path | None = None) -> dict[str, Any]:
    """The published numbers (``published_results.json``), checked: every number carries a source."""
    path = Path(path) if path is not None else PUBLISHED_RESULTS_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CustomShiftError(f"cannot read the published results file {path}: {exc}") from exc
    for bench, spec in data.get("benchmarks", {}).items():
        for i, entry in enumerate(spec.get("entries", [])):
            src = entry.get("source") or {}
            if not src.get("title") or not (src.get("arxiv") or src.get("url")) or not src.get("table"):
                raise CustomShiftError(f"{path}: {bench} entry {i} ({entry.get('method')}) has no complete source")
    return data


def published_entries(benchmark: str, path: str | Path | None = None) -> list[dict[str, Any]]:
    return list(load_published_results(path).get("benchmarks", {}).get(benchmark, {}).get("entries", []))


# ------------------------------------------------------------------------------------------- markdown
def standard_metric_models(metric_models: Mapping[str, Any]) -> bool:
    """Whether the run used the papers' metric models (by hub id, or a folder named like the hub repo)."""
    dino = str(metric_models.get("dino_model") or "").rstrip("/\\").replace("\\", "/").split("/")[-1]
    clip = str(metric_models.get("clip_model") or "").rstrip("/\\").replace("\\", "/").split("/")[-1]
    return dino == "dino-vits16" and clip == "clip-vit-base-patch32"


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def render_markdown(summary: Mapping[str, Any], per_subject: Sequence[Mapping[str, Any]],
                    published: Sequence[Mapping[str, Any]] = ()) -> str:
    """A human-readable report: settings, the overall scores, this run beside published ones, per subject."""
    m = summary["metrics"]["subject_mean"]
    lines = [f"# {summary.get('benchmark_title', summary['benchmark'])}: {summary.get('method', 'run')}", ""]
    gen = summary.get("generation") or {}
    settings = [f"{len(per_subject)} subjects", f"{summary['counts']['images']} generated images"]
    if gen:
        settings += [f"model `{gen.get('model') or 'default'}`"]
        if gen.get("weights"):
            settings.append(f"weights `{gen['weights']}`")
        size = (f"{gen['height']}x{gen['width']}" if gen.get("height") and gen.get("width")
                else "the model's default size")
        settings += [f"{gen.get('steps')} steps", size,
                     f"guidance {gen.get('guidance_scale')}", f"shift scale {gen.get('shift_scale')}",
                     f"reference policy `{gen.get('reference_policy')}`", f"seed {gen.get('seed')}"]
    mm = summary.get("metric_models", {})
    settings += [f"DINO `{mm.get('dino_model')}`", f"CLIP `{mm.get('clip_model')}`"]
    lines += ["Settings: " + ", ".join(settings) + ".", ""]

    lines += ["| | " + " | ".join(METRIC_LABELS[k] for k in METRICS) + " |",
              "|---|" + "---:|" * len(METRICS),
              "| mean over subjects | " + " | ".join(_f(m.get(k)) for k in METRICS) + " |",
              "| mean over images | " + " | ".join(_f(summary["metrics"]["image_mean"].get(k)) for k in METRICS)
              + " |"]
    rr = summary["metrics"].get("real_vs_real") or {}
    if rr.get("dino") is not None:
        lines.append(f"| real vs real (oracle) | {_f(rr.get('dino'))} | {_f(rr.get('clip_i'))} | – | – |")
    lines.append("")

    if published:
        lines += ["## Beside published results", "",
                  "Numbers as reported by the cited papers; their generation settings and metric backbones "
                  "may differ from this run's (see `published_results.json` for each source).", ""]
        if not standard_metric_models(mm):
            lines += ["**Note:** this run's metric models are not recognised as the papers' (DINO ViT-S/16 "
                      "`facebook/dino-vits16`, CLIP ViT-B/32 `openai/clip-vit-base-patch32`; a local folder counts "
                      "when it is named like the hub repository): compare with the published numbers with care.",
                      ""]
        lines += [
                  "| method | base model | " + " | ".join(METRIC_LABELS[k] for k in METRICS) + " | source |",
                  "|---|---|" + "---:|" * len(METRICS) + "---|",
                  f"| **{summary.get('method', 'this run')} (this run)** | {gen.get('model', '')} | "
                  + " | ".join(f"**{_f(m.get(k))}**" for k in METRICS) + " | |"]
        for e in published:
            src = e["source"]
            cite = f"{src['title']}" + (f", arXiv:{src['arxiv']}" if src.get("arxiv") else "") + f", {src['table']}"
            lines.append(f"| {e['method']} | {e.get('base_model', '')} | "
                         + " | ".join(_f(e.get(k)) for k in METRICS) + f" | {cite} |")
        lines.append("")

    lines += ["## Per subject", "",
              "| subject | prompt subject | images | real | " + " | ".join(METRIC_LABELS[k] for k in METRICS) + " |",
              "|---|---|---:|---:|" + "---:|" * len(METRICS)]
    for row in per_subject:
        lines.append(f"| {row['subject']} | {row.get('subject_name', '')} | {row['n_generated']} | {row['n_real']} | "
                     + " | ".join(_f(row.get(k)) for k in METRICS) + " |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- grids
def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _thumb(img: Image.Image, size: int) -> Image.Image:
    img = img.convert("RGB")
    scale = size / max(img.size)  # fit the square, up or down
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def subject_grid(title: str, real: Sequence[Image.Image], rows: Sequence[tuple[str, Sequence[Image.Image]]],
                 thumb: int = 128, label_width: int = 240, highlight: Sequence[int] = ()) -> Image.Image:
    """A grid: the real images on top, then one row per prompt (its text on the left, its images right).

    The real images at the indices ``highlight`` (the references given to the method) get a red frame.
    """
    ncols = max([len(real)] + [len(imgs) for _, imgs in rows] + [1])
    pad = 4
    width = label_width + ncols * (thumb + pad) + pad
    height = 24 + (len(rows) + 1) * (thumb + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(12)
    draw.text((pad, 6), title, fill=(0, 0, 0), font=_font(14))

    def put_row(y: int, label: str, imgs: Iterable[Image.Image]) -> None:
        wrapped = textwrap.wrap(label, width=max(10, label_width // 7))[: max(1, thumb // 14)]
        draw.multiline_text((pad, y + 2), "\n".join(wrapped), fill=(0, 0, 0), font=font, spacing=2)
        for j, im in enumerate(imgs):
            grid.paste(_thumb(im, thumb), (label_width + pad + j * (thumb + pad), y))

    y = 24
    put_row(y, "real images" + (" (red: reference)" if highlight else ""), real)
    for j in highlight:
        x0 = label_width + pad + j * (thumb + pad)
        draw.rectangle((x0, y, x0 + thumb - 1, y + thumb - 1), outline=(220, 0, 0), width=3)
    for label, imgs in rows:
        y += thumb + pad
        put_row(y, label, imgs)
    return grid


# -------------------------------------------------------------------------------------------- scatter
def save_scatter_plot(path: str | Path, run_label: str, run_point: tuple[float, float],
                      published: Sequence[Mapping[str, Any]], x_metric: str = "dino", y_metric: str = "clip_t",
                      title: str = "") -> bool:
    """Scatter ``y_metric`` vs ``x_metric``: published methods numbered (legend on the right), this run a star.

    Fine-tuning methods are squares, tuning-free ones circles. Returns False (and writes nothing) when
    this run has no value for one of the axes.
    """
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in run_point):
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pts = [(e, e.get(x_metric), e.get(y_metric)) for e in published]
    pts = [(e, x, y) for e, x, y in pts if x is not None and y is not None]
    fig = plt.figure(figsize=(11, 5.5), dpi=110)
    ax = fig.add_axes((0.06, 0.12, 0.47, 0.78))
    legend = []
    for n, (e, x, y) in enumerate(pts, 1):
        marker = "s" if e.get("tuning_free") is False else "o"
        ax.scatter([x], [y], color="tab:gray", marker=marker, s=30, zorder=2)
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color="dimgray")
        name = e["method"] + (f" ({e['base_model']})" if e.get("base_model") else "")
        legend.append(f"{n:>2}  {name}: {x:.3f} / {y:.3f}")
    ax.scatter([run_point[0]], [run_point[1]], color="tab:red", marker="*", s=200, zorder=3)
    ax.annotate(run_label, run_point, textcoords="offset points", xytext=(7, -4), fontsize=9, color="tab:red",
                weight="bold")
    xl, yl = METRIC_LABELS.get(x_metric, x_metric), METRIC_LABELS.get(y_metric, y_metric)
    ax.set_xlabel(xl + " (subject fidelity)")
    ax.set_ylabel(yl + " (prompt fidelity)")
    ax.set_title(title or f"{yl} vs {xl}", fontsize=10)
    ax.grid(True, alpha=0.3)
    header = [f"* {run_label} (this run): {run_point[0]:.3f} / {run_point[1]:.3f}", "",
              f"published ({xl} / {yl}); square: fine-tuning,", "circle: tuning-free"]
    fig.text(0.56, 0.90, "\n".join(header + legend), fontsize=7, va="top", family="monospace")
    fig.text(0.01, 0.01, "Published points as reported in the papers cited in published_results.json; their "
             "settings and backbones may differ from this run's.", fontsize=6, color="dimgray")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as im:
        atomic_save_image(im.convert("RGB"), path)
    return True
