"""benchmarks/train_real_size.py: the real-size training benchmark, run here at toy size (the real run is on a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_real_size  # noqa: E402


def test_the_benchmark_trains_checkpoints_and_resumes_at_toy_size(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "result.jsonl"
    code = train_real_size.main(["--model", "tiny", "--steps", "2", "--dtype", "fp32", "--json", str(out),
                                 "--out", str(tmp_path / "run")])
    result = json.loads(out.read_text().splitlines()[-1])
    assert code == 0 and result["loss_finite"] and len(result["losses"]) == 2
    assert result["checkpoint"] == "ckpt-0000002"
    assert result["resumed_at_step"] == 2 and result["step_after_resume"] == 3
    assert result["seconds_per_step"] > 0 and result["peak_memory_gb"] > 0 and result["trained_parameters_m"] > 0
    from customshift.training.checkpoint import is_complete_checkpoint

    assert is_complete_checkpoint(tmp_path / "run" / "ckpt-0000002")


def test_the_real_shapes_are_the_released_models():
    """The transformer configs build (on the meta device: no memory) to the released parameter counts."""
    from diffusers import SD3Transformer2DModel

    counts = {}
    for name in ("sd3-medium", "sd35-large"):
        with torch.device("meta"):
            model = SD3Transformer2DModel(**train_real_size.TRANSFORMERS[name])
        counts[name] = sum(p.numel() for p in model.parameters())
    assert 2.0e9 < counts["sd3-medium"] < 2.1e9  # SD3-medium: 2B
    assert 8.0e9 < counts["sd35-large"] < 8.2e9  # SD3.5-large: 8B
