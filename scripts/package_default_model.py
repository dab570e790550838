"""Package a stage-2 run as the default model shipped in the package (customshift/assets/default-model).

    python scripts/package_default_model.py runs/default/stage2 [--dest customshift/assets/default-model]

Writes the whole pipeline (transformer and VAE in fp16 to keep the repository small; the other small
components as trained) plus the CustomShift weights folder, and a RECIPE.json that records where it came
from (run, step, config, machine, time).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml

from customshift.io import atomic_write_json
from customshift.training.trainer import find_checkpoint, load_pipeline_from_checkpoint


def package(run: Path, dest: Path) -> Path:
    checkpoint = find_checkpoint(run)
    if checkpoint is None:
        raise SystemExit(f"no complete checkpoint in {run}")
    pipe = load_pipeline_from_checkpoint(checkpoint, ema=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    pipe.transformer.to(torch.float32)
    pipe.customshift_config.cads_form = "split"  # trained with the (numerically equal) mask form
    training = yaml.safe_load((checkpoint / "config.yaml").read_text())
    pipe.customshift_config.max_sequence_length = training["data"]["max_sequence_length"]
    pipe.save_customshift(tmp / "customshift", extra={"checkpoint": checkpoint.name})
    state = json.loads((checkpoint / "state.json").read_text()) if (checkpoint / "state.json").exists() else {}
    log = run / "train_log.csv"
    atomic_write_json(tmp / "RECIPE.json", {
        "recipe": "scripts/train_default_model.sh "
                  "(stage 1: customshift.training.vae; stage 2: configs/default-model.yaml)",
        "checkpoint": checkpoint.name,
        "step": state.get("step"),
        "train_log_tail": log.read_text().splitlines()[-1] if log.exists() else None,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
        "packaged": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    })
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--dest", type=Path, default=Path(__file__).parents[1] / "customshift/assets/default-model")
    args = parser.parse_args()
    print(package(args.run, args.dest))


if __name__ == "__main__":
    main()
