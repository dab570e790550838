"""Package a training run as the default model shipped in the package (customshift/assets/default-model).

    python scripts/package_default_model.py runs/default/stage4-v3 [--dest customshift/assets/default-model]

The run is read from its latest checkpoint (EMA weights), or from its ``final/`` export when that is all
it holds (a run copied back from a GPU machine). Writes the whole pipeline (transformer and VAE in fp16 to
keep the repository small; the other small components as trained) plus the CustomShift weights folder,
and a RECIPE.json that records where it came from (run, step, config, machine, time).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from customshift.io import atomic_write_json
from customshift.training.trainer import find_checkpoint, load_pipeline_from_checkpoint

DEFAULT_RECIPE = (
    "scripts/train_default_model.sh (stage 1: customshift.sprites.vae; stage 2: configs/default-model-v2.yaml; "
    "stage 3: configs/default-model-v3-gpu.yaml, one GPU; stage 4: configs/default-model-v3-stage4.yaml; "
    "stage 5: configs/default-model-v5-stage5.yaml; stage 6: configs/default-model-v6-cooldown.yaml)"
)


def load_run(run: Path) -> tuple[Any, Path, int | None]:
    """The run's pipeline (EMA weights), the folder holding its config.yaml, and its step."""
    checkpoint = find_checkpoint(run)
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text()) if (checkpoint / "state.json").exists() else {}
        return load_pipeline_from_checkpoint(checkpoint, ema=True), checkpoint, state.get("step")
    final = run / "final"
    if not (final / "pipeline" / "model_index.json").is_file():
        raise SystemExit(f"no complete checkpoint and no final/pipeline in {run}")
    from customshift.generate import load_pipeline

    pipe = load_pipeline(str(final / "pipeline"), str(final / "customshift"), device="cpu", dtype="fp32")
    return pipe, final, json.loads((final / "info.json").read_text()).get("step")


def package(run: Path, dest: Path, recipe: str = DEFAULT_RECIPE, trained_on: str | None = None) -> Path:
    pipe, source, step = load_run(run)
    pipe.register_to_config(_name_or_path=None)  # the shipped model names no folder of this machine
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for config in [tmp / "model_index.json", *tmp.glob("*/config.json")]:  # no paths of this machine shipped
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            atomic_write_json(config, data)
    pipe.transformer.to(torch.float32)
    pipe.customshift_config.cads_form = "split"  # trained with the (numerically equal) mask form
    training = yaml.safe_load((source / "config.yaml").read_text())
    pipe.customshift_config.max_sequence_length = training["data"]["max_sequence_length"]
    pipe.save_customshift(tmp / "customshift", extra={"checkpoint": source.name})
    log = run / "train_log.csv"
    atomic_write_json(tmp / "RECIPE.json", {
        "recipe": recipe,
        "run": str(run),
        "checkpoint": source.name,
        "step": step,
        "train_log_tail": log.read_text().splitlines()[-1] if log.exists() else None,
        "trained_on": trained_on,
        "packaged_on": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
        "packaged": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    })
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="how the run was made, for RECIPE.json")
    parser.add_argument("--trained-on", default=None, help="the machines and times of its stages, for RECIPE.json")
    parser.add_argument("--dest", type=Path, default=Path(__file__).parents[1] / "customshift/assets/default-model")
    args = parser.parse_args()
    print(package(args.run, args.dest, args.recipe, args.trained_on))


if __name__ == "__main__":
    main()
