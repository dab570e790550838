"""Can the reference path learn at all? The easiest possible task: the target IS the reference.

Fine-tunes a model (default: the packaged default model's transformer, with a fresh CustomShift adapter)
on pairs whose target image equals the reference image, at high noise, and prints the flow loss on 16
held-out subjects with the right reference and with another subject's reference. A ratio wrong/right
above 1 that grows means gradients reach the branch and the generation branch reads it; a ratio stuck
at 1 would mean a broken path. Numbers in docs/default-model.md come from:

    python scripts/copy_sanity.py --steps 300 --shift mass
    python scripts/copy_sanity.py --steps 300 --shift logit
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from customshift.sprites import synthetic
from customshift.training.config import load_config
from customshift.training.data import Group
from customshift.training.trainer import Trainer


def copy_groups(n: int, seed: int) -> list[Group]:
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        pair = synthetic.sample_pair(rng, layout="same_layout")
        image = Image.fromarray(pair.reference)
        groups.append(Group(reference=image, subject=pair.subject_name, targets=[image],
                            prompts=[pair.reference_context.prompt(pair.subject.cls)], origin="copy"))
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/synthetic-benchmark.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shift", choices=["mass", "logit"], default="mass")
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args(argv)
    config = load_config(args.config, [
        "output_dir=runs/copy-sanity", f"train.max_steps={args.steps}", "checkpoint.every_steps=0",
        "train.prompt_dropout=0", "train.reference_dropout=0", "train.both_dropout=0", "train.logit_mean=2.0",
        f"model.customshift.cads_shift={args.shift}", "model.customshift.generation_lora_rank=0",
        "train.trainable=full", "train.learning_rate=5e-4",
    ])
    trainer = Trainer(config)
    held = copy_groups(16, seed=999)
    wrong = [Group(reference=held[(i + 1) % len(held)].reference, subject=g.subject, targets=g.targets,
                   prompts=g.prompts, origin="wrong reference") for i, g in enumerate(held)]
    start = time.time()
    for step in range(1, args.steps + 1):
        trainer.train_step([copy_groups(8, seed=step)])
        if step % args.every == 0:
            right, other = trainer.loss_on(held, seed=0), trainer.loss_on(wrong, seed=0)
            print(f"step {step}: held-out loss, right reference {right:.4f}, wrong reference {other:.4f}, "
                  f"ratio {other / right:.3f} ({time.time() - start:.0f} s)", flush=True)
    trainer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
