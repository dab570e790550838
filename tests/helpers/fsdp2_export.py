"""FSDP2 (`fully_shard`) on CPU/gloo with 2 processes, for tests/test_training_distributed.py.

accelerate's FSDP plugin refuses a machine without accelerators, so this shards the trainer's own
Objective with torch's FSDP2 directly, takes one optimiser step on the same batch on both ranks, and writes
the CustomShift export through the trainer's checkpoint code on its sharded path (full state gathered with
`get_model_state_dict(full_state_dict=True)`, as accelerate's get_state_dict does under FSDP2) next to the
export of an unsharded copy that took the same step; then validates both ways (validation.py's sharded and
unsharded paths) and records the metrics.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/fsdp2_export.py OUTPUT_DIR
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]


def main(out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from customshift.tiny import build_tiny_pipeline
    from customshift.training.batches import BatchBuilder
    from customshift.training.checkpoint import Checkpointer
    from customshift.training.config import load_config
    from customshift.training.data import GroupLoader, build_source
    from customshift.training.model import mark_trainable, setup_model
    from customshift.training.objective import Objective
    from customshift.training.validation import Validator

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    config = load_config(ROOT / "configs" / "tiny-smoke.yaml", [
        f"output_dir={out}", "train.prompt_dropout=0", "train.reference_dropout=0", "train.both_dropout=0",
        "data.num_workers=0", "data.batch_size=2", "data.curriculum=[]", "validation.num_pairs=2",
        "validation.num_inference_steps=2"])
    pipe = build_tiny_pipeline("sd3")
    setup_model(pipe, config)
    trainable = mark_trainable(pipe, config)
    reference = copy.deepcopy(pipe)
    reference_trainable = mark_trainable(reference, config)
    resolution = pipe.default_sample_size * pipe.vae_scale_factor
    source, order = build_source(config.data, config.seed, 2)
    loader = GroupLoader(source, order, 2)
    groups = loader.next_batch()
    loader.close()
    batch = BatchBuilder(pipe, config, resolution, torch.device("cpu"))(groups, torch.Generator().manual_seed(0))

    def step(objective: Objective, params: list[torch.nn.Parameter]) -> None:
        optimizer = torch.optim.SGD(params, lr=0.5)
        loss, _ = objective(batch)
        loss.backward()
        optimizer.step()

    step(Objective(reference, True), list(reference_trainable.values()))
    objective = Objective(pipe, True)
    fully_shard(objective)  # one unit: the branch shares the transformer's weights
    step(objective, [p for p in objective.parameters() if p.requires_grad])
    sharded = [n for n, p in objective.named_parameters() if type(p.data).__name__ == "DTensor"]

    def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def parts(sharded: bool, pipe: Any, model: Any, trained: dict[str, torch.nn.Parameter], folder: Path) -> Any:
        """What Checkpointer and Validator read from a Trainer."""
        logged: dict[str, Any] = {}
        accelerator = SimpleNamespace(get_state_dict=full_state, autocast=contextlib.nullcontext,
                                      wait_for_everyone=dist.barrier if sharded else lambda: None,
                                      log=lambda values, step: logged.update(values))
        trainer = SimpleNamespace(
            sharded=sharded, accelerator=accelerator, model=model, trainable=trained, ema=None, config=config,
            use_reference=True, cs=pipe.customshift_config, step=1, pipe=pipe, is_main=rank == 0, output_dir=folder,
            resolution=resolution, source=source, averaged_weights=contextlib.nullcontext, logged=logged,
            build_base=lambda: build_tiny_pipeline("sd3"))
        trainer.checkpoints = Checkpointer.__new__(Checkpointer)
        trainer.checkpoints.trainer, trainer.checkpoints._shadow = trainer, None
        return trainer

    trainer = parts(True, pipe, objective, trainable, out / "fsdp")
    weights = trainer.checkpoints.full_state()  # a collective: every rank takes part
    if rank == 0:
        trainer.checkpoints.write_exports(out / "fsdp", weights)
        reference.save_customshift(out / "unsharded" / "customshift")
    Validator(trainer)()  # the sharded path: full state gathered on every rank, the main one generates
    if rank == 0:
        unsharded = parts(False, reference, Objective(reference, True), reference_trainable, out / "unsharded")
        Validator(unsharded)()
        (out / "info.json").write_text(json.dumps({"world_size": world, "sharded_parameters": len(sharded),
                                                   "validation": trainer.logged,
                                                   "validation_unsharded": unsharded.logged}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
