"""Distributed training on CPU with 2 real processes (gloo): the same result as one process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "ddp_equivalence.py"
ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                # No GPU: accelerate's torchrun launch then runs gloo on CPUs (docs/training.md).
                "ACCELERATE_USE_CPU": "1"})
    return env


def two_processes(*args: str) -> list[str]:
    """The documented 2-process CPU launch: --multi_gpu picks the multi-process launcher, ACCELERATE_USE_CPU gloo."""
    port = str(29500 + os.getpid() % 500)
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, *args]


@pytest.mark.skipif(not Path(ACCELERATE).exists(), reason="accelerate CLI not installed")
def test_two_processes_export_the_weights_of_one_process_on_the_same_global_batch(tmp_path):
    sys.path.insert(0, str(HELPER.parent))
    try:
        import ddp_equivalence
    finally:
        sys.path.pop(0)
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    result = subprocess.run(two_processes(str(HELPER), str(ddp)), cwd=ROOT, env=launch_env(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"

    from customshift.tiny import build_tiny_pipeline

    single = tmp_path / "single"
    info = ddp_equivalence.train(single, 1, pipe=build_tiny_pipeline("sd3"))
    assert info["world_size"] == 1 and info["step"] == ranks[0]["step"] == ddp_equivalence.STEPS

    from safetensors.torch import load_file

    a = load_file(str(ddp / "final" / "customshift" / "customshift.safetensors"))
    b = load_file(str(single / "final" / "customshift" / "customshift.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    state = json.loads((ddp / "ckpt-0000003" / "state.json").read_text())
    assert state["world_size"] == 2 and [d["cursor"] for d in state["data"]] == [3, 3]
    # The run really trained (lr 1e-2, 3 steps): the exports are far from the starting adapter, beyond the tolerance.
    from customshift.training.config import load_config
    from customshift.training.model import setup_model

    start = build_tiny_pipeline("sd3")
    setup_model(start, load_config(ROOT / "configs" / "tiny-smoke.yaml"))
    start.save_customshift(tmp_path / "fresh")
    initial = load_file(str(tmp_path / "fresh" / "customshift.safetensors"))
    assert max(float((initial[n] - a[n]).abs().max()) for n in a) > 1e-3


def test_fsdp2_sharded_training_exports_the_full_weights(tmp_path):
    """accelerate's FSDP refuses CPUs ("no available devices"), so torch's FSDP2 shards the trainer's Objective on
    2 gloo processes (tests/helpers/fsdp2_export.py); the export written by the checkpoint code's sharded path
    equals that of an unsharded copy after the same step, although the pipeline's own parameters are shards, and
    validation (from the gathered state) scores what the unsharded copy scores."""
    from safetensors.torch import load_file

    helper = ROOT / "tests" / "helpers" / "fsdp2_export.py"
    port = str(30000 + os.getpid() % 500)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(helper), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["world_size"] == 2 and info["sharded_parameters"] > 10
    sharded = load_file(str(tmp_path / "fsdp" / "customshift" / "customshift.safetensors"))
    unsharded = load_file(str(tmp_path / "unsharded" / "customshift" / "customshift.safetensors"))
    assert sharded.keys() == unsharded.keys() and len(sharded) > 10
    for name in sharded:
        torch.testing.assert_close(sharded[name], unsharded[name], rtol=1e-5, atol=1e-7, msg=name)
    # Validation under FSDP generates from the gathered full state: the metrics of the unsharded model.
    assert set(info["validation"]) >= {"validation/identity", "validation/psnr"}
    assert info["validation"] == pytest.approx(info["validation_unsharded"], rel=1e-4)
    assert (tmp_path / "fsdp" / "validation" / "step-0000001.png").is_file()
