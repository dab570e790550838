"""One training run for tests/test_training_distributed.py: under `accelerate launch` with 2 processes
(batch 1 each) or in one process (batch 1, 2 accumulation steps): the same global batch of 2 groups per step.

Each group's dropout, sigma and noise come from a generator seeded by the group's data position (instead of
the per-process stream), so both runs draw the same numbers for the same items; everything else (DDP's
gradient averaging, the data split over ranks, the exports) is the trainer's own.

    python tests/helpers/ddp_equivalence.py OUTPUT_DIR   (under accelerate launch or alone)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def overrides(output: Path, world_size: int) -> list[str]:
    return [f"output_dir={output}", f"train.max_steps={STEPS}", "data.batch_size=1", "data.num_workers=0",
            f"train.gradient_accumulation_steps={2 // world_size}", "train.prompt_dropout=0",
            "train.reference_dropout=0", "train.both_dropout=0", "train.max_grad_norm=0", "train.learning_rate=1e-2",
            "checkpoint.every_steps=0", "train.log_every=1", "data.curriculum=[]", "train.report_to=[csv]"]


def train(output: Path, world_size: int, pipe=None) -> dict:
    from customshift.training.config import load_config
    from customshift.training.trainer import Trainer

    torch.set_num_threads(1)
    config = load_config(ROOT / "configs" / "tiny-smoke.yaml", overrides(output, world_size))
    trainer = Trainer(config, pipe=pipe)
    build = trainer.prepare_batch

    def per_item(groups, generator=None):
        assert len(groups) == 1
        position = int(groups[0].origin.rsplit(" ", 1)[-1])
        return build(groups, torch.Generator().manual_seed(1000 + position))

    trainer.prepare_batch = per_item
    trainer.train()
    return {"world_size": trainer.world_size, "rank": trainer.rank, "step": trainer.step,
            "distributed_type": str(trainer.accelerator.distributed_type)}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    import os

    info = train(out, int(os.environ.get("WORLD_SIZE", "1")))
    (out / f"rank{info['rank']}.json").write_text(json.dumps(info))
